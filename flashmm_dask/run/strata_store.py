"""The results store of the stratified run: a root group and one results group per stratum.

Creates (or reopens) each stratum's group, submits its missing feature blocks and marks
the groups, and the root, complete (used by :mod:`flashmm_dask.run.pipeline_strata`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from flashmm_dask.api import filter_features
from flashmm_dask.design.contrasts import contrast_matrix
from flashmm_dask.errors import FlashmmError
from flashmm_dask.io.results import (
    FORMAT,
    FORMAT_VERSION,
    blocks_done,
    create_results,
    finalize_results,
    read_store_attrs,
    redact,
)
from flashmm_dask.io.strata_results import (
    applicable_contrasts,
    mark_filtered,
)
from flashmm_dask.io.strata_results import (
    status_counts as read_status_counts,
)
from flashmm_dask.run.output import RESULTS, _is_write_failure, _write_error, _writing
from flashmm_dask.run.pipeline import (
    _layout,
    _layout_from_attrs,
    _store_attrs,
    auto_block_size,
    shared_model,
)
from flashmm_dask.run.progress import wait
from flashmm_dask.run.worker import BlockReport, fit_block
from flashmm_dask.stats.strata import StratifiedStats
from flashmm_dask.stats.summary import SummaryStats

logger = logging.getLogger(__name__)


# -- the results store ------------------------------------------------------------------


def _create_root(store: Path, cfg: Any, stats: StratifiedStats, missing: dict) -> None:
    """The root group of a stratified results store (attributes only) and ``strata/``."""
    import zarr

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
        root.attrs.update(attrs)


@dataclass
class _Group:
    level: str
    path: Path
    stats: SummaryStats
    filtered: np.ndarray
    layout: Any
    todo: list[int]
    create: dict[str, Any] | None = None  # the attributes of a group still to create


def _open_group(
    cfg: Any,
    level: str,
    path: Path,
    stats: SummaryStats,
    contrasts: dict,
    n_workers: int,
    n_strata: int,
) -> _Group:
    L = contrast_matrix(contrasts, list(stats.covariates)) if contrasts else None
    layout = _layout(cfg, stats, tuple(L.columns) if L is not None else (), n_workers)
    if cfg.fit.block_size == "auto":
        # a few blocks per worker over all strata together, not per stratum
        size = auto_block_size(stats.m * n_strata, stats.p, stats.q, len(stats.d), n_workers)
        layout = dataclasses.replace(layout, block_size=min(size, stats.m))
    emptied, filtered = filter_features(stats, int(cfg.model.min_cells))
    if not path.exists():  # created by a task on a worker, before the group's blocks
        attrs = _store_attrs(cfg, stats, layout)
        attrs.update(
            stratum=level, by=stats.provenance.get("by"), cells=stats.provenance.get("cells")
        )
        return _Group(level, path, emptied, filtered, layout, list(range(layout.n_blocks)), attrs)
    layout = _layout_from_attrs(layout, read_store_attrs(str(path)))
    done = blocks_done(str(path))
    todo = [b for b in range(layout.n_blocks) if not done[b]]
    return _Group(level, path, emptied, filtered, layout, todo)


def _after(_: Any, function: Any, *args: Any) -> Any:
    """``function(*args)``, run after the task whose result is the first argument."""
    return function(*args)


def _submit(cfg: Any, client: Any, group: _Group, contrasts: dict, index: int) -> list:
    stats, layout = group.stats, group.layout
    L = contrast_matrix(contrasts, list(stats.covariates)) if contrasts else None
    model = shared_model(cfg, stats, L, store=str(group.path), store_cov=layout.store_cov)
    shared = client.scatter(model, broadcast=True, hash=False)
    XY, ZY, Ynorm = np.asarray(stats.XY), np.asarray(stats.ZY), np.asarray(stats.Ynorm)
    token = cfg.hash()[:12]
    created = None
    if group.create is not None:
        created = client.submit(
            create_results,
            str(group.path),
            layout,
            group.create,
            key=f"flashmm-create-{token}-s{index}",
            pure=False,
        )
    futures = []
    for b in group.todo:
        sl = layout.block_slice(b)
        futures.append(
            client.submit(
                _after,
                created,
                fit_block,
                shared,
                b,
                XY[:, sl],
                ZY[:, sl],
                Ynorm[sl],
                key=f"flashmm-fit-{token}-s{index}-{b}",
                retries=1,
            )
        )
    return futures


def fit_strata_stores(
    cfg: Any, client: Any, stats: StratifiedStats, folder: Path, *, show: bool = False
) -> tuple[list[_Group], list[BlockReport]]:
    """Create (or reopen) every stratum's results group and fit its missing blocks."""
    store = folder / RESULTS
    contrasts = dict(cfg.contrasts)
    per_stratum: dict[str, dict[str, str]] = {}
    missing: dict[str, list[str]] = {}
    for level, s in stats.items():
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
    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    groups = []
    for level, s in stats.items():
        path = store if stats.by is None else store / "strata" / stats.groups[level]
        groups.append(_open_group(cfg, level, path, s, per_stratum[level], n_workers, len(stats)))
    logger.info(
        "%d strata, %d blocks to fit (%d already done)",
        len(groups),
        sum(len(g.todo) for g in groups),
        sum(g.layout.n_blocks - len(g.todo) for g in groups),
    )
    futures = []
    for index, group in enumerate(groups):
        futures += _submit(cfg, client, group, per_stratum[group.level], index)
    try:
        wait(futures, "fitting", show=show)
        reports = client.gather(futures)
    except FlashmmError:
        raise
    except OSError as exc:
        if not _is_write_failure(exc):
            raise
        raise _write_error("the results store", folder, exc) from exc
    return groups, list(reports)


def _finalize(
    cfg: Any, store: Path, groups: list[_Group], stats: StratifiedStats, extra: dict
) -> None:
    import zarr

    total: dict[str, int] = {}
    for group in groups:
        attrs = read_store_attrs(str(group.path))
        if attrs.get("complete"):
            counts = attrs.get("status_counts", {})
        else:
            mark_filtered(group.path, group.filtered)
            counts = read_status_counts(group.path)
            plain = {
                "n_converged": counts["ok"],
                "n_not_converged": counts["not_converged"],
                "n_zero": counts["all_zero"] + counts["filtered"],
                "status_counts": counts,
            }
            finalize_results(
                str(group.path), extra_attrs={**extra, **plain}, method=cfg.test.p_adjust
            )
        for name, k in counts.items():
            total[name] = total.get(name, 0) + int(k)
    if stats.by is not None:
        root = zarr.open_group(str(store), mode="r+")
        root.attrs.update({**extra, "status_counts": total, "complete": True})
