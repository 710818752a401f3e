"""Random components that the fixed effects absorb: refused before the data pass.

A random component k with columns Z_k (n x d_k) can only be estimated, and effects that are
constant within its levels can only be tested against it, from the variation of Z_k that
the fixed effects X leave over. Its degrees of freedom are

    df_k = rank [X Z_k] - rank X = rank Z_k - a_k,   a_k = dim(col X  intersect  col Z_k),

a_k being the dimension the fixed effects absorb (with donors nested in condition and
``~ trt`` fixed, a_k = the number of conditions: the intercept and ``trtB`` are constant
within each donor). One donor per condition gives df_k = 0: the donor variance cannot be
estimated and the condition cannot be tested; two donors per condition give df_k = 2.

Everything comes from the cross-products XX = X'X, ZX = Z'X and ZZ = Z'Z, which the design
gives from the cell metadata alone (no expression): after scaling every column to unit
norm (A = XX, B = Z_k'X, C = Z_k'Z_k scaled),

    df_k = rank(C - B A^+ B')                  (the Schur complement of X in [X Z_k])
    a_k  = rank C - df_k
    {a : X a in col Z_k} = null space of A - B' C^+ B

and the fixed-effect columns that absorb Z_k are those on which that null space has weight.

:func:`check_replication` raises a :class:`DesignError` naming a component with df_k = 0 and
the columns that absorb it, and logs one warning naming the components with
0 < df_k < :data:`MIN_DF` and those with df_k < :data:`CALIBRATED_DF`, below which the
package's calibration measured tests between their levels above their nominal FDR.
:func:`design_crossproducts` computes XX, ZX, ZZ of a design from the cell metadata in
chunks, so the check costs one cheap pass over obs.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse
from numpy.typing import ArrayLike

from flashmm_dask.design.identifiable import check_identifiable
from flashmm_dask.design.within import warn_within_level_effects
from flashmm_dask.errors import DesignError
from flashmm_dask.numerics.spectral_terms import eigvalsh_one_thread
from flashmm_dask.numerics.structured import _is_diagonal

if TYPE_CHECKING:
    import pandas as pd

    from flashmm_dask.design.formula import Design
    from flashmm_dask.stats.summary import SummaryStats

__all__ = [
    "CALIBRATED_DF",
    "MIN_DF",
    "Replication",
    "check_design_replication",
    "check_replication",
    "check_stats_replication",
    "design_crossproducts",
    "replication",
]

logger = logging.getLogger(__name__)

#: A random component with fewer degrees of freedom left after the fixed effects is warned of.
MIN_DF = 3
#: Below this many degrees of freedom left, tests of effects constant within a component's
#: levels exceeded the nominal FDR at Benjamini-Hochberg thresholds in the package's
#: calibration (benchmarks/CALIBRATION.md, BH at 0.05: FDP up to 0.20 at 4 df, 0.11 at 6,
#: 0.07 at 8; within 0.06 from 10): such components are named in the same warning.
CALIBRATED_DF = 10
#: Relative eigenvalue below which a direction counts as absent (columns scaled to unit norm).
RANK_RTOL = 1e-8
#: Weight above which a fixed-effect column counts as absorbing a component.
SUPPORT_TOL = 1e-6
#: Cells whose design rows are formed at once by :func:`design_crossproducts`.
CHUNK_ROWS = 100_000


@dataclass(frozen=True)
class Replication:
    """What the fixed effects leave of one random component.

    Attributes
    ----------
    component : its name
    rank : rank Z_k (its number of levels for an indicator component)
    df : rank [X Z_k] - rank X, the dimensions left after the fixed effects
    absorbed : rank - df, the dimensions the fixed effects absorb
    absorbing : the fixed-effect columns that absorb them (constant within its levels)
    """

    component: str
    rank: int
    df: int
    absorbed: int
    absorbing: tuple[str, ...]


def _rank(sym: np.ndarray) -> int:
    if sym.size == 0:
        return 0
    eig = eigvalsh_one_thread(sym)  # each stratum's design is checked, on a busy driver
    return int(np.sum(eig > RANK_RTOL * max(1.0, float(eig[-1]))))


def _pinv(C: np.ndarray, diagonal: bool) -> np.ndarray:
    if not diagonal:
        return np.linalg.pinv(C, rcond=RANK_RTOL, hermitian=True)
    c = np.diag(C)
    keep = c > RANK_RTOL * max(1.0, float(c.max(initial=0.0)))
    return np.diag(np.where(keep, 1.0 / np.where(keep, c, 1.0), 0.0))


def _diagonal_ranks(C: np.ndarray, B: np.ndarray, A_pinv: np.ndarray) -> tuple[int, int]:
    """rank C and rank (C - B A^+ B') for a diagonal C with more than p non-zero entries,
    from a p x p eigenproblem (an indicator component of thousands of levels, e.g. donor x
    cell type, would otherwise take two q x q eigendecompositions: minutes).

    Scaled to unit norm, C is 1 on its r non-empty columns and 0 elsewhere (where B is 0
    too), so C - B A^+ B' is I - M on them, M = B A^+ B' of rank <= p: its eigenvalues are
    1 (r - p times) and 1 - mu_i, mu_i those of R' B'B R with A^+ = R R' (p x p). The
    largest is 1, so the rule of :func:`_rank` counts the 1 - mu_i above RANK_RTOL."""
    c = np.diag(C)
    support = c > RANK_RTOL * max(1.0, float(c.max(initial=0.0)))
    rank = int(np.count_nonzero(support))
    Bs = B[support] / np.sqrt(c[support])[:, None]  # C^-1/2 B: exact for unit-scaled C
    lam, vec = np.linalg.eigh(0.5 * (A_pinv + A_pinv.T))
    R = vec * np.sqrt(np.clip(lam, 0.0, None))
    mu = eigvalsh_one_thread(R.T @ (Bs.T @ Bs) @ R)
    p = A_pinv.shape[0]
    return rank, (rank - p) + int(np.count_nonzero(1.0 - mu > RANK_RTOL))


def _unit_scale(gram_diagonal: np.ndarray) -> np.ndarray:
    scale = np.sqrt(np.clip(gram_diagonal, 0.0, None))
    return np.where(scale > 0, scale, 1.0)


def replication(
    XX: ArrayLike,
    ZX: ArrayLike,
    ZZ: ArrayLike,
    d: Sequence[int],
    covariates: Sequence[str],
    components: Sequence[str],
) -> list[Replication]:
    """The degrees of freedom each random component keeps after the fixed effects.

    Parameters
    ----------
    XX : (p, p) array   ZX : (q, p) array   ZZ : (q, q) array
    d : sizes of the K components (sum q)
    covariates : p names of the columns of X
    components : K names of the components

    Returns
    -------
    list of Replication, one per component, in order
    """
    XX = np.asarray(XX, dtype=np.float64)
    ZX = np.asarray(ZX, dtype=np.float64)
    ZZ = np.asarray(ZZ, dtype=np.float64)
    sx = _unit_scale(np.diag(XX))
    A = XX / np.outer(sx, sx)
    A_pinv = np.linalg.pinv(A, rcond=RANK_RTOL, hermitian=True)
    out = []
    start = 0
    for name, size in zip(components, d, strict=True):
        Ik = slice(start, start + int(size))
        start += int(size)
        sz = _unit_scale(np.diag(ZZ[Ik, Ik]))
        C = ZZ[Ik, Ik] / np.outer(sz, sz)
        B = ZX[Ik] / np.outer(sz, sx)
        diagonal = _is_diagonal(C)
        if diagonal and int(np.count_nonzero(np.diag(C) > RANK_RTOL)) > A.shape[0]:
            rank, df = _diagonal_ranks(C, B, A_pinv)
        else:
            rank = _rank(C)
            schur_z = C - B @ A_pinv @ B.T
            df = min(rank, _rank(0.5 * (schur_z + schur_z.T)))
        absorbed = rank - df
        absorbing: tuple[str, ...] = ()
        if absorbed:
            schur_x = A - B.T @ _pinv(C, diagonal) @ B
            _, vectors = np.linalg.eigh(0.5 * (schur_x + schur_x.T))
            weight = np.linalg.norm(vectors[:, :absorbed], axis=1)
            absorbing = tuple(str(covariates[int(j)]) for j in np.flatnonzero(weight > SUPPORT_TOL))
        out.append(Replication(str(name), rank, df, absorbed, absorbing))
    return out


def _quoted(names: Sequence[str], shown: int = 6) -> str:
    text = ", ".join(f"'{n}'" for n in names[:shown]) or "(the fixed effects)"
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


# check_replication takes replication's six arguments and passes them on as they are, so
# they are written once; it shows replication's signature with min_df (set below). A wrong
# argument is the TypeError of the call to replication, which names replication().
def check_replication(
    *args: Any, min_df: int = MIN_DF, where: str = "", n: int | None = None, **kwargs: Any
) -> list[Replication]:
    """Refuse a random component the fixed effects absorb; warn of one with few df.

    Parameters as :func:`replication`; ``min_df``: components with fewer degrees of freedom
    left (but at least one) are named in one logged warning, together with those that keep
    fewer than :data:`CALIBRATED_DF` (tests between their levels were not calibrated at BH
    thresholds there). ``where``: what the design is of (e.g. ``"stratum cls=1"``), named
    in the warning. ``n``: the number of cells; given, variance components the data cannot
    tell apart (:mod:`flashmm_dask.design.identifiable`) are refused too, and indicator
    fixed effects that vary within a component's levels with no random component of their
    interaction are named in a warning (:mod:`flashmm_dask.design.within`).

    Returns
    -------
    list of Replication

    Raises
    ------
    DesignError
        A component keeps no degrees of freedom (its columns lie in the span of X), e.g.
        one donor per condition with the condition among the fixed effects; or (with
        ``n``) variance components cannot be told apart, e.g. a factor with one cell per
        level or two components with the same levels.
    """
    found = replication(*args, **kwargs)
    for r in found:
        if r.rank == 0:
            raise DesignError(
                f"random component '{r.component}' is zero in every cell (e.g. a slope on "
                "a covariate that is 0 throughout), so it has no variance to estimate; "
                "remove it or check the covariate"
            )
        if r.df == 0:
            raise DesignError(
                f"random component '{r.component}' has no replication left after the fixed "
                f"effects: its {r.rank} levels lie in the span of the fixed-effect columns "
                f"{_quoted(r.absorbing)} (constant within each of its levels), so its "
                "variance cannot be estimated and those effects cannot be tested against it; "
                f"use several '{r.component}' levels per level of those terms, or remove "
                "the terms or the component"
            )
    if n is not None:
        bound = inspect.signature(replication).bind(*args, **kwargs).arguments
        shared = (bound["XX"], bound["ZX"], bound["ZZ"], bound["d"])
        check_identifiable(*shared, n, bound["components"])
        warn_within_level_effects(*shared, n, bound["covariates"], bound["components"], where=where)
    few = [r for r in found if 0 < r.df < min_df]
    thin = [r for r in found if max(min_df, 1) <= r.df < CALIBRATED_DF]
    parts = []
    if few:
        parts.append(
            f"{_kept(few)}; the variance of such a component and tests of effects constant "
            "within its levels rest on very few levels"
        )
    if thin:
        parts.append(
            f"{_kept(thin)}; with fewer than {CALIBRATED_DF}, tests of effects constant "
            "within its levels (a condition between donors) exceeded their nominal false "
            "discovery rate at Benjamini-Hochberg thresholds in the package's calibration "
            "(benchmarks/CALIBRATION.md, BH at 0.05: FDP up to 0.20 at 4, 0.11 at 6 and 0.07 "
            "at 8 degrees of freedom): read their adjusted p-values with care, or add levels"
        )
    if parts:
        logger.warning(
            "few degrees of freedom left after the fixed effects%s: %s",
            f" ({where})" if where else "",
            " / ".join(parts),
        )
    return found


def _kept(found: list[Replication]) -> str:
    return "; ".join(
        f"random component '{r.component}' keeps {r.df} of its {r.rank} levels' "
        f"dimensions ({r.absorbed} absorbed by {_quoted(r.absorbing)})"
        for r in found
    )


check_replication.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        *inspect.signature(replication).parameters.values(),
        inspect.Parameter(
            "min_df", inspect.Parameter.KEYWORD_ONLY, default=MIN_DF, annotation="int"
        ),
        inspect.Parameter("where", inspect.Parameter.KEYWORD_ONLY, default="", annotation="str"),
        inspect.Parameter(
            "n", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="int | None"
        ),
    ],
    return_annotation="list[Replication]",
)


def design_crossproducts(
    design: Design, obs: pd.DataFrame, *, chunk_rows: int = CHUNK_ROWS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """X'X, Z'X and Z'Z of a design over the cells of ``obs`` (no expression data).

    Parameters
    ----------
    design : flashmm_dask.Design
    obs : pandas.DataFrame, the cell metadata the design was built from
    chunk_rows : cells whose design rows are formed at once

    Returns
    -------
    XX (p, p), ZX (q, p), ZZ (q, q) arrays
    """
    p, q = design.p, design.q
    XX, ZX = np.zeros((p, p)), np.zeros((q, p))
    ZZ = scipy.sparse.csr_matrix((q, q))  # dense once at the end: one q x q array, not two
    for start in range(0, len(obs), chunk_rows):
        X, Z = design.XZ(obs.iloc[start : start + chunk_rows])
        XX += X.T @ X
        ZX += np.asarray(Z.T @ X)
        ZZ = ZZ + Z.T @ Z
    return XX, ZX, ZZ.toarray()


def check_design_replication(
    design: Design, obs: pd.DataFrame, *, min_df: int = MIN_DF, where: str = ""
) -> list[Replication]:
    """:func:`check_replication` of a design over its cell metadata (before any data pass)."""
    XX, ZX, ZZ = design_crossproducts(design, obs)
    return check_replication(
        XX,
        ZX,
        ZZ,
        design.d,
        design.covariates,
        design.components,
        min_df=min_df,
        where=where,
        n=len(obs),
    )


def check_stats_replication(
    stats: SummaryStats, *, min_df: int = MIN_DF, where: str = ""
) -> list[Replication]:
    """:func:`check_replication` of the shared part of a :class:`SummaryStats`."""
    return check_replication(
        stats.XX,
        stats.ZX,
        stats.ZZ,
        stats.d,
        stats.covariates,
        stats.components,
        min_df=min_df,
        where=where,
        n=int(stats.n),
    )
