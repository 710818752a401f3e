"""The paired structure of Z'Z (numerics/paired.py: intercept and slope of one factor): found
from ZZ alone, and the fixed effects through it equal the dense algebra."""

import numpy as np
import pytest

from flashmm_dask.numerics.fisher import fit_theta, prepare
from flashmm_dask.numerics.fixed import fixed_effects
from flashmm_dask.numerics.paired import detect, md_parts


def paired_stats(n=3000, n_subj=12, m=12, seed=5, lonely=False, slope_sd=0.5):
    """Subject indicators and subject x slope columns (K = 2, Z_1'Z_2 diagonal); with
    ``lonely`` the last subject has no slope column (a column left alone)."""
    rng = np.random.default_rng(seed)
    subject = rng.integers(0, n_subj, n)
    X = np.column_stack([np.ones(n), rng.normal(size=n), rng.integers(0, 3, n)])
    Z1 = np.eye(n_subj)[subject]
    Z2 = Z1 * rng.uniform(0.5, 2.0, n)[:, None]
    if lonely:
        Z2 = Z2[:, :-1]
    Z = np.column_stack([Z1, Z2])
    b = rng.normal(0, 0.5, (Z.shape[1], m))
    b[Z1.shape[1] :] *= slope_sd / 0.5
    Y = X @ rng.normal(size=(X.shape[1], m)) + Z @ b + rng.normal(size=(n, m))
    return dict(
        XX=X.T @ X,
        ZX=Z.T @ X,
        ZZ=Z.T @ Z,
        XY=X.T @ Y,
        ZY=Z.T @ Y,
        Ynorm=np.sum(Y**2, axis=0),
        n=n,
        d=[Z1.shape[1], Z2.shape[1]],
    )


def test_detect_finds_pairs_and_only_them():
    st = paired_stats()
    pairs = detect(st["ZZ"], st["d"], st["ZX"])
    assert pairs is not None
    np.testing.assert_array_equal(pairs.first, np.arange(12))
    np.testing.assert_array_equal(pairs.second, np.arange(12, 24))
    lonely = paired_stats(lonely=True)
    assert detect(lonely["ZZ"], lonely["d"], lonely["ZX"]).first.size == 11
    ZZ = st["ZZ"].copy()
    ZZ[0, 13] = ZZ[13, 0] = 1.0  # a subject coupled to two slopes: not paired
    assert detect(ZZ, st["d"], st["ZX"]) is None
    ZZ = st["ZZ"].copy()
    ZZ[0, 1] = ZZ[1, 0] = 1.0  # a block that is not diagonal
    assert detect(ZZ, st["d"], st["ZX"]) is None
    assert detect(st["ZZ"][:12, :12], [12], st["ZX"][:12]) is None  # K = 1


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("lonely", [False, True])
def test_paired_fixed_effects_equal_dense(method, lonely):
    st = paired_stats(lonely=lonely)
    sh = prepare(st["XX"], st["ZX"], st["ZZ"], st["n"], st["d"], method)
    assert sh.pairs is not None
    XY, ZY = st["XY"].T.copy(), st["ZY"].T.copy()
    zry, yry = sh.residualise(XY, ZY, st["Ynorm"])
    th = fit_theta(sh, zry, yry)
    theta = th.theta.copy()
    theta[0, 0] = 0.0  # a zero ratio
    theta[1, 1] = -0.2 * abs(theta[1, 1])  # a negative one
    fast = fixed_effects(sh, XY, ZY, theta, th.logdetM0)
    ref = fixed_effects(sh, XY, ZY, theta, th.logdetM0, structure=False)
    for name in ("coef", "cov", "FIM_beta", "RE", "logLik", "se", "t"):
        a, b = getattr(fast, name), getattr(ref, name)
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * np.abs(b).max(), err_msg=name)


def test_singular_block_takes_the_dense_path():
    """A ratio that makes a pair's block of D ZZ + I singular: that feature is refitted by
    the dense algebra (its pseudo-inverse), the others keep the paired results."""
    st = paired_stats()
    sh = prepare(st["XX"], st["ZX"], st["ZZ"], st["n"], st["d"], "REML")
    XY, ZY = st["XY"].T.copy(), st["ZY"].T.copy()
    zry, yry = sh.residualise(XY, ZY, st["Ynorm"])
    th = fit_theta(sh, zry, yry)
    theta = th.theta.copy()
    theta[2, 0] = -theta[2, 2] / sh.ZZ[0, 0]  # 1 + x z_0 = 0 (and x y n^2 = 0 with y = 0)
    theta[2, 1] = 0.0
    assert np.array_equal(md_parts(sh.pairs, theta)[2], np.arange(12) != 2)
    fast = fixed_effects(sh, XY, ZY, theta, th.logdetM0)
    ref = fixed_effects(sh, XY, ZY, theta, th.logdetM0, structure=False)
    for name in ("coef", "cov", "RE", "se"):
        a, b = getattr(fast, name), getattr(ref, name)
        assert np.all(np.isfinite(a[2]))
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * np.abs(b).max(), err_msg=name)
