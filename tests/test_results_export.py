"""Results where users look: LmmFit.to_dataframe, to_anndata / write_results, top tables,
the store's strata, the report and the labelled volcano plot.

The fits are real ``lmm`` fits of the R reference case simu_reml_k1 (40 features, 7
coefficients); the stores are written by the results-store writers (create_results,
write_block, finalize_results), a stratified one with a group per stratum under
``strata/<level>`` as a ``by:`` run lays it out. Every exported value is compared with the
fit it came from, and adjusted p-values with statsmodels' Benjamini-Hochberg.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import zarr
from matplotlib.text import Annotation, Text
from reference_cases import load_case, summary_args
from statsmodels.stats.multitest import multipletests

import flashmm_dask as fm
from flashmm_dask.design.contrasts import contrast_matrix
from flashmm_dask.errors import InputError, StoreError, ZeroFeatureWarning
from flashmm_dask.io.results import (
    ResultsLayout,
    create_results,
    finalize_results,
    fit_arrays,
    open_results,
    results_table,
    write_block,
)
from flashmm_dask.io.resultsets import fit_dataset, result_sets
from flashmm_dask.io.strata_results import iter_strata, strata_groups
from flashmm_dask.model.lmmtest import lmmtest
from flashmm_dask.report.plots import volcano_figure
from flashmm_dask.report.summary import REPORT, report_outputs, top_genes_text

CONTRASTS = {"second-first": "cls2:trtB - cls1:trtB", "first": "cls1:trtB"}
STATS = ("coef", "se", "t", "df", "p", "padj")


def bh(p):
    """statsmodels' BH over the non-NaN entries."""
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    out[ok] = multipletests(p[ok], method="fdr_bh")[1]
    return out


@pytest.fixture(scope="module")
def fit():
    return fm.lmm(**summary_args(load_case("simu_reml_k1")))


@pytest.fixture(scope="module")
def fit_ml():
    return fm.lmm(**summary_args(load_case("simu_reml_k1")), method="ML")


@pytest.fixture(scope="module")
def holed():
    """simu_reml_k1 with features 3 and 7 all zero (not fitted: NaN)."""
    args = summary_args(load_case("simu_reml_k1"))
    for name in ("XY", "ZY"):
        args[name].iloc[:, [3, 7]] = 0.0
    args["Ynorm"].iloc[[3, 7]] = 0.0
    with pytest.warns(ZeroFeatureWarning):
        return fm.lmm(**args)


def write_store(path, fit, contrasts=CONTRASTS, by=None):
    """A finished results store of ``fit`` and its contrasts, in blocks of 16 features."""
    L = contrast_matrix(contrasts, fit.covariates)
    names = list(L.columns)
    tests = lmmtest(fit, contrast=L)
    arrays = fit_arrays(fit)
    Lm = L.to_numpy()
    arrays.update(
        contrast_coef=tests[[f"{c}_coef" for c in names]].to_numpy(),
        contrast_t=tests[[f"{c}_t" for c in names]].to_numpy(),
        contrast_p=tests[[f"{c}_p" for c in names]].to_numpy(),
        contrast_se=np.sqrt(np.einsum("pc,mpk,kc->mc", Lm, fit.cov, Lm)),
        contrast_df=np.full((len(fit.features), len(names)), float(fit.df)),
    )
    layout = ResultsLayout(fit.features, fit.covariates, fit.components, tuple(names), 16)
    config = {
        "data": {"path": "atlas.h5ad", "layer": "counts"},
        "model": {"fixed": "~ 0 + log(libsize) + cls + cls:trt", "transform": "log2p1", "by": by},
        "contrasts": dict(contrasts),
        "test": {"alternative": "two.sided", "p_adjust": "BH"},
    }
    base = {
        "method": fit.method,
        "fixed": config["model"]["fixed"],
        "random": ["~ 0 + sam"],
        "n_cells": int(fit.n),
        "config": config,
    }
    create_results(str(path), layout, base)
    for b in range(layout.n_blocks):
        rows = layout.block_slice(b)
        write_block(str(path), b, {k: v[rows] for k, v in arrays.items()})
    finalize_results(str(path))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory, fit):
    return write_store(tmp_path_factory.mktemp("plain") / "results.zarr", fit)


