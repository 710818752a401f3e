"""The results store of a stratified run: one results group per stratum.

Layout (agreed across the package)::

    results.zarr/                 root group: attributes only
        attrs: format, format_version (as a results store), complete, config, config_hash,
               strata = {by, levels (level order), groups {level: "strata/<name>"},
                         skipped {level: reason}, n_cells, missing_contrasts, ...}
    results.zarr/strata/<name>/   a complete results store (the format of
                                  :mod:`flashmm_dask.io.results`), one per fitted stratum

Each stratum group opens with ``open_results(path + "/strata/<name>")`` or
``xarray.open_zarr(path, group="strata/<name>")``; :func:`open_strata` opens them all in
level order. Tables of a stratified run carry a ``stratum`` column (first), and the plots
of stratum ``<name>`` are in ``OUTPUT/strata/<name>/plots/``.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flashmm_dask.design.contrasts import contrast_matrix
from flashmm_dask.errors import ContrastError, InputError, StoreError

__all__ = [
    "applicable_contrasts",
    "is_strata_store",
    "mark_filtered",
    "open_strata",
    "retest_strata",
    "strata_attrs",
    "write_strata_tables",
]

logger = logging.getLogger(__name__)

FILTERED = 7  # the status code "filtered" (flashmm_dask.io.results.STATUS)


def strata_attrs(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``strata`` attribute of a results store's root, or None for an unstratified one."""
    import zarr

    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except (FileNotFoundError, OSError, ValueError, KeyError, TypeError):
        return None
    strata = attrs.get("strata")
    return dict(strata) if isinstance(strata, Mapping) else None


