"""Satterthwaite's df at a variance component held at zero: lmerTest's rule (the component
leaves the model) and "retain" (it stays, the limit of the interior df).

References: the interior df of fits whose donor variance is a small positive estimate, on
data a hair's breadth from data fitted on the boundary; a dense n x n computation of the
expected information; lmerTest's numbers for the default (tests/test_boundary.py).
"""

import numpy as np
import pandas as pd
import pytest
from test_satterthwaite import dense_problem

import flashmm_dask as fm
from flashmm_dask import InputError, lmm_stats, lmmtest
from flashmm_dask.errors import ConfigError
from flashmm_dask.numerics.fisher import prepare
from flashmm_dask.numerics.linalg import pinv_sym
from flashmm_dask.numerics.satterthwaite import (
    contrast_gradient,
    df_from_gradient,
    expected_information,
    observed_information,
    theta_vcov,
)
from flashmm_dask.run.config import load_config
from flashmm_dask.run.pipeline import shared_model
from flashmm_dask.run.worker import SharedModel, block_arrays


def donor_data(n_donors=6, cells=25, seed=5):
    """Cells of n_donors donors, half in each group (donors nested in the group)."""
    rng = np.random.default_rng(seed)
    donor = np.repeat(np.arange(n_donors), cells)
    X = np.column_stack([np.ones(donor.size), donor >= n_donors // 2])
    Z = np.eye(n_donors)[donor]
    return X, Z, rng


def fit_rows(X, Z, Y, **options):
    st = fm.sslmm(X, np.atleast_2d(Y), Z, d=[Z.shape[1]])
    return lmm_stats(st, df="satterthwaite", nonnegative=True, **options)


def test_retained_df_are_the_limit_of_interior_df():
    """y(lam) = e + lam Z u: the donor variance estimate crosses zero at lam*; the df of the
    boundary fits just below lam* (retain) meet the interior df just above, lmerTest's jump."""
    X, Z, rng = donor_data()
    u, e = rng.normal(size=Z.shape[1]), rng.normal(size=Z.shape[0])
    e -= Z @ np.linalg.lstsq(Z, e, rcond=None)[0] * 0.9  # donor means shrunk: estimate < 0

    def y(lam):
        return e + lam * (Z @ u)

    free = [fit_rows(X, Z, y(lam)).theta[0, 0] for lam in (0.0, 2.0)]
    assert free[0] == 0.0 and free[1] > 0  # on the boundary, and inside
    lo, hi = 0.0, 2.0
    for _ in range(60):  # bisection on the unconstrained estimate's sign
        mid = 0.5 * (lo + hi)
        st = fm.sslmm(X, y(mid)[None], Z, d=[Z.shape[1]])
        if lmm_stats(st).theta[0, 0] < 0:
            lo = mid
        else:
            hi = mid
    gaps = []
    for delta in (1e-3, 1e-5):
        inside = fit_rows(X, Z, y(hi + delta))
        beyond = fit_rows(X, Z, y(lo - delta), boundary_df="retain")
        lmertest = fit_rows(X, Z, y(lo - delta))
        assert inside.theta[0, 0] > 0 and beyond.theta[0, 0] == 0.0
        assert inside.status_names()[0] == "ok" and beyond.status_names()[0] == "boundary"
        gaps.append(np.abs(beyond.df[:, 0] / inside.df[:, 0] - 1))
        # lmerTest's rule drops the donor variance: the group effect gets about n - p df
        assert lmertest.df[1, 0] > 20 * inside.df[1, 0]
    assert (gaps[1] < 1e-3).all() and (gaps[1] < gaps[0]).all()
    assert 1.0 < inside.df[1, 0] < 10.0  # about donors - 2, not cells - 2


def dense_expected(X, Z, theta, method):
    """tr(P V_i P V_j) / 2 (REML; V^-1 in place of P for ML), V built in full."""
    V = theta[-1] * np.eye(len(X)) + theta[0] * Z @ Z.T
    Vi = np.linalg.inv(V)
    P = Vi - Vi @ X @ np.linalg.solve(X.T @ Vi @ X, X.T @ Vi) if method == "REML" else Vi
    dV = [Z @ Z.T, np.eye(len(X))]
    return np.array([[np.trace(P @ a @ P @ b) / 2 for b in dV] for a in dV])


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("s1", [0.0, 0.4])
def test_expected_information_equals_dense(method, s1):
    X, Z, _ = dense_problem()
    Z = Z[:, :6]
    theta = np.array([s1, 1.3])
    sh = prepare(X.T @ X, Z.T @ X, Z.T @ Z, len(X), [6], method)
    got = expected_information(sh, theta[None])[0]
    np.testing.assert_allclose(got, dense_expected(X, Z, theta, method), rtol=1e-10)


def null_boundary_fits(n_genes=300):
    """Null genes without donor variance, 3 donors per group: many fits on the boundary."""
    X, Z, rng = donor_data(cells=30)
    Y = rng.normal(size=(n_genes, Z.shape[0]))
    st = fm.sslmm(X, Y, Z, d=[Z.shape[1]])
    return st, X


def test_retain_falls_back_to_expected_information_where_observed_is_indefinite():
    st, _ = null_boundary_fits()
    fit = lmm_stats(st, df="satterthwaite", nonnegative=True, boundary_df="retain")
    sh = prepare(st.XX, st.ZX, st.ZZ, st.n, st.d, "REML")
    zry, yry = sh.residualise(st.XY.T, st.ZY.T, st.Ynorm)
    theta = np.ascontiguousarray(fit.theta.T)
    held = np.zeros(theta.shape, dtype=bool)
    held[:, 0] = theta[:, 0] == 0
    obs = observed_information(sh, theta, zry, yry)
    definite = np.linalg.eigvalsh(obs).min(axis=1) > 0
    on, off = held[:, 0] & definite, held[:, 0] & ~definite
    assert on.sum() > 10 and off.sum() > 10  # both kinds of boundary fit occur
    vcov = theta_vcov(sh, theta, zry, yry, held=held, boundary_df="retain")
    np.testing.assert_allclose(vcov[on], pinv_sym(obs[on]), rtol=1e-12)
    np.testing.assert_allclose(vcov[off], pinv_sym(expected_information(sh, theta[off])))
    np.testing.assert_allclose(vcov[~held[:, 0]], pinv_sym(obs[~held[:, 0]]), rtol=1e-12)
    assert np.isfinite(fit.df).all() and np.isfinite(fit.p).all()
    # the df of the retained model, from the gradient in every component
    c, g = contrast_gradient(sh, theta, fit.cov, np.eye(2))
    np.testing.assert_allclose(fit.df.T, df_from_gradient(c, g, vcov), rtol=1e-10)


def test_rules_differ_only_in_df_at_held_components():
    st, _ = null_boundary_fits()
    a = lmm_stats(st, df="satterthwaite", nonnegative=True, output_fim=True)
    b = lmm_stats(st, df="satterthwaite", nonnegative=True, boundary_df="lmertest")
    c = lmm_stats(st, df="satterthwaite", nonnegative=True, boundary_df="retain")
    assert a.boundary_df == "lmertest" and c.boundary_df == "retain"
    np.testing.assert_array_equal(a.df, b.df)
    held = c.theta[0] == 0
    assert held.any() and (~held).any()
    np.testing.assert_array_equal(c.df[:, ~held], a.df[:, ~held])
    assert (c.df[1, held] < 0.5 * a.df[1, held]).all()  # the group effect, between donors
    for name in ("coef", "se", "t", "theta", "cov", "status", "converged"):
        np.testing.assert_array_equal(getattr(c, name), getattr(a, name))
    # residual df and unconstrained fits: the option changes nothing
    for options in ({"df": "residual", "nonnegative": True}, {"df": "satterthwaite"}):
        x = lmm_stats(st, **options)
        y = lmm_stats(st, boundary_df="retain", **options)
        np.testing.assert_array_equal(x.p, y.p)


def test_lmmtest_keeps_the_fits_rule():
    """lmmtest recomputing from the summary statistics uses the rule the fit was made with."""
    st, _ = null_boundary_fits(80)
    kept = lmm_stats(st, df="satterthwaite", nonnegative=True, boundary_df="retain")
    plain = lmm_stats(st, nonnegative=True, boundary_df="retain", output_ss=True)
    L = pd.DataFrame([[0.0], [1.0]], index=list(kept.covariates), columns=["g"])
    a, b = lmmtest(kept, contrast=L), lmmtest(plain, contrast=L, df="satterthwaite")
    np.testing.assert_allclose(b["g_df"], a["g_df"], rtol=1e-12)
    np.testing.assert_allclose(a["g_df"], kept.df[1], rtol=1e-12)


def test_bad_boundary_df_is_refused():
    st, _ = null_boundary_fits(5)
    with pytest.raises(InputError, match=r"boundary_df.*lmertest.*retain"):
        lmm_stats(st, df="satterthwaite", nonnegative=True, boundary_df="drop")


def test_config_key_boundary_df():
    assert load_config().model.boundary_df in ("lmertest", "retain")
    assert load_config(None, ["model.boundary_df=retain"]).model.boundary_df == "retain"
    assert load_config(None, ["model.boundary_df=lmerTest"]).model.boundary_df == "lmertest"
    with pytest.raises(ConfigError, match=r"model\.boundary_df.*lmertest, retain.*'drop'"):
        load_config(None, ["model.boundary_df=drop"])


@pytest.mark.parametrize("rule", [None, "lmertest", "retain"])
def test_a_run_uses_the_configured_rule(rule):
    """The config's rule reaches the block tasks (plain and stratified runs share
    shared_model), and a block's df equal lmm's with that rule."""
    st, _ = null_boundary_fits(60)
    cfg = load_config(None, [] if rule is None else [f"model.boundary_df={rule}"])
    model = shared_model(cfg, st, None, store="unused", store_cov=False)
    assert isinstance(model, SharedModel)
    assert model.boundary_df == (load_config().model.boundary_df if rule is None else rule)
    arrays = block_arrays(model, np.asarray(st.XY), np.asarray(st.ZY), np.asarray(st.Ynorm))
    ref = lmm_stats(st, df="satterthwaite", nonnegative=True, boundary_df=model.boundary_df)
    np.testing.assert_array_equal(arrays["df"], ref.df.T)


def test_new_contrasts_refit_with_the_stores_rule():
    """`flashmm-dask test` refits with the store's model settings: a store's boundary_df is
    used, and a store written before the option existed gets lmerTest's rule, as fitted."""
    from types import SimpleNamespace

    from flashmm_dask.run.retest import _lmm_options

    def store(model):
        return SimpleNamespace(attrs={"config": {"model": model}})

    assert _lmm_options(store({"boundary_df": "retain", "df": "satterthwaite"}))["boundary_df"] == (
        "retain"
    )
    assert "boundary_df" not in _lmm_options(store({"nonnegative": True}))
    assert fm.lmm.__kwdefaults__["boundary_df"] == "lmertest"
