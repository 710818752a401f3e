"""The results store of a stratified run: one results group per stratum, and the one
place that knows where each stratum's results live.

Layout (agreed across the package)::

    results.zarr/                 root group: attributes only
        attrs: format, format_version (as a results store), complete, config, config_hash,
               strata = {by, levels (level order), groups {level: "strata/<name>"},
                         skipped {level: reason}, n_cells, missing_contrasts, ...}
    results.zarr/strata/<name>/   a complete results store (the format of
                                  :mod:`flashmm_dask.io.results`), one per fitted stratum

An unstratified run writes one results group, the store's root. Besides the run's form
above, the ``strata`` attribute is read as a list of level names (the group is then
``strata/<level>``) or of mappings ``{"level": ..., "path": ...}`` (``"stratum"``/``"name"``
and ``"group"`` are read as well), or as a mapping level -> path (:func:`strata_groups`).

Each stratum group opens with ``open_results(path + "/strata/<name>")`` or
``xarray.open_zarr(path, group="strata/<name>")``; :func:`open_strata` opens them all in
level order, and :func:`iter_strata` yields ``(stratum, Dataset)`` pairs: ``(None, root)``
for an unstratified store, ``(level, group)`` for each stratum otherwise (everything that
reads stratified results, as tables, reports and the AnnData export, goes through it).
Tables of a stratified run carry a ``stratum`` column (first), and the plots of stratum
``<name>`` are in ``OUTPUT/strata/<name>/plots/``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from flashmm_dask.design.contrasts import contrast_matrix
from flashmm_dask.errors import ContrastError, StoreError
from flashmm_dask.io.paths import locate
from flashmm_dask.io.results import open_group, open_results
from flashmm_dask.io.results_finalize import FILTERED, count_status
from flashmm_dask.io.resultsets import TABLE_VARIABLES
from flashmm_dask.io.tables import (
    results_arrow,
    write_arrow_tables,
)
from flashmm_dask.io.zarr_batch import read_groups

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "STRATA_ATTR",
    "STRATA_GROUP",
    "applicable_contrasts",
    "is_strata_store",
    "iter_strata",
    "load_strata",
    "mark_filtered",
    "open_strata",
    "strata_attrs",
    "strata_groups",
    "write_strata_tables",
]

logger = logging.getLogger(__name__)

#: Root attribute listing the strata of a stratified store.
STRATA_ATTR = "strata"
#: Folder of the stratum groups inside a stratified store.
STRATA_GROUP = "strata"


def strata_groups(attrs: Mapping[str, Any], shown: str = "the store") -> list[tuple[str, str]]:
    """``(level, group path)`` of each stratum listed in a store's root attributes.

    Parameters
    ----------
    attrs : the root group's attributes
    shown : how to name the store in an error

    Returns
    -------
    list of (str, str)
        In level order; empty when the store is not stratified.

    Raises
    ------
    StoreError
        The ``strata`` attribute is not in one of the forms of the module docstring.
    """
    listed = attrs.get(STRATA_ATTR)
    if listed is None:
        return []
    if isinstance(listed, Mapping) and "levels" in listed:
        # a run's stratified store (flashmm_dask.run.pipeline_strata): levels in order and
        # their group paths
        groups = listed.get("groups") or {}
        items: list[Any] = [
            {"level": level, "path": groups.get(level, f"{STRATA_GROUP}/{level}")}
            for level in listed["levels"]
        ]
    elif isinstance(listed, Mapping):
        items = [{"level": k, "path": v} for k, v in listed.items()]
    elif isinstance(listed, list):
        items = listed
    else:
        raise StoreError(f"{shown}: its {STRATA_ATTR!r} attribute is not a list; it is corrupt")
    out = []
    for item in items:
        level: Any
        path: Any
        if isinstance(item, str):
            level, path = item, f"{STRATA_GROUP}/{item}"
        elif isinstance(item, Mapping):
            level = next((item[k] for k in ("level", "stratum", "name") if k in item), None)
            path = next((item[k] for k in ("path", "group") if k in item), None)
            if level is not None and path is None:
                path = f"{STRATA_GROUP}/{level}"
        else:
            level = path = None
        if not isinstance(level, str) or not isinstance(path, str):
            raise StoreError(
                f"{shown}: the {STRATA_ATTR!r} attribute has an entry {item!r} without a "
                "level name and group path; the store is corrupt"
            )
        out.append((level, path.strip("/")))
    return out


def _join(path: str, sub: str) -> str:
    if "://" in path or "::" in path:
        return f"{path.rstrip('/')}/{sub}"
    return os.path.join(path, *sub.split("/"))


def iter_strata(
    path: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    allow_incomplete: bool = False,
) -> Iterator[tuple[str | None, xr.Dataset]]:
    """The results groups of a store: ``(None, Dataset)`` or ``(level, Dataset)`` per stratum.

    Parameters
    ----------
    path : local path or fsspec URL of a results store
    storage_options : fsspec options for URLs
    allow_incomplete : passed to :func:`~flashmm_dask.io.results.open_results`

    Yields
    ------
    (str or None, xarray.Dataset)
        The stratum's level (None for an unstratified store) and its lazy results Dataset.

    Raises
    ------
    StoreError
        No results store there, or a stratum group listed but missing or unreadable.
    """
    target = locate(path, storage_options, error=StoreError)
    strata = strata_groups(dict(open_group(target, "r").attrs), repr(target.shown))
    if not strata:
        yield (
            None,
            open_results(path, storage_options=storage_options, allow_incomplete=allow_incomplete),
        )
        return
    for level, sub in strata:
        yield (
            level,
            open_results(
                _join(os.fspath(path), sub),
                storage_options=storage_options,
                allow_incomplete=allow_incomplete,
            ),
        )


def strata_attrs(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``strata`` attribute of a results store's root, or None for an unstratified one."""
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
    """Level -> the path of its results group, in level order (the ``strata`` attribute in
    any of the forms :func:`strata_groups` reads, as :func:`iter_strata`)."""
    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except (FileNotFoundError, OSError, ValueError, KeyError, TypeError):
        attrs = {}
    groups = strata_groups(attrs, repr(str(path)))
    if not groups:
        raise StoreError(f"{path} is not the results store of a stratified run")
    return {level: Path(path) / sub for level, sub in groups}


