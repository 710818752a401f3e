"""Compiled per-feature kernels of the general-K paths (K >= 2).

Two kinds:

- **K = 2 on the dense path** (:func:`score_k2_batch`, bench_fit's subject + subject x slope
  case, q = 25 + 25). ``compiled._score_batch`` inverts the q x q matrix D A + I by
  Gauss-Jordan (q^3). D is constant on each component, so it commutes with
  V = blockdiag(V1, V2), the eigenvectors of the diagonal blocks of A; in that basis the
  first block of D A + I is diagonal and the Schur complement over it leaves one
  h2 x h2 symmetric system: about h1 h2^2 + h2^3 + h1^2 h2 / 2 multiply-adds instead of
  q^3 (3.2x fewer at h1 = h2). Traces and block sums of squares are the same in both bases.
- **Sums of the structured path with a dense Schur complement** (crossed factors such as
  InstEval's ``(1|s) + (1|d)``): :class:`.structured.Factor`'s BLAS calls (Cholesky,
  inverse, one product) are the essential cost; the traces and block sums of squares of
  W0 that follow are O(q_s^2) each, and in NumPy they took as long as the BLAS calls (a
  dozen temporaries of q_s^2 values per feature and iteration). :func:`dense_w0_sums`
  computes them in one pass.

Each kernel works one feature at a time in a fixed order: the fit of a feature does not
depend on the features that share its block.
"""

from __future__ import annotations

import functools

import numpy as np

from flashmm_dask.numerics.compiled import _compile, _gauss_jordan


@_compile
def _symmetrize_upper(a: np.ndarray) -> None:
    """Copy the upper triangle of the square ``a`` onto its lower triangle, in place."""
    q = a.shape[0]
    for r in range(q):
        for c in range(r + 1, q):
            a[c, r] = a[r, c]


def symmetrize_upper(a: np.ndarray) -> None:
    """The upper triangle of a (LAPACK's dpotri output) mirrored onto the lower, in place."""
    _symmetrize_upper(a)


