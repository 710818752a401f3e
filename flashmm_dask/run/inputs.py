"""Step 0 and 1 of a run, plain or stratified: the checked inputs, then the statistics.

0. Inputs (:func:`prepare_inputs`, :func:`prepare_strata`): the data's metadata, the
   design (or the strata and their designs), the feature selection and the contrasts are
   read and checked before any cluster starts, so a user error is reported at once. The
   data are read and the design built by the steps :func:`flashmm_dask.api.flashmm` walks
   too (:mod:`flashmm_dask.run.steps`); the design is built once (and once more with the
   principal components of ``model.pcs``, which need the data).
1. Statistics (:func:`compute_stats`, :func:`compute_strata_stats`): loaded from a saved
   store (``stats.load``), reused from an interrupted run of the same config, or reduced
   from the expression data in one Dask pass (:mod:`flashmm_dask.stats.reduce`,
   :mod:`flashmm_dask.stats.reduce_strata`); with no data path, reduced from data
   simulated into the output folder first (the embedded demo).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from flashmm_dask.design.check import check_design_replication, check_stats_replication
from flashmm_dask.design.contrasts import contrast_matrix
from flashmm_dask.design.formula import Design
from flashmm_dask.design.strata import Strata, plan_strata
from flashmm_dask.errors import ConfigError, DataError, InputError, StoreError
from flashmm_dask.io.readers import Expression, Orientation, read_expression
from flashmm_dask.io.strata_results import applicable_contrasts, strata_attrs
from flashmm_dask.run.config import RunConfig, SimulateConfig, require_model
from flashmm_dask.run.features import feature_positions
from flashmm_dask.run.output import SIMULATED, STATS, _writing
from flashmm_dask.run.progress import wait
from flashmm_dask.run.soma import read_for_run
from flashmm_dask.run.steps import (
    Random,
    checked_design,
    checked_expression,
    require_obs,
    resolve_transform,
    with_pcs,
)
from flashmm_dask.run.stored_model import check_stats_model
from flashmm_dask.run.strata_cluster import (
    ClusterStrata,
    reduce_on_cluster,
    save_in_background,
    save_on_cluster,
    scattered,
)
from flashmm_dask.simulate import simulate_to_store
from flashmm_dask.stats.reduce import stats_graph, unreadable
from flashmm_dask.stats.reduce_strata import strata_graph
from flashmm_dask.stats.strata import StratifiedStats, load_stats
from flashmm_dask.stats.summary import SummaryStats

logger = logging.getLogger(__name__)

NO_OBS = "the data carry no cell metadata; set data.obs to a CSV of cell metadata"

_Stats = TypeVar("_Stats", SummaryStats, StratifiedStats)


def uses_strata(cfg: RunConfig) -> bool:
    """Whether a config needs the stratified run (strata, a selection or a gene filter)."""
    return bool(
        cfg.model.by is not None
        or cfg.data.cells is not None
        or cfg.data.drop_missing
        or cfg.model.min_cells
        or (cfg.stats.load is not None and strata_attrs(cfg.stats.load) is not None)
    )


# the simulate settings passed to simulate_to_store under their own names
_SIMULATE_KEYWORDS = (
    "n_samples",
    "n_celltypes",
    "n_treatments",
    "n_de_genes",
    "minbeta",
    "maxbeta",
    "var_randomeffects",
    "seed",
)


def simulate_data(sim: SimulateConfig, target: str | Path, *, overwrite: bool = False) -> Path:
    """Simulated data of the ``simulate`` settings written into the store ``target``."""
    keywords = {name: getattr(sim, name) for name in _SIMULATE_KEYWORDS}
    return simulate_to_store(
        target,
        sim.n_genes,
        sim.n_cells,
        store_chunk_cells=sim.chunk_cells,
        overwrite=overwrite,
        **keywords,
    )


def expression_source(cfg: RunConfig, folder: Path) -> tuple[Any, dict[str, Any]]:
    """The data path to read (simulating it first when the config has none) and its
    storage options."""
    if cfg.data.path is not None:
        return cfg.data.path, dict(cfg.data.storage_options or {})
    target = folder / SIMULATED
    if not target.exists():
        sim = cfg.simulate
        logger.info("simulating %d cells x %d genes into %s", sim.n_cells, sim.n_genes, target)
        simulate_data(sim, target)
    return str(target), {}


def _read(cfg: RunConfig, source: Any, options: dict[str, Any]) -> Expression:
    """The run's data (its matrix lazily), refused without cell metadata."""
    expr = read_expression(
        source,
        layer=cfg.data.layer,
        orientation=cast("Orientation | None", cfg.data.orientation),
        obs=cfg.data.obs,
        chunk_cells=cfg.data.chunk_cells,
        storage_options=options or None,
    )
    return require_obs(expr, NO_OBS)


