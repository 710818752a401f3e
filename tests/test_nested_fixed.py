"""The fixed effects from the nested fit's own terms at theta (ThetaFit.gram, fixed.py's
_fixed_from_gram) equal the dense path's to 1e-10, for every feature: those whose terms
are missing take the per-feature structured solves; a refit at the boundary brings the
terms of its own theta."""

from dataclasses import replace

import numpy as np
import pytest

from flashmm_dask import lmm
from flashmm_dask.numerics.boundary import constrain
from flashmm_dask.numerics.fisher import fit_theta, prepare
from flashmm_dask.numerics.fixed import fixed_effects
from tests.test_boundary_structured import design as boundary_design
from tests.test_structured import RTOL, close, design


def terms(kind, m=24, seed=1, boundary=False):
    st = boundary_design(kind, seed=seed) if boundary else design(kind, m=m, seed=seed)
    sh = prepare(st["XX"], st["ZX"], st["ZZ"], st["n"], st["d"], "REML", structured=True)
    assert sh.nested is not None
    XY, ZY = st["XY"].T.copy(), st["ZY"].T.copy()
    zry, yry = sh.residualise(XY, ZY, st["Ynorm"])
    return st, sh, XY, ZY, zry, yry


def same(fx, ref):
    se = np.sqrt(np.diagonal(ref.cov, axis1=1, axis2=2))
    np.testing.assert_allclose(fx.coef, ref.coef, rtol=0, atol=RTOL * se.max())
    close(fx.se, se)
    close(fx.cov, ref.cov, rtol=1e-9)
    close(fx.FIM_beta, ref.FIM_beta)
    close(fx.logLik, ref.logLik)
    np.testing.assert_allclose(fx.t, ref.t, rtol=0, atol=RTOL * np.abs(ref.t).max())


@pytest.mark.parametrize("kind", ["nested", "nested_three", "nested_large", "nested_first_big"])
def test_fixed_effects_from_the_fit_equal_dense(kind):
    _, sh, XY, ZY, zry, yry = terms(kind)
    th = fit_theta(sh, zry, yry)
    assert th.gram is not None and th.gram.ok.all()
    fx = fixed_effects(sh, XY, ZY, th.theta, th.logdetM0, re=False, gram=th.gram)
    dense = fixed_effects(sh, XY, ZY, th.theta, th.logdetM0, re=False, structure=False)
    same(fx, dense)


def test_features_without_valid_terms_take_the_structured_solves():
    _, sh, XY, ZY, zry, yry = terms("nested_three")
    th = fit_theta(sh, zry, yry)
    gram = th.gram
    assert gram is not None
    gram.ok[::3] = False
    gram.C[::3] = np.nan  # never read
    gram.a[::3] = np.nan
    fx = fixed_effects(sh, XY, ZY, th.theta, th.logdetM0, re=False, gram=gram)
    dense = fixed_effects(sh, XY, ZY, th.theta, th.logdetM0, re=False, structure=False)
    same(fx, dense)


def test_boundary_refit_does_not_reuse_the_terms_of_the_unconstrained_theta():
    # features without a component's variance: some end with a negative component
    _, sh, XY, ZY, zry, yry = terms("nested_three", boundary=True)
    th = fit_theta(sh, zry, yry)
    held_fit, held = constrain(sh, zry, yry, th)
    refitted = held.any(axis=1)
    assert refitted.any() and not refitted.all()
    gram = held_fit.gram
    assert gram is not None and th.gram is not None
    np.testing.assert_array_equal(gram.ok[~refitted], th.gram.ok[~refitted])
    # the refitted rows' terms are those of their new theta, not the unconstrained one's
    assert sh.nested is not None and sh.structure is not None
    for j in np.flatnonzero(refitted & gram.ok):
        s = held_fit.theta[j]
        D = (s[sh.structure.comp] / s[-1])[None]
        C, a, ok = sh.nested.md_gram(D, zry[j, sh.structure.perm])
        assert ok
        close(gram.C[j], C, rtol=1e-9)
        np.testing.assert_allclose(gram.a[j], a, rtol=0, atol=1e-9 * np.abs(a).max())
        assert not np.allclose(gram.C[j], th.gram.C[j], rtol=1e-6, atol=0)
    fx = fixed_effects(sh, XY, ZY, held_fit.theta, held_fit.logdetM0, re=False, gram=gram)
    dense = fixed_effects(sh, XY, ZY, held_fit.theta, held_fit.logdetM0, re=False, structure=False)
    same(fx, dense)


def test_boundary_refits_keep_their_own_terms_and_equal_dense():
    """The pinned refit at the boundary ends with an evaluation at the refitted theta: its
    terms are kept (no per-feature solves for those rows) and give the dense path's fixed
    effects to 1e-10."""
    _, sh, XY, ZY, zry, yry = terms("nested_three", boundary=True)
    held_fit, held = constrain(sh, zry, yry, fit_theta(sh, zry, yry))
    refitted = held.any(axis=1)
    kept = refitted & ~held[:, :-1].all(axis=1)  # a random component left: a nested refit
    assert kept.any()
    gram = held_fit.gram
    assert gram is not None and gram.ok[kept].all()
    rows = np.flatnonzero(refitted)
    only = replace(gram, C=gram.C[rows], a=gram.a[rows], ok=gram.ok[rows])
    theta, logdet = held_fit.theta[rows], held_fit.logdetM0[rows]
    fx = fixed_effects(sh, XY[rows], ZY[rows], theta, logdet, re=False, gram=only)
    dense = fixed_effects(sh, XY[rows], ZY[rows], theta, logdet, re=False, structure=False)
    same(fx, dense)


def test_lmm_without_blups_equals_lmm_with_them():
    """lmm takes the fit's terms without ``output_re`` and the per-feature solves with it."""
    st = design("nested_large", m=30)
    a = lmm(**st, n_threads=2, output_fim=True)
    b = lmm(**st, n_threads=2, output_fim=True, output_re=True)
    np.testing.assert_array_equal(a.theta, b.theta)
    np.testing.assert_allclose(a.coef, b.coef, rtol=0, atol=RTOL * b.se.max())
    close(a.se, b.se)
    close(a.cov, b.cov, rtol=1e-9)
    close(a.FIM_beta, b.FIM_beta)
    close(a.p, b.p, rtol=1e-8)
