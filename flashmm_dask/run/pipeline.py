"""The main job: expression store -> summary statistics -> feature blocks on Dask workers
-> one results store -> tables and plots.

0. Inputs (:func:`prepare_inputs`): the data's metadata, the design, the feature
   selection and the contrasts are read and checked before any cluster starts, so a
   user error is reported at once.
1. Statistics: loaded from a saved store (``stats.load``), or reduced from the expression
   data in one Dask pass (:mod:`flashmm_dask.stats.reduce`), or, with no data path, reduced from
   data simulated into the output folder first (the embedded demo).
2. Blocks: the features are cut into blocks of ``fit.block_size`` (chosen from m, p, q
   and the number of workers by default). The shared matrices are scattered to the
   workers once; each block task fits, tests the contrasts and writes its own chunk of
   the results store (:mod:`flashmm_dask.run.worker`).
3. Resume: the store records each finished block. Rerunning the same configuration on the
   same output fits only the missing blocks; a different configuration is refused unless
   ``output.overwrite``. The store is marked complete only after every block, the
   adjusted p-values and the attributes are written. A write that fails (disk full,
   read-only) raises :class:`StoreError`; the blocks already written are kept for the
   rerun.
4. Tables (CSV, Parquet) and plots are written from the finished store.

This is the one module that brings Dask, Zarr and the numerics together.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from flashmm_dask.api import add_pcs, resolve_transform, with_factor_groupings
from flashmm_dask.design.check import check_design_replication, check_stats_replication
from flashmm_dask.design.contrasts import contrast_matrix
from flashmm_dask.errors import DataError, FlashmmError, InputError, StoreError
from flashmm_dask.io.outputs import refuse_foreign, register, removed_if_unused
from flashmm_dask.io.results import (
    STATUS,
    ResultsLayout,
    blocks_done,
    create_results,
    finalize_results,
    open_results,
    read_store_attrs,
)
from flashmm_dask.run.cluster import open_client
from flashmm_dask.run.config import require_model
from flashmm_dask.run.output import (
    RESULTS,
    SIMULATED,
    STATS,
    OutputLock,
    _check_existing,
    _is_write_failure,
    _outputs,
    _write_error,
    _writing,
    run_outputs,
)
from flashmm_dask.run.progress import Timings, wait
from flashmm_dask.run.stored_model import check_stats_model
from flashmm_dask.run.worker import BlockReport, SharedModel, fit_block
from flashmm_dask.stats.summary import SummaryStats

logger = logging.getLogger(__name__)

VERSIONED = ("flashmm-dask", "numpy", "scipy", "dask", "distributed", "zarr", "anndata")


@dataclass(frozen=True)
class RunSummary:
    """What a run did.

    Attributes
    ----------
    output : the output folder;  store : the results store inside it
    n_features, n_blocks : the size of the job
    blocks_fitted : blocks fitted by this invocation (a resumed run skips the others)
    n_converged, n_not_converged, n_zero : over all features of the store
    timings : seconds per phase;  files : tables and plots written
    status_counts : features per status code (ok, not_converged, all_zero, constant,
        non_finite, boundary, negative_variance; see :data:`flashmm_dask.model.status.STATUS`)
    """

    output: Path
    store: Path
    n_features: int
    n_blocks: int
    blocks_fitted: tuple[int, ...]
    n_converged: int
    n_not_converged: int
    n_zero: int
    timings: dict[str, float]
    files: tuple[Path, ...] = field(default=())
    status_counts: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        """The one-line summary printed at the end of a run."""
        if self.status_counts:
            counts = ", ".join(
                f"{self.status_counts.get(name, 0)} {_STATUS_LABELS[name]}" for name in STATUS
            )
        else:  # a store written before the status codes
            counts = (
                f"{self.n_converged} converged, {self.n_not_converged} not converged, "
                f"{self.n_zero} all-zero (not fitted)"
            )
        return (
            f"{self.n_features} features in {self.n_blocks} blocks "
            f"({len(self.blocks_fitted)} fitted now): {counts}; results in {self.store}"
        )


_STATUS_LABELS = {
    "ok": "ok",
    "not_converged": "not converged",
    "all_zero": "all-zero (not fitted)",
    "constant": "constant (no residual variation)",
    "non_finite": "with non-finite results",
    "boundary": "with a variance component at zero",
    "negative_variance": "with a negative variance component",
    "filtered": "filtered (too few non-zero cells)",
}
_STATUS_ADVICE = {
    "not_converged": "converged = false; raise model.max_iter, or check their scale",
    "all_zero": "not fitted, their results are NaN",
    "constant": "the fixed effects explain them exactly: no test is possible",
    "non_finite": "some of their results are NaN or infinite",
    "filtered": "not fitted: non-zero in fewer cells than model.min_cells",
    "negative_variance": (
        "unconstrained fit (model.nonnegative: false); their standard errors of effects "
        "between subjects are too small: use model.nonnegative: true"
    ),
}


def versions() -> dict[str, str]:
    """Versions of the package and the dependencies that shape its numbers."""
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def auto_block_size(m: int, p: int, q: int, K: int, n_workers: int) -> int:
    """Features per block: a few blocks per worker, each within ~256 MiB of work arrays."""
    per_feature = 8 * (3 * p * p + 6 * q + (6 * q * q if K > 1 else 0))
    memory_cap = max(16, (256 << 20) // per_feature)
    balance = math.ceil(m / (4 * max(1, n_workers)))
    return int(max(16, min(balance, memory_cap, 8192)))


# -- statistics -------------------------------------------------------------------------


def _expression_source(cfg: Any, folder: Path) -> tuple[Any, dict[str, Any]]:
    """The data path to read (simulating it first when the config has none)."""
    if cfg.data.path is not None:
        return cfg.data.path, dict(cfg.data.storage_options or {})
    from flashmm_dask.simulate import simulate_to_store

    target = folder / SIMULATED
    if not target.exists():
        sim = cfg.simulate
        logger.info("simulating %d cells x %d genes into %s", sim.n_cells, sim.n_genes, target)
        simulate_to_store(
            target,
            sim.n_genes,
            sim.n_cells,
            n_samples=sim.n_samples,
            n_celltypes=sim.n_celltypes,
            n_treatments=sim.n_treatments,
            n_de_genes=sim.n_de_genes,
            minbeta=sim.minbeta,
            maxbeta=sim.maxbeta,
            var_randomeffects=sim.var_randomeffects,
            seed=sim.seed,
            store_chunk_cells=sim.chunk_cells,
        )
    return str(target), {}


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
    """

    stats: SummaryStats | None
    expr: Any = None
    design: Any = None
    transform: str = "none"
    covariates: tuple[str, ...] = ()


