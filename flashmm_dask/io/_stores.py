"""Finding, opening and lazily reading on-disk expression stores.

A store's :class:`~flashmm_dask.io.paths.Location` (a local path or an fsspec URL) holds
either a Zarr hierarchy (a directory: AnnData ``.zarr`` store, Zarr format 2 or 3, or a
plain 2-D Zarr array) or an HDF5 file (AnnData ``.h5ad``).

For an AnnData store this module reads the small metadata eagerly (root attributes, the
matrix element's encoding and shape, ``obs`` and the ``var`` index) and builds the
matrix as a Dask array of row chunks that reads nothing until it is computed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal, TypeAlias, cast

import anndata as ad
import dask.array as da
import fsspec
import h5py
import numpy as np
import pandas as pd
import zarr
from zarr.abc.store import Store

from flashmm_dask.errors import DataError
from flashmm_dask.io._blocks import (
    DenseRows,
    Element,
    H5Element,
    SparseEncoding,
    SparseRows,
    ZarrElement,
    lazy_rows,
)
from flashmm_dask.io.paths import Location

logger = logging.getLogger(__name__)

#: Cells per block for sparse matrices when the caller does not choose.
DEFAULT_CHUNK_CELLS = 10_000
#: Non-zeros per sparse block when the caller does not choose: per-block overheads (task,
#: design evaluation, partial sums of p x m and q x m) then cost little against the
#: products, and a block's arrays stay ~40-80 MB (benchmarks/RESULTS.md, section 4).
SPARSE_BLOCK_NNZ = 5_000_000
#: Bounds of the cells per sparse block chosen from :data:`SPARSE_BLOCK_NNZ`.
SPARSE_ROWS_RANGE = (1_000, 100_000)
#: Target size of a dense block when the caller does not choose.
DENSE_BLOCK_BYTES = 128 * 2**20

#: A group of an open Zarr or HDF5 store, and any of its elements (h5py has no type
#: stubs: its classes are Any to mypy).
Group: TypeAlias = zarr.Group | h5py.Group
Node: TypeAlias = zarr.Group | zarr.Array | h5py.Group | h5py.Dataset

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_HDF5_SUFFIXES = (".h5ad", ".h5", ".hdf5")
_SPARSE_ENCODINGS = ("csr_matrix", "csc_matrix")


def store_kind(loc: Location) -> Literal["zarr", "hdf5"]:
    """Whether the location holds a Zarr hierarchy or an HDF5 file.

    Raises
    ------
    DataError
        Nothing exists there, or it is a file that is not HDF5.
    """
    fs, path = loc.fs()
    exists, is_dir = fs.exists(path), fs.isdir(path)
    if not exists:
        raise DataError(
            f"no such store: {loc.shown!r} does not exist; give the path or URL of an AnnData "
            ".zarr/.h5ad store or a Zarr array"
        )
    if is_dir:
        return "zarr"
    if loc.suffix in _HDF5_SUFFIXES or _read_magic(loc) == _HDF5_MAGIC:
        return "hdf5"
    raise DataError(
        f"{loc.shown!r} is a file but not an HDF5 (.h5ad) file; Zarr stores are directories "
        "(zipped Zarr stores are not supported: unzip them first)"
    )


def _read_magic(loc: Location) -> bytes:
    with _open_binary(loc) as handle:
        return bytes(handle.read(len(_HDF5_MAGIC)))


@contextmanager
def _open_binary(loc: Location) -> Iterator[BinaryIO]:
    if loc.local:
        with open(loc.url, "rb") as handle:
            yield handle
    else:
        with fsspec.open(loc.url, mode="rb", **loc.storage_options) as handle:
            yield handle


def open_zarr(loc: Location) -> zarr.Group | zarr.Array:
    """Open a Zarr group or array read-only (format 2 or 3, detected by zarr)."""
    try:
        if loc.local:
            store: Store = zarr.storage.LocalStore(loc.url, read_only=True)
        else:
            store = zarr.storage.FsspecStore.from_url(
                loc.url, storage_options=loc.options, read_only=True
            )
        return zarr.open(store=store, mode="r")
    except FileNotFoundError as exc:
        raise DataError(
            f"{loc.shown!r} is not a Zarr store: no Zarr metadata (zarr.json, .zgroup or "
            ".zarray) found there"
        ) from exc
    except Exception as exc:
        raise DataError(
            f"cannot read the Zarr store {loc.shown!r}; it is unreadable or corrupt ({exc})"
        ) from exc


@contextmanager
def open_hdf5(loc: Location) -> Iterator[h5py.File]:
    """Open an HDF5 file read-only; unreadable or truncated files raise DataError."""
    try:
        if loc.local:
            with h5py.File(loc.url, "r") as file:
                yield file
        else:
            with _open_binary(loc) as handle, h5py.File(handle, "r") as file:
                yield file
    except OSError as exc:
        raise DataError(
            f"cannot read the HDF5 file {loc.shown!r}; it is truncated, corrupt or not HDF5 "
            f"({exc}). Re-copy or re-write the .h5ad file."
        ) from exc


def _attr(node: Node, key: str) -> Any:
    value = node.attrs.get(key)
    return value.decode() if isinstance(value, bytes) else value


def is_anndata(node: Node) -> bool:
    """Whether a Zarr or HDF5 group carries anndata's root encoding attributes."""
    return _attr(node, "encoding-type") == "anndata"


