"""AnnData stores on disk: atomic writes of ".zarr" and ".h5ad" stores, CSR chunked by cells.

:func:`write_store` writes an in-memory AnnData; :func:`write_streamed` (with
:func:`create_zarr_root` and :func:`append_x`) lets
:func:`flashmm_dask.simulate.simulate_to_store` stream a CSR matrix into a store chunk by
chunk. Every write is staged (:func:`flashmm_dask.io.writing.staged`):
it goes to a hidden temporary sibling that is renamed into place, so a failed write leaves
nothing at the destination.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anndata as ad
import numpy as np
import scipy.sparse as sp
import zarr

from flashmm_dask.errors import InputError
from flashmm_dask.io.writing import staged

if TYPE_CHECKING:
    import h5py

logger = logging.getLogger(__name__)

StoreFormat = Literal["zarr", "h5ad"]
_MAX_CHUNK_ELEMENTS = 2**26


def write_store(
    adata: ad.AnnData,
    path: str | os.PathLike[str],
    *,
    chunk_cells: int = 10_000,
    format: StoreFormat | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an AnnData to a ".zarr" or ".h5ad" store, atomically.

    The store is written to a hidden temporary sibling and renamed into place, so a
    failed write leaves nothing at ``path``.

    Parameters
    ----------
    adata : anndata.AnnData
        The data; a CSR X is written to zarr with data and indices chunked to hold about
        ``chunk_cells`` cells' non-zeros (other X kinds use anndata's default chunks).
    path : path-like
        Destination, ".zarr" (folder) or ".h5ad" (file).
    chunk_cells : int
        Cells per zarr chunk of X.
    format : {"zarr", "h5ad"}, optional
        Default: from the suffix of ``path``.
    overwrite : bool
        Replace an existing store at ``path``; otherwise refuse.

    Returns
    -------
    pathlib.Path
        The store written.
    """
    if not isinstance(adata, ad.AnnData):
        raise InputError(f"write_store needs an anndata.AnnData, got {type(adata).__name__}")
    if isinstance(chunk_cells, bool) or not isinstance(chunk_cells, int) or chunk_cells < 1:
        raise InputError(f"chunk_cells must be a positive integer, got {chunk_cells!r}")
    target = Path(path)
    fmt = store_format(target, format)
    with staged(target, overwrite=overwrite, parents=False) as tmp:
        if fmt == "zarr":
            _write_zarr(adata, tmp, chunk_cells)
        else:
            adata.write_h5ad(tmp)
    return target


def write_streamed(
    path: Path,
    fmt: StoreFormat,
    content: Callable[[], tuple[ad.AnnData, Iterator[sp.csr_matrix]]],
    *,
    chunk_cells: int,
    overwrite: bool,
) -> Path:
    """Write an AnnData store whose X (CSR) arrives in row chunks, atomically (staged).

    Parameters
    ----------
    path : the ".zarr" folder or ".h5ad" file to write
    fmt : its format
    content : called once ``path`` may be written: returns the store's obs, var and uns
        (an AnnData without X) and the rows of X in consecutive CSR chunks, drawn one at
        a time (memory holds one chunk)
    chunk_cells : cells per Zarr chunk of X's data and indices
    overwrite : replace a store at ``path``; otherwise refuse
    """
    with staged(path, overwrite=overwrite, parents=False) as tmp:
        meta, chunks = content()
        if fmt == "zarr":
            group = create_zarr_root(tmp)
            ad.io.write_elem(group, "/", meta)
            append_x(group, chunks, chunk_cells)
            zarr.consolidate_metadata(str(tmp))
        else:
            import h5py

            with h5py.File(tmp, "w-") as f:
                ad.io.write_elem(f, "/", meta)
                append_x(f, chunks, chunk_cells)
    return path


def store_format(path: Path, format: str | None) -> StoreFormat:
    if format is None:
        suffix = path.suffix.lower()
        if suffix not in (".zarr", ".h5ad"):
            raise InputError(
                f"cannot tell the store format of {str(path)!r} from its suffix; "
                "name it *.zarr or *.h5ad, or pass format='zarr' or 'h5ad'"
            )
        return "zarr" if suffix == ".zarr" else "h5ad"
    if format not in ("zarr", "h5ad"):
        raise InputError(f"format must be 'zarr' or 'h5ad', got {format!r}")
    return format  # type: ignore[return-value]


def _x_chunk_len(nnz: int, n_rows: int, chunk_cells: int) -> int:
    per_cell = nnz / max(n_rows, 1)
    return int(min(_MAX_CHUNK_ELEMENTS, max(1, round(per_cell * chunk_cells))))


def create_zarr_root(path: Path) -> zarr.Group:
    """A new Zarr group at ``path`` with anndata's root encoding attributes."""
    group = zarr.open_group(str(path), mode="w-", zarr_format=ad.settings.zarr_write_format)
    group.attrs["encoding-type"] = "anndata"
    group.attrs["encoding-version"] = "0.1.0"
    return group


def _write_zarr(adata: ad.AnnData, path: Path, chunk_cells: int) -> None:
    from anndata.experimental import write_dispatched

    x_kwargs: dict[str, Any] = {}
    if sp.issparse(adata.X) and adata.X.format == "csr":
        x_kwargs["chunks"] = (_x_chunk_len(adata.X.nnz, adata.n_obs, chunk_cells),)

    def callback(
        write_func: Any, store: Any, elem_name: str, elem: Any, *, dataset_kwargs: Any, iospec: Any
    ) -> None:
        if elem_name.lstrip("/") == "X":
            dataset_kwargs = {**dataset_kwargs, **x_kwargs}
        write_func(store, elem_name, elem, dataset_kwargs=dataset_kwargs)

    write_dispatched(create_zarr_root(path), "/", adata, callback=callback)
    zarr.consolidate_metadata(str(path))


def append_x(
    group: zarr.Group | h5py.Group, chunks: Iterator[sp.csr_matrix], chunk_cells: int
) -> None:
    """Write the first chunk as X (CSR, int64 indptr) and append the others to it."""
    x = None
    done = 0
    for chunk in chunks:
        if x is None:
            kwargs = {
                "chunks": (_x_chunk_len(chunk.nnz, chunk.shape[0], chunk_cells),),
                "indptr_dtype": np.int64,
            }
            ad.io.write_elem(group, "X", chunk, dataset_kwargs=kwargs)
            x = ad.io.sparse_dataset(group["X"])
        else:
            x.append(chunk)
        done += chunk.shape[0]
        logger.debug("appended cells up to %d", done)
