"""The compiled K = 1 terms around the scoring (numerics/spectral_terms.py) against the NumPy
functions they replace, kernel by kernel and through the whole fit of a block."""

from types import SimpleNamespace

import numpy as np
import pytest

from flashmm_dask.model.core import FitOptions, Keep, fit_features
from flashmm_dask.numerics import boundary, fixed, satterthwaite
from flashmm_dask.numerics.fisher import _score_spectral, prepare
from flashmm_dask.numerics.linalg import reciprocal
from flashmm_dask.numerics.satterthwaite import _information_spectral
from flashmm_dask.numerics.spectral_terms import (
    observed_information_batch,
    score_batch,
    shifted_reciprocal,
)

RTOL = 1e-12


def _close(a, b):
    """Equal to RTOL relative to each value, or to RTOL times the largest |value| of the
    same entry over the block (a score at an optimum is a difference of large terms)."""
    a, b = np.asarray(a), np.asarray(b)
    assert np.array_equal(np.isnan(a), np.isnan(b))
    scale = np.nanmax(np.abs(b), axis=0, keepdims=True)
    ok = np.isnan(b) | (np.abs(a - b) <= RTOL * np.maximum(np.abs(b), scale))
    assert ok.all(), np.nanmax(np.abs(a - b) / np.maximum(np.abs(b), scale))


