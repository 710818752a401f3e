"""Gauss-Jordan of a positive definite matrix four pivots a sweep (numerics/compiled_spd.py):
the bits of two pivots a sweep without pivoting (compiled_dense._gauss_jordan_pairs)."""

import numpy as np
import pytest

from flashmm_dask.numerics.compiled_dense import _gauss_jordan_pairs
from flashmm_dask.numerics.compiled_spd import _gauss_jordan_spd


def _pairs(a, with_log):
    q, nc = a.shape
    buf = (np.empty(nc), np.empty(nc), np.empty(q, dtype=np.int64))
    return _gauss_jordan_pairs(a, *buf, with_log, False)


def _spd(a, with_log):
    return _gauss_jordan_spd(a, np.empty((4, a.shape[1])), np.empty((5, 4)), with_log)


@pytest.mark.parametrize("h", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 21, 25, 30])
@pytest.mark.parametrize("extra", [0, 1, 7, 25, 31])
@pytest.mark.parametrize("with_log", [True, False])
def test_gauss_jordan_spd_is_pairs(h, extra, with_log):
    """[S | B]: every entry and log |det S| bit for bit those of two pivots a sweep (so of
    one at a time), for every remainder of h mod 4 and widths with and without a tail of
    the vector loops; and the inverse and S^-1 B."""
    rng = np.random.default_rng(100 * h + extra)
    X = rng.normal(size=(h + 3, h))
    S = np.eye(h) + 0.3 * X.T @ X  # positive definite, far from diagonally dominant
    a = np.hstack([S, rng.normal(size=(h, extra))])
    two, four = a.copy(), a.copy()
    ld2 = _pairs(two, with_log)
    ld4 = _spd(four, with_log)
    np.testing.assert_array_equal(four, two)
    assert ld4 == ld2
    np.testing.assert_allclose(four[:, :h] @ S, np.eye(h), atol=1e-9)
    np.testing.assert_allclose(four[:, h:], np.linalg.solve(S, a[:, h:]), rtol=1e-8, atol=1e-10)


def test_gauss_jordan_spd_zero_columns_stay_zero():
    """Columns of zeros right of S (the K = 2 kernel's padding) stay zero and leave the
    others' bits as they are."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(30, 25))
    a = np.hstack([np.eye(25) + X.T @ X / 30, rng.normal(size=(25, 25))])
    padded = np.hstack([a, np.zeros((25, 6))])
    _spd(a, True)
    _spd(padded, True)
    np.testing.assert_array_equal(padded[:, :50], a)
    assert np.all(padded[:, 50:] == 0.0)


@pytest.mark.parametrize("h", [2, 5, 9])
@pytest.mark.parametrize("where", [0, 1, 3, 4, -1])
def test_gauss_jordan_spd_stops_where_pairs_stops(h, where):
    """A symmetric matrix with a pivot <= 0 at step ``where`` (any place in a block of
    four, or the tail): NaN, as two pivots a sweep without pivoting."""
    rng = np.random.default_rng(h)
    X = rng.normal(size=(h + 2, h))
    S = np.eye(h) + X.T @ X
    k = where % h
    # the k-th pivot is S[k, k] less the Schur terms of the rows before it: push it below 0
    S[k, k] -= np.linalg.eigvalsh(S)[-1] * 2.0 + 1.0
    assert np.isnan(_pairs(S.copy(), True))
    assert np.isnan(_spd(S.copy(), True))
    assert np.isnan(_spd(np.array([[np.inf]]), False))
