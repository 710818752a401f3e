"""The compiled Fisher scoring of the nested structured path (numerics/compiled_nested.py)
equals the loop of fisher._scoring on the structured scores (the per-column reference
algebra) to 1e-10 with the same iterations, and hands the features it cannot fit to that
loop."""

import numpy as np
import pytest
from test_structured import design

from flashmm_dask.numerics import fisher
from flashmm_dask.numerics.fisher import GINV_LIMIT, fit_theta, prepare

RTOL = 1e-10


def terms(kind, m):
    st = design(kind, m=m)
    sh = prepare(st["XX"], st["ZX"], st["ZZ"], st["n"], st["d"], "REML", structured=True)
    assert sh.nested is not None
    zry, yry = sh.residualise(st["XY"].T.copy(), st["ZY"].T.copy(), st["Ynorm"])
    return sh, zry, yry


def reference(sh, zry, yry, theta0, free=None):
    """fisher._scoring on fisher._score_structured (one feature at a time in NumPy and the
    column-by-column kernels)."""
    zp = zry[:, sh.structure.perm]

    def score(s, rows, final=False):
        return fisher._score_structured(sh, s, zp[rows], yry[rows], final=final)

    with fisher.structured.one_blas_thread():
        return fisher._scoring(score, np.array(theta0, dtype=float), 50, 1e-5, free)


def start(sh, yry):
    s = np.zeros((yry.size, sh.K + 1))
    s[:, -1] = yry / (sh.n - sh.p)
    return s


@pytest.mark.parametrize("kind", ["nested", "nested_large", "nested_first_big", "nested_three"])
def test_compiled_fit_equals_the_scoring_loop(kind):
    sh, zry, yry = terms(kind, m=8)
    fit = fit_theta(sh, zry, yry)
    ref = reference(sh, zry, yry, start(sh, yry))
    np.testing.assert_array_equal(fit.niter, ref.niter)
    for name in ("theta", "se_theta", "FIM_theta", "logdetM0"):
        np.testing.assert_allclose(getattr(fit, name), getattr(ref, name), rtol=RTOL, atol=0)
    # the final score: a difference of terms of the information's size
    scale = np.abs(np.diagonal(ref.FIM_theta, axis1=1, axis2=2)) * np.abs(ref.theta)
    assert np.all(np.abs(fit.dlogL - ref.dlogL) <= RTOL * scale)


@pytest.mark.parametrize("kind", ["nested", "nested_three"])
def test_pinned_components_in_the_compiled_fit_equal_the_scoring_loop(kind, monkeypatch):
    """With components held at zero (the non-negative refit, fisher.fit_theta's fixed) the
    compiled loop updates the others by their own score and information, as _scoring's
    free does: the same iterations, theta, se_theta (NaN where held) and information."""
    sh, zry, yry = terms(kind, m=8)
    for held in range(sh.K):
        fixed = np.zeros(sh.K, dtype=bool)
        fixed[held] = True
        free = np.append(~fixed, True)
        s = start(sh, yry)
        s[:, held] = 0.0
        ref = reference(sh, zry, yry, s, free)
        calls: list = []
        monkeypatch.setattr(fisher, "_scoring", lambda *a, _calls=calls, **k: _calls.append(a))
        fit = fit_theta(sh, zry, yry, fixed=fixed)
        monkeypatch.undo()
        assert not calls  # every feature fitted by the compiled loop
        np.testing.assert_array_equal(fit.niter, ref.niter)
        assert np.all(fit.theta[:, held] == 0.0) and np.isnan(fit.se_theta[:, held]).all()
        for name in ("theta", "se_theta", "FIM_theta", "logdetM0"):
            np.testing.assert_allclose(
                getattr(fit, name), getattr(ref, name), rtol=RTOL, atol=0, err_msg=name
            )
        # the free components' final score: a difference of terms of the information's
        # size; the held one's is the full model's score at zero, far from zero itself
        scale = np.abs(np.diagonal(ref.FIM_theta, axis1=1, axis2=2)) * np.abs(ref.theta)
        assert np.all(np.abs(fit.dlogL - ref.dlogL)[:, free] <= RTOL * scale[:, free])
        np.testing.assert_allclose(fit.dlogL[:, held], ref.dlogL[:, held], rtol=RTOL, atol=0)


def test_features_the_kernel_cannot_fit_take_the_scoring_loop():
    """A start the kernel cannot evaluate (NaN) or one its information matrices are not
    provably well conditioned at is reported, and that feature gets the loop's result;
    the others keep theirs."""
    sh, zry, yry = terms("nested_three", m=5)
    s = start(sh, yry)
    s[1, 0] = np.nan
    s[3, 0] = 1e12  # a huge ratio: the information's condition beyond the limit
    ok = sh.nested.fit(zry[:, sh.structure.perm], yry, s, sh.n, sh.r, 50, 1e-5, GINV_LIMIT)[-1]
    assert not ok[1] and not ok[3] and ok[[0, 2, 4]].all()
    fit = fit_theta(sh, zry, yry, theta0=s)
    good = fit_theta(sh, zry[[0, 2, 4]], yry[[0, 2, 4]], theta0=s[[0, 2, 4]])
    np.testing.assert_array_equal(fit.theta[[0, 2, 4]], good.theta)
    ref = reference(sh, zry[[1, 3]], yry[[1, 3]], s[[1, 3]])
    np.testing.assert_array_equal(fit.niter[[1, 3]], ref.niter)
    np.testing.assert_array_equal(fit.theta[[1, 3]], ref.theta)
    np.testing.assert_array_equal(fit.FIM_theta[[1, 3]], ref.FIM_theta)