def _formulas(cfg: RunConfig) -> tuple[str, Random]:
    """``model.fixed`` and ``model.random``: set (:func:`require_model`) when the data
    are read, else reported by the design."""
    return cast(str, cfg.model.fixed), cast(Random, cfg.model.random)


def _saved(cfg: RunConfig, folder: Path, load: Callable[[str], _Stats]) -> _Stats | None:
    """The statistics of ``stats.load``, or those this config saved in ``folder`` before
    (an interrupted run), or None: they are to be reduced."""
    if cfg.stats.load is not None:
        logger.info("loading summary statistics from %s", cfg.stats.load)
        return load(cfg.stats.load)
    if not (folder / STATS).exists():
        return None
    try:
        cached = load(str(folder / STATS))
    except StoreError as exc:  # e.g. its write was interrupted: compute them again
        logger.warning("ignoring the saved statistics in %s: %s", folder / STATS, exc)
        return None
    if cached.provenance.get("config_hash") != cfg.hash():
        return None
    logger.info("reusing the summary statistics of this run in %s", folder / STATS)
    return cached


def _loaded_features(cfg: RunConfig, stats: _Stats) -> _Stats:
    """The features of ``data.features`` among statistics loaded by ``stats.load``, found by
    name (a var column is read from ``data.path``, whose features the statistics must be
    of); all of them without ``data.features``."""
    if not cfg.data.features:
        return stats
    first = stats if isinstance(stats, SummaryStats) else next(iter(stats.values()))
    names = list(first.features)  # every stratum's statistics are of the same features
    positions = feature_positions(
        cfg.data.features,
        names,
        data=cfg.data.path,
        storage_options=dict(cfg.data.storage_options or {}),
    )
    logger.info(
        "data.features: %d of the %d features of the statistics in %s",
        0 if positions is None else positions.size,
        len(names),
        cfg.stats.load,
    )
    return stats if positions is None else stats.subset(positions)


def _reduce(client: Any, graph: Any, source: str, *, show: bool) -> Any:
    """Compute the reduction ``graph`` on the cluster; an unreadable chunk of the data
    raises a DataError that names ``source``."""
    future = client.compute(graph)
    try:
        wait([future], "reduction", show=show)
        return future.result()
    except Exception as exc:
        error = unreadable(exc, source)
        if error is None:
            raise
        raise error from exc


def _kept(
    cfg: RunConfig,
    folder: Path,
    stats: _Stats,
    features: np.ndarray | None,
    save: Callable[[_Stats, str], None],
) -> _Stats:
    """The reduced statistics of the selected features, saved when ``stats.save``."""
    if features is not None:
        stats = stats.subset(features)
    if cfg.stats.save:
        with _writing("the summary statistics", folder):
            save(stats, str(folder / STATS))
    return stats