@pytest.fixture(scope="module")
def stratified(tmp_path_factory, fit, fit_ml):
    """A store with strata A (the REML fit) and B/1 (the ML fit), as a by: run lays it out."""
    root = tmp_path_factory.mktemp("strata") / "results.zarr"
    group = zarr.open_group(str(root), mode="w", zarr_format=3)
    group.attrs.update(
        {"by": "cls", "strata": [{"level": "A", "path": "strata/A"}, "B1"]},
    )
    write_store(root / "strata" / "A", fit, by="cls")
    write_store(root / "strata" / "B1", fit_ml, contrasts={"first": "cls1:trtB"}, by="cls")
    return root


# -- to_dataframe ------------------------------------------------------------------------


def test_to_dataframe_has_term_and_padj_per_term(holed):
    frame = holed.to_dataframe()
    assert list(frame.columns) == ["feature", "term", "coef", "se", "t", "df", "p", "padj"]
    for j, term in enumerate(holed.covariates):
        rows = frame[frame.term == term]
        assert list(rows.feature) == list(holed.features)
        np.testing.assert_array_equal(rows["p"], holed.p[j])
        np.testing.assert_array_equal(rows["padj"], fm.p_adjust(holed.p[j]))
        np.testing.assert_allclose(rows["padj"], bh(holed.p[j]), rtol=1e-12)
    assert frame.loc[frame.feature == holed.features[3], "padj"].isna().all()


# -- AnnData -----------------------------------------------------------------------------


def make_adata(names):
    return ad.AnnData(
        np.zeros((4, len(names)), dtype=np.float32), var=pd.DataFrame(index=list(names))
    )


def test_to_anndata_round_trip(fit, tmp_path):
    # the AnnData has the features in another order and two more that were not fitted
    names = [*reversed(fit.features), "extra1", "extra2"]
    adata = make_adata(names)
    params = {"fixed": "~ 0 + log(libsize) + cls + cls:trt", "transform": "log2p1"}
    fit.to_anndata(adata, contrasts=CONTRASTS, params=params)
    keys = [f"flashmm_{s}" for s in STATS]
    assert sorted(adata.varm) == sorted(keys)
    terms = [*fit.covariates, *CONTRASTS]
    tests = lmmtest(fit, contrast=CONTRASTS)
    rows = [names.index(f) for f in fit.features]
    for key in keys:
        frame = adata.varm[key]
        assert isinstance(frame, pd.DataFrame)
        assert list(frame.columns) == terms
        assert frame.index.equals(adata.var_names)
        assert frame.loc[["extra1", "extra2"]].isna().all().all()
    for j, term in enumerate(fit.covariates):
        for stat in ("coef", "se", "t", "p"):
            got = adata.varm[f"flashmm_{stat}"][term].to_numpy()[rows]
            np.testing.assert_array_equal(got, getattr(fit, stat)[j], err_msg=f"{stat} {term}")
        got = adata.varm["flashmm_padj"][term].to_numpy()[rows]
        np.testing.assert_allclose(got, bh(fit.p[j]), rtol=1e-12)
        np.testing.assert_array_equal(adata.varm["flashmm_df"][term].to_numpy()[rows], fit.df)
    for name in CONTRASTS:
        for stat in ("coef", "t", "p"):
            got = adata.varm[f"flashmm_{stat}"][name].to_numpy()[rows]
            np.testing.assert_array_equal(got, tests[f"{name}_{stat}"].to_numpy())
        got = adata.varm["flashmm_se"][name].to_numpy()[rows]
        np.testing.assert_allclose(got, tests[f"{name}_coef"] / tests[f"{name}_t"], rtol=1e-10)
    info = adata.uns["flashmm"]
    assert info["method"] == "REML" and info["df"] == "residual"
    assert info["n_cells"] == fit.n and info["n_features"] == 40
    assert info["contrasts"] == CONTRASTS
    assert info["terms"] == terms and info["varm_keys"] == keys
    assert info["fixed"] == params["fixed"] and info["transform"] == "log2p1"
    assert "numpy" in info["versions"]

    # the AnnData writes and reads back as it is
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    for key in keys:
        pd.testing.assert_frame_equal(back.varm[key], adata.varm[key])
    assert back.uns["flashmm"]["contrasts"] == CONTRASTS
    assert list(back.uns["flashmm"]["terms"]) == terms