def _require_anndata(root: Group, where: str) -> None:
    if is_anndata(root):
        return
    raise DataError(
        f"{where} is not an AnnData store: its root has no anndata encoding-type attribute "
        "(written by anndata >= 0.8). For a plain 2-D Zarr array give the array's path with "
        "orientation='cells_x_features' or 'features_x_cells'; to use an older .h5ad, "
        "re-write it with a current anndata."
    )


@dataclass(frozen=True)
class StoredMatrix:
    """The eagerly read metadata of an AnnData store and its lazy matrix."""

    data: da.Array
    features: pd.Index
    obs: pd.DataFrame
    description: str


def _matrix_element(root: Any, layer: str | None, where: str) -> Any:
    # Any: a Zarr or HDF5 node whose kind only its encoding attribute tells
    layers = sorted(root["layers"].keys()) if "layers" in root else []
    if layer is None:
        if "X" not in root:
            raise DataError(
                f"{where} has no X matrix; choose one of its layers with layer=: "
                f"{', '.join(layers) or '(none)'}"
            )
        return root["X"]
    if layer not in layers:
        raise DataError(
            f"layer {layer!r} not found in {where}; available layers: "
            f"{', '.join(layers) or '(none)'} (or layer=None for X)"
        )
    return root["layers"][layer]


def read_obs_group(root: Group, where: str) -> pd.DataFrame:
    """Read ``obs`` of an AnnData root group into memory."""
    _require_anndata(root, where)
    try:
        obs = ad.io.read_elem(root["obs"])
    except Exception as exc:
        raise DataError(f"cannot read obs of {where}; the store is corrupt ({exc})") from exc
    return obs


def _read_var_index(root: Group, where: str) -> pd.Index:
    try:
        var: Any = root["var"]
        key = _attr(var, "_index")
        names = ad.io.read_elem(var[key])
    except Exception as exc:
        raise DataError(f"cannot read var names of {where}; the store is corrupt ({exc})") from exc
    return pd.Index(np.asarray(names).astype(object), name=None if key == "_index" else key)


