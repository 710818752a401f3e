"""Compiled per-feature sums of the structured path with a dense Schur complement.

:class:`.structured.Factor` with crossed factors (InstEval's ``(1|s) + (1|d)``) works on a
dense q_s x q_s Schur complement S. Its BLAS calls (Cholesky, inverse, one product) are the
essential cost; the traces and block sums of squares of W0 that follow are O(q_s^2) each,
and in NumPy they took as long as the BLAS calls (a dozen temporaries of q_s^2 values per
feature and iteration). These kernels compute them in one or two passes, in a fixed order
(the fit of a feature does not depend on its block).
"""

from __future__ import annotations

import numpy as np

from flashmm_dask.numerics.compiled import _compile


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
