"""The compiled K = 2 loop (numerics/compiled_k.py) takes the pseudo-inverse of an
ill-conditioned information matrix itself, by fisher._scoring's rule, instead of leaving
the feature to that loop."""

import numpy as np
from test_paired import paired_stats

from flashmm_dask.numerics import compiled
from flashmm_dask.numerics.compiled_k import fit_k2_batch
from flashmm_dask.numerics.fisher import GINV_LIMIT, _score_compiled, _scoring, prepare


def test_ill_conditioned_steps_equal_the_per_evaluation_loop():
    # no slope variance: a step's information is ill-conditioned (its condition above
    # 1 / GINV_TOL, where the pseudo-inverse drops an eigenvalue) for a feature
    st = paired_stats(n=20000, n_subj=8, m=40, seed=2, slope_sd=0.0)
    sh = prepare(st["XX"], st["ZX"], st["ZZ"], st["n"], st["d"], "REML")
    zry, yry = sh.residualise(st["XY"].T.copy(), st["ZY"].T.copy(), st["Ynorm"])
    s = np.zeros((zry.shape[0], 3))
    s[:, -1] = yry / (sh.n - sh.p)
    args = (sh.k2, zry, yry, s, sh.n, sh.r, 50, 1e-5, compiled.DIVISION_MIN)
    fast = fit_k2_batch(*args, GINV_LIMIT)
    assert fast[6].all()
    # the same loop that inverts every matrix: some feature's path differs
    plain = fit_k2_batch(*args, np.inf)
    assert np.any(fast[0] != plain[0])

    def score(t, rows, final=False):
        return _score_compiled(sh, t, zry[rows], yry[rows], final=final)

    ref = _scoring(score, s.copy(), 50, 1e-5)
    np.testing.assert_array_equal(fast[4], ref.niter)
    for got, name in zip(fast, ("theta", "se_theta", "dlogL", "FIM_theta"), strict=False):
        want = getattr(ref, name)
        if name == "dlogL":  # ~0 at convergence: on the scale of its terms (n / s0)
            assert np.all(np.abs(got - want) <= 1e-10 * sh.n / np.abs(ref.theta[:, -1:]))
        else:
            np.testing.assert_allclose(got, want, rtol=1e-9, err_msg=name)
    np.testing.assert_allclose(fast[5], ref.logdetM0, rtol=1e-9)