def test_to_anndata_mismatched_var_names(fit):
    adata = make_adata([f"ENSG{i:05d}" for i in range(40)])
    with pytest.raises(InputError, match=r"40 of the 40 features .* not in adata.var_names"):
        fit.to_anndata(adata)
    assert not adata.varm and "flashmm" not in adata.uns  # nothing half-written
    partial = make_adata(fit.features[:-2])
    with pytest.raises(InputError, match=r"2 of the 40 features .*'Gene39', 'Gene40'"):
        fit.to_anndata(partial)
    # names that repeat are matched only in the same order
    with pytest.warns(UserWarning, match="not unique"):
        repeated = make_adata([*fit.features[:39], fit.features[0]])
    with pytest.raises(InputError, match="var_names_make_unique"):
        fit.to_anndata(repeated)


def test_write_results_from_store_equals_from_fit(fit, store):
    from_store, from_fit = make_adata(fit.features), make_adata(fit.features)
    fm.write_results(from_store, str(store))
    fm.write_results(from_fit, fit, contrasts=CONTRASTS)
    for stat in STATS:
        pd.testing.assert_frame_equal(
            from_store.varm[f"flashmm_{stat}"], from_fit.varm[f"flashmm_{stat}"], rtol=1e-12
        )
    info = from_store.uns["flashmm"]
    assert info["fixed"] == "~ 0 + log(libsize) + cls + cls:trt"
    assert info["random"] == ["~ 0 + sam"] and info["transform"] == "log2p1"
    assert info["data"] == {"path": "atlas.h5ad", "layer": "counts"}


# -- strata ------------------------------------------------------------------------------


def test_strata_groups_forms():
    assert strata_groups({}) == []
    assert strata_groups({"strata": ["A", {"level": "B", "path": "x/B/"}]}) == [
        ("A", "strata/A"),
        ("B", "x/B"),
    ]
    assert strata_groups({"strata": {"A": "strata/A"}}) == [("A", "strata/A")]
    with pytest.raises(StoreError, match="corrupt"):
        strata_groups({"strata": [{"path": "strata/A"}]})


def test_iter_strata(store, stratified, fit, fit_ml):
    plain = list(iter_strata(store))
    assert [level for level, _ in plain] == [None]
    pairs = list(iter_strata(stratified))
    assert [level for level, _ in pairs] == ["A", "B1"]
    for (_, ds), expected in zip(pairs, (fit, fit_ml), strict=True):
        np.testing.assert_array_equal(ds["coef"].values, expected.coef.T)
    assert list(pairs[1][1]["contrast"].values) == ["first"]


def test_write_results_with_strata(stratified, fit, fit_ml):
    adata = make_adata(fit.features)
    fm.write_results(adata, str(stratified))
    for level, expected in (("A", fit), ("B1", fit_ml)):
        coef = adata.varm[f"flashmm_{level}_coef"]
        np.testing.assert_array_equal(coef[list(fit.covariates)].to_numpy(), expected.coef.T)
    assert list(adata.varm["flashmm_B1_p"].columns) == [*fit.covariates, "first"]
    info = adata.uns["flashmm"]
    assert list(info["strata"]) == ["A", "B1"]
    assert info["strata"]["B1"]["varm_prefix"] == "flashmm_B1"
    assert info["strata"]["A"]["n_cells"] == fit.n
    assert info["strata"]["B1"]["level"] == "B1"
    # a mapping level -> LmmFit (what flashmm(..., by=...) returns) writes the same
    mapped = make_adata(fit.features)
    fm.write_results(mapped, {"A": fit, "B1": fit_ml}, contrasts={"first": "cls1:trtB"})
    for key in ("flashmm_A_padj", "flashmm_B1_coef", "flashmm_B1_p"):
        pd.testing.assert_frame_equal(mapped.varm[key], adata.varm[key][mapped.varm[key].columns])