# -- the plain run ----------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """The checked inputs of a run, read before any cluster starts.

    Attributes
    ----------
    stats : the summary statistics to fit (``stats.load`` or this run's cached ones), or
        None when they must be reduced from the data
    expr : the lazy expression data (None with ``stats``)
    design : its design, without the principal components of ``model.pcs``
    transform : the expression transform
    covariates : the coefficient names, with PC1.. PCk (the contrasts are checked on them)
    features : positions of the features of ``data.features`` (None: all)
    """

    stats: SummaryStats | None
    expr: Expression | None = None
    design: Design | None = None
    transform: str = "none"
    covariates: tuple[str, ...] = ()
    features: np.ndarray | None = None


def prepare_inputs(cfg: RunConfig, folder: Path) -> Inputs:
    """Read and check the cheap inputs of a run: a user error surfaces here, at once.

    Loads the saved statistics, or reads the data's metadata lazily (nothing of the
    matrix), checks the feature selection and builds the design; then checks the
    contrasts against the coefficient names. With no data path the demo data are
    simulated into ``folder`` first.

    Raises
    ------
    DataError, DesignError, ContrastError, InputError, StoreError
        DesignError also for a random component that the fixed effects absorb
        (:mod:`flashmm_dask.design.check`).
    """
    if cfg.stats.load is None:
        require_model(cfg)
    stats = _saved(cfg, folder, SummaryStats.load)
    if stats is not None:
        if cfg.stats.load is not None:
            check_stats_model(cfg, stats, cfg.stats.load)
            stats = _loaded_features(cfg, stats)
        inputs = Inputs(stats, covariates=tuple(stats.covariates))
    else:
        inputs = _read_inputs(cfg, folder)
    if cfg.contrasts:
        contrast_matrix(dict(cfg.contrasts), list(inputs.covariates))
    if inputs.stats is not None:  # random components the fixed effects absorb: refused
        check_stats_replication(inputs.stats)
    else:
        assert inputs.design is not None and inputs.expr is not None
        check_design_replication(inputs.design, inputs.expr.obs)
    return inputs


def _read_inputs(cfg: RunConfig, folder: Path) -> Inputs:
    """The data (their metadata), the feature selection and the design (steps 1 and 2 of
    :mod:`flashmm_dask.run.steps`)."""
    source, options = expression_source(cfg, folder)
    # a TileDB-SOMA experiment is read with the config's filters pushed down
    expr = read_for_run(cfg, source, options)
    if expr is None:
        expr = _read(cfg, source, options)
    fixed, random = _formulas(cfg)
    expr = checked_expression(expr, fixed, random, NO_OBS)
    if expr.n_cells < 2:
        raise DataError(
            f"the data have {expr.n_cells} cell(s); a mixed model needs many cells (more "
            "than its fixed-effect coefficients, over 2 or more random-effect levels)"
        )
    positions = feature_positions(
        cfg.data.features,
        list(expr.features),
        data=cfg.data.path,
        storage_options=options,
        as_read=list(expr.features_as_read),
    )
    # the replication check follows the contrasts' (prepare_inputs), as it always has
    design = checked_design(expr, fixed, random, check=False)
    pcs = tuple(f"PC{i + 1}" for i in range(cfg.model.pcs))
    transform = resolve_transform(False, cfg.model.transform)
    covariates = (*design.covariates, *pcs)
    return Inputs(None, expr, design, transform, covariates, positions)


def compute_stats(
    cfg: RunConfig,
    client: Any,
    folder: Path,
    *,
    show: bool = False,
    inputs: Inputs | None = None,
) -> SummaryStats:
    """Summary statistics for a run: loaded, cached from an interrupted run, or reduced.

    ``inputs`` are those of :func:`prepare_inputs` (read here when not given).

    Raises
    ------
    DataError
        The data hold NaN/Inf (or negative counts with a counts transform), or a chunk
        of the store cannot be read (corrupt or truncated).
    """
    if inputs is None:
        inputs = prepare_inputs(cfg, folder)
    if inputs.stats is not None:
        return inputs.stats
    assert inputs.expr is not None and inputs.design is not None
    fixed, random = _formulas(cfg)
    expr, design = with_pcs(
        inputs.expr, inputs.design, cfg.model.pcs, inputs.transform, fixed, random
    )
    graph = stats_graph(
        expr,
        design,
        transform=inputs.transform,
        target_sum=cfg.model.target_sum,
        split_every=cfg.stats.split_every,
        provenance={"config_hash": cfg.hash(), "source": expr.source},
    )
    stats: SummaryStats = _reduce(client, graph, expr.source, show=show)
    return _kept(cfg, folder, stats, inputs.features, _save_plain)


def _save_plain(stats: SummaryStats, path: str) -> None:
    stats.save(path, overwrite=True)


def check_fittable(stats: SummaryStats) -> None:
    """Refuse statistics in which every feature is zero: there is nothing to fit."""
    if not (np.asarray(stats.Ynorm) > 0).any():
        raise DataError(
            f"all {stats.m} features are zero in every cell: nothing to fit; check the "
            "data (data.layer: raw counts may be in a layer) and data.features"
        )


# -- the stratified run -----------------------------------------------------------------


@dataclass(frozen=True)
class StrataInputs:
    """The checked inputs: the statistics (loaded or cached), or what reduces them."""

    stats: StratifiedStats | None
    expr: Expression | None = None
    strata: Strata | None = None
    transform: str = "none"
    features: np.ndarray | None = None


def _as_strata(stats: SummaryStats | StratifiedStats) -> StratifiedStats:
    if isinstance(stats, StratifiedStats):
        return stats
    return StratifiedStats({"all": stats}, None, {"all": "all"}, {})


def _load_strata(path: str) -> StratifiedStats:
    return _as_strata(load_stats(path))


def _check_contrasts(cfg: RunConfig, covariates: Mapping[str, tuple[str, ...]]) -> None:
    """Each contrast must apply to at least one stratum."""
    for name, expr in dict(cfg.contrasts).items():
        errors = [applicable_contrasts({name: expr}, c)[1] for c in covariates.values()]
        if all(errors):
            if len(covariates) == 1:
                contrast_matrix({name: expr}, list(next(iter(covariates.values()))))
            raise InputError(
                f"contrast {name!r} applies to no stratum: {next(iter(errors[0].values()))}"
            )


def prepare_strata(cfg: RunConfig, folder: Path) -> StrataInputs:
    """Read and check the inputs (the strata, the selection, the features, the contrasts)
    before any cluster starts.

    Raises
    ------
    DataError, DesignError, ContrastError, InputError, StoreError
    """
    loaded = _saved(cfg, folder, _load_strata)
    if loaded is not None:
        if cfg.stats.load is not None and cfg.model.by is not None and loaded.by != cfg.model.by:
            raise InputError(
                f"model.by is {cfg.model.by!r} but the statistics in {cfg.stats.load} are "
                f"{'of strata of ' + repr(loaded.by) if loaded.by else 'not stratified'}; "
                "compute them with this model.by (flashmm-dask stats)"
            )
        if cfg.stats.load is not None:
            _check_loaded_strata(cfg, loaded)
            loaded = _loaded_features(cfg, loaded)
        inputs = StrataInputs(loaded)
        covariates = {k: v.covariates for k, v in loaded.items()}
    else:
        inputs = _read_strata(cfg, folder)
        assert inputs.strata is not None
        strata = inputs.strata
        covariates = dict(zip(strata.levels, (d.covariates for d in strata.designs), strict=True))
    if cfg.model.min_cells and inputs.stats is not None:
        for level, stats in inputs.stats.items():
            if stats.nnz is None:
                raise InputError(
                    f"model.min_cells needs the non-zero counts of each feature, which the "
                    f"statistics of stratum {level!r} do not carry; compute them again "
                    "(flashmm-dask stats) with this version"
                )
    _check_contrasts(cfg, covariates)
    return inputs


def _check_loaded_strata(cfg: RunConfig, loaded: StratifiedStats) -> None:
    """Refuse a config whose model (each stratum's, :func:`check_stats_model`) or cell
    selection differs from those the loaded statistics of strata were reduced for (leave
    the keys out to take the statistics')."""
    where = str(cfg.stats.load)
    for stats in loaded.values():
        check_stats_model(cfg, stats, where)
    stored = loaded.attrs().get("cells")
    if cfg.data.cells is not None and str(cfg.data.cells) != str(stored):
        raise ConfigError(
            f"config key 'data.cells' ({str(cfg.data.cells)!r}) differs from the cell "
            f"selection of the statistics in {where} ({stored!r}); leave data.cells out to "
            "take theirs, or compute them with this selection (flashmm-dask stats)"
        )


def _read_strata(cfg: RunConfig, folder: Path) -> StrataInputs:
    """The data (their metadata), the feature selection, and the strata with their
    designs (:func:`flashmm_dask.design.strata.plan_strata`)."""
    if cfg.model.pcs:
        raise InputError(
            "model.pcs cannot be combined with model.by, data.cells, data.drop_missing or "
            "model.min_cells; add the components to obs yourself and name them in "
            "model.fixed"
        )
    source, options = expression_source(cfg, folder)
    expr = _read(cfg, source, options)
    positions = feature_positions(
        cfg.data.features,
        list(expr.features),
        data=source,
        storage_options=options,
        as_read=list(expr.features_as_read),
    )
    fixed, random = _formulas(cfg)
    strata = plan_strata(
        expr.obs,
        fixed,
        random,
        by=cfg.model.by,
        cells=cfg.data.cells,
        drop_missing=cfg.data.drop_missing,
    )
    transform = resolve_transform(False, cfg.model.transform)
    return StrataInputs(None, expr, strata, transform, positions)


def compute_strata_stats(
    cfg: RunConfig, client: Any, folder: Path, inputs: StrataInputs, *, show: bool = False
) -> StratifiedStats:
    """Every stratum's statistics: loaded, cached, or reduced in one pass (and saved);
    ``inputs`` are those of :func:`prepare_strata`."""
    if inputs.stats is not None:
        return inputs.stats
    expr = inputs.expr
    assert expr is not None and inputs.strata is not None
    graph = strata_graph(
        expr,
        inputs.strata,
        transform=inputs.transform,
        target_sum=cfg.model.target_sum,
        split_every=cfg.stats.split_every,
        provenance={"config_hash": cfg.hash(), "source": expr.source},
        chains=_threads(client),
    )
    stats: StratifiedStats = _reduce(client, graph, expr.source, show=show)
    return _kept(cfg, folder, stats, inputs.features, _save_strata)


def _save_strata(stats: StratifiedStats, path: str) -> None:
    if stats.by is None:  # one stratum of selected cells: a plain statistics store
        stats["all"].save(path, overwrite=True)
    else:
        stats.save(path, overwrite=True)


def _threads(client: Any) -> int:
    """The worker threads of a cluster (the running sums of the stratified reduction)."""
    workers = client.scheduler_info().get("workers", {})
    return max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))


