"""Plots of a results Dataset built from real fits of the R reference cases.

The counts that the plots show (significant features per term, convergence classes) are
checked against independent computations: statsmodels' Benjamini-Hochberg adjustment,
and the convergence rule max |dlogL| <= epsilon applied to the fitted dlogL. The files
are read back as images.
"""

import re
import time

import matplotlib.image
import matplotlib.text
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from reference_cases import load_case, summary_args
from statsmodels.stats.multitest import multipletests

from flashmm_dask import InputError, ZeroFeatureWarning, contrast_matrix, lmm, lmmtest
from flashmm_dask.numerics.inference import p_adjust
from flashmm_dask.report.plots import (
    NO_FEATURES,
    convergence_figure,
    make_report,
    pvalue_figure,
    volcano_figure,
)
from flashmm_dask.report.values import (
    convergence_counts,
    file_stems,
    resolve_terms,
    significant_counts,
)

CONTRASTS = {"second-first": "cls2:trtB - cls1:trtB", "first": "cls1:trtB"}
SAFE = re.compile(r"^[A-Za-z0-9._-]+$")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def results_dataset(fit, contrasts=None) -> xr.Dataset:
    """A Dataset in the results store layout: to_xarray + padj + contrast_* variables."""
    ds = fit.to_xarray()
    ds["padj"] = (("feature", "covariate"), p_adjust(ds["p"].to_numpy(), axis=0))
    if contrasts:
        L = contrast_matrix(contrasts, fit.covariates)
        names = list(L.columns)
        res = lmmtest(fit, contrast=L)

        def cols(suffix):
            return res[[f"{n}_{suffix}" for n in names]].to_numpy()

        coef, t, p = cols("coef"), cols("t"), cols("p")
        fc = ("feature", "contrast")
        ds = ds.assign_coords(contrast=names).assign(
            contrast_coef=(fc, coef),
            contrast_se=(fc, coef / t),
            contrast_t=(fc, t),
            contrast_p=(fc, p),
            contrast_df=(fc, np.full_like(p, fit.df)),
            contrast_padj=(fc, p_adjust(p, axis=0)),
        )
    return ds


@pytest.fixture(scope="module")
def ds():
    case = load_case("simu_reml_k1")
    fit = lmm(**summary_args(case), method=case["fit"]["method"])
    return results_dataset(fit, CONTRASTS)


@pytest.fixture(scope="module")
def rough():
    """simu_reml_k2 (2 features do not converge in 50 iterations) with one all-zero feature."""
    case = load_case("simu_reml_k2")
    args = summary_args(case, labelled=False)
    zero = 3
    for name in ("XY", "ZY"):
        args[name][:, zero] = 0.0
    args["Ynorm"][zero] = 0.0
    with pytest.warns(ZeroFeatureWarning):
        fit = lmm(**args, method=case["fit"]["method"])
    return results_dataset(fit), args


def bh_count(p, alpha):
    """Significant features by statsmodels' BH over the non-NaN p-values."""
    p = np.asarray(p, dtype=float)
    p = p[~np.isnan(p)]
    if p.size == 0:
        return 0
    return int(multipletests(p, alpha=alpha, method="fdr_bh")[0].sum())


def texts(fig):
    return [t.get_text() for t in fig.findobj(matplotlib.text.Text)]


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert len(data) > 5_000, f"{path.name} is only {len(data)} bytes"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4), img.shape
    assert img.shape[0] >= 300 and img.shape[1] >= 400, img.shape
    assert img[..., :3].var() > 0, f"{path.name} is blank"


def test_report_default_terms_are_the_contrasts(ds, tmp_path):
    files = make_report(ds, tmp_path)
    plots = tmp_path / "plots"
    expected = [
        "volcano_second-first.png",
        "pvalues_second-first.png",
        "volcano_first.png",
        "pvalues_first.png",
        "convergence.png",
        "index.tsv",
    ]
    assert files == [plots / name for name in expected]
    assert sorted(p.name for p in plots.iterdir()) == sorted(expected)
    for path in files[:-1]:
        assert_png(path)


def test_default_terms_without_contrasts_are_the_coefficients(ds, tmp_path):
    plain = ds.drop_dims("contrast")
    assert "contrast_p" not in plain
    files = make_report(plain, tmp_path)
    stems = [p.name.removeprefix("volcano_").removesuffix(".png") for p in files[:-2:2]]
    assert [p.name for p in files[1:-2:2]] == [f"pvalues_{s}.png" for s in stems]
    assert len(stems) == ds.sizes["covariate"] == 7
    assert all(SAFE.match(s) for s in stems)
    assert len({s.lower() for s in stems}) == len(stems)
    assert stems[0] == "log_libsize_" and "cls2_trtB" in stems
    for path in files[:-1]:
        assert path.exists()
    index = pd.read_csv(files[-1], sep="\t")
    assert index["term"].tolist() == list(ds["covariate"].values)
    assert index["stem"].tolist() == stems


