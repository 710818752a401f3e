"""The main job with strata, a cell selection or a gene filter.

Used by :func:`flashmm_dask.run.pipeline.run` when the config sets ``model.by``,
``data.cells``, ``data.drop_missing`` or ``model.min_cells`` (or loads the statistics of
strata). The steps are those of the plain run, per stratum:

0. Inputs: the cell selection and the strata are planned from obs and each stratum's
   design built (:func:`flashmm_dask.design.strata.plan_strata`) before any cluster starts; a
   stratum that cannot be fitted is reported and skipped; a contrast must apply to at
   least one stratum.
1. Statistics: every stratum's, with per-feature non-zero counts, in one pass
   (:mod:`flashmm_dask.stats.reduce_strata`), saved in ``OUTPUT/stats.zarr`` (a group per
   stratum, :mod:`flashmm_dask.stats.strata`); or loaded from ``stats.load``.
2. Fitting: the feature blocks of all strata are submitted together; each stratum has
   its own results group (``results.zarr/strata/<name>``; with no ``by``, the results
   store itself) and its own contrasts, those whose coefficients it has (the others are
   logged and listed in its attributes). Features non-zero in fewer than
   ``model.min_cells`` of a stratum's cells are not fitted there (status ``filtered``).
3. Resume: each stratum's group records its finished blocks; a rerun fits only the
   missing ones, stratum by stratum. The root is marked complete after every stratum.
4. Tables with a ``stratum`` column; plots per stratum and contrast.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from flashmm_dask.api import resolve_transform
from flashmm_dask.design.contrasts import contrast_matrix
from flashmm_dask.errors import DataError, InputError, StoreError
from flashmm_dask.io.outputs import refuse_foreign, register, removed_if_unused
from flashmm_dask.io.results import (
    open_results,
    read_store_attrs,
)
from flashmm_dask.io.strata_results import (
    applicable_contrasts,
    strata_report,
    write_strata_tables,
)
from flashmm_dask.report.summary import log_top_genes, report_outputs
from flashmm_dask.run.cluster import open_client
from flashmm_dask.run.features import feature_positions
from flashmm_dask.run.output import (
    RESULTS,
    STATS,
    OutputLock,
    _check_existing,
    _outputs,
    _writing,
    run_outputs,
)
from flashmm_dask.run.pipeline import RunSummary, _counts, _expression_source
from flashmm_dask.run.progress import Timings, wait
from flashmm_dask.run.strata_store import _finalize, fit_strata_stores
from flashmm_dask.run.worker import BlockReport
from flashmm_dask.stats.strata import StratifiedStats, load_stats
from flashmm_dask.stats.summary import SummaryStats

__all__ = ["StrataRunSummary", "compute_strata_stats", "run_strata", "uses_strata"]

logger = logging.getLogger(__name__)


def _loads_strata(cfg: Any) -> bool:
    from flashmm_dask.io.strata_results import strata_attrs

    return cfg.stats.load is not None and strata_attrs(cfg.stats.load) is not None


def uses_strata(cfg: Any) -> bool:
    """Whether a config needs the stratified run (strata, a selection or a gene filter)."""
    return bool(
        cfg.model.by is not None
        or cfg.data.cells is not None
        or cfg.data.drop_missing
        or cfg.model.min_cells
        or _loads_strata(cfg)
    )


@dataclass(frozen=True)
class StrataRunSummary(RunSummary):
    """A :class:`RunSummary` of a stratified run; counts are summed over the strata.

    Attributes (besides RunSummary's)
    ---------------------------------
    by : the obs column;  strata : the fitted levels;  skipped : level -> reason
    """

    by: str | None = None
    strata: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        from flashmm_dask.io.results import STATUS
        from flashmm_dask.run.pipeline import _STATUS_LABELS

        counts = ", ".join(
            f"{self.status_counts.get(name, 0)} {_STATUS_LABELS[name]}" for name in STATUS
        )
        skipped = (
            f", {len(self.skipped)} skipped ({', '.join(self.skipped)})" if self.skipped else ""
        )
        return (
            f"{len(self.strata)} strata of {self.by}{skipped}: {self.n_features} features in "
            f"{self.n_blocks} blocks ({len(self.blocks_fitted)} fitted now); over all strata "
            f"{counts}; results in {self.store}"
        )


# -- inputs and statistics --------------------------------------------------------------


@dataclass(frozen=True)
class StrataInputs:
    """The checked inputs: the statistics (loaded or cached), or what reduces them."""

    stats: StratifiedStats | None
    expr: Any = None
    strata: Any = None
    transform: str = "none"
    features: np.ndarray | None = None


def _as_strata(stats: SummaryStats | StratifiedStats) -> StratifiedStats:
    if isinstance(stats, StratifiedStats):
        return stats
    return StratifiedStats({"all": stats}, None, {"all": "all"}, {})


def _check_contrasts(cfg: Any, covariates: Mapping[str, tuple[str, ...]]) -> None:
    """Each contrast must apply to at least one stratum."""
    for name, expr in dict(cfg.contrasts).items():
        errors = [applicable_contrasts({name: expr}, c)[1] for c in covariates.values()]
        if all(errors):
            if len(covariates) == 1:
                contrast_matrix({name: expr}, list(next(iter(covariates.values()))))
            raise InputError(
                f"contrast {name!r} applies to no stratum: {next(iter(errors[0].values()))}"
            )


def prepare_strata(cfg: Any, folder: Path) -> StrataInputs:
    """Read and check the inputs (the strata, the selection, the features, the contrasts)
    before any cluster starts.

    Raises
    ------
    DataError, DesignError, ContrastError, InputError, StoreError
    """
    from flashmm_dask.design.strata import plan_strata
    from flashmm_dask.io.readers import read_expression

    inputs: StrataInputs | None = None
    if cfg.stats.load is not None:
        logger.info("loading summary statistics from %s", cfg.stats.load)
        loaded = _as_strata(load_stats(cfg.stats.load))
        if cfg.model.by is not None and loaded.by != cfg.model.by:
            raise InputError(
                f"model.by is {cfg.model.by!r} but the statistics in {cfg.stats.load} are "
                f"{'of strata of ' + repr(loaded.by) if loaded.by else 'not stratified'}; "
                "compute them with this model.by (flashmm-dask stats)"
            )
        inputs = StrataInputs(loaded)
    elif (folder / STATS).exists():
        try:
            cached: StratifiedStats | None = _as_strata(load_stats(str(folder / STATS)))
        except StoreError as exc:
            logger.warning("ignoring the saved statistics in %s: %s", folder / STATS, exc)
            cached = None
        if cached is not None and cached.provenance.get("config_hash") == cfg.hash():
            logger.info("reusing the summary statistics of this run in %s", folder / STATS)
            inputs = StrataInputs(cached)
    if inputs is None:
        if cfg.model.pcs:
            raise InputError(
                "model.pcs cannot be combined with model.by, data.cells, data.drop_missing or "
                "model.min_cells; add the components to obs yourself and name them in "
                "model.fixed"
            )
        source, options = _expression_source(cfg, folder)
        expr = read_expression(
            source,
            layer=cfg.data.layer,
            orientation=cfg.data.orientation,
            obs=cfg.data.obs,
            chunk_cells=cfg.data.chunk_cells,
            storage_options=options or None,
        )
        if expr.obs is None:
            raise InputError(
                "the data carry no cell metadata; set data.obs to a CSV of cell metadata"
            )
        positions = feature_positions(
            cfg.data.features, list(expr.features), data=source, storage_options=options
        )
        strata = plan_strata(
            expr.obs,
            cfg.model.fixed,
            cfg.model.random,
            by=cfg.model.by,
            cells=cfg.data.cells,
            drop_missing=cfg.data.drop_missing,
        )
        inputs = StrataInputs(
            None, expr, strata, resolve_transform(False, cfg.model.transform), positions
        )
        covariates = dict(zip(strata.levels, (d.covariates for d in strata.designs), strict=True))
    else:
        assert inputs.stats is not None
        covariates = {k: v.covariates for k, v in inputs.stats.items()}
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


def compute_strata_stats(
    cfg: Any, client: Any, folder: Path, *, show: bool = False, inputs: StrataInputs | None = None
) -> StratifiedStats:
    """Every stratum's statistics: loaded, cached, or reduced in one pass (and saved)."""
    from flashmm_dask.stats.reduce import unreadable
    from flashmm_dask.stats.reduce_strata import strata_graph

    if inputs is None:
        inputs = prepare_strata(cfg, folder)
    if inputs.stats is not None:
        return inputs.stats
    expr = inputs.expr
    graph = strata_graph(
        expr,
        inputs.strata,
        transform=inputs.transform,
        target_sum=cfg.model.target_sum,
        split_every=cfg.stats.split_every,
        provenance={"config_hash": cfg.hash(), "source": expr.source},
        chains=_threads(client),
    )
    future = client.compute(graph)
    try:
        wait([future], "reduction", show=show)
        stats: StratifiedStats = future.result()
    except Exception as exc:
        error = unreadable(exc, expr.source)
        if error is None:
            raise
        raise error from exc
    if inputs.features is not None:
        stats = stats.subset(inputs.features)
    if cfg.stats.save:
        with _writing("the summary statistics", folder):
            if stats.by is None:
                stats["all"].save(str(folder / STATS), overwrite=True)
            else:
                stats.save(folder / STATS, overwrite=True)
    return stats


def _threads(client: Any) -> int:
    """The worker threads of a cluster (the running sums of the stratified reduction)."""
    workers = client.scheduler_info().get("workers", {})
    return max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))


