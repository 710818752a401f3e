"""The main job with strata, a cell selection or a gene filter.

The flow :func:`flashmm_dask.run.pipeline.run` walks when the config sets ``model.by``,
``data.cells``, ``data.drop_missing`` or ``model.min_cells`` (or loads the statistics of
strata). The steps are those of the plain run, per stratum:

0. Inputs: the cell selection and the strata are planned from obs and each stratum's
   design built (:func:`flashmm_dask.design.strata.plan_strata`) before any cluster starts; a
   stratum that cannot be fitted is reported and skipped; a contrast must apply to at
   least one stratum.
1. Statistics: every stratum's, with per-feature non-zero counts, in one pass
   (:mod:`flashmm_dask.stats.reduce_strata`); their per-feature sums stay on the workers,
   which save them in ``OUTPUT/stats.zarr`` (a group per stratum,
   :mod:`flashmm_dask.stats.strata`) and fit them there
   (:mod:`flashmm_dask.run.strata_cluster`); or loaded from ``stats.load``.
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
from pathlib import Path
from typing import Any

from flashmm_dask.io.results import open_results, read_store_attrs
from flashmm_dask.io.results_finalize import converged_counts
from flashmm_dask.io.strata_results import strata_attrs
from flashmm_dask.run.config import RunConfig
from flashmm_dask.run.flow import Flow
from flashmm_dask.run.inputs import (
    check_strata_fittable,
    cluster_strata_stats,
    prepare_strata,
    uses_strata,
)
from flashmm_dask.run.progress import Timings
from flashmm_dask.run.strata_cluster import ClusterStrata
from flashmm_dask.run.strata_store import _Group, finalize_strata, fit_strata_stores
from flashmm_dask.run.summary import RunSummary, StrataRunSummary, advise, counts_of
from flashmm_dask.run.worker import BlockReport

__all__ = ["STRATA", "StrataRunSummary", "uses_strata"]

logger = logging.getLogger(__name__)


def _fit(
    cfg: RunConfig, client: Any, stats: ClusterStrata, folder: Path, show: bool
) -> tuple[list[_Group], list[BlockReport]]:
    """Fit every stratum; the statistics' store, written meanwhile, is whole on return."""
    try:
        out = fit_strata_stores(cfg, client, stats, folder, show=show)
    except BaseException:
        stats.saved(quiet=True)
        raise
    stats.saved()
    return out


def _summarise(
    store: Path, folder: Path, reports: list[BlockReport], timings: Timings, files: list[Path]
) -> RunSummary:
    return _summary(store, folder, reports, timings, files, strata_attrs(store))


#: The steps of a run with strata, a cell selection or a gene filter.
STRATA = Flow(
    prepare_strata,
    cluster_strata_stats,
    check_strata_fittable,
    _fit,
    len,
    finalize_strata,
    _summarise,
)


def _summary(
    store: Path,
    folder: Path,
    reports: list[BlockReport],
    timings: Timings,
    files: list[Path],
    strata: dict[str, Any] | None,
) -> RunSummary:
    if strata is None:
        ds = open_results(str(store))
        counts = counts_of(ds)
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
        **converged_counts(status_counts),
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
    advise(status_counts)
    return summary  # the command line prints summary.line() once