def test_file_stems_are_safe_and_unique():
    names = [
        "log(libsize)",
        "cls2:trtB - cls1:trtB",
        "cls2:trtB + cls1:trtB",
        "a b",
        "a_b",
        "a:b",
        "A_B",
        "a_b_2",
        "..",
        "",
        "x" * 300,
        "x" * 299 + "y",
    ]
    stems = file_stems(names)
    assert list(stems) == names
    assert stems["log(libsize)"] == "log_libsize_"
    assert stems["cls2:trtB - cls1:trtB"] == "cls2_trtB_-_cls1_trtB"
    values = list(stems.values())
    assert all(SAFE.match(s) and not s.startswith(".") for s in values)
    assert all(len(s) <= 90 for s in values)
    assert len({s.lower() for s in values}) == len(values), values


def test_terms_select(ds, tmp_path):
    files = make_report(ds, tmp_path, terms=["log(libsize)", "second-first"])
    assert [p.name for p in files] == [
        "volcano_log_libsize_.png",
        "pvalues_log_libsize_.png",
        "volcano_second-first.png",
        "pvalues_second-first.png",
        "convergence.png",
        "index.tsv",
    ]
    one = make_report(ds, tmp_path / "one", terms="cls3:trtB")
    assert [p.name for p in one] == [
        "volcano_cls3_trtB.png",
        "pvalues_cls3_trtB.png",
        "convergence.png",
        "index.tsv",
    ]
    kinds = {t.name: t.kind for t in resolve_terms(ds, ["first", "cls1:trtB"])}
    assert kinds == {"first": "contrast", "cls1:trtB": "covariate"}
    assert volcano_figure(ds, "first").axes[0].get_xlabel() == "contrast estimate"
    assert volcano_figure(ds, "cls1:trtB").axes[0].get_xlabel() == "coefficient"
    with pytest.raises(InputError, match=r"'trtC'.*second-first.*log\(libsize\)"):
        make_report(ds, tmp_path, terms=["first", "trtC"])


@pytest.mark.parametrize("alpha", [0.05, 1e-6])
def test_significant_counts_match_independent_bh(ds, alpha):
    counts = significant_counts(ds, list(ds["covariate"].values) + list(CONTRASTS), alpha)
    expected = {c: bh_count(ds["p"].sel(covariate=c), alpha) for c in ds["covariate"].values}
    expected |= {c: bh_count(ds["contrast_p"].sel(contrast=c), alpha) for c in CONTRASTS}
    assert counts == expected
    assert len(set(counts.values())) > 2  # the cases differ: the check can tell them apart
    for term in ("second-first", "cls2:trtB", "log(libsize)"):
        fig = volcano_figure(ds, term, alpha=alpha)
        ax = fig.axes[0]
        assert f"\n{expected[term]} of 40 features with padj < {alpha:g}" in ax.get_title()
        (highlighted,) = [ln for ln in ax.lines if ln.get_label() == f"padj < {alpha:g}"]
        assert len(highlighted.get_xdata()) == expected[term]
        points = sum(len(ln.get_xdata()) for ln in ax.lines if ln.get_linestyle() == "None")
        assert points == 40


def test_index_lists_counts(ds, tmp_path):
    files = make_report(ds, tmp_path, alpha=0.01)
    index = pd.read_csv(files[-1], sep="\t")
    assert index["term"].tolist() == list(CONTRASTS)
    assert index["kind"].tolist() == ["contrast", "contrast"]
    assert index["n_tested"].tolist() == [40, 40]
    assert index["n_significant"].tolist() == [
        bh_count(ds["contrast_p"].sel(contrast=c), 0.01) for c in CONTRASTS
    ]


def test_nan_features_are_dropped(ds):
    p = ds["p"].to_numpy().copy()
    p[:5, 1] = np.nan
    holed = ds.assign(p=(("feature", "covariate"), p)).drop_vars("padj")
    values = significant_counts(holed, "cls1")
    assert values == {"cls1": bh_count(p[:, 1], 0.05)}
    ax = volcano_figure(holed, "cls1").axes[0]
    assert " of 35 features" in ax.get_title()
    assert sum(len(ln.get_xdata()) for ln in ax.lines if ln.get_linestyle() == "None") == 35
    qq = pvalue_figure(holed, "cls1").axes[1]
    assert max(len(ln.get_xdata()) for ln in qq.lines) == 35


def test_padj_missing_is_computed_by_bh(ds):
    bare = ds.drop_vars(["padj", "contrast_padj"])
    counts = significant_counts(bare, ["cls2:trtB", "second-first"], alpha=0.05)
    assert counts == significant_counts(ds, ["cls2:trtB", "second-first"], alpha=0.05)
    assert counts["cls2:trtB"] == bh_count(ds["p"].sel(covariate="cls2:trtB"), 0.05)


