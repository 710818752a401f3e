"""The work of the commands that are not a whole run: ``flashmm-dask stats`` (the summary
statistics only) and ``flashmm-dask test`` (new contrasts on a finished results store).
The command line (:mod:`flashmm_dask.cli`) parses their arguments and prints what they
return.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from flashmm_dask.io.outputs import refuse_foreign, register, removed_if_unused
from flashmm_dask.io.strata_results import is_strata_store
from flashmm_dask.io.writing import staged
from flashmm_dask.run.cluster import open_client
from flashmm_dask.run.config import RunConfig
from flashmm_dask.run.inputs import (
    compute_stats,
    compute_strata_stats,
    prepare_inputs,
    prepare_strata,
    uses_strata,
)
from flashmm_dask.run.output import SIMULATED, STATS, OutputLock
from flashmm_dask.run.retest import retest, retest_strata
from flashmm_dask.stats.strata import StratifiedStats
from flashmm_dask.stats.summary import SummaryStats


def save_stats(cfg: RunConfig) -> tuple[Path, SummaryStats | StratifiedStats]:
    """Reduce the data of ``cfg`` to summary statistics and save them in
    ``OUTPUT/stats.zarr`` (those of every stratum with strata or a cell selection).

    Returns
    -------
    the store written, and the statistics
    """
    folder = Path(cfg.output.path)
    cfg = cfg.with_overrides(["stats.save=true"])  # saving them is the command's job
    names = [STATS] + ([SIMULATED] if cfg.data.path is None else [])
    stats: SummaryStats | StratifiedStats
    with removed_if_unused(folder), OutputLock(folder):
        refuse_foreign(folder, names, overwrite=cfg.output.overwrite)
        if uses_strata(cfg):  # strata or a cell selection
            register(folder, names)
            strata = prepare_strata(cfg, folder)
            with open_client(cfg.cluster) as client:
                stats = compute_strata_stats(cfg, client, folder, show=cfg.progress, inputs=strata)
        else:
            inputs = prepare_inputs(cfg, folder)  # user errors before the cluster starts
            register(folder, names)
            with open_client(cfg.cluster) as client:
                stats = compute_stats(cfg, client, folder, show=cfg.progress, inputs=inputs)
    return folder / STATS, stats


def write_contrasts(
    store: str,
    contrasts: Mapping[str, str],
    *,
    alternative: str = "two.sided",
    stats: str | None = None,
    out: str | None = None,
) -> tuple[pd.DataFrame, Path]:
    """New contrasts on a finished results store (every stratum that has their
    coefficients, for a stratified one), written as a table.

    ``out``: the table (.csv or .parquet; default ``contrasts.csv`` next to the store,
    then an output of the run's folder). ``stats``: as :func:`flashmm_dask.run.retest.retest`.

    Returns
    -------
    the table, and the path it was written to
    """
    if is_strata_store(store):
        table = retest_strata(store, contrasts, alternative=alternative)
    else:
        table = retest(store, contrasts, alternative=alternative, stats=stats)
    target = Path(out) if out else Path(store).parent / "contrasts.csv"
    if not out:  # the run's output folder: its contrasts.csv is the package's
        refuse_foreign(target.parent, [target.name], overwrite=False)
        register(target.parent, [target.name])
    with staged(target) as tmp:
        if target.suffix == ".parquet":
            table.to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, index=False)
    return table, target
