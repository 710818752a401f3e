"""Numerically awkward features inside a pipeline run: the run finishes, every awkward
feature is flagged in the results store (``status``, and converged = false), and the
summary line counts them.

The data are built here so that what each feature is, is known: ordinary features, all
zero, constant, an exact combination of the covariates, copies of an ordinary feature
scaled by 1e8 and 1e-8, a nearly constant one; then runs with max_iter = 1 (most features
not converged) and with a nearly singular ZZ (two random components that almost coincide).
A scaled copy may only be reported ok if its results are those of the original, scaled
(coef by s, theta by s^2, t and p unchanged).
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from pipeline_helpers import local_client

import flashmm_dask as fm
from flashmm_dask.io.results import STATUS, open_results
from flashmm_dask.io.results_finalize import converged_counts
from flashmm_dask.run.config import load_config
from flashmm_dask.run.pipeline import run

pytestmark = pytest.mark.distributed

N_CELLS, N_SAMPLES = 2000, 6
FIXED, RANDOM = "~ 1 + cls + x", "~ 0 + sam"
ORDINARY = [f"ordinary{k}" for k in range(6)]
KINDS = {
    **{name: "ok" for name in ORDINARY},
    "zero1": "all_zero",
    "zero2": "all_zero",
    "constant": "constant",
    "covariate": "constant",  # 1 + 2 x: explained exactly by the fixed effects
    "huge": "scaled",
    "tiny": "scaled",
    "nearly_constant": "not constant",
}
SCALE = {"huge": 1e8, "tiny": 1e-8}


def _data(rng: np.random.Generator) -> tuple[np.ndarray, pd.DataFrame]:
    sam = rng.integers(0, N_SAMPLES, N_CELLS)
    sam2 = sam.copy()
    moved = rng.choice(N_CELLS, 3, replace=False)  # the second grouping is the first, but 3
    sam2[moved] = (sam2[moved] + 1) % N_SAMPLES
    obs = pd.DataFrame(
        {
            "sam": pd.Categorical([f"s{k}" for k in sam]),
            "sam2": pd.Categorical([f"s{k}" for k in sam2]),
            "cls": pd.Categorical([f"c{k}" for k in rng.integers(0, 3, N_CELLS)]),
            "x": rng.normal(size=N_CELLS),
        },
        index=[f"cell{i}" for i in range(N_CELLS)],
    )
    X = np.column_stack(
        [np.ones(N_CELLS), obs["cls"] == "c1", obs["cls"] == "c2", obs["x"]]
    ).astype(float)
    columns = {}
    for name in ORDINARY:
        beta = rng.normal(size=4)
        b = rng.normal(scale=0.7, size=N_SAMPLES)
        columns[name] = X @ beta + b[sam] + rng.normal(size=N_CELLS)
    columns["zero1"] = np.zeros(N_CELLS)
    columns["zero2"] = np.zeros(N_CELLS)
    columns["constant"] = np.full(N_CELLS, 5.0)
    columns["covariate"] = 1 + 2 * obs["x"].to_numpy()
    columns["huge"] = columns[ORDINARY[0]] * SCALE["huge"]
    columns["tiny"] = columns[ORDINARY[0]] * SCALE["tiny"]
    columns["nearly_constant"] = 5 + 0.1 * rng.normal(size=N_CELLS)
    assert list(columns) == list(KINDS)
    return np.column_stack(list(columns.values())), obs


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    values, obs = _data(np.random.default_rng(2024))
    path = tmp_path_factory.mktemp("data") / "awkward.zarr"
    adata = ad.AnnData(X=values, obs=obs, var=pd.DataFrame(index=list(KINDS)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_zarr(path)
    return path


@pytest.fixture(scope="module")
def client():
    with local_client(threads_per_worker=2, processes=False) as c:
        yield c


def _run(store, output, client, *extra):
    cfg = load_config(
        None,
        [
            f"data.path={store}",
            f"output.path={output}",
            f"model.fixed={FIXED}",
            f"model.random={RANDOM}",
            "model.transform=none",
            "contrasts={c1_vs_c2: clsc1 - clsc2}",
            "fit.block_size=4",
            "output.plots=false",
            "output.tables=[csv]",
            "progress=false",
            *extra,
        ],
    )
    summary = run(cfg, client=client)
    ds = open_results(str(summary.store)).load()
    return summary, ds


def _status(ds) -> dict[str, str]:
    return dict(zip(ds["feature"].values, (STATUS[k] for k in ds["status"].values), strict=True))


def _check_counts(summary, ds) -> None:
    """The summary line, the store and the table agree on how many of each."""
    codes = ds["status"].values
    assert codes.min() >= 0, "a feature was not written"
    counts = {name: int((codes == k).sum()) for k, name in enumerate(STATUS)}
    assert summary.status_counts == counts
    assert sum(counts.values()) == ds.sizes["feature"]
    line = summary.line()
    for label, name in [
        ("ok", "ok"),
        ("not converged", "not_converged"),
        ("all-zero", "all_zero"),
        ("constant", "constant"),
        ("with non-finite results", "non_finite"),
    ]:
        assert f"{counts[name]} {label}" in line, line
    assert ds.attrs["status_counts"] == counts
    # converged: ok, boundary, negative_variance; not fitted: all_zero (and filtered)
    converged = sum(counts[s] for s in ("ok", "boundary", "negative_variance"))
    numbers = (converged, len(codes) - converged - counts["all_zero"], counts["all_zero"])
    assert (summary.n_converged, summary.n_not_converged, summary.n_zero) == numbers
    assert tuple(ds.attrs[f"n_{k}"] for k in ("converged", "not_converged", "zero")) == numbers
    # a stratified run's counts, from its status counts: the same numbers
    assert tuple(converged_counts(counts).values()) == numbers
    # converged exactly for ok features and those with a variance at (boundary) or below
    # (negative_variance) zero, which are otherwise ok; they are whole
    ok = np.isin(codes, [STATUS.index(s) for s in ("ok", "boundary", "negative_variance")])
    np.testing.assert_array_equal(ds["converged"].values, ok)
    for name in ("coef", "se", "p", "theta", "logLik", "contrast_p"):
        values = ds[name].values.reshape(ds.sizes["feature"], -1)
        assert np.isfinite(values[ok]).all(), name
    table = pd.read_csv(summary.output / "results.csv")
    per_feature = table.groupby("feature", sort=False)["status"].agg(set)
    assert {f: s.pop() for f, s in per_feature.items()} == _status(ds)


@pytest.fixture(scope="module")
def plain(store, client, tmp_path_factory):
    """The run with the default settings."""
    return _run(store, tmp_path_factory.mktemp("plain"), client)


def test_awkward_features_are_flagged(plain):
    summary, ds = plain
    _check_counts(summary, ds)
    status = _status(ds)
    assert ds["status"].attrs["flag_meanings"].split() == list(STATUS)
    for feature, kind in KINDS.items():
        if kind in ("ok", "all_zero", "constant"):
            assert status[feature] == kind, feature
    assert status["nearly_constant"] != "constant"
    zero = [f for f, kind in KINDS.items() if kind == "all_zero"]
    assert np.isnan(ds["coef"].sel(feature=zero).values).all()
    assert np.isnan(ds["niter"].sel(feature=zero).values).all()
    assert summary.status_counts["all_zero"] == 2 and summary.status_counts["constant"] == 2
    # explained exactly by the fixed effects: no test (a rounding error's residual
    # variance gave p = 0, a BH discovery, with the run's defaults)
    constant = [f for f, kind in KINDS.items() if kind == "constant"]
    assert np.isfinite(ds["coef"].sel(feature="covariate").values).all()
    for name in ("se", "t", "p", "padj", "contrast_p", "contrast_padj", "cov"):
        assert np.isnan(ds[name].sel(feature=constant).values).all(), name


def test_new_contrasts_on_a_run_with_constant_features(plain):
    """flashmm-dask test refits a Satterthwaite run from its statistics: the constant
    features (no se, no test) do not make it refuse them as another run's."""
    from flashmm_dask.run.retest import retest

    summary, ds = plain
    assert ds.attrs["config"]["model"]["df"] == "satterthwaite"
    table = retest(str(summary.store), {"c": "clsc1 - clsc2"}).set_index("feature")
    np.testing.assert_allclose(
        table.loc[list(ds["feature"].values), "p"], ds["contrast_p"].values[:, 0], rtol=1e-9
    )
    assert table.loc["constant", "status"] == "constant" and np.isnan(table.loc["constant", "p"])


