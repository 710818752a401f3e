"""TileDB-SOMA experiments: the same statistics as the AnnData stores they were written from.

Experiments are written with ``tiledbsoma.io.from_anndata`` from the AnnData that is also
written as .zarr and .h5ad; the summary statistics reduced from each must agree to 1e-12
(X and a named layer, with and without a cell filter), and the R reference cases must pass
through the SOMA reader. Laziness and the single pass are proved by recording every call
of tiledbsoma's own read methods (the real ones run): no X read before compute, one read
per block, every selected cell requested exactly once. Bad input names what exists.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from needs import module
from pipeline_helpers import assert_stores_equal
from reference_cases import SIMU_CASES, load_case
from test_flashmm import FIXED, RANDOM, assert_fit_equal_r, assert_stats_equal_r, case_adata

import flashmm_dask as fm
from flashmm_dask.design.formula import build_design
from flashmm_dask.errors import DataError, InputError
from flashmm_dask.io import soma as soma_io
from flashmm_dask.io.readers import read_expression
from flashmm_dask.io.results import open_results
from flashmm_dask.run.config import load_config
from flashmm_dask.run.pipeline import prepare_inputs

CLI = os.path.join(os.path.dirname(sys.executable), "flashmm-dask")
FORMULA = ("~ 0 + log(libsize) + cls + cls:trt", "~ 0 + sam")
# the demo's contrasts name cell type 1, which the cell filter below removes
CONTRASTS = (
    "contrasts.trt_in_cls1=null",
    "contrasts.trt_cls2_vs_cls1=null",
    "contrasts.trt_cls3_vs_cls2=cls3:trtB - cls2:trtB",
)
# cells not of type 1, outside sample B1, with a library size over 30 (three columns)
CELLS = "cls != '1' and sam != 'B1' and libsize > 30"


@pytest.fixture(scope="module")
def tiledbsoma() -> Any:
    return module("tiledbsoma", "pip install -e '.[soma]'")


def write_soma(tiledbsoma: Any, adata: ad.AnnData, path: Path) -> str:
    import tiledbsoma.io

    return str(tiledbsoma.io.from_anndata(str(path), adata, measurement_name="RNA"))


@pytest.fixture(scope="module")
def atlas() -> ad.AnnData:
    """Simulated counts (CSR X) and a second, different layer."""
    adata = fm.simulate_rnaseq(40, 2500, n_samples=8, seed=3)
    adata.X = adata.X.astype(np.float32)
    rng = np.random.default_rng(0)
    adata.layers["raw"] = sp.csr_matrix(rng.poisson(0.4, adata.shape).astype(np.float64))
    adata.var["feature_name"] = [f"SYM{i}" for i in range(adata.n_vars)]
    return adata


@pytest.fixture(scope="module")
def experiment(tiledbsoma: Any, atlas: ad.AnnData, tmp_path_factory: Any) -> str:
    return write_soma(tiledbsoma, atlas, tmp_path_factory.mktemp("soma") / "atlas.soma")


def selected(adata: ad.AnnData) -> np.ndarray:
    obs = adata.obs
    return ((obs["cls"] != "1") & (obs["sam"] != "B1") & (obs["libsize"] > 30)).to_numpy()


def dense(x: Any) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def reduce(expr: Any, design_obs: pd.DataFrame | None = None, **kwargs: Any) -> Any:
    design = build_design(expr.obs if design_obs is None else design_obs, *FORMULA)
    return fm.reduce_stats(expr, design, transform="log2p1", **kwargs)


def assert_stats_identical(a: Any, b: Any) -> None:
    for key in ("XX", "XY", "ZX", "ZY", "ZZ", "Ynorm"):
        np.testing.assert_allclose(
            np.asarray(getattr(a, key)), np.asarray(getattr(b, key)), rtol=1e-12, err_msg=key
        )
    assert a.n == b.n
    assert tuple(a.covariates) == tuple(b.covariates)
    assert tuple(a.features) == tuple(b.features)


# -- statistics identical to the AnnData stores --------------------------------------


@pytest.mark.parametrize("layer", [None, "raw"])
@pytest.mark.parametrize("cell_filter", [None, CELLS])
def test_soma_statistics_equal_the_anndata_stores(
    atlas: ad.AnnData, experiment: str, tmp_path: Path, layer: str | None, cell_filter: str | None
) -> None:
    subset = atlas if cell_filter is None else atlas[selected(atlas)].copy()
    expr = soma_io.read_soma(experiment, layer=layer, obs_filter=cell_filter, chunk_cells=300)
    assert expr.n_cells == subset.n_obs and list(expr.features) == list(atlas.var_names)
    got = reduce(expr)
    for suffix in (".zarr", ".h5ad"):
        store = fm.write_store(subset, tmp_path / f"atlas{suffix}")
        want = reduce(read_expression(store, layer=layer, chunk_cells=300))
        assert_stats_identical(got, want)
    # and the blocks are the stored values, whatever the chunking
    matrix = subset.X if layer is None else subset.layers[layer]
    for chunk_cells in (1, 977, None):
        expr = soma_io.read_soma(
            experiment, layer=layer, obs_filter=cell_filter, chunk_cells=chunk_cells
        )
        blocks = expr.data.to_delayed()[:, 0]
        first = blocks[0].compute(scheduler="sync")
        assert isinstance(first, sp.csr_matrix) and first.has_sorted_indices
        np.testing.assert_array_equal(dense(expr.data.compute()), dense(matrix))
    pd.testing.assert_frame_equal(
        expr.obs, subset.obs, check_index_type=False, check_categorical=True
    )


@pytest.mark.parametrize("name", SIMU_CASES)
def test_r_reference_cases_through_the_soma_reader(
    tiledbsoma: Any, tmp_path: Path, name: str
) -> None:
    case = load_case(name)
    path = write_soma(tiledbsoma, case_adata(name), tmp_path / "case.soma")
    fit = fm.flashmm(
        path,
        FIXED,
        RANDOM.get(name, "~ 0 + sam"),
        is_counts=True,
        chunk_cells=700,
        method=case["fit"]["method"],
        output_ss=True,
    )
    assert_stats_equal_r(fit.summary_data, case)
    assert_fit_equal_r(fit, case)


def test_feature_selection_is_read_and_reduced_alone(atlas: ad.AnnData, experiment: str) -> None:
    names = [atlas.var_names[i] for i in (31, 2, 17)]
    expr = soma_io.read_soma(experiment, features=names, obs_filter=CELLS, chunk_cells=500)
    assert list(expr.features) == [atlas.var_names[i] for i in (2, 17, 31)]  # var order
    subset = atlas[selected(atlas)]
    np.testing.assert_array_equal(dense(expr.data.compute()), dense(subset.X[:, [2, 17, 31]]))
    whole = reduce(soma_io.read_soma(experiment, obs_filter=CELLS, chunk_cells=500))
    assert_stats_identical(reduce(expr), whole.subset(list(expr.features)))
    by_value = soma_io.read_soma(experiment, var_filter="de == True", var_column="feature_name")
    de = atlas.var["de"].to_numpy()
    assert list(by_value.features) == list(atlas.var["feature_name"][de])
    np.testing.assert_array_equal(dense(by_value.data.compute()), dense(atlas.X[:, de]))


# -- laziness and one pass -----------------------------------------------------------


class Reads:
    """Records the calls of tiledbsoma's read methods; the real methods do the reading."""

    def __init__(self, tiledbsoma: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.x: list[tuple[Any, Any]] = []
        self.frames: list[list[str] | None] = []
        x_read, frame_read = tiledbsoma.SparseNDArray.read, tiledbsoma.DataFrame.read

        def record_x(array: Any, coords: Any = (), *args: Any, **kwargs: Any) -> Any:
            self.x.append(tuple(coords))
            return x_read(array, coords, *args, **kwargs)

        def record_frame(frame: Any, *args: Any, **kwargs: Any) -> Any:
            self.frames.append(kwargs.get("column_names"))
            return frame_read(frame, *args, **kwargs)

        monkeypatch.setattr(tiledbsoma.SparseNDArray, "read", record_x)
        monkeypatch.setattr(tiledbsoma.DataFrame, "read", record_frame)

    def cells(self) -> list[np.ndarray]:
        out = []
        for rows, _ in self.x:
            if isinstance(rows, slice):
                out.append(np.arange(rows.start, rows.stop + 1))  # SOMA slices include stop
            else:
                out.append(np.asarray(rows))
        return out


@pytest.fixture
def reads(tiledbsoma: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Reads]:
    yield Reads(tiledbsoma, monkeypatch)


@pytest.mark.parametrize("cell_filter", [None, CELLS])
def test_nothing_of_x_is_read_before_compute_and_each_cell_once(
    atlas: ad.AnnData, experiment: str, reads: Reads, cell_filter: str | None
) -> None:
    expr = soma_io.read_soma(
        experiment,
        obs_filter=cell_filter,
        obs_columns=["libsize", "cls", "trt", "sam"],
        chunk_cells=200,
    )
    assert reads.x == []  # X untouched
    assert [sorted(c or []) for c in reads.frames] == [
        ["cls", "libsize", "sam", "soma_joinid", "trt"],  # obs: the columns asked for
        ["soma_joinid", "var_id"],  # var: only the names
    ]
    assert list(expr.obs.columns) == ["libsize", "cls", "trt", "sam"]
    stats = reduce(expr)
    n_blocks = len(expr.data.chunks[0])
    assert len(reads.x) == n_blocks > 5  # one pass: one read per block
    requested = np.sort(np.concatenate(reads.cells()))  # blocks run in any order
    mask = np.ones(atlas.n_obs, bool) if cell_filter is None else selected(atlas)
    np.testing.assert_array_equal(requested, np.flatnonzero(mask))  # each selected cell once
    assert all(cols == slice(None) for _, cols in reads.x)
    assert stats.n == mask.sum()


def test_values_rewritten_after_read_soma_are_not_seen(
    tiledbsoma: Any, atlas: ad.AnnData, tmp_path: Path
) -> None:
    """Blocks read the experiment as it was when it was opened (one consistent version)."""
    path = write_soma(tiledbsoma, atlas, tmp_path / "e.soma")
    expr = soma_io.read_soma(path, chunk_cells=1000)
    import pyarrow as pa

    with tiledbsoma.open(path, mode="w") as exp:
        coo = atlas.X.tocoo()
        exp.ms["RNA"].X["data"].write(
            pa.Table.from_pydict(
                {
                    "soma_dim_0": coo.row.astype(np.int64),
                    "soma_dim_1": coo.col.astype(np.int64),
                    "soma_data": (coo.data + 1).astype(np.float32),
                }
            )
        )
    np.testing.assert_array_equal(dense(expr.data.compute()), dense(atlas.X))
    again = soma_io.read_soma(path, chunk_cells=1000)
    np.testing.assert_array_equal(dense(again.data.compute()), dense(atlas.X) + (atlas.X != 0))


@pytest.mark.distributed
def test_soma_graph_runs_on_a_multiprocess_cluster(atlas: ad.AnnData, experiment: str) -> None:
    distributed = module("distributed")
    expr = soma_io.read_soma(experiment, layer="raw", obs_filter=CELLS, chunk_cells=400)
    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address="127.0.0.1:0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        result = client.compute(expr.data, sync=True)
        pids = client.run(os.getpid)
    assert len(set(pids.values()) | {os.getpid()}) == 3
    np.testing.assert_array_equal(dense(result), dense(atlas.layers["raw"][selected(atlas)]))


# -- bad input -----------------------------------------------------------------------


def test_not_a_soma_experiment(tiledbsoma: Any, experiment: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'.*missing.soma' is not a SOMA experiment"):
        soma_io.read_soma(tmp_path / "missing.soma")
    (tmp_path / "empty.soma").mkdir()
    with pytest.raises(DataError, match=r"is not a SOMA experiment.*from_anndata"):
        read_expression(tmp_path / "empty.soma")
    with pytest.raises(DataError, match=r"is a SOMAMeasurement, not .*members: X, uns, var"):
        soma_io.read_soma(f"{experiment}/ms/RNA")
    with pytest.raises(DataError, match=r"is a SOMASparseNDArray, not a SOMA experiment"):
        soma_io.read_soma(f"soma://{experiment}/ms/RNA/X/data")


def test_unknown_measurement_layer_and_columns_list_what_exists(experiment: str) -> None:
    with pytest.raises(DataError, match=r"measurement 'ATAC' not found .*available: RNA"):
        soma_io.read_soma(experiment, measurement="ATAC")
    with pytest.raises(DataError, match=r"X layer 'counts' not found .*available: data, raw"):
        soma_io.read_soma(experiment, layer="counts")
    with pytest.raises(DataError, match=r"X layer 'counts' not found .*available: data, raw"):
        read_expression(experiment, layer="counts")
    columns = "obs_id, sam, cls, trt, libsize"
    with pytest.raises(
        DataError, match=rf"obs_filter \"tissue == 'lung'\" names a column .*columns: {columns}"
    ):
        soma_io.read_soma(experiment, obs_filter="tissue == 'lung'")
    with pytest.raises(DataError, match=r"not a valid SOMA value filter"):
        soma_io.read_soma(experiment, obs_filter="trt = = 'B'")
    with pytest.raises(DataError, match=rf"obs column\(s\) 'donor' not found .*: {columns}"):
        soma_io.read_soma(experiment, obs_columns=["sam", "donor"])
    with pytest.raises(DataError, match=r"var_filter 'biotype == 1' names a column .*var_id"):
        soma_io.read_soma(experiment, var_filter="biotype == 1")
    with pytest.raises(DataError, match=r"var_column 'symbol' not found .*feature_name"):
        soma_io.read_soma(experiment, var_column="symbol")
    with pytest.raises(DataError, match=r"2 selected feature\(s\) not in .*'nope1', 'nope2'"):
        soma_io.read_soma(experiment, features=["gene1", "nope1", "nope2"])
    with pytest.raises(DataError, match=r"selects no cell"):
        soma_io.read_soma(experiment, obs_filter="libsize < 0")
    with pytest.raises(InputError, match=r"chunk_cells must be a positive integer"):
        soma_io.read_soma(experiment, chunk_cells=0)
    with pytest.raises(DataError, match=r"always cells x features"):
        read_expression(experiment, orientation="features_x_cells")


def test_missing_tiledbsoma_names_the_extra(
    experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tiledbsoma", None)  # import tiledbsoma now fails
    with pytest.raises(InputError, match=r"needs tiledbsoma: pip install 'flashmm-dask\[soma\]'"):
        read_expression(experiment)


def test_is_soma_detects_experiments(experiment: str, tmp_path: Path) -> None:
    assert soma_io.is_soma(experiment) and soma_io.is_soma(Path(experiment))
    assert soma_io.is_soma("soma://s3://bucket/census") and soma_io.is_soma("tiledb://ns/x")
    assert soma_io.is_soma(f"file://{experiment}")
    renamed = tmp_path / "atlas_without_suffix"
    os.symlink(experiment, renamed)
    assert soma_io.is_soma(renamed)  # a TileDB group, whatever its name
    assert not soma_io.is_soma(tmp_path) and not soma_io.is_soma("s3://bucket/x.zarr")
    assert not soma_io.is_soma(np.zeros(3))


# -- runs from a config --------------------------------------------------------------


def config_for(path: str, output: Path, *extra: str) -> Any:
    return load_config(
        None,
        (
            f"data.path={path}",
            f"output.path={output}",
            "data.chunk_cells=500",
            f"model.fixed={FORMULA[0]}",
            f"model.random={FORMULA[1]}",
            "output.plots=false",
            "progress=false",
            *CONTRASTS,
            *extra,
        ),
    )


def test_run_inputs_read_only_the_formula_columns_and_pushed_down_features(
    atlas: ad.AnnData, experiment: str, tmp_path: Path, reads: Reads
) -> None:
    names = list(atlas.var_names[[3, 9]])
    cfg = config_for(experiment, tmp_path, f"data.obs_filter={CELLS}", f"data.features={names}")
    inputs = prepare_inputs(cfg, tmp_path)
    assert sorted(inputs.expr.obs.columns) == ["cls", "libsize", "sam", "trt"]
    assert sorted(reads.frames[0] or []) == ["cls", "libsize", "sam", "soma_joinid", "trt"]
    assert list(inputs.expr.features) == names and inputs.expr.n_cells == selected(atlas).sum()
    # cell totals need every feature: not pushed down
    scaled = prepare_inputs(
        config_for(experiment, tmp_path, "model.transform=log1p_scaled", f"data.features={names}"),
        tmp_path,
    )
    assert scaled.expr.n_features == atlas.n_vars
    with pytest.raises(InputError, match=r"data.var_filter with transform 'log1p_scaled'"):
        prepare_inputs(
            config_for(experiment, tmp_path, "model.transform=log1p_scaled", "data.var_filter=de"),
            tmp_path,
        )


def test_var_column_feature_selection_points_to_var_filter(experiment: str, tmp_path: Path) -> None:
    cfg = config_for(experiment, tmp_path, "data.features={var_column: de}")
    with pytest.raises(
        InputError, match=r'data.features \{var_column: de\}.*data.var_filter: "de == True"'
    ):
        prepare_inputs(cfg, tmp_path)


def test_soma_keys_are_refused_for_other_data(atlas: ad.AnnData, tmp_path: Path) -> None:
    store = fm.write_store(atlas, tmp_path / "atlas.zarr")
    cfg = config_for(str(store), tmp_path / "out", f"data.obs_filter={CELLS}")
    with pytest.raises(InputError, match=r"data.obs_filter apply to TileDB-SOMA experiments only"):
        prepare_inputs(cfg, tmp_path)
    base = config_for(str(store), tmp_path / "out")
    assert base.with_overrides([f"data.obs_filter={CELLS}"]).hash() != base.hash()
    assert base.with_overrides(["data.measurement=RNA"]).hash() != base.hash()
    from flashmm_dask.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.obs_filter.*data.path is null"):
        load_config(None, [f"data.obs_filter={CELLS}"])


def test_cli_run_on_a_soma_experiment_equals_the_zarr_run(
    atlas: ad.AnnData, experiment: str, tmp_path: Path
) -> None:
    subset = fm.write_store(atlas[selected(atlas)].copy(), tmp_path / "subset.zarr")
    common = [
        *[arg for item in CONTRASTS for arg in ("--set", item)],
        "--set",
        f"model.fixed={FORMULA[0]}",
        "--set",
        f"model.random={FORMULA[1]}",
        "--set",
        "data.chunk_cells=500",
        "--set",
        "output.plots=false",
        "--set",
        "fit.block_size=16",
        "--quiet",
        "--workers",
        "1",
    ]
    yaml = tmp_path / "soma.yaml"
    yaml.write_text(f'data:\n  path: {experiment}\n  layer: raw\n  obs_filter: "{CELLS}"\n')
    res = subprocess.run(
        [CLI, "run", str(yaml), "--output", str(tmp_path / "soma-out"), *common],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    zarr_yaml = tmp_path / "zarr.yaml"
    zarr_yaml.write_text(f"data:\n  path: {subset}\n  layer: raw\n")
    res = subprocess.run(
        [CLI, "run", str(zarr_yaml), "--output", str(tmp_path / "zarr-out"), *common],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    with (
        open_results(tmp_path / "soma-out" / "results.zarr") as a,
        open_results(tmp_path / "zarr-out" / "results.zarr") as b,
    ):
        assert_stores_equal(a, b)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"data:\n  path: {experiment}\n  measurement: ATAC\n"
        f"model:\n  fixed: '{FORMULA[0]}'\n  random: '{FORMULA[1]}'\n"
    )
    res = subprocess.run(
        [CLI, "run", str(bad), "--output", str(tmp_path / "bad-out"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "measurement 'ATAC' not found" in lines[0], res.stderr
    assert "available: RNA" in lines[0]


def test_flashmm_takes_a_filtered_soma_expression(
    atlas: ad.AnnData, experiment: str, tmp_path: Path
) -> None:
    expr = soma_io.read_soma(experiment, layer="raw", obs_filter=CELLS)
    fit = fm.flashmm(expr, *FORMULA, is_counts=True, output_ss=True)
    store = fm.write_store(atlas[selected(atlas)].copy(), tmp_path / "subset.zarr")
    want = fm.flashmm(str(store), *FORMULA, is_counts=True, layer="raw", output_ss=True)
    for key in ("coef", "se", "theta", "p"):
        np.testing.assert_allclose(getattr(fit, key), getattr(want, key), rtol=1e-12, err_msg=key)
    with pytest.raises(DataError, match=r"already an Expression; drop layer, orientation"):
        read_expression(expr, layer="raw", orientation="cells_x_features")


def test_bench_soma_runs_and_both_sources_agree(
    tiledbsoma: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    for name in ("bench_soma", "bench_reduce", "_common"):
        sys.modules.pop(name, None)
    import bench_soma

    args = ["--cells", "3000", "--genes", "30", "--chunk-cells", "700", "--repeat", "1"]
    results = bench_soma.main([*args, "--workers", "1", "--store-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("ratio soma/zarr") == 1
    assert out.count("statistics differ by 0.0e+00") == 1
    by_label = {(label, r["chunk"]): r for label, r in results}
    zarr, filtered = by_label[("zarr", 700)], by_label[("soma-filtered", 700)]
    assert zarr["cells"] == 3000 and 0 < filtered["cells"] < 3000
    assert_stats_identical(by_label[("soma", 700)]["stats"], zarr["stats"])
