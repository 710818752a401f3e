"""Expression data as a lazy Dask array over cells, from stores or from memory.

:func:`read_expression` is the single entry point. It accepts

1. a local path or fsspec URL (``file://``, ``memory://``, ``s3://``, ``gs://``, ...;
   ``storage_options`` go to the filesystem) of

   - an AnnData ``.zarr`` store (Zarr format 2 or 3, sharded or not) or ``.h5ad`` file:
     X or a named ``layer``, stored as CSR, CSC or a dense array;
   - a plain 2-D Zarr array (not AnnData), with ``orientation`` saying which axis holds
     the cells, cell metadata as ``obs`` (DataFrame or CSV path) and optional
     ``features`` names;

   - a TileDB-SOMA experiment (a folder that is one, ``*.soma``, ``soma://...`` or
     ``tiledb://...``): X layer ``layer`` of measurement "RNA", read by
     :func:`flashmm_dask.io.soma.read_soma` (which also takes obs and var filters);

2. an in-memory matrix: ``numpy.ndarray``, ``scipy.sparse`` matrix or array,
   ``dask.array.Array``, an opened ``zarr.Array`` or ``zarr.Group``, or an
   ``anndata.AnnData`` (X or a layer; backed or not).

and returns an :class:`Expression`: a (cells, features) Dask array chunked along cells,
whose blocks are ``numpy.ndarray`` (dense data) or ``scipy.sparse.csr_matrix`` (sparse
data, whatever the stored encoding), with the feature names and the cell metadata.

What is lazy and what is loaded
-------------------------------
Loaded when :func:`read_expression` is called (all small): the store's attributes, the
matrix element's encoding, shape and dtype, ``obs`` (one row per cell, read with
``anndata.io.read_elem``) and the ``var`` index (feature names). Lazy: every value of
the matrix (for sparse stores also ``indptr``, ``indices`` and ``data``). Nothing of the
matrix is read until the Dask array is computed, and then each task reads only its own
row chunk, so memory per task does not grow with the number of cells.

- CSR stores: a task reads the ``indptr`` slice of its rows and then only their entries
  (through ``anndata.io.sparse_dataset``).
- CSC stores: entries of a row chunk are scattered over all columns, so each task scans
  every stored entry in bounded batches and keeps its rows. This is correct but reads the
  matrix once per row chunk; write the store as CSR for one-pass speed, or use a large
  ``chunk_cells`` to have fewer chunks.
- Dense stores: Zarr arrays are read with ``anndata.experimental.read_elem_lazy`` in row
  chunks aligned to the stored chunks (features keep their stored chunking); HDF5
  datasets are read in row chunks over all features.
- ``.h5ad`` files are opened inside each task (no open HDF5 handle is in the task graph),
  so the graph runs on multi-process and multi-machine Dask clusters.
- In-memory inputs are already in memory; the Dask array slices them without copying
  (sparse input that is not CSR is converted to CSR once).

Row chunk size (``chunk_cells``): for sparse data about 5 million non-zeros per block
(1,000 to 100,000 cells; read from the stored entry count, nothing is scanned); for dense
data about 128 MiB per block (at most 10,000 cells), rounded to the store's own row chunks.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, cast

import anndata as ad
import dask.array as da
import h5py
import numpy as np
import pandas as pd
import zarr
from scipy import sparse

from flashmm_dask.errors import DataError, DuplicateFeatureWarning, InputError
from flashmm_dask.io import _stores
from flashmm_dask.io._blocks import as_csr_or_ndarray
from flashmm_dask.io._stores import BackedMatrix, StoredMatrix, check_lengths, check_matrix
from flashmm_dask.io.obs import _load_obs, _obs_frame, _type_name, read_obs
from flashmm_dask.io.paths import locate
from flashmm_dask.io.soma import is_soma, read_soma

__all__ = ["ORIENTATIONS", "Expression", "read_expression", "read_obs"]

logger = logging.getLogger(__name__)

Orientation = Literal["cells_x_features", "features_x_cells"]
#: The two accepted values of ``orientation``.
ORIENTATIONS: tuple[Orientation, ...] = ("cells_x_features", "features_x_cells")


def unique_features(features: pd.Index, what: str) -> pd.Index:
    """``features`` with duplicated names made unique as anndata's ``var_names_make_unique``.

    The second ``GENE`` becomes ``GENE-1``, the third ``GENE-2`` (a
    :class:`~flashmm_dask.errors.DuplicateFeatureWarning` names the duplicates and their
    count), so every row of the results names one feature and ``data.features`` can select
    each copy. Unique names are returned as they are (the same object).
    """
    if features.is_unique:
        return features
    from anndata.utils import make_index_unique

    counts = features.value_counts()
    counts = counts[counts > 1]
    shown = ", ".join(f"{name!r} x{int(k)}" for name, k in counts.head(5).items())
    more = f" and {len(counts) - 5} more" if len(counts) > 5 else ""
    unique = make_index_unique(pd.Index(features.astype(str)), join="-")
    warnings.warn(
        f"duplicated feature names in {what}: {shown}{more} (name x copies); they are made "
        "unique as anndata's var_names_make_unique does (the second 'NAME' is 'NAME-1'); "
        "in data.features these names select one copy and 'NAME' every copy; or make "
        "var_names unique in the data",
        DuplicateFeatureWarning,
        stacklevel=2,
    )
    return unique


@dataclass(frozen=True, repr=False)
class Expression:
    """Expression values of ``n_cells`` cells and ``n_features`` features.

    Attributes
    ----------
    data : dask.array.Array
        Shape (n_cells, n_features), chunked along cells (features in one chunk or
        several). Every block is a ``numpy.ndarray`` or a ``scipy.sparse.csr_matrix``.
    features : pandas.Index
        Feature (gene) names, length n_features.
    obs : pandas.DataFrame or None
        Cell metadata, one row per cell in ``data``'s row order; None when not given.
    source : str
        Where the data came from, e.g. ``"AnnData Zarr store (format 3) /x/y.zarr, layer
        'counts' (csr_matrix, 5000 cells x 2000 features)"``.
    """

    data: da.Array
    features: pd.Index
    obs: pd.DataFrame | None
    source: str

    def __post_init__(self) -> None:
        if not isinstance(self.data, da.Array) or self.data.ndim != 2:
            raise DataError(f"Expression.data must be a 2-D dask array, got {type(self.data)}")
        check_lengths(
            self.n_cells, self.n_features, obs=self.obs, features=self.features, what=self.source
        )
        unique = unique_features(self.features, self.source)
        if unique is not self.features:
            self.__dict__["_as_read"] = self.features
            object.__setattr__(self, "features", unique)

    @property
    def features_as_read(self) -> pd.Index:
        """The feature names as the data have them (``features`` makes repeated ones
        unique)."""
        return self.__dict__.get("_as_read", self.features)

    @property
    def n_cells(self) -> int:
        """Number of cells (rows of ``data``)."""
        return int(self.data.shape[0])

    @property
    def n_features(self) -> int:
        """Number of features (columns of ``data``)."""
        return int(self.data.shape[1])

    @property
    def is_sparse(self) -> bool:
        """Whether the blocks are ``csr_matrix`` (else ``ndarray``)."""
        return sparse.issparse(self.data._meta)

    def __repr__(self) -> str:
        kind = "csr_matrix" if self.is_sparse else "ndarray"
        return (
            f"Expression({self.n_cells} cells x {self.n_features} features, "
            f"{len(self.data.chunks[0])} row chunks of {kind}, source={self.source!r})"
        )


#: What :func:`read_expression` reads: a store's path or URL, or data in memory.
ExpressionSource: TypeAlias = (
    str
    | os.PathLike[str]
    | Expression
    | ad.AnnData
    | np.ndarray
    | sparse.spmatrix
    | sparse.sparray
    | da.Array
    | zarr.Array
    | zarr.Group
)


def read_expression(
    data: ExpressionSource,
    *,
    layer: str | None = None,
    orientation: Orientation | None = None,
    obs: pd.DataFrame | str | os.PathLike[str] | None = None,
    features: Sequence[str] | pd.Index | None = None,
    chunk_cells: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Expression:
    """Present expression data lazily as a (cells, features) Dask array.

    Parameters
    ----------
    data : str, os.PathLike, AnnData, numpy.ndarray, scipy.sparse matrix, dask array, zarr
        An AnnData ``.zarr``/``.h5ad`` store or plain Zarr array (path or fsspec URL), a
        SOMA experiment, or an in-memory matrix or AnnData; see the module docstring. An
        :class:`Expression` (e.g. from :func:`flashmm_dask.io.soma.read_soma`) is returned
        as it is.
    layer : str, optional
        AnnData layer to read instead of X.
    orientation : {"cells_x_features", "features_x_cells"}, optional
        Which axis of a plain matrix or Zarr array holds the cells. Required for plain
        matrices unless ``obs`` is given and exactly one axis has its length. AnnData is
        always cells x features.
    obs : pandas.DataFrame or str or os.PathLike, optional
        Cell metadata (or a CSV file of it; a first column without a header is the index),
        one row per cell. Replaces an AnnData's own obs when given.
    features : sequence of str, optional
        Feature names, length n_features. Default: the AnnData var names, else "0", "1", ...
    chunk_cells : int, optional
        Cells per row chunk; default about 5 million non-zeros per block for sparse data
        (1,000 to 100,000 cells) and about 128 MiB blocks for dense data, aligned to the
        store's own chunks.
    storage_options : dict, optional
        fsspec options for URLs (and for a CSV ``obs`` URL), e.g. credentials for s3://.

    Returns
    -------
    Expression
        Lazy data, feature names and obs. Nothing of the matrix has been read.

    Raises
    ------
    DataError
        Missing, unreadable, empty or non-AnnData store; unknown layer; obs or features
        of the wrong length; missing orientation; unsupported input type.
    InputError
        Invalid ``orientation`` or ``chunk_cells`` value.
    """
    if chunk_cells is not None and (
        isinstance(chunk_cells, bool) or not isinstance(chunk_cells, int | np.integer)
    ):
        raise InputError(f"chunk_cells must be a positive integer, got {chunk_cells!r}")
    if chunk_cells is not None and chunk_cells < 1:
        raise InputError(f"chunk_cells must be a positive integer, got {chunk_cells}")
    if orientation is not None and orientation not in ORIENTATIONS:
        raise InputError(
            f"orientation must be 'cells_x_features' or 'features_x_cells', got {orientation!r}"
        )
    rows = None if chunk_cells is None else int(chunk_cells)
    obs_df = _load_obs(obs, storage_options)
    names = None if features is None else pd.Index(features)
    request = _Request(layer, orientation, obs_df, names, rows)

    if isinstance(data, Expression):  # e.g. from read_soma with filters: as it is
        options = {"layer": layer, "orientation": orientation, "obs": obs}
        given = [k for k, v in {**options, "features": features}.items() if v is not None]
        if given or chunk_cells is not None:
            raise DataError(
                f"data is already an Expression; drop {', '.join(given or ['chunk_cells'])}"
            )
        return data
    if is_soma(data):  # TileDB-SOMA experiment: its own reader (flashmm_dask.io.soma)
        return _from_soma(data, storage_options, request)
    if isinstance(data, str | os.PathLike):
        return _from_location(data, storage_options, request)
    if isinstance(data, ad.AnnData):
        return _from_anndata(data, request)
    if isinstance(data, zarr.Group | zarr.Array):
        return _from_zarr_node(data, f"Zarr node {data.store_path}", request)
    if isinstance(data, h5py.HLObject):
        raise DataError(
            f"got an open h5py {type(data).__name__}; pass the .h5ad file's path instead "
            "(open HDF5 handles cannot be sent to Dask workers)"
        )
    if layer is not None:
        raise DataError(f"layer={layer!r} applies to AnnData inputs only, not {_type_name(data)}")
    return _from_matrix(data, request, f"in-memory {_type_name(data)}")


@dataclass(frozen=True)
class _Request:
    """The caller's options, validated."""

    layer: str | None
    orientation: Orientation | None
    obs: pd.DataFrame | None
    features: pd.Index | None
    chunk_cells: int | None