def test_convergence_counts_and_figure(rough, tmp_path):
    ds, args = rough
    fitted = args["Ynorm"] > 0
    dlogL = ds["dlogL"].to_numpy()
    conv = fitted & (np.max(np.abs(dlogL), axis=1) <= ds.attrs["epsilon"])
    expected = {
        "converged": int(conv.sum()),
        "not converged": int((fitted & ~conv).sum()),
        "not fitted": int((~fitted).sum()),
    }
    assert expected["not converged"] == 2 and expected["not fitted"] == 1
    assert convergence_counts(ds) == expected

    fig = convergence_figure(ds)
    iter_ax, count_ax, theta_ax = fig.axes[:3]
    assert [b.get_height() for b in count_ax.patches] == list(expected.values())
    stacked = sum(b.get_height() for b in iter_ax.patches)
    assert stacked == expected["converged"] + expected["not converged"]
    assert theta_ax.get_xscale() == "symlog"
    labels = [t.get_text() for t in theta_ax.get_legend().get_texts()]
    assert labels == [f"{c} ({int(fitted.sum())})" for c in ds["component"].values[:-1]]

    files = make_report(ds, tmp_path)
    assert files[-2].name == "convergence.png"
    for path in files[:-1]:
        assert_png(path)


def test_zero_features(ds, tmp_path):
    empty = ds.isel(feature=slice(0, 0))
    files = make_report(empty, tmp_path)
    assert len(files) == 6
    for path in files[:-1]:
        assert_png(path)
    assert convergence_counts(empty) == {"converged": 0, "not converged": 0, "not fitted": 0}
    assert significant_counts(empty) == {"second-first": 0, "first": 0}
    assert NO_FEATURES in texts(volcano_figure(empty, "first"))
    assert texts(pvalue_figure(empty, "first")).count(NO_FEATURES) == 2
    assert texts(convergence_figure(empty)).count(NO_FEATURES) == 2


def test_all_nan_p(rough, tmp_path):
    ds, _ = rough
    nan = ds.assign(
        p=xr.full_like(ds["p"], np.nan),
        padj=xr.full_like(ds["padj"], np.nan),
        niter=xr.full_like(ds["niter"], np.nan),
    )
    files = make_report(nan, tmp_path, terms=list(ds["covariate"].values[:2]))
    for path in files[:-1]:
        assert_png(path)
    assert NO_FEATURES in texts(volcano_figure(nan, "x1"))
    assert "0 of 0 features" in volcano_figure(nan, "x1").axes[0].get_title()
    assert texts(pvalue_figure(nan, "x2")).count(NO_FEATURES) == 2
    assert convergence_counts(nan)["not fitted"] == ds.sizes["feature"]


def test_large_m_is_vectorised(tmp_path):
    """1e5 features in seconds: a per-feature Python loop or vector drawing would not be."""
    m = 100_000
    rng = np.random.default_rng(7)
    p = rng.uniform(size=(m, 1))
    p[:2000, 0] = rng.uniform(0, 1e-6, size=2000)
    p[5] = 0.0  # underflow
    coef = rng.normal(size=(m, 1))
    coef[10:20] = p[10:20] = np.nan  # unfitted features
    fc = ("feature", "covariate")
    big = xr.Dataset(
        {
            "coef": (fc, coef),
            "p": (fc, p),
            "padj": (fc, p_adjust(p, axis=0)),
            "niter": ("feature", rng.integers(3, 12, size=m).astype(float)),
            "converged": ("feature", rng.uniform(size=m) > 0.01),
            "theta": (("feature", "component"), rng.normal(0.05, 0.1, size=(m, 2))),
        },
        coords={
            "feature": np.arange(m).astype(str),
            "covariate": ["trtB"],
            "component": ["sam", "residual"],
        },
    )
    start = time.perf_counter()
    files = make_report(big, tmp_path)
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"make_report took {elapsed:.1f} s for {m} features"
    index = pd.read_csv(files[-1], sep="\t")
    assert index["n_tested"].tolist() == [m - 10]
    assert index["n_significant"].tolist() == [bh_count(p, 0.05)]
    for path in files[:-1]:
        assert_png(path)
        # rasterised points keep the files small
        assert path.stat().st_size < 400_000, f"{path.name}: {path.stat().st_size} bytes"


def test_bad_input(ds, tmp_path):
    with pytest.raises(InputError, match="alpha"):
        make_report(ds, tmp_path, alpha=0)
    with pytest.raises(InputError, match=r"xarray\.Dataset"):
        make_report({"p": np.zeros(3)}, tmp_path)
    with pytest.raises(InputError, match=r"no niter, converged"):
        make_report(ds.drop_vars(["niter", "converged"]), tmp_path)
    assert not (tmp_path / "plots").exists()


def test_lazy_dataset(ds, tmp_path):
    """A Dataset opened from a store is dask-backed and chunked along feature."""
    lazy = ds.chunk({"feature": 7})
    assert lazy["p"].chunks is not None
    counts = significant_counts(lazy, ["cls2:trtB", "second-first"])
    assert counts == significant_counts(ds, ["cls2:trtB", "second-first"])
    assert convergence_counts(lazy) == {"converged": 40, "not converged": 0, "not fitted": 0}
    files = make_report(lazy, tmp_path, terms=["second-first"])
    assert_png(files[0])
