"""Feature selection of a run (``data.features``): by name, or by a boolean var column.

Two forms::

    data:
      features: [CD3E, CD4, MS4A1]           # names; every column of a repeated name is kept
      features: {var_column: highly_variable} # the features whose var column is True

Names that occur more than once among the data's features (gene symbols often do) select
every column of that name, and are reported with their positions; a name listed twice is
kept once, and so is a column that two names select (a repeated name and one of its
unique names). The readers make repeated names unique as anndata does (the second ``GENE`` is
``GENE-1``), and those names select their one column. The result is the positions of the
selected features in the data's order.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from flashmm_dask.errors import InputError
from flashmm_dask.io._stores import open_hdf5, open_zarr, store_kind
from flashmm_dask.io.paths import locate

__all__ = ["duplicated_names", "feature_positions", "read_var_column"]

logger = logging.getLogger(__name__)


def duplicated_names(names: Sequence[Any]) -> dict[str, list[int]]:
    """Each feature name that occurs more than once, with its positions."""
    index = pd.Index([str(x) for x in names])
    dup = index.duplicated(keep=False)
    out: dict[str, list[int]] = {}
    for pos in np.flatnonzero(dup):
        out.setdefault(index[pos], []).append(int(pos))
    return out


def _shown(dups: Mapping[str, list[int]], limit: int = 5) -> str:
    items = list(dups.items())
    text = "; ".join(f"{k!r} at positions {', '.join(map(str, v))}" for k, v in items[:limit])
    return text + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def read_var_column(data: Any, column: str, storage_options: Mapping[str, Any] | None = None):
    """The values of one column of ``var`` of an AnnData (object, .zarr or .h5ad store).

    Raises
    ------
    InputError
        The data have no var, or no such column (the columns are listed).
    """
    if isinstance(data, ad.AnnData):
        var = data.var
        if column not in var.columns:
            raise InputError(
                f"data.features var_column {column!r} is not a column of var; var has "
                f"{', '.join(map(str, var.columns)) or '(no columns)'}"
            )
        return np.asarray(var[column])
    if not isinstance(data, str):
        raise InputError(
            "data.features {var_column: ...} needs an AnnData input (a .zarr/.h5ad store or an "
            "AnnData object), which has var"
        )
    loc = locate(data, storage_options)

    def from_root(root: Any) -> np.ndarray:
        try:
            var = root["var"]
        except KeyError:
            raise InputError(f"{data} has no var; select features by name instead") from None
        if column not in var:
            columns = [k for k in var.keys() if not str(k).startswith("_")]
            raise InputError(
                f"data.features var_column {column!r} is not a column of var; var has "
                f"{', '.join(map(str, columns)) or '(no columns)'}"
            )
        return np.asarray(ad.io.read_elem(var[column]))

    if store_kind(loc) == "hdf5":
        with open_hdf5(loc) as file:
            return from_root(file)
    return from_root(open_zarr(loc))


def feature_positions(
    spec: Sequence[str] | Mapping[str, str] | None,
    names: Sequence[Any],
    *,
    data: Any = None,
    storage_options: Mapping[str, Any] | None = None,
    as_read: Sequence[Any] | None = None,
) -> np.ndarray | None:
    """Positions (ascending, in the data's order) of the features ``spec`` selects.

    Parameters
    ----------
    spec : list of names, ``{"var_column": NAME}``, or None (every feature: returns None)
    names : the data's feature names (as the results name them: unique)
    data : the data (for a var column)
    as_read : the names as the data have them, repeated names repeated (default ``names``);
        a repeated one selects every column of that name

    Raises
    ------
    InputError
        Names the data do not have (listed), an unknown or non-boolean var column, or a
        selection of no feature.
    """
    if not spec:
        return None
    read = [str(x) for x in (names if as_read is None else as_read)]
    all_dups = duplicated_names(read)
    if isinstance(spec, Mapping):
        column = str(spec["var_column"])
        values = read_var_column(data, column, storage_options)
        if values.shape != (len(names),):
            raise InputError(
                f"var column {column!r} has {values.shape[0]} values for {len(names)} features"
            )
        if values.dtype != bool:
            raise InputError(
                f"var column {column!r} is not boolean ({values.dtype}); name a True/False "
                "column such as highly_variable, or list the features by name"
            )
        positions = np.flatnonzero(values)
        if positions.size == 0:
            raise InputError(f"var column {column!r} is False for every feature: nothing to fit")
        logger.info("data.features: %d features where var[%r] is True", positions.size, column)
        return positions
    requested = list(dict.fromkeys(str(s) for s in spec))
    if len(requested) < len(spec):
        logger.warning("data.features lists some names more than once; each is kept once")
    where: dict[str, list[int]] = {}
    for pos, name in enumerate(str(x) for x in names):
        where.setdefault(name, []).append(pos)
    for name, columns in all_dups.items():  # a repeated name: every column of it
        where[name] = columns
    missing = [f for f in requested if f not in where]
    if missing:
        shown = ", ".join(repr(f) for f in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise InputError(
            f"data.features names {len(missing)} features that the data do not have: "
            f"{shown}; the data have {len(names)} features, e.g. "
            f"{', '.join(repr(str(f)) for f in list(names)[:3])}"
        )
    dups = {f: all_dups[f] for f in requested if f in all_dups}
    if dups:
        logger.warning(
            "data.features: %d selected names occur more than once in the data; every column "
            "is kept (results have one row per column): %s",
            len(dups),
            _shown(dups),
        )
    # a column selected twice (a repeated name and one of its unique names) is kept once
    return np.array(sorted({p for f in requested for p in where[f]}), dtype=np.intp)
