"""Non-negative variance components on the structured path (numerics/boundary.py): the
refit with the held components pinned at zero in the full model's terms equals the refit
on the reduced model's terms to 1e-10, on nested, crossed and mixed designs (ML and REML),
and never prepares reduced terms or scores on the dense path."""

import functools

import numpy as np
import pytest
from test_structured import cell_stats, components

from flashmm_dask import lmm
from flashmm_dask.model import core
from flashmm_dask.numerics import boundary
from flashmm_dask.numerics.boundary import constrain, reduced_terms
from flashmm_dask.numerics.fisher import fit_theta, prepare

RTOL = 1e-10
KINDS = ("nested", "nested_three", "crossed", "mixed")


def design(kind, n=2500, per=6, seed=1):
    """Summary statistics of simulated cells with the random components of ``kind``
    (those of tests/test_structured.py); ``per`` features for each component have none of
    its variance (about half of them end below zero unconstrained), ``per`` none of any
    (some end as the linear model, every component held), ``per`` have all."""
    rng = np.random.default_rng(seed)
    X = np.column_stack([np.ones(n), rng.normal(size=n), rng.integers(0, 2, n)])
    Zs = components(kind, rng, n)
    K = len(Zs)
    m = per * (K + 2)
    sd = np.full((m, K), 0.6)
    for k in range(K + 1):
        sd[per * k : per * (k + 1), k if k < K else slice(None)] = 0.0
    Y = (X @ rng.normal(size=(X.shape[1], m))).T + rng.normal(size=(m, n))
    for k, z in enumerate(Zs):
        Y += (z @ (rng.normal(size=(z.shape[1], m)) * sd[:, k])).T
    return cell_stats(X, Zs, Y)


def terms(st, method, structured):
    sh = prepare(st["XX"], st["ZX"], st["ZZ"], st["n"], st["d"], method, structured=structured)
    zry, yry = sh.residualise(st["XY"].T.copy(), st["ZY"].T.copy(), st["Ynorm"])
    return sh, zry, yry


def constrained(st, method, structured, pinned=None):
    sh, zry, yry = terms(st, method, structured)
    fit = fit_theta(sh, zry, yry)
    return sh, fit, *constrain(sh, zry, yry, fit, pinned=pinned)


def close(a, b, rtol=RTOL):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=0)