def cluster_strata_stats(
    cfg: RunConfig, client: Any, folder: Path, inputs: StrataInputs, *, show: bool = False
) -> ClusterStrata:
    """Every stratum's statistics for a run, their per-feature sums left on the workers
    (:mod:`flashmm_dask.run.strata_cluster`): loaded or cached ones sent there once, or
    reduced there in one pass (and saved from there); ``inputs`` are those of
    :func:`prepare_strata`.

    Raises
    ------
    DataError
        The data hold NaN/Inf, or a chunk of the store cannot be read.
    """
    if inputs.stats is not None:
        return scattered(client, inputs.stats)
    expr = inputs.expr
    assert expr is not None and inputs.strata is not None
    try:
        stats = reduce_on_cluster(
            client,
            expr,
            inputs.strata,
            inputs.features,
            lambda futures: wait(futures, "reduction", show=show),
            transform=inputs.transform,
            target_sum=cfg.model.target_sum,
            split_every=cfg.stats.split_every,
            provenance={"config_hash": cfg.hash(), "source": expr.source},
            chains=_threads(client),
        )
    except Exception as exc:
        error = unreadable(exc, expr.source)
        if error is None:
            raise
        raise error from exc
    if cfg.stats.save:

        def save() -> None:
            with _writing("the summary statistics", folder):
                save_on_cluster(client, stats, folder / STATS)

        return save_in_background(save, stats)
    return stats


def check_strata_fittable(stats: ClusterStrata) -> None:
    """Refuse statistics in which every feature is zero in every stratum: there is nothing
    to fit (a layer of the wrong kind, a selection of no expressed gene). A stratum in
    which the selected features are all zero (a rare cell type that does not express
    them) is only named in a warning: its features are ``all_zero``, not fitted, as any
    all-zero feature, and the other strata are fitted."""
    empty = [level for level, Ynorm in stats.Ynorm.items() if not (np.asarray(Ynorm) > 0).any()]
    if empty and len(empty) == len(stats.Ynorm):
        raise DataError(
            f"all {stats.m} features are zero in every cell of every stratum: nothing to "
            "fit; check the data (data.layer), data.features and data.cells"
        )
    if empty:
        logger.warning(
            "all %d features are zero in every cell of stratum %s: their results there are "
            "NaN (status all_zero)",
            stats.m,
            ", ".join(map(repr, empty)),
        )
