"""The results store: blocks written in any order or concurrently read back exactly.

The fit is a real ``lmm`` fit of the R reference case simu_reml_k1 (40 features, 7
coefficients); the store's columns are compared with the LmmFit and lmmtest, the adjusted
p-values with statsmodels' Benjamini-Hochberg, and the tables with the Dataset.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
import zarr
from needs import module
from reference_cases import load_case, summary_args
from statsmodels.stats.multitest import multipletests

from flashmm_dask.design.contrasts import contrast_matrix
from flashmm_dask.errors import InputError, StoreError, ZeroFeatureWarning
from flashmm_dask.io.results import (
    FORMAT,
    FORMAT_VERSION,
    ResultsLayout,
    blocks_done,
    create_results,
    finalize_results,
    finalizing,
    fit_arrays,
    open_results,
    read_layout,
    read_store_attrs,
    results_table,
    write_block,
    write_tables,
)
from flashmm_dask.io.results_finalize import finalize_groups
from flashmm_dask.model.fit import LmmFit
from flashmm_dask.model.lmm import lmm
from flashmm_dask.model.lmmtest import lmmtest
from flashmm_dask.model.status import STATUS

CONTRASTS = {"second-first": "cls2:trtB - cls1:trtB", "first": "cls1:trtB"}
BLOCK = 7  # 40 features: blocks of 7, the last of 5
ATTRS = {
    "method": "REML",
    "fixed": "~ 0 + log(libsize) + cls + cls:trt",
    "random": ["~ 0 + sam"],
    "n_cells": 3000,
    "epsilon": 1e-5,
    "alternative": "two.sided",
    "config": {"output": {"path": "out.zarr"}, "block_size": BLOCK},
    "config_hash": "abc123",
    "timings": {"fit": 1.5},
}


def _all_arrays(fit: LmmFit) -> dict[str, np.ndarray]:
    """Every per-feature array of the fit and its contrasts, feature axis first."""
    arrays = fit_arrays(fit)
    tests = lmmtest(fit, contrast=CONTRASTS)
    names = list(CONTRASTS)
    L = contrast_matrix(CONTRASTS, fit.covariates).to_numpy()
    assert fit.cov is not None
    arrays["contrast_coef"] = tests[[f"{c}_coef" for c in names]].to_numpy()
    arrays["contrast_t"] = tests[[f"{c}_t" for c in names]].to_numpy()
    arrays["contrast_p"] = tests[[f"{c}_p" for c in names]].to_numpy()
    arrays["contrast_se"] = np.sqrt(np.einsum("pc,mpk,kc->mc", L, fit.cov, L))
    arrays["contrast_df"] = np.full((len(fit.features), len(names)), float(fit.df))
    return arrays


def _block(arrays: dict[str, np.ndarray], layout: ResultsLayout, b: int) -> dict[str, np.ndarray]:
    rows = layout.block_slice(b)
    return {name: value[rows] for name, value in arrays.items()}


def _layout(fit: LmmFit, contrasts: tuple[str, ...] = tuple(CONTRASTS), **kw) -> ResultsLayout:
    return ResultsLayout(
        features=fit.features,
        covariates=fit.covariates,
        components=fit.components,
        contrasts=contrasts,
        block_size=kw.pop("block_size", BLOCK),
        **kw,
    )


@pytest.fixture(scope="module")
def fit() -> LmmFit:
    return lmm(**summary_args(load_case("simu_reml_k1")))


@pytest.fixture(scope="module")
def arrays(fit: LmmFit) -> dict[str, np.ndarray]:
    return _all_arrays(fit)


def _write_all(path, layout: ResultsLayout, arrays, order=None, **kw) -> None:
    for b in range(layout.n_blocks) if order is None else order:
        write_block(path, int(b), _block(arrays, layout, int(b)), **kw)


def _bh(p: np.ndarray) -> np.ndarray:
    """statsmodels' BH of each column over its non-NaN entries."""
    out = np.full(p.shape, np.nan)
    for j in range(p.shape[1]):
        ok = ~np.isnan(p[:, j])
        out[ok, j] = multipletests(p[ok, j], method="fdr_bh")[1]
    return out


