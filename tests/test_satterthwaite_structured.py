"""Satterthwaite's df through the block structure of ZZ (numerics/satterthwaite_structured.py)
equal the dense path's to 1e-10 on nested, crossed and mixed designs (ML and REML), at the
fitted theta and at components held at zero."""

import numpy as np
import pytest
from test_structured import cell_stats, components, design

from flashmm_dask import lmm
from flashmm_dask.numerics import fisher, structured_nested
from flashmm_dask.numerics import satterthwaite as sat
from flashmm_dask.numerics.boundary import constrain
from flashmm_dask.numerics.fisher import fit_theta, prepare
from flashmm_dask.numerics.fixed import fixed_effects
from flashmm_dask.numerics.linalg import GINV_TOL

RTOL = 1e-10
KINDS = ["nested", "nested_first_big", "nested_three", "crossed", "crossed_three", "mixed"]


def close(a, b, rtol=RTOL):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=0)


def close_matrix(a, b, rtol=RTOL):
    """Symmetric matrices (..., k, k) equal to rtol on the scale of their diagonals:
    |a_ij - b_ij| <= rtol sqrt(|b_ii b_jj|). An entry small against its diagonal is a
    difference of terms of that size (the information between two components is ~1e-6 of
    theirs in the mixed design), which neither path gets to rtol of the entry itself
    (both are ~1e-11 of the diagonals from an extended-precision reference)."""
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    diag = np.abs(np.diagonal(b, axis1=-2, axis2=-1))
    scale = np.sqrt(diag[..., :, None] * diag[..., None, :])
    ok = np.isnan(b) | (np.abs(a - b) <= rtol * scale)
    assert ok.all(), np.max(np.where(ok, 0, np.abs(a - b) / scale))


def null_design(kind, n=2500, m=16, seed=5, donors=12):
    """A nested or crossed design whose first component has no variance in half the
    features (their unconstrained estimates fall below zero, a non-negative fit holds them
    at zero)."""
    rng = np.random.default_rng(seed)
    X = np.column_stack([np.ones(n), rng.normal(size=n), rng.integers(0, 2, n)])
    Zs = components(kind, rng, n, donors)
    Y = (X @ rng.normal(size=(X.shape[1], m))).T + rng.normal(size=(m, n))
    for k, z in enumerate(Zs):
        sd = np.where(np.arange(m) % 2 == 0, 0.0, 0.6) if k == 0 else np.full(m, 0.6)
        Y += (z @ (rng.normal(size=(z.shape[1], m)) * sd)).T
    return cell_stats(X, Zs, Y)


def fitted(st, method, nonnegative=False):
    """Shared terms (structured path), zry, yry, theta, held and cov of a design's fit."""
    sh = prepare(st["XX"], st["ZX"], st["ZZ"], st["n"], st["d"], method, structured=True)
    assert sh.path == "structured"
    XY, ZY = st["XY"].T.copy(), st["ZY"].T.copy()
    zry, yry = sh.residualise(XY, ZY, st["Ynorm"])
    th = fit_theta(sh, zry, yry)
    held = None
    if nonnegative:
        th, held = constrain(sh, zry, yry, th)
    fx = fixed_effects(sh, XY, ZY, th.theta, th.logdetM0)
    return sh, zry, yry, th.theta, held, fx.cov


def both(fn, *args, **kwargs):
    """fn on the structured path and on the dense one."""
    return fn(*args, **kwargs, structure=True), fn(*args, **kwargs, structure=False)


