"""read_expression / read_obs: every input kind against the matrix it was written from.

Small AnnData objects are written to tmp_path (Zarr format 2 and 3, sharded Zarr, h5ad;
CSR, CSC and dense) and read back; the computed Dask array, densified here only, must
equal the original matrix, and features and obs must equal the originals. Invariances:
chunk_cells from 1 to all cells, orientation, in-memory vs on-disk. Laziness is proved
by a real wrapping Zarr store that records every key read, and by changing stored values
after read_expression returned. The h5ad graph runs on a multi-process cluster. Each
error case checks its message.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anndata as ad
import dask
import dask.array as da
import fsspec
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from fsspec.implementations.memory import MemoryFileSystem
from needs import module

from flashmm_dask.errors import DataError, InputError
from flashmm_dask.io import _blocks, _stores
from flashmm_dask.io.readers import Expression, read_expression, read_obs

N_CELLS, N_FEATURES = 23, 11
STORE_FORMATS = ("zarr2", "zarr3", "zarr3-sharded", "h5ad")
LAYERS = (None, "csc", "dense")  # X is CSR


# -- data and writers ----------------------------------------------------------------


def make_adata(n_cells: int = N_CELLS, n_features: int = N_FEATURES) -> ad.AnnData:
    """Poisson counts with all-zero cells and an all-zero feature (edge cases of slicing)."""
    rng = np.random.default_rng(7)
    counts = rng.poisson(0.8, size=(n_cells, n_features)).astype(np.float32)
    counts[[3, min(17, n_cells - 1)], :] = 0
    counts[:, min(5, n_features - 1)] = 0
    obs = pd.DataFrame(
        {
            "sam": pd.Categorical(rng.choice(list("ABCD"), n_cells)),
            "libsize": rng.uniform(1e3, 5e3, n_cells),
        },
        index=[f"cell{i:02d}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene{j:02d}" for j in range(n_features)])
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
    adata.layers["csc"] = sp.csc_matrix(counts * 2)
    adata.layers["dense"] = counts * 3
    return adata


def expected_matrix(adata: ad.AnnData, layer: str | None) -> np.ndarray:
    matrix = adata.X if layer is None else adata.layers[layer]
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def write_store(adata: ad.AnnData, tmp_path: Path, fmt: str) -> Path:
    """Write ``adata`` as ``fmt`` (one of STORE_FORMATS) under tmp_path."""
    if fmt == "h5ad":
        path = tmp_path / "data.h5ad"
        adata.write_h5ad(path)
        return path
    path = tmp_path / f"data-{fmt}.zarr"
    zarr_format = 2 if fmt == "zarr2" else 3
    with (
        ad.settings.override(
            zarr_write_format=zarr_format, auto_shard_zarr_v3=fmt == "zarr3-sharded"
        ),
        warnings.catch_warnings(),
    ):
        # anndata 0.12 announces its future defaults, and zarr calls consolidated v3
        # metadata experimental; neither is about reading
        warnings.filterwarnings("ignore", "Writing zarr v2 data", UserWarning)
        warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
        adata.write_zarr(path)
    return path


def write_plain_zarr(path: Path, values: np.ndarray, chunks: tuple[int, int], fmt: int) -> None:
    array = zarr.create_array(
        store=str(path), shape=values.shape, chunks=chunks, dtype=values.dtype, zarr_format=fmt
    )
    array[...] = values


def dense(block: Any) -> np.ndarray:
    return block.toarray() if sp.issparse(block) else np.asarray(block)


def assert_blocks_typed(expr: Expression) -> None:
    """Every block is a csr_matrix (sparse data) or an ndarray (dense data), never CSC."""
    kind = sp.csr_matrix if expr.is_sparse else np.ndarray
    for block in expr.data.blocks:
        value = block.compute(scheduler="sync")
        assert type(value) is kind, (type(value), kind)


def assert_expression(
    expr: Expression, matrix: np.ndarray, features: pd.Index, obs: pd.DataFrame | None
) -> None:
    assert (expr.n_cells, expr.n_features) == matrix.shape
    computed = expr.data.compute(scheduler="sync")
    np.testing.assert_array_equal(dense(computed), matrix)
    assert computed.dtype == matrix.dtype
    assert expr.features.equals(features)
    if obs is None:
        assert expr.obs is None
    else:
        pd.testing.assert_frame_equal(expr.obs, obs)


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    return make_adata()


@pytest.fixture
def memory_fs() -> Iterator[MemoryFileSystem]:
    fs = fsspec.filesystem("memory")
    yield fs
    if fs.exists("/flashmm-test"):
        fs.rm("/flashmm-test", recursive=True)


# -- AnnData stores ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", STORE_FORMATS)
@pytest.mark.parametrize("layer", LAYERS)
def test_store_equals_written_matrix_for_every_chunking(
    adata: ad.AnnData, tmp_path: Path, fmt: str, layer: str | None
) -> None:
    path = write_store(adata, tmp_path, fmt)
    matrix = expected_matrix(adata, layer)
    for chunk_cells in (1, 2, 7, N_CELLS - 1, N_CELLS, 1000, None):
        expr = read_expression(path, layer=layer, chunk_cells=chunk_cells)
        assert_expression(expr, matrix, adata.var_names, adata.obs)
        assert expr.is_sparse == (layer != "dense")
        rows = expr.data.chunks[0]
        if chunk_cells is not None:
            assert all(size == chunk_cells for size in rows[:-1])
            assert rows[-1] <= chunk_cells
        assert expr.data.chunks[1] == (N_FEATURES,) or layer == "dense"
    assert_blocks_typed(read_expression(path, layer=layer, chunk_cells=5))


def test_store_description_names_store_layer_and_encoding(
    adata: ad.AnnData, tmp_path: Path
) -> None:
    expr = read_expression(write_store(adata, tmp_path, "zarr3"), layer="csc")
    assert "AnnData Zarr store (format 3)" in expr.source
    assert "layer 'csc'" in expr.source and "csc_matrix" in expr.source
    expr = read_expression(write_store(adata, tmp_path, "zarr2"))
    assert "format 2" in expr.source and "csr_matrix" in expr.source


def test_csc_scan_in_small_batches_gives_the_same_rows(
    adata: ad.AnnData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_store(adata, tmp_path, "h5ad")
    monkeypatch.setattr(_blocks, "CSC_SCAN_ENTRIES", 3)  # many column batches per block
    expr = read_expression(path, layer="csc", chunk_cells=4)
    assert_expression(expr, expected_matrix(adata, "csc"), adata.var_names, adata.obs)


def test_obs_and_features_arguments_replace_the_stores(adata: ad.AnnData, tmp_path: Path) -> None:
    path = write_store(adata, tmp_path, "zarr3")
    obs = pd.DataFrame({"donor": np.arange(N_CELLS) % 3}, index=adata.obs_names)
    names = pd.Index([f"f{j}" for j in range(N_FEATURES)])
    expr = read_expression(path, obs=obs, features=names)
    assert_expression(expr, expected_matrix(adata, None), names, obs)


def test_dense_zarr_default_chunks_follow_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = np.arange(N_CELLS * N_FEATURES, dtype=np.float64).reshape(N_CELLS, N_FEATURES)
    write_plain_zarr(tmp_path / "m.zarr", values, chunks=(5, 4), fmt=3)
    # a 7-cell block budget must round down to the stored 5-cell chunks
    monkeypatch.setattr(_stores, "DENSE_BLOCK_BYTES", 7 * 4 * 8)
    expr = read_expression(tmp_path / "m.zarr", orientation="cells_x_features")
    assert expr.data.chunks == ((5, 5, 5, 5, 3), (4, 4, 3))
    assert_expression(expr, values, pd.Index([str(j) for j in range(N_FEATURES)]), None)


def test_default_sparse_blocks_hold_a_set_number_of_non_zeros(
    adata: ad.AnnData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without chunk_cells, sparse blocks are cut by non-zeros (from the stored entry
    count), within the cell bounds; the same for stores, backed and in-memory matrices."""
    nnz = adata.X.nnz
    assert _stores.default_sparse_rows(1_000_000, 50_000_000) == 100_000  # 50 per cell
    assert _stores.default_sparse_rows(1_000_000, 2_000_000_000) == 2_500
    assert _stores.default_sparse_rows(10, 0) == _stores.DEFAULT_CHUNK_CELLS
    monkeypatch.setattr(_stores, "SPARSE_BLOCK_NNZ", nnz // 4)
    monkeypatch.setattr(_stores, "SPARSE_ROWS_RANGE", (2, 1000))
    rows = round(nnz // 4 * N_CELLS / nnz)
    expected = (*(rows,) * (N_CELLS // rows), *((N_CELLS % rows,) if N_CELLS % rows else ()))
    for fmt in ("zarr2", "h5ad"):
        path = write_store(adata, tmp_path, fmt)
        expr = read_expression(path)
        assert expr.data.chunks[0] == expected, fmt
        assert_expression(expr, expected_matrix(adata, None), adata.var_names, adata.obs)
    expr = read_expression(adata.X, obs=adata.obs)
    assert expr.data.chunks[0] == expected
    monkeypatch.setattr(_stores, "SPARSE_ROWS_RANGE", (10, 1000))  # the lower bound wins
    assert read_expression(adata.X, obs=adata.obs).data.chunks[0] == (10, 10, 3)


# -- plain Zarr arrays ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", [2, 3])
@pytest.mark.parametrize("orientation", ["cells_x_features", "features_x_cells"])
def test_plain_zarr_array_in_either_orientation(
    adata: ad.AnnData, tmp_path: Path, fmt: int, orientation: str
) -> None:
    matrix = expected_matrix(adata, "dense")
    stored = matrix if orientation == "cells_x_features" else matrix.T
    path = tmp_path / "plain.zarr"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)  # zarr v2 format notices
        write_plain_zarr(path, stored, chunks=(4, 6), fmt=fmt)
    csv = tmp_path / "obs.csv"
    adata.obs.to_csv(csv)
    for chunk_cells in (1, 3, N_CELLS):
        expr = read_expression(
            path,
            orientation=orientation,  # type: ignore[arg-type]
            obs=adata.obs,
            features=adata.var_names,
            chunk_cells=chunk_cells,
        )
        assert_expression(expr, matrix, adata.var_names, adata.obs)
        assert_blocks_typed(expr)
        assert set(expr.data.chunks[0][:-1]) <= {chunk_cells}
    # orientation from the obs length; obs from a CSV file (categories come back as str)
    expr = read_expression(path, obs=csv)
    assert expr.source.startswith(f"Zarr array (format {fmt})")
    assert orientation in expr.source
    expected_obs = adata.obs.astype({"sam": object})
    assert_expression(expr, matrix, pd.Index([str(j) for j in range(N_FEATURES)]), expected_obs)


# -- in-memory inputs ----------------------------------------------------------------


def _in_memory_cases(adata: ad.AnnData) -> dict[str, tuple[Any, dict[str, Any]]]:
    x = expected_matrix(adata, None)
    csr = sp.csr_matrix(x)
    return {
        "ndarray": (x, {"orientation": "cells_x_features"}),
        "ndarray-transposed": (np.ascontiguousarray(x.T), {"orientation": "features_x_cells"}),
        "ndarray-orientation-from-obs": (np.ascontiguousarray(x.T), {}),
        "csr_matrix": (csr, {"orientation": "cells_x_features"}),
        "csc_matrix": (sp.csc_matrix(x), {"orientation": "cells_x_features"}),
        "coo_matrix": (sp.coo_matrix(x), {"orientation": "cells_x_features"}),
        "csr_array": (sp.csr_array(x), {"orientation": "cells_x_features"}),
        "csc_array-transposed": (sp.csc_array(x.T), {"orientation": "features_x_cells"}),
        "dask-dense-feature-chunks": (da.from_array(x, chunks=(4, 6)), {}),
        "dask-sparse": (
            da.from_array(csr, chunks=(5, -1), asarray=False, meta=sp.csr_matrix((0, 0))),
            {"orientation": "cells_x_features"},
        ),
        "dask-sparse-transposed": (
            da.from_array(
                sp.csr_matrix(x.T), chunks=(4, 6), asarray=False, meta=sp.csr_matrix((0, 0))
            ),
            {"orientation": "features_x_cells"},
        ),
    }


IN_MEMORY_CASES = (
    "ndarray",
    "ndarray-transposed",
    "ndarray-orientation-from-obs",
    "csr_matrix",
    "csc_matrix",
    "coo_matrix",
    "csr_array",
    "csc_array-transposed",
    "dask-dense-feature-chunks",
    "dask-sparse",
    "dask-sparse-transposed",
)


def test_in_memory_cases_are_all_tested(adata: ad.AnnData) -> None:
    assert set(_in_memory_cases(adata)) == set(IN_MEMORY_CASES)


@pytest.mark.parametrize("case", IN_MEMORY_CASES)
def test_in_memory_matrix_equals_input_for_every_chunking(adata: ad.AnnData, case: str) -> None:
    matrix, kwargs = _in_memory_cases(adata)[case]
    x = expected_matrix(adata, None)
    for chunk_cells in (1, 4, N_CELLS, None):
        expr = read_expression(
            matrix, obs=adata.obs, features=adata.var_names, chunk_cells=chunk_cells, **kwargs
        )
        assert_expression(expr, x, adata.var_names, adata.obs)
        assert_blocks_typed(expr)
        assert expr.is_sparse == (sp.issparse(matrix) or "sparse" in case)
        if chunk_cells is not None:
            assert set(expr.data.chunks[0][:-1]) <= {chunk_cells}


@pytest.mark.parametrize("layer", LAYERS)
def test_in_memory_anndata(adata: ad.AnnData, layer: str | None) -> None:
    for chunk_cells in (1, 6, None):
        expr = read_expression(adata, layer=layer, chunk_cells=chunk_cells)
        assert_expression(expr, expected_matrix(adata, layer), adata.var_names, adata.obs)
        assert_blocks_typed(expr)


def test_anndata_with_dask_x_and_anndata_view(adata: ad.AnnData) -> None:
    lazy = ad.AnnData(
        X=da.from_array(expected_matrix(adata, "dense"), chunks=(6, -1)),
        obs=adata.obs,
        var=adata.var,
    )
    expr = read_expression(lazy, chunk_cells=4)
    assert_expression(expr, expected_matrix(adata, "dense"), adata.var_names, adata.obs)
    view = adata[5:15, 2:9]
    expr = read_expression(view, layer="csc")
    assert_expression(expr, expected_matrix(adata, "csc")[5:15, 2:9], view.var_names, view.obs)
    assert_blocks_typed(expr)


@pytest.mark.parametrize("fmt", ["zarr3", "h5ad"])
def test_lazy_anndata_from_read_lazy(adata: ad.AnnData, tmp_path: Path, fmt: str) -> None:
    lazy = ad.experimental.read_lazy(write_store(adata, tmp_path, fmt))
    for layer in LAYERS:
        expr = read_expression(lazy, layer=layer, chunk_cells=4)
        assert_expression(expr, expected_matrix(adata, layer), adata.var_names, adata.obs)
        assert_blocks_typed(expr)


@pytest.mark.parametrize("layer", LAYERS)
def test_backed_anndata_reads_x_from_the_file(
    adata: ad.AnnData, tmp_path: Path, layer: str | None
) -> None:
    path = write_store(adata, tmp_path, "h5ad")
    backed = ad.read_h5ad(path, backed="r")
    try:
        expr = read_expression(backed, layer=layer, chunk_cells=5)
        assert_expression(expr, expected_matrix(adata, layer), adata.var_names, adata.obs)
        assert_blocks_typed(expr)
        if layer is None:
            assert str(path) in expr.source
    finally:
        backed.file.close()


@pytest.mark.parametrize("fmt", ["zarr2", "zarr3"])
def test_opened_zarr_group_and_array(adata: ad.AnnData, tmp_path: Path, fmt: str) -> None:
    group = zarr.open_group(write_store(adata, tmp_path, fmt), mode="r")
    expr = read_expression(group, layer="dense", chunk_cells=4)
    assert_expression(expr, expected_matrix(adata, "dense"), adata.var_names, adata.obs)
    array = group["layers/dense"]
    expr = read_expression(array, orientation="cells_x_features", chunk_cells=4)
    names = pd.Index([str(j) for j in range(N_FEATURES)])
    assert_expression(expr, expected_matrix(adata, "dense"), names, None)


# -- URLs and storage_options --------------------------------------------------------


@pytest.mark.parametrize("fmt", ["zarr2", "zarr3", "h5ad"])
def test_file_and_memory_urls(
    adata: ad.AnnData, tmp_path: Path, memory_fs: MemoryFileSystem, fmt: str
) -> None:
    path = write_store(adata, tmp_path, fmt)
    memory_path = f"/flashmm-test/{path.name}"
    memory_fs.put(str(path), memory_path, recursive=path.is_dir())
    for url in (path.as_uri(), f"memory://{memory_path}"):
        for layer in LAYERS:
            expr = read_expression(url, layer=layer, chunk_cells=6)
            assert_expression(expr, expected_matrix(adata, layer), adata.var_names, adata.obs)
            assert_blocks_typed(expr)
        pd.testing.assert_frame_equal(read_obs(url), adata.obs)


class _TokenMemoryFileSystem(MemoryFileSystem):
    """A memory filesystem that, like a cloud one, refuses access without credentials."""

    protocol = ("flashmm-token",)

    def __init__(self, *args: Any, token: str | None = None, **kwargs: Any) -> None:
        if token != "secret":
            raise PermissionError("flashmm-token:// needs storage_options={'token': 'secret'}")
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return super()._strip_protocol(path.replace("flashmm-token://", "memory://", 1))


@pytest.mark.parametrize("fmt", ["zarr3", "h5ad"])
def test_storage_options_reach_the_filesystem(
    adata: ad.AnnData, tmp_path: Path, memory_fs: MemoryFileSystem, fmt: str
) -> None:
    fsspec.register_implementation("flashmm-token", _TokenMemoryFileSystem, clobber=True)
    path = write_store(adata, tmp_path, fmt)
    memory_fs.put(str(path), f"/flashmm-test/{path.name}", recursive=path.is_dir())
    url = f"flashmm-token:///flashmm-test/{path.name}"
    with pytest.raises(DataError, match=r"cannot open.*storage_options"):
        read_expression(url)
    expr = read_expression(url, layer="csc", chunk_cells=5, storage_options={"token": "secret"})
    assert_expression(expr, expected_matrix(adata, "csc"), adata.var_names, adata.obs)


# -- laziness ------------------------------------------------------------------------


class KeyRecordingStore(zarr.storage.WrapperStore):  # type: ignore[type-arg]
    """Wraps a real Zarr store and records the key of every read."""

    def __init__(self, store: Any, keys: list[str] | None = None) -> None:
        super().__init__(store)
        self.keys: list[str] = [] if keys is None else keys

    def _with_store(self, store: Any) -> KeyRecordingStore:
        return type(self)(store, self.keys)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        self.keys.append(key)
        return await self._store.get(key, prototype, byte_range)

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
        key_ranges = list(key_ranges)
        self.keys.extend(key for key, _ in key_ranges)
        return await self._store.get_partial_values(prototype, key_ranges)


METADATA_KEYS = {"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"}


def chunk_keys(keys: list[str], element: str) -> set[str]:
    return {
        k for k in keys if k.startswith(element + "/") and k.split("/")[-1] not in METADATA_KEYS
    }


@pytest.mark.parametrize("fmt", ["zarr2", "zarr3"])
@pytest.mark.parametrize(
    ("layer", "element", "arrays"),
    [
        (None, "X", {"data", "indices", "indptr"}),
        ("csc", "layers/csc", {"data", "indices", "indptr"}),
        ("dense", "layers/dense", {""}),
    ],
)
def test_read_expression_reads_no_matrix_chunk_until_compute(
    adata: ad.AnnData,
    tmp_path: Path,
    fmt: str,
    layer: str | None,
    element: str,
    arrays: set[str],
) -> None:
    path = write_store(adata, tmp_path, fmt)
    store = KeyRecordingStore(zarr.storage.LocalStore(path, read_only=True))
    expr = read_expression(zarr.open_group(store=store, mode="r"), layer=layer, chunk_cells=4)
    assert chunk_keys(store.keys, element) == set()
    assert chunk_keys(store.keys, "obs")  # obs was read: the recorder does see reads
    result = expr.data.compute(scheduler="sync")
    read = chunk_keys(store.keys, element)
    for name in arrays:
        assert any(k.startswith(f"{element}/{name}") for k in read), (name, read)
    np.testing.assert_array_equal(dense(result), expected_matrix(adata, layer))


@pytest.mark.parametrize("fmt", ["zarr3", "h5ad"])
def test_values_changed_after_read_expression_show_in_compute(
    adata: ad.AnnData, tmp_path: Path, fmt: str
) -> None:
    path = write_store(adata, tmp_path, fmt)
    exprs = {layer: read_expression(path, layer=layer, chunk_cells=5) for layer in LAYERS}
    if fmt == "h5ad":
        with h5py.File(path, "r+") as file:
            for name in ("X/data", "layers/csc/data", "layers/dense"):
                file[name][...] = -file[name][...]
    else:
        group = zarr.open_group(path, mode="r+")
        for name in ("X/data", "layers/csc/data", "layers/dense"):
            group[name][...] = -group[name][...]
    for layer, expr in exprs.items():
        computed = dense(expr.data.compute(scheduler="threads"))
        np.testing.assert_array_equal(computed, -expected_matrix(adata, layer))


# -- multi-process cluster -----------------------------------------------------------


@pytest.mark.distributed
def test_h5ad_and_zarr_graphs_run_on_a_multiprocess_cluster(
    adata: ad.AnnData, tmp_path: Path
) -> None:
    distributed = module("distributed")
    h5ad = write_store(adata, tmp_path, "h5ad")
    zarr_path = write_store(adata, tmp_path, "zarr3")
    cases = [(h5ad, layer) for layer in LAYERS] + [(zarr_path, None), (zarr_path, "csc")]
    exprs = [read_expression(path, layer=layer, chunk_cells=4) for path, layer in cases]
    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address="127.0.0.1:0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        results = client.compute([expr.data for expr in exprs], sync=True)
        pids = client.run(os.getpid)
    assert len(set(pids.values()) | {os.getpid()}) == 3  # two worker processes
    for (_, layer), result in zip(cases, results, strict=True):
        np.testing.assert_array_equal(dense(result), expected_matrix(adata, layer))


# -- read_obs ------------------------------------------------------------------------


def test_read_obs_from_stores_objects_and_csv(adata: ad.AnnData, tmp_path: Path) -> None:
    for fmt in ("zarr2", "zarr3", "h5ad"):
        pd.testing.assert_frame_equal(read_obs(write_store(adata, tmp_path, fmt)), adata.obs)
    pd.testing.assert_frame_equal(read_obs(adata), adata.obs)
    csv = tmp_path / "obs.csv"
    adata.obs.to_csv(csv)
    pd.testing.assert_frame_equal(read_obs(csv), adata.obs.astype({"sam": object}))
    tsv = tmp_path / "obs.tsv"
    adata.obs.reset_index(names="cell").to_csv(tsv, sep="\t", index=False)
    no_index = read_obs(tsv)  # a headed first column stays a column
    assert list(no_index.columns) == ["cell", "sam", "libsize"]
    np.testing.assert_array_equal(no_index["cell"], adata.obs_names)


# -- errors --------------------------------------------------------------------------


def test_missing_store(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no such store: .*nothere\.zarr"):
        read_expression(tmp_path / "nothere.zarr")
    with pytest.raises(DataError, match="no such store: 'memory://"):
        read_expression("memory:///flashmm-test/nothere.h5ad")
    with pytest.raises(DataError, match="no such obs file"):
        read_expression(np.eye(3), orientation="cells_x_features", obs=tmp_path / "no.csv")


def test_unreadable_or_corrupt_stores(adata: ad.AnnData, tmp_path: Path) -> None:
    path = write_store(adata, tmp_path, "zarr3")
    (path / "zarr.json").write_text("{ this is not json")
    with pytest.raises(DataError, match="unreadable or corrupt"):
        read_expression(path)
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(DataError, match="not a Zarr store"):
        read_expression(tmp_path / "empty.zarr")
    (tmp_path / "noise.h5ad").write_bytes(b"\x00\x01 not hdf5 at all" * 50)
    with pytest.raises(DataError, match="truncated, corrupt or not HDF5"):
        read_expression(tmp_path / "noise.h5ad")
    (tmp_path / "table.txt").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="not an HDF5"):
        read_expression(tmp_path / "table.txt")


def test_truncated_h5ad(adata: ad.AnnData, tmp_path: Path) -> None:
    path = write_store(adata, tmp_path, "h5ad")
    read_expression(path)  # valid before
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)
    with pytest.raises(DataError, match=r"truncated.*Re-copy or re-write"):
        read_expression(path)


def test_store_that_is_not_anndata(tmp_path: Path) -> None:
    group = zarr.open_group(tmp_path / "plain.zarr", mode="w")
    group.create_array("counts", data=np.ones((4, 3)))
    with pytest.raises(
        DataError, match=r"not an AnnData store.*orientation=.*arrays in this group: counts"
    ):
        read_expression(tmp_path / "plain.zarr")
    with h5py.File(tmp_path / "plain.h5", "w") as file:
        file["counts"] = np.ones((4, 3))
    with pytest.raises(DataError, match=r"not an AnnData store.*orientation="):
        read_expression(tmp_path / "plain.h5")


def test_unknown_layer_lists_the_available_ones(adata: ad.AnnData, tmp_path: Path) -> None:
    message = r"layer 'counts' not found in .*available layers: csc, dense"
    for fmt in ("zarr3", "h5ad"):
        with pytest.raises(DataError, match=message):
            read_expression(write_store(adata, tmp_path, fmt), layer="counts")
    with pytest.raises(DataError, match=message):
        read_expression(adata, layer="counts")


@pytest.mark.parametrize("fmt", ["zarr3", "h5ad"])
@pytest.mark.parametrize("shape", [(0, N_FEATURES), (N_CELLS, 0)])
def test_empty_store(tmp_path: Path, fmt: str, shape: tuple[int, int]) -> None:
    empty = ad.AnnData(
        X=sp.csr_matrix(shape, dtype=np.float32),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(shape[0])]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(shape[1])]),
    )
    with pytest.raises(DataError, match=rf"is empty: {shape[0]} x {shape[1]}"):
        read_expression(write_store(empty, tmp_path, fmt))


