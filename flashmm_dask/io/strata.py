"""Where the results of each stratum live in a results store: the one place that knows.

An unstratified run writes one results group, the store's root (:mod:`flashmm_dask.io.results`).
A run with ``model.by: <column>`` writes one results group per level of that column,
``<store>/strata/<level>``, each in the root format of an unstratified store; the root
group's attribute ``strata`` lists them in level order with their group paths. The
entries of that list may be level names (the group is then ``strata/<level>``) or
mappings ``{"level": ..., "path": ...}`` (``"stratum"``/``"name"`` and ``"group"`` are
read as well); a mapping level -> path is accepted too.

:func:`iter_strata` yields ``(stratum, Dataset)`` pairs: ``(None, root)`` for an
unstratified store, ``(level, group)`` for each stratum otherwise. Everything that reads
stratified results (tables, reports, AnnData export) goes through it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from flashmm_dask.errors import StoreError
from flashmm_dask.io.results import open_results
from flashmm_dask.io.results_layout import _target

if TYPE_CHECKING:
    import xarray as xr

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
    target = _target(path, storage_options)
    strata = strata_groups(dict(target.open("r").attrs), repr(target.shown))
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


__all__ = ["STRATA_ATTR", "STRATA_GROUP", "iter_strata", "strata_groups"]