def check_all(sh, zry, yry, theta, held, cov):
    """Every Satterthwaite ingredient equal on both paths."""
    close_matrix(*both(sat.observed_information, sh, theta, zry, yry))
    close_matrix(*both(sat.expected_information, sh, theta))
    close_matrix(*both(sat.cov_jacobian, sh, theta, cov))
    L = np.column_stack([np.eye(sh.p), [0.0, 1.0, -1.0], [1.0, 0.5, 2.0]])
    (c_s, g_s), (c_d, g_d) = both(sat.contrast_gradient, sh, theta, cov, L)
    close(c_s, c_d)
    close(g_s, g_d)
    # the inverse information and the df where the information is an inverse's, not a
    # pseudo-inverse's: where its condition exceeds 1 / GINV_TOL (a component set to zero by
    # hand with an information of 1e10 beside 1e2 ones) MASS::ginv's cut-off keeps the
    # eigenvectors of the small eigenvalues, which move by ~eps * cond on either path
    info = sat.observed_information(sh, theta, zry, yry, structure=False)
    rows = np.linalg.cond(info, 1) < 0.25 / GINV_TOL
    assert rows.sum() >= theta.shape[0] - 1
    jac = sat.cov_jacobian(sh, theta, cov)
    for boundary_df in ("lmertest", "retain"):
        v_s, v_d = both(sat.theta_vcov, sh, theta, zry, yry, held=held, boundary_df=boundary_df)
        close_matrix(v_s[rows], v_d[rows])
        df_s, df_d = sat.df_from_gradient(c_s, g_s, v_s), sat.df_from_gradient(c_d, g_d, v_d)
        np.testing.assert_array_equal(np.isnan(df_s), np.isnan(df_d))
        assert np.isfinite(df_s[rows]).all()
        close(df_s[rows], df_d[rows])
        close(sat.satterthwaite_df(cov, jac, v_s, L)[rows], df_d[rows])


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("kind", KINDS)
def test_structured_equals_dense(kind, method):
    st = design(kind, m=6)
    sh, zry, yry, theta, _, cov = fitted(st, method)
    assert sh.structure.diagonal == kind.startswith("nested")
    check_all(sh, zry, yry, theta, None, cov)


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("kind", KINDS)
def test_components_at_zero(kind, method):
    """theta_k = 0 (D with zeros): every component in turn, one feature each, held."""
    st = design(kind, m=6)
    sh, zry, yry, theta, _, cov = fitted(st, method)
    held = np.zeros(theta.shape, dtype=bool)
    for k in range(sh.K):
        theta[k % theta.shape[0], k] = 0.0
        held[k % theta.shape[0], k] = True
    theta[-1, :-1] = 0.0  # every random component at zero in the last feature
    held[-1, :-1] = True
    check_all(sh, zry, yry, theta, held, cov)


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("kind", ["nested", "crossed"])
def test_non_negative_fit(kind, method):
    """A non-negative fit with components held at zero: the observed information of the
    free components ("lmertest") and the retained one, expected where indefinite."""
    st = null_design(kind)
    sh, zry, yry, theta, held, cov = fitted(st, method, nonnegative=True)
    assert held[:, 0].sum() >= 2 and not held[:, -1].any()
    check_all(sh, zry, yry, theta, held, cov)


@pytest.mark.parametrize("kind", ["nested", "crossed"])
def test_singular_and_missing_features_take_the_dense_algebra(monkeypatch, kind):
    """A feature the structured algebra flags (P or C singular) gets the dense path's
    values, its neighbours the structured ones; a theta with NaN gives NaN on both."""
    st = design(kind, m=4)
    sh, zry, yry, theta, _, cov = fitted(st, "REML")
    theta[2] = np.nan
    flagged = theta[1, -1]
    init = sat.structured._Feature.__init__

    def flag(self, sh, Gp, theta):
        init(self, sh, Gp, theta)
        self.ok = self.ok and theta[-1] != flagged

    expected = {
        "observed_information": sat.observed_information(sh, theta, zry, yry),
        "cov_jacobian": sat.cov_jacobian(sh, theta, cov),
    }
    L = np.eye(sh.p)
    g = sat.contrast_gradient(sh, theta, cov, L)[1]
    monkeypatch.setattr(sat.structured._Feature, "__init__", flag)
    kernels = sat.structured.kernels  # the nested path's compiled kernels flag it too

    def flagging(kernel, at):  # at: theta's place among the kernel's arguments
        def flag_kernel(*args):
            out, ok = kernel(*args)
            return out, ok & (args[at][:, -1] != flagged)

        return flag_kernel

    monkeypatch.setattr(kernels, "info", flagging(kernels.info, 3))
    monkeypatch.setattr(kernels, "middle", flagging(kernels.middle, 1))
    for name, args in (
        ("observed_information", (sh, theta, zry, yry)),
        ("cov_jacobian", (sh, theta, cov)),
        ("contrast_gradient", (sh, theta, cov, L)),
    ):
        a, b = both(getattr(sat, name), *args)
        if name == "contrast_gradient":
            a, b, before = a[1], b[1], g
        else:
            before = expected[name]
        assert np.isnan(a[2]).all() and np.isnan(b[2]).all()
        np.testing.assert_array_equal(a[[0, 3]], before[[0, 3]])
        if name == "contrast_gradient":  # W'(B_k'B_k)W from the dense B against |B_k W|^2
            close(a[1], b[1])
        else:  # the dense algebra itself
            np.testing.assert_array_equal(a[1], b[1])


def test_unstructured_design_is_dense(monkeypatch):
    """Without the structure in ZZ the dense algebra runs, whatever ``structure`` says."""
    st = design("unstructured", m=3)
    sh = prepare(st["XX"], st["ZX"], st["ZZ"], st["n"], st["d"], "REML", structured=True)
    assert sh.structure is None

    def fail(*args):
        raise AssertionError("the structured path was taken")

    monkeypatch.setattr(sat.structured, "observed_information", fail)
    monkeypatch.setattr(sat.structured, "middle", fail)
    zry, yry = sh.residualise(st["XY"].T.copy(), st["ZY"].T.copy(), st["Ynorm"])
    theta = fit_theta(sh, zry, yry).theta
    cov = np.tile(np.linalg.inv(st["XX"]), (3, 1, 1))
    close(*both(sat.observed_information, sh, theta, zry, yry), rtol=0)
    close(*both(sat.cov_jacobian, sh, theta, cov), rtol=0)


