"""Compiled per-feature kernels of K = 2 on the dense path (:func:`score_k2_batch`,
bench_fit's subject + subject x slope case, q = 25 + 25).

``compiled._score_batch`` inverts the q x q matrix D A + I by Gauss-Jordan (q^3). D is
constant on each component, so it commutes with V = blockdiag(V1, V2), the eigenvectors of
the diagonal blocks of A; in that basis the first block of D A + I is diagonal and the
Schur complement over it leaves one h2 x h2 symmetric system. Traces and block sums of
squares are the same in both bases, and each is a sum over the entries of the Schur parts
(E = F S^-1, E F', S^-1): neither M nor W (q x q) is formed, about 1.5 h1 h2^2 + h2^3 +
h1^2 h2 / 2 multiply-adds per evaluation instead of q^3 (3.2x fewer at h1 = h2) and the
O(q^2) passes over M. :func:`fit_k2_batch` runs the whole Fisher scoring loop of a feature
in the kernel (z rotated once, the evaluation that profiles s0 without the traces, an
ill-conditioned information pseudo-inverted there by pinv_sym's rule).

At h = 25 the evaluation is bound by loads and stores, not multiply-adds: the products
and the inverse share each row they load between two or four rows of their result
(:mod:`.compiled_dense`), the first step of a fit (both ratios zero: S = I) takes no
product or inverse, the logarithms of log |det M0| are taken at the final evaluation
only, F = diag(w) C is never stored; I + b T, positive definite where both ratios are >=
0, is inverted without the search for pivots where its pivots are positive, in one
elimination of [I + b T | F'] that leaves E' beside it (:func:`_schur_parts`). Slower at
this size, measured: the sweep of the upper triangle, Cholesky with triangular solves
(11.8 against 5.0 us for Si, E and Y), F' weighted as C' is loaded; eight or sixteen
features per SIMD vector are not vectorised (numba leaves LLVM's SLP vectoriser off).

Each kernel works one feature at a time in a fixed order: the fit of a feature does not
depend on the features that share its block.

The kernels here call :mod:`.compiled_dense`'s (the products, the inverses): numba's disk
cache of a kernel is invalidated by changes to its own file only, so a change there is
noted here too (last: [I + b T | F'] eliminated by :mod:`.compiled_spd`, four pivots a
sweep). The kernels of :mod:`.compiled_spd` are called from here too.
"""

from __future__ import annotations

import functools

import numpy as np

from flashmm_dask.numerics.compiled import _compile
from flashmm_dask.numerics.compiled_dense import (
    _dots_into,
    _gauss_jordan_pairs,
    _inverse_checked_into,
    _pinv_into,
)
from flashmm_dask.numerics.compiled_spd import _gauss_jordan_spd
from flashmm_dask.numerics.linalg import GINV_TOL

# --- K = 2, dense: the Schur complement in a basis that diagonalises both diagonal blocks ---


