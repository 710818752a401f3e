"""Variance components that the data cannot tell apart: refused before the data pass.

The REML likelihood depends on the variances s_0 (residual) and s_k only through

    K'V K = s_0 K'K + sum_k s_k K'Z_k Z_k'K,     K'X = 0 (the error contrasts),

so the variances are identifiable exactly when the matrices P, P V_1 P, ..., P V_K P
(V_k = Z_k Z_k', P = I - X (X'X)^+ X') are linearly independent; otherwise only a
combination of them can be estimated, the Fisher information is singular at every point
(it is their Gram matrix in a positive definite inner product) and the fit returns one of
infinitely many equally likely splits. Two ways this happens in practice: a factor with
one cell per level (V_k = I: it *is* the residual; lme4 refuses it too) and two
components with the same levels (V_j = V_k). The Gram matrix G of those K + 1 matrices
(trace inner product) comes from the cross-products alone, with A = X'X, B_k = Z_k'X,
C_jk = Z_j'Z_k:

    G_00 = n - rank X
    G_0k = tr C_kk - tr(A^+ B_k'B_k)
    G_jk = ||C_jk||_F^2 - 2 tr(A^+ B_j'C_jk B_k) + tr(A^+ B_j'B_j A^+ B_k'B_k)

:func:`dependent_components` scales G to unit diagonal and names the components that a
null vector (an eigenvalue below :data:`DEPENDENT_RTOL`) has weight on;
:func:`check_identifiable` raises a :class:`DesignError` naming them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from flashmm_dask.errors import DesignError

__all__ = ["DEPENDENT_RTOL", "check_identifiable", "dependent_components", "gram"]

#: Relative eigenvalue of X'X (columns scaled to unit norm) below which a direction counts as
#: absent, as in :mod:`flashmm_dask.design.check`.
RANK_RTOL = 1e-8
#: Smallest eigenvalue of the unit-diagonal Gram matrix below which the components count as
#: dependent. Dependence is exact (rounding ~1e-15); a factor whose levels hold two cells
#: each sits at ~0.1, so the gap is wide.
DEPENDENT_RTOL = 1e-9
#: Weight of a null vector above which a component counts as one of the dependent ones.
WEIGHT_TOL = 1e-6
#: Below this share of its size before the projection off the fixed effects, a component's
#: own Gram entry counts as zero (nothing left of it after the fixed effects: refused by
#: :func:`flashmm_dask.design.check.check_replication`).
EMPTY_RTOL = 1e-12


def gram(XX: ArrayLike, ZX: ArrayLike, ZZ: ArrayLike, d: Sequence[int], n: int) -> np.ndarray:
    """The (K+1) x (K+1) trace Gram matrix of P, P V_1 P, ..., P V_K P (residual first).

    Parameters
    ----------
    XX : (p, p) array   ZX : (q, p) array   ZZ : (q, q) array
    d : sizes of the K components (sum q)
    n : number of cells

    Returns
    -------
    (K+1, K+1) symmetric array
    """
    XX = np.asarray(XX, dtype=np.float64)
    ZX = np.asarray(ZX, dtype=np.float64)
    ZZ = np.asarray(ZZ, dtype=np.float64)
    # H = X (X'X)^+ X' does not change when X's columns are scaled: scale them to unit norm
    sx = np.sqrt(np.clip(np.diag(XX), 0.0, None))
    sx = np.where(sx > 0, sx, 1.0)
    A_pinv = np.linalg.pinv(XX / np.outer(sx, sx), rcond=RANK_RTOL, hermitian=True)
    A_pinv = A_pinv / np.outer(sx, sx)
    rank_x = round(float(np.sum(A_pinv * XX)))  # tr(A^+ A) = rank X
    edges = np.concatenate([[0], np.cumsum(np.asarray(d, dtype=np.int64))])
    blocks = [slice(int(a), int(b)) for a, b in itertools.pairwise(edges)]
    K = len(blocks)
    B = [ZX[s] for s in blocks]
    BB = [b.T @ b for b in B]  # B_k'B_k, p x p
    G = np.zeros((K + 1, K + 1))
    G[0, 0] = n - rank_x
    for k, s in enumerate(blocks):
        G[0, k + 1] = G[k + 1, 0] = np.trace(ZZ[s, s]) - np.sum(A_pinv * BB[k])
    for j, sj in enumerate(blocks):
        for k in range(j, K):
            C = ZZ[sj, blocks[k]]
            value = (
                np.einsum("ij,ij->", C, C)  # no q x q temporary
                - 2.0 * np.sum(A_pinv * (B[j].T @ (C @ B[k])))
                + np.sum((A_pinv @ BB[j]) * (A_pinv @ BB[k]).T)
            )
            G[j + 1, k + 1] = G[k + 1, j + 1] = value
    return G


def dependent_components(
    XX: ArrayLike,
    ZX: ArrayLike,
    ZZ: ArrayLike,
    d: Sequence[int],
    n: int,
    components: Sequence[str],
) -> list[tuple[str, ...]]:
    """Groups of variance components ("residual" among them) that are linearly dependent.

    Components with nothing left after the fixed effects are left out (the replication
    check names them). Returns one tuple of names per independent dependence (empty list:
    all identifiable).
    """
    G = gram(XX, ZX, ZZ, d, n)
    names = ["residual", *map(str, components)]
    diag = np.diag(G).copy()
    # each against its own size before the projection (tr(V_k V_k) = ||Z_k'Z_k||^2, n for
    # the residual's): a slope in large units must not make the others look empty
    ZZ = np.asarray(ZZ, dtype=np.float64)
    edges = np.concatenate([[0], np.cumsum(np.asarray(d, dtype=np.int64))])
    raw = [float(n)] + [
        float(np.einsum("ij,ij->", ZZ[a:b, a:b], ZZ[a:b, a:b]))
        for a, b in itertools.pairwise(edges)
    ]
    keep = np.flatnonzero(diag > EMPTY_RTOL * np.asarray(raw))
    if keep.size < 2:
        return []
    s = np.sqrt(diag[keep])
    unit = G[np.ix_(keep, keep)] / np.outer(s, s)
    lam, vec = np.linalg.eigh(0.5 * (unit + unit.T))
    found = []
    for i in np.flatnonzero(lam < DEPENDENT_RTOL):
        weight = np.abs(vec[:, i])
        found.append(tuple(names[keep[j]] for j in np.flatnonzero(weight > WEIGHT_TOL)))
    return found


def _names(group: Sequence[str]) -> str:
    quoted = [f"'{g}'" for g in group]
    return ", ".join(quoted[:-1]) + f" and {quoted[-1]}" if len(quoted) > 1 else quoted[0]


def check_identifiable(
    XX: ArrayLike,
    ZX: ArrayLike,
    ZZ: ArrayLike,
    d: Sequence[int],
    n: int,
    components: Sequence[str],
) -> None:
    """Refuse variance components that the data cannot tell apart.

    Raises
    ------
    DesignError
        naming the dependent components, e.g. a factor with one cell per level (it cannot
        be told from the residual) or two components with the same levels.
    """
    for group in dependent_components(XX, ZX, ZZ, d, n, components):
        random = [g for g in group if g != "residual"]
        if "residual" in group and len(random) == 1:
            what = (
                f"random component '{random[0]}' cannot be told apart from the residual: "
                "its covariance pattern after the fixed effects is a multiple of the "
                "residual's (e.g. a factor with one cell per level)"
            )
        else:
            what = (
                f"the variances of {_names(group)} cannot be told apart: their covariance "
                "patterns after the fixed effects are linearly dependent (e.g. two random "
                "components with the same levels)"
            )
        raise DesignError(
            f"{what}, so only a combination of their variances can be estimated and the "
            "fit would return an arbitrary split; remove the redundant random component"
        )