# -- the run ----------------------------------------------------------------------------


def run_strata(cfg: Any, *, client: Any = None, show_progress: bool | None = None) -> RunSummary:
    """Run a configuration with strata, a cell selection or a gene filter end to end
    (see the module docstring); arguments as :func:`flashmm_dask.run.pipeline.run`."""
    from flashmm_dask.io.strata_results import strata_attrs

    folder = Path(cfg.output.path)
    show = cfg.progress if show_progress is None else show_progress
    timings = Timings()
    started = time.perf_counter()
    with removed_if_unused(folder), OutputLock(folder):
        store = folder / RESULTS
        refuse_foreign(folder, run_outputs(cfg), overwrite=cfg.output.overwrite)
        resuming = _check_existing(store, cfg)
        if not resuming and cfg.output.overwrite and (folder / "strata").is_dir():
            shutil.rmtree(folder / "strata")  # the per-stratum plots of an earlier run
        register(folder, run_outputs(cfg))
        reports: list[BlockReport] = []
        if not (resuming and read_store_attrs(str(store)).get("complete")):
            inputs = prepare_strata(cfg, folder)
            with nullcontext(client) if client is not None else open_client(cfg.cluster) as active:
                with timings.phase("statistics"):
                    stats = compute_strata_stats(cfg, active, folder, show=show, inputs=inputs)
                _check_fittable(stats)
                with timings.phase("fitting"):
                    groups, reports = fit_strata_stores(cfg, active, stats, folder, show=show)
            history = list(read_store_attrs(str(store)).get("history", []))
            history.append(
                {
                    "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                    "blocks_fitted": len(reports),
                    "seconds": round(time.perf_counter() - started, 3),
                }
            )
            with timings.phase("finalize"), _writing("the results store", folder):
                _finalize(cfg, store, groups, stats, {"timings": dict(timings), "history": history})
        strata = strata_attrs(store)
        with _writing("the tables and plots", folder):
            if strata is None:
                files = _outputs(cfg, store, folder, timings)
            else:
                files = []
                if cfg.output.tables:
                    with timings.phase("tables"):
                        files += write_strata_tables(store, folder, tuple(cfg.output.tables))
                if cfg.output.plots:
                    with timings.phase("plots"):
                        files += strata_report(store, folder)
                with timings.phase("report"):
                    files += report_outputs(store, folder, tables=bool(cfg.output.tables))
                register(folder, files)
    log_top_genes(store)
    return _summary(cfg, store, folder, reports, timings, files, strata)