def test_obs_of_the_wrong_length(adata: ad.AnnData, tmp_path: Path) -> None:
    short = adata.obs.iloc[:5]
    with pytest.raises(DataError, match=rf"obs has 5 rows but .* has {N_CELLS} cells"):
        read_expression(write_store(adata, tmp_path, "h5ad"), obs=short)
    path = tmp_path / "plain.zarr"
    write_plain_zarr(path, expected_matrix(adata, "dense"), chunks=(4, 4), fmt=3)
    with pytest.raises(DataError, match=rf"obs has 5 rows but .* has {N_CELLS} cells"):
        read_expression(path, orientation="cells_x_features", obs=short)
    with pytest.raises(DataError, match=rf"obs has 5 rows but .* {N_CELLS} x {N_FEATURES}"):
        read_expression(path, obs=short)
    with pytest.raises(DataError, match=rf"3 feature names given but .* {N_FEATURES} features"):
        read_expression(adata, features=["a", "b", "c"])


def test_missing_orientation_names_both_choices(adata: ad.AnnData, tmp_path: Path) -> None:
    both = r"orientation is required.*'cells_x_features'.*'features_x_cells'"
    with pytest.raises(DataError, match=both):
        read_expression(np.ones((4, 3)))
    with pytest.raises(DataError, match=both):
        read_expression(np.ones((4, 4)), obs=pd.DataFrame(index=list("abcd")))  # square
    path = tmp_path / "plain.zarr"
    write_plain_zarr(path, np.ones((4, 3)), chunks=(2, 3), fmt=3)
    with pytest.raises(DataError, match=both):
        read_expression(path)
    with pytest.raises(DataError, match="always cells x features"):
        read_expression(adata, orientation="features_x_cells")