def _design(seed, n=400, q=12, p=3, m=40, diagonal=True):
    """Summary statistics of a random design: Z the indicators of q donors (ZZ diagonal),
    or with one extra column mixed in (ZZ not diagonal); a third of the features without
    donor variance (fits held at the boundary), and two all-zero features."""
    rng = np.random.default_rng(seed)
    donor = rng.integers(0, q, n)
    X = np.column_stack([np.ones(n), rng.normal(size=(n, p - 2)), donor % 2]).astype(float)
    Z = np.zeros((n, q))
    Z[np.arange(n), donor] = 1.0
    if not diagonal:
        Z[:, 0] += 0.3 * Z[:, 1]
    Y = rng.normal(size=(n, m)) + 0.7 * rng.normal(size=(q, m))[donor]
    Y[:, : m // 3] = rng.normal(size=(n, m // 3))
    Y[:, [4, 9]] = 0.0
    return X.T @ X, X.T @ Y, Z.T @ X, Z.T @ Y, Z.T @ Z, np.sum(Y**2, axis=0), n


def _spectral_ns(sh):
    """The terms seen by the NumPy references on z = zry U directly (U = I)."""
    return SimpleNamespace(
        U=np.eye(sh.q), lam=sh.lam, mu=sh.mu, method=sh.method, n=sh.n, p=sh.p, q=sh.q, r=sh.r
    )


def _block(seed, method, diagonal=True, singular=True):
    XX, XY, ZX, ZY, ZZ, Ynorm, n = _design(seed, diagonal=diagonal)
    sh = prepare(XX, ZX, ZZ, n, [ZZ.shape[0]], method)
    keep = Ynorm > 0
    zry, yry = sh.residualise(XY.T[keep], ZY.T[keep], Ynorm[keep])
    z = zry @ sh.U
    rng = np.random.default_rng(seed + 100)
    m = z.shape[0]
    s0 = yry / (n - XX.shape[0]) * rng.uniform(0.5, 1.5, m)
    s1 = s0 * rng.uniform(-0.05, 2.0, m)
    s1[::5] = 0.0  # held at the boundary
    if singular:  # 1 + rho lam about 0 at the largest eigenvalue
        s1[1] = -1.0 / sh.lam.max() * s0[1]
    return sh, z, yry, np.column_stack([s1, s0])


@pytest.mark.parametrize("diagonal", [True, False])
@pytest.mark.parametrize("method", ["REML", "ML"])
def test_observed_information_equals_numpy(method, diagonal):
    sh, z, yry, theta = _block(1, method, diagonal)
    got = observed_information_batch(sh, z, yry, theta)
    with np.errstate(all="ignore"):
        ref = _information_spectral(_spectral_ns(sh), theta, z, yry)
    _close(got, ref)


@pytest.mark.parametrize("final", [True, False])
@pytest.mark.parametrize("method", ["REML", "ML"])
def test_score_equals_numpy(method, final):
    # (no 1 + rho lam near 0: the scoring's sums fuse multiply-adds, NumPy's do not)
    sh, z, yry, theta = _block(2, method, singular=False)
    dl, F, s0p, logdet = score_batch(sh, z, theta, yry, final)
    with np.errstate(all="ignore"):
        ref = _score_spectral(_spectral_ns(sh), theta, z, yry, final=final)
    _close(dl, ref.dl)
    _close(F, ref.F)
    _close(s0p, ref.s0_profiled)
    if final:
        _close(logdet, ref.logdetM0)
    else:
        assert np.isnan(logdet).all()


def test_shifted_reciprocal_is_numpys_to_the_bit():
    rng = np.random.default_rng(3)
    v = np.concatenate([[0.0, 2.0, 4.0], rng.uniform(0, 50, 20)])
    rho = np.concatenate([[-0.5, -0.25, 0.0, np.nan, np.inf], rng.uniform(-1, 5, 30)])
    with np.errstate(all="ignore"):
        base = reciprocal(1.0 + rho[:, None] * v)
        np.testing.assert_array_equal(shifted_reciprocal(rho, v), base)
        np.testing.assert_array_equal(shifted_reciprocal(rho, v, "times_rho"), rho[:, None] * base)
        np.testing.assert_array_equal(shifted_reciprocal(rho, v, "squared"), base**2)


def test_times_v_is_the_product():
    XX, _, ZX, ZY, ZZ, _, n = _design(4)
    sh = prepare(XX, ZX, ZZ, n, [ZZ.shape[0]], "REML")
    assert sh._V_signed_permutation is not None  # ZZ diagonal: V a permutation
    np.testing.assert_array_equal(sh.times_V(ZY.T), ZY.T @ sh.V)
    XX, _, ZX, ZY, ZZ, _, n = _design(4, diagonal=False)
    sh = prepare(XX, ZX, ZZ, n, [ZZ.shape[0]], "REML")
    assert sh._V_signed_permutation is None
    np.testing.assert_array_equal(sh.times_V(ZY.T), ZY.T @ sh.V)


def _numpy_kernels(monkeypatch):
    """Replace the compiled terms by the NumPy functions they were written from."""

    def info(sh, z, yry, theta):
        with np.errstate(all="ignore"):
            return _information_spectral(_spectral_ns(sh), theta, z, yry)

    def score(sh, z, s, yry, final):
        with np.errstate(all="ignore"):
            sc = _score_spectral(_spectral_ns(sh), s, z, yry, final=final)
        return sc.dl, sc.F, sc.s0_profiled, sc.logdetM0

    def weights(rho, v, kind="plain"):
        w = reciprocal(1.0 + rho[:, None] * v)
        return {"plain": w, "times_rho": rho[:, None] * w, "squared": w**2}[kind]

    monkeypatch.setattr(satterthwaite, "observed_information_batch", info)
    monkeypatch.setattr(satterthwaite, "shifted_reciprocal", weights)
    monkeypatch.setattr(boundary, "score_batch", score)
    monkeypatch.setattr(fixed, "shifted_reciprocal", weights)


@pytest.mark.parametrize("diagonal", [True, False])
@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("boundary_df", ["lmertest", "retain"])
def test_fit_features_equal_the_numpy_terms(monkeypatch, method, boundary_df, diagonal):
    """A block fit with Satterthwaite's df and nonnegative variances through the compiled
    terms equals the fit through the NumPy functions they replace (and V' ZY by the
    product), boundary and all-zero features included."""
    XX, XY, ZX, ZY, ZZ, Ynorm, n = _design(5, diagonal=diagonal)
    L = np.array([[0.0], [1.0], [-1.0]])
    options = FitOptions(
        df="satterthwaite",
        nonnegative=True,
        boundary_df=boundary_df,
        n_threads=1,
        keep=Keep(cov=True, fim=True, re=True, jac=True),
        contrasts=L,
    )
    sh = prepare(XX, ZX, ZZ, n, [ZZ.shape[0]], method)
    fast = fit_features(sh, XY, ZY, Ynorm, options)
    assert (fast["status"] == 5).sum() >= 5 and (~fast["fitted"]).sum() == 2
    _numpy_kernels(monkeypatch)
    sh = prepare(XX, ZX, ZZ, n, [ZZ.shape[0]], method)
    sh.__dict__["_V_signed_permutation"] = None  # V' ZY by the product
    ref = fit_features(sh, XY, ZY, Ynorm, options)
    assert fast.keys() == ref.keys()
    for name in fast:
        _close(np.asarray(fast[name], dtype=float), np.asarray(ref[name], dtype=float))


@pytest.mark.parametrize("reml", [True, False])
def test_log_abs_product_is_the_sum_of_logarithms(reml):
    """log |det M0| from products of eigenvalue blocks equals the sum of a logarithm per
    eigenvalue, also where a block's product underflows or overflows, or a factor is 0."""
    from flashmm_dask.numerics.spectral import _log_abs_product, eigen_terms

    rng = np.random.default_rng(5)
    q = 259  # blocks of 8 and a remainder
    lam, mu = rng.uniform(0.0, 300.0, q), rng.uniform(0.0, 400.0, q)
    lam[3] = mu[3] = 2.0  # 1 + rho lam is 0 at rho = -0.5: m0 = 0, log |det M0| = -inf
    for rho in (0.0, 1e-3, 0.37, 5.0, -1e-3, 1e30, 1e40, 1e-200, -0.5):
        terms = [eigen_terms.py_func(rho, lam[k], mu[k], reml)[2] for k in range(q)]
        with np.errstate(divide="ignore"):
            ref = float(np.sum(np.log(np.abs(terms))))
        got = _log_abs_product(rho, lam, mu, reml)
        if np.isinf(ref):
            assert got == ref, rho
        else:
            assert abs(got - ref) <= 1e-13 * max(1.0, abs(ref)), (rho, got, ref)