def _check_anndata_orientation(request: _Request, what: str) -> None:
    if request.orientation not in (None, "cells_x_features"):
        raise DataError(
            f"{what} is AnnData, which is always cells x features; drop "
            f"orientation={request.orientation!r}"
        )


def _finish(stored: StoredMatrix, request: _Request) -> Expression:
    return Expression(
        data=stored.data,
        features=stored.features if request.features is None else request.features,
        obs=stored.obs if request.obs is None else request.obs,
        source=stored.description,
    )


def _from_location(
    data: str | os.PathLike[str], storage_options: Mapping[str, Any] | None, request: _Request
) -> Expression:
    loc = locate(data, storage_options)
    if _stores.store_kind(loc) == "hdf5":
        where = f"AnnData HDF5 file {loc.shown!r}"
        _check_anndata_orientation(request, where)
        with _stores.open_hdf5(loc) as file:
            stored = _stores.read_anndata(
                file,
                element_for=_stores.h5_element_for(loc),
                where=where,
                layer=request.layer,
                chunk_cells=request.chunk_cells,
            )
        return _finish(stored, request)
    return _from_zarr_node(_stores.open_zarr(loc), repr(loc.shown), request)


def _from_soma(
    data: str | os.PathLike[str], storage_options: Mapping[str, Any] | None, request: _Request
) -> Expression:
    _check_anndata_orientation(request, f"SOMA experiment {os.fspath(data)!r}")
    expr = read_soma(
        data, layer=request.layer, chunk_cells=request.chunk_cells, storage_options=storage_options
    )
    return Expression(
        data=expr.data,
        features=expr.features if request.features is None else request.features,
        obs=expr.obs if request.obs is None else request.obs,
        source=expr.source,
    )