@_compile
def _dense_w0_sums(
    Si: np.ndarray,
    X: np.ndarray,
    US: np.ndarray,
    ds: np.ndarray,
    cs: np.ndarray,
    K: int,
    division: bool,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """The O(q_s^2) sums of :meth:`.structured.Factor.w0_blocks` (dense S) of one feature.

    Si = S^-1, X = V S^-1 (V = N' Pb^-2 N), ds the ratios of the small columns, ``cs`` their
    components. US = U S^-1: with ``division`` it is (I - S^-1) / ds by rows and ``US`` is
    not read; else ``US`` holds the product.

    Returns tr((X Ds)^2), qb (K,) the sums over the columns of component k of
    sum_r Si[r, c] X[r, c], t (K,) the traces of the diagonal blocks of US and Q (K, K)
    the sums of squares of its blocks.
    """
    qs = Si.shape[0]
    t = np.zeros(K)
    Q = np.zeros((K, K))
    qb = np.zeros(K)
    colsq = np.zeros(qs)
    row = np.empty(qs)
    xdx = 0.0
    for r in range(qs):
        kr = cs[r]
        xr = 0.0
        for c in range(qs):
            xr += X[r, c] * ds[c] * X[c, r] * ds[r]
            colsq[c] += Si[r, c] * X[r, c]
        xdx += xr
        if division:
            inv = 1.0 / ds[r]
            for c in range(qs):
                row[c] = -Si[r, c] * inv
            row[r] = (1.0 - Si[r, r]) * inv
        else:
            for c in range(qs):
                row[c] = US[r, c]
        t[kr] += row[r]
        for c in range(qs):
            Q[kr, cs[c]] += row[c] * row[c]
    for c in range(qs):
        qb[cs[c]] += colsq[c]
    return xdx, qb, t, Q


def dense_w0_sums(
    Si: np.ndarray,
    X: np.ndarray,
    US: np.ndarray | None,
    ds: np.ndarray,
    cs: np.ndarray,
    K: int,
    division: bool,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """See :func:`_dense_w0_sums`; ``US`` may be None with ``division``."""
    us = Si if US is None else np.ascontiguousarray(US)
    return _dense_w0_sums(
        np.ascontiguousarray(Si),
        np.ascontiguousarray(X),
        us,
        np.ascontiguousarray(ds, dtype=np.float64),
        np.ascontiguousarray(cs, dtype=np.int64),
        int(K),
        bool(division),
    )


# --- K = 2, dense: the Schur complement in a basis that diagonalises both diagonal blocks ---


@functools.partial(_compile, reassoc=True)
def _cholesky_inverse(S: np.ndarray, L: np.ndarray) -> float:
    """S = S^-1 in place for a symmetric positive definite S; return log det S, or NaN (S
    untouched) where a pivot is not positive. By L L' = S, L^-1 and S^-1 = L^-T L^-1:
    about h^3 / 2 multiply-adds, half of Gauss-Jordan's. ``L`` (h, h) is scratch."""
    h = S.shape[0]
    logdet = 0.0
    for j in range(h):
        t = S[j, j]
        for k in range(j):
            t -= L[j, k] * L[j, k]
        if not t > 0.0:
            return np.nan
        d = np.sqrt(t)
        logdet += 2.0 * np.log(d)
        L[j, j] = d
        for i in range(j + 1, h):
            t = S[i, j]
            for k in range(j):
                t -= L[i, k] * L[j, k]
            L[i, j] = t / d
    # L := L^-1 (lower triangular), row by row
    for i in range(h):
        L[i, i] = 1.0 / L[i, i]
        for j in range(i):
            t = 0.0
            for k in range(j, i):
                t += L[i, k] * L[k, j]
            L[i, j] = -t * L[i, i]
        for j in range(i + 1, h):
            L[i, j] = 0.0
    # S^-1 = L^-T L^-1: entry (c, d) = sum over k >= max(c, d) of L^-1[k, c] L^-1[k, d]
    for c in range(h):
        for d in range(c, h):
            t = 0.0
            for k in range(d, h):
                t += L[k, c] * L[k, d]
            S[c, d] = t
            S[d, c] = t
    return logdet


@functools.partial(_compile, reassoc=True)
def _schur_inverse_into(
    l1: np.ndarray,
    l2: np.ndarray,
    C: np.ndarray,
    Ct: np.ndarray,
    a: float,
    b: float,
    M: np.ndarray,
    F: np.ndarray,
    Ft: np.ndarray,
    E: np.ndarray,
    S: np.ndarray,
    L: np.ndarray,
    w: np.ndarray,
    buf: np.ndarray,
    perm: np.ndarray,
) -> float:
    """M = (D L + I)^-1 for L = [[diag(l1), C], [C', diag(l2)]], D = diag(a, .., b, ..);
    return log |det(D L + I)|, or NaN where a pivot is zero or the result not finite.

    With P11 = I + a diag(l1) (diagonal, w its inverse) and F = w C, the Schur complement
    is S = I + b (diag(l2) - a C' F) (symmetric) and

        M = [[w + a b E F', -a E], [-b E', S^-1]],   E = F S^-1.

    ``Ct`` = C'. ``F``, ``E`` (h1, h2), ``Ft`` (h2, h1), ``S``, ``L`` (h2, h2), ``w`` (h1,),
    ``buf`` and ``perm`` (h2,) are scratch. With a, b >= 0, S = I + b H with H the Schur
    complement of diag(l1) + I / a in L + diag(I / a, 0) >= 0, so S >= I: it is inverted by
    Cholesky; otherwise (or where Cholesky fails) by Gauss-Jordan with pivoting.
    """
    h1 = l1.shape[0]
    h2 = l2.shape[0]
    logdet = 0.0
    for i in range(h1):
        x = 1.0 + a * l1[i]
        if x == 0.0:
            return np.nan
        w[i] = 1.0 / x
        logdet += np.log(abs(x))
        for c in range(h2):
            F[i, c] = w[i] * C[i, c]
    # S = I + b (diag(l2) - a C' w C) from dot products of contiguous rows of C' and (w C)'
    for c in range(h2):
        for i in range(h1):
            Ft[c, i] = F[i, c]
    for c in range(h2):
        for d in range(c, h2):
            t = 0.0
            for i in range(h1):
                t += Ct[c, i] * Ft[d, i]
            v = -b * a * t
            if c == d:
                v += 1.0 + b * l2[c]
            S[c, d] = v
            S[d, c] = v
    ld = np.nan
    if a >= 0.0 and b >= 0.0:  # then S >= I (see the docstring): Cholesky
        ld = _cholesky_inverse(S, L)
    if np.isnan(ld):
        ld = _gauss_jordan(S, buf, perm)
    if np.isnan(ld):
        return np.nan
    logdet += ld
    for i in range(h1):
        for d in range(h2):
            E[i, d] = 0.0
        for c in range(h2):
            f = F[i, c]
            for d in range(h2):
                E[i, d] += f * S[c, d]
    ab = a * b
    for i in range(h1):
        for k in range(i, h1):
            t = 0.0
            for d in range(h2):
                t += E[i, d] * F[k, d]
            M[i, k] = ab * t
            M[k, i] = ab * t
        M[i, i] += w[i]
        for d in range(h2):
            M[i, h1 + d] = -a * E[i, d]
            M[h1 + d, i] = -b * E[i, d]
    for c in range(h2):
        for d in range(h2):
            M[h1 + c, h1 + d] = S[c, d]
    # one vectorised sum: NaN or infinite if any entry is (or, harmlessly, if it overflows)
    total = 0.0
    for r in range(h1 + h2):
        for c in range(h1 + h2):
            total += M[r, c]
    if not np.isfinite(total):
        return np.nan
    return logdet


@functools.partial(_compile, reassoc=True)
def _score_k2_batch(
    rot: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    rot0: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    reml: bool,
    idx1: np.ndarray,
    idx2: np.ndarray,
    c1: int,
    s: np.ndarray,
    zry: np.ndarray,
    yry: np.ndarray,
    nrq: float,
    nr: float,
    final: bool,
    scale: float,
    division_min: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Score, information, profiled s0 and log |det M0| of a block of features, K = 2.

    The algebra of ``compiled._score_batch`` in the basis V = blockdiag(V1, V2) of the
    eigenvectors of the diagonal blocks of A (zrz): V commutes with D, so V' M V =
    (D V'AV + I)^-1, and traces and block sums of squares are the same in either basis.
    ``rot`` = (V1, V2, l1, l2, C) of A and ``rot0`` of A0 (ZZ for ML; the same for REML),
    ``idx1``/``idx2`` the columns of the components c1 (first, the larger) and 1 - c1,
    ``scale`` = max |A0| (the division rule of ``_score_batch``).
    """
    V1, V2, l1, l2, C = rot
    l01, l02, C0 = rot0[2], rot0[3], rot0[4]
    Ct = np.ascontiguousarray(C.T)
    C0t = np.ascontiguousarray(C0.T)
    m = zry.shape[0]
    h1 = l1.shape[0]
    h2 = l2.shape[0]
    q = h1 + h2
    K = 2
    c2 = 1 - c1
    dl = np.empty((m, K + 1))
    F = np.empty((m, K + 1, K + 1))
    s0p = np.empty(m)
    logdet = np.full(m, np.nan)
    ok = np.ones(m, dtype=np.bool_)
    M = np.empty((q, q))
    M0 = np.empty((q, q)) if not reml else M
    Fw = np.empty((h1, h2))
    Ftw = np.empty((h2, h1))
    M0t = np.empty((q, q))
    Ew = np.empty((h1, h2))
    Sw = np.empty((h2, h2))
    Lw = np.empty((h2, h2))
    wv = np.empty(h1)
    buf = np.empty(h2)
    perm = np.empty(h2, dtype=np.int64)
    z = np.empty(q)
    D = np.empty(q)
    u = np.empty(q)
    mdz = np.empty(q)
    W = np.empty(q)
    comp = np.empty(q, dtype=np.int64)
    for r in range(q):
        comp[r] = c1 if r < h1 else c2
    trW = np.empty(K)
    dl_u = np.empty(K)
    trw = np.empty(K)
    blocks = np.empty((K, K))
    for j in range(m):
        s0 = s[j, K]
        a = s[j, c1] / s0
        b = s[j, c2] / s0
        division = abs(a) * scale >= division_min and abs(b) * scale >= division_min
        for r in range(q):
            D[r] = a if r < h1 else b
        # z = V' zry
        for r in range(h1):
            t = 0.0
            for c in range(h1):
                t += V1[c, r] * zry[j, idx1[c]]
            z[r] = t
        for r in range(h2):
            t = 0.0
            for c in range(h2):
                t += V2[c, r] * zry[j, idx2[c]]
            z[h1 + r] = t
        ld = _schur_inverse_into(l1, l2, C, Ct, a, b, M, Fw, Ftw, Ew, Sw, Lw, wv, buf, perm)
        if np.isnan(ld):
            ok[j] = False
            continue
        if not reml:
            ld = _schur_inverse_into(
                l01, l02, C0, C0t, a, b, M0, Fw, Ftw, Ew, Sw, Lw, wv, buf, perm
            )
            if np.isnan(ld):
                ok[j] = False
                continue
        if final:
            logdet[j] = -ld
        for r in range(q):
            u[r] = 0.0
        zMDz = 0.0
        yR2y = yry[j]
        for r in range(q):
            zr = z[r]
            t = 0.0
            for c in range(q):
                u[c] += zr * M[r, c]
                t += M[r, c] * D[c] * z[c]
            mdz[r] = t
            zMDz += zr * t
        for r in range(q):
            yR2y -= (u[r] + z[r]) * mdz[r]
        for i in range(K):
            trw[i] = 0.0
            dl_u[i] = 0.0
            trW[i] = 0.0
            for k in range(K):
                blocks[i, k] = 0.0
        trM0 = 0.0
        trM0M0 = 0.0
        for r in range(q):
            for c in range(q):
                M0t[r, c] = M0[c, r]
        for r in range(q):
            cr = comp[r]
            if division:
                inv = 1.0 / D[r]
                for c in range(q):
                    W[c] = -M0[r, c] * inv
                W[r] = (1.0 - M0[r, r]) * inv
            elif r < h1:  # W = L0 M0 by rows, L0 = [[diag(l01), C0], [C0', diag(l02)]]
                for c in range(q):
                    W[c] = l01[r] * M0[r, c]
                for e in range(h2):
                    f = C0[r, e]
                    for c in range(q):
                        W[c] += f * M0[h1 + e, c]
            else:
                for c in range(q):
                    W[c] = l02[r - h1] * M0[r, c]
                for e in range(h1):
                    f = C0[e, r - h1]
                    for c in range(q):
                        W[c] += f * M0[e, c]
            trW[cr] += W[r]
            dl_u[cr] += u[r] * u[r]
            trM0 += M0[r, r]
            tw = 0.0
            tm = 0.0
            s1 = 0.0
            s2 = 0.0
            for c in range(q):
                tw += W[c] * M0t[r, c]
                tm += M0[r, c] * M0t[r, c]
            for c in range(h1):
                s1 += W[c] * W[c]
            for c in range(h1, q):
                s2 += W[c] * W[c]
            trw[cr] += tw
            trM0M0 += tm
            blocks[cr, c1] += s1
            blocks[cr, c2] += s2
        # the same score and information as compiled._score_batch's last lines (duplicates
        # lists the pair): one shared numba helper for both measured 3-15% slower for K = 2
        # (the fixed K lets LLVM compile these loops better), so each kernel keeps its own
        s02 = s0 * s0
        for i in range(K):
            dl[j, i] = (dl_u[i] / s02 - trW[i] / s0) / 2.0
            for k in range(i + 1):
                F[j, i, k] = F[j, k, i] = blocks[k, i] / s02 / 2.0
            F[j, i, K] = F[j, K, i] = trw[i] / s02 / 2.0
        F[j, K, K] = (nrq + trM0M0) / s02 / 2.0
        dl[j, K] = (yR2y / s02 - (nrq + trM0) / s0) / 2.0
        s0p[j] = (yry[j] - zMDz) / nr
    return dl, F, s0p, logdet, ok


def rotation(
    A: np.ndarray, idx1: np.ndarray, idx2: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(V1, V2, l1, l2, C): eigenvectors and values of the diagonal blocks A[idx_k, idx_k]
    and C = V1' A[idx1, idx2] V2."""
    l1, V1 = np.linalg.eigh(A[np.ix_(idx1, idx1)])
    l2, V2 = np.linalg.eigh(A[np.ix_(idx2, idx2)])
    C = V1.T @ A[np.ix_(idx1, idx2)] @ V2
    return (
        np.ascontiguousarray(V1),
        np.ascontiguousarray(V2),
        np.ascontiguousarray(l1),
        np.ascontiguousarray(l2),
        np.ascontiguousarray(C),
    )


class K2Terms:
    """What the K = 2 kernel needs of a design, computed once (:func:`k2_terms`)."""

    def __init__(self, A: np.ndarray, A0: np.ndarray, reml: bool, d: np.ndarray):
        edges = np.concatenate([[0], np.cumsum(d)])
        self.c1 = 0 if d[0] >= d[1] else 1
        self.idx1 = np.arange(edges[self.c1], edges[self.c1 + 1], dtype=np.int64)
        self.idx2 = np.arange(edges[1 - self.c1], edges[2 - self.c1], dtype=np.int64)
        self.rot = rotation(A, self.idx1, self.idx2)
        self.rot0 = self.rot if reml else rotation(A0, self.idx1, self.idx2)
        self.reml = reml
        self.scale = float(np.max(np.abs(A0)))


def score_k2_batch(
    terms: K2Terms,
    s: np.ndarray,
    zry: np.ndarray,
    yry: np.ndarray,
    n: float,
    r: int,
    final: bool,
    division_min: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """dl, F, s0_profiled, logdetM0 and ok of a block of features (K = 2); see
    :func:`_score_k2_batch`."""
    q = terms.idx1.size + terms.idx2.size
    return _score_k2_batch(
        terms.rot,
        terms.rot0,
        terms.reml,
        terms.idx1,
        terms.idx2,
        terms.c1,
        np.ascontiguousarray(s),
        np.ascontiguousarray(zry),
        np.ascontiguousarray(yry),
        float(n - r - q),
        float(n - r),
        bool(final),
        terms.scale,
        float(division_min),
    )