def default_dense_rows(n_features: int, itemsize: int, align: int = 1) -> int:
    """Cells per dense block: about :data:`DENSE_BLOCK_BYTES`, a multiple of ``align``.

    ``align`` is the store's own row chunk, so that no stored chunk is read by two tasks.
    """
    target = max(1, min(DEFAULT_CHUNK_CELLS, DENSE_BLOCK_BYTES // max(1, n_features * itemsize)))
    return align if align >= target else (target // align) * align


def default_sparse_rows(n_cells: int, nnz: int) -> int:
    """Cells per sparse block: about :data:`SPARSE_BLOCK_NNZ` non-zeros, within
    :data:`SPARSE_ROWS_RANGE` (:data:`DEFAULT_CHUNK_CELLS` when there are no non-zeros)."""
    if nnz <= 0 or n_cells <= 0:
        return DEFAULT_CHUNK_CELLS
    low, high = SPARSE_ROWS_RANGE
    return int(min(high, max(low, round(SPARSE_BLOCK_NNZ * n_cells / nnz))))


def read_anndata(
    root: Group,
    *,
    element_for: Callable[[Node], Element],
    where: str,
    layer: str | None,
    chunk_cells: int | None,
) -> StoredMatrix:
    """Read the metadata of an AnnData root group and wrap its matrix lazily.

    Parameters
    ----------
    root : zarr.Group or h5py.Group
        Root group of the store (open for the duration of this call only).
    element_for : callable
        ``element_for(node) -> Element``: how tasks will reach the matrix element ``node``
        (an :class:`H5Element` re-opened per task, or a picklable :class:`ZarrElement`).
    where : str
        Description of the store, for messages.
    layer : str or None
        Layer to read; None for X.
    chunk_cells : int or None
        Cells per block; None for the defaults.

    Returns
    -------
    StoredMatrix
        Lazy (cells, features) matrix with obs and feature names.
    """
    _require_anndata(root, where)
    node = _matrix_element(root, layer, where)
    encoding = _attr(node, "encoding-type")
    what = f"{where}, {'X' if layer is None else f'layer {layer!r}'}"
    try:
        if encoding in _SPARSE_ENCODINGS:
            shape = tuple(int(s) for s in node.attrs["shape"])
            dtype = np.dtype(node["data"].dtype)
        elif encoding == "array":
            shape, dtype = tuple(node.shape), np.dtype(node.dtype)
        else:
            raise DataError(
                f"{what} has encoding {encoding!r}; only csr_matrix, csc_matrix and dense "
                "array matrices can be read. Convert it with anndata and write it again."
            )
    except (KeyError, AttributeError) as exc:
        raise DataError(f"{what} is corrupt: its matrix metadata is incomplete ({exc})") from exc
    check_matrix(shape, dtype, what)
    n_cells, n_features = shape
    obs = read_obs_group(root, where)
    features = _read_var_index(root, where)
    check_lengths(n_cells, n_features, obs=obs, features=features, what=what)
    if encoding in _SPARSE_ENCODINGS:
        rows = chunk_cells or default_sparse_rows(n_cells, int(node["data"].shape[0]))
        element: Element = element_for(node)
        reader = SparseRows(element, cast(SparseEncoding, encoding), n_features)
        data = lazy_rows(
            reader, shape=(n_cells, n_features), dtype=dtype, chunk_rows=rows, sparse_blocks=True
        )
        if encoding == "csc_matrix" and len(data.chunks[0]) > 1:
            logger.warning(
                "%s is stored CSC (by feature): each of its %d row chunks scans all stored "
                "entries; write it as CSR (adata.X = adata.X.tocsr()) to read it in one pass",
                what,
                len(data.chunks[0]),
            )
    elif isinstance(node, zarr.Array):
        data = _dense_zarr(node, chunk_cells)
    else:
        rows = chunk_cells or default_dense_rows(n_features, dtype.itemsize)
        data = lazy_rows(
            DenseRows(element_for(node)),
            shape=(n_cells, n_features),
            dtype=dtype,
            chunk_rows=rows,
            sparse_blocks=False,
        )
    description = f"{what} ({encoding}, {n_cells} cells x {n_features} features)"
    return StoredMatrix(data, features, obs, description)


def _dense_zarr(node: zarr.Array, chunk_cells: int | None) -> da.Array:
    rows_stored, cols_stored = stored_chunks(node)
    n_features = node.shape[1]
    rows = chunk_cells or default_dense_rows(
        min(cols_stored, n_features), node.dtype.itemsize, rows_stored
    )
    return ad.experimental.read_elem_lazy(node, chunks=(min(rows, node.shape[0]), cols_stored))


def stored_chunks(array: zarr.Array) -> tuple[int, ...]:
    """The write unit of a Zarr array: its shards if sharded, else its chunks."""
    shards = getattr(array, "shards", None)
    return tuple(shards) if shards is not None else tuple(array.chunks)


def check_matrix(shape: tuple[int, ...], dtype: np.dtype, what: str) -> None:
    """Raise DataError unless ``shape`` is 2-D and non-empty and ``dtype`` numeric."""
    if len(shape) != 2:
        raise DataError(f"{what} has {len(shape)} dimensions {shape}; expected a 2-D matrix")
    if 0 in shape:
        raise DataError(
            f"{what} is empty: {shape[0]} x {shape[1]}; it needs at least one cell and one feature"
        )
    if not (np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)):
        raise DataError(f"{what} has dtype {dtype}; expected numeric expression values")


def check_lengths(
    n_cells: int,
    n_features: int,
    *,
    obs: pd.DataFrame | None,
    features: pd.Index,
    what: str,
) -> None:
    """Raise DataError when obs rows or feature names do not match the matrix."""
    if obs is not None and len(obs) != n_cells:
        raise DataError(
            f"obs has {len(obs)} rows but {what} has {n_cells} cells; give one obs row per "
            "cell, in the matrix's cell order"
        )
    if len(features) != n_features:
        raise DataError(f"{len(features)} feature names given but {what} has {n_features} features")


def h5_element_for(loc: Location) -> Callable[[Node], Element]:
    """``element_for`` for an HDF5 store: tasks re-open the file by location."""

    def element_for(node: Node) -> H5Element:
        return H5Element(loc.url, node.name, dict(loc.storage_options), loc.local)

    return element_for


def zarr_element_for(node: Node) -> ZarrElement:
    """``element_for`` for a Zarr store: tasks hold the (picklable) node."""
    return ZarrElement(node)


#: A matrix read through an open store: an anndata sparse dataset or an h5py dataset.
BackedMatrix: TypeAlias = ad.abc.CSRDataset | ad.abc.CSCDataset | h5py.Dataset


def backed_rows(matrix: BackedMatrix, chunk_cells: int | None) -> da.Array:
    """The (cells, features) matrix of a backed AnnData as a lazy Dask array of row chunks.

    Tasks re-open an HDF5 file by its name (no open handle in the graph) and hold a Zarr
    group (picklable).
    """
    shape = cast(tuple[int, int], tuple(int(s) for s in matrix.shape))
    dtype = np.dtype(matrix.dtype)
    element: Element
    if isinstance(matrix, h5py.Dataset):
        element = H5Element(os.fspath(matrix.file.filename), matrix.name)
        rows = chunk_cells or default_dense_rows(shape[1], dtype.itemsize)
        return lazy_rows(
            DenseRows(element), shape=shape, dtype=dtype, chunk_rows=rows, sparse_blocks=False
        )
    group = matrix.group
    if isinstance(group, h5py.Group):
        element = H5Element(os.fspath(group.file.filename), group.name)
    else:
        element = ZarrElement(group)
    encoding: SparseEncoding = (
        "csr_matrix" if isinstance(matrix, ad.abc.CSRDataset) else "csc_matrix"
    )
    reader = SparseRows(element, encoding, shape[1])
    rows = chunk_cells or default_sparse_rows(shape[0], int(group["data"].shape[0]))
    return lazy_rows(reader, shape=shape, dtype=dtype, chunk_rows=rows, sparse_blocks=True)