@pytest.mark.parametrize("nonnegative", [False, True])
def test_lmm_satterthwaite_equals_dense(monkeypatch, nonnegative):
    """A whole lmm(df="satterthwaite") on the default (structured) path equals the dense
    path's df and p."""
    st = design("nested_large", m=12) if not nonnegative else null_design("nested", donors=30)
    L = np.array([[0.0], [1.0], [-1.0]])
    kw = dict(df="satterthwaite", nonnegative=nonnegative, satterthwaite_contrasts=L)
    sh = prepare(st["XX"], st["ZX"], st["ZZ"], st["n"], st["d"], "REML")
    assert sh.path == "structured"
    res = lmm(**st, n_threads=2, **kw)
    if nonnegative:
        assert np.sum(res.theta[0] == 0) >= 2
    monkeypatch.setattr(fisher, "structure_worth_it", lambda *a: False)
    monkeypatch.setattr(sat, "_structured", lambda sh, structure: False)
    dense = lmm(**st, n_threads=2, **kw)
    assert np.isfinite(res.df).all()
    close(res.df, dense.df)
    close(res.p, dense.p)
    close(res.contrast_df, dense.contrast_df)


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_nested_takes_the_compiled_kernels(monkeypatch, method):
    """Nested factors: the observed information comes from the compiled kernel (no
    structured solve per feature), the Gram matrices from theirs (REML and ML)."""
    st = design("nested", m=4)
    sh, zry, yry, theta, _, cov = fitted(st, method)
    expected = sat.observed_information(sh, theta, zry, yry)
    calls = []
    kernels = sat.structured.kernels
    for name in ("info", "middle"):

        def counted(*args, kernel=kernels.__dict__[name], name=name):
            calls.append(name)
            return kernel(*args)

        monkeypatch.setattr(kernels, name, counted)
    quadratic = sat.structured._Feature.quadratic

    def solves(self, z, yry):
        calls.append("solves")
        return quadratic(self, z, yry)

    monkeypatch.setattr(sat.structured._Feature, "quadratic", solves)
    np.testing.assert_array_equal(sat.observed_information(sh, theta, zry, yry), expected)
    sat.cov_jacobian(sh, theta, cov)
    assert calls == ["info", "middle"]


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("kind", ["nested", "nested_three", "crossed"])
def test_given_expected_information(kind, method):
    """The fit's FIM_theta passed as the expected information at theta gives the observed
    information computed without it (to 1e-10), held components included."""
    st = null_design(kind, m=12)
    sh = prepare(st["XX"], st["ZX"], st["ZZ"], st["n"], st["d"], method, structured=True)
    zry, yry = sh.residualise(st["XY"].T.copy(), st["ZY"].T.copy(), st["Ynorm"])
    th, held = constrain(sh, zry, yry, fit_theta(sh, zry, yry))
    assert held.any()
    given = sat.observed_information(sh, th.theta, zry, yry, fim=th.FIM_theta)
    close_matrix(given, sat.observed_information(sh, th.theta, zry, yry))
    for boundary_df in ("lmertest", "retain"):
        kw = dict(held=held, boundary_df=boundary_df)
        close_matrix(
            sat.theta_vcov(sh, th.theta, zry, yry, fim=th.FIM_theta, **kw),
            sat.theta_vcov(sh, th.theta, zry, yry, **kw),
        )


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_nested_values_do_not_depend_on_the_block(method):
    """A feature's observed information and Gram matrices are the same numbers alone and
    in its block (the kernels take each feature on its own)."""
    st = design("nested_large", m=8)
    sh, zry, yry, theta, _, _ = fitted(st, method)
    info = sat.observed_information(sh, theta, zry, yry)
    mid = sat.structured.middle(sh, theta)[0]
    for j in (0, 5):
        one = slice(j, j + 1)
        np.testing.assert_array_equal(
            sat.observed_information(sh, theta[one], zry[one], yry[one]), info[one]
        )
        np.testing.assert_array_equal(sat.structured.middle(sh, theta[one])[0], mid[one])


@pytest.mark.parametrize("kind", ["nested", "nested_first_big"])
def test_nested_without_count_sums(monkeypatch, kind):
    """Where the sums over the counts are not stored (many distinct counts, e.g. random
    slopes: structured_nested.H_VALUES) the kernels sum over the columns: the same df."""
    monkeypatch.setattr(structured_nested, "H_VALUES", 0)
    st = design(kind, m=6)
    sh, zry, yry, theta, _, cov = fitted(st, "REML")
    assert sh.nested.H.shape[0] == 0
    check_all(sh, zry, yry, theta, None, cov)
