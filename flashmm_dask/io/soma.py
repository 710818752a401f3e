"""TileDB-SOMA experiments (the CZ CELLxGENE Census format) as a lazy cells x features array.

:func:`read_soma` presents one X layer of one measurement of a SOMA experiment as the same
:class:`~flashmm_dask.io.readers.Expression` the AnnData readers give: a Dask array of
cells x features whose blocks are ``scipy.sparse.csr_matrix``, chunked along cells, with
the feature names and the cell metadata. The reduction and everything after it do not
know where the data came from.

Where the experiment lives: a local folder (``atlas.soma``), ``soma://<path or URI>``
(``soma://s3://bucket/census/homo_sapiens``), or a ``tiledb://`` URI. TileDB, not
fsspec, reads it: ``storage_options`` are TileDB config parameters (for S3 e.g.
``{"vfs.s3.region": "us-west-2", "vfs.s3.no_sign_request": "true"}``), sent to the
workers as plain strings (each worker builds its own TileDB context).

What is read when
-----------------
Eagerly, when :func:`read_soma` is called: the experiment's structure (measurements,
X layers, schemas, the stored entry count), the cell ``soma_joinid``\\ s that pass
``obs_filter`` and the obs columns asked for (``obs_columns``; all of them by default),
and the feature names (``var_column``) of the features that pass ``var_filter`` and
``features``. Nothing of X.

Lazily, in the Dask tasks: each block of cells (consecutive selected cells in
``soma_joinid`` order) opens the X layer itself, at the experiment's timestamp when it
was first opened (so every block sees the same version, and the obs read), and reads the
entries of its own cells and the selected features only: the filters are pushed down to
TileDB as coordinate lists, never applied after a full read. Blocks hold about 5 million
non-zeros (1,000 to 100,000 cells), from the stored entry count, as for AnnData stores.

Filters use SOMA's value-filter syntax (TileDB query conditions), e.g.
``"tissue == 'lung' and disease in ['COVID-19', 'normal']"``. A filter that selects cells
drops the categories no selected cell has (as subsetting an AnnData does).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import dask.array as da
import numpy as np
import pandas as pd
from dask.highlevelgraph import HighLevelGraph
from scipy import sparse

from flashmm_dask.errors import DataError, InputError
from flashmm_dask.io._stores import check_matrix, default_sparse_rows

if TYPE_CHECKING:  # readers imports this module: the class is imported where it is built
    from flashmm_dask.io.readers import Expression

__all__ = ["SOMA_PREFIX", "is_soma", "read_soma"]

logger = logging.getLogger(__name__)

#: A ``data.path`` that starts with this is a SOMA experiment at the rest of the path.
SOMA_PREFIX = "soma://"
#: How to install what this module needs.
INSTALL = "pip install 'flashmm-dask[soma]'"
#: Feature-name columns tried, in order, when ``var_column`` is not given:
#: ``tiledbsoma.io.from_anndata``'s var index, then the Census' gene symbols.
VAR_COLUMNS = ("var_id", "feature_name")
#: Column that holds the obs index when written by ``tiledbsoma.io.from_anndata``.
OBS_ID = "obs_id"
_JOINID = "soma_joinid"
_TILEDB_GROUP = "__tiledb_group.tdb"


def is_soma(data: object) -> TypeGuard[str | os.PathLike[str]]:
    """Whether ``data`` names a SOMA experiment rather than an AnnData or Zarr store.

    True for ``soma://...`` and ``tiledb://...``, a path ending in ``.soma``, and a local
    folder that is a TileDB group (it holds ``__tiledb_group.tdb``). Reads nothing but the
    local folder's listing; tiledbsoma need not be installed.
    """
    if not isinstance(data, str | os.PathLike):
        return False
    text = os.fspath(data)
    if text.startswith((SOMA_PREFIX, "tiledb://")):
        return True
    if text.rstrip("/").lower().endswith(".soma"):
        return True
    local = text.removeprefix("file://") if text.startswith("file://") else text
    if "://" in local:
        return False
    return os.path.isfile(os.path.join(os.path.expanduser(local), _TILEDB_GROUP))


def _uri(data: str | os.PathLike[str]) -> str:
    text = os.fspath(data).removeprefix(SOMA_PREFIX)
    if "://" in text:
        return text
    return os.path.abspath(os.path.expanduser(text))


def _soma() -> Any:
    try:
        import tiledbsoma
    except ImportError as exc:
        raise InputError(f"reading SOMA experiments needs tiledbsoma: {INSTALL}") from exc
    return tiledbsoma


@functools.lru_cache(maxsize=8)
def _context(config: tuple[tuple[str, str], ...]) -> Any:
    """One TileDB context per process and config (a context holds caches and threads)."""
    return _soma().SOMATileDBContext(tiledb_config=dict(config))


def _config(storage_options: Mapping[str, Any] | None) -> tuple[tuple[str, str], ...]:
    """TileDB config parameters as sorted string pairs (hashable, picklable)."""
    options = dict(storage_options or {})
    bad = [k for k in options if not isinstance(k, str)]
    if bad:
        raise InputError(f"storage_options keys must be TileDB config names, got {bad!r}")
    return tuple(sorted((k, _config_value(v)) for k, v in options.items()))


def _config_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# -- the blocks ----------------------------------------------------------------------


@dataclass(frozen=True)
class CellRun:
    """The cells of one block: selected ``soma_joinid``\\ s in ``first..last``.

    ``mask`` is None when every joinid of the range is selected (a slice is read), else
    the packed bits of the selected ones (``numpy.packbits`` of ``last - first + 1``
    booleans): 1/64 of the size of the joinids themselves, so a block's task stays small.
    """

    first: int
    last: int
    mask: np.ndarray | None = None

    @classmethod
    def of(cls, joinids: np.ndarray) -> CellRun:
        """The run of sorted, distinct ``joinids``."""
        first, last = int(joinids[0]), int(joinids[-1])
        if last - first + 1 == len(joinids):
            return cls(first, last)
        bits = np.zeros(last - first + 1, dtype=bool)
        bits[joinids - first] = True
        return cls(first, last, np.packbits(bits))

    def joinids(self) -> np.ndarray:
        """The selected joinids, sorted (int64)."""
        if self.mask is None:
            return np.arange(self.first, self.last + 1, dtype=np.int64)
        bits = np.unpackbits(self.mask, count=self.last - self.first + 1)
        return self.first + np.flatnonzero(bits).astype(np.int64)

    def coords(self) -> slice | np.ndarray:
        """What to read: a slice (SOMA slices include their end) or the joinids."""
        return slice(self.first, self.last) if self.mask is None else self.joinids()


@dataclass(frozen=True, eq=False)
class SomaRows:
    """Reads the entries of one block of cells of a SOMA X layer as a CSR matrix.

    Picklable: it holds the layer's URI, the TileDB config as strings and the timestamp,
    never an open handle, so a task graph of it runs on any Dask cluster.

    Parameters
    ----------
    uri : str
        URI of the X layer (a SOMA sparse array).
    config : tuple of (str, str)
        TileDB config parameters.
    timestamp_ms : int
        Read the layer as it was at this time (the experiment's when first opened).
    features : numpy.ndarray of int64 or None
        The var ``soma_joinid``\\ s of the columns, sorted; None when they are all of
        ``0..n_features-1`` (the whole range is read).
    n_features : int
        Number of columns.
    dtype : numpy.dtype
        Element type of the layer.
    """

    uri: str
    config: tuple[tuple[str, str], ...]
    timestamp_ms: int
    features: np.ndarray | None
    n_features: int
    dtype: np.dtype

    def __call__(self, cells: CellRun) -> sparse.csr_matrix:
        soma = _soma()
        rows = cells.joinids()
        columns: slice | np.ndarray = slice(None) if self.features is None else self.features
        with soma.SparseNDArray.open(
            self.uri, context=_context(self.config), tiledb_timestamp=self.timestamp_ms
        ) as layer:
            table = layer.read(coords=(cells.coords(), columns)).tables().concat()
        dim0 = table.column("soma_dim_0").to_numpy()
        dim1 = table.column("soma_dim_1").to_numpy()
        values = table.column("soma_data").to_numpy()
        i = dim0 - cells.first if cells.mask is None else np.searchsorted(rows, dim0)
        j = dim1 if self.features is None else np.searchsorted(self.features, dim1)
        values = values.astype(self.dtype, copy=False)
        shape = (len(rows), self.n_features)
        if len(i) and bool(np.all(i[1:] >= i[:-1])):
            # TileDB returns a row range's entries in row order (its cell order): CSR at
            # once, 2-3x cheaper than through COO
            indptr = np.zeros(shape[0] + 1, dtype=np.int64)
            np.cumsum(np.bincount(i, minlength=shape[0]), out=indptr[1:])
            block = sparse.csr_matrix((values, j, indptr), shape=shape)
        else:
            block = sparse.coo_matrix((values, (i, j)), shape=shape).tocsr()
        if not block.has_sorted_indices:
            block.sort_indices()
        return block


def _lazy(reader: SomaRows, runs: list[CellRun], sizes: tuple[int, ...]) -> da.Array:
    """A Dask array with one task per cell run: ``reader(run)``."""
    from dask.base import tokenize

    name = f"read-soma-{tokenize(reader.uri, reader.timestamp_ms, runs, reader.features)}"
    layer: dict[Any, Any] = {(name, i, 0): (reader, run) for i, run in enumerate(runs)}
    graph = HighLevelGraph.from_collections(name, layer, dependencies=())
    meta = sparse.csr_matrix((0, 0), dtype=reader.dtype)
    return da.Array(graph, name, chunks=(sizes, (reader.n_features,)), meta=meta)


def _runs(cells: np.ndarray, chunk_cells: int) -> tuple[list[CellRun], tuple[int, ...]]:
    starts = range(0, len(cells), chunk_cells)
    runs = [CellRun.of(cells[s : s + chunk_cells]) for s in starts]
    return runs, tuple(min(chunk_cells, len(cells) - s) for s in starts)


# -- reading -------------------------------------------------------------------------


def read_soma(
    data: str | os.PathLike[str],
    *,
    measurement: str = "RNA",
    layer: str | None = None,
    obs_filter: str | None = None,
    obs_columns: Sequence[str] | None = None,
    var_filter: str | None = None,
    features: Sequence[str] | None = None,
    var_column: str | None = None,
    chunk_cells: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Expression:
    """Present one X layer of a SOMA experiment lazily as a (cells, features) Dask array.

    Parameters
    ----------
    data : str or os.PathLike
        The experiment: a local folder, ``soma://<path or URI>`` or a ``tiledb://`` URI.
    measurement : str, default "RNA"
        Measurement (``experiment.ms``) whose X and var are read.
    layer : str, optional
        X layer, e.g. ``"raw"`` or ``"data"``; default ``"data"`` (the name
        ``tiledbsoma.io.from_anndata`` gives X), else the only layer there is.
    obs_filter : str, optional
        SOMA value filter on obs selecting the cells, e.g. ``"tissue == 'lung'"``; pushed
        down: only the selected cells' entries are read.
    obs_columns : sequence of str, optional
        The obs columns to read (e.g. those the formulas use); default all. The filter's
        columns need not be among them.
    var_filter : str, optional
        SOMA value filter on var selecting the features; pushed down like ``obs_filter``.
    features : sequence of str, optional
        Names (in ``var_column``) of the features to read; pushed down. Columns come in
        var order.
    var_column : str, optional
        The var column of feature names; default ``var_id`` (``from_anndata``'s var
        index), else ``feature_name`` (the Census).
    chunk_cells : int, optional
        Cells per block; default about 5 million non-zeros per block (1,000 to 100,000
        cells), estimated from the stored entry count.
    storage_options : dict, optional
        TileDB config parameters for remote experiments (values are sent as strings).

    Returns
    -------
    Expression
        CSR blocks of consecutive selected cells; obs indexed by ``obs_id`` when it is
        read (all columns), else by ``soma_joinid``. Nothing of X has been read.

    Raises
    ------
    InputError
        tiledbsoma is not installed, or a bad ``chunk_cells``.
    DataError
        Not a SOMA experiment; unknown measurement, layer, obs or var column (the message
        lists what exists); a filter that does not parse; no cell or feature selected.
    """
    from flashmm_dask.io.readers import Expression

    if chunk_cells is not None and (
        isinstance(chunk_cells, bool) or not isinstance(chunk_cells, int) or chunk_cells < 1
    ):
        raise InputError(f"chunk_cells must be a positive integer, got {chunk_cells!r}")
    soma = _soma()
    shown, uri, config = os.fspath(data), _uri(data), _config(storage_options)
    with _open_experiment(soma, uri, shown, config) as exp:
        timestamp = int(exp.tiledb_timestamp_ms)
        ms = _member(exp.ms, measurement, "measurement", f"SOMA experiment {shown!r}")
        where = f"SOMA experiment {shown!r}, measurement {measurement!r}"
        layer, x = _x_layer(soma, ms, layer, where)
        what = f"{where}, X layer {layer!r}"
        n_cells, n_features = (int(s) for s in x.shape)
        dtype = np.dtype(x.schema.field("soma_data").type.to_pandas_dtype())
        check_matrix((n_cells, n_features), dtype, what)
        obs = _read_obs(exp.obs, obs_filter, obs_columns, shown)
        names, var_ids = _read_var(ms.var, var_filter, features, var_column, where)
        nnz, x_uri = int(x.nnz), str(x.uri)
    if len(obs) == 0:
        raise DataError(f"obs_filter {obs_filter!r} selects no cell of {what}")
    cells = obs.pop(_JOINID).to_numpy(dtype=np.int64)
    if cells[-1] >= n_cells or var_ids[-1] >= n_features:
        raise DataError(
            f"{what} ({n_cells} x {n_features}) is smaller than its obs or var; the "
            "experiment is inconsistent: write it again"
        )
    all_features = len(var_ids) == n_features  # joinids are distinct and in range
    rows = chunk_cells or default_sparse_rows(len(cells), max(1, round(nnz * len(cells) / n_cells)))
    reader = SomaRows(
        x_uri, config, timestamp, None if all_features else var_ids, len(var_ids), dtype
    )
    runs, sizes = _runs(cells, rows)
    filters = "".join(
        f", {label} {text!r}"
        for label, text in (("obs_filter", obs_filter), ("var_filter", var_filter))
        if text is not None
    )
    source = (
        f"{what} (soma_sparse_ndarray, {len(cells)} of {n_cells} cells x {len(var_ids)} of "
        f"{n_features} features{filters})"
    )
    logger.debug("%s: %d blocks of up to %d cells", source, len(runs), rows)
    return Expression(data=_lazy(reader, runs, sizes), features=names, obs=obs, source=source)


class _open_experiment:
    """Open an experiment read-only, or raise the DataError that says what is there."""

    def __init__(self, soma: Any, uri: str, shown: str, config: tuple[tuple[str, str], ...]):
        self.soma, self.uri, self.shown, self.config = soma, uri, shown, config
        self.exp: Any = None

    def __enter__(self) -> Any:
        soma, shown = self.soma, self.shown
        try:
            obj = soma.open(self.uri, context=_context(self.config))
        except soma.DoesNotExistError as exc:
            raise DataError(
                f"{shown!r} is not a SOMA experiment: nothing TileDB can open is there; give "
                "the folder or URI of an experiment (e.g. written by "
                "tiledbsoma.io.from_anndata)"
            ) from exc
        except soma.SOMAError as exc:
            raise DataError(f"cannot open SOMA experiment {shown!r}: {exc}") from exc
        if not isinstance(obj, soma.Experiment):
            kind = getattr(obj, "soma_type", type(obj).__name__)
            keys = sorted(obj.keys()) if hasattr(obj, "keys") else []
            obj.close()
            raise DataError(
                f"{shown!r} is a {kind}, not a SOMA experiment; give the experiment's own "
                "path" + (f" (its members: {', '.join(map(str, keys))})" if keys else "")
            )
        self.exp = obj
        return obj

    def __exit__(self, *exc: object) -> None:
        self.exp.close()


def _member(collection: Any, key: str, kind: str, where: str) -> Any:
    keys = sorted(collection.keys())
    if key not in keys:
        raise DataError(
            f"{kind} {key!r} not found in {where}; available: {', '.join(keys) or '(none)'}"
        )
    return collection[key]


def _x_layer(soma: Any, ms: Any, layer: str | None, where: str) -> tuple[str, Any]:
    if "X" not in ms:
        raise DataError(f"{where} has no X collection; it holds {', '.join(sorted(ms.keys()))}")
    names = sorted(ms.X.keys())
    if layer is None:
        if "data" in names:
            layer = "data"
        elif len(names) == 1:
            layer = names[0]
        else:
            raise DataError(
                f"{where} has X layers {', '.join(names) or '(none)'} and none is named "
                "'data'; choose one with layer= (data.layer in a config)"
            )
    x = _member(ms.X, layer, "X layer", where)
    if not isinstance(x, soma.SparseNDArray):
        raise DataError(
            f"X layer {layer!r} of {where} is a {x.soma_type}; only sparse X layers "
            "(SOMASparseNDArray) can be read"
        )
    return layer, x


def _columns(frame: Any) -> list[str]:
    return [name for name in frame.schema.names if name != _JOINID]


def _filtered_read(
    frame: Any, value_filter: str | None, columns: list[str], label: str, where: str
) -> pd.DataFrame:
    """``frame``'s joinids and ``columns`` of the rows that pass ``value_filter``."""
    soma = _soma()
    try:
        table = frame.read(column_names=[_JOINID, *columns], value_filter=value_filter).concat()
    except soma.SOMAError as exc:
        text = str(exc).strip().splitlines()[0]
        if "does not exist" in text or "No column named" in text:
            raise DataError(
                f"{label} {value_filter!r} names a column that {where} does not have "
                f"({text}); its columns: {', '.join(_columns(frame))}"
            ) from exc
        raise DataError(
            f"{label} {value_filter!r} on {where} is not a valid SOMA value filter "
            f"({text}); write it as e.g. \"tissue == 'lung' and n_genes > 200\""
        ) from exc
    out = table.to_pandas()
    return out.sort_values(_JOINID, kind="stable").reset_index(drop=True)


def _read_obs(
    obs: Any, obs_filter: str | None, obs_columns: Sequence[str] | None, shown: str
) -> pd.DataFrame:
    available = _columns(obs)
    if obs_columns is None:
        wanted = available
    else:
        wanted = list(dict.fromkeys(obs_columns))
        missing = [c for c in wanted if c not in available]
        if missing:
            raise DataError(
                f"obs column(s) {', '.join(map(repr, missing))} not found in SOMA experiment "
                f"{shown!r}; its obs columns: {', '.join(available)}"
            )
    frame = _filtered_read(obs, obs_filter, wanted, "obs_filter", f"the obs of {shown!r}")
    index = OBS_ID if OBS_ID in wanted else _JOINID
    out = frame.set_index(frame[index].astype(str) if index == OBS_ID else frame[_JOINID])
    out.index.name = None
    out = out.drop(columns=[OBS_ID] if index == OBS_ID else [])
    if obs_filter is not None:
        for name in out.columns:
            if isinstance(out[name].dtype, pd.CategoricalDtype):
                out[name] = out[name].cat.remove_unused_categories()
    return out


def _read_var(
    var: Any,
    var_filter: str | None,
    features: Sequence[str] | None,
    var_column: str | None,
    where: str,
) -> tuple[pd.Index, np.ndarray]:
    """Feature names and var joinids (sorted) of the selected features."""
    available = _columns(var)
    if var_column is None:
        found = [c for c in VAR_COLUMNS if c in available]
        if not found:
            raise DataError(
                f"the var of {where} has none of the columns {', '.join(VAR_COLUMNS)}; name "
                f"the column of feature names with var_column= (data.var_column): "
                f"{', '.join(available)}"
            )
        var_column = found[0]
    elif var_column not in available:
        raise DataError(
            f"var_column {var_column!r} not found in the var of {where}; its columns: "
            f"{', '.join(available)}"
        )
    frame = _filtered_read(var, var_filter, [var_column], "var_filter", f"the var of {where}")
    names = frame[var_column].astype(str)
    if features is not None:
        wanted = [str(f) for f in features]
        known = set(names)
        missing = [f for f in wanted if f not in known]
        if missing:
            shown = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
            raise DataError(
                f"{len(missing)} selected feature(s) not in the {var_column!r} column of the "
                f"var of {where}{' (after var_filter)' if var_filter else ''}: {shown}"
            )
        keep = names.isin(set(wanted)).to_numpy()
        frame, names = frame[keep], names[keep]
    if len(frame) == 0:
        raise DataError(f"var_filter {var_filter!r} selects no feature of {where}")
    return pd.Index(names.to_numpy(), dtype=object), frame[_JOINID].to_numpy(dtype=np.int64)
