"""The small dense kernels of the K = 2 path (numerics/compiled_dense.py)."""

import numpy as np
import pytest

from flashmm_dask.numerics.compiled import _gauss_jordan
from flashmm_dask.numerics.compiled_dense import _dots_into, _gauss_jordan_pairs, residualise_rows


def _square(kind, h, rng):
    """An h x h matrix to invert: symmetric positive definite, general, or one whose
    small leading diagonal makes every step interchange rows."""
    if kind == "spd":
        X = rng.normal(size=(3 * h, h))
        return np.eye(h) + 0.1 * X.T @ X
    if kind == "general":
        return rng.normal(size=(h, h))
    A = rng.normal(size=(h, h)) + np.diag(np.full(h, -1e3))[::-1]
    A[np.diag_indices(h)] = 1e-6
    return A


@pytest.mark.parametrize("h", [1, 2, 3, 4, 5, 6, 7, 8, 9, 25, 60])
@pytest.mark.parametrize("kind", ["spd", "general", "pivoting"])
def test_gauss_jordan_pairs_is_gauss_jordan(h, kind):
    """Two pivots per sweep: the same operations as one at a time, so the same bits."""
    A = _square(kind, h, np.random.default_rng(h))
    one, two = A.copy(), A.copy()
    ld1 = _gauss_jordan(one, np.empty(h), np.empty(h, dtype=np.int64))
    ld2 = _gauss_jordan_pairs(two, np.empty(h), np.empty(h), np.empty(h, dtype=np.int64), True)
    np.testing.assert_array_equal(two, one)
    assert ld1 == ld2
    np.testing.assert_allclose(two @ A, np.eye(h), atol=1e-9)


def test_gauss_jordan_pairs_singular():
    A = np.ones((4, 4))
    assert np.isnan(
        _gauss_jordan_pairs(A, np.empty(4), np.empty(4), np.empty(4, dtype=np.int64), True)
    )


@pytest.mark.parametrize("shape", [(1, 3, 2), (5, 4, 3), (6, 6, 6), (7, 25, 25)])
def test_dots_into(shape):
    n, k, ns = shape
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(n, k)), rng.normal(size=(ns, k))
    out = np.full((n, ns), 7.0)
    _dots_into(A, B, out, False)
    np.testing.assert_allclose(out, A @ B.T, rtol=1e-13, atol=1e-13)
    up = np.full((n, ns), 7.0)
    _dots_into(A, B, up, True)
    mask = np.triu(np.ones((n, ns), dtype=bool))
    np.testing.assert_allclose(up[mask], (A @ B.T)[mask], rtol=1e-13, atol=1e-13)
    assert np.all(up[~mask] == 7.0)


