"""The main job: expression store -> summary statistics -> feature blocks on Dask workers
-> one results store -> tables and plots.

1. Statistics: loaded from a saved store (``stats.load``), or reduced from the expression
   data in one Dask pass (:mod:`flashmm_dask.reduce`), or, with no data path, reduced from
   data simulated into the output folder first (the embedded demo).
2. Blocks: the features are cut into blocks of ``fit.block_size`` (chosen from m, p, q
   and the number of workers by default). The shared matrices are scattered to the
   workers once; each block task fits, tests the contrasts and writes its own chunk of
   the results store (:mod:`flashmm_dask.blockfit`).
3. Resume: the store records each finished block. Rerunning the same configuration on the
   same output fits only the missing blocks; a different configuration is refused unless
   ``output.overwrite``. The store is marked complete only after every block, the
   adjusted p-values and the attributes are written.
4. Tables (CSV, Parquet) and plots are written from the finished store.

This is the one module that brings Dask, Zarr and the numerics together.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from flashmm_dask.blockfit import BlockReport, SharedModel, fit_block
from flashmm_dask.cluster import open_client
from flashmm_dask.contrasts import contrast_matrix
from flashmm_dask.errors import InputError, StoreError
from flashmm_dask.fitting import add_pcs, resolve_transform
from flashmm_dask.io.results import (
    ResultsLayout,
    blocks_done,
    create_results,
    finalize_results,
    open_results,
    read_store_attrs,
    write_tables,
)
from flashmm_dask.progress import Timings, wait
from flashmm_dask.stats import SummaryStats

logger = logging.getLogger(__name__)

RESULTS = "results.zarr"
STATS = "stats.zarr"
SIMULATED = "simulated.zarr"
LOCK = "run.lock"
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

    def line(self) -> str:
        """The one-line summary printed at the end of a run."""
        return (
            f"{self.n_features} features in {self.n_blocks} blocks "
            f"({len(self.blocks_fitted)} fitted now): {self.n_converged} converged, "
            f"{self.n_not_converged} not converged, {self.n_zero} all-zero (not fitted); "
            f"results in {self.store}"
        )


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


# -- the output folder ------------------------------------------------------------------


class OutputLock:
    """An exclusive lock file in the output folder, so two runs cannot share an output."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale():
                    holder = self.path.read_text().strip() or "another run"
                    raise StoreError(
                        f"output {str(self.path.parent)!r} is in use by a run ({holder}); "
                        "wait for it to finish, or point output.path elsewhere"
                    ) from None
                logger.warning("removing a stale lock left by a dead run: %s", self.path)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(me + "\n")
            return self
        raise StoreError(f"could not lock output {str(self.path.parent)!r}")

    def _stale(self) -> bool:
        try:
            host, pid = self.path.read_text().split()
        except (OSError, ValueError):
            return False
        if host != socket.gethostname():
            return False
        if int(pid) == os.getpid():
            # a rerun in a container with the same host name and pid (PID 1 of a pod)
            return True
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def _clear_output(folder: Path) -> None:
    for name in (RESULTS, STATS, SIMULATED, "plots", "results.csv", "results.parquet"):
        target = folder / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _check_existing(store: Path, cfg: Any) -> bool:
    """Whether the store exists for this very config; refuse a different one."""
    if not store.exists():
        return False
    attrs = read_store_attrs(str(store))
    if attrs.get("config_hash") == cfg.hash():
        return True
    if cfg.output.overwrite:
        logger.warning("overwriting %s, which holds a run with another config", store.parent)
        _clear_output(store.parent)
        return False
    raise StoreError(
        f"output {str(store.parent)!r} holds a run with a different configuration; "
        "rerun with --overwrite to replace it, or choose another output.path"
    )


# -- statistics -------------------------------------------------------------------------


def _expression_source(cfg: Any, folder: Path, show: bool) -> tuple[Any, dict[str, Any]]:
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