@functools.partial(_compile, reassoc=True)
def _matvec_into(A: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out = A[:, :k] x (k = x.size), one dot product of a contiguous row of A an entry
    (A may have more columns: the inverse part of the augmented elimination)."""
    for i in range(out.shape[0]):
        t = 0.0
        for c in range(x.shape[0]):
            t += A[i, c] * x[c]
        out[i] = t


@functools.partial(_compile, inline=True)
def _one_plus(b: float, t: float, diagonal: bool) -> float:
    """An entry of I + b T: b t, plus 1 on the diagonal."""
    s = b * t
    if diagonal:
        s += 1.0
    return s


@functools.partial(_compile, reassoc=True, inline=True)
def _schur_parts(
    l1: np.ndarray,
    l2: np.ndarray,
    C: np.ndarray,
    Ct: np.ndarray,
    a: float,
    b: float,
    w: np.ndarray,
    Ft: np.ndarray,
    T: np.ndarray,
    Si: np.ndarray,
    buf: np.ndarray,
    buf2: np.ndarray,
    perm: np.ndarray,
    with_log: bool,
    aug: bool,
    Sa: np.ndarray,
    R4: np.ndarray,
    c4: np.ndarray,
    E: np.ndarray,
) -> tuple[float, bool]:
    """The Schur complement of D L + I over its first block, L = [[diag(l1), C], [C',
    diag(l2)]], D = diag(a, .., b, ..); return log |det(D L + I)| (0.0 without
    ``with_log``: the logarithms are taken for the final evaluation only), or NaN where a
    pivot is zero (the caller checks that its sums are finite), and whether E = F Si is
    filled (below).

    Fills w = 1 / (1 + a l1), Ft = F' (F = diag(w) C is not formed), T = diag(l2) - a C'
    F and Si = (I + b T)^-1 (h2, h2, both symmetric). Then (:func:`_score_k2_batch`)

        (D L + I)^-1 = [[diag(w) + ab E F', -a E], [-b E', Si]],   E = F Si.

    ``Ct`` = C'; ``buf``, ``buf2``, ``perm`` (h2,) are scratch.
    I + b T is inverted by Gauss-Jordan, two pivots per sweep (:func:`_gauss_jordan_pairs`),
    then symmetrised: first without the search for pivots, exact for a positive definite
    I + b T (a, b >= 0), stopping at a pivot <= 0 otherwise; then (I + b T formed again
    from T) with partial pivoting. Where that would interchange no rows (every feature of
    bench_fit's K = 2 case) the bits are the same; the search was ~20% of the inverse.

    With ``aug`` (the traces need E) the elimination without pivots runs on Sa = [I + b T
    | F' | 0] (h2, h2 + h1 rounded up to a multiple of 8: no scalar tail in the row loops;
    ``R4`` (4, that), ``c4`` (5, 4) scratch; :func:`.compiled_spd._gauss_jordan_spd`, four
    pivots a sweep, the bits of :func:`_gauss_jordan_pairs`): it leaves (I + b T)^-1 in
    Sa[:, :h2] (not symmetrised; Si is not filled) and Si F' = E' right of it, from which
    E (h1, h2) is filled (rows of 50 share the elimination's loop overhead: F Si is not
    formed). The second value returned says whether this happened.
    """
    h1 = l1.shape[0]
    h2 = l2.shape[0]
    logdet = 0.0
    for i in range(h1):
        x = 1.0 + a * l1[i]
        if x == 0.0:
            return np.nan, False
        w[i] = 1.0 / x
        if with_log:
            logdet += np.log(abs(x))
    for c in range(h2):  # F' from the rows of C' (the same products, read contiguously)
        for i in range(h1):
            Ft[c, i] = w[i] * Ct[c, i]
    if a == 0.0 and b == 0.0:  # every fit's first step: T = diag(l2), Si = I exactly
        for c in range(h2):
            for d in range(h2):
                T[c, d] = 0.0
                Si[c, d] = 0.0
            T[c, c] = l2[c]
            Si[c, c] = 1.0
        return logdet, False
    # T from dot products of contiguous rows of C' and F'
    _dots_into(Ct, Ft, T, True)
    for c in range(h2):
        for d in range(c, h2):
            v = -a * T[c, d]
            if c == d:
                v += l2[c]
            T[c, d] = v
            T[d, c] = v
            if aug:
                t = _one_plus(b, v, c == d)
                Sa[c, d] = t
                Sa[d, c] = t
    # I + b T is symmetric: positive definite (a, b >= 0: the Schur complement of a
    # positive definite matrix) it is inverted without the search for pivots; otherwise,
    # or where a pivot is not positive, formed again and inverted with the search
    if aug:
        for c in range(h2):
            for i in range(h1):
                Sa[c, h2 + i] = Ft[c, i]
            for j in range(h2 + h1, Sa.shape[1]):
                Sa[c, j] = 0.0
        ld = _gauss_jordan_spd(Sa, R4, c4, with_log)
        if not np.isnan(ld):
            for i in range(h1):
                for c in range(h2):
                    E[i, c] = Sa[c, h2 + i]
            return logdet + ld, True
    for c in range(h2):
        for d in range(h2):
            Si[c, d] = _one_plus(b, T[c, d], c == d)
    # (where the augmented elimination stopped at a pivot this one would too)
    ld = np.nan if aug else _gauss_jordan_pairs(Si, buf, buf2, perm, with_log, False)
    if np.isnan(ld):
        if not aug:
            for c in range(h2):
                for d in range(h2):
                    Si[c, d] = _one_plus(b, T[c, d], c == d)
        ld = _gauss_jordan_pairs(Si, buf, buf2, perm, with_log, True)
    if np.isnan(ld):
        return np.nan, False
    for c in range(h2):  # symmetric up to rounding: make it so
        for d in range(c + 1, h2):
            v = 0.5 * (Si[c, d] + Si[d, c])
            Si[c, d] = v
            Si[d, c] = v
    return logdet + ld, False


@_compile
def _k2_work(h1: int, h2: int, reml: bool) -> tuple:
    """The scratch arrays of :func:`_score_k2_one` (M0's are M's with REML)."""
    w, Ftw = np.empty(h1), np.empty((h2, h1))
    T, Si = np.empty((h2, h2)), np.empty((h2, h2))
    w0 = np.empty(h1) if not reml else w
    F0t = np.empty((h2, h1)) if not reml else Ftw
    T0 = np.empty((h2, h2)) if not reml else T
    Si0 = np.empty((h2, h2)) if not reml else Si
    E, P = np.empty((h1, h2)), np.empty((h2, h2))
    buf, r2, u1, u2 = np.empty(h2), np.empty(h2), np.empty(h1), np.empty(h2)
    z1, z2, perm = np.empty(h1), np.empty(h2), np.empty(h2, dtype=np.int64)
    Y = np.empty((h1, h1))
    nc = -(-(h2 + h1) // 8) * 8
    Sa, R4, c4 = np.empty((h2, nc)), np.empty((4, nc)), np.empty((5, 4))
    return w, Ftw, T, Si, w0, F0t, T0, Si0, E, P, buf, r2, u1, u2, z1, z2, perm, Y, Sa, R4, c4


@_compile
def _rotate(k2: tuple, zry: np.ndarray, z1: np.ndarray, z2: np.ndarray) -> None:
    """z1 = V1' zry[idx1], z2 = V2' zry[idx2] of one feature (``k2``: K2Terms.packed)."""
    V1, V2, idx1, idx2 = k2[0][0], k2[0][1], k2[5], k2[6]
    for r in range(z1.shape[0]):
        t = 0.0
        for c in range(z1.shape[0]):
            t += V1[c, r] * zry[idx1[c]]
        z1[r] = t
    for r in range(z2.shape[0]):
        t = 0.0
        for c in range(z2.shape[0]):
            t += V2[c, r] * zry[idx2[c]]
        z2[r] = t


@functools.partial(_compile, reassoc=True, inline=True)
def _score_k2_one(
    design: tuple,
    work: tuple,
    sj: np.ndarray,
    yry: float,
    final: bool,
    traces: bool,
    dl: np.ndarray,
    F: np.ndarray,
) -> tuple[bool, float, float]:
    """Score dl (K+1,) and information F (K+1, K+1) of one feature at theta ``sj`` (K+1,),
    K = 2, from its z = V' zry (z1, z2 in ``work``: :func:`_rotate`); returns (ok, the
    profiled s0, log |det M0| or NaN unless ``final``). Without ``traces`` only s0 (dl and
    F untouched). ok is False where a pivot is zero or a sum is not finite (the caller
    takes the NumPy algebra there). ``design`` = (rot, rot0, (C', C0'), reml, c1, n - r -
    q, n - r, scale, division_min), ``work`` :func:`_k2_work`'s scratch.

    The algebra of ``compiled._score_batch`` in the basis V = blockdiag(V1, V2) of the
    eigenvectors of the diagonal blocks of A (zrz): V commutes with D, so V' M V =
    (D V'AV + I)^-1, and traces and block sums of squares are the same in either basis.
    ``rot`` = (V1, V2, l1, l2, C) of A and ``rot0`` of A0 (ZZ for ML; the same for REML),
    ``idx1``/``idx2`` the columns of the components c1 (first, the larger) and 1 - c1,
    ``scale`` = max |A0|.

    M and W are never formed. With the parts of :func:`_schur_parts` (a, b the ratios of
    the components c1 and 1 - c1, Y = E F' symmetric), A0 M0 = M0' A0 gives

        W = A0 M0 = [[diag(l1 w) - b Y, E], [E', T Si]],   M0 D z = D u,

    u = M' z = (w z1 - b F u2, Si (z2 - a F' z1)); every trace and block sum of squares of
    W, W M0 and M0 is then one of a few sums over the entries of E, Y and Si: about
    2 h1 h2^2 + h1^2 h2 / 2 + h2^3 multiply-adds per evaluation, and no q x q pass. T Si =
    (I - Si) / b where |b| max|A0| >= ``division_min`` (the division loses about
    log10(1 / (|b| max|A0|)) digits), else the product.
    """
    rot, rot0, Cts, reml, c1, nrq, nr, scale, division_min = design
    l1, l2, C = rot[2], rot[3], rot[4]
    l01, l02, C0 = rot0[2], rot0[3], rot0[4]
    w, Ftw, T, Si, w0, F0t, T0, Si0, E, P, buf, r2, u1, u2, z1, z2, perm, Y = work[:18]
    Sa, R4, c4 = work[18], work[19], work[20]
    h1 = l1.shape[0]
    h2 = l2.shape[0]
    K = 2
    c2 = 1 - c1
    s0 = sj[K]
    a = sj[c1] / s0
    b = sj[c2] / s0
    logdet = np.nan
    aug = reml and traces  # E wanted from this elimination
    ld, e_done = _schur_parts(
        l1, l2, C, Cts[0], a, b, w, Ftw, T, Si, buf, r2, perm, final, aug, Sa, R4, c4, E
    )
    if np.isnan(ld):
        return False, np.nan, np.nan
    Sq = Sa if e_done else Si  # (I + b T)^-1 in its first h2 columns
    # the quadratic forms: u2 = Si (z2 - a F' z1), u1 = w z1 - b F u2 (F u2 = w C u2)
    _matvec_into(Ftw, z1, r2)
    for c in range(h2):
        r2[c] = z2[c] - a * r2[c]
    _matvec_into(Sq, r2, u2)
    _matvec_into(C, u2, u1)
    uu1 = 0.0
    zu1 = 0.0
    zMDz = 0.0
    for i in range(h1):
        v = w[i] * z1[i] - b * (w[i] * u1[i])
        uu1 += v * v
        zu1 += (v + z1[i]) * v
        zMDz += a * z1[i] * v
    uu2 = 0.0
    zu2 = 0.0
    for c in range(h2):
        t = u2[c]
        uu2 += t * t
        zu2 += (t + z2[c]) * t
        zMDz += b * z2[c] * t
    yR2y = yry - a * zu1 - b * zu2
    s0p = (yry - zMDz) / nr
    if not traces:
        return bool(np.isfinite(s0p)), s0p, logdet
    if not reml:
        ld, e_done = _schur_parts(
            l01, l02, C0, Cts[1], a, b, w0, F0t, T0, Si0, buf, r2, perm, final, True, Sa, R4, c4, E
        )
        if np.isnan(ld):
            return False, np.nan, np.nan
    S0q = Sa if e_done else Si0  # (I + b T0)^-1 in its first h2 columns
    if final:
        logdet = -ld
    # E = F0 Si0 by rows (F0 = diag(w0) C0), then the sums over E, Y = E F0' and Si0
    e2 = 0.0
    trY = 0.0
    wY = 0.0
    lwY = 0.0
    yy = 0.0
    sw = 0.0
    sw2 = 0.0
    slw = 0.0
    slw2 = 0.0
    slww = 0.0
    zero = a == 0.0 and b == 0.0  # Si0 = I (_schur_parts): E = F0, T0 Si0 = T0
    if zero:
        for i in range(h1):
            for d in range(h2):
                E[i, d] = w0[i] * C0[i, d]
    elif not e_done:
        _dots_into(C0, Si0, E, False)  # Si0 is symmetric: its rows are its columns
        for i in range(h1):
            for d in range(h2):
                E[i, d] *= w0[i]
    for i in range(h1):
        for d in range(h2):
            e2 += E[i, d] * E[i, d]
        wi = w0[i]
        lw = l01[i] * wi
        sw += wi
        sw2 += wi * wi
        slw += lw
        slw2 += lw * lw
        slww += lw * wi
    _dots_into(E, C0, Y, True)  # Y diag(1 / w0), Y = E F0' symmetric: its upper triangle
    for i in range(h1):
        t = Y[i, i] * w0[i]
        trY += t
        wY += w0[i] * t
        lwY += l01[i] * w0[i] * t
        yy += t * t
        for k in range(i + 1, h1):
            v = Y[i, k] * w0[k]
            yy += 2.0 * v * v
    trS = 0.0
    ss = 0.0
    for c in range(h2):
        trS += S0q[c, c]
        for d in range(h2):
            ss += S0q[c, d] * S0q[c, d]
    if abs(b) * scale >= division_min:  # T Si = (I - Si) / b
        tP = (h2 - trS) / b
        pp = (h2 - 2.0 * trS + ss) / (b * b)
        tPS = (trS - ss) / b
    else:
        tP = 0.0
        pp = 0.0
        tPS = 0.0
        if zero:
            for c in range(h2):
                for d in range(h2):
                    P[c, d] = T0[c, d]
        else:
            if e_done:  # Si0 from the augmented elimination, symmetrised
                for c in range(h2):
                    for d in range(c, h2):
                        v = 0.5 * (Sa[c, d] + Sa[d, c])
                        Si0[c, d] = v
                        Si0[d, c] = v
            _dots_into(T0, Si0, P, False)
        for c in range(h2):
            tP += P[c, c]
            for d in range(h2):
                pp += P[c, d] * P[c, d]
                tPS += P[c, d] * Si0[d, c]
    ab = a * b
    s02 = s0 * s0
    dl[c1] = (uu1 / s02 - (slw - b * trY) / s0) / 2.0
    dl[c2] = (uu2 / s02 - tP / s0) / 2.0
    F[c1, c1] = (slw2 - 2.0 * b * lwY + b * b * yy) / s02 / 2.0
    F[c1, c2] = F[c2, c1] = e2 / s02 / 2.0
    F[c2, c2] = pp / s02 / 2.0
    trw1 = slww + ab * lwY - b * wY - ab * b * yy - b * e2
    F[c1, K] = F[K, c1] = trw1 / s02 / 2.0
    F[c2, K] = F[K, c2] = (tPS - a * e2) / s02 / 2.0
    trM0 = sw + ab * trY + trS
    trM0M0 = sw2 + 2.0 * ab * wY + ab * ab * yy + 2.0 * ab * e2 + ss
    F[K, K] = (nrq + trM0M0) / s02 / 2.0
    dl[K] = (yR2y / s02 - (nrq + trM0) / s0) / 2.0
    total = dl[0] + dl[1] + dl[2] + s0p + trM0M0 + yy + pp + e2 + tPS
    return bool(np.isfinite(total)), s0p, logdet


@_compile
def _k2_design(k2: tuple, counts: tuple) -> tuple:
    """The ``design`` of :func:`_score_k2_one` from K2Terms.packed and counts = (n - r - q,
    n - r, division_min), and its scratch (:func:`_k2_work`)."""
    rot, rot0, Cts, reml, c1, scale = k2[0], k2[1], k2[2], k2[3], k2[4], k2[7]
    design = (rot, rot0, Cts, reml, c1, counts[0], counts[1], scale, counts[2])
    return design, _k2_work(rot[2].shape[0], rot[3].shape[0], reml)


@functools.partial(_compile, reassoc=True)
def _score_k2_batch(
    k2: tuple, counts: tuple, s: np.ndarray, zry: np.ndarray, yry: np.ndarray, final: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_score_k2_one` of each feature of a block: dl (m, 3), F (m, 3, 3), the
    profiled s0 (m,), log |det M0| (m,) and ok (m,)."""
    design, work = _k2_design(k2, counts)
    z1, z2 = work[14], work[15]
    m = zry.shape[0]
    dl = np.empty((m, 3))
    F = np.empty((m, 3, 3))
    s0p = np.empty(m)
    logdet = np.full(m, np.nan)
    ok = np.ones(m, dtype=np.bool_)
    for j in range(m):
        _rotate(k2, zry[j], z1, z2)
        ok[j], s0p[j], logdet[j] = _score_k2_one(
            design, work, s[j], yry[j], final, True, dl[j], F[j]
        )
    return dl, F, s0p, logdet, ok


@functools.partial(_compile, reassoc=True)
def _fit_k2_batch(
    k2: tuple, counts: tuple, zry: np.ndarray, yry: np.ndarray, s_init: np.ndarray, stop: tuple
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fisher scoring of K = 2 components for a block of features, one feature at a time.

    The loop of ``fisher._scoring`` (steps F^-1 dl until max |dl| <= epsilon or max_iter
    steps, then s0 profiled and the score and information evaluated there) with the scores
    of :func:`_score_k2_one`, z rotated once per feature and the profiling evaluation
    without the traces. An information matrix whose condition bound is not below
    ``limit`` is pseudo-inverted by its eigendecomposition (:func:`_pinv_into`, the rule of
    ``_scoring``'s pinv_sym; ~1% of bench_fit's K = 2 features, which a refit by
    ``_scoring``, one NumPy round per step, made 7% of the fit). Returns theta, se_theta,
    dlogL (m, 3), FIM_theta (m, 3, 3), niter (m,), logdetM0 (m,) and ok (m,): False where
    an evaluation failed or an information matrix is not finite: the caller refits those
    features by ``fisher._scoring``.
    """
    design, work = _k2_design(k2, counts)
    z1, z2 = work[14], work[15]
    max_iter, epsilon, limit = stop
    m = zry.shape[0]
    theta, se, dl = np.empty((m, 3)), np.empty((m, 3)), np.empty((m, 3))
    fim, logdet = np.empty((m, 3, 3)), np.empty(m)
    niter, ok = np.zeros(m, dtype=np.int64), np.ones(m, dtype=np.bool_)
    tol = GINV_TOL  # the pseudo-inverse's cut-off, where the bound is not below limit
    sj = np.empty(3)
    g = np.empty(3)
    Fj = np.empty((3, 3))
    inv = np.empty((3, 3))
    w3 = np.empty((3, 3))
    b3, b3b = np.empty(3), np.empty(3)
    p3 = np.empty(3, dtype=np.int64)
    for j in range(m):
        _rotate(k2, zry[j], z1, z2)
        for k in range(3):
            sj[k] = s_init[j, k]
        it = 0
        good = True
        while max_iter > 0:
            it += 1
            good, _, _ = _score_k2_one(design, work, sj, yry[j], False, True, g, Fj)
            if not good:
                break
            if not _inverse_checked_into(Fj, inv, w3, b3, p3, limit, b3b):
                # ill-conditioned: the pseudo-inverse, as fisher._scoring's pinv_sym
                if not _pinv_into(Fj, inv, tol):
                    good = False
                    break
            big = False
            for k in range(3):
                step = 0.0
                for c in range(3):
                    step += inv[k, c] * g[c]
                sj[k] += step
                big = big or abs(g[k]) > epsilon
            if not big or it >= max_iter:
                break
        niter[j] = it
        if good:
            good, s0, _ = _score_k2_one(design, work, sj, yry[j], False, False, g, Fj)
            sj[2] = s0
        ld = np.nan
        if good:
            good, _, ld = _score_k2_one(design, work, sj, yry[j], True, True, dl[j], fim[j])
        logdet[j] = ld
        if good and not _inverse_checked_into(fim[j], inv, w3, b3, p3, limit, b3b):
            good = _pinv_into(fim[j], inv, tol)
        if not good:
            ok[j] = False
            continue
        for k in range(3):
            theta[j, k] = sj[k]
            se[j, k] = np.sqrt(inv[k, k])
    return theta, se, dl, fim, niter, logdet, ok


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
        #: what the kernels take: (rot, rot0, (C', C0'), reml, c1, idx1, idx2, scale)
        Cts = (np.ascontiguousarray(self.rot[4].T), np.ascontiguousarray(self.rot0[4].T))
        self.packed = (self.rot, self.rot0, Cts, reml, self.c1, self.idx1, self.idx2, self.scale)


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
    counts = (float(n - r - q), float(n - r), float(division_min))
    zry, yry = np.ascontiguousarray(zry), np.ascontiguousarray(yry)
    return _score_k2_batch(terms.packed, counts, np.ascontiguousarray(s), zry, yry, bool(final))


def fit_k2_batch(
    terms: K2Terms,
    zry: np.ndarray,
    yry: np.ndarray,
    s_init: np.ndarray,
    n: float,
    r: int,
    max_iter: int,
    epsilon: float,
    division_min: float,
    limit: float,
) -> tuple[np.ndarray, ...]:
    """theta, se_theta, dlogL, FIM_theta, niter, logdetM0 and ok of a block of features
    (K = 2, from ``s_init`` (m, 3), left as it is); see :func:`_fit_k2_batch`."""
    q = terms.idx1.size + terms.idx2.size
    counts = (float(n - r - q), float(n - r), float(division_min))
    zry, yry = np.ascontiguousarray(zry), np.ascontiguousarray(yry)
    s_init = np.ascontiguousarray(s_init, dtype=np.float64)
    stop = (int(max_iter), float(epsilon), float(limit))
    return _fit_k2_batch(terms.packed, counts, zry, yry, s_init, stop)
