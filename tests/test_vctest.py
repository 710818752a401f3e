"""Variance-component tests (z and likelihood ratio) and the LRT of nested fixed effects.

Reference: lme4's anova of nested fits in tests/reference/lmertest/ (see its README), and
the R FLASHMM 1.3.0 cases in tests/reference/ for the z-test's theta and se_theta.
"""

import numpy as np
import pytest
import scipy.stats
from lmertest_cases import CASES, arr, interior, load, ref, stats
from reference_cases import as_array, load_case, summary_args
from statsmodels.stats.multitest import multipletests

from flashmm_dask import InputError, SummaryStats, lmm, lmm_stats
from flashmm_dask.model.lrt import lrt_fixed, vctest
from flashmm_dask.numerics.loglik import boundary_chi2_pvalue, ols_loglik

LRT_RTOL = 1e-5


@pytest.mark.parametrize("name", CASES)
def test_component_lrt_matches_lme4_anova(name):
    st = stats(name)
    r = ref(name, "REML")
    fit = lmm_stats(st, output_ss=True)
    res = vctest(fit)
    assert res["converged"].all()
    for k, comp in enumerate(st.components):
        lr = r["lrt"][k]
        ok = interior(name, "REML") & ~np.array(lr.get("singular_reduced", [False] * st.m))
        assert ok.sum() >= 5
        np.testing.assert_allclose(res[f"{comp}_lrt"][ok], arr(lr["chisq"])[ok], rtol=LRT_RTOL)
        # boundary: half of lme4's plain chi2_1 p-value
        np.testing.assert_allclose(
            res[f"{comp}_lrt_p"][ok], 0.5 * arr(lr["p_chisq"])[ok], rtol=10 * LRT_RTOL
        )
        # the reduced fits differ from lme4's REML logLik by the same constant as the full
        shift = fit.logLik[ok] - arr(r["logLik"])[ok]
        np.testing.assert_allclose(
            res[f"{comp}_logLik_reduced"][ok] - arr(lr["logLik_reduced"])[ok], shift, rtol=1e-7
        )
    # that constant is log|X'X| / 2 (R FLASHMM's REML logLik vs lme4's)
    np.testing.assert_allclose(shift, np.linalg.slogdet(st.XX)[1] / 2, rtol=1e-7)


def test_k1_lrt_matches_lmertest_ranova():
    r = ref("k1", "REML")["lrt"][0]
    res = vctest(stats("k1"))
    np.testing.assert_allclose(res["sam_lrt"], arr(r["ranova_chisq"]), rtol=LRT_RTOL)


@pytest.mark.parametrize("name", CASES)
def test_fixed_lrt_matches_lme4_anova_of_ml_fits(name):
    st = stats(name)
    r = ref(name, "ML")["lrt_fixed"]
    ok = interior(name, "ML") & ~np.array(r["singular_reduced"])
    drop = ["cls1:trtB", "cls2:trtB"]
    res = lrt_fixed(st, drop=drop)
    assert (res["df"] == 2).all() and (arr(r["df"]) == 2).all()
    np.testing.assert_allclose(res["chisq"][ok], arr(r["chisq"])[ok], rtol=LRT_RTOL)
    np.testing.assert_allclose(res["p"][ok], arr(r["p"])[ok], rtol=10 * LRT_RTOL)
    # ML logLik is lme4's exactly (no constant)
    full = lmm_stats(st, method="ML")
    np.testing.assert_allclose(full.logLik[ok], arr(ref(name, "ML")["logLik"])[ok], rtol=1e-9)
    np.testing.assert_allclose(res["logLik_reduced"][ok], arr(r["logLik_reduced"])[ok], rtol=1e-9)
    # the same test from two ML fits
    keep = [j for j, c in enumerate(st.covariates) if c not in drop]
    fewer = SummaryStats(
        XX=st.XX[np.ix_(keep, keep)],
        XY=st.XY[keep],
        ZX=st.ZX[:, keep],
        ZY=st.ZY,
        ZZ=st.ZZ,
        Ynorm=st.Ynorm,
        n=st.n,
        d=st.d,
        covariates=[st.covariates[j] for j in keep],
        random=st.random,
        components=st.components,
        features=st.features,
    )
    pair = lrt_fixed(full, lmm_stats(fewer, method="ML"))
    np.testing.assert_allclose(pair["chisq"].to_numpy(), res["chisq"].to_numpy(), rtol=1e-12)


def test_z_test_uses_r_flashmm_theta_and_se():
    """z = theta / se_theta with R FLASHMM's own estimates (simu_reml_k2: components
    sam and sam:time, some estimated below zero)."""
    case = load_case("simu_reml_k2")
    fit = lmm(**summary_args(case), method="REML")
    res = vctest(fit, lrt=False, p_adjust=None)
    theta, se = as_array(case["fit"]["theta"]), as_array(case["fit"]["se_theta"])
    conv = fit.converged
    for k in range(2):
        c = fit.components[k]
        z = theta[k] / se[k]
        np.testing.assert_allclose(res[f"{c}_z"][conv], z[conv], rtol=1e-6)
        np.testing.assert_allclose(
            res[f"{c}_z_p"][conv], scipy.stats.norm.sf(z[conv]), rtol=1e-5, atol=1e-12
        )
    assert list(res.columns) == ["logLik", "converged"] + [
        f"{c}_{k}" for c in fit.components[:2] for k in ("theta", "se", "z", "z_p")
    ]


