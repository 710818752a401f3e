"""Batched linear-algebra kernels shared by the fitter (leading axis = features).

The R package uses ``solve`` where it can and ``MASS::ginv`` (a Moore-Penrose
pseudo-inverse with relative tolerance ``sqrt(.Machine$double.eps)``) where a matrix is
singular. These kernels do the same on stacks of matrices.
"""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
import scipy.linalg

from flashmm_dask.numerics.compiled import inv_shifted_batch
from flashmm_dask.numerics.compiled_dense import inverse_checked_batch

#: Arrays of float64 throughout the numerics (shapes are given in the docstrings).
Array: TypeAlias = np.ndarray

#: Threshold on 1 - R^2 below which a column of X counts as aliased (aliased_columns).
ALIAS_RTOL = 1e-9

#: Relative singular-value cut-off of MASS::ginv.
GINV_TOL = float(np.sqrt(np.finfo(np.float64).eps))

#: Condition bound below which a symmetric matrix's pseudo-inverse is taken as its inverse
#: (:func:`pinv_sym` and the compiled kernels' checked inverses): ginv drops no singular
#: value of a matrix whose condition is below 1 / GINV_TOL, and the bound, computed from the
#: inverse itself, is off by about cond * eps (~1e-8) relatively, far within the 10% kept.
GINV_LIMIT = 0.9 / GINV_TOL


def pinv_sym(A: Array) -> Array:
    """Moore-Penrose pseudo-inverse of a stack of symmetric matrices.

    For a symmetric matrix the singular values are the absolute eigenvalues, so an
    eigendecomposition gives exactly ``MASS::ginv``'s answer. Most matrices are well
    conditioned, and for them the pseudo-inverse is the inverse: an inverse is taken first
    (2 x 2 in closed form, larger by compiled Gauss-Jordan elimination), and only matrices
    whose condition number may exceed ``GINV_LIMIT`` (bounded from the norms of the matrix
    and its inverse: :func:`.compiled_dense._inverse_checked_into`; a 2 x 2 matrix keeps
    the stricter bound of :func:`_inverse_2x2`, for its closed form) are decomposed.

    Parameters
    ----------
    A : (..., k, k) array
        Symmetric matrices (symmetrised here against rounding). Matrices containing NaN
        give NaN.

    Returns
    -------
    (..., k, k) array
    """
    A = np.asarray(A, dtype=np.float64)
    shape, k = A.shape, A.shape[-1]
    A = A.reshape(-1, k, k)
    if k == 2:  # the K = 1 information matrices, once per iteration
        A = 0.5 * (A + np.swapaxes(A, -1, -2))
        out, ok = _inverse_2x2(A)
    else:  # symmetrised, inverted and its condition bounded in one compiled pass
        out, ok = inverse_checked_batch(A, GINV_LIMIT)
    if not ok.all():
        if k != 2:  # the compiled kernel symmetrised its own copies
            A = 0.5 * (A + np.swapaxes(A, -1, -2))
        todo = ~ok & np.isfinite(A).all(axis=(-2, -1))
        out[~ok] = np.nan
        if todo.any():
            evals, evecs = np.linalg.eigh(A[todo])
            absval = np.abs(evals)
            cutoff = GINV_TOL * absval.max(axis=-1, keepdims=True)
            with np.errstate(divide="ignore"):
                inv_vals = np.where((absval > cutoff) & (absval > 0), 1.0 / evals, 0.0)
            out[todo] = (evecs * inv_vals[..., None, :]) @ np.swapaxes(evecs, -1, -2)
    return out.reshape(shape)