def test_contrasts_on_stratum_fits_apply_where_their_coefficients_exist(caplog):
    """As a run: a contrast is tested in every stratum that has its coefficients (cell
    type 1 lacks grp level c), the others are named in a warning; one that no stratum has
    is refused."""
    import logging

    adata = fm.simulate_rnaseq(6, 1500, n_samples=8, seed=1)
    rng = np.random.default_rng(0)
    grp = rng.choice(["a", "b", "c"], adata.n_obs)
    one = (adata.obs["cls"] == "1").to_numpy()
    grp[one] = rng.choice(["a", "b"], one.sum())
    adata.obs["grp"] = pd.Categorical(grp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fits = fm.flashmm(adata, "~ trt + grp", "~ 0 + sam", by="cls", is_counts=True)
    assert "grpc" not in fits["1"].covariates and "grpc" in fits["2"].covariates
    contrasts = {"c_vs_b": "grpc - grpb", "b": "grpb"}
    with caplog.at_level(logging.WARNING):
        fm.write_results(adata, fits, contrasts=contrasts)
    assert "stratum 1 lacks the coefficients of contrast 'c_vs_b'" in caplog.text
    assert "c_vs_b" not in adata.varm["flashmm_1_p"].columns
    assert {"c_vs_b", "b"} <= set(adata.varm["flashmm_2_p"].columns)
    expected = fm.lmmtest(fits["2"], contrast=contrasts)
    np.testing.assert_allclose(
        adata.varm["flashmm_2_p"]["c_vs_b"].to_numpy(), expected["c_vs_b_p"], rtol=1e-12
    )
    with pytest.raises(fm.ContrastError, match="grpd"):
        fm.write_results(adata, fits, contrasts={"d": "grpd"})


def test_write_results_of_levels_with_a_slash_write_to_zarr_and_h5ad(fit, fit_ml, tmp_path):
    """A level with '/' (a path separator in .h5ad and .zarr) is '_' in the varm keys and
    in uns, whose entry keeps the level; two levels that would share a key are refused."""
    adata = make_adata(fit.features)
    fm.write_results(adata, {"B/plasma": fit, "T": fit_ml})
    info = adata.uns["flashmm"]["strata"]
    assert list(info) == ["B_plasma", "T"] and info["B_plasma"]["level"] == "B/plasma"
    assert info["B_plasma"]["varm_prefix"] == "flashmm_B_plasma"
    assert "flashmm_B_plasma_coef" in adata.varm
    with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
        with pytest.warns(UserWarning, match="Consolidated metadata"):  # zarr's, on v3
            adata.write_zarr(tmp_path / "a.zarr")
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    assert back.uns["flashmm"]["strata"]["B_plasma"]["level"] == "B/plasma"
    with pytest.raises(InputError, match=r"'B/plasma' and 'B_plasma' both have the key"):
        fm.write_results(make_adata(fit.features), {"B/plasma": fit, "B_plasma": fit_ml})


# -- top tables --------------------------------------------------------------------------


def assert_sorted_rows_of(top, table, term):
    rows = table[table.term == term]
    assert len(top) == len(rows)
    p = top["p"].to_numpy()
    finite = p[~np.isnan(p)]
    assert np.all(np.diff(finite) >= 0)
    assert np.isnan(p[finite.size :]).all()  # NaN last
    expected = rows.set_index("feature").loc[top["feature"]]
    for col in ("coef", "se", "t", "df", "p", "padj", "status"):
        np.testing.assert_array_equal(top[col].to_numpy(), expected[col].to_numpy(), err_msg=col)


def test_top_table_is_the_sorted_results_rows(store, fit):
    table = results_table(open_results(str(store)))
    for term in ("first", "second-first", "cls2:trtB", "log(libsize)"):
        top = fm.top_table(str(store), term)
        assert list(top.columns) == ["feature", "coef", "se", "t", "df", "p", "padj", "status"]
        assert_sorted_rows_of(top, table, term)
    head = fm.top_table(fit, "cls2:trtB", n=5)
    pd.testing.assert_frame_equal(head, fm.top_table(str(store), "cls2:trtB").head(5))
    with pytest.raises(InputError, match=r"unknown term 'nope'.*coefficients: log"):
        fm.top_table(fit, "nope")


def test_top_table_nan_features_last(holed, tmp_path):
    path = write_store(tmp_path / "holed.zarr", holed)
    table = results_table(open_results(str(path)))
    top = fm.top_table(str(path), "first")
    assert_sorted_rows_of(top, table, "first")
    assert set(top["feature"].tail(2)) == {holed.features[3], holed.features[7]}
    assert list(top["status"].tail(2)) == ["all_zero", "all_zero"]


def test_top_table_with_strata(stratified, fit_ml):
    both = fm.top_table(str(stratified), "cls1:trtB", n=3)
    assert list(both.columns)[:2] == ["stratum", "feature"]
    assert list(both["stratum"]) == ["A"] * 3 + ["B1"] * 3
    only_b = fm.top_table(str(stratified), "cls1:trtB", n=3, stratum="B1")
    pd.testing.assert_frame_equal(
        both[both.stratum == "B1"].drop(columns="stratum").reset_index(drop=True), only_b
    )
    pd.testing.assert_frame_equal(only_b, fm.top_table(fit_ml, "cls1:trtB", n=3))
    # a contrast that only stratum A has
    assert set(fm.top_table(str(stratified), "second-first")["stratum"]) == {"A"}
    with pytest.raises(InputError, match="unknown stratum 'C'; the strata are A, B1"):
        fm.top_table(str(stratified), "first", stratum="C")


# -- report ------------------------------------------------------------------------------


def test_report_of_a_stratified_store(stratified, tmp_path):
    files = report_outputs(str(stratified), tmp_path)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in files)
    assert names == [REPORT, "top/A/first.csv", "top/A/second-first.csv", "top/B1/first.csv"]
    top = pd.read_csv(tmp_path / "top" / "B1" / "first.csv", float_precision="round_trip")
    expected = fm.top_table(str(stratified), "first", stratum="B1")
    assert list(top["feature"]) == list(expected["feature"])
    np.testing.assert_array_equal(top["p"], expected["p"])
    text = (tmp_path / REPORT).read_text()
    assert "| status | A | B1 |" in text and "| ok | 40 | 40 |" in text
    assert "### first in stratum B1" in text and "### second-first in stratum A" in text
    best = expected["feature"].iloc[0]
    assert f"| `{best}` |" in text
    assert "log2p1 (effects in log2(1 + x))" in text and "`atlas.h5ad`" in text
    assert "| strata | by `cls`: 2 levels, A (3000 cells), B1 (3000 cells) |" in text
    assert "| cells | 6000 in 2 strata |" in text
    assert "| second-first | `cls2:trtB - cls1:trtB` | B1 |" in text
    log = top_genes_text(result_sets(str(stratified)), n=4)
    assert "top 4 of first in stratum B1" in log and best in log


