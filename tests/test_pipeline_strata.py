"""Runs with model.by, data.cells and model.min_cells: one results group per stratum equal
to a run on its cells selected by hand, tables with a stratum column, contrasts where
their coefficients exist, per-stratum resume, fit --stats and test on the output."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from pipeline_helpers import assert_stores_equal, local_client
from test_strata import atlas

from flashmm_dask import StoreError, load_stats, select_obs, write_store
from flashmm_dask.io.results import blocks_done, open_results
from flashmm_dask.io.resultsets import TABLE_VARIABLES, loaded, result_sets
from flashmm_dask.io.strata_results import load_strata, open_strata
from flashmm_dask.run.config import load_config
from flashmm_dask.run.pipeline import RESULTS, run

pytestmark = pytest.mark.distributed

CLI = os.path.join(os.path.dirname(sys.executable), "flashmm-dask")
FIXED = "~ log(libsize) + trt + grp"
CONTRASTS = {"trt": "trtB", "z_vs_y": "grpz - grpy"}


def settings(data, output, *extra):
    return (
        f"data.path={data}",
        f"model.fixed={FIXED}",
        "model.random=~ 0 + sam",
        "contrasts={" + ", ".join(f"{k}: '{v}'" for k, v in CONTRASTS.items()) + "}",
        "model.min_cells=400",
        "fit.block_size=7",
        "output.plots=false",
        "progress=false",
        f"output.path={output}",
        *extra,
    )


@pytest.fixture(scope="module")
def one_worker():
    with local_client() as client:
        yield client


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    adata = atlas(n_cells=2500, n_genes=25, seed=5)
    rng = np.random.default_rng(1)
    grp = rng.choice(["x", "y", "z"], adata.n_obs).astype(object)
    third = (adata.obs["cls"] == "3").to_numpy()
    grp[third] = np.where(rng.random(third.sum()) < 0.5, "x", "y")  # no 'z' in type 3
    adata.obs["grp"] = pd.Categorical(grp)
    folder = tmp_path_factory.mktemp("strata-data")
    return adata, write_store(adata, folder / "atlas.zarr", chunk_cells=600)


@pytest.fixture(scope="module")
def stratified(store, one_worker, tmp_path_factory):
    _, path = store
    out = tmp_path_factory.mktemp("stratified")
    cfg = load_config(None, settings(path, out, "model.by=cls", "data.cells=n_genes >= 6"))
    return cfg, run(cfg, client=one_worker)


def test_strata_groups_and_tables(stratified):
    _, summary = stratified
    root = zarr.open_group(str(summary.store), mode="r")
    strata = root.attrs["strata"]
    assert strata["by"] == "cls" and strata["levels"] == ["1", "2", "3"]
    assert strata["groups"] == {k: f"strata/{k}" for k in ("1", "2", "3")}
    assert "single level" in strata["skipped"]["4"]
    assert strata["missing_contrasts"] == {"3": ["z_vs_y"]}
    assert root.attrs["complete"] and summary.skipped.keys() == {"4"}
    datasets = open_strata(summary.store)
    assert list(datasets["3"]["contrast"].values) == ["trt"]
    assert list(datasets["1"]["contrast"].values) == ["trt", "z_vs_y"]
    stats = load_stats(summary.output / "stats.zarr")
    assert "samA1" not in stats["2"].random and "samA1" in stats["1"].random
    table = pd.read_csv(summary.output / "results.csv")
    assert table.columns[0] == "stratum" and list(table["stratum"].unique()) == [1, 2, 3]
    counts = table.groupby("stratum")["term"].nunique()
    assert counts[1] == 7 and counts[3] == 5  # 5 (4) coefficients + 2 (1) contrasts
    assert (table["status"] == "filtered").any()
    filtered = table[table["status"] == "filtered"]
    assert filtered["coef"].isna().all()
    assert "3 strata of cls, 1 skipped (4)" in summary.line()
    assert sum(summary.status_counts.values()) == 3 * 25


@pytest.mark.parametrize("level", ["2", "3"])
def test_each_stratum_equals_a_run_on_its_cells(stratified, store, level, one_worker, tmp_path):
    _, summary = stratified
    adata, _ = store
    mask = ((adata.obs["cls"] == level) & (adata.obs["n_genes"] >= 6)).to_numpy()
    sub = adata[mask].copy()
    sub.obs = select_obs(adata.obs, mask)
    path = write_store(sub, tmp_path / "sub.zarr", chunk_cells=300)
    contrasts = "{trt: trtB}" if level == "3" else None
    extra = [f"contrasts={contrasts}"] if contrasts else []
    hand = run(load_config(None, settings(path, tmp_path / "out", *extra)), client=one_worker)
    ds = open_results(str(summary.store / "strata" / level))
    ref = open_results(str(hand.store))
    assert_stores_equal(ds, ref, rtol=1e-9)
    np.testing.assert_array_equal(ds["status"].values, ref["status"].values)
    assert ds.attrs["stratum"] == level and ds.attrs["n_cells"] == mask.sum()


def test_strata_read_for_the_tables_equal_xarrays_reading(stratified, tmp_path):
    """load_strata (zarr directly, strata in threads) gives the Datasets that xarray's
    open and load give: values, dimensions, coordinates and attributes."""
    _, summary = stratified
    fast = load_strata(summary.store)
    slow = loaded(result_sets(str(summary.store)))
    assert [level for level, _ in fast] == [level for level, _ in slow] == ["1", "2", "3"]
    for (level, a), (_, b) in zip(fast, slow, strict=True):
        xr.testing.assert_identical(a, b)
        stored = open_results(str(summary.store / "strata" / level)).data_vars
        assert set(a.data_vars) == TABLE_VARIABLES & set(stored) and "cov" not in a
    copy = tmp_path / "copy.zarr"
    shutil.copytree(summary.store, copy)
    zarr.open_group(str(copy / "strata" / "2"), mode="r+").attrs["complete"] = False
    with pytest.raises(StoreError, match=r"stratum 2 .* incomplete"):
        load_strata(copy)


def test_resume_fits_only_the_missing_blocks_of_a_stratum(stratified, one_worker):
    cfg, summary = stratified
    before = {k: v.load() for k, v in open_strata(summary.store).items()}
    group = zarr.open_group(str(summary.store / "strata" / "2"), mode="r+")
    done = group["block_done"][...]
    done[1] = False
    group["block_done"][...] = done
    group.attrs["complete"] = False
    zarr.open_group(str(summary.store), mode="r+").attrs["complete"] = False
    again = run(cfg, client=one_worker)
    assert len(again.blocks_fitted) == 1
    assert blocks_done(str(summary.store / "strata" / "2")).all()
    after = open_strata(summary.store)
    for level in before:
        assert_stores_equal(after[level], before[level], rtol=0)


def cli(*args):
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=600)


def test_fit_from_saved_strata_and_test_new_contrasts(stratified, tmp_path):
    cfg, summary = stratified
    stats = load_stats(summary.output / "stats.zarr")
    assert list(stats) == ["1", "2", "3"] and stats["1"].nnz is not None
    args = []
    for item in settings(cfg.data.path, tmp_path / "fit", "model.by=cls"):
        args += ["--set", item]
    res = cli(
        "fit",
        "--quiet",
        "--workers",
        "1",
        *args,
        "--stats",
        str(summary.output / "stats.zarr"),
        "configs/demo.yaml",
    )
    assert res.returncode == 0, res.stderr
    refit = open_strata(tmp_path / "fit" / RESULTS)
    for level, ds in open_strata(summary.store).items():
        assert_stores_equal(refit[level], ds, rtol=0)
    res = cli(
        "test",
        str(summary.store),
        "-c",
        "new=trtB",
        "-c",
        "zz=grpz",
        "--out",
        str(tmp_path / "c.csv"),
    )
    assert res.returncode == 0, res.stderr
    table = pd.read_csv(tmp_path / "c.csv")
    assert table.columns[0] == "stratum"
    assert set(table[table.term == "new"]["stratum"]) == {1, 2, 3}
    assert set(table[table.term == "zz"]["stratum"]) == {1, 2}
    ds = open_strata(summary.store)["2"]
    np.testing.assert_allclose(
        table[(table.term == "new") & (table.stratum == 2)]["coef"],
        ds["coef"].sel(covariate="trtB").values,
        rtol=1e-12,
    )


def test_report_plots_each_stratum(stratified, tmp_path):
    _, summary = stratified
    res = cli("report", str(summary.store), "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    for level, terms in (("1", ("trt", "z_vs_y")), ("3", ("trt",))):
        index = pd.read_csv(tmp_path / "strata" / level / "plots" / "index.tsv", sep="\t")
        assert set(index["term"]) == set(terms)
        assert (tmp_path / "strata" / level / "plots" / "convergence.png").stat().st_size > 5000
    res = cli("test", str(summary.store), "-c", "x=nothing")
    assert res.returncode == 2 and "no stratum" in res.stderr
