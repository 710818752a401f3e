"""Batched linear-algebra kernels shared by the fitter (leading axis = features).

The R package uses ``solve`` where it can and ``MASS::ginv`` (a Moore-Penrose
pseudo-inverse with relative tolerance ``sqrt(.Machine$double.eps)``) where a matrix is
singular. These kernels do the same on stacks of matrices.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]

#: Relative singular-value cut-off of MASS::ginv.
GINV_TOL = float(np.sqrt(np.finfo(np.float64).eps))


def pinv_sym(A: Array) -> Array:
    """Moore-Penrose pseudo-inverse of a stack of symmetric matrices.

    For a symmetric matrix the singular values are the absolute eigenvalues, so an
    eigendecomposition gives exactly ``MASS::ginv``'s answer at a fraction of an SVD's cost.

    Parameters
    ----------
    A : (..., k, k) array
        Symmetric matrices (symmetrised here against rounding). Stacks containing NaN
        give NaN.

    Returns
    -------
    (..., k, k) array
    """
    A = 0.5 * (A + np.swapaxes(A, -1, -2))
    out = np.full(A.shape, np.nan)
    ok = np.isfinite(A).all(axis=(-2, -1))
    if not ok.any():
        return out
    evals, evecs = np.linalg.eigh(A[ok])
    absval = np.abs(evals)
    cutoff = GINV_TOL * absval.max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where((absval > cutoff) & (absval > 0), 1.0 / evals, 0.0)
    out[ok] = (evecs * inv[..., None, :]) @ np.swapaxes(evecs, -1, -2)
    return out


def inv_or_pinv(A: Array) -> Array:
    """Inverse of a stack of square matrices; pseudo-inverse for the singular ones.

    Parameters
    ----------
    A : (m, k, k) array

    Returns
    -------
    (m, k, k) array
    """
    try:
        out = np.linalg.inv(A)
    except np.linalg.LinAlgError:
        out = np.empty_like(A)
        for i, a in enumerate(A):
            try:
                out[i] = np.linalg.inv(a)
            except np.linalg.LinAlgError:
                out[i] = np.linalg.pinv(a, rcond=GINV_TOL)
        return out
    bad = ~np.isfinite(out).all(axis=(-2, -1)) & np.isfinite(A).all(axis=(-2, -1))
    for i in np.flatnonzero(bad):
        out[i] = np.linalg.pinv(A[i], rcond=GINV_TOL)
    return out


def reciprocal(x: Array) -> Array:
    """Elementwise 1/x with 0 where x == 0 (the pseudo-inverse of a diagonal matrix)."""
    with np.errstate(divide="ignore"):
        return np.where(x != 0, 1.0 / np.where(x != 0, x, 1.0), 0.0)


def trace(A: Array) -> Array:
    """Traces of a stack of square matrices: (..., k, k) -> (...)."""
    return np.trace(A, axis1=-2, axis2=-1)
