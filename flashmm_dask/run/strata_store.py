"""The results store of the stratified run: a root group and one results group per stratum.

Creates (or reopens) each stratum's group, submits its missing feature blocks and marks
the groups, and the root, complete (used by :mod:`flashmm_dask.run.pipeline_strata`).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from flashmm_dask.errors import InputError
from flashmm_dask.io.results import (
    FORMAT,
    FORMAT_VERSION,
    ResultsLayout,
    finalizing,
    redact,
)
from flashmm_dask.io.results_create import create_many
from flashmm_dask.io.results_finalize import finalize_groups
from flashmm_dask.io.strata_results import applicable_contrasts
from flashmm_dask.run import blocks
from flashmm_dask.run.config import RunConfig
from flashmm_dask.run.output import RESULTS, _writing
from flashmm_dask.run.strata_cluster import ClusterStrata
from flashmm_dask.run.worker import BlockReport, fit_rows_block
from flashmm_dask.stats.summary import SummaryStats

logger = logging.getLogger(__name__)


# -- the results store ------------------------------------------------------------------


def _create_root(store: Path, cfg: RunConfig, stats: ClusterStrata, missing: dict) -> None:
    """The root group of a stratified results store (attributes only) and ``strata/``."""
    attrs = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "strata": {**stats.attrs(), "missing_contrasts": missing},
        "config": redact(cfg.to_dict()),
        "config_hash": cfg.hash(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with _writing("the results store", store.parent):
        root = zarr.open_group(str(store), mode="w", zarr_format=3)
        zarr.open_group(str(store / "strata"), mode="w", zarr_format=3)
        root.update_attributes(attrs)


@dataclass
class _Group:
    level: str
    path: Path
    stats: SummaryStats  # the stratum's shared statistics (no features)
    filtered: np.ndarray
    L: pd.DataFrame | None
    layout: ResultsLayout
    todo: list[int]
    create: dict[str, Any] | None = None  # the attributes of a group still to create


def _filtered(nnz: np.ndarray | None, m: int, min_cells: int) -> np.ndarray:
    """(m,) the features non-zero in fewer than ``min_cells`` cells (not fitted), as
    :func:`flashmm_dask.api.filter_features` marks them."""
    if min_cells == 0:
        return np.zeros(m, dtype=bool)
    if nnz is None:
        raise InputError(
            "min_cells needs the per-feature non-zero counts, which these statistics do not "
            "carry; compute them again with this version (flashmm-dask stats)"
        )
    return np.asarray(nnz) < min_cells


def _open_group(
    cfg: RunConfig,
    level: str,
    path: Path,
    stats: ClusterStrata,
    contrasts: dict,
    n_workers: int,
) -> _Group:
    head = stats.heads[level]
    L = blocks.contrasts_of(contrasts, head)
    layout = blocks.block_layout(
        cfg, head, L, n_workers, m_total=stats.m * len(stats), features=stats.features
    )
    filtered = _filtered(stats.nnz[level], stats.m, int(cfg.model.min_cells))
    if not path.exists():  # created with the others (fit_strata_stores), before any block
        attrs = blocks.store_attrs(cfg, head, layout)
        attrs.update(
            stratum=level, by=head.provenance.get("by"), cells=head.provenance.get("cells")
        )
        todo = list(range(layout.n_blocks))
        return _Group(level, path, head, filtered, L, layout, todo, attrs)
    layout, todo = blocks.resumed(layout, path)
    return _Group(level, path, head, filtered, L, layout, todo)


def _submit(
    cfg: RunConfig, client: Any, group: _Group, index: int, shared: Any, stats: ClusterStrata
) -> list:
    token = cfg.hash()[:12]
    keep = ~group.filtered if group.filtered.any() else None

    def task(b: int) -> tuple[Any, ...]:
        sl = group.layout.block_slice(b)
        rows, columns, Ynorm = stats.block(group.level, sl)
        kept = None if keep is None else keep[sl]
        Ynorm = Ynorm if kept is None else Ynorm * kept
        return (fit_rows_block, shared, b, rows, columns, Ynorm, kept)

    # on the worker that holds the stratum's rows (ClusterStrata.at)
    key = f"flashmm-fit-{token}-s{index}"
    return blocks.submit_tasks(client, group.todo, key, task, **stats.at(group.level))


def fit_strata_stores(
    cfg: RunConfig, client: Any, stats: ClusterStrata, folder: Path, *, show: bool = False
) -> tuple[list[_Group], list[BlockReport]]:
    """Create (or reopen) every stratum's results group and fit its missing blocks."""
    store = folder / RESULTS
    contrasts = dict(cfg.contrasts)
    per_stratum: dict[str, dict[str, str]] = {}
    missing: dict[str, list[str]] = {}
    for level, s in stats.heads.items():
        per_stratum[level], lacking = applicable_contrasts(contrasts, s.covariates)
        if lacking:
            missing[level] = sorted(lacking)
            logger.warning(
                "stratum %s lacks the coefficients of contrast(s) %s: not tested there",
                level,
                ", ".join(sorted(lacking)),
            )
    if stats.by is not None and not store.exists():
        _create_root(store, cfg, stats, missing)
    n_workers = blocks.n_workers(client)
    groups = []
    for level in stats:
        path = store if stats.by is None else store / "strata" / stats.groups[level]
        groups.append(_open_group(cfg, level, path, stats, per_stratum[level], n_workers))
    # the new groups created at once, copies of one per layout (create_many), in a thread
    # while the strata's models are built and scattered, and before any block is submitted
    new = [(g.path, g.layout, g.create) for g in groups if g.create is not None]

    def create() -> None:
        with _writing("the results store", store.parent):
            create_many(new)

    with ThreadPoolExecutor(1, thread_name_prefix="flashmm-create-groups") as pool:
        created = pool.submit(create)
        # every stratum's shared model in one scatter (one round trip, not one per
        # stratum), its terms (two q x q eigendecompositions) prepared by the worker that
        # fits it (``defer``): on this driver, beside the workers, they held back the
        # first fit by ~1 s
        models = [
            blocks.shared_model(
                cfg, g.stats, g.L, store=str(g.path), store_cov=g.layout.store_cov, defer=True
            )
            for g in groups
        ]
        shared = client.scatter(models, broadcast=True, hash=False) if groups else []
        created.result()
    logger.info(
        "%d strata, %d blocks to fit (%d already done)",
        len(groups),
        sum(len(g.todo) for g in groups),
        sum(g.layout.n_blocks - len(g.todo) for g in groups),
    )
    futures = []
    for index, group in enumerate(groups):
        futures += _submit(cfg, client, group, index, shared[index], stats)
    return groups, blocks.gather_blocks(client, futures, folder, show=show)


def finalize_strata(
    cfg: RunConfig, store: Path, groups: list[_Group], stats: ClusterStrata, extra: dict
) -> None:
    """Mark each stratum's group complete (its filtered features, adjusted p-values,
    status counts), then the root with the counts over all strata.

    The groups are opened (and checked) one by one, then those not complete yet finalized
    together in one call of zarr's event loop
    (:func:`~flashmm_dask.io.results_finalize.finalize_groups`)."""
    total: dict[str, int] = {}
    todo = []
    for group in groups:
        item = finalizing(group.path, extra, filtered=group.filtered, counted=True)
        attrs = item.group.attrs
        if not attrs.get("complete"):
            todo.append(item)
            continue
        counts: Any = attrs.get("status_counts", {})
        for name, k in dict(counts).items():
            total[name] = total.get(name, 0) + int(k)
    for found in finalize_groups(todo, method=cfg.test.p_adjust):
        for name, k in (found or {}).items():
            total[name] = total.get(name, 0) + int(k)
    if stats.by is not None:
        root = zarr.open_group(str(store), mode="r+")
        root.update_attributes({**extra, "status_counts": total, "complete": True})