def pinv_scaled(A: Array) -> Array:
    """:func:`pinv_sym` of the matrices scaled to unit diagonal, scaled back:
    S^-1 pinv(S^-1 A S^-1) S^-1 with S = diag(sqrt|A_ii|) (1 where A_ii is 0 or not finite).

    The inverse where A is invertible (the same up to rounding); where A's entries span
    many orders of magnitude (the information of a slope's variance against an
    intercept's, say 1e7 against 1e-4), a pseudo-inverse of A itself counts its small
    directions as null and drops them, one of A scaled to unit diagonal keeps them.
    """
    A = np.asarray(A, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        s = np.sqrt(np.abs(np.diagonal(A, axis1=-2, axis2=-1)))
    s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
    outer = s[..., :, None] * s[..., None, :]
    return pinv_sym(A / outer) / outer


def pinv_free(A: Array, free: np.ndarray) -> Array:
    """:func:`pinv_scaled` of the matrices ``A`` (m, k, k) restricted to their ``free``
    rows and columns ((m, k) bool), zero in the others (a variance held at zero is not a
    parameter there)."""
    both = free[:, :, None] & free[:, None, :]
    eye = np.eye(A.shape[-1]) * ~free[:, None, :]
    return np.where(both, pinv_scaled(np.where(both, A, 0.0) + eye), 0.0)


def _inverse_2x2(A: Array) -> tuple[Array, np.ndarray]:
    """Closed-form inverses of symmetric 2 x 2 matrices (m, 2, 2), and which of them are
    provably well conditioned (2 * ||A||_1 * ||A^-1||_1 < 0.5 / GINV_TOL)."""
    a, b, c = A[:, 0, 0], A[:, 0, 1], A[:, 1, 1]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.stack([c, -b, -b, a], axis=-1).reshape(-1, 2, 2) / (a * c - b * b)[:, None, None]
        norm_a = np.abs(A).sum(axis=-1).max(axis=-1)
        norm_i = np.abs(inv).sum(axis=-1).max(axis=-1)
        ok = np.isfinite(norm_i) & (2 * norm_a * norm_i < 0.5 / GINV_TOL)
    return inv, ok


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
    for k in np.flatnonzero(bad):
        out[k] = np.linalg.pinv(A[k], rcond=GINV_TOL)
    return out


def inv_shifted(A: Array, D: Array) -> Array:
    """(diag(D_j) A + I)^-1 for a shared symmetric PSD A and a stack of diagonals D.

    Compiled Gauss-Jordan inverses (:func:`~flashmm_dask.numerics.compiled.inv_shifted_batch`;
    with every D > 0 through the symmetric R (R A R + I)^-1 R^-1, R = diag(sqrt D)). Rows
    with a singular matrix, or a result that is not finite, take :func:`inv_or_pinv` (the
    pseudo-inverse where singular).

    Parameters
    ----------
    A : (q, q) symmetric positive semi-definite
    D : (m, q)

    Returns
    -------
    (m, q, q) array
    """
    out, ok = inv_shifted_batch(A, D)
    if not ok.all():
        rest = ~ok
        out[rest] = inv_or_pinv(D[rest][:, :, None] * A + np.eye(A.shape[0]))
    return out


def reciprocal(x: Array) -> Array:
    """Elementwise 1/x with 0 where x == 0 (the pseudo-inverse of a diagonal matrix)."""
    with np.errstate(divide="ignore"):
        return np.where(x != 0, 1.0 / np.where(x != 0, x, 1.0), 0.0)


def trace(A: Array) -> Array:
    """Traces of a stack of square matrices: (..., k, k) -> (...)."""
    return np.trace(A, axis1=-2, axis2=-1)


def aliased_columns(XX: np.ndarray, rtol: float = ALIAS_RTOL) -> np.ndarray:
    """Columns of X that are linear combinations of earlier columns, from X'X alone.

    Column j is aliased when its squared distance to the span of the earlier non-aliased
    columns, relative to its squared norm (1 - R^2 of that regression), is at most ``rtol``;
    a zero column is aliased. This is R's ``lm`` convention: the earliest columns are kept.

    Parameters
    ----------
    XX : ndarray, shape (p, p)
        X'X, symmetric positive semi-definite.
    rtol : float
        Threshold on 1 - R^2.

    Returns
    -------
    ndarray of int64, shape (n_aliased,)
        Indices of the aliased columns, increasing.
    """
    XX = np.asarray(XX, dtype=np.float64)
    norms = np.sqrt(np.clip(np.diag(XX), 0.0, None))
    scale = np.where(norms > 0, norms, 1.0)
    S = XX / np.outer(scale, scale)
    kept: list[int] = []
    aliased: list[int] = []
    L = np.zeros((0, 0))
    for j in range(XX.shape[0]):
        if norms[j] == 0:
            aliased.append(j)
            continue
        w = scipy.linalg.solve_triangular(L, S[kept, j], lower=True) if kept else np.zeros(0)
        resid = S[j, j] - w @ w
        if resid <= rtol:
            aliased.append(j)
            continue
        k = len(kept)
        L_new = np.zeros((k + 1, k + 1))
        L_new[:k, :k] = L
        L_new[k, :k] = w
        L_new[k, k] = np.sqrt(resid)
        L = L_new
        kept.append(j)
    return np.asarray(aliased, dtype=np.int64)