@pytest.mark.parametrize("feature", ["huge", "tiny"])
def test_a_scaled_feature_is_either_right_or_flagged(plain, feature):
    _, ds = plain
    status = _status(ds)[feature]
    assert status in ("ok", "not_converged"), status
    if status == "not_converged":
        assert not ds["converged"].sel(feature=feature).item()
        return
    s, original = SCALE[feature], ds.sel(feature=ORDINARY[0])
    scaled = ds.sel(feature=feature)
    np.testing.assert_allclose(scaled["coef"], s * original["coef"], rtol=1e-6)
    np.testing.assert_allclose(scaled["theta"], s**2 * original["theta"], rtol=1e-5)
    np.testing.assert_allclose(scaled["p"], original["p"], rtol=1e-5)
    np.testing.assert_allclose(scaled["contrast_p"], original["contrast_p"], rtol=1e-5)


def test_many_features_not_converged(store, client, tmp_path):
    summary, ds = _run(store, tmp_path / "out", client, "model.max_iter=1")
    _check_counts(summary, ds)
    assert ds.attrs["complete"] is True
    status = _status(ds)
    not_converged = [f for f in ORDINARY if status[f] == "not_converged"]
    assert len(not_converged) >= 4, status
    # one iteration of Fisher scoring, then one step of the safeguarded search that
    # nonnegative=True (the run default) gives features scoring left unconverged
    assert (ds["niter"].sel(feature=ORDINARY).values == 2).all()
    assert f"{summary.status_counts['not_converged']} not converged" in summary.line()
    assert summary.n_not_converged >= len(not_converged)