def test_bad_arguments_and_unsupported_types(adata: ad.AnnData, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"unsupported input type builtins\.list"):
        read_expression([[1, 2], [3, 4]], orientation="cells_x_features")
    with pytest.raises(DataError, match=r"unsupported input type pandas\.DataFrame"):
        read_expression(pd.DataFrame(np.ones((3, 2))), orientation="cells_x_features")
    path = write_store(adata, tmp_path, "h5ad")
    with (
        h5py.File(path, "r") as file,
        pytest.raises(DataError, match=r"pass the \.h5ad file's path"),
    ):
        read_expression(file)
    with pytest.raises(DataError, match="obs must be a pandas DataFrame or a CSV path"):
        read_expression(np.ones((3, 2)), orientation="cells_x_features", obs=[1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(DataError, match="layer='dense' applies to AnnData"):
        read_expression(np.ones((3, 2)), orientation="cells_x_features", layer="dense")
    with pytest.raises(DataError, match="numeric"):
        read_expression(np.array([["a", "b"]]), orientation="cells_x_features")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(InputError, match="chunk_cells must be a positive integer"):
            read_expression(adata, chunk_cells=bad)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="orientation must be"):
        read_expression(np.ones((3, 2)), orientation="rows")  # type: ignore[arg-type]
    backed = ad.read_h5ad(path, backed="r")
    try:
        with pytest.raises(DataError, match="view of an AnnData backed by"):
            read_expression(backed[:5])
    finally:
        backed.file.close()


def test_dask_array_with_unknown_chunks_is_rejected() -> None:
    x = da.from_array(np.arange(12.0).reshape(6, 2), chunks=(3, 2))
    unknown = x[x[:, 0] > 2]
    with dask.config.set(scheduler="sync"), pytest.raises(DataError, match="compute_chunk_sizes"):
        read_expression(unknown, orientation="cells_x_features")
