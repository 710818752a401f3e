"""Non-negative variance components (``nonnegative=True``) and the shared status rule.

Reference: tests/reference/boundary/ (lme4 1.1-31 + lmerTest 3.1-3, singular and interior
fits; see its README). R FLASHMM's unconstrained fits are checked by
tests/test_lmm_reference.py, unchanged.
"""

import json
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from lmertest_cases import CASES as LMERTEST_CASES
from lmertest_cases import stats as lmertest_stats
from reference_cases import CASES as R_CASES
from reference_cases import load_case, summary_args

from flashmm_dask import InputError, SummaryStats, lmm, lmm_stats, lmmtest
from flashmm_dask.model.status import STATUS, converged, loglik_gap, status_codes
from flashmm_dask.run.worker import SharedModel, block_arrays

FOLDER = Path(__file__).parent / "reference" / "boundary"
CASES = ("dyestuff2", "k1", "k2")
METHOD_CASES = [(name, method) for name in CASES for method in ("REML", "ML")]


@cache
def load(name: str) -> dict:
    with open(FOLDER / f"{name}.json") as fh:
        return json.load(fh)


@cache
def stats(name: str) -> SummaryStats:
    cells = load(name)["cells"]
    X = np.array(cells["X"], dtype=np.float64)
    Y = np.array(cells["Y"], dtype=np.float64)
    S = len(cells["sam_levels"])
    Z = np.eye(S)[np.array(cells["sam"]) - 1]
    d = [S]
    if name == "k2":
        Z = np.hstack([Z, Z * np.array(cells["time"])[:, None]])
        d = [S, S]
    names = {k: list(np.atleast_1d(cells[k])) for k in ("covariates", "features")}
    return SummaryStats.from_arrays(X, Y, Z, d=d, **names)


def arr(x) -> np.ndarray:
    return np.array(x, dtype=np.float64)


@cache
def fit_of(name: str, method: str, nonnegative: bool = True):
    return lmm_stats(stats(name), method=method, df="satterthwaite", nonnegative=nonnegative)


@pytest.mark.parametrize(("name", "method"), METHOD_CASES)
def test_matches_lme4(name, method):
    """Every feature, singular or not: theta, coef, se, cov, df, p and logLik of lme4."""
    r = load(name)["fits"][method]
    fit = fit_of(name, method)
    theta = arr(r["theta"])
    np.testing.assert_allclose(fit.theta, theta, rtol=0, atol=1e-5 * theta.max(axis=0).max())
    for k, col in enumerate(theta.T):  # per feature, relative to its largest variance
        np.testing.assert_allclose(fit.theta[:, k], col, rtol=0, atol=1e-5 * col.max())
    co = r["coefficients"]
    se = arr(co["se"])
    np.testing.assert_allclose(fit.se, se, rtol=1e-5)
    np.testing.assert_allclose(fit.coef, arr(co["estimate"]), rtol=0, atol=1e-5 * se.min())
    np.testing.assert_allclose(fit.df, arr(co["df"]), rtol=1e-4)
    np.testing.assert_allclose(np.log(fit.p), np.log(arr(co["p"])), rtol=0, atol=1e-3)
    assert fit.cov is not None
    for j, vc in enumerate(r["vcov"]):
        np.testing.assert_allclose(fit.cov[j], arr(vc), rtol=1e-5, atol=1e-5 * np.abs(vc).max())
    shift = np.linalg.slogdet(np.asarray(stats(name).XX))[1] / 2 if method == "REML" else 0.0
    np.testing.assert_allclose(fit.logLik - shift, arr(r["logLik"]), rtol=0, atol=1e-8)


@pytest.mark.parametrize(("name", "method"), METHOD_CASES)
def test_boundary_status_where_lme4_is_singular(name, method):
    r = load(name)["fits"][method]
    fit = fit_of(name, method)
    singular = np.array(r["singular"], dtype=bool)
    assert singular.any()
    np.testing.assert_array_equal(fit.status_names() == "boundary", singular)
    np.testing.assert_array_equal(fit.status_names()[~singular], "ok")
    assert fit.converged.all()
    K = len(fit.components) - 1
    at_zero = fit.theta[:K] == 0
    np.testing.assert_array_equal(at_zero.any(axis=0), singular)
    # KKT: at a held component the score does not point into the interior
    assert (fit.dlogL[:K][at_zero] <= fit.epsilon).all()
    assert np.isnan(fit.se_theta[:K][at_zero]).all()
    assert np.isfinite(fit.se_theta[:K][~at_zero]).all()
    # the unconstrained fit of the same features (R FLASHMM's): never reported as ok; a
    # variance below zero is flagged (some do not converge or end non-finite instead)
    names = fit_of(name, method, nonnegative=False).status_names()
    assert not np.isin(names[singular], ["ok", "boundary"]).any()
    assert (names[singular] == "negative_variance").any()


