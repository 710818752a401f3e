"""lmm and lmmtest against R FLASHMM 1.3.0 on every reference case (tests/reference/README.md).

Tolerances are those of the reference README: converged features relative 1e-6 (coef to
1e-6 of max(|coef|, se), t to 1e-6 of max(|t|, 1)), niter equal; non-converged features
flagged.
"""

import numpy as np
import pandas as pd
import pytest
from reference_cases import CASES, SIMU_CASES, as_array, load_case, summary_args

from flashmm_dask import lmm, lmmtest

RTOL = 1e-6


def fit_case(name, **kw):
    case = load_case(name)
    fit = lmm(
        **summary_args(case),
        method=case["fit"]["method"],
        output_cov=True,
        output_fim=True,
        output_re=True,
        **kw,
    )
    return case, fit


def assert_rel(actual, expected, what, rtol=RTOL):
    actual, expected = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.array_equal(np.isnan(actual), np.isnan(expected)), f"{what}: NaN pattern differs"
    actual, expected = np.nan_to_num(actual), np.nan_to_num(expected)
    zero = expected == 0
    # exact zeros in R (e.g. cov of two disjoint indicator covariates) must be zero to
    # rounding on the scale of the whole array
    scale = np.max(np.abs(expected))
    assert np.all(np.abs(actual[zero]) <= 1e-12 * scale), f"{what}: non-zero where R has 0"
    err = np.abs(actual[~zero] - expected[~zero]) / np.abs(expected[~zero])
    assert np.all(err <= rtol), f"{what}: max relative error {err.max():.3g}"


@pytest.fixture(params=CASES)
def case_fit(request):
    return fit_case(request.param)


def test_converged_flags(case_fit):
    case, fit = case_fit
    r_conv = np.max(np.abs(as_array(case["fit"]["dlogL"])), axis=0) <= case["fit"]["epsilon"]
    np.testing.assert_array_equal(fit.converged, r_conv)
    if case["name"] == "simu_reml_k2":
        assert (~fit.converged).sum() == 2


def test_niter_equal(case_fit):
    case, fit = case_fit
    np.testing.assert_array_equal(fit.niter, as_array(case["fit"]["niter"]))


def test_names_and_df(case_fit):
    case, fit = case_fit
    s = case["summary"]
    assert fit.df == case["fit"]["df"]
    assert fit.method == case["fit"]["method"]
    assert fit.covariates == tuple(s["covariates"])
    assert fit.features == tuple(s["features"])
    assert fit.random == tuple(s["random"])
    assert fit.components[-1] == "residual"
    assert len(fit.components) == len(np.atleast_1d(s["d"])) + 1


def test_per_feature_outputs(case_fit):
    case, fit = case_fit
    r = case["fit"]
    ok = fit.converged
    assert ok.sum() >= len(ok) - 2
    assert_rel(fit.se[:, ok], as_array(r["se"])[:, ok], "se")
    assert_rel(fit.theta[:, ok], as_array(r["theta"])[:, ok], "theta")
    assert_rel(fit.se_theta[:, ok], as_array(r["se_theta"])[:, ok], "se_theta")
    assert_rel(fit.logLik[ok], as_array(r["logLik"])[ok], "logLik")
    assert_rel(fit.p[:, ok], as_array(r["p"])[:, ok], "p")
    assert_rel(fit.RE[:, ok], as_array(r["RE"])[:, ok], "RE")
    coef, se = as_array(r["coef"])[:, ok], as_array(r["se"])[:, ok]
    assert np.all(np.abs(fit.coef[:, ok] - coef) <= RTOL * np.maximum(np.abs(coef), se))
    t = as_array(r["t"])[:, ok]
    assert np.all(np.abs(fit.t[:, ok] - t) <= RTOL * np.maximum(np.abs(t), 1.0))
    # dlogL is ~0 at convergence: judge it on the scale of epsilon
    assert np.all(np.abs(fit.dlogL[:, ok] - as_array(r["dlogL"])[:, ok]) <= r["epsilon"])


def test_matrix_outputs(case_fit):
    case, fit = case_fit
    r = case["fit"]
    ok = fit.converged
    assert_rel(fit.cov[ok], as_array(r["cov"])[ok], "cov")
    assert_rel(fit.FIM_beta[ok], as_array(r["FIM_beta"])[ok], "FIM_beta")
    assert_rel(fit.FIM_theta[ok], as_array(r["FIM_theta"])[ok], "FIM_theta")


def test_nonconverged_like_r(case_fit):
    case, fit = case_fit
    bad = ~fit.converged
    r = case["fit"]
    np.testing.assert_array_equal(fit.niter[bad], as_array(r["niter"])[bad])
    for name in ("coef", "se", "theta"):
        ours, theirs = getattr(fit, name)[:, bad], as_array(r[name])[:, bad]
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))


@pytest.mark.parametrize("name", ["doc_example_reml", "doc_example_ml"])
def test_lmmtest_doc_example(name):
    case, fit = fit_case(name)
    spec = case["lmmtest"]["contrast"]
    L = pd.DataFrame({spec["name"]: spec["weights"]}, index=list(fit.covariates))
    expected = as_array(case["lmmtest"]["result"])
    for contrast in (L, {spec["name"]: "trtB - trtA"}):
        res = lmmtest(fit, contrast=contrast)
        assert list(res.columns) == [f"{spec['name']}_{k}" for k in ("coef", "t", "p")]
        assert_rel(res.to_numpy(), expected, f"lmmtest {name}")


@pytest.mark.parametrize("name", SIMU_CASES)
@pytest.mark.parametrize("alternative", ["two.sided", "less", "greater"])
def test_lmmtest_alternatives(name, alternative):
    case, fit = fit_case(name)
    c = case["contrasts"]
    L = pd.DataFrame(as_array(c["matrix"]), index=list(fit.covariates), columns=c["names"])
    res = lmmtest(fit, contrast=L, alternative=alternative)
    expected = as_array(c[alternative.replace(".", "_")])
    ok = fit.converged
    k = len(c["names"])
    coef_se = np.abs(res.iloc[:, :k].to_numpy() / res.iloc[:, k : 2 * k].to_numpy())
    err_coef = np.abs(res.iloc[:, :k].to_numpy() - expected[:, :k])
    assert np.all(err_coef[ok] <= RTOL * np.maximum(np.abs(expected[ok, :k]), coef_se[ok]))
    t, et = res.iloc[:, k : 2 * k].to_numpy(), expected[:, k : 2 * k]
    assert np.all(np.abs(t - et)[ok] <= RTOL * np.maximum(np.abs(et[ok]), 1.0))
    assert_rel(res.iloc[:, 2 * k :].to_numpy()[ok], expected[ok, 2 * k :], "p")
    assert list(res.index) == list(fit.features)
