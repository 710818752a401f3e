"""The R package's entry points on top of the fitter: sslmm, lmmfit, flashmm.

``sslmm(X, Y, Z)`` computes the summary statistics of in-memory cell-level matrices,
``lmmfit(Y, X, Z, d)`` fits from them, and ``flashmm(data, fixed, random, ...)`` goes
from any expression input (an AnnData store, a Zarr array, in-memory matrices) and
formulas to a fit, reducing the data in one Dask pass, on the steps a run walks too
(:mod:`flashmm_dask.run.steps`). All return the same
:class:`~flashmm_dask.model.fit.LmmFit` as :func:`~flashmm_dask.model.lmm.lmm`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flashmm_dask.design.check import check_stats_replication
from flashmm_dask.design.strata import plan_strata
from flashmm_dask.errors import DesignError, InputError
from flashmm_dask.io.readers import read_expression
from flashmm_dask.keywords import check_keywords, keyword_names
from flashmm_dask.model.fit import LmmFit
from flashmm_dask.model.lmm import lmm, lmm_summary
from flashmm_dask.run.steps import checked_design, checked_expression, resolve_transform, with_pcs
from flashmm_dask.stats.reduce import reduce_stats
from flashmm_dask.stats.reduce_strata import reduce_strata
from flashmm_dask.stats.summary import SummaryStats

logger = logging.getLogger(__name__)

_NO_OBS = (
    "the data carry no cell metadata; pass metadata= (a DataFrame or CSV path) "
    "with the columns the formulas use"
)


def sslmm(X: Any, Y: Any, Z: Any, d: Sequence[int] | None = None) -> SummaryStats:
    """Summary statistics of cell-level matrices (R's ``sslmm``).

    Parameters
    ----------
    X : (n, p) array or DataFrame
    Y : (m, n) array, sparse matrix or DataFrame: features x cells, as in R
    Z : (n, q) array, sparse matrix or DataFrame
    d : sizes of the random components, optional (default one of size q)
    """
    return SummaryStats.from_arrays(X, Y, Z, d=d)


def lmm_stats(stats: SummaryStats, *, check_design: bool = True, **kwargs: Any) -> LmmFit:
    """:func:`lmm` of a :class:`SummaryStats`, keeping its names.

    With ``check_design`` (the default) a random component that the fixed effects absorb
    (no degrees of freedom left, e.g. one donor per condition) or variance components the
    data cannot tell apart (a factor with one cell per level, two components with the same
    levels: :mod:`flashmm_dask.design.identifiable`) raise a DesignError, and a component
    with fewer than 3 left is named in a logged warning
    (:mod:`flashmm_dask.design.check`); ``check_design=False`` fits any design, as R
    FLASHMM does. Other keyword arguments go to :func:`lmm` (method, df, theta0, max_iter,
    epsilon, output_*...).
    """
    if check_design:
        check_stats_replication(stats)
    return lmm_summary(stats, **kwargs)


def _lmm_keywords() -> list[str]:
    """The keywords :func:`lmm` takes after its summary statistics."""
    return keyword_names(lmm)[8:]


def lmmfit(Y: Any, X: Any, Z: Any, d: Sequence[int] | None = None, **kwargs: Any) -> LmmFit:
    """Fit from cell-level matrices (R's ``lmmfit``): Y is features x cells.

    Keyword arguments go to :func:`lmm_stats` (``check_design``) and :func:`lmm`.
    """
    check_keywords("lmmfit", kwargs, [*_lmm_keywords(), "check_design"])
    return lmm_stats(sslmm(X, Y, Z, d=d), **kwargs)


def flashmm(
    data: Any,
    fixed: str,
    random: str | Sequence[str] | Mapping[str, str],
    metadata: Any = None,
    *,
    is_counts: bool = False,
    transform: str | None = None,
    target_sum: float = 1e4,
    layer: str | None = None,
    orientation: Any = None,
    chunk_cells: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    pcs: int = 0,
    split_every: int = 8,
    check_design: bool = True,
    by: str | None = None,
    cells: Any = None,
    min_cells: int = 0,
    drop_missing: bool = False,
    **kwargs: Any,
) -> LmmFit | dict[str, LmmFit]:
    """Fit the mixed model of every feature of an expression dataset.

    Parameters
    ----------
    data : AnnData store path or URL (.zarr, .h5ad), Zarr array path, AnnData, numpy or
        scipy.sparse matrix, or dask array (see :func:`flashmm_dask.read_expression`)
    fixed : fixed-effects formula, e.g. ``"~ 0 + log(libsize) + cls + cls:trt"``
    random : random-effects formula(s), e.g. ``"~ 0 + sam"`` or a list, one per component
    metadata : cell metadata (DataFrame or CSV path) when data has none (plain arrays)
    is_counts : transform counts to log2(1 + counts) chunk by chunk, as R FLASHMM does
    transform : "none", "log2p1" or "log1p_scaled" (overrides is_counts)
    target_sum : per-cell total of the log1p_scaled transform
    layer, orientation, chunk_cells, storage_options : passed to the reader
    pcs : add the top ``pcs`` principal components of the transformed data to X
    split_every : fan-in of the tree reduction
    check_design : refuse, before the expression is read, a design in which the fixed
        effects absorb a random component (no degrees of freedom left for it, e.g. one donor
        per condition), with a DesignError naming it and the fixed-effect columns that
        absorb it, and variance components the data cannot tell apart (a factor with one
        cell per level, two components with the same levels); log a warning for a
        component with fewer than 3 left (:mod:`flashmm_dask.design.check`). False fits
        any design, as R FLASHMM does.
    by : obs column: fit one model per level (a stratum), each with its own variance
        components, all from one pass over the data (see :mod:`flashmm_dask.design.strata`)
    cells : the cells to use: an expression over obs columns
        (``"cell_type != 'doublet' and n_genes >= 200"``, see
        :mod:`flashmm_dask.design.selection`) or a boolean mask
    min_cells : a feature non-zero in fewer of a stratum's (selected) cells is not fitted
        there: its results are NaN (niter NaN)
    drop_missing : leave out cells with a missing value in a formula (or ``by``) column
        instead of raising
    **kwargs : passed to :func:`lmm` (method, df ("residual" or "satterthwaite"), max_iter,
        epsilon, output_* ...)

    Returns
    -------
    LmmFit, or with ``by`` a dict level -> LmmFit in level order (strata that cannot be
    fitted are left out with a warning, see :func:`flashmm_dask.design.strata.plan_strata`)

    Raises
    ------
    InputError
        An unknown keyword (checked before the data are read, with the closest valid one).
    DesignError
        A design whose fixed effects absorb a random component, or whose variance
        components cannot be told apart (``check_design``).
    """
    check_keywords("flashmm", kwargs, [*keyword_names(flashmm)[4:], *_lmm_keywords()])
    expr = read_expression(
        data,
        layer=layer,
        orientation=orientation,
        obs=metadata,
        chunk_cells=chunk_cells,
        storage_options=storage_options,
    )
    chosen = resolve_transform(is_counts, transform)
    expr = checked_expression(expr, fixed, random, _NO_OBS)
    if by is not None or cells is not None or min_cells or drop_missing:
        if pcs:
            raise InputError(
                "pcs= cannot be combined with by=, cells=, min_cells= or drop_missing=; "
                "fit the principal components without strata or add them to the metadata"
            )
        # each stratum's design checked from its cell metadata, before the expression is read
        strata = plan_strata(
            expr.obs,
            fixed,
            random,
            by=by,
            cells=cells,
            drop_missing=drop_missing,
            check_design=check_design,
        )
        per_stratum = reduce_strata(
            expr, strata, transform=chosen, target_sum=target_sum, split_every=split_every
        )
        fits = fit_strata(per_stratum, min_cells=min_cells, check_design=False, **kwargs)
        return fits if by is not None else fits["all"]
    # from the cell metadata, before the expression is read
    design = checked_design(expr, fixed, random, check=check_design)
    expr, design = with_pcs(expr, design, pcs, chosen, fixed, random)
    stats = reduce_stats(
        expr, design, transform=chosen, target_sum=target_sum, split_every=split_every
    )
    return lmm_stats(stats, check_design=False, **kwargs)


def filter_features(stats: SummaryStats, min_cells: int) -> tuple[SummaryStats, np.ndarray]:
    """The statistics with the features non-zero in fewer than ``min_cells`` cells
    emptied (XY, ZY, Ynorm set to 0, so that they are not fitted), and the (m,) mask of
    those features.

    Raises
    ------
    InputError
        ``min_cells`` > 0 but the statistics carry no non-zero counts (``nnz``).
    """
    if isinstance(min_cells, bool) or not isinstance(min_cells, int | np.integer) or min_cells < 0:
        raise InputError(f"min_cells must be a non-negative integer, got {min_cells!r}")
    filtered = np.zeros(stats.m, dtype=bool)
    if min_cells == 0:
        return stats, filtered
    if stats.nnz is None:
        raise InputError(
            "min_cells needs the per-feature non-zero counts, which these statistics do not "
            "carry; compute them again with this version (flashmm-dask stats)"
        )
    filtered = np.asarray(stats.nnz) < min_cells
    if not filtered.any():
        return stats, filtered
    keep = ~filtered
    emptied = dataclasses.replace(
        stats,
        XY=np.asarray(stats.XY) * keep,
        ZY=np.asarray(stats.ZY) * keep,
        Ynorm=np.asarray(stats.Ynorm) * keep,
    )
    return emptied, filtered


def fit_strata(
    strata: Mapping[str, SummaryStats],
    *,
    min_cells: int = 0,
    check_design: bool = True,
    **kwargs: Any,
) -> dict[str, LmmFit]:
    """:func:`lmm_stats` of each stratum's statistics, in level order.

    Features non-zero in fewer than ``min_cells`` cells of a stratum are not fitted there
    (NaN results); keyword arguments go to :func:`lmm`. A stratum whose fixed effects
    absorb a random component (:mod:`flashmm_dask.design.check`) is left out with a
    warning naming it, never silently.
    """
    fits = {}
    for level, stats in strata.items():
        if check_design:
            try:
                check_stats_replication(stats, where=f"stratum {level}")
            except DesignError as exc:
                logger.warning("stratum %s is not fitted: %s", level, exc)
                continue
        emptied, filtered = filter_features(stats, min_cells)
        if filtered.any():
            logger.info(
                "stratum %s: %d of %d features are non-zero in fewer than %d cells and are "
                "not fitted",
                level,
                int(filtered.sum()),
                stats.m,
                min_cells,
            )
        options = {**kwargs, "warn_zero": False} if filtered.any() else kwargs
        fits[level] = lmm_stats(emptied, check_design=False, **options)
    return fits