def test_dyestuff2_numbers():
    """lme4's documented singular fit: theta 0, se 0.678, lmerTest df 29 (REML)."""
    fit = fit_of("dyestuff2", "REML")
    assert fit.theta[0, 0] == 0.0
    np.testing.assert_allclose(fit.se[0, 0], 0.678388031232524, rtol=1e-9)
    np.testing.assert_allclose(fit.df[0, 0], 29.0, rtol=1e-12)
    np.testing.assert_allclose(fit.theta[1, 0], 13.8063096275862, rtol=1e-10)
    free = fit_of("dyestuff2", "REML", nonnegative=False)
    assert free.theta[0, 0] < 0 and free.se[0, 0] < 0.6  # R FLASHMM's: a negative variance


@pytest.mark.parametrize(("name", "method"), [(n, m) for n in ("k1", "k2") for m in ("REML", "ML")])
def test_contrast_df_at_the_boundary(name, method):
    case = load(name)
    r = case["fits"][method]["contrast"]
    fit = fit_of(name, method)
    L = pd.DataFrame(arr(case["contrast"])[:, None], index=fit.covariates, columns=["trt"])
    res = lmmtest(fit, contrast=L)
    np.testing.assert_allclose(res["trt_df"], arr(r["df"]), rtol=1e-4)
    np.testing.assert_allclose(res["trt_coef"], arr(r["estimate"]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.log(res["trt_p"]), np.log(arr(r["p"])), rtol=0, atol=1e-3)


def _interior_equal(st: SummaryStats, method: str, df: str) -> None:
    free = lmm_stats(st, method=method, df=df, output_fim=True)
    con = lmm_stats(st, method=method, df=df, output_fim=True, nonnegative=True)
    K = len(free.components) - 1
    interior = (free.theta[:K] >= 0).all(axis=0)
    assert interior.any()
    for name in ("coef", "se", "t", "p", "theta", "se_theta", "dlogL", "df_array"):
        a, b = getattr(free, name), getattr(con, name)
        a, b = (a(), b()) if callable(a) else (a, b)
        np.testing.assert_array_equal(b[..., interior], a[..., interior], err_msg=name)
    for name in ("logLik", "niter", "converged", "status"):
        np.testing.assert_array_equal(getattr(con, name)[interior], getattr(free, name)[interior])
    for name in ("cov", "FIM_theta", "FIM_beta"):
        np.testing.assert_array_equal(getattr(con, name)[interior], getattr(free, name)[interior])


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("df", ["residual", "satterthwaite"])
def test_interior_fits_unchanged(method, df):
    """nonnegative=True leaves the features with every variance >= 0 bit for bit."""
    for name in ("k1", "k2"):
        _interior_equal(stats(name), method, df)
    for name in LMERTEST_CASES:
        _interior_equal(lmertest_stats(name), method, df)


def test_r_reference_cases_unconstrained_by_default():
    """R FLASHMM's cases: the default is unconstrained; interior features are unchanged."""
    for name in R_CASES:
        case = load_case(name)
        method = "ML" if "_ml" in name else "REML"
        a = lmm(**summary_args(case), method=method)
        assert a.nonnegative is False
        b = lmm(**summary_args(case), method=method, nonnegative=True)
        interior = (a.theta[:-1] >= 0).all(axis=0)
        np.testing.assert_array_equal(b.coef[:, interior], a.coef[:, interior])
        np.testing.assert_array_equal(b.theta[:, interior], a.theta[:, interior])
        assert (b.theta[:-1] >= 0).all()


def test_batched_equals_one_at_a_time():
    """Boundary features refitted in a batch equal each fitted alone."""
    st = stats("k2")
    batch = lmm_stats(st, method="REML", df="satterthwaite", nonnegative=True)
    for j in range(st.m):
        one = lmm_stats(st.subset([j]), method="REML", df="satterthwaite", nonnegative=True)
        for name in ("theta", "coef", "se", "df"):
            np.testing.assert_allclose(
                getattr(one, name)[:, 0], getattr(batch, name)[:, j], rtol=1e-12, atol=1e-300
            )
        assert one.status[0] == batch.status[j]


@pytest.mark.parametrize("nonnegative", [False, True])
@pytest.mark.parametrize("df", ["residual", "satterthwaite"])
def test_worker_and_lmm_share_converged_and_status(nonnegative, df):
    st = stats("k2")
    fit = lmm_stats(st, method="REML", df=df, nonnegative=nonnegative)
    model = SharedModel(
        XX=np.asarray(st.XX),
        ZX=np.asarray(st.ZX),
        ZZ=np.asarray(st.ZZ),
        n=st.n,
        d=tuple(st.d),
        method="REML",
        max_iter=50,
        epsilon=1e-5,
        L=np.zeros((st.p, 0)),
        alternative="two.sided",
        store_cov=False,
        store="unused",
        df=df,
        nonnegative=nonnegative,
    )
    arrays = block_arrays(model, np.asarray(st.XY), np.asarray(st.ZY), np.asarray(st.Ynorm))
    np.testing.assert_array_equal(arrays["converged"], fit.converged)
    np.testing.assert_array_equal(arrays["status"], fit.status)
    expected = "boundary" if nonnegative else "negative_variance"
    assert (fit.status == STATUS.index(expected)).any()


def test_scale_rule_applies_in_lmm():
    """The log-likelihood gap rule: a feature scaled by 1e8 is not called converged after
    R's absolute score rule stops it; the same feature at its own scale is."""
    st = stats("k1")
    j = 0
    XY, ZY = np.asarray(st.XY)[:, [j]], np.asarray(st.ZY)[:, [j]]
    Yn = np.asarray(st.Ynorm)[[j]]
    s = 1e8
    XX, ZX, ZZ = np.asarray(st.XX), np.asarray(st.ZX), np.asarray(st.ZZ)
    fit = lmm(XX, XY * s, ZX, ZY * s, ZZ, Yn * s**2, st.n, output_fim=True)
    assert fit.FIM_theta is not None
    gap = loglik_gap(fit.dlogL.T, fit.FIM_theta)
    assert fit.niter[0] == 1 and np.max(np.abs(fit.dlogL)) <= fit.epsilon
    assert not fit.converged[0]
    assert fit.status_names()[0] == "not_converged"
    assert gap[0] > 1e-6
    assert lmm_stats(st.subset([j])).converged[0]


def test_rule_and_codes():
    dl = np.array([[1e-6, 1e-7], [-0.5, 1e-7], [0.5, 1e-7]])
    F = np.tile(np.eye(2), (3, 1, 1))
    held = np.array([[False, False], [True, False], [True, False]])
    # a held component: a score pointing out of the space is fine, into it is not
    np.testing.assert_array_equal(converged(dl, F, 1e-5, held), [True, True, False])
    np.testing.assert_array_equal(converged(dl, F, 1e-5), [True, False, False])
    theta = np.array([[1.0, 1.0], [0.0, 1.0], [-1.0, 1.0], [1.0, 1.0]])
    codes = status_codes(
        np.array([1.0, 2.0, 3.0, np.nan]),
        np.array([True, True, True, False]),
        np.ones(4, dtype=bool),
        None,
        theta,
    )
    assert [STATUS[c] for c in codes] == ["ok", "boundary", "negative_variance", "all_zero"]
    assert STATUS[5:7] == ("boundary", "negative_variance")


def test_nonnegative_must_be_bool():
    with pytest.raises(InputError, match="nonnegative must be True or False"):
        lmm_stats(stats("k1"), nonnegative="yes")


def test_p_values_follow_df():
    fit = fit_of("k1", "REML")
    expected = 2 * scipy.stats.t.sf(np.abs(fit.t), fit.df)
    np.testing.assert_allclose(fit.p, expected, rtol=1e-12)


def _three_component_case() -> tuple[np.ndarray, ...]:
    """y ~ 1 + trt + x + state + (1|donor) + (1|donor:state) + (1|batch), 293 cells, one
    feature: the unconstrained Fisher scoring from R's start runs to max_iter without
    converging, and every variance held at zero is a Karush-Kuhn-Tucker point 0.54 below
    the optimum over theta >= 0 (found by a helper's adversarial testing)."""

    def indicators(f):
        _, codes = np.unique(f, return_inverse=True)
        return np.eye(codes.max() + 1)[codes]

    rng = np.random.default_rng(8)
    n, nd, ns = int(rng.integers(150, 350)), int(rng.integers(5, 14)), int(rng.integers(2, 5))
    donor = rng.choice(nd, n, p=rng.dirichlet(np.full(nd, 0.7)))
    state = rng.choice(ns, n, p=rng.dirichlet(np.ones(ns)))
    donor[:nd] = np.arange(nd)
    x = rng.normal(size=n)
    trt = (np.arange(nd) % 2)[donor]
    X = np.column_stack([np.ones(n), trt, x] + [(state == s) for s in range(1, ns)]).astype(float)
    batch = rng.integers(0, int(rng.integers(3, 9)), n)
    Zs = [indicators(donor), indicators(donor * ns + state), indicators(batch)]
    Y = np.empty((2, n))
    for j in range(2):
        y = X @ rng.normal(0, 1, X.shape[1])
        for k, Zk in enumerate(Zs):
            sd = 0 if (j + k) % 3 == 0 else rng.uniform(0.2, 1.0)
            y = y + Zk @ rng.normal(0, sd, Zk.shape[1])
        Y[j] = y + rng.normal(0, 1, n)
    return Y[1], X, Zs


def _reml_optimum(y, X, Zs):
    """theta maximising the cell-level restricted log-likelihood over variances >= 0 (a
    bounded quasi-Newton search from three starts), and the maximum, up to a constant."""
    import scipy.linalg
    import scipy.optimize

    n = y.size
    G = [Zk @ Zk.T for Zk in Zs]

    def minus_reml(t):
        V = t[-1] * np.eye(n) + sum(tk * g for tk, g in zip(t[:-1], G, strict=True))
        c = scipy.linalg.cho_factor(V, lower=True)
        ViX = scipy.linalg.cho_solve(c, X)
        XVX = X.T @ ViX
        r = y - X @ np.linalg.solve(XVX, ViX.T @ y)
        logdet = 2 * np.log(np.diag(c[0])).sum() + np.linalg.slogdet(XVX)[1]
        return 0.5 * (logdet + r @ scipy.linalg.cho_solve(c, r))

    bounds = [(0, None)] * len(Zs) + [(1e-6, None)]
    runs = [
        scipy.optimize.minimize(minus_reml, [s] * len(Zs) + [1.0], method="L-BFGS-B", bounds=bounds)
        for s in (0.05, 0.5, 1.0)
    ]
    best = min(runs, key=lambda r: r.fun)
    return best.x, -best.fun, minus_reml


def test_a_boundary_fit_from_a_diverged_start_finds_the_optimum():
    """nonnegative=True where the unconstrained fit diverged: R's start at zero led to every
    variance held (p = 2e-10 for trt); the second search from a start inside reaches the
    optimum over theta >= 0 that a bounded optimiser of the cell-level likelihood finds."""
    y, X, Zs = _three_component_case()
    Z = np.hstack(Zs)
    st = {"XX": X.T @ X, "XY": (X.T @ y)[:, None], "ZX": Z.T @ X, "ZY": (Z.T @ y)[:, None]}
    st |= {"ZZ": Z.T @ Z, "Ynorm": np.array([y @ y]), "n": y.size, "d": [z.shape[1] for z in Zs]}
    unconstrained = lmm(**st, method="REML")
    assert unconstrained.niter[0] == 50 and not unconstrained.converged[0]
    fit = lmm(**st, method="REML", nonnegative=True, df="satterthwaite")
    theta, best, minus_reml = _reml_optimum(y, X, Zs)
    np.testing.assert_allclose(fit.theta[:, 0], theta, rtol=1e-3, atol=1e-5)
    # the package's log-likelihood differs from the cell-level one by a constant: compare
    # the two optima on the cell-level scale
    assert -minus_reml(fit.theta[:, 0]) >= best - 1e-6
    assert STATUS[fit.status[0]] == "boundary" and fit.converged[0]
    assert fit.theta[1, 0] == 0 and 0.03 < fit.p[1, 0] < 0.07  # trt: 0.048, not 2e-10