def prepare_inputs(cfg: Any, folder: Path) -> Inputs:
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
    from flashmm_dask.design.formula import build_design
    from flashmm_dask.io.readers import read_expression
    from flashmm_dask.io.soma import read_for_run

    inputs: Inputs | None = None
    if cfg.stats.load is None:
        require_model(cfg)
    if cfg.stats.load is not None:
        logger.info("loading summary statistics from %s", cfg.stats.load)
        inputs = Inputs(SummaryStats.load(cfg.stats.load))
        check_stats_model(cfg, inputs.stats, cfg.stats.load)
    elif (folder / STATS).exists():
        try:
            cached: SummaryStats | None = SummaryStats.load(str(folder / STATS))
        except StoreError as exc:  # e.g. its write was interrupted: compute them again
            logger.warning("ignoring the saved statistics in %s: %s", folder / STATS, exc)
            cached = None
        if cached is not None and cached.provenance.get("config_hash") == cfg.hash():
            logger.info("reusing the summary statistics of this run in %s", folder / STATS)
            inputs = Inputs(cached)
    if inputs is None:
        source, options = _expression_source(cfg, folder)
        # a TileDB-SOMA experiment is read with the config's filters pushed down
        soma = read_for_run(cfg, source, options)
        expr = soma or read_expression(
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
        if expr.n_cells < 2:
            raise DataError(
                f"the data have {expr.n_cells} cell(s); a mixed model needs many cells (more "
                "than its fixed-effect coefficients, over 2 or more random-effect levels)"
            )
        _check_features(cfg.data.features, expr.features, cfg.data.path, options)
        expr = with_factor_groupings(expr, cfg.model.fixed, cfg.model.random)
        design = build_design(expr.obs, cfg.model.fixed, cfg.model.random)
        pcs = tuple(f"PC{i + 1}" for i in range(cfg.model.pcs))
        inputs = Inputs(
            None,
            expr,
            design,
            resolve_transform(False, cfg.model.transform),
            (*design.covariates, *pcs),
        )
    else:
        assert inputs.stats is not None
        inputs = Inputs(inputs.stats, covariates=tuple(inputs.stats.covariates))
    if cfg.contrasts:
        contrast_matrix(dict(cfg.contrasts), list(inputs.covariates))
    if inputs.stats is not None:  # random components the fixed effects absorb: refused
        check_stats_replication(inputs.stats)
    else:
        check_design_replication(inputs.design, inputs.expr.obs)
    return inputs


def _check_features(selected: Any, available: Any, data: Any = None, options: Any = None) -> None:
    """Check data.features (names, repeated names, or a var column) before the run."""
    from flashmm_dask.run.features import feature_positions

    feature_positions(selected, list(available), data=data, storage_options=options)


def compute_stats(
    cfg: Any,
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
    from flashmm_dask.design.formula import build_design
    from flashmm_dask.stats.reduce import stats_graph, unreadable

    if inputs is None:
        inputs = prepare_inputs(cfg, folder)
    if inputs.stats is not None:
        return inputs.stats
    expr, design = inputs.expr, inputs.design
    if cfg.model.pcs:
        expr, fixed = add_pcs(expr, cfg.model.pcs, inputs.transform, cfg.model.fixed)
        design = build_design(expr.obs, fixed, cfg.model.random)
    graph = stats_graph(
        expr,
        design,
        transform=inputs.transform,
        target_sum=cfg.model.target_sum,
        split_every=cfg.stats.split_every,
        provenance={"config_hash": cfg.hash(), "source": expr.source},
    )
    future = client.compute(graph)
    try:
        wait([future], "reduction", show=show)
        stats = future.result()
    except Exception as exc:
        error = unreadable(exc, expr.source)
        if error is None:
            raise
        raise error from exc
    if cfg.data.features:
        from flashmm_dask.run.features import feature_positions

        positions = feature_positions(
            cfg.data.features,
            list(stats.features),
            data=cfg.data.path,
            storage_options=cfg.data.storage_options,
        )
        stats = stats.subset(positions)
    if cfg.stats.save:
        with _writing("the summary statistics", folder):
            stats.save(str(folder / STATS), overwrite=True)
    return stats


def check_fittable(stats: SummaryStats) -> None:
    """Refuse statistics in which every feature is zero: there is nothing to fit."""
    if not (np.asarray(stats.Ynorm) > 0).any():
        raise DataError(
            f"all {stats.m} features are zero in every cell: nothing to fit; check the "
            "data (data.layer: raw counts may be in a layer) and data.features"
        )


# -- the run ----------------------------------------------------------------------------


def _layout(cfg: Any, stats: SummaryStats, contrasts: tuple[str, ...], n_workers: int):
    size = cfg.fit.block_size
    if size == "auto":
        size = auto_block_size(stats.m, stats.p, stats.q, len(stats.d), n_workers)
    return ResultsLayout(
        features=tuple(stats.features),
        covariates=tuple(stats.covariates),
        components=(*stats.components, "residual"),
        contrasts=contrasts,
        block_size=int(size),
        store_cov=bool(cfg.fit.store_cov),
    )


def _store_attrs(cfg: Any, stats: SummaryStats, layout: ResultsLayout) -> dict[str, Any]:
    return {
        "method": cfg.model.method,
        "fixed": stats.provenance.get("fixed", cfg.model.fixed),
        "random": list(stats.provenance.get("random", np.atleast_1d(cfg.model.random))),
        "n_cells": int(stats.n),
        "epsilon": float(cfg.model.epsilon),
        "alternative": cfg.test.alternative,
        "config": cfg.to_dict(),
        "config_hash": cfg.hash(),
        "versions": versions(),
        "block_size": layout.block_size,
        "n_blocks": layout.n_blocks,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def shared_model(
    cfg: Any, stats: SummaryStats, L: Any, *, store: str, store_cov: bool
) -> SharedModel:
    """What every block task of ``stats`` shares: the statistics' shared part and the
    config's fit settings (the one place that maps the model config onto the workers)."""
    return SharedModel(
        XX=np.asarray(stats.XX),
        ZX=np.asarray(stats.ZX),
        ZZ=np.asarray(stats.ZZ),
        n=int(stats.n),
        d=tuple(stats.d),
        method=cfg.model.method,
        max_iter=int(cfg.model.max_iter),
        epsilon=float(cfg.model.epsilon),
        L=np.zeros((stats.p, 0)) if L is None else L.to_numpy(),
        alternative=cfg.test.alternative,
        store_cov=store_cov,
        store=store,
        df=cfg.model.df,
        nonnegative=cfg.model.nonnegative,
        boundary_df=cfg.model.boundary_df,
    )


def fit_store(
    cfg: Any, client: Any, stats: SummaryStats, folder: Path, *, show: bool = False
) -> tuple[Path, list[BlockReport], ResultsLayout]:
    """Fit every block not yet in the results store; return the reports of this run."""
    store = folder / RESULTS
    L = contrast_matrix(dict(cfg.contrasts), stats.covariates) if cfg.contrasts else None
    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    layout = _layout(cfg, stats, tuple(L.columns) if L is not None else (), n_workers)
    if not store.exists():
        create_results(str(store), layout, _store_attrs(cfg, stats, layout))
    else:
        attrs = read_store_attrs(str(store))
        layout = _layout_from_attrs(layout, attrs)
    done = blocks_done(str(store))
    todo = [b for b in range(layout.n_blocks) if not done[b]]
    logger.info(
        "%d features in %d blocks of %d; %d already done, %d to fit",
        stats.m,
        layout.n_blocks,
        layout.block_size,
        layout.n_blocks - len(todo),
        len(todo),
    )
    model = shared_model(cfg, stats, L, store=str(store), store_cov=layout.store_cov)
    shared = client.scatter(model, broadcast=True, hash=False)
    XY, ZY, Ynorm = np.asarray(stats.XY), np.asarray(stats.ZY), np.asarray(stats.Ynorm)
    token = cfg.hash()[:12]
    futures = []
    for b in todo:
        sl = layout.block_slice(b)
        futures.append(
            client.submit(
                fit_block,
                shared,
                b,
                XY[:, sl],
                ZY[:, sl],
                Ynorm[sl],
                key=f"flashmm-fit-{token}-{b}",
                retries=1,
            )
        )
    try:
        wait(futures, "fitting", show=show)
        reports = client.gather(futures)
    except FlashmmError:
        raise
    except OSError as exc:
        if not _is_write_failure(exc):
            raise
        written = int(blocks_done(str(store)).sum())
        logger.error("%d of %d blocks are written in %s", written, layout.n_blocks, store)
        raise _write_error("the results store", folder, exc) from exc
    return store, list(reports), layout


def _layout_from_attrs(layout: ResultsLayout, attrs: dict[str, Any]) -> ResultsLayout:
    """Resume with the block size the store was created with."""
    size = int(attrs.get("block_size", layout.block_size))
    if size == layout.block_size:
        return layout
    return ResultsLayout(
        features=layout.features,
        covariates=layout.covariates,
        components=layout.components,
        contrasts=layout.contrasts,
        block_size=size,
        store_cov=layout.store_cov,
    )


def run(cfg: Any, *, client: Any = None, show_progress: bool | None = None) -> RunSummary:
    """Run a configuration end to end.

    Parameters
    ----------
    cfg : RunConfig (see :mod:`flashmm_dask.run.config`)
    client : distributed.Client, optional
        Use this client instead of opening the cluster the config describes.
    show_progress : bool, optional
        Draw progress bars (default: ``cfg.progress`` and standard error is a terminal).

    Returns
    -------
    RunSummary
    """
    from flashmm_dask.run.pipeline_strata import run_strata, uses_strata

    if uses_strata(cfg):  # model.by, data.cells, data.drop_missing or model.min_cells
        return run_strata(cfg, client=client, show_progress=show_progress)
    folder = Path(cfg.output.path)
    show = cfg.progress if show_progress is None else show_progress
    timings = Timings()
    started = time.perf_counter()
    with removed_if_unused(folder), OutputLock(folder):
        store = folder / RESULTS
        refuse_foreign(folder, run_outputs(cfg), overwrite=cfg.output.overwrite)
        resuming = _check_existing(store, cfg)
        register(folder, run_outputs(cfg))
        if resuming and read_store_attrs(str(store)).get("complete"):
            logger.info("%s is complete for this configuration; writing tables and plots", store)
            reports: list[BlockReport] = []
        else:
            inputs = prepare_inputs(cfg, folder)
            with nullcontext(client) if client is not None else open_client(cfg.cluster) as active:
                with timings.phase("statistics"):
                    stats = compute_stats(cfg, active, folder, show=show, inputs=inputs)
                check_fittable(stats)
                with timings.phase("fitting"):
                    store, reports, _ = fit_store(cfg, active, stats, folder, show=show)
            ds = open_results(str(store), allow_incomplete=True)
            counts = _counts(ds)
            history = list(read_store_attrs(str(store)).get("history", []))
            history.append(
                {
                    "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                    "blocks_fitted": sorted(r.block for r in reports),
                    "seconds": round(time.perf_counter() - started, 3),
                }
            )
            with timings.phase("finalize"), _writing("the results store", folder):
                finalize_results(
                    str(store),
                    extra_attrs={"timings": dict(timings), "history": history, **counts},
                    method=cfg.test.p_adjust,
                )
        with _writing("the tables and plots", folder):
            files = _outputs(cfg, store, folder, timings)
    ds = open_results(str(store))
    counts = _counts(ds)
    summary = RunSummary(
        output=folder,
        store=store,
        n_features=int(ds.sizes["feature"]),
        n_blocks=int(ds.attrs["n_blocks"]),
        blocks_fitted=tuple(sorted(r.block for r in reports)),
        n_converged=counts["n_converged"],
        n_not_converged=counts["n_not_converged"],
        n_zero=counts["n_zero"],
        timings=dict(timings),
        files=tuple(files),
        status_counts=dict(counts.get("status_counts", {})),
    )
    for name, advice in _STATUS_ADVICE.items():
        if summary.status_counts.get(name):
            logger.warning(
                "%d features %s: %s (results column status = %s)",
                summary.status_counts[name],
                _STATUS_LABELS[name].replace("with ", "have "),
                advice,
                name,
            )
    from flashmm_dask.report.summary import log_top_genes

    log_top_genes(store)
    return summary  # the command line prints summary.line() once


def _counts(ds: Any) -> dict[str, Any]:
    niter = ds["niter"].values
    converged = ds["converged"].values.astype(bool)
    fitted = ~np.isnan(niter)
    counts: dict[str, Any] = {
        "n_converged": int(converged.sum()),
        "n_not_converged": int((fitted & ~converged).sum()),
        "n_zero": int((~fitted).sum()),
    }
    if "status" in ds:
        codes = np.asarray(ds["status"].values)
        counts["status_counts"] = {name: int((codes == k).sum()) for k, name in enumerate(STATUS)}
    return counts