def test_negative_component_gets_statistic_zero_and_p_one():
    # no subject effect in the data: about half the estimates fall below zero
    rng = np.random.default_rng(7)
    n, S, m = 400, 8, 40
    sam = rng.integers(0, S, n)
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    Z = np.eye(S)[sam]
    Y = rng.normal(size=(m, n))
    fit = lmm(
        X.T @ X, X.T @ Y.T, Z.T @ X, Z.T @ Y.T, Z.T @ Z, (Y**2).sum(1), n, [S], output_ss=True
    )
    res = vctest(fit)
    neg = fit.theta[0] < 0
    assert 5 <= neg.sum() <= m - 5
    assert (res["var1_lrt"][neg] == 0).all() and (res["var1_lrt_p"][neg] == 1).all()
    # the unconstrained likelihood still rises above the reduced one there
    assert (res["logLik"][neg] > res["var1_logLik_reduced"][neg]).all()
    pos = ~neg
    assert (res["var1_lrt"][pos] > 0).all() and (res["var1_lrt_p"][pos] <= 0.5).all()


def test_vctest_of_stats_equals_vctest_of_fit():
    st = stats("k2")
    a = vctest(st)
    b = vctest(lmm_stats(st, output_ss=True))
    np.testing.assert_allclose(a.to_numpy(dtype=float), b.to_numpy(dtype=float), rtol=1e-12)
    one = vctest(st, components="time")
    np.testing.assert_allclose(one["time_lrt"], a["time_lrt"], rtol=1e-12)
    assert not any(c.startswith("sam_") for c in one.columns)


def test_ols_loglik_equals_dense_least_squares():
    """q = 0: -(n - r)(1 + log(2 pi s0)) / 2 with s0 = RSS / (n - r), RSS from a dense
    least-squares fit of the cells."""
    st = stats("k1")
    X, Y = arr(load("k1")["cells"]["X"]), arr(load("k1")["cells"]["Y"])
    for method, r in (("REML", st.p), ("ML", 0)):
        ll = ols_loglik(st.XX, st.XY.T, st.Ynorm, st.n, method)
        for j in range(3):
            resid = Y[j] - X @ np.linalg.lstsq(X, Y[j], rcond=None)[0]
            s0 = resid @ resid / (st.n - r)
            np.testing.assert_allclose(
                ll[j], -(st.n - r) * (1 + np.log(2 * np.pi * s0)) / 2, rtol=1e-12
            )


def test_boundary_mixture_pvalue():
    stat = np.array([0.0, 2.705543454095404, np.nan, 10.0])
    p = boundary_chi2_pvalue(stat)
    assert p[0] == 1.0 and np.isnan(p[2])
    np.testing.assert_allclose(p[[1, 3]], 0.5 * scipy.stats.chi2.sf(stat[[1, 3]], 1))
    np.testing.assert_allclose(p[1], 0.05, rtol=1e-12)  # the 0.10 chi2_1 quantile


@pytest.mark.parametrize("method,sm", [("BH", "fdr_bh"), ("BY", "fdr_by")])
def test_adjusted_pvalues_are_nan_safe(method, sm):
    st = stats("k1")
    # one feature all zero: NaN throughout, not counted as a test
    Ynorm = st.Ynorm.copy()
    Ynorm[1] = 0.0
    XY, ZY = st.XY.copy(), st.ZY.copy()
    XY[:, 1] = 0.0
    ZY[:, 1] = 0.0
    zeroed = SummaryStats(
        **{
            **{k: getattr(st, k) for k in ("XX", "ZX", "ZZ", "n", "d", "covariates")},
            **{k: getattr(st, k) for k in ("random", "components", "features")},
        },
        XY=XY,
        ZY=ZY,
        Ynorm=Ynorm,
    )
    with pytest.warns(Warning, match="all zero"):
        fit = lmm_stats(zeroed, output_ss=True)
    res = vctest(fit, p_adjust=method)
    fx = lrt_fixed(fit, drop=["cls1:trtB", "cls2:trtB"], p_adjust=method)
    for p, padj in (
        (res["sam_lrt_p"], res["sam_lrt_padj"]),
        (res["sam_z_p"], res["sam_z_padj"]),
        (fx["p"], fx["padj"]),
    ):
        p, padj = p.to_numpy(), padj.to_numpy()
        assert np.isnan(p[1]) and np.isnan(padj[1])
        keep = ~np.isnan(p)
        np.testing.assert_allclose(padj[keep], multipletests(p[keep], method=sm)[1], rtol=1e-12)


def test_errors_name_the_problem():
    st = stats("k1")
    fit = lmm_stats(st)
    with pytest.raises(InputError, match="output_ss=True"):
        vctest(fit)
    assert "sam_z" in vctest(fit, lrt=False).columns
    with pytest.raises(InputError, match="unknown random components"):
        vctest(st, components="donor")
    with pytest.raises(InputError, match="ML fits"):
        lrt_fixed(fit, fit)
    with pytest.raises(InputError, match="unknown covariates"):
        lrt_fixed(st, drop=["trtB"])
    with pytest.raises(InputError, match="either reduced"):
        lrt_fixed(st)
    with pytest.raises(InputError, match="compares ML fits"):
        lrt_fixed(st, drop="x", method="REML")
    ml = lmm_stats(st, method="ML")
    with pytest.raises(InputError, match="proper subset"):
        lrt_fixed(ml, ml)
    with pytest.raises(InputError, match="unknown p_adjust"):
        vctest(st, p_adjust="bonferroni")