def compute_stats(cfg: Any, client: Any, folder: Path, *, show: bool = False) -> SummaryStats:
    """Summary statistics for a run: loaded, cached from an interrupted run, or reduced."""
    from flashmm_dask.design import build_design
    from flashmm_dask.io.readers import read_expression
    from flashmm_dask.reduce import stats_graph

    if cfg.stats.load is not None:
        logger.info("loading summary statistics from %s", cfg.stats.load)
        return SummaryStats.load(cfg.stats.load)
    cached = folder / STATS
    if cached.exists():
        stats = SummaryStats.load(str(cached))
        if stats.provenance.get("config_hash") == cfg.hash():
            logger.info("reusing the summary statistics of this run in %s", cached)
            return stats
    source, options = _expression_source(cfg, folder, show)
    expr = read_expression(
        source,
        layer=cfg.data.layer,
        orientation=cfg.data.orientation,
        obs=cfg.data.obs,
        chunk_cells=cfg.data.chunk_cells,
        storage_options=options or None,
    )
    if expr.obs is None:
        raise InputError("the data carry no cell metadata; set data.obs to a CSV of cell metadata")
    transform = resolve_transform(False, cfg.model.transform)
    expr, fixed = add_pcs(expr, cfg.model.pcs, transform, cfg.model.fixed)
    design = build_design(expr.obs, fixed, cfg.model.random)
    graph = stats_graph(
        expr,
        design,
        transform=transform,
        target_sum=cfg.model.target_sum,
        split_every=cfg.stats.split_every,
        provenance={"config_hash": cfg.hash(), "source": expr.source},
    )
    future = client.compute(graph)
    wait([future], "reduction", show=show)
    stats = future.result()
    if cfg.data.features:
        stats = stats.subset(list(cfg.data.features))
    if cfg.stats.save:
        stats.save(str(cached), overwrite=True)
    return stats


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
    model = SharedModel(
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
        store_cov=layout.store_cov,
        store=str(store),
    )
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
    wait(futures, "fitting", show=show)
    reports = client.gather(futures)
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
    cfg : RunConfig (see :mod:`flashmm_dask.config`)
    client : distributed.Client, optional
        Use this client instead of opening the cluster the config describes.
    show_progress : bool, optional
        Draw progress bars (default: ``cfg.progress`` and standard error is a terminal).

    Returns
    -------
    RunSummary
    """
    folder = Path(cfg.output.path)
    show = cfg.progress if show_progress is None else show_progress
    timings = Timings()
    started = time.perf_counter()
    with OutputLock(folder):
        store = folder / RESULTS
        resuming = _check_existing(store, cfg)
        if resuming and read_store_attrs(str(store)).get("complete"):
            logger.info("%s is complete for this configuration; writing tables and plots", store)
            reports: list[BlockReport] = []
        else:
            with nullcontext(client) if client is not None else open_client(cfg.cluster) as active:
                with timings.phase("statistics"):
                    stats = compute_stats(cfg, active, folder, show=show)
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
            with timings.phase("finalize"):
                finalize_results(
                    str(store),
                    extra_attrs={"timings": dict(timings), "history": history, **counts},
                )
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
    )
    if summary.n_zero:
        logger.warning("%d features are all zero and were not fitted (NaN)", summary.n_zero)
    if summary.n_not_converged:
        logger.warning(
            "%d features did not converge within max_iter = %s (converged = false)",
            summary.n_not_converged,
            cfg.model.max_iter,
        )
    logger.info("%s", summary.line())
    return summary


def _counts(ds: Any) -> dict[str, int]:
    niter = ds["niter"].values
    converged = ds["converged"].values.astype(bool)
    fitted = ~np.isnan(niter)
    return {
        "n_converged": int(converged.sum()),
        "n_not_converged": int((fitted & ~converged).sum()),
        "n_zero": int((~fitted).sum()),
    }


def _outputs(cfg: Any, store: Path, folder: Path, timings: Timings) -> list[Path]:
    files: list[Path] = []
    ds = open_results(str(store))
    if cfg.output.tables:
        with timings.phase("tables"):
            files += write_tables(ds, folder, formats=tuple(cfg.output.tables))
    if cfg.output.plots:
        from flashmm_dask.plots import make_report

        with timings.phase("plots"):
            files += make_report(ds, folder)
    return files
