"""Attributes of a results store: redaction of storage options, JSON-checked user
attributes and the default package versions recorded at creation.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from flashmm_dask.errors import InputError
from flashmm_dask.io.writing import package_versions

REDACTED = "<redacted>"

#: Attributes that only this module sets.
_RESERVED_ATTRS = ("format", "format_version", "complete", "block_size", "n_blocks")


# -- attributes -----------------------------------------------------------------------


def _jsonable(value: Any, where: str) -> Any:
    """``value`` with numpy scalars/arrays, tuples and paths made JSON types."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), where)
    if isinstance(value, np.generic):
        return _jsonable(value.item(), where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"attribute {where} is {value}; store attributes must be finite (JSON)")
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise InputError(
        f"attribute {where} has type {type(value).__name__}, which JSON cannot hold; "
        "give strings, numbers, booleans, lists or dicts"
    )


def redact(value: Any) -> Any:
    """A copy of ``value`` with every entry named ``storage_options`` redacted.

    A mapping under that name keeps its keys and has each value replaced by
    ``"<redacted>"``; any other non-empty value is replaced whole.
    """
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            if key == "storage_options" and isinstance(item, Mapping):
                out[key] = {k: REDACTED for k in item}
            elif key == "storage_options" and item not in (None, "", [], ()):
                out[key] = REDACTED
            else:
                out[key] = redact(item)
        return out
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return copy.copy(value)


def _user_attrs(
    attrs: Mapping[str, Any] | None, what: str, managed: Mapping[str, Any]
) -> dict[str, Any]:
    """``attrs`` redacted and made JSON; attributes this module manages may only repeat
    the values in ``managed``."""
    out = _jsonable(redact(dict(attrs or {})), what)
    clash = [k for k in _RESERVED_ATTRS if k in out and out[k] != managed.get(k)]
    if clash:
        shown = ", ".join(f"{k}={out[k]!r} (the store's is {managed.get(k)!r})" for k in clash)
        raise InputError(
            f"{what} sets {shown}; these attributes are managed by the results store: leave "
            "them out"
        )
    return out


def _default_versions() -> dict[str, str]:
    """The versions a store records by default, keyed as the store format has them
    (``flashmm_dask``, ``numpy``, ``scipy``, ``zarr``)."""
    versions = package_versions(("flashmm-dask", "numpy", "scipy", "zarr"))
    return {name.replace("-", "_"): value for name, value in versions.items()}
