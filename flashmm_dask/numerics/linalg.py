"""Batched linear-algebra kernels shared by the fitter (leading axis = features).

The R package uses ``solve`` where it can and ``MASS::ginv`` (a Moore-Penrose
pseudo-inverse with relative tolerance ``sqrt(.Machine$double.eps)``) where a matrix is
singular. These kernels do the same on stacks of matrices.
"""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
import scipy.linalg

#: Arrays of float64 throughout the numerics (shapes are given in the docstrings).
Array: TypeAlias = np.ndarray

#: Threshold on 1 - R^2 below which a column of X counts as aliased (aliased_columns).
ALIAS_RTOL = 1e-9

#: Relative singular-value cut-off of MASS::ginv.
GINV_TOL = float(np.sqrt(np.finfo(np.float64).eps))


def pinv_sym(A: Array) -> Array:
    """Moore-Penrose pseudo-inverse of a stack of symmetric matrices.

    For a symmetric matrix the singular values are the absolute eigenvalues, so an
    eigendecomposition gives exactly ``MASS::ginv``'s answer. Most matrices are well
    conditioned, and for them the pseudo-inverse is the inverse: an LU inverse is taken
    first, and only matrices whose condition number may exceed ``1 / GINV_TOL`` (bounded
    by k * cond_inf, which is >= cond_2) are decomposed.

    Parameters
    ----------
    A : (..., k, k) array
        Symmetric matrices (symmetrised here against rounding). Matrices containing NaN
        give NaN.

    Returns
    -------
    (..., k, k) array
    """
    A = 0.5 * (A + np.swapaxes(A, -1, -2))
    k = A.shape[-1]
    out = np.full(A.shape, np.nan)
    todo: np.ndarray = np.asarray(np.isfinite(A).all(axis=(-2, -1)))
    if todo.any():
        sub = A if todo.all() else A[todo]
        inv: Array | None
        if k == 2:  # closed form: the K = 1 information matrices, once per iteration
            a, b, c = sub[:, 0, 0], sub[:, 0, 1], sub[:, 1, 1]
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                inv = (
                    np.stack([c, -b, -b, a], axis=-1).reshape(-1, 2, 2)
                    / (a * c - b * b)[:, None, None]
                )
        else:
            try:
                inv = np.linalg.inv(sub)
            except np.linalg.LinAlgError:
                inv = None
        if inv is not None:
            norm_a = np.abs(sub).sum(axis=-1).max(axis=-1)
            norm_i = np.abs(inv).sum(axis=-1).max(axis=-1)
            with np.errstate(invalid="ignore", over="ignore"):
                safe = np.isfinite(norm_i) & (k * norm_a * norm_i < 0.5 / GINV_TOL)
            if safe.all() and todo.all():  # the usual case: no copies by fancy indexing
                return 0.5 * (inv + np.swapaxes(inv, -1, -2))
            idx = np.flatnonzero(todo)
            out[idx[safe]] = 0.5 * (inv[safe] + np.swapaxes(inv[safe], -1, -2))
            todo[idx[safe]] = False
    if todo.any():
        evals, evecs = np.linalg.eigh(A[todo])
        absval = np.abs(evals)
        cutoff = GINV_TOL * absval.max(axis=-1, keepdims=True)
        with np.errstate(divide="ignore"):
            inv_vals = np.where((absval > cutoff) & (absval > 0), 1.0 / evals, 0.0)
        out[todo] = (evecs * inv_vals[..., None, :]) @ np.swapaxes(evecs, -1, -2)
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
    for k in np.flatnonzero(bad):
        out[k] = np.linalg.pinv(A[k], rcond=GINV_TOL)
    return out


def inv_shifted(A: Array, D: Array) -> Array:
    """(diag(D_j) A + I)^-1 for a shared symmetric PSD A and a stack of diagonals D.

    With r = sqrt|D| and signs s = sign(D), diag(D) A + I = R S (R A R + S) R^-1
    (R = diag(r), S = diag(s)), so (diag(D) A + I)^-1 = R T^-1 S R^-1 with T = R A R + S
    symmetric: positive definite when every D > 0 (Cholesky, LAPACK potrf/potri), else
    indefinite (Bunch-Kaufman, sytrf/sytri). Both cost about half an LU inverse. Rows with
    a zero D, or whose factorisation fails, take :func:`inv_or_pinv`.

    Parameters
    ----------
    A : (q, q) symmetric positive semi-definite
    D : (m, q)

    Returns
    -------
    (m, q, q) array
    """
    from scipy.linalg.lapack import dpotrf, dpotri, dsytrf, dsytri

    m, q = D.shape
    out = np.empty((m, q, q))
    done = np.zeros(m, dtype=bool)
    upper = np.triu(np.ones((q, q), dtype=bool))
    eye = np.eye(q)
    positive = np.all(D > 0, axis=1)
    for k in np.flatnonzero(np.all(D != 0, axis=1)):
        r = np.sqrt(np.abs(D[k]))
        RAR = r[:, None] * A * r[None, :]
        if positive[k]:
            chol, info = dpotrf(RAR + eye, lower=0)
            if info == 0:
                inv, info = dpotri(chol, lower=0)
        else:
            sign = np.sign(D[k])
            ldu, piv, info = dsytrf(RAR + np.diag(sign), lower=0)
            if info == 0:
                inv, info = dsytri(ldu, piv, lower=0)
                inv = inv * sign[None, :]  # T^-1 S (symmetric part first, below)
        if info != 0:
            continue
        if positive[k]:
            inv = np.where(upper, inv, inv.T)
        else:
            inv = np.where(upper, inv, inv.T * sign[:, None] * sign[None, :])
        out[k] = r[:, None] * inv / r[None, :]
        done[k] = True
    if not done.all():
        rest = ~done
        out[rest] = inv_or_pinv(D[rest][:, :, None] * A + eye)
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
