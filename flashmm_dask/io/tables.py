"""Tidy tables of a results Dataset: one row per feature and term, written as CSV
(Arrow's writer) and/or Parquet by :func:`write_tables`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flashmm_dask.errors import InputError
from flashmm_dask.io.writing import write_file
from flashmm_dask.model.status import STATUS

if TYPE_CHECKING:
    import pandas as pd
    import xarray as xr


_TABLE_FORMATS = ("csv", "parquet")


def results_table(ds: xr.Dataset) -> pd.DataFrame:
    """A tidy table of a results Dataset: one row per feature and term.

    Terms are the covariates, then the contrasts; rows run over all features of the
    first term, then of the next. Columns: feature, term, coef, se, t, df, p, padj,
    converged, niter, and status (the :data:`STATUS` name; "not_written" for a feature
    of an unfinished run) when the store has it.
    """
    import pandas as pd

    features = np.asarray(ds["feature"].values).astype(object)
    per_feature = {
        "converged": np.asarray(ds["converged"].values),
        "niter": np.asarray(ds["niter"].values),
    }
    if "status" in ds:
        # code -1 (not written) indexes the last label
        labels = np.array([*STATUS, "not_written"], dtype=object)
        per_feature["status"] = labels[np.asarray(ds["status"].values, dtype=np.int64)]
    parts = []
    for prefix, dim in (("", "covariate"), ("contrast_", "contrast")):
        terms = np.asarray(ds[dim].values).astype(object)
        if terms.size == 0:
            continue
        columns = {
            col: np.asarray(ds[prefix + col].transpose("feature", dim).values).T.ravel()
            for col in ("coef", "se", "t", "df", "p", "padj")
        }
        parts.append(
            pd.DataFrame(
                {
                    "feature": np.tile(features, terms.size),
                    "term": np.repeat(terms, features.size),
                    **columns,
                    **{k: np.tile(v, terms.size) for k, v in per_feature.items()},
                }
            )
        )
    table = pd.concat(parts, ignore_index=True)
    # iterations are counts: an integer column, empty (NA) where a feature was not fitted
    table["niter"] = table["niter"].round().astype("Int64")
    return table


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    """``table`` as CSV by Arrow's writer: ~10x faster than pandas' on a million rows of
    floats (shortest round-trip repr, as pandas). NaN is written empty, booleans as
    true/false, strings quoted only where needed."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    pa_csv.write_csv(
        pa.Table.from_pandas(table, preserve_index=False),
        path,
        write_options=pa_csv.WriteOptions(quoting_style="needed"),
    )


def _formats(formats: Sequence[str]) -> tuple[str, ...]:
    """The table formats asked for, once each; unknown ones raise InputError."""
    chosen = (formats,) if isinstance(formats, str) else tuple(dict.fromkeys(formats))
    unknown = [f for f in chosen if f not in _TABLE_FORMATS]
    if unknown:
        raise InputError(
            f"unknown table formats {unknown}; choose from {', '.join(_TABLE_FORMATS)}"
        )
    return chosen


def write_table(
    table: pd.DataFrame,
    folder: str | os.PathLike[str],
    name: str = "results",
    formats: Sequence[str] = _TABLE_FORMATS,
) -> list[Path]:
    """``table`` as ``<folder>/<name>.csv`` and/or ``.parquet``, each file staged (written
    under a temporary name and renamed), so a reader never sees a half-written table.

    Returns the paths written.
    """
    written = []
    for fmt in _formats(formats):
        write: Callable[[Path], object] = (
            partial(_write_csv, table) if fmt == "csv" else partial(table.to_parquet, index=False)
        )
        written.append(write_file(Path(folder) / f"{name}.{fmt}", write))
    return written


def write_tables(
    ds: xr.Dataset,
    outdir: str | os.PathLike[str],
    *,
    formats: Sequence[str] = _TABLE_FORMATS,
    name: str = "results",
) -> list[Path]:
    """Write :func:`results_table` as ``<outdir>/<name>.csv`` and/or ``.parquet``
    (:func:`write_table`). Returns the paths written."""
    return write_table(results_table(ds), outdir, name, _formats(formats))


__all__ = ["results_table", "write_table", "write_tables"]
