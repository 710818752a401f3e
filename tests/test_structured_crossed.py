"""The kernels of the structured path with a dense Schur complement
(numerics/structured_crossed.py) against the dense products they replace."""

import itertools

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse

from flashmm_dask.numerics import structured_crossed as crossed


def crossed_N(qb=60, qs=25, seed=0):
    """A coupling block of crossed factors: rows with 0 to 9 non-zero counts."""
    rng = np.random.default_rng(seed)
    N = np.zeros((qb, qs))
    for a in range(qb):
        cols = rng.choice(qs, size=rng.integers(0, 10), replace=False)
        N[a, cols] = rng.integers(1, 4, cols.size)
    return scipy.sparse.csr_array(N)


def spd(n, seed=1):
    A = np.random.default_rng(seed).normal(size=(n, n))
    return A @ A.T + n * np.eye(n)


@pytest.mark.parametrize("n", [1, 7, 64, 65, 150, 377])
def test_cholesky_inverse_equals_the_inverse(n):
    S = spd(n)
    Si, logdet = crossed.cholesky_inverse(S)
    assert Si.flags.c_contiguous
    np.testing.assert_array_equal(Si, Si.T)
    np.testing.assert_allclose(Si, np.linalg.inv(S), rtol=1e-10, atol=1e-13 / n)
    np.testing.assert_allclose(logdet, np.linalg.slogdet(S)[1], rtol=1e-12)
    x = np.random.default_rng(2).normal(size=(n, 3))
    R = crossed.cholesky(S)
    np.testing.assert_allclose(crossed.cholesky_solve(R, x), np.linalg.solve(S, x), rtol=1e-10)


def test_upper_inverse_by_halves_equals_dtrtri():
    R = scipy.linalg.cholesky(spd(200))
    out = np.asfortranarray(R.copy())
    crossed._upper_inverse(out)
    np.testing.assert_allclose(out, scipy.linalg.lapack.dtrtri(R, lower=0)[0], atol=1e-15)
    np.testing.assert_array_equal(np.tril(out, -1), 0.0)


def test_cholesky_of_an_indefinite_matrix_is_none():
    S = spd(80)
    S[5, 5] = -1.0
    assert crossed.cholesky(S) is None
    assert crossed.cholesky_inverse(S) is None


def test_schur_equals_the_dense_product():
    N = crossed_N()
    rng = np.random.default_rng(4)
    qs = N.shape[1]
    Zs = np.diag(rng.uniform(1, 5, qs))
    w1, ds = rng.uniform(0.1, 1, N.shape[0]), rng.uniform(0.2, 2, qs)
    U, S = np.empty((qs, qs)), np.empty((qs, qs))
    umax = crossed.schur_into(N, w1, Zs, ds, U, S)
    Nd = N.toarray()
    np.testing.assert_allclose(U, Zs - Nd.T @ (w1[:, None] * Nd), rtol=1e-13, atol=1e-13)
    assert umax == np.max(np.abs(U))
    w1[np.flatnonzero(np.diff(N.indptr))[0]] = np.nan  # a row of N with non-zeros: NaN in U
    assert np.isnan(crossed.schur_into(N, w1, Zs, ds, U, S))
    np.testing.assert_array_equal(U, U.T)  # exactly: the Cholesky path reads one triangle
    np.testing.assert_allclose(S, np.eye(qs) + ds[:, None] * U, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("division", [True, False])
def test_w0_sums_equal_the_dense_traces(division):
    """diag(N S^-1 Ds N'), tr((V S^-1 Ds)^2), the block sums of squares of Pb^-1 N S^-1 and
    of U S^-1 by component (two small components of 10 and 15 columns)."""
    N = crossed_N()
    rng = np.random.default_rng(5)
    qb, qs = N.shape
    edges = np.array([0, 10, qs])
    ds = np.repeat([0.4, 1.3], np.diff(edges))
    Zs = np.diag(rng.uniform(1, 5, qs))
    w1, p2 = rng.uniform(0.1, 1, qb), rng.uniform(0.1, 1, qb)
    U, S = np.empty((qs, qs)), np.empty((qs, qs))
    crossed.schur_into(N, w1, Zs, ds, U, S)
    Si = np.linalg.inv(S)
    US = U @ Si
    diag, xdx, qbsum, t, Q = crossed.w0_sums(
        N, p2, Si, None if division else US, ds, edges, division
    )
    Nd = N.toarray()
    X = (Nd.T @ (p2[:, None] * Nd)) @ Si
    XD = X * ds[None, :]
    Y2 = p2[:, None] * (Nd @ Si) ** 2
    US_ref = (np.eye(qs) - Si) / ds[:, None]
    close = dict(rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(diag, np.diag(Nd @ (Si * ds[None, :]) @ Nd.T), **close)
    np.testing.assert_allclose(xdx, np.trace(XD @ XD), **close)
    blocks = [slice(a, b) for a, b in itertools.pairwise(edges)]
    np.testing.assert_allclose(qbsum, [Y2[:, k].sum() for k in blocks], **close)
    np.testing.assert_allclose(t, [np.trace(US_ref[k, k]) for k in blocks], **close)
    Q_ref = [[np.sum(US_ref[k, l] ** 2) for l in blocks] for k in blocks]
    np.testing.assert_allclose(Q, Q_ref, **close)