def test_report_of_a_stratified_store_links_its_plots(stratified, tmp_path):
    """Each stratum's plots (``strata/<group>/plots/``, where a run writes them) are
    linked from report.md, and every link leads to a file."""
    import re

    from flashmm_dask.report.plots import strata_report

    plots = strata_report(str(stratified), tmp_path)
    report_outputs(str(stratified), tmp_path)
    text = (tmp_path / REPORT).read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert all((tmp_path / link).exists() for link in links), links
    linked = {tmp_path / link for link in links}
    pngs = {p for p in plots if p.suffix == ".png"}
    assert pngs and pngs <= linked, sorted(map(str, pngs - linked))
    assert "- [convergence in stratum B1](strata/" in text


# -- the volcano plot --------------------------------------------------------------------


def test_volcano_labels_the_top_genes_apart(fit):
    ds = fit_dataset(fit, CONTRASTS, attrs={"transform": "log2p1"})
    fig = volcano_figure(ds, "cls1", labels=6)  # many significant features close together
    ax = fig.axes[0]
    labels = [t for t in ax.texts if isinstance(t, Annotation)]
    assert 3 <= len(labels) <= 6
    top = fm.top_table(fit, "cls1")
    significant = top[top.padj < 0.05]["feature"].tolist()
    assert len(significant) > 6
    assert [t.get_text() for t in labels] == [
        f for f in significant if f in {t.get_text() for t in labels}
    ]
    assert set(t.get_text() for t in labels) <= set(significant[:6])
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(t, renderer) for t in labels]
    frame = ax.get_window_extent(renderer)
    for i, box in enumerate(boxes):
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 <= frame.y1
        assert not any(box.overlaps(other) for other in boxes[:i])
    assert ax.get_xlabel() == "coefficient: effect on log2(1 + x)"
    contrast = volcano_figure(ds, "first").axes[0]
    assert contrast.get_xlabel() == "contrast estimate: log2(1 + x) difference"
    plain = fit_dataset(fit, CONTRASTS, attrs={"config": {"model": {"transform": "none"}}})
    assert volcano_figure(plain, "first", labels=0).axes[0].get_xlabel() == (
        "contrast estimate: difference in the data's units"
    )
    assert not volcano_figure(plain, "first", labels=0).axes[0].texts