def test_residualise_rows_alone_equals_in_a_block():
    rng = np.random.default_rng(1)
    p, q, m = 4, 6, 9
    B = rng.normal(size=(3 * p, p))
    XXinv = np.linalg.inv(B.T @ B)
    ZX, XY, ZY, Yn = (rng.normal(size=s) for s in ((q, p), (m, p), (m, q), (m,)))
    zry, yry = residualise_rows(XXinv, ZX, XY, ZY, Yn)
    Bx = XY @ XXinv
    np.testing.assert_allclose(zry, ZY - Bx @ ZX.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(yry, Yn - np.sum(Bx * XY, axis=1), rtol=1e-12, atol=1e-12)
    for j in range(m):
        z1, y1 = residualise_rows(XXinv, ZX, XY[j : j + 1], ZY[j : j + 1], Yn[j : j + 1])
        np.testing.assert_array_equal(z1[0], zry[j])
        assert y1[0] == yry[j]


@pytest.mark.parametrize("h", [1, 2, 3, 4, 5, 8, 25])
def test_gauss_jordan_pairs_without_pivoting(h):
    """Positive definite: no interchanges needed; where partial pivoting interchanges none
    the bits are those of the pivoting inverse, and it is the inverse where it would."""
    rng = np.random.default_rng(h)
    B = rng.normal(size=(3 * h, h))
    A = 10.0 * np.eye(h) + 0.01 * B.T @ B  # diagonally dominant: no interchanges
    args = (np.empty(h), np.empty(h), np.empty(h, dtype=np.int64), True)
    one, two = A.copy(), A.copy()
    ld1 = _gauss_jordan_pairs(one, *args)
    ld2 = _gauss_jordan_pairs(two, *args, False)
    np.testing.assert_array_equal(two, one)
    assert ld1 == ld2
    # positive definite with off-diagonal entries above the diagonal's: pivoting would
    # interchange rows, elimination without is still the inverse
    L = np.eye(h)
    L[1:, 0] = 3.0
    C = L @ L.T + 0.1 * np.eye(h)  # C[0, 0] = 1.1 < C[i, 0] = 3
    inv = C.copy()
    ld = _gauss_jordan_pairs(inv, *args, False)
    np.testing.assert_allclose(inv @ C, np.eye(h), atol=1e-9)
    assert ld == pytest.approx(np.linalg.slogdet(C)[1], rel=1e-12)


@pytest.mark.parametrize(
    "A", [[[1.0, 2.0], [2.0, 1.0]], [[-1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]
)
def test_gauss_jordan_pairs_without_pivoting_stops_where_not_positive_definite(A):
    """A symmetric matrix with a pivot <= 0 (indefinite): NaN, for the caller to pivot;
    with pivoting the same matrices are inverted."""
    A = np.array(A)
    args = (np.empty(2), np.empty(2), np.empty(2, dtype=np.int64), True)
    assert np.isnan(_gauss_jordan_pairs(A.copy(), *args, False))
    inv = A.copy()
    assert np.isfinite(_gauss_jordan_pairs(inv, *args))
    np.testing.assert_allclose(inv @ A, np.eye(2), atol=1e-12)


def test_inverse_checked_batch_is_gauss_jordan():
    """The checked inverse (the fixed effects' C, the 3 x 3 information of the fits) by
    two pivots per sweep: the bits of one pivot at a time, symmetrised."""
    from flashmm_dask.numerics.compiled_dense import inverse_checked_batch

    rng = np.random.default_rng(4)
    B = rng.normal(size=(5, 40, 21))
    A = B.transpose(0, 2, 1) @ B
    A[1] = rng.normal(size=(21, 21))
    A[1] += A[1].T  # indefinite: interchanges
    out, ok = inverse_checked_batch(A, 1e15)
    assert ok.all()
    for j in range(A.shape[0]):
        ref = 0.5 * (A[j] + A[j].T)
        _gauss_jordan(ref, np.empty(21), np.empty(21, dtype=np.int64))
        np.testing.assert_array_equal(out[j], 0.5 * (ref + ref.T))


def test_newton_gap_batch_is_the_pseudo_inverse_form():
    """g' pinv(F) g / 2 as np.linalg.pinv (cut-off 1e-15) computes it: inverses, singular
    and nearly singular informations; NaN outside the rows asked for."""
    from flashmm_dask.numerics.compiled_dense import newton_gap_batch

    rng = np.random.default_rng(5)
    B = rng.normal(size=(40, 6, 3))
    F = B.transpose(0, 2, 1) @ B
    g = rng.normal(size=(40, 3)) * 1e-3
    F[3] = np.diag([1.0, 1.0, 0.0])  # singular: the zero direction dropped
    F[4] = np.diag([2.0, 1e-17, 3.0])  # below the cut-off: dropped too
    F[5] = -F[5]  # negative definite: still the inverse
    rows = np.flatnonzero(np.arange(40) != 7)
    gap = newton_gap_batch(g, F, rows)
    step = np.linalg.pinv(F, hermitian=True) @ g[:, :, None]
    ref = 0.5 * np.einsum("mk,mk->m", g, step[:, :, 0])
    np.testing.assert_allclose(gap[rows], ref[rows], rtol=1e-12)
    assert np.isnan(gap[7])


@pytest.mark.parametrize("h, extra", [(1, 1), (2, 3), (5, 5), (7, 2), (25, 25), (30, 30)])
@pytest.mark.parametrize("kind", ["spd", "general", "pivoting"])
def test_gauss_jordan_pairs_augmented(h, extra, kind):
    """[S | B] (h, h + extra): S^-1 with the bits of the square inversion, and S^-1 B right
    of it, with and without interchanges of rows."""
    rng = np.random.default_rng(10 * h + extra)
    S = _square(kind, h, rng)
    B = rng.normal(size=(h, extra))
    perm = np.empty(h, dtype=np.int64)
    for pivoting in (True, False) if kind == "spd" else (True,):
        aug = np.hstack([S, B])
        square = S.copy()
        wide = (np.empty(h + extra), np.empty(h + extra))
        ld1 = _gauss_jordan_pairs(aug, *wide, perm, True, pivoting)
        ld2 = _gauss_jordan_pairs(square, np.empty(h), np.empty(h), perm, True, pivoting)
        np.testing.assert_array_equal(aug[:, :h], square)
        assert ld1 == ld2
        np.testing.assert_allclose(aug[:, h:], np.linalg.solve(S, B), rtol=1e-9, atol=1e-12)
