"""Compiled kernels of the structured path with a dense Schur complement (crossed factors).

Notation of :mod:`.structured`: ZZ = [[diag(zb), N], [N', Zs]] in the order [big, small],
Pb = diag(1 + db zb), w1 = db / pb, p2 = 1 / pb^2, S = I + Ds U with
U = Zs - N' diag(w1) N, Si = S^-1, and V = N' Pb^-2 N (q_s x q_s).

For crossed factors such as lme4's InstEval ``(1|s) + (1|d)`` (q_s = 377, q_b = 1,035, N
with one non-zero per observed pair of levels, 10,000 here) the work per feature and
evaluation is the Cholesky factor and inverse of S and the traces of W0 that follow. Two
of the products those traces need are taken through the sparse N, row by row, never as
dense q_s x q_s products:

- U, from the rows of N (each row a adds w1[a] n_a n_a' at its ``len(n_a)^2`` pairs of
  columns): no (q_b, q_s^2) table of pairs to store or to multiply;
- X = V Si = N' (Pb^-2 (N Si)): each row a of N gives y_a = n_a' Si (a combination of
  ``len(n_a)`` rows of Si), which is scattered back into the rows of X that n_a touches,
  2 nnz(N) q_s multiply-adds (15 M for InstEval) instead of the 2 q_s^3 (107 M) of the
  dense product V Si; the same y_a give diag(N Si Ds N')_a and the sums of squares of
  the columns of Pb^-1 N Si (W0's big x small block).

S^-1 is taken as LAPACK's dpotri does, (R^-1)(R^-1)' from the Cholesky factor R, but with
R^-1 by halves (:func:`_upper_inverse`): dtrtri took twice as long as the two triangular
products it reduces to.

Each kernel works on one feature, in a fixed order: a feature's result does not depend on
the features that share its block.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg.blas
import scipy.linalg.lapack
import scipy.sparse

from flashmm_dask.numerics.compiled import _compile, w_row_divided
from flashmm_dask.numerics.compiled_dense import symmetrize_upper
from flashmm_dask.numerics.linalg import Array

#: Order below which :func:`_upper_inverse` calls dtrtri.
_TRTRI_BASE = 64


def _upper_inverse(R: Array) -> None:
    """R^-1 of an upper triangular R in place (R may be a view): the inverses of the two
    diagonal halves, then the corner -A^-1 B C^-1 by two triangular products (dtrmm)."""
    n = R.shape[0]
    if n <= _TRTRI_BASE:
        R[:, :] = scipy.linalg.lapack.dtrtri(R, lower=0)[0]
        return
    h = n // 2
    _upper_inverse(R[:h, :h])
    _upper_inverse(R[h:, h:])
    corner = scipy.linalg.blas.dtrmm(-1.0, R[:h, :h], R[:h, h:], side=0, lower=0)
    R[:h, h:] = scipy.linalg.blas.dtrmm(1.0, R[h:, h:], corner, side=1, lower=0, overwrite_b=1)


def cholesky(S: Array) -> Array | None:
    """The upper Cholesky factor R (Fortran order) of a symmetric S, or None where S is
    not positive definite."""
    # S.T is the same matrix in LAPACK's (Fortran) order: copied, not transposed
    R, info = scipy.linalg.lapack.dpotrf(S.T, lower=0, clean=1)
    return R if info == 0 else None


def cholesky_solve(R: Array, x: Array) -> Array:
    """S^-1 x from the Cholesky factor R of S, for x (q_s,) or (q_s, k)."""
    out, info = scipy.linalg.lapack.dpotrs(R, x, lower=0)
    if info != 0:
        raise ValueError(f"dpotrs: illegal argument {-info}")
    return out


def cholesky_inverse(S: Array) -> tuple[Array, float] | None:
    """S^-1 (C order) and log det S of a symmetric S, or None where S is not positive
    definite."""
    R = cholesky(S)
    if R is None:
        return None
    logdet = 2.0 * float(np.sum(np.log(np.diagonal(R))))
    _upper_inverse(R)
    Si, info = scipy.linalg.lapack.dlauum(R, lower=0, overwrite_c=1)
    if info != 0 or not np.all(np.isfinite(np.diagonal(Si))):
        return None
    symmetrize_upper(Si)
    return Si.T, logdet  # C order, the same symmetric matrix


def _schur_py(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    w1: np.ndarray,
    Zs: np.ndarray,
    ds: np.ndarray,
    U: np.ndarray,
    S: np.ndarray,
) -> float:
    qs = Zs.shape[0]
    for r in range(qs):
        for c in range(qs):
            U[r, c] = 0.0
    # N' diag(w1) N summed first, then subtracted from Zs (one rounding against Zs's large
    # diagonal: the REML terms that nearly cancel kept within 1e-10 of the dense path)
    for a in range(indptr.size - 1):
        w = w1[a]
        for j in range(indptr[a], indptr[a + 1]):
            r, v = indices[j], data[j]
            for k in range(indptr[a], indptr[a + 1]):
                # (v v') w: the same product for (r, c) and (c, r), so U stays symmetric
                U[r, indices[k]] += (v * data[k]) * w
    umax = 0.0
    nan = False
    for r in range(qs):
        for c in range(qs):
            U[r, c] = Zs[r, c] - U[r, c]
            S[r, c] = ds[r] * U[r, c]
            u = abs(U[r, c])
            umax = max(umax, u)
            nan |= u != u
        S[r, r] += 1.0
    return np.nan if nan else umax


_schur = _compile(_schur_py)


def schur_into(
    N: scipy.sparse.csr_array, w1: Array, Zs: Array, ds: Array, U: Array, S: Array
) -> float:
    """U = Zs - N' diag(w1) N and S = I + diag(ds) U of one feature, into U and S; returns
    max |U| (NaN where U has a NaN).

    Parameters
    ----------
    N : (q_b, q_s) CSR
    w1 : (q_b,) db / pb
    Zs : (q_s, q_s)
    ds : (q_s,)
    U, S : (q_s, q_s) C-contiguous, written
    """
    return _schur(
        N.indptr, N.indices, N.data, np.ascontiguousarray(w1), Zs, np.ascontiguousarray(ds), U, S
    )


def _nsn_py(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    p2: np.ndarray,
    Si: np.ndarray,
    ds: np.ndarray,
    X: np.ndarray,
    diag: np.ndarray,
    colsq: np.ndarray,
    y: np.ndarray,
) -> None:
    """X = N' diag(p2) N Si, diag[a] = (N Si Ds N')[a, a] and colsq[c] = the squared norm
    of column c of Pb^-1 N Si, row by row of N.

    Four rows of Si are gathered and two rows of X updated per pass over the columns (one
    load and store of y and of each row of X per pass instead of per non-zero: 1.3 ->
    1.05 ms for InstEval)."""
    qs = Si.shape[0]
    for r in range(qs):
        colsq[r] = 0.0
        for c in range(qs):
            X[r, c] = 0.0
    for a in range(indptr.size - 1):
        j0, j1 = indptr[a], indptr[a + 1]
        for c in range(qs):
            y[c] = 0.0
        j = j0
        while j + 4 <= j1:
            r0, r1, r2, r3 = indices[j], indices[j + 1], indices[j + 2], indices[j + 3]
            v0, v1, v2, v3 = data[j], data[j + 1], data[j + 2], data[j + 3]
            for c in range(qs):
                y[c] += v0 * Si[r0, c] + v1 * Si[r1, c] + v2 * Si[r2, c] + v3 * Si[r3, c]
            j += 4
        while j < j1:
            r, v = indices[j], data[j]
            for c in range(qs):
                y[c] += v * Si[r, c]
            j += 1
        s = 0.0
        for j in range(j0, j1):
            r = indices[j]
            s += data[j] * ds[r] * y[r]
        diag[a] = s
        w = p2[a]
        for c in range(qs):
            colsq[c] += w * (y[c] * y[c])
        j = j0
        while j + 2 <= j1:  # two distinct rows of X (the columns of a row of N differ)
            r0, r1 = indices[j], indices[j + 1]
            f0, f1 = data[j] * w, data[j + 1] * w
            for c in range(qs):
                yc = y[c]
                X[r0, c] += f0 * yc
                X[r1, c] += f1 * yc
            j += 2
        while j < j1:
            r, f = indices[j], data[j] * w
            for c in range(qs):
                X[r, c] += f * y[c]
            j += 1


_nsn = _compile(_nsn_py, reassoc=True)


def _w0_sums_py(
    Si: np.ndarray,
    X: np.ndarray,
    US: np.ndarray,
    ds: np.ndarray,
    edges: np.ndarray,
    division: bool,
) -> tuple[float, np.ndarray, np.ndarray]:
    qs = Si.shape[0]
    ns = edges.size - 1
    xdx = 0.0
    for r in range(qs):
        xr = 0.0
        for c in range(qs):
            xr += X[r, c] * ds[c] * X[c, r]
        xdx += xr * ds[r]
    t = np.zeros(ns)
    Q = np.zeros((ns, ns))
    row = np.empty(qs)
    for k in range(ns):
        for r in range(edges[k], edges[k + 1]):
            if division:
                w_row_divided(Si, r, ds[r], row)
            else:
                for c in range(qs):
                    row[c] = US[r, c]
            t[k] += row[r]
            for l in range(ns):
                acc = 0.0
                for c in range(edges[l], edges[l + 1]):
                    acc += row[c] * row[c]
                Q[k, l] += acc
    return xdx, t, Q


_w0_sums = _compile(_w0_sums_py, reassoc=True)


def w0_sums(
    N: scipy.sparse.csr_array,
    p2: Array,
    Si: Array,
    US: Array | None,
    ds: Array,
    edges: np.ndarray,
    division: bool,
) -> tuple[Array, float, Array, Array, Array]:
    """The sums of :meth:`.structured.Factor.w0_blocks` (dense S) of one feature.

    Parameters
    ----------
    N : (q_b, q_s) CSR
    p2 : (q_b,) 1 / pb^2
    Si : (q_s, q_s) S^-1
    US : (q_s, q_s) U S^-1, or None with ``division`` (then (I - S^-1) / ds by rows)
    ds : (q_s,) the ratios of the small columns
    edges : (n_s + 1,) the small columns of each small component are
        ``edges[k]:edges[k + 1]`` (components in order)
    division : bool

    Returns
    -------
    diag : (q_b,) diag(N S^-1 Ds N')
    xdx : tr((X Ds)^2), X = V S^-1
    qb : (n_s,) sums of squares of the columns of each component in Pb^-1 N S^-1
        (= tr of that diagonal block of S^-T V S^-1: a sum of squares, no cancellation)
    t : (n_s,) traces of the diagonal blocks of U S^-1
    Q : (n_s, n_s) sums of squares of its blocks
    """
    qs = Si.shape[0]
    Si = np.ascontiguousarray(Si)
    ds = np.ascontiguousarray(ds, dtype=np.float64)
    X = np.empty((qs, qs))
    diag = np.empty(p2.shape[0])
    colsq = np.empty(qs)
    p2 = np.ascontiguousarray(p2)
    _nsn(N.indptr, N.indices, N.data, p2, Si, ds, X, diag, colsq, np.empty(qs))
    us = Si if US is None else np.ascontiguousarray(US)
    xdx, t, Q = _w0_sums(Si, X, us, ds, edges, bool(division))
    qb = np.add.reduceat(colsq, edges[:-1])
    return diag, xdx, qb, t, Q
