"""Satterthwaite degrees of freedom: against lmerTest, and against a dense computation.

Reference: tests/reference/lmertest/ (lme4 1.1-31 + lmerTest 3.1-3; see its README).
The summary-statistic formulas are also checked against a dense n x n computation of the
REML/ML log-likelihood and of the coefficient covariance, differentiated numerically.
"""

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from lmertest_cases import CASES, arr, cell_arrays, interior, load, ref, stats
from statsmodels.stats.multitest import multipletests

from flashmm_dask import InputError, lmm, lmm_stats, lmmtest
from flashmm_dask.numerics.fisher import prepare
from flashmm_dask.numerics.satterthwaite import (
    cov_jacobian,
    observed_information,
    satterthwaite_df,
)
from flashmm_dask.run.worker import SharedModel, block_arrays

DF_RTOL = 1e-4  # lmerTest's numerical derivatives (numDeriv) limit the agreement
THETA_RTOL = 1e-5
METHOD_CASES = [(name, method) for name in CASES for method in ("REML", "ML")]


def p_tolerance(t, df):
    """|log p - log p_R| allowed by DF_RTOL on df (and 1e-6 on t): the p-value's own
    sensitivity to df and t, from Student's t."""

    def logp(tt, dd):
        return np.log(2.0 * scipy.stats.t.sf(np.abs(tt), dd))

    h = 1e-6
    dlogdf = (logp(t, df * (1 + h)) - logp(t, df * (1 - h))) / (2 * h)
    dlogt = (logp(t * (1 + h), df) - logp(t * (1 - h), df)) / (2 * h)
    return DF_RTOL * np.abs(dlogdf) + 1e-6 * np.abs(dlogt) + 1e-8


@pytest.fixture(scope="module", params=METHOD_CASES, ids=[f"{a}-{b}" for a, b in METHOD_CASES])
def case_fit(request):
    name, method = request.param
    fit = lmm_stats(stats(name), method=method, df="satterthwaite", output_ss=True)
    return name, method, fit


def test_theta_matches_lme4_first(case_fit):
    name, method, fit = case_fit
    ok = interior(name, method)
    assert ok.sum() >= 5
    assert fit.converged.all()
    np.testing.assert_allclose(
        fit.theta[:, ok], arr(ref(name, method)["theta"])[:, ok], rtol=THETA_RTOL
    )


def test_coefficient_df_and_p_match_lmertest(case_fit):
    name, method, fit = case_fit
    r = ref(name, method)["coefficients"]
    ok = interior(name, method)
    assert fit.df.shape == fit.coef.shape
    np.testing.assert_allclose(fit.coef[:, ok], arr(r["estimate"])[:, ok], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fit.se[:, ok], arr(r["se"])[:, ok], rtol=1e-5)
    np.testing.assert_allclose(fit.df[:, ok], arr(r["df"])[:, ok], rtol=DF_RTOL)
    tol = p_tolerance(arr(r["t"])[:, ok], arr(r["df"])[:, ok])
    assert np.all(np.abs(np.log(fit.p[:, ok]) - np.log(arr(r["p"])[:, ok])) <= tol)
    # the df span subject-level (about #subjects - 2) to cell-level (about n - p) effects
    assert fit.df[:, ok].min() < 30 and fit.df[:, ok].max() > 900


def test_contrast_df_and_p_match_lmertest(case_fit):
    name, method, fit = case_fit
    case = load(name)
    L = pd.DataFrame(
        arr(case["contrast_matrix"]), index=fit.covariates, columns=case["contrast_names"]
    )
    r = ref(name, method)["contrasts"]
    ok = interior(name, method)
    res = lmmtest(fit, contrast=L)
    names = case["contrast_names"]
    assert list(res.columns) == [f"{c}_{k}" for k in ("coef", "t", "df", "p") for c in names]
    df = res[[f"{c}_df" for c in names]].to_numpy().T
    p = res[[f"{c}_p" for c in names]].to_numpy().T
    np.testing.assert_allclose(df[:, ok], arr(r["df"])[:, ok], rtol=DF_RTOL)
    tol = p_tolerance(arr(r["t"])[:, ok], arr(r["df"])[:, ok])
    assert np.all(np.abs(np.log(p[:, ok]) - np.log(arr(r["p"])[:, ok])) <= tol)


