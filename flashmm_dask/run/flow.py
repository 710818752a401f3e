"""The steps a run walks (:func:`flashmm_dask.run.pipeline.run`), as one record.

A plain run (one model over all cells) and a stratified one (strata, a cell selection or a
gene filter) walk the same skeleton: lock the output, prepare the inputs, open the
cluster, reduce the statistics, fit the blocks, finalize the store, write the outputs,
summarise. They differ only in the functions of a :class:`Flow`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashmm_dask.run.progress import Timings
from flashmm_dask.run.summary import RunSummary
from flashmm_dask.run.worker import BlockReport


@dataclass(frozen=True)
class Flow:
    """The steps of one kind of run.

    Attributes
    ----------
    prepare : (cfg, folder) -> inputs, checked before any cluster starts
    statistics : (cfg, client, folder, inputs, show) -> the summary statistics
    fittable : (stats) -> None, or a DataError when there is nothing to fit
    fit : (cfg, client, stats, folder, show) -> (what finalize needs, block reports)
    fitted : (reports) -> what the store's history records of the blocks fitted now
    finalize : (cfg, store, fitted, stats, extra attributes) -> None
    summary : (store, folder, reports, timings, files) -> the RunSummary
    """

    prepare: Callable[..., Any]
    statistics: Callable[..., Any]
    fittable: Callable[[Any], None]
    fit: Callable[..., tuple[Any, list[BlockReport]]]
    fitted: Callable[[list[BlockReport]], Any]
    finalize: Callable[..., None]
    summary: Callable[[Path, Path, list[BlockReport], Timings, list[Path]], RunSummary]
