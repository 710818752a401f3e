"""AnnData stores on disk: atomic writes of ".zarr" and ".h5ad" stores, CSR chunked by cells.

:func:`write_store` writes an in-memory AnnData; :func:`staged`, :func:`create_zarr_root`
and :func:`append_x` let :func:`flashmm_dask.simulate.simulate_to_store` stream a CSR
matrix into a store chunk by chunk. Every write goes to a hidden temporary sibling that is
renamed into place, so a failed write leaves nothing at the destination.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import scipy.sparse as sp

from flashmm_dask.errors import InputError, StoreError

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
    with staged(target, overwrite) as tmp:
        if fmt == "zarr":
            _write_zarr(adata, tmp, chunk_cells)
        else:
            adata.write_h5ad(tmp)
    return target


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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def staged(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of path to write into; move it to path on success."""
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise StoreError(
            f"{str(path)!r} already exists; pass overwrite=True (--overwrite) to replace it "
            "or choose another path"
        )
    if not path.parent.is_dir():
        raise StoreError(f"folder {str(path.parent)!r} does not exist; create it first")
    tag = uuid.uuid4().hex[:12]
    tmp = path.with_name(f".{path.name}.tmp-{tag}")
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    exists = path.exists() or path.is_symlink()
    try:
        if exists and not overwrite:
            raise StoreError(f"{str(path)!r} appeared while it was being written; not replaced")
        if not exists or (path.is_file() and tmp.is_file()):
            os.replace(tmp, path)
            return
        # a folder cannot be replaced in one rename: move the old store aside first
        old = path.with_name(f".{path.name}.old-{tag}")
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        _remove(old)
    finally:
        _remove(tmp)


def _x_chunk_len(nnz: int, n_rows: int, chunk_cells: int) -> int:
    per_cell = nnz / max(n_rows, 1)
    return int(min(_MAX_CHUNK_ELEMENTS, max(1, round(per_cell * chunk_cells))))


def create_zarr_root(path: Path) -> Any:
    import zarr

    group = zarr.open_group(str(path), mode="w-", zarr_format=ad.settings.zarr_write_format)
    group.attrs["encoding-type"] = "anndata"
    group.attrs["encoding-version"] = "0.1.0"
    return group


def _write_zarr(adata: ad.AnnData, path: Path, chunk_cells: int) -> None:
    import zarr
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


def append_x(group: Any, chunks: Iterator[sp.csr_matrix], chunk_cells: int) -> None:
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