def test_lmmtest_recomputes_from_summary_statistics(case_fit):
    """A residual-df fit with output_ss gives the same Satterthwaite tests as a
    Satterthwaite fit (the information is recomputed at the fitted theta)."""
    name, method, sat = case_fit
    plain = lmm_stats(stats(name), method=method, output_ss=True)
    assert plain.df_method == "residual" and plain.vcov_theta is None
    contrast = {"avg": "0.5 * cls1:trtB + 0.5 * cls2:trtB", "x": "x"}
    a = lmmtest(plain, contrast=contrast, df="satterthwaite")
    b = lmmtest(sat, contrast=contrast)
    pd.testing.assert_frame_equal(a, b, rtol=1e-10)
    # and the residual df of a Satterthwaite fit are the R package's
    c = lmmtest(sat, contrast=contrast, df="residual")
    d = lmmtest(plain, contrast=contrast)
    pd.testing.assert_frame_equal(c, d, rtol=1e-12)
    assert list(d.columns) == ["avg_coef", "x_coef", "avg_t", "x_t", "avg_p", "x_p"]


def test_df_option_changes_only_df_and_p():
    st = stats("k2")
    a = lmm_stats(st, output_fim=True)
    b = lmm_stats(st, df="satterthwaite", output_fim=True)
    assert isinstance(a.df, float) and a.df == st.n - st.p
    for name in ("coef", "se", "t", "theta", "se_theta", "logLik", "cov", "FIM_theta"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.allclose(a.p, b.p)
    np.testing.assert_allclose(b.p, 2 * scipy.stats.t.sf(np.abs(b.t), b.df), rtol=1e-12)
    frame = b.to_dataframe()
    np.testing.assert_array_equal(frame["df"].to_numpy(), b.df.ravel())
    # without the covariances the df are the same, and nothing per-contrast is kept
    c = lmm_stats(st, df="satterthwaite", output_cov=False)
    np.testing.assert_array_equal(c.df, b.df)
    assert c.jac_cov is None and c.vcov_theta is None and b.jac_cov is not None


# -- the summary-statistic formulas against a dense computation -------------------------


def dense_problem(seed=3, n=160, S=6):
    rng = np.random.default_rng(seed)
    sam = rng.integers(0, S, n)
    time = rng.uniform(0, 1, n)
    X = np.column_stack([np.ones(n), rng.normal(size=n), (sam < S // 2).astype(float)])
    Z1 = np.eye(S)[sam]
    Z = np.hstack([Z1, Z1 * time[:, None]])
    y = X @ [1.0, 0.3, 0.5] + Z @ rng.normal(0, 0.7, 2 * S) + rng.normal(size=n)
    return X, Z, y


def dense_loglik(X, Z, y, d, theta, method):
    """-2 l = log|V| [+ log|X'V^-1X|] + y'Py, up to a constant (V built in full)."""
    n = len(y)
    cols = np.repeat(np.arange(len(d)), d)
    V = theta[-1] * np.eye(n) + (Z * theta[cols]) @ Z.T
    Vi = np.linalg.inv(V)
    XVX = X.T @ Vi @ X
    P = Vi - Vi @ X @ np.linalg.solve(XVX, X.T @ Vi)
    out = np.linalg.slogdet(V)[1] + y @ P @ y
    if method == "REML":
        out += np.linalg.slogdet(XVX)[1]
    return -out / 2, np.linalg.inv(XVX)


def central_hessian(f, x, rel=1e-3):
    h = rel * np.abs(x)
    k = len(x)
    H = np.empty((k, k))
    for i in range(k):
        for j in range(k):
            vals = []
            for si, sj in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
                e = x.copy()
                e[i] += si * h[i]
                e[j] += sj * h[j]
                vals.append(f(e))
            H[i, j] = (vals[0] - vals[1] - vals[2] + vals[3]) / (4 * h[i] * h[j])
    return H


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("K", [1, 2])
def test_observed_information_and_cov_gradient_equal_dense_derivatives(method, K):
    X, Z, y = dense_problem()
    S = Z.shape[1] // 2
    if K == 1:
        Z = Z[:, :S]
    d = [S] * K
    theta = np.array([0.4, 0.25, 1.3][-(K + 1) :])  # any point: the formulas hold anywhere
    sh = prepare(X.T @ X, Z.T @ X, Z.T @ Z, len(y), d, method)
    zry, yry = sh.residualise((X.T @ y)[None], (Z.T @ y)[None], np.array([y @ y]))
    dense = central_hessian(lambda t: dense_loglik(X, Z, y, d, t, method)[0], theta)
    for spectral in [False, True] if K == 1 else [False]:
        info = observed_information(sh, theta[None], zry, yry, spectral=spectral)[0]
        np.testing.assert_allclose(info, -dense, rtol=1e-5, atol=1e-6 * np.abs(dense).max())
    cov = dense_loglik(X, Z, y, d, theta, method)[1]
    for i in range(K + 1):
        h = 1e-5 * theta[i]
        up, down = theta.copy(), theta.copy()
        up[i] += h
        down[i] -= h
        num = (
            dense_loglik(X, Z, y, d, up, method)[1] - dense_loglik(X, Z, y, d, down, method)[1]
        ) / (2 * h)
        for spectral in [False, True] if K == 1 else [False]:
            jac = cov_jacobian(sh, theta[None], cov[None], spectral=spectral)[0, i]
            np.testing.assert_allclose(jac, num, rtol=1e-6, atol=1e-8 * np.abs(num).max())


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_k1_eigenvalue_path_equals_general_path(method):
    st = stats("k1")
    fit = lmm_stats(st, method=method)
    sh = prepare(st.XX, st.ZX, st.ZZ, st.n, st.d, method)
    zry, yry = sh.residualise(st.XY.T, st.ZY.T, st.Ynorm)
    theta = np.ascontiguousarray(fit.theta.T)
    a = observed_information(sh, theta, zry, yry, spectral=True)
    b = observed_information(sh, theta, zry, yry, spectral=False)
    np.testing.assert_allclose(a, b, rtol=1e-9)
    ja = cov_jacobian(sh, theta, fit.cov, spectral=True)
    jb = cov_jacobian(sh, theta, fit.cov, spectral=False)
    np.testing.assert_allclose(ja, jb, rtol=1e-9, atol=1e-12 * np.abs(jb).max())


def test_satterthwaite_df_nan_where_undefined():
    cov = np.tile(np.eye(2), (3, 1, 1))
    jac = np.zeros((3, 2, 2, 2))
    jac[:, 0] = np.eye(2)
    A = np.tile(np.eye(2), (3, 1, 1))
    A[1] = -A[1]  # an information matrix that is not positive definite
    cov[2] = np.nan  # a feature that was not fitted
    df = satterthwaite_df(cov, jac, A, np.eye(2)[:, :1])
    assert df[0, 0] == 2.0 and np.isnan(df[1:, 0]).all()


# -- the pipeline's block task and zero features ------------------------------------------


def test_block_task_writes_satterthwaite_df():
    st = stats("k2")
    L = np.zeros((st.p, 1))
    L[[st.covariates.index("cls1:trtB"), st.covariates.index("cls2:trtB")], 0] = 0.5
    model = SharedModel(
        XX=st.XX,
        ZX=st.ZX,
        ZZ=st.ZZ,
        n=st.n,
        d=st.d,
        method="REML",
        max_iter=50,
        epsilon=1e-5,
        L=L,
        alternative="two.sided",
        store_cov=False,
        store="unused",
        df="satterthwaite",
    )
    arrays = block_arrays(model, st.XY, st.ZY, st.Ynorm)
    # one thread, as the worker fits: the same fit to the last bit, so that the df and p
    # that the worker writes can be compared with lmmtest's at 1e-12
    fit = lmm_stats(st, df="satterthwaite", n_threads=1)
    np.testing.assert_allclose(arrays["df"], fit.df.T, rtol=1e-12)
    res = lmmtest(fit, contrast=pd.DataFrame(L, index=st.covariates, columns=["avg"]))
    np.testing.assert_allclose(arrays["contrast_df"][:, 0], res["avg_df"], rtol=1e-12)
    np.testing.assert_allclose(arrays["contrast_p"][:, 0], res["avg_p"], rtol=1e-12)
    residual = block_arrays(
        SharedModel(**{**model.__dict__, "df": "residual"}), st.XY, st.ZY, st.Ynorm
    )
    assert np.all(residual["contrast_df"] == st.n - st.p)


def test_deferred_model_is_prepared_where_it_is_fitted():
    """A model built with ``defer`` (a stratified run's) carries no terms until its first
    block is fitted (on a worker: pickled without them), then keeps them; its block's
    arrays are those of a model prepared when built, to the bit."""
    import pickle

    st = stats("k2")
    common = dict(
        XX=st.XX, ZX=st.ZX, ZZ=st.ZZ, n=st.n, d=st.d, method="REML", max_iter=50,
        epsilon=1e-5, L=np.zeros((st.p, 0)), alternative="two.sided", store_cov=True,
        store="unused", df="satterthwaite", nonnegative=True,
    )  # fmt: skip
    deferred = SharedModel(**common, defer=True)
    assert deferred.terms is None
    sent = pickle.loads(pickle.dumps(deferred))
    assert sent.terms is None
    got = block_arrays(sent, st.XY, st.ZY, st.Ynorm)
    terms = sent.terms
    assert terms is not None and sent.prepared() is terms  # prepared once, kept
    want = block_arrays(SharedModel(**common), st.XY, st.ZY, st.Ynorm)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_zero_features_stay_nan():
    X, Y, Z, d = cell_arrays("k1")
    Y = Y.copy()
    Y[2] = 0.0
    with pytest.warns(Warning, match="all zero"):
        fit = lmm(
            X.T @ X,
            X.T @ Y.T,
            Z.T @ X,
            Z.T @ Y.T,
            Z.T @ Z,
            (Y**2).sum(1),
            len(X),
            list(d.values()),
            df="satterthwaite",
        )
    assert np.isnan(fit.df[:, 2]).all() and np.isnan(fit.p[:, 2]).all()
    assert np.isfinite(np.delete(fit.df, 2, axis=1)).all()
    res = lmmtest(fit, index=[3, 4], p_adjust="BH")
    assert np.isnan(res.iloc[2]).all()


# -- adjusted p-values ----------------------------------------------------------------------


@pytest.mark.parametrize("method,sm", [("BH", "fdr_bh"), ("BY", "fdr_by")])
def test_lmmtest_padj_equals_statsmodels(method, sm):
    fit = lmm_stats(stats("k1"), df="satterthwaite")
    res = lmmtest(fit, p_adjust=method)
    for c in fit.covariates:
        expected = multipletests(res[f"{c}_p"].to_numpy(), method=sm)[1]
        np.testing.assert_allclose(res[f"{c}_padj"].to_numpy(), expected, rtol=1e-12)


# -- bad input ------------------------------------------------------------------------------


def test_errors_name_the_problem():
    st = stats("k1")
    with pytest.raises(InputError, match="unknown df 'kenward-roger'"):
        lmm_stats(st, df="kenward-roger")
    plain = lmm_stats(st)
    with pytest.raises(InputError, match=r"df='satterthwaite'.*output_ss=True"):
        lmmtest(plain, df="satterthwaite")
    with pytest.raises(InputError, match="unknown p_adjust 'holm'"):
        lmmtest(plain, p_adjust="holm")
    with pytest.raises(InputError, match="unknown df"):
        lmmtest(plain, df="containment")
