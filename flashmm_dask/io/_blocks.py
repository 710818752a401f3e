"""What one Dask task runs to read one row chunk (a block of cells) of a stored matrix.

Every reader here is a small picklable object that holds *where* the matrix lives, never
an open file handle, so that a task graph built from it runs on a multi-process or
multi-machine Dask cluster. HDF5 files are opened inside each task (h5py handles cannot
be pickled); Zarr groups and arrays are picklable and are held directly.

A block is rows ``start:stop`` of a (cells, features) matrix, returned as a
``numpy.ndarray`` (dense encodings) or a ``scipy.sparse.csr_matrix`` (sparse encodings),
shape (stop - start, n_features).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import anndata as ad
import dask.array as da
import fsspec
import h5py
import numpy as np
from scipy import sparse

logger = logging.getLogger(__name__)

SparseEncoding = Literal["csr_matrix", "csc_matrix"]

#: Stored entries read at once when scanning a CSC matrix (indices + data of this many
#: entries are in memory together, about 12 bytes each for int32 indices + float64 data).
CSC_SCAN_ENTRIES = 1 << 22


def row_chunks(n_rows: int, chunk_rows: int) -> tuple[int, ...]:
    """Split ``n_rows`` rows into chunks of ``chunk_rows`` rows, the last one shorter.

    Parameters
    ----------
    n_rows : int
        Number of rows, >= 1.
    chunk_rows : int
        Rows per chunk, >= 1.

    Returns
    -------
    tuple of int
        Chunk lengths summing to ``n_rows``, as Dask expects for one axis.
    """
    full, rest = divmod(n_rows, chunk_rows)
    return (chunk_rows,) * full + ((rest,) if rest else ())


def as_csr_or_ndarray(block: Any) -> np.ndarray | sparse.csr_matrix:
    """Return a block as a ``csr_matrix`` (sparse input) or ``ndarray`` (anything else).

    Blocks that already have the right type are returned as they are (no copy).
    """
    if isinstance(block, sparse.csr_matrix):
        return block
    if sparse.issparse(block):
        return sparse.csr_matrix(block)
    return np.asarray(block)


@dataclass(frozen=True, eq=False)
class H5Element:
    """An element (group or dataset) of an HDF5 file, opened afresh by each task.

    Parameters
    ----------
    url : str
        Local path or fsspec URL of the file.
    name : str
        HDF5 path of the element inside the file, e.g. ``"/X"`` or ``"/layers/counts"``.
    storage_options : dict
        fsspec options for URLs (ignored for local paths).
    local : bool
        True when ``url`` is a local filesystem path (opened by h5py directly).
    """

    url: str
    name: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    local: bool = True

    @contextmanager
    def open(self) -> Iterator[Any]:
        """Open the file read-only and yield the element; close the file afterwards."""
        if self.local:
            with h5py.File(self.url, "r") as file:
                yield file[self.name]
        else:
            with (
                fsspec.open(self.url, mode="rb", **self.storage_options) as handle,
                h5py.File(handle, "r") as file,
            ):
                yield file[self.name]


@dataclass(frozen=True, eq=False)
class ZarrElement:
    """A Zarr group or array; picklable, so held as it is."""

    node: Any

    @contextmanager
    def open(self) -> Iterator[Any]:
        """Yield the node (nothing to open or close)."""
        yield self.node


Element = H5Element | ZarrElement


def _block_rows(block_info: dict[Any, Any] | None) -> tuple[int, int]:
    if block_info is None:  # pragma: no cover - dask always passes it to our readers
        raise RuntimeError("block_info is required to locate the row chunk")
    start, stop = block_info[None]["array-location"][0]
    return int(start), int(stop)


@dataclass(frozen=True, eq=False)
class SparseRows:
    """Reads rows of an AnnData ``csr_matrix`` or ``csc_matrix`` element as CSR.

    CSR elements are sliced with :func:`anndata.io.sparse_dataset` (reads only the
    entries of the requested rows). CSC elements store columns contiguously, so rows
    ``start:stop`` are scattered over the whole element: each block scans every stored
    entry, :data:`CSC_SCAN_ENTRIES` at a time (bounded memory), and keeps those in its
    rows. Reading a CSC matrix therefore costs one full scan per row chunk.
    """

    element: Element
    encoding: SparseEncoding
    n_features: int

    def __call__(self, block_info: dict[Any, Any] | None = None) -> sparse.csr_matrix:
        start, stop = _block_rows(block_info)
        with self.element.open() as group:
            if self.encoding == "csr_matrix":
                block = ad.io.sparse_dataset(group, should_cache_indptr=False)[start:stop]
                return as_csr_or_ndarray(block)
            return _csc_rows(group, start, stop, self.n_features)


def _csc_rows(group: Any, start: int, stop: int, n_features: int) -> sparse.csr_matrix:
    """Rows ``start:stop`` of a CSC group (data, indices, indptr) as a CSR matrix."""
    indptr = np.asarray(group["indptr"][:], dtype=np.int64)
    data_arr, index_arr = group["data"], group["indices"]
    rows_parts: list[np.ndarray] = []
    cols_parts: list[np.ndarray] = []
    vals_parts: list[np.ndarray] = []
    col = 0
    while col < n_features:
        # the widest column range whose entries fit in the scan budget (at least 1 column)
        end = int(np.searchsorted(indptr, indptr[col] + CSC_SCAN_ENTRIES, side="right")) - 1
        end = min(max(end, col + 1), n_features)
        lo, hi = int(indptr[col]), int(indptr[end])
        if hi > lo:
            rows = np.asarray(index_arr[lo:hi])
            keep = (rows >= start) & (rows < stop)
            if keep.any():
                counts = np.diff(indptr[col : end + 1])
                cols = np.repeat(np.arange(col, end, dtype=np.int64), counts)
                rows_parts.append(rows[keep] - start)
                cols_parts.append(cols[keep])
                vals_parts.append(np.asarray(data_arr[lo:hi])[keep])
        col = end
    dtype = data_arr.dtype
    if not vals_parts:
        return sparse.csr_matrix((stop - start, n_features), dtype=dtype)
    coo = sparse.coo_matrix(
        (np.concatenate(vals_parts), (np.concatenate(rows_parts), np.concatenate(cols_parts))),
        shape=(stop - start, n_features),
        dtype=dtype,
    )
    return coo.tocsr()


@dataclass(frozen=True, eq=False)
class DenseRows:
    """Reads rows of a dense 2-D dataset (all features) as an ndarray."""

    element: Element

    def __call__(self, block_info: dict[Any, Any] | None = None) -> np.ndarray:
        start, stop = _block_rows(block_info)
        with self.element.open() as dataset:
            return np.asarray(dataset[start:stop])


def lazy_rows(
    reader: SparseRows | DenseRows,
    *,
    shape: tuple[int, int],
    dtype: np.dtype,
    chunk_rows: int,
    sparse_blocks: bool,
) -> da.Array:
    """A Dask array whose blocks are the row chunks that ``reader`` reads.

    Parameters
    ----------
    reader : SparseRows or DenseRows
        Reads one row chunk given Dask's ``block_info``.
    shape : (int, int)
        (cells, features) of the stored matrix.
    dtype : numpy.dtype
        Element type of the stored values.
    chunk_rows : int
        Cells per block; the feature axis is one chunk.
    sparse_blocks : bool
        Whether blocks are ``csr_matrix`` (else ``ndarray``), for Dask's ``meta``.

    Returns
    -------
    dask.array.Array
        Shape ``shape``; nothing is read until it is computed.
    """
    meta: Any = sparse.csr_matrix((0, 0), dtype=dtype) if sparse_blocks else np.empty((0, 0), dtype)
    chunks = (row_chunks(shape[0], chunk_rows), (shape[1],))
    token = f"read-{reader.encoding[:3]}" if isinstance(reader, SparseRows) else "read-dense"
    return da.map_blocks(reader, dtype=dtype, chunks=chunks, meta=meta, token=token)
