"""The compiled per-feature kernels equal the batched NumPy algebra they replace, and hand
back (ok = False) exactly the matrices that need the pseudo-inverse."""

import numpy as np
import pytest
from reference_cases import load_case, summary_args

from flashmm_dask import lmm
from flashmm_dask.numerics import compiled, compiled_dense
from flashmm_dask.numerics.fisher import fit_theta, prepare
from flashmm_dask.numerics.linalg import GINV_LIMIT, GINV_TOL, inv_or_pinv, inv_shifted, pinv_sym

THETA_FIELDS = ("theta", "se_theta", "FIM_theta", "logdetM0")


def spd(rng, m, k, shift=0.1):
    B = rng.normal(size=(m, k, k))
    return B @ np.swapaxes(B, 1, 2) + shift * np.eye(k)


def test_inv_shifted_batch_equals_lu_for_every_sign_pattern():
    rng = np.random.default_rng(0)
    q = 12
    B = rng.normal(size=(q, 2 * q))
    A = B @ B.T
    D = rng.uniform(0.01, 3.0, size=(40, q))
    D[10:20] *= np.where(rng.random((10, q)) < 0.5, -1.0, 1.0)  # mixed signs
    D[20:25] = 0.0  # the first iteration: M = I
    D[25:30, : q // 2] = 0.0  # some zeros
    D[30:35] = -D[30:35]  # all negative
    out, ok = compiled.inv_shifted_batch(A, D)
    assert ok.all()
    expected = np.linalg.inv(D[:, :, None] * A + np.eye(q))
    np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(out[20:25], np.broadcast_to(np.eye(q), (5, q, q)))


def test_inv_shifted_flags_singular_and_falls_back_to_pinv():
    q = 3
    A = np.eye(q)
    D = np.array([[-1.0, 2.0, 2.0], [1.0, 1.0, 1.0]])  # D A + I singular in row 0
    _, ok = compiled.inv_shifted_batch(A, D)
    assert ok.tolist() == [False, True]
    full = inv_shifted(A, D)
    np.testing.assert_allclose(full[0], np.linalg.pinv(np.diag([0.0, 3.0, 3.0]), rcond=GINV_TOL))
    np.testing.assert_allclose(full[1], inv_or_pinv(D[1:, :, None] * A + np.eye(q))[0])


def test_inverse_checked_batch_refuses_singular_ill_conditioned_and_nan():
    rng = np.random.default_rng(1)
    A = spd(rng, 6, 5)
    A[1] = np.diag([1.0, 1.0, 1.0, 1.0, 0.0])  # singular
    A[2] = np.diag([1.0, 1.0, 1.0, 1.0, 1e-12])  # cond 1e12 > 1 / GINV_TOL
    A[3, 0, 0] = np.nan
    out, ok = compiled_dense.inverse_checked_batch(A, 0.5 / GINV_TOL)
    assert ok.tolist() == [True, False, False, False, True, True]
    np.testing.assert_allclose(out[ok], np.linalg.inv(A[ok]), rtol=1e-10)
    np.testing.assert_array_equal(out[ok], np.swapaxes(out[ok], 1, 2))  # symmetrised


def _with_eigenvalues(rng, values):
    """A symmetric matrix with the given eigenvalues in a random orthonormal basis."""
    Q, _ = np.linalg.qr(rng.normal(size=(len(values), len(values))))
    return (Q * np.asarray(values)) @ Q.T


def test_checked_inverse_proves_a_dominated_condition_below_ginvs_cut_off():
    # a fixed-effect C with one covariate on its own scale: one eigenvalue dominates, its
    # condition 4e7 is below ginv's cut-off 1 / GINV_TOL (6.7e7), so ginv is the inverse;
    # the bound of 1-norms overstates it (beyond the old limit 0.5 / GINV_TOL for all, and
    # beyond this one for most), the Frobenius norms do not
    rng = np.random.default_rng(3)
    lam = np.array([4e7, 3.0, 2.0, 1.5, 1.0])
    A = np.stack([_with_eigenvalues(rng, lam) for _ in range(20)])
    Ai = np.linalg.inv(A)
    one = np.abs(A).sum(1).max(1) * np.abs(Ai).sum(1).max(1)
    assert (one > 0.5 / GINV_TOL).all() and (one > GINV_LIMIT).sum() >= 10
    out, ok = compiled_dense.inverse_checked_batch(A, GINV_LIMIT)
    assert ok.all()
    np.testing.assert_allclose(out, np.linalg.pinv(A, rcond=GINV_TOL, hermitian=True), rtol=1e-6)
    # beyond the cut-off ginv drops the smallest eigenvalue: never taken as the inverse
    lam[0] = 1.2 / GINV_TOL
    B = np.stack([_with_eigenvalues(rng, lam) for _ in range(20)])
    _, ok = compiled_dense.inverse_checked_batch(B, GINV_LIMIT)
    assert not ok.any()
    got = pinv_sym(B)
    np.testing.assert_allclose(got, np.linalg.pinv(B, rcond=GINV_TOL, hermitian=True), rtol=1e-6)
    assert np.abs(got - np.linalg.inv(B)).max() > 0.5  # the dropped 1 / lambda_min


def test_pinv_sym_is_the_moore_penrose_inverse_either_way():
    rng = np.random.default_rng(2)
    A = spd(rng, 8, 4)
    A[0] = np.diag([2.0, 1.0, 1e-12, 0.0])  # pseudo-inverse: the tiny value is cut off
    A[1] = -A[1]  # negative definite: still an inverse
    A[2, 1, 1] = np.nan
    got = pinv_sym(A)
    for k in (0, 1, 3, 4, 5, 6, 7):
        np.testing.assert_allclose(got[k], np.linalg.pinv(A[k], rcond=GINV_TOL, hermitian=True))
    assert np.isnan(got[2]).all()
    # 2 x 2 (closed form) and a leading shape of two axes
    B = spd(rng, 6, 2).reshape(2, 3, 2, 2)
    np.testing.assert_allclose(pinv_sym(B), np.linalg.inv(B), rtol=1e-10)


def _theta_inputs(name, **kw):
    case = load_case(name)
    a = summary_args(case, labelled=False)
    sh = prepare(a["XX"], a["ZX"], a["ZZ"], a["n"], a["d"], case["fit"]["method"])
    zry, yry = sh.residualise(a["XY"].T.copy(), a["ZY"].T.copy(), a["Ynorm"])
    keep = yry > 0
    return sh, zry[keep], yry[keep]


@pytest.mark.parametrize(
    "name", ["doc_example_reml", "doc_example_ml", "simu_reml_k1", "simu_ml_k1", "simu_reml_k2"]
)
@pytest.mark.parametrize("max_iter", [50, 2, 1, 0])
def test_compiled_scoring_equals_numpy(name, max_iter):
    sh, zry, yry = _theta_inputs(name)
    fast = fit_theta(sh, zry, yry, max_iter=max_iter)
    ref = fit_theta(sh, zry, yry, max_iter=max_iter, compiled_kernels=False)
    np.testing.assert_array_equal(fast.niter, ref.niter)
    # features still iterating after many steps amplify rounding: compare the converged
    # ones, or all after 2 steps
    done = (np.max(np.abs(ref.dlogL), axis=1) <= 1e-5) | (max_iter <= 2)
    assert done.sum() >= 0.9 * done.size
    for attr in THETA_FIELDS:
        np.testing.assert_allclose(getattr(fast, attr)[done], getattr(ref, attr)[done], rtol=1e-9)
    np.testing.assert_allclose(fast.dlogL[done], ref.dlogL[done], rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_compiled_general_scoring_with_negative_components(method):
    """K = 2 from a start with one negative variance ratio (indefinite D A + I), and ML."""
    sh, zry, yry = _theta_inputs("simu_reml_k2")
    sh = prepare(sh.XX, sh.ZX, sh.ZZ, sh.n, sh.d, method)
    m = zry.shape[0]
    theta0 = np.column_stack([np.full(m, -0.01), np.full(m, 0.05), yry / (sh.n - sh.p)])
    fast = fit_theta(sh, zry, yry, theta0=theta0, max_iter=3)
    ref = fit_theta(sh, zry, yry, theta0=theta0, max_iter=3, compiled_kernels=False)
    np.testing.assert_array_equal(fast.niter, ref.niter)
    for attr in (*THETA_FIELDS, "dlogL"):
        np.testing.assert_allclose(getattr(fast, attr), getattr(ref, attr), rtol=1e-8)


def test_ill_conditioned_information_takes_the_pseudo_inverse_path():
    """A feature whose K = 1 information matrix is singular (y has no subject signal and
    theta0 makes F rank one) is refitted by the NumPy path, as the rest are not."""
    sh, zry, yry = _theta_inputs("simu_reml_k1")
    theta0 = np.column_stack([np.zeros(len(yry)), yry / (sh.n - sh.p)])
    theta0[0] = [1e300, 1e-300]  # overflows: F is not invertible in closed form
    fast = fit_theta(sh, zry, yry, theta0=theta0, max_iter=3)
    ref = fit_theta(sh, zry, yry, theta0=theta0, max_iter=3, compiled_kernels=False)
    np.testing.assert_array_equal(fast.niter, ref.niter)
    np.testing.assert_allclose(fast.theta, ref.theta, rtol=1e-9, equal_nan=True)


@pytest.mark.parametrize("name", ["simu_reml_k1", "simu_reml_k2"])
def test_threads_give_the_same_fit(name):
    case = load_case(name)
    args = summary_args(case, labelled=False)
    one = lmm(**args, method=case["fit"]["method"], n_threads=1, output_fim=True)
    two = lmm(**args, method=case["fit"]["method"], n_threads=2, output_fim=True)
    for attr in ("coef", "se", "p", "theta", "se_theta", "niter", "cov", "FIM_theta"):
        np.testing.assert_array_equal(getattr(one, attr), getattr(two, attr))