def is_strata_store(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is the root of a stratified results store."""
    return strata_attrs(path) is not None


def stratum_paths(path: str | os.PathLike[str]) -> dict[str, Path]:
    """Level -> the path of its results group, in level order."""
    strata = strata_attrs(path)
    if strata is None:
        raise StoreError(f"{path} is not the results store of a stratified run")
    return {str(k): Path(path) / str(v) for k, v in strata["groups"].items()}


def open_strata(path: str | os.PathLike[str], *, allow_incomplete: bool = False) -> dict:
    """Level -> ``xarray.Dataset`` of each stratum of a stratified results store."""
    from flashmm_dask.io.results import open_results

    return {
        level: open_results(str(p), allow_incomplete=allow_incomplete)
        for level, p in stratum_paths(path).items()
    }


def applicable_contrasts(
    contrasts: Mapping[str, str], covariates: Sequence[str]
) -> tuple[dict[str, str], dict[str, str]]:
    """(the contrasts whose coefficients all exist in ``covariates``, the others with the
    reason)."""
    ok, missing = {}, {}
    for name, expr in contrasts.items():
        try:
            contrast_matrix({name: expr}, list(covariates))
        except ContrastError as exc:
            missing[name] = str(exc)
            continue
        ok[name] = expr
    return ok, missing


def status_counts(path: str | os.PathLike[str]) -> dict[str, int]:
    """Features per status name of a results group (read from its ``status`` array)."""
    import zarr

    from flashmm_dask.io.results import STATUS

    array = zarr.open_group(str(path), mode="r")["status"]
    assert isinstance(array, zarr.Array)
    codes = np.asarray(array[:])
    return {name: int((codes == k).sum()) for k, name in enumerate(STATUS)}


def mark_filtered(path: str | os.PathLike[str], filtered: np.ndarray) -> None:
    """Set the status of the ``filtered`` features of a results group to ``filtered``."""
    import zarr

    if not np.any(filtered):
        return
    group = zarr.open_group(str(path), mode="r+")
    array = group["status"]
    assert isinstance(array, zarr.Array)
    status = np.asarray(array[:])
    status[np.asarray(filtered, dtype=bool)] = FILTERED
    array[:] = status


def strata_table(datasets: Mapping[str, Any]) -> pd.DataFrame:
    """The tidy results table of every stratum, with a first column ``stratum``."""
    from flashmm_dask.io.results import results_table

    parts = []
    for level, ds in datasets.items():
        # the table's variables in one read (not one dask compute per variable)
        drop = [v for v in ("cov", "theta", "se_theta", "dlogL", "logLik", "block_done") if v in ds]
        # read here, in threads: a round trip through a cluster per stratum costs more
        table = results_table(ds.drop_vars(drop).load(scheduler="threads"))
        table.insert(0, "stratum", level)
        parts.append(table)
    return pd.concat(parts, ignore_index=True)


def write_table(table: pd.DataFrame, folder: Path, name: str, formats: Sequence[str]) -> list:
    """``table`` as ``<folder>/<name>.<fmt>`` for each format, each renamed into place."""
    from flashmm_dask.io.tables import _write_csv

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in dict.fromkeys(formats):
        final = folder / f"{name}.{fmt}"
        tmp = folder / f".{name}.{fmt}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            if fmt == "csv":
                _write_csv(table, tmp)
            else:
                table.to_parquet(tmp, index=False)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        written.append(final)
    return written


def write_strata_tables(path: str | os.PathLike[str], folder: Path, formats: Sequence[str]) -> list:
    """The tables of a stratified results store (``results.csv``/``.parquet`` with a
    ``stratum`` column)."""
    import xarray as xr

    from flashmm_dask.io.results import read_store_attrs

    datasets = {}
    for level, p in stratum_paths(path).items():
        if not read_store_attrs(str(p)).get("complete"):
            raise StoreError(f"the results of stratum {level} in {p} are incomplete")
        # numpy-backed (no dask): a table reads every variable once, whole
        datasets[level] = xr.open_zarr(str(p), chunks=None, consolidated=True, zarr_format=3)
    return write_table(strata_table(datasets), folder, "results", formats)


def strata_report(path: str | os.PathLike[str], folder: Path) -> list[Path]:
    """The plots of each stratum in ``folder/strata/<name>/plots/``."""
    from flashmm_dask.report.plots import make_report

    files: list[Path] = []
    for level, p in stratum_paths(path).items():
        from flashmm_dask.io.results import open_results

        files += make_report(open_results(str(p)), folder / "strata" / p.name)
        logger.debug("plots of stratum %s written", level)
    return files


def retest_strata(
    path: str | os.PathLike[str], contrasts: Mapping[str, str], *, alternative: str = "two.sided"
) -> pd.DataFrame:
    """New contrasts on every stratum of a stratified store where their coefficients
    exist; a ``stratum`` column first. Strata lacking a contrast's coefficients are
    logged (warning) and have no rows for it.

    Raises
    ------
    InputError
        No stratum has the coefficients of any of the contrasts.
    """
    from flashmm_dask.io.results import open_results, read_store_attrs
    from flashmm_dask.run.retest import retest, run_stats

    strata = strata_attrs(path) or {}
    stats_root = Path(run_stats(str(path), read_store_attrs(str(path)).get("config", {})))
    parts = []
    for level, p in stratum_paths(path).items():
        # the stratum's statistics (for Satterthwaite's df): the same group in stats.zarr
        stats = str(stats_root / str(strata["groups"][level]))
        covariates = [str(c) for c in open_results(str(p))["covariate"].values]
        ok, missing = applicable_contrasts(contrasts, covariates)
        for name in missing:
            logger.warning("stratum %s lacks the coefficients of contrast %r", level, name)
        if ok:
            table = retest(str(p), ok, alternative=alternative, stats=stats)
            table.insert(0, "stratum", level)
            parts.append(table)
    if not parts:
        raise InputError(
            f"no stratum of {path} has the coefficients of the contrasts "
            f"{', '.join(map(repr, contrasts))}; check the names (strata have the "
            "coefficients of the formula applied to their own cells)"
        )
    return pd.concat(parts, ignore_index=True)