def same_fit(a, b, held_a, held_b, scale):
    np.testing.assert_array_equal(held_a, held_b)
    np.testing.assert_array_equal(a.niter, b.niter)
    close(a.theta, b.theta)
    close(a.se_theta, b.se_theta)
    close(a.logdetM0, b.logdetM0)
    # the information against its diagonal, sqrt(F_ii F_jj): between two crossed
    # components it can be ~1e-6 of that (mixed, REML), a difference of terms that the
    # structured and the dense scorer give 1.5e-10 apart relative at the same theta
    d = np.sqrt(np.abs(np.diagonal(b.FIM_theta, axis1=1, axis2=2)))
    err = np.abs(a.FIM_theta - b.FIM_theta) / (d[:, :, None] * d[:, None, :])
    assert np.all(err <= RTOL)
    close(np.diagonal(a.FIM_theta, axis1=1, axis2=2), d**2)
    # dlogL is a difference of terms of size ~ n / s0: judged against that scale
    assert np.all(np.abs(a.dlogL - b.dlogL) <= RTOL * scale)


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("kind", KINDS)
def test_pinned_refit_equals_reduced_refit(kind, method):
    """Structured terms (pinned refit, structured scores) against the reduced-terms refit on
    the same structured terms and on the dense terms (the boundary code before pinning)."""
    st = design(kind)
    sh, fit, out, held = constrained(st, method, True)
    assert sh.path == "structured"
    K = sh.K
    # every component in turn ends below zero unconstrained and is held at zero
    assert np.all((fit.theta[:, :K] < 0).any(axis=0))
    assert np.all(held[:, :K].any(axis=0)) and not held[:, K].any()
    # and (mixed aside, whose four components never all end below zero here) some end as
    # the linear model, scored without a refit
    assert kind == "mixed" or held[:, :K].all(axis=1).any()
    assert np.all(out.theta[held] == 0.0) and np.all(out.theta[:, :K] >= 0)
    assert np.all(np.isnan(out.se_theta[held]))
    scale = st["n"] / out.theta[:, -1:]
    _, _, out_r, held_r = constrained(st, method, True, pinned=False)
    same_fit(out, out_r, held, held_r, scale)
    sh_d, _, out_d, held_d = constrained(st, method, False)
    assert sh_d.path == "dense"
    same_fit(out, out_d, held, held_d, scale)


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("kind", KINDS)
def test_lmm_nonnegative_structured_equals_dense(kind, method, monkeypatch):
    st = design(kind)
    fits = {}
    for structured in (True, False):
        monkeypatch.setattr(core, "prepare", functools.partial(prepare, structured=structured))
        fits[structured] = lmm(**st, method=method, nonnegative=True, n_threads=1)
    s, d = fits[True], fits[False]
    assert s.status is not None and d.status is not None
    np.testing.assert_array_equal(s.status, d.status)
    assert (s.status_names() == "boundary").any()
    np.testing.assert_array_equal(s.niter, d.niter)
    close(s.theta, d.theta)
    close(s.se, d.se)
    np.testing.assert_allclose(s.coef, d.coef, rtol=0, atol=RTOL * d.se.max())
    close(s.logLik, d.logLik)


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_fit_theta_with_fixed_components_is_the_reduced_fit(method):
    """fit_theta(fixed=) on the full model's terms: theta, niter and the free components'
    se of the reduced model; dlogL and FIM_theta of the full model there."""
    st = design("nested_three")
    sh, zry, yry = terms(st, method, True)
    for pattern in ([True, False, False], [False, True, True], [False, False, True]):
        fixed = np.array(pattern)
        th = fit_theta(sh, zry, yry, fixed=fixed)
        sub, cols = reduced_terms(sh, fixed)
        ref = fit_theta(sub, zry[:, cols], yry)
        free = np.append(~fixed, True)
        np.testing.assert_array_equal(th.niter, ref.niter)
        assert np.all(th.theta[:, ~free] == 0.0)
        close(th.theta[:, free], ref.theta)
        close(th.se_theta[:, free], ref.se_theta)
        assert np.all(np.isnan(th.se_theta[:, ~free]))
        close(th.FIM_theta[:, free[:, None] & free], ref.FIM_theta.reshape(len(yry), -1))
        close(th.logdetM0, ref.logdetM0)
        scale = st["n"] / ref.theta[:, -1:]
        assert np.all(np.abs(th.dlogL[:, free] - ref.dlogL) <= RTOL * scale)
        # the dense path with the same pins takes the per-evaluation kernels
        sh_d, zry_d, _ = terms(st, method, False)
        dense = fit_theta(sh_d, zry_d, yry, fixed=fixed)
        np.testing.assert_array_equal(dense.niter, ref.niter)
        close(dense.theta[:, free], ref.theta)


def test_fixed_needs_a_free_component():
    st = design("nested")
    sh, zry, yry = terms(st, "REML", True)
    with pytest.raises(ValueError, match="free"):
        fit_theta(sh, zry, yry, fixed=np.array([True, True]))


def test_structured_constrain_prepares_nothing_and_scores_structured(monkeypatch):
    """No reduced terms (their K = 1 spectral terms are a dense q x q eigendecomposition)
    and no dense score (O(q^3) per feature) on structured terms."""
    st = design("nested")
    sh, zry, yry = terms(st, "REML", True)
    fit = fit_theta(sh, zry, yry)

    def refused(*args, **kwargs):
        raise AssertionError("dense or reduced work on structured terms")

    monkeypatch.setattr(boundary, "reduced_terms", refused)
    monkeypatch.setattr(boundary, "_score_compiled", refused)
    monkeypatch.setattr(boundary, "_score_general", refused)
    out, held = constrain(sh, zry, yry, fit)
    assert held.any()
    assert np.all(out.theta[:, :-1] >= 0)
