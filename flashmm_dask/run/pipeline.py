"""The main job: expression store -> summary statistics -> feature blocks on Dask workers
-> one results store -> tables and plots.

0. Inputs: the data's metadata, the design, the feature selection and the contrasts are
   read and checked before any cluster starts, so a user error is reported at once
   (:mod:`flashmm_dask.run.inputs`, on the steps :func:`flashmm_dask.api.flashmm` walks
   too, :mod:`flashmm_dask.run.steps`).
1. Statistics: loaded from a saved store (``stats.load``), or reduced from the expression
   data in one Dask pass (:mod:`flashmm_dask.stats.reduce`), or, with no data path, reduced
   from data simulated into the output folder first (the embedded demo).
2. Blocks: the features are cut into blocks; the shared matrices are scattered to the
   workers once; each block task fits, tests the contrasts and writes its own chunk of
   the results store (:mod:`flashmm_dask.run.blocks`, :mod:`flashmm_dask.run.worker`).
3. Resume: the store records each finished block. Rerunning the same configuration on the
   same output fits only the missing blocks; a different configuration is refused unless
   ``output.overwrite``. The store is marked complete only after every block, the
   adjusted p-values and the attributes are written. A write that fails (disk full,
   read-only) raises :class:`StoreError`; the blocks already written are kept for the
   rerun.
4. Tables (CSV, Parquet) and plots are written from the finished store.

:func:`run` walks these steps once for every run; a run with strata, a cell selection or
a gene filter walks them with the functions of
:data:`~flashmm_dask.run.pipeline_strata.STRATA`, a plain run with those of :data:`PLAIN`
(:class:`~flashmm_dask.run.flow.Flow`). This is the one module that brings Dask, Zarr and
the numerics together.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flashmm_dask.io.outputs import refuse_foreign, register, removed_if_unused
from flashmm_dask.io.results import finalize_results, open_results, read_store_attrs
from flashmm_dask.run.blocks import auto_block_size, fit_store, shared_model, versions
from flashmm_dask.run.cluster import open_client
from flashmm_dask.run.config import RunConfig
from flashmm_dask.run.flow import Flow
from flashmm_dask.run.inputs import (
    check_fittable,
    compute_stats,
    prepare_inputs,
    uses_strata,
)
from flashmm_dask.run.output import (
    RESULTS,
    SIMULATED,
    STATS,
    OutputLock,
    _check_existing,
    _writing,
    run_outputs,
    write_outputs,
)
from flashmm_dask.run.pipeline_strata import STRATA
from flashmm_dask.run.progress import Timings
from flashmm_dask.run.summary import RunSummary, advise, counts_of
from flashmm_dask.run.worker import BlockReport
from flashmm_dask.stats.summary import SummaryStats

__all__ = [
    "PLAIN",
    "RESULTS",
    "SIMULATED",
    "STATS",
    "RunSummary",
    "auto_block_size",
    "compute_stats",
    "prepare_inputs",
    "run",
    "shared_model",
    "versions",
]

logger = logging.getLogger(__name__)


def _fit(
    cfg: RunConfig, client: Any, stats: SummaryStats, folder: Path, show: bool
) -> tuple[None, list[BlockReport]]:
    _, reports, _ = fit_store(cfg, client, stats, folder, show=show)
    return None, reports


def _blocks(reports: list[BlockReport]) -> list[int]:
    return sorted(r.block for r in reports)


def _finalize(cfg: RunConfig, store: Path, _: None, stats: SummaryStats, extra: dict) -> None:
    counts = counts_of(open_results(str(store), allow_incomplete=True))
    finalize_results(str(store), extra_attrs={**extra, **counts}, method=cfg.test.p_adjust)


def _summary(
    store: Path, folder: Path, reports: list[BlockReport], timings: Timings, files: list[Path]
) -> RunSummary:
    ds = open_results(str(store))
    counts = counts_of(ds)
    summary = RunSummary(
        output=folder,
        store=store,
        n_features=int(ds.sizes["feature"]),
        n_blocks=int(ds.attrs["n_blocks"]),
        blocks_fitted=tuple(_blocks(reports)),
        n_converged=counts["n_converged"],
        n_not_converged=counts["n_not_converged"],
        n_zero=counts["n_zero"],
        timings=dict(timings),
        files=tuple(files),
        status_counts=dict(counts.get("status_counts", {})),
    )
    advise(summary.status_counts)
    return summary


#: The steps of a run of one model over all cells.
PLAIN = Flow(prepare_inputs, compute_stats, check_fittable, _fit, _blocks, _finalize, _summary)


def _outputs(
    cfg: RunConfig, store: Path, folder: Path, timings: Timings, client: Any
) -> list[Path]:
    with _writing("the tables and plots", folder):
        return write_outputs(cfg, store, folder, timings, client=client)


def run(cfg: RunConfig, *, client: Any = None, show_progress: bool | None = None) -> RunSummary:
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
    # model.by, data.cells, data.drop_missing or model.min_cells: the stratified steps
    flow: Flow = STRATA if uses_strata(cfg) else PLAIN
    folder = Path(cfg.output.path)
    show = cfg.progress if show_progress is None else show_progress
    timings = Timings()
    started = time.perf_counter()
    with removed_if_unused(folder), OutputLock(folder):
        store = folder / RESULTS
        refuse_foreign(folder, run_outputs(cfg), overwrite=cfg.output.overwrite)
        resuming = _check_existing(store, cfg)
        register(folder, run_outputs(cfg))
        reports: list[BlockReport] = []
        if resuming and read_store_attrs(str(store)).get("complete"):
            logger.info("%s is complete for this configuration; writing tables and plots", store)
            files = _outputs(cfg, store, folder, timings, client)
        else:
            inputs = flow.prepare(cfg, folder)
            with nullcontext(client) if client is not None else open_client(cfg.cluster) as active:
                with timings.phase("statistics"):
                    stats = flow.statistics(cfg, active, folder, show=show, inputs=inputs)
                flow.fittable(stats)
                with timings.phase("fitting"):
                    fitted, reports = flow.fit(cfg, active, stats, folder, show)
                history = list(read_store_attrs(str(store)).get("history", []))
                history.append(
                    {
                        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                        "blocks_fitted": flow.fitted(reports),
                        "seconds": round(time.perf_counter() - started, 3),
                    }
                )
                extra = {"timings": dict(timings), "history": history}
                with timings.phase("finalize"), _writing("the results store", folder):
                    flow.finalize(cfg, store, fitted, stats, extra)
                # with the cluster still open: a stratified run writes its top tables there
                files = _outputs(cfg, store, folder, timings, active)
    return flow.summary(store, folder, reports, timings, files)  # the CLI prints its line()