def _from_zarr_node(node: zarr.Group | zarr.Array, shown: str, request: _Request) -> Expression:
    fmt = node.metadata.zarr_format
    if isinstance(node, zarr.Array):
        if request.layer is not None:
            raise DataError(
                f"layer={request.layer!r} applies to AnnData stores, but {shown} is a plain "
                "Zarr array"
            )
        return _from_plain_zarr(node, f"Zarr array (format {fmt}) {shown}", request)
    if not _stores.is_anndata(node):
        arrays = sorted(node.array_keys())
        raise DataError(
            f"{shown} is a Zarr group but not an AnnData store (no anndata encoding-type "
            "attribute). For a plain Zarr array, give the array's own path with "
            "orientation='cells_x_features' or 'features_x_cells'"
            + (f"; arrays in this group: {', '.join(arrays)}" if arrays else "")
        )
    where = f"AnnData Zarr store (format {fmt}) {shown}"
    _check_anndata_orientation(request, where)
    stored = _stores.read_anndata(
        node,
        element_for=_stores.zarr_element_for,
        where=where,
        layer=request.layer,
        chunk_cells=request.chunk_cells,
    )
    return _finish(stored, request)


def _resolve_orientation(shape: tuple[int, int], request: _Request, what: str) -> Orientation:
    if request.orientation is not None:
        return request.orientation
    if request.obs is not None:
        n_obs = len(request.obs)
        matches = [axis for axis in (0, 1) if shape[axis] == n_obs]
        if len(matches) == 1:
            return ORIENTATIONS[matches[0]]
        if not matches:
            raise DataError(
                f"obs has {n_obs} rows but {what} has shape {shape[0]} x {shape[1]}; neither "
                "axis matches the number of cells. Give one obs row per cell."
            )
    raise DataError(
        f"orientation is required for {what} of shape {shape[0]} x {shape[1]}: pass "
        "orientation='cells_x_features' if rows are cells, or 'features_x_cells' if rows "
        "are features (genes)"
    )