def _check_dataset(ds, fit: LmmFit) -> None:
    """Every column of the store against the fit (exactly) and lmmtest."""
    assert dict(ds.sizes) == {
        "feature": 40,
        "covariate": 7,
        "covariate2": 7,
        "component": 2,
        "contrast": 2,
        "block": -(-40 // ds.attrs["block_size"]),
    }
    for dim, names in [
        ("feature", fit.features),
        ("covariate", fit.covariates),
        ("covariate2", fit.covariates),
        ("component", fit.components),
        ("contrast", tuple(CONTRASTS)),
    ]:
        values = list(ds[dim].values)
        assert values == list(names)
        assert all(type(v) is str for v in values)
    for name, expected in [
        ("coef", fit.coef.T),
        ("se", fit.se.T),
        ("t", fit.t.T),
        ("p", fit.p.T),
        ("df", np.full(fit.coef.T.shape, fit.df)),
        ("theta", fit.theta.T),
        ("se_theta", fit.se_theta.T),
        ("dlogL", fit.dlogL.T),
        ("logLik", fit.logLik),
        ("niter", fit.niter),
        ("cov", fit.cov),
    ]:
        assert ds[name].dtype == np.float64, name
        np.testing.assert_array_equal(ds[name].values, expected, err_msg=name)
    assert ds["converged"].dtype == bool
    np.testing.assert_array_equal(ds["converged"].values, fit.converged)
    assert ds["coef"].dims == ("feature", "covariate")
    assert ds["cov"].dims == ("feature", "covariate", "covariate2")
    assert ds["theta"].dims == ("feature", "component")
    assert ds["contrast_p"].dims == ("feature", "contrast")
    # contrasts against the public lmmtest, the se against a per-feature dense computation
    tests = lmmtest(fit, contrast=CONTRASTS)
    L = contrast_matrix(CONTRASTS, fit.covariates)
    assert fit.cov is not None
    for c in CONTRASTS:
        got = ds.sel(contrast=c)
        np.testing.assert_array_equal(got["contrast_coef"].values, tests[f"{c}_coef"])
        np.testing.assert_array_equal(got["contrast_t"].values, tests[f"{c}_t"])
        np.testing.assert_array_equal(got["contrast_p"].values, tests[f"{c}_p"])
        np.testing.assert_array_equal(got["contrast_df"].values, float(fit.df))
        l = L[c].to_numpy()
        se = [np.sqrt(l @ fit.cov[j] @ l) for j in range(len(fit.features))]
        np.testing.assert_allclose(got["contrast_se"].values, se, rtol=1e-13)
    np.testing.assert_allclose(ds["padj"].values, _bh(fit.p.T), rtol=1e-14)
    np.testing.assert_allclose(ds["contrast_padj"].values, _bh(ds["contrast_p"].values), rtol=1e-14)


# -- round trips ----------------------------------------------------------------------


def test_blocks_in_shuffled_order_round_trip(tmp_path: Path, fit: LmmFit, arrays) -> None:
    path = tmp_path / "res.zarr"
    layout = _layout(fit)
    assert layout.n_blocks == 6 and layout.block_slice(5) == slice(35, 40)
    create_results(path, layout, ATTRS)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporaries left
    np.testing.assert_array_equal(blocks_done(path), np.zeros(6, dtype=bool))
    order = np.random.default_rng(3).permutation(6)
    done = np.zeros(6, dtype=bool)
    for b in order:
        write_block(path, int(b), _block(arrays, layout, int(b)))
        done[b] = True
        np.testing.assert_array_equal(blocks_done(path), done)
    assert read_store_attrs(path)["complete"] is False
    finalize_results(path, extra_attrs={"timings": {"fit": 1.5, "total": 2.0}})

    attrs = read_store_attrs(path)
    assert attrs["format"] == FORMAT and attrs["format_version"] == FORMAT_VERSION
    assert attrs["complete"] is True
    assert attrs["block_size"] == BLOCK and attrs["n_blocks"] == 6
    assert attrs["timings"] == {"fit": 1.5, "total": 2.0}
    assert attrs["random"] == ["~ 0 + sam"] and attrs["config_hash"] == "abc123"
    assert "flashmm_dask" in attrs["versions"] and attrs["created"].startswith("20")
    assert read_layout(path) == layout

    ds = open_results(path)
    _check_dataset(ds, fit)
    assert ds.attrs["complete"] is True
    assert bool(ds["block_done"].all())
    # every per-feature result in LZ4 with byte shuffle (zarr_batch.compressors)
    for name in ("coef", "cov", "converged", "status", "padj", "contrast_p"):
        (codec,) = zarr.open_array(str(path / name)).compressors
        assert (codec.cname.value, codec.shuffle.value) == ("lz4", "shuffle"), name


def test_plain_xarray_open_zarr_reads_the_store_without_warnings(
    tmp_path: Path, fit: LmmFit, arrays
) -> None:
    import xarray as xr

    path = tmp_path / "res.zarr"
    layout = _layout(fit)
    create_results(path, layout, ATTRS)
    _write_all(path, layout, arrays)
    finalize_results(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(path)
    _check_dataset(ds, fit)
    # every per-feature array is chunked by block along feature, whole along the rest
    group = zarr.open_group(path, mode="r")
    for name in ("coef", "theta", "logLik", "converged", "cov", "contrast_p", "padj"):
        node = group[name]
        assert isinstance(node, zarr.Array)
        assert node.chunks == (BLOCK, *node.shape[1:]), name


def test_unfitted_features_are_nan_and_excluded_from_bh(tmp_path: Path) -> None:
    args = summary_args(load_case("simu_reml_k1"))
    zero = [2, 9, 10, 33]
    for key in ("XY", "ZY"):
        args[key] = args[key].copy()
        args[key].iloc[:, zero] = 0.0
    args["Ynorm"] = args["Ynorm"].copy()
    args["Ynorm"].iloc[zero] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ZeroFeatureWarning)
        fit = lmm(**args)
    assert np.isnan(fit.p[:, zero]).all() and np.isnan(fit.niter[zero]).all()
    path = tmp_path / "res.zarr"
    layout = _layout(fit)
    create_results(path, layout, ATTRS)
    _write_all(path, layout, _all_arrays(fit))
    finalize_results(path)
    ds = open_results(path)
    _check_dataset(ds, fit)
    assert np.isnan(ds["padj"].values[zero]).all()
    assert np.isnan(ds["contrast_padj"].values[zero]).all()


@pytest.mark.distributed
def test_blocks_written_concurrently_by_worker_processes(
    tmp_path: Path, fit: LmmFit, arrays
) -> None:
    distributed = module("distributed")
    path = str(tmp_path / "res.zarr")
    layout = _layout(fit)
    create_results(path, layout, ATTRS)
    blocks = [int(b) for b in np.random.default_rng(5).permutation(layout.n_blocks)]
    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=2, dashboard_address="127.0.0.1:0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        pids = client.run(os.getpid)
        # every block twice: concurrent rewrites of one block must leave the same result
        futures = [
            client.submit(write_block, path, b, _block(arrays, layout, b), pure=False)
            for b in blocks + blocks
        ]
        client.gather(futures)
    assert len(set(pids.values()) | {os.getpid()}) == 3
    assert blocks_done(path).all()
    finalize_results(path)
    _check_dataset(open_results(path), fit)


def test_memory_url_round_trip(fit: LmmFit, arrays) -> None:
    url = f"memory://flashmm-results-{uuid.uuid4().hex}/res.zarr"
    layout = _layout(fit)
    fs = fsspec.filesystem("memory")
    try:
        create_results(url, layout, ATTRS, storage_options={})
        assert fs.exists(url.removeprefix("memory://") + "/zarr.json")
        _write_all(url, layout, arrays, order=[5, 0, 3, 1, 4, 2])
        finalize_results(url)
        assert read_store_attrs(url)["complete"] is True
        _check_dataset(open_results(url), fit)
        with pytest.raises(StoreError, match="already exists"):
            create_results(url, layout, ATTRS)
        # one block larger than the features
        create_results(url, _layout(fit, block_size=64), ATTRS, overwrite=True)
        assert blocks_done(url).tolist() == [False]
        write_block(url, 0, arrays)
        finalize_results(url)
        _check_dataset(open_results(url), fit)
    finally:
        fs.rm(url.removeprefix("memory://").split("/")[0], recursive=True)


def test_store_without_contrasts_or_covariances(tmp_path: Path, fit: LmmFit, arrays) -> None:
    path = tmp_path / "res.zarr"
    layout = _layout(fit, contrasts=(), store_cov=False, block_size=16)
    create_results(path, layout, ATTRS)
    keep = ("coef", "se", "t", "p", "df", "theta", "se_theta", "dlogL", "logLik", "niter")
    plain = {k: arrays[k] for k in (*keep, "converged")}
    with pytest.raises(StoreError, match=r"cov \(not in this store\)"):
        write_block(path, 0, _block({**plain, "cov": arrays["cov"]}, layout, 0))
    _write_all(path, layout, plain)
    finalize_results(path)
    ds = open_results(path)
    assert ds.sizes["contrast"] == 0 and "cov" not in ds
    assert ds["contrast_p"].shape == (40, 0)
    for name in keep:
        np.testing.assert_array_equal(ds[name].values, arrays[name], err_msg=name)
    np.testing.assert_allclose(ds["padj"].values, _bh(arrays["p"]), rtol=1e-14)
    table = results_table(ds)
    assert len(table) == 40 * 7 and list(table["term"].unique()) == list(fit.covariates)
    assert read_layout(path) == layout


# -- tables ---------------------------------------------------------------------------


def test_tables_equal_the_dataset_row_by_row(tmp_path: Path, fit: LmmFit, arrays) -> None:
    path = tmp_path / "res.zarr"
    layout = _layout(fit)
    create_results(path, layout, ATTRS)
    _write_all(path, layout, arrays)
    finalize_results(path)
    ds = open_results(path)
    written = write_tables(ds, tmp_path / "tables")
    assert written == [tmp_path / "tables" / "results.csv", tmp_path / "tables" / "results.parquet"]
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == [
        "results.csv",
        "results.parquet",
    ]
    csv = pd.read_csv(
        written[0], float_precision="round_trip", keep_default_na=False, na_values=[""]
    )
    parquet = pd.read_parquet(written[1])
    columns = [
        "feature",
        "term",
        "coef",
        "se",
        "t",
        "df",
        "p",
        "padj",
        "converged",
        "niter",
        "status",
    ]
    terms = [("covariate", "", t) for t in fit.covariates] + [
        ("contrast", "contrast_", c) for c in CONTRASTS
    ]
    ds = ds.load()  # row by row from memory, not one dask compute per value
    for table in (csv, parquet, results_table(ds)):
        assert list(table.columns) == columns
        assert len(table) == 40 * (7 + 2) and table["converged"].dtype == bool
        rows = iter(table.itertuples(index=False))
        for dim, prefix, term in terms:
            for j, feature in enumerate(fit.features):
                row = next(rows)._asdict()
                assert (row["feature"], row["term"]) == (feature, term)
                sel = ds.isel(feature=j).sel({dim: term})
                for col in ("coef", "se", "t", "df", "p", "padj"):
                    np.testing.assert_array_equal(row[col], sel[prefix + col].values)
                assert bool(row["converged"]) == bool(ds["converged"].values[j])
                np.testing.assert_array_equal(row["niter"], ds["niter"].values[j])


def test_large_tables_are_formatted_in_slices_to_the_same_bytes(
    tmp_path: Path, monkeypatch
) -> None:
    """A table of many slices (threads format them, the file takes them in order) has the
    bytes of one call of Arrow's writer: header once, quoting, nulls, slice boundaries."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    from flashmm_dask.io import tables

    rng = np.random.default_rng(3)
    n = 1_003
    values = rng.normal(size=n) * 10.0 ** rng.integers(-9, 9, n)
    values[::17] = np.nan
    table = pa.table(
        {
            "stratum": pa.array([f"type {i // 100}" for i in range(n)]),
            "feature": pa.array([f'g,"{i}"' if i % 7 == 0 else f"g{i}" for i in range(n)]),
            "coef": pa.array(values, mask=np.isnan(values)),
            "niter": pa.array(np.arange(n) % 5, mask=np.arange(n) % 11 == 0),
        }
    )
    whole = tmp_path / "whole.csv"
    pa_csv.write_csv(table, whole, write_options=pa_csv.WriteOptions(quoting_style="needed"))
    monkeypatch.setattr(tables, "CSV_SLICE_ROWS", 50)  # 21 slices, the last of 3 rows
    sliced = tmp_path / "sliced.csv"
    tables.write_arrow_csv(table, sliced)
    assert sliced.read_bytes() == whole.read_bytes()
    assert sliced.read_text().count('"stratum","feature"') == 1
    one = tmp_path / "one.csv"
    tables.write_arrow_csv(table, one, threads=1)
    assert one.read_bytes() == whole.read_bytes()


def test_parquet_from_arrow_is_the_file_pandas_writes(tmp_path: Path, fit: LmmFit, arrays) -> None:
    """results.parquet, written from the Arrow rows, has the schema (pandas' metadata
    included) and the rows that ``results_table(ds).to_parquet`` writes, so pandas reads
    the same frame (niter Int64, NA where a feature was not fitted); an empty table reads
    as pandas' empty frame."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flashmm_dask.io.tables import results_arrow, write_arrow_parquet

    path = tmp_path / "res.zarr"
    layout = _layout(fit)
    create_results(path, layout, ATTRS)
    unfitted = {k: np.array(v, dtype=float) if k == "niter" else v for k, v in arrays.items()}
    unfitted["niter"][[0, 5]] = np.nan
    _write_all(path, layout, unfitted)
    finalize_results(path)
    ds = open_results(path).load()
    for name, table in (
        ("whole", results_arrow(ds, "T cells")),
        ("empty", results_arrow(ds, "T cells").slice(0, 0)),
    ):
        ours, theirs = tmp_path / f"{name}-ours.parquet", tmp_path / f"{name}-pandas.parquet"
        write_arrow_parquet(table, ours)
        frame = table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
        frame.to_parquet(theirs, index=False)
        read = pd.read_parquet(ours)
        pd.testing.assert_frame_equal(read, pd.read_parquet(theirs))
        if name == "whole":  # (pandas types an empty frame's text columns as null)
            assert pq.read_schema(ours).equals(pq.read_schema(theirs), check_metadata=True)
            assert str(read["niter"].dtype) == "Int64"
            assert read["niter"].isna().sum() == 2 * (7 + 2)
            assert set(read["stratum"]) == {"T cells"}


def test_write_table_of_a_frame_writes_what_pandas_writes(tmp_path: Path) -> None:
    """write_table (a DataFrame, through the same Arrow writers): its Parquet is the file
    ``to_parquet(index=False)`` writes (integer and nullable integer columns kept apart),
    its CSV reads back as the frame."""
    import pyarrow.parquet as pq

    from flashmm_dask.io.tables import write_table

    frame = pd.DataFrame(
        {
            "name": ["a", 'b,"c"', "d"],
            "count": np.array([1, 2, 3], dtype=np.int64),
            "niter": pd.array([4, None, 6], dtype="Int64"),
            "p": [0.5, np.nan, 1.5e-5],
        }
    )
    csv, parquet = write_table(frame, tmp_path, "t")
    frame.to_parquet(tmp_path / "pandas.parquet", index=False)
    assert pq.read_schema(parquet).equals(
        pq.read_schema(tmp_path / "pandas.parquet"), check_metadata=True
    )
    pd.testing.assert_frame_equal(pd.read_parquet(parquet), frame)
    back = pd.read_csv(csv, float_precision="round_trip", dtype={"niter": "Int64"})
    pd.testing.assert_frame_equal(back, frame)


def test_write_tables_one_format_and_bad_format(tmp_path: Path, fit: LmmFit, arrays) -> None:
    path = tmp_path / "res.zarr"
    layout = _layout(fit, contrasts=())
    create_results(path, layout, ATTRS)
    _write_all(path, layout, {k: v for k, v in arrays.items() if not k.startswith("contrast")})
    finalize_results(path)
    ds = open_results(path)
    assert write_tables(ds, tmp_path, formats=("parquet",), name="x") == [tmp_path / "x.parquet"]
    assert not (tmp_path / "x.csv").exists()
    with pytest.raises(InputError, match="unknown table formats"):
        write_tables(ds, tmp_path, formats=("xlsx",))


# -- resume, refusals and faults ------------------------------------------------------


def test_finalize_and_open_refuse_missing_blocks(tmp_path: Path, fit: LmmFit, arrays) -> None:
    path = tmp_path / "res.zarr"
    layout = _layout(fit)
    create_results(path, layout, ATTRS)
    _write_all(path, layout, arrays, order=[0, 2, 3, 5])
    np.testing.assert_array_equal(blocks_done(path), [True, False, True, True, False, True])
    with pytest.raises(StoreError, match=r"2 of 6 blocks .* not written \(blocks 1, 4\)"):
        finalize_results(path)
    with pytest.raises(StoreError, match=r"incomplete.*4 of 6 blocks.*Rerun the same command"):
        open_results(path)
    ds = open_results(path, allow_incomplete=True)
    assert ds.attrs["complete"] is False
    assert np.isnan(ds["coef"].values[7:14]).all() and np.isnan(ds["coef"].values[28:35]).all()
    assert not ds["converged"].values[7:14].any()
    np.testing.assert_array_equal(ds["coef"].values[:7], fit.coef.T[:7])
    assert np.isnan(ds["padj"].values).all()
    # resuming: write the missing blocks, then finalize succeeds
    _write_all(path, layout, arrays, order=[4, 1])
    finalize_results(path)
    _check_dataset(open_results(path), fit)
    with pytest.raises(StoreError, match="is complete"):
        write_block(path, 0, _block(arrays, layout, 0))


def test_open_refuses_other_formats_and_versions(tmp_path: Path, fit: LmmFit, arrays) -> None:
    path = tmp_path / "res.zarr"
    layout = _layout(fit, block_size=40)
    create_results(path, layout, ATTRS)
    _write_all(path, layout, arrays)
    finalize_results(path)

    def set_attr(**kw) -> None:
        zarr.open_group(path, mode="r+").attrs.update(kw)

    set_attr(format_version=FORMAT_VERSION + 1)
    with pytest.raises(StoreError, match="newer than this flashmm_dask reads"):
        open_results(path)
    with pytest.raises(StoreError, match="format version 2"):
        read_store_attrs(path)
    set_attr(format_version=0)
    with pytest.raises(StoreError, match="invalid format_version"):
        blocks_done(path)
    set_attr(format="something.else", format_version=FORMAT_VERSION)
    with pytest.raises(StoreError, match=r"not a flashmm_dask results store.*something.else"):
        open_results(path)
    set_attr(format=FORMAT)
    _check_dataset(open_results(path), fit)
    with pytest.raises(StoreError, match="no results store at"):
        open_results(tmp_path / "missing.zarr")
    other = tmp_path / "other.zarr"
    zarr.open_group(other, mode="w").attrs.update({"hello": 1})
    with pytest.raises(StoreError, match="not a flashmm_dask results store"):
        open_results(other)


def test_create_refuses_existing_paths(tmp_path: Path, fit: LmmFit, arrays) -> None:
    path = tmp_path / "res.zarr"
    create_results(path, _layout(fit), ATTRS)
    write_block(path, 0, _block(arrays, _layout(fit), 0))
    with pytest.raises(StoreError, match=r"already exists.*overwrite"):
        create_results(path, _layout(fit), ATTRS)
    assert blocks_done(path)[0]  # untouched
    new = _layout(fit, block_size=20)
    create_results(path, new, ATTRS, overwrite=True)
    assert read_layout(path) == new and not blocks_done(path).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.zarr"]
    # overwrite never removes something that is not a results store
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a flashmm_dask results store; refusing"):
        create_results(precious, new, ATTRS, overwrite=True)
    assert (precious / "data.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    create_results(empty, new, ATTRS, overwrite=True)
    assert read_layout(empty) == new


def test_interrupted_create_leaves_nothing(tmp_path: Path, fit: LmmFit, monkeypatch) -> None:
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(zarr, "consolidate_metadata", crash)
    with pytest.raises(StoreError, match=r"cannot create the results store.*disk full"):
        create_results(tmp_path / "res.zarr", _layout(fit), ATTRS)
    assert list(tmp_path.iterdir()) == []


def test_a_block_that_fails_midway_is_not_marked_done(
    tmp_path: Path, fit: LmmFit, arrays, monkeypatch
) -> None:
    path = tmp_path / "res.zarr"
    layout = _layout(fit)
    create_results(path, layout, ATTRS)
    # the block's arrays are written concurrently (zarr's asynchronous arrays), then marked
    setitem = zarr.AsyncArray.setitem

    async def failing(self, selection, value, *args, **kwargs):
        if self.basename == "contrast_df":  # the last array of the block
            raise OSError("connection reset")
        await setitem(self, selection, value, *args, **kwargs)

    monkeypatch.setattr(zarr.AsyncArray, "setitem", failing)
    with pytest.raises(OSError, match="connection reset"):
        write_block(path, 1, _block(arrays, layout, 1))
    monkeypatch.undo()
    assert not blocks_done(path).any()
    with pytest.raises(StoreError, match=r"6 of 6 blocks"):
        finalize_results(path)
    _write_all(path, layout, arrays)  # the rerun rewrites block 1 whole
    finalize_results(path)
    _check_dataset(open_results(path), fit)


def test_rewriting_a_block_is_idempotent(tmp_path: Path, fit: LmmFit, arrays) -> None:
    path = tmp_path / "res.zarr"
    layout = _layout(fit)
    create_results(path, layout, ATTRS)
    _write_all(path, layout, arrays)

    def chunk_bytes() -> dict[str, bytes]:
        return {
            str(p.relative_to(path)): p.read_bytes()
            for p in sorted(path.rglob("*"))
            if p.is_file() and "/c/" in str(p.relative_to(path)).replace(os.sep, "/") + "/"
        }

    before = chunk_bytes()
    assert any(k.startswith("coef") for k in before)
    write_block(path, 3, _block(arrays, layout, 3))
    assert chunk_bytes() == before
    # a different block 3 changes only chunk 3 of each array; writing it back restores all
    changed = {k: (v + 1 if v.dtype != bool else ~v) for k, v in _block(arrays, layout, 3).items()}
    write_block(path, 3, changed)
    after = chunk_bytes()
    differ = {k for k in before if before[k] != after.get(k)}
    # chunk keys are <array>/c/<feature chunk>/<other dims...>
    assert differ and all(
        k.replace(os.sep, "/").split("/c/")[1].split("/")[0] == "3" for k in differ
    )
    # flipping converged also changes the derived status of the block's features
    assert {k.split(os.sep)[0] for k in differ} == set(changed) | {"status"}
    write_block(path, 3, _block(arrays, layout, 3))
    assert chunk_bytes() == before


def test_write_block_validates_before_writing(tmp_path: Path, fit: LmmFit, arrays) -> None:
    path = tmp_path / "res.zarr"
    layout = _layout(fit)
    create_results(path, layout, ATTRS)
    good = _block(arrays, layout, 5)
    assert good["coef"].shape == (5, 7)
    cases = [
        ({k: v for k, v in good.items() if k != "theta"}, "missing theta"),
        ({**good, "padj": good["p"]}, r"padj \(computed by finalize_results\)"),
        ({**good, "beta": good["p"]}, r"beta \(unknown\)"),
        ({**good, "coef": arrays["coef"][:7]}, r"coef has shape \(7, 7\); expected \(5, 7\)"),
        ({**good, "converged": good["converged"].astype(float)}, "converged must be a boolean"),
        ({**good, "theta": good["theta"].astype(str)}, "theta must be numeric"),
        ({**good, "se": good["se"] + 0j}, "se must be numeric; got dtype complex128"),
    ]
    for bad, message in cases:
        with pytest.raises(StoreError, match=message):
            write_block(path, 5, bad)
    with pytest.raises(StoreError, match=r"block 6 is out of range.*0\.\.5"):
        write_block(path, 6, good)
    assert not blocks_done(path).any()
    assert np.isnan(open_results(path, allow_incomplete=True)["coef"].values).all()
    with pytest.raises(InputError, match="out of range"):
        layout.block_slice(6)


def test_layout_validation(fit: LmmFit) -> None:
    with pytest.raises(InputError, match="block_size must be a positive integer"):
        _layout(fit, block_size=0)
    with pytest.raises(InputError, match="features is empty"):
        ResultsLayout((), fit.covariates, fit.components, (), 5)
    with pytest.raises(InputError, match="duplicate names: a"):
        ResultsLayout(fit.features, fit.covariates, fit.components, ("a", "a"), 5)


def test_storage_options_are_redacted_and_attrs_made_json(tmp_path: Path, fit: LmmFit) -> None:
    config = {
        "input": {"path": "s3://bucket/x.zarr", "storage_options": {"key": "AKIA", "secret": "s"}},
        "output": {"storage_options": "token-123"},
        "cluster": [{"storage_options": {"token": "t"}}],
    }
    attrs = {**ATTRS, "config": config, "n_cells": np.int64(3000), "epsilon": np.float64(1e-5)}
    path = tmp_path / "res.zarr"
    create_results(path, _layout(fit), attrs)
    stored = read_store_attrs(path)
    assert stored["config"] == {
        "input": {
            "path": "s3://bucket/x.zarr",
            "storage_options": {"key": "<redacted>", "secret": "<redacted>"},
        },
        "output": {"storage_options": "<redacted>"},
        "cluster": [{"storage_options": {"token": "<redacted>"}}],
    }
    assert config["input"]["storage_options"] == {"key": "AKIA", "secret": "s"}  # not mutated
    text = (path / "zarr.json").read_text()
    assert "AKIA" not in text and "token-123" not in text
    assert stored["n_cells"] == 3000 and stored["epsilon"] == 1e-5
    assert json.loads(text)["attributes"]["complete"] is False
    with pytest.raises(InputError, match=r"sets complete=True \(the store's is False\)"):
        create_results(tmp_path / "b.zarr", _layout(fit), {**ATTRS, "complete": True})
    with pytest.raises(InputError, match=r"sets n_blocks=5 \(the store's is 6\)"):
        create_results(tmp_path / "b.zarr", _layout(fit), {**ATTRS, "n_blocks": 5})
    with pytest.raises(InputError, match=r"attribute attrs\['bad'\] has type object"):
        create_results(tmp_path / "c.zarr", _layout(fit), {**ATTRS, "bad": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.zarr"]
    # the managed attributes may be repeated; options for local paths are ignored
    create_results(
        tmp_path / "d.zarr",
        _layout(fit),
        {**ATTRS, "block_size": BLOCK, "n_blocks": 6, "format": FORMAT},
        storage_options={"anon": True},
    )
    assert read_store_attrs(tmp_path / "d.zarr", storage_options={"anon": True})["n_blocks"] == 6
    with pytest.raises(InputError, match=r"extra_attrs sets block_size=3"):
        finalize_results(tmp_path / "d.zarr", extra_attrs={"block_size": 3})


def test_groups_finalized_together_equal_one_by_one(tmp_path: Path, fit: LmmFit, arrays) -> None:
    """finalize_groups (a stratified run's groups in one call) writes what finalize_results
    writes one group at a time, marks the filtered features and counts the statuses; a
    group with a block missing raises after the others are finalized."""
    layout = _layout(fit)
    paths = [tmp_path / f"g{k}.zarr" for k in range(4)]
    for path in paths:
        create_results(path, layout, ATTRS)
        _write_all(path, layout, arrays)
    incomplete = tmp_path / "missing.zarr"
    create_results(incomplete, layout, ATTRS)
    for b in range(layout.n_blocks - 1):
        write_block(incomplete, b, _block(arrays, layout, b))
    finalize_results(paths[0], extra_attrs={"timings": {"fit": 1.0}})
    m = len(fit.features)
    filtered = np.zeros(m, dtype=bool)
    filtered[[0, 7]] = True
    items = [
        finalizing(paths[1], {"timings": {"fit": 1.0}}),
        finalizing(paths[2], {"timings": {"fit": 1.0}}, filtered=filtered, counted=True),
        finalizing(incomplete),
        finalizing(paths[3], counted=True),
    ]
    with pytest.raises(StoreError, match=r"1 of 6 blocks .*missing\.zarr"):
        finalize_groups(items)
    assert read_store_attrs(incomplete)["complete"] is False
    one = zarr.open_group(paths[0], mode="r")
    for path in (paths[1], paths[2], paths[3]):
        group = zarr.open_group(path, mode="r")
        assert group.attrs["complete"] is True and group.attrs["p_adjust"] == "BH"
        for name in ("padj", "contrast_padj"):
            np.testing.assert_array_equal(group[name][...], one[name][...])
    assert zarr.open_group(paths[1], mode="r").attrs["timings"] == {"fit": 1.0}
    status = zarr.open_group(paths[2], mode="r")["status"][...]
    assert (status[[0, 7]] == STATUS.index("filtered")).all()
    np.testing.assert_array_equal(np.delete(status, [0, 7]), np.delete(one["status"][...], [0, 7]))
    counts = zarr.open_group(paths[2], mode="r").attrs["status_counts"]
    assert counts["filtered"] == 2 and sum(counts.values()) == m
    assert zarr.open_group(paths[3], mode="r").attrs["status_counts"]["filtered"] == 0