def test_fit_dataset_matches_the_store(fit, store):
    ds, stored = fit_dataset(fit, CONTRASTS), open_results(str(store))
    for name in ("coef", "se", "t", "p", "df", "padj", "contrast_coef", "contrast_p"):
        np.testing.assert_allclose(ds[name].values, stored[name].values, rtol=1e-12)
    np.testing.assert_allclose(ds["contrast_se"].values, stored["contrast_se"].values, rtol=1e-12)
    np.testing.assert_array_equal(ds["status"].values, stored["status"].values)


# -- a run of the command line -----------------------------------------------------------


@pytest.mark.distributed
def test_cli_run_writes_the_report_and_logs_the_top_genes(tmp_path):
    import os
    import subprocess
    import sys

    from pipeline_helpers import SMALL

    out = tmp_path / "run"
    args = ["run", "configs/demo.yaml", "--output", str(out), "--workers", "1"]
    for item in (*SMALL, "output.plots=true"):
        args += ["--set", item]
    res = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "flashmm-dask"), *args],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    store = out / "results.zarr"
    ds = open_results(str(store))
    table = pd.read_csv(out / "results.csv", float_precision="round_trip")
    report = (out / REPORT).read_text()
    codes = ds["status"].values
    assert f"| ok | {int((codes == 0).sum())} |" in report
    assert f"| not_converged | {int((codes == 1).sum())} |" in report
    assert f"| cells | {ds.attrs['n_cells']} |" in report and "| features | 30 |" in report
    assert "contrast estimate" not in report  # the report names the effect's unit instead
    assert "log2p1 (effects in log2(1 + x))" in report
    assert report.count("top genes by p") == 0 and res.stderr.count("top genes by p") == 1
    for name in ("trt_in_cls1", "trt_cls2_vs_cls1"):
        top = pd.read_csv(out / "top" / f"{name}.csv", float_precision="round_trip")
        assert_sorted_rows_of(top, table, name)
        best = top["feature"].head(3).tolist()
        assert all(f"| `{f}` |" in report for f in best)
        assert f"### {name}" in report and f"(top/{name}.csv)" in report
        assert f"![volcano plot of {name}](plots/volcano_{name}.png)" in report
        assert (out / "plots" / f"volcano_{name}.png").exists()
        # the log holds the same top genes, once
        logged = res.stderr.split(f"top 10 of {name}:")[1].splitlines()[2:5]
        assert [line.split()[0] for line in logged] == best
    # flashmm-dask report writes the report again
    (out / REPORT).unlink()
    again = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "flashmm-dask"), "report", str(store)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr
    assert "| ok |" in (out / REPORT).read_text()