def test_nearly_singular_ZZ(store, client, tmp_path):
    """Two random components that differ in 3 of 2000 cells: ZZ is (numerically)
    singular; the run still finishes and flags what it could not fit."""
    summary, ds = _run(store, tmp_path / "out", client, "model.random=[~ 0 + sam, ~ 0 + sam2]")
    assert ds.attrs["complete"] is True
    assert ds.sizes["component"] == 3
    _check_counts(summary, ds)
    status = _status(ds)
    assert status["zero1"] == "all_zero" and status["constant"] == "constant"


@pytest.mark.parametrize(
    "options", [{}, {"df": "satterthwaite", "nonnegative": True}], ids=["R", "run-defaults"]
)
def test_a_feature_explained_exactly_has_no_test_in_process(options):
    """lmmfit, whatever its settings: a feature that the fixed effects explain exactly has
    status constant, its coefficients, and no test (se, t, p NaN; its contrasts too), so
    BH does not count it; top_table shows the fit's own status."""
    rng = np.random.default_rng(1)
    n, n_sam = 400, 8
    sam = np.sort(rng.integers(0, n_sam, n))
    trt = (sam >= n_sam // 2).astype(float)
    X = np.c_[np.ones(n), rng.normal(size=n), trt]
    Z = (sam[:, None] == np.arange(n_sam)[None]).astype(float)
    Y = np.vstack([1 + rng.normal(0, 1, n_sam)[sam] + rng.normal(size=n), 2 + trt])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few donors' df, an undefined Satterthwaite df
        fit = fm.lmmfit(Y, X, Z, **options)
        tests = fm.lmmtest(fit, contrast={"d": "X3 - X2"})
        top = fm.top_table(fit, "X3").set_index("feature")
    assert list(fit.status_names()) == ["ok", "constant"]
    np.testing.assert_allclose(fit.coef[:, 1], [2, 0, 1], atol=1e-8)
    for values in (fit.se, fit.t, fit.p):
        assert np.isnan(values[:, 1]).all() and np.isfinite(values[:, 0]).all()
    assert np.isnan(tests.loc["F2"].filter(like="p").to_numpy(dtype=float)).all()
    assert list(top.loc[list(fit.features), "status"]) == ["ok", "constant"]
    assert np.isnan(top.loc["F2", "padj"]) and top.loc["F1", "padj"] == top.loc["F1", "p"]
