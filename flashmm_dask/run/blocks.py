"""Step 2 of a run, plain or stratified: the feature blocks of a results store.

The features are cut into blocks of ``fit.block_size`` (chosen from m, p, q and the
number of workers by default). What every block of a store shares (:func:`shared_model`)
is scattered to the workers once; each block task fits, tests the contrasts and writes its
own chunk of the store (:mod:`flashmm_dask.run.worker`). The store records each finished
block, so a rerun submits only the missing ones, with the block size the store was
created with.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flashmm_dask.design.contrasts import contrast_matrix
from flashmm_dask.errors import FlashmmError
from flashmm_dask.io.results import (
    ResultsLayout,
    blocks_done,
    create_results,
    read_store_attrs,
)
from flashmm_dask.io.writing import package_versions
from flashmm_dask.numerics.fisher import SharedTerms
from flashmm_dask.run.config import RunConfig
from flashmm_dask.run.output import RESULTS, _is_write_failure, _write_error
from flashmm_dask.run.progress import wait
from flashmm_dask.run.worker import BlockReport, SharedModel, fit_block
from flashmm_dask.stats.summary import SummaryStats

logger = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    """Versions of the package and the dependencies that shape its numbers."""
    return package_versions(missing="not installed")


#: The most features in one block of ``fit.block_size: auto``: a whole stratum of a typical
#: atlas (~12,000 genes), so that the stratum's block task runs where its statistics lie
#: and writes its results once (29 strata x 2 blocks cost 1.2-1.4x the worker time of 29
#: x 1 on the 1M-cell atlas).
MAX_AUTO_BLOCK = 16_384


def auto_block_size(
    m: int, p: int, q: int, K: int, n_workers: int, work_values: int | None = None
) -> int:
    """Features per block: a few blocks per worker, each within ~256 MiB of work arrays
    and at most :data:`MAX_AUTO_BLOCK`.

    ``work_values``: the fit's work arrays per feature where the shared terms are known
    (:attr:`~flashmm_dask.numerics.fisher.SharedTerms.work_values`: O(q) on the structured
    path); else those of the dense path, O(q^2) for K > 1."""
    if work_values is None:
        work_values = q * q if K > 1 else 0
    per_feature = 8 * (3 * p * p + 6 * q + 6 * work_values)
    memory_cap = max(16, (256 << 20) // per_feature)
    balance = math.ceil(m / (4 * max(1, n_workers)))
    return int(max(16, min(balance, memory_cap, MAX_AUTO_BLOCK)))


def block_work(terms: SharedTerms) -> int | None:
    """The work values per feature that :func:`auto_block_size` sizes blocks by, for the
    path ``terms`` fit on: None for K = 1 (the spectral path keeps no q x q array per
    feature), else the terms' own (O(q) on the structured path, q^2 on the dense one)."""
    return terms.work_values if terms.K > 1 else None


def n_workers(client: Any) -> int:
    """The workers of the cluster (at least 1)."""
    return max(1, len(client.scheduler_info().get("workers", {})))


def contrasts_of(contrasts: dict[str, str], stats: SummaryStats) -> pd.DataFrame | None:
    """The contrast matrix L (p x contrasts) of ``contrasts`` on ``stats``, or None."""
    return contrast_matrix(contrasts, list(stats.covariates)) if contrasts else None


def block_layout(
    cfg: RunConfig,
    stats: SummaryStats,
    L: pd.DataFrame | None,
    workers: int,
    *,
    m_total: int | None = None,
    features: tuple[str, ...] | None = None,
    work_values: int | None = None,
) -> ResultsLayout:
    """The names and blocks of the results store of ``stats``.

    ``features``: the features fitted, when ``stats`` holds only the shared statistics
    (default ``stats.features``). With ``fit.block_size: auto`` the size is chosen for
    ``m_total`` features (all strata together; default the features') and capped at
    the features'.
    """
    names = tuple(stats.features) if features is None else tuple(features)
    size = cfg.fit.block_size
    if size == "auto":
        # with strata: a few blocks per worker over all strata together, not per stratum
        m = len(names) if m_total is None else m_total
        size = auto_block_size(m, stats.p, stats.q, len(stats.d), workers, work_values)
        if m_total is not None:
            size = min(size, len(names))
    return ResultsLayout(
        features=names,
        covariates=tuple(stats.covariates),
        components=(*stats.components, "residual"),
        contrasts=tuple(L.columns) if L is not None else (),
        block_size=int(size),
        store_cov=bool(cfg.fit.store_cov),
    )


