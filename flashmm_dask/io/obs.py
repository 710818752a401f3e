"""Cell metadata (obs) as an in-memory DataFrame: from an AnnData store or object, or
from a CSV file (:func:`read_obs`), plus the obs helpers of the expression readers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import anndata as ad
import pandas as pd
import zarr

from flashmm_dask.errors import DataError
from flashmm_dask.io._stores import open_hdf5, open_zarr, read_obs_group, store_kind
from flashmm_dask.io.paths import locate

_CSV_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")


def read_obs(data: Any, *, storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Read the cell metadata of an AnnData store or object, or of a CSV file.

    Parameters
    ----------
    data : str, os.PathLike, AnnData or pandas.DataFrame
        AnnData ``.zarr``/``.h5ad`` path or URL, AnnData object, or a CSV path (``.csv``,
        ``.tsv``, ``.txt``, optionally gzipped; a first column without a header is the
        index).
    storage_options : dict, optional
        fsspec options for URLs.

    Returns
    -------
    pandas.DataFrame
        One row per cell; a copy, in memory.
    """
    if isinstance(data, ad.AnnData):
        return _obs_frame(data.obs).copy()
    if isinstance(data, pd.DataFrame):
        return data.copy()
    if not isinstance(data, str | os.PathLike):
        raise DataError(
            f"cannot read obs from {_type_name(data)}; pass an AnnData store path, an "
            "AnnData object or a CSV path"
        )
    if os.fspath(data).lower().endswith(_CSV_SUFFIXES):
        return _read_csv(data, storage_options)
    loc = locate(data, storage_options)
    if store_kind(loc) == "hdf5":
        with open_hdf5(loc) as file:
            return read_obs_group(file, f"HDF5 file {loc.shown!r}")
    node = open_zarr(loc)
    if not isinstance(node, zarr.Group):
        raise DataError(f"{loc.shown!r} is a Zarr array, not an AnnData store; it has no obs")
    return read_obs_group(node, f"Zarr store {loc.shown!r}")


def _type_name(obj: Any) -> str:
    kind = type(obj)
    return f"{kind.__module__.split('.')[0]}.{kind.__qualname__}"


def _load_obs(
    obs: pd.DataFrame | str | os.PathLike[str] | None, storage_options: Mapping[str, Any] | None
) -> pd.DataFrame | None:
    if obs is None or isinstance(obs, pd.DataFrame):
        return obs
    if isinstance(obs, str | os.PathLike):
        return _read_csv(obs, storage_options)
    raise DataError(f"obs must be a pandas DataFrame or a CSV path, got {_type_name(obs)}")


def _read_csv(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None
) -> pd.DataFrame:
    shown = os.fspath(path)
    sep = "\t" if ".tsv" in shown.lower() else ","
    options = dict(storage_options) if storage_options and "://" in shown else None
    try:
        frame = pd.read_csv(shown, sep=sep, storage_options=options)
    except FileNotFoundError as exc:
        raise DataError(
            f"no such obs file: {shown!r}; give the path of a CSV file of cell metadata, "
            "one row per cell"
        ) from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read obs CSV {shown!r}: {exc}") from exc
    first = str(frame.columns[0]) if len(frame.columns) else ""
    if first == "" or first.startswith("Unnamed: 0"):
        # R's write.csv and pandas' to_csv write row names as a first column with no header
        frame = frame.set_index(frame.columns[0])
        frame.index.name = None
    return frame


def _obs_frame(obs: Any) -> pd.DataFrame:
    # anndata.experimental.read_lazy gives obs as a lazy Dataset2D
    return obs if isinstance(obs, pd.DataFrame) else obs.to_memory()