def _check_fittable(stats: StratifiedStats) -> None:
    for level, s in stats.items():
        if not (np.asarray(s.Ynorm) > 0).any():
            raise DataError(
                f"all {s.m} features are zero in every cell of stratum {level!r}: nothing to "
                "fit; check the data (data.layer), data.features and data.cells"
            )


def _summary(
    cfg: Any,
    store: Path,
    folder: Path,
    reports: list[BlockReport],
    timings: Timings,
    files: list[Path],
    strata: dict[str, Any] | None,
) -> RunSummary:
    from flashmm_dask.run.pipeline import _STATUS_ADVICE, _STATUS_LABELS

    if strata is None:
        ds = open_results(str(store))
        counts = _counts(ds)
        n_features, n_blocks = int(ds.sizes["feature"]), int(ds.attrs["n_blocks"])
        status_counts = dict(counts.get("status_counts", {}))
    else:
        attrs = read_store_attrs(str(store))
        status_counts = dict(attrs.get("status_counts", {}))
        n_blocks = sum(
            int(read_store_attrs(str(store / path))["n_blocks"])
            for path in strata["groups"].values()
        )
        first = next(iter(strata["groups"].values()))
        n_features = int(open_results(str(store / first)).sizes["feature"])
        for level, reason in strata.get("skipped", {}).items():
            logger.warning("stratum %s=%s was not fitted: %s", strata["by"], level, reason)
        for level, names in strata.get("missing_contrasts", {}).items():
            logger.warning(
                "stratum %s has no test of %s (its coefficients are absent)", level, names
            )
    fitted = tuple(range(len(reports)))
    common: dict[str, Any] = {
        "output": folder,
        "store": store,
        "n_features": n_features,
        "n_blocks": n_blocks,
        "blocks_fitted": fitted,
        "n_converged": int(status_counts.get("ok", 0)),
        "n_not_converged": int(status_counts.get("not_converged", 0)),
        "n_zero": int(status_counts.get("all_zero", 0)),
        "timings": dict(timings),
        "files": tuple(files),
        "status_counts": status_counts,
    }
    summary: RunSummary
    if strata is None:
        summary = RunSummary(**common)
    else:
        summary = StrataRunSummary(
            **common,
            by=strata["by"],
            strata=tuple(strata["levels"]),
            skipped=dict(strata.get("skipped", {})),
        )
    for name, advice in _STATUS_ADVICE.items():
        if status_counts.get(name):
            logger.warning(
                "%d features %s: %s (results column status = %s)",
                status_counts[name],
                _STATUS_LABELS[name].replace("with ", "have "),
                advice,
                name,
            )
    return summary  # the command line prints summary.line() once