def store_attrs(cfg: RunConfig, stats: SummaryStats, layout: ResultsLayout) -> dict[str, Any]:
    """The attributes a results store is created with."""
    return {
        "method": cfg.model.method,
        "fixed": stats.provenance.get("fixed", cfg.model.fixed),
        "random": list(stats.provenance.get("random", _as_list(cfg.model.random))),
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


def _as_list(random: str | tuple[str, ...] | None) -> list[Any]:
    """The random formulas as a list (one formula: a list of one)."""
    return list(np.atleast_1d(np.asarray(random, dtype=object)))


def resumed(layout: ResultsLayout, path: Path) -> tuple[ResultsLayout, list[int]]:
    """The layout of the existing store at ``path`` (its block size) and its blocks still
    to fit."""
    size = int(read_store_attrs(str(path)).get("block_size", layout.block_size))
    if size != layout.block_size:
        layout = dataclasses.replace(layout, block_size=size)
    done = blocks_done(str(path))
    return layout, [b for b in range(layout.n_blocks) if not done[b]]


def shared_model(
    cfg: RunConfig,
    stats: SummaryStats,
    L: pd.DataFrame | None,
    *,
    store: str,
    store_cov: bool,
    defer: bool = False,
) -> SharedModel:
    """What every block task of ``stats`` shares: the statistics' shared part and the
    config's fit settings (the one place that maps the model config onto the workers);
    ``defer``: its terms prepared by the worker that fits its first block."""
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
        defer=defer,
    )


def _after(_: Any, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, run after the task whose result is the first argument."""
    return function(*args)


def submit_blocks(
    cfg: RunConfig,
    client: Any,
    stats: SummaryStats,
    L: pd.DataFrame | None,
    layout: ResultsLayout,
    store: Path,
    todo: list[int],
    key: str,
    after: Any = None,
    shared: Any = None,
) -> list[Any]:
    """Scatter the shared model once and submit the block tasks ``todo`` of a store.

    ``key`` names the tasks (``{key}-{block}``); ``after``: a future the tasks wait for
    (the task that creates the store), or None; ``shared``: the model of
    :func:`shared_model` already scattered (with those of other stores), or None.
    """
    if shared is None:
        model = shared_model(cfg, stats, L, store=str(store), store_cov=layout.store_cov)
        shared = client.scatter(model, broadcast=True, hash=False)
    XY, ZY, Ynorm = np.asarray(stats.XY), np.asarray(stats.ZY), np.asarray(stats.Ynorm)

    def task(b: int) -> tuple[Any, ...]:
        sl = layout.block_slice(b)
        return (fit_block, shared, b, XY[:, sl], ZY[:, sl], Ynorm[sl])

    return submit_tasks(client, todo, key, task, after)


def submit_tasks(
    client: Any,
    todo: list[int],
    key: str,
    task: Callable[[int], tuple[Any, ...]],
    after: Any = None,
    **options: Any,
) -> list[Any]:
    """Submit ``task(b)`` (a function and its arguments) for each block b of ``todo``,
    named ``{key}-{b}``, after the future ``after`` when given (``options``: more keywords
    of ``client.submit``, as the workers to run on)."""
    futures = []
    for b in todo:
        spec = task(b)
        if after is not None:
            spec = (_after, after, *spec)
        futures.append(client.submit(*spec, key=f"{key}-{b}", retries=1, **options))
    return futures


def gather_blocks(
    client: Any,
    futures: list[Any],
    folder: Path,
    *,
    show: bool,
    written: Callable[[], None] | None = None,
) -> list[BlockReport]:
    """The reports of the block tasks; a write failure of theirs (disk full, read-only)
    is a StoreError that says what to do (``written()`` logs what was kept first)."""
    try:
        wait(futures, "fitting", show=show)
        return list(client.gather(futures))
    except FlashmmError:
        raise
    except OSError as exc:
        if not _is_write_failure(exc):
            raise
        if written is not None:
            written()
        raise _write_error("the results store", folder, exc) from exc


def fit_store(
    cfg: RunConfig, client: Any, stats: SummaryStats, folder: Path, *, show: bool = False
) -> tuple[Path, list[BlockReport], ResultsLayout]:
    """Fit every block not yet in the results store; return the reports of this run."""
    store = folder / RESULTS
    L = contrasts_of(dict(cfg.contrasts), stats)
    model = shared_model(cfg, stats, L, store=str(store), store_cov=bool(cfg.fit.store_cov))
    terms = model.terms
    assert terms is not None, "prepared by SharedModel"
    layout = block_layout(cfg, stats, L, n_workers(client), work_values=block_work(terms))
    if not store.exists():
        create_results(str(store), layout, store_attrs(cfg, stats, layout))
    layout, todo = resumed(layout, store)
    logger.info(
        "%d features in %d blocks of %d; %d already done, %d to fit",
        stats.m,
        layout.n_blocks,
        layout.block_size,
        layout.n_blocks - len(todo),
        len(todo),
    )
    token = cfg.hash()[:12]
    shared = client.scatter(model, broadcast=True, hash=False)
    futures = submit_blocks(
        cfg, client, stats, L, layout, store, todo, f"flashmm-fit-{token}", shared=shared
    )

    def written() -> None:
        done = int(blocks_done(str(store)).sum())
        logger.error("%d of %d blocks are written in %s", done, layout.n_blocks, store)

    reports = gather_blocks(client, futures, folder, show=show, written=written)
    return store, reports, layout
