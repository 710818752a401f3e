"""The compiled K = 2 kernel (numerics/compiled_k.py: the Schur complement in the basis of
the eigenvectors of the diagonal blocks) equals the NumPy algebra of the dense path, and a
feature's fit does not depend on the features that share its block."""

import numpy as np
import pytest

from flashmm_dask.numerics.compiled_k import rotation
from flashmm_dask.numerics.fisher import fit_theta, prepare

THETA_FIELDS = ("theta", "se_theta", "FIM_theta", "logdetM0")


def k2_design(d=(7, 12), n=1500, m=16, seed=3):
    """Summary statistics with two dense random components (no diagonal block)."""
    rng = np.random.default_rng(seed)
    X = np.column_stack([np.ones(n), rng.normal(size=n), rng.integers(0, 2, n)])
    Zs = [rng.normal(size=(n, k)) for k in d]
    Z = np.column_stack(Zs)
    Y = (X @ rng.normal(size=(X.shape[1], m))).T + rng.normal(size=(m, n))
    for z in Zs:
        Y += (z @ rng.normal(0, 0.4, (z.shape[1], m))).T
    return dict(
        XX=X.T @ X,
        ZX=Z.T @ X,
        ZZ=Z.T @ Z,
        XY=X.T @ Y.T,
        ZY=Z.T @ Y.T,
        Ynorm=np.sum(Y**2, axis=1),
        n=n,
        d=list(d),
    )


def inputs(method, d=(7, 12)):
    st = k2_design(d)
    sh = prepare(st["XX"], st["ZX"], st["ZZ"], st["n"], st["d"], method)
    assert sh.path == "dense"
    zry, yry = sh.residualise(st["XY"].T.copy(), st["ZY"].T.copy(), st["Ynorm"])
    return sh, zry, yry


def test_rotation_keeps_the_matrix():
    rng = np.random.default_rng(0)
    B = rng.normal(size=(30, 9))
    A = B.T @ B
    idx1, idx2 = np.arange(4, 9), np.arange(4)
    V1, V2, l1, l2, C = rotation(A, idx1, idx2)
    V = np.zeros((9, 9))
    V[np.ix_(idx1, np.arange(5))] = V1
    V[np.ix_(idx2, np.arange(5, 9))] = V2
    L = np.block([[np.diag(l1), C], [C.T, np.diag(l2)]])
    np.testing.assert_allclose(V @ L @ V.T, A, atol=1e-12 * np.abs(A).max())


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("d", [(7, 12), (12, 7), (9, 9)])
def test_k2_kernel_equals_numpy(method, d):
    sh, zry, yry = inputs(method, d)
    fast = fit_theta(sh, zry, yry)
    ref = fit_theta(sh, zry, yry, compiled_kernels=False)
    np.testing.assert_array_equal(fast.niter, ref.niter)
    assert np.all(fast.niter < 50)
    for attr in THETA_FIELDS:
        np.testing.assert_allclose(getattr(fast, attr), getattr(ref, attr), rtol=1e-9)


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_k2_kernel_from_zero_tiny_and_negative_starts(method):
    """A zero ratio, a ratio too small for W = (I - M0) / D (the product path) and a
    negative one (an indefinite Schur complement)."""
    sh, zry, yry = inputs(method)
    m = zry.shape[0]
    s0 = yry / (sh.n - sh.p)
    for t1, t2 in ((0.0, 0.05), (1e-9, 0.02), (-0.01, 0.05)):
        theta0 = np.column_stack([np.full(m, t1) * s0, np.full(m, t2) * s0, s0])
        fast = fit_theta(sh, zry, yry, theta0=theta0, max_iter=3)
        ref = fit_theta(sh, zry, yry, theta0=theta0, max_iter=3, compiled_kernels=False)
        np.testing.assert_array_equal(fast.niter, ref.niter)
        for attr in THETA_FIELDS:
            np.testing.assert_allclose(getattr(fast, attr), getattr(ref, attr), rtol=1e-8)
        # dlogL is a difference of terms of size ~ n / s0: judged against that scale
        scale = sh.n / ref.theta[:, -1:]
        assert np.all(np.abs(fast.dlogL - ref.dlogL) <= 1e-10 * scale)