def open_strata(
    path: str | os.PathLike[str], *, allow_incomplete: bool = False
) -> dict[str, xr.Dataset]:
    """Level -> ``xarray.Dataset`` of each stratum of a stratified results store."""
    return {
        level: open_results(str(p), allow_incomplete=allow_incomplete)
        for level, p in stratum_paths(path).items()
    }


def load_strata(
    path: str | os.PathLike[str], variables: Iterable[str] = TABLE_VARIABLES
) -> list[tuple[str, xr.Dataset]]:
    """``(level, Dataset)`` of every stratum of a finished stratified results store, with
    ``variables`` (those present; default those of the tables and the report) read into
    memory: the values, dimensions and attributes that
    ``open_results(...)[variables].load()`` gives, read with zarr directly and the strata
    together in one call of zarr's event loop (xarray's open and load cost ~0.15 s per
    stratum, most of the tables of a run of 29 strata).

    Raises
    ------
    StoreError
        No stratified store there, or a stratum whose results are incomplete.
    """
    import xarray as xr

    wanted = set(variables)
    names = sorted(wanted | {"feature", "covariate", "contrast"})
    paths = list(stratum_paths(path).items())
    # every stratum's groups and arrays read in one call of zarr's event loop
    groups = read_groups([str(where) for _, where in paths], names)
    out = []
    for (level, where), (attrs, read) in zip(paths, groups, strict=True):
        if not attrs.get("complete"):
            raise StoreError(f"the results of stratum {level} in {where} are incomplete")
        data: dict[str, tuple[tuple[str, ...], np.ndarray, dict[str, Any]]] = {}
        for name in names:
            if name not in read:
                continue
            item = read[name]
            if item is None:
                raise StoreError(f"{where}: {name!r} is not an array of a results store")
            data[name] = item
        # the coordinates of the dimensions the variables use, as xarray opens them
        used = {dim for name, (dims, _, _) in data.items() if name in wanted for dim in dims}
        coords = {name: data.pop(name)[1] for name in list(data) if name not in wanted}
        coords = {dim: values for dim, values in coords.items() if dim in used}
        out.append((level, xr.Dataset(data, coords=coords, attrs=attrs)))
    return out


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
    array = zarr.open_group(str(path), mode="r")["status"]
    assert isinstance(array, zarr.Array)
    return count_status(np.asarray(array[:]))


def mark_filtered(path: str | os.PathLike[str], filtered: np.ndarray) -> None:
    """Set the status of the ``filtered`` features of a results group to ``filtered``."""
    if not np.any(filtered):
        return
    group = zarr.open_group(str(path), mode="r+")
    array = group["status"]
    assert isinstance(array, zarr.Array)
    status = np.asarray(array[:])
    status[np.asarray(filtered, dtype=bool)] = FILTERED
    array[:] = status


def write_strata_tables(
    path: str | os.PathLike[str],
    folder: Path,
    formats: Sequence[str],
    *,
    loaded: Sequence[tuple[Any, xr.Dataset]] | None = None,
) -> list[Path]:
    """The tables of a stratified results store (``results.csv``/``.parquet`` with a
    ``stratum`` column).

    ``loaded``: the strata's results already read into memory, as
    :func:`flashmm_dask.io.resultsets.loaded` gives them (with the variables of the
    tables), so that the tables and the report read the store once.
    """
    import pyarrow as pa

    sets = load_strata(path) if loaded is None else loaded
    # one Arrow table of every stratum's rows (millions), both formats written from it
    table = pa.concat_tables([results_arrow(ds, str(level)) for level, ds in sets])
    return write_arrow_tables(table, folder, "results", formats)