def _default_features(request: _Request, n_features: int) -> pd.Index:
    if request.features is not None:
        return request.features
    return pd.Index([str(i) for i in range(n_features)])


def _expression(data: da.Array, request: _Request, source: str) -> Expression:
    return Expression(
        data=data,
        features=_default_features(request, int(data.shape[1])),
        obs=request.obs,
        source=source,
    )


def _from_plain_zarr(array: zarr.Array, what: str, request: _Request) -> Expression:
    shape = cast(tuple[int, int], tuple(array.shape))
    check_matrix(shape, np.dtype(array.dtype), what)
    orientation = _resolve_orientation(shape, request, what)
    stored = _stores.stored_chunks(array)
    cell_axis = ORIENTATIONS.index(orientation)
    feature_axis = 1 - cell_axis
    n_features = int(array.shape[feature_axis])
    feature_chunk = min(stored[feature_axis], n_features)
    rows = request.chunk_cells or _stores.default_dense_rows(
        feature_chunk, array.dtype.itemsize, stored[cell_axis]
    )
    rows = min(rows, int(array.shape[cell_axis]))
    chunks = (rows, feature_chunk) if cell_axis == 0 else (feature_chunk, rows)
    data = da.from_zarr(array, chunks=chunks)
    if cell_axis == 1:
        data = data.T
    n_cells = int(data.shape[0])
    source = f"{what} ({orientation}, {n_cells} cells x {n_features} features)"
    return _expression(data, request, source)


def _from_anndata(adata: ad.AnnData, request: _Request) -> Expression:
    what = "AnnData object"
    if adata.isbacked:
        what = f"AnnData backed by {os.fspath(adata.filename)!r}"
        if adata.is_view:
            raise DataError(
                f"a view of an {what} cannot be read lazily; write the subset to a store "
                "(view.write_h5ad(...)) or load it with view.to_memory()"
            )
    _check_anndata_orientation(request, what)
    if request.layer is None:
        matrix, part = adata.X, "X"
        if matrix is None:
            raise DataError(
                f"{what} has no X; choose one of its layers with layer=: "
                f"{', '.join(sorted(adata.layers.keys())) or '(none)'}"
            )
    else:
        if request.layer not in adata.layers:
            raise DataError(
                f"layer {request.layer!r} not found in {what}; available layers: "
                f"{', '.join(sorted(adata.layers.keys())) or '(none)'} (or layer=None for X)"
            )
        matrix, part = adata.layers[request.layer], f"layer {request.layer!r}"
    filled = _Request(
        layer=None,
        orientation="cells_x_features",
        obs=_obs_frame(adata.obs) if request.obs is None else request.obs,
        features=adata.var_names if request.features is None else request.features,
        chunk_cells=request.chunk_cells,
    )
    return _from_matrix(matrix, filled, f"{what}, {part}")