def test_k2_block_composition_does_not_change_a_feature():
    sh, zry, yry = inputs("REML")
    whole = fit_theta(sh, zry, yry)
    parts = [fit_theta(sh, zry[i : i + 5], yry[i : i + 5]) for i in range(0, zry.shape[0], 5)]
    for attr in ("theta", "FIM_theta", "niter"):
        np.testing.assert_array_equal(
            getattr(whole, attr), np.concatenate([getattr(p, attr) for p in parts])
        )


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("d", [(7, 12), (12, 7)])
def test_k2_score_equals_numpy_at_given_ratios(method, d):
    """One evaluation of the kernel (score, information, profiled s0, log |det M0|) against
    the NumPy algebra, at ratios of both signs, zero, tiny (T S^-1 by the product) and
    large, on either component."""
    from flashmm_dask.numerics.fisher import _score_compiled, _score_general

    sh, zry, yry = inputs(method, d)
    s0 = yry / (sh.n - sh.p)
    m = zry.shape[0]
    for r1, r2 in ((0.0, 0.0), (1e-9, 0.3), (0.3, 1e-9), (-0.002, 0.05), (2.0, 5.0)):
        s = np.column_stack([np.full(m, r1) * s0, np.full(m, r2) * s0, s0])
        fast = _score_compiled(sh, s, zry, yry, final=True)
        ref = _score_general(sh, s, zry, yry, final=True)
        scale = sh.n / s0[:, None]
        assert np.all(np.abs(fast.dl - ref.dl) <= 1e-10 * scale)
        for attr in ("F", "s0_profiled", "logdetM0"):
            np.testing.assert_allclose(getattr(fast, attr), getattr(ref, attr), rtol=1e-9)


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("max_iter", [0, 1, 50])
def test_k2_fit_kernel_equals_the_per_evaluation_loop(method, max_iter):
    """The compiled loop (fisher._fit_k2) against fisher._scoring over the per-evaluation
    kernel, on a block with a feature the kernel cannot fit (zero residual: NaN ratios),
    which takes that loop."""
    from flashmm_dask.numerics.fisher import _score_compiled, _scoring

    sh, zry, yry = inputs(method)
    zry, yry = zry.copy(), yry.copy()
    zry[3], yry[3] = 0.0, 0.0
    s = np.zeros((zry.shape[0], 3))
    s[:, -1] = yry / (sh.n - sh.p)

    def score(t, rows, final=False):
        return _score_compiled(sh, t, zry[rows], yry[rows], final=final)

    ref = _scoring(score, s.copy(), max_iter, 1e-5)
    fast = fit_theta(sh, zry, yry, max_iter=max_iter)
    np.testing.assert_array_equal(fast.niter, ref.niter)
    for attr in ("theta", "se_theta", "FIM_theta", "logdetM0"):
        np.testing.assert_allclose(getattr(fast, attr), getattr(ref, attr), rtol=1e-9)
    # dlogL, near zero at convergence, against the scale of its terms (n / s0)
    diff = np.abs(fast.dlogL - ref.dlogL)
    both_nan = np.isnan(fast.dlogL) & np.isnan(ref.dlogL)
    assert np.all((diff <= 1e-10 * sh.n / np.abs(ref.theta[:, -1:])) | both_nan)
    assert both_nan[3].all() and not both_nan[[0, 1, 2, 4]].any()


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_k2_score_where_the_schur_complement_is_indefinite(method):
    """A large negative ratio makes I + b T indefinite: its inverse without pivot search
    fails at a pivot <= 0 and the kernel inverts it with the search (ok, no NumPy
    fallback), equal to the NumPy algebra."""
    from flashmm_dask.numerics import compiled, compiled_k
    from flashmm_dask.numerics.fisher import _score_general

    sh, zry, yry = inputs(method)
    s0 = yry / (sh.n - sh.p)
    m = zry.shape[0]
    for r1, r2 in ((0.3, -5.0), (-5.0, 0.3), (-0.5, -0.7)):
        s = np.column_stack([np.full(m, r1) * s0, np.full(m, r2) * s0, s0])
        dl, F, s0p, logdet, ok = compiled_k.score_k2_batch(
            sh.k2, s, zry, yry, sh.n, sh.r, True, compiled.DIVISION_MIN
        )
        assert ok.all()
        ref = _score_general(sh, s, zry, yry, final=True)
        assert np.all(np.abs(dl - ref.dl) <= 1e-9 * sh.n / s0[:, None])
        np.testing.assert_allclose(F, ref.F, rtol=1e-8)
        np.testing.assert_allclose(s0p, ref.s0_profiled, rtol=1e-9)
        np.testing.assert_allclose(logdet, ref.logdetM0, rtol=1e-9)