def _from_matrix(matrix: object, request: _Request, what: str) -> Expression:
    if isinstance(matrix, ad.abc.CSRDataset | ad.abc.CSCDataset | h5py.Dataset):
        return _from_backed(matrix, request, what)
    if isinstance(matrix, da.Array):
        return _from_dask(matrix, request, what)
    if isinstance(matrix, sparse.spmatrix | sparse.sparray):
        shape = cast(tuple[int, int], tuple(matrix.shape))
        check_matrix(shape, np.dtype(matrix.dtype), what)
        orientation = _resolve_orientation(shape, request, what)
        csr = sparse.csr_matrix(matrix.T if orientation == "features_x_cells" else matrix)
        rows = request.chunk_cells or _stores.default_sparse_rows(csr.shape[0], csr.nnz)
        meta = sparse.csr_matrix((0, 0), dtype=csr.dtype)
        data = da.from_array(csr, chunks=(rows, -1), asarray=False, fancy=False, meta=meta)
    elif isinstance(matrix, np.ndarray):
        array = np.asarray(matrix)  # np.matrix and array views become plain ndarrays
        shape = cast(tuple[int, int], tuple(array.shape))
        check_matrix(shape, array.dtype, what)
        orientation = _resolve_orientation(shape, request, what)
        array = array.T if orientation == "features_x_cells" else array
        rows = request.chunk_cells or _stores.default_dense_rows(
            array.shape[1], array.dtype.itemsize
        )
        data = da.from_array(array, chunks=(rows, -1))
    else:
        raise DataError(
            f"unsupported input type {_type_name(matrix)}; pass an AnnData .zarr/.h5ad path "
            "or URL, a Zarr array path, an AnnData object, a numpy ndarray, a scipy.sparse "
            "matrix or a dask array"
        )
    source = f"{what} ({orientation}, {data.shape[0]} cells x {data.shape[1]} features)"
    return _expression(data, request, source)


def _from_dask(matrix: da.Array, request: _Request, what: str) -> Expression:
    if matrix.ndim != 2:
        raise DataError(f"{what} has {matrix.ndim} dimensions; expected a 2-D matrix")
    if any(np.isnan(size) for size in matrix.shape):
        raise DataError(f"{what} has unknown chunk sizes; call .compute_chunk_sizes() on it first")
    shape = cast(tuple[int, int], tuple(int(s) for s in matrix.shape))
    check_matrix(shape, np.dtype(matrix.dtype), what)
    orientation = _resolve_orientation(shape, request, what)
    data = matrix.T if orientation == "features_x_cells" else matrix
    meta = data._meta
    if sparse.issparse(meta):
        new_meta: Any = sparse.csr_matrix((0, 0), dtype=data.dtype)
    elif isinstance(meta, np.ndarray):
        new_meta = np.empty((0, 0), dtype=data.dtype)
    else:
        raise DataError(
            f"{what} has blocks of type {_type_name(meta)}; only numpy and scipy.sparse "
            "blocks are supported (map them with .map_blocks first)"
        )
    if request.chunk_cells is not None:
        data = data.rechunk({0: min(request.chunk_cells, int(data.shape[0]))})
    data = da.map_blocks(as_csr_or_ndarray, data, dtype=data.dtype, meta=new_meta)
    source = f"{what} ({orientation}, {data.shape[0]} cells x {data.shape[1]} features)"
    return _expression(data, request, source)


def _from_backed(matrix: BackedMatrix, request: _Request, what: str) -> Expression:
    """A matrix that lives in a store: an anndata sparse dataset or an h5py dataset."""
    shape = cast(tuple[int, int], tuple(int(s) for s in matrix.shape))
    check_matrix(shape, np.dtype(matrix.dtype), what)
    if _resolve_orientation(shape, request, what) != "cells_x_features":
        raise DataError(f"{what} is stored features x cells; only cells x features is readable")
    data = _stores.backed_rows(matrix, request.chunk_cells)
    source = f"{what} (cells_x_features, {shape[0]} cells x {shape[1]} features)"
    return _expression(data, request, source)
