"""The one pass over Z'Z (numerics/zz_scan.py) answers lmm's finiteness check and the
structured path's question (which diagonal blocks are diagonal) as the separate checks do,
and lmm takes the structure from it: found in ZZ, never assumed."""

import numpy as np
import pytest

from flashmm_dask import lmm
from flashmm_dask.errors import InputError
from flashmm_dask.model import lmm as lmm_module
from flashmm_dask.numerics import structured
from flashmm_dask.numerics.structured import _is_diagonal, detect
from flashmm_dask.numerics.zz_scan import Ahead, guess, scan
from tests.test_structured import design, fit

D = [3, 5, 4]


def blocks(rng):
    """A symmetric 12 x 12 matrix with diagonal blocks for sizes D and dense coupling."""
    a = rng.normal(size=(12, 12))
    a = a + a.T
    edges = np.cumsum([0, *D])
    for k in range(len(D)):
        b = slice(edges[k], edges[k + 1])
        a[b, b] = np.diag(rng.uniform(1, 2, D[k]))
    return a


def expected(a):
    edges = np.cumsum([0, *D])
    diag = tuple(
        _is_diagonal(np.ascontiguousarray(a[edges[k] : edges[k + 1], edges[k] : edges[k + 1]]))
        for k in range(len(D))
    )
    return bool(np.isfinite(a).all()), diag


@pytest.mark.parametrize(
    ("i", "j", "value"),
    [
        (None, None, None),
        (0, 1, 1e-300),  # off the diagonal of the first block: not diagonal
        (4, 6, 5e-324),  # a subnormal: not zero
        (4, 6, -0.0),  # negative zero is zero
        (9, 10, np.nan),  # NaN off the diagonal of a block
        (9, 9, np.inf),  # on the diagonal
        (0, 11, np.nan),  # in the coupling
        (11, 0, -np.inf),
        (3, 7, np.nan),  # in a block's row, outside the block
        (5, 5, 0.0),  # an empty column (zero diagonal) keeps the block diagonal
    ],
)
@pytest.mark.parametrize("order", ["C", "F"])
def test_scan_equals_the_separate_checks(i, j, value, order):
    a = blocks(np.random.default_rng(0))
    if i is not None:
        a[i, j] = value
    a = np.asarray(a, order=order)
    out = scan(a, D)
    assert (out.finite, out.diagonal) == expected(a)


def test_scan_finite_where_the_sum_overflows():
    a = blocks(np.random.default_rng(1))
    a[0, 11] = a[11, 0] = 1.7e308
    out = scan(a, D)
    assert out.finite and out.diagonal == (True, True, True)
    a[0, 1] = 1.7e308  # the same in a block that is then summed
    assert scan(a, D) == scan(np.asfortranarray(a), D)
    assert scan(a, D).finite and scan(a, D).diagonal == (False, True, True)


def test_scan_of_a_design_agrees_with_detect():
    for kind in ("nested", "nested_three", "crossed", "mixed", "unstructured"):
        st = design(kind, m=2)
        out = scan(st["ZZ"], st["d"])
        assert out.finite
        s1, s2 = detect(st["ZZ"], st["d"]), detect(st["ZZ"], st["d"], out.diagonal)
        assert (s1 is None) == (s2 is None) == (kind == "unstructured")
        if s1 is not None:
            assert s1.big == s2.big and s1.diagonal == s2.diagonal


@pytest.mark.parametrize(("i", "j"), [(0, 1), (40, 41), (0, 40), (45, 3)])
def test_lmm_rejects_nan_in_a_structured_ZZ(i, j):
    st = design("nested_large", m=3)
    st["ZZ"][i, j] = np.nan
    with pytest.raises(InputError, match="ZZ contains NaN or Inf"):
        lmm(**st)


def test_lmm_finds_the_structure_in_the_scan(monkeypatch):
    """lmm reads ZZ once: the structure comes from its scan (the big block is not read
    again), and a
    ZZ that lost the structure takes the dense path with the dense path's results."""
    seen = []
    prepare_terms = lmm_module.prepare_terms

    def spy(*args, **kwargs):
        seen.append(prepare_terms(*args, **kwargs))
        return seen[-1]

    def no_second_pass(block):  # (the small block Zs, 30 x 30, is checked as a whole)
        if block.shape[0] > 30:
            raise AssertionError("the big diagonal block read again")
        return check(block)

    check = structured._is_diagonal

    monkeypatch.setattr(lmm_module, "prepare_terms", spy)
    st = design("nested_large", m=6)
    with monkeypatch.context() as mp:
        mp.setattr(structured, "_is_diagonal", no_second_pass)
        res = lmm(**st)
    assert seen[-1].path == "structured" and seen[-1].structure.diagonal
    _, th_d, _ = fit(st, "REML", False)
    np.testing.assert_allclose(res.theta, th_d.theta.T, rtol=1e-10)
    # an entry off the diagonal of each block (even a tiny one): dense
    ZZ = st["ZZ"].copy()
    ZZ[0, 1] = ZZ[1, 0] = 1e-300
    ZZ[31, 32] = ZZ[32, 31] = 1e-300
    res = lmm(**dict(st, ZZ=ZZ))
    assert seen[-1].path == "dense"
    _, th_d, _ = fit(dict(st, ZZ=ZZ), "REML", False)
    np.testing.assert_allclose(res.theta, th_d.theta.T, rtol=1e-10)


def test_detect_reads_a_fortran_ordered_ZZ_as_a_C_ordered_one():
    for kind in ("nested", "nested_three", "crossed_three", "mixed"):
        st = design(kind, m=2)
        a = detect(st["ZZ"], st["d"])
        b = detect(np.asfortranarray(st["ZZ"]), st["d"])
        assert a is not None and b is not None
        np.testing.assert_array_equal(a.N.toarray(), b.N.toarray())
        np.testing.assert_array_equal(a.N.indptr, b.N.indptr)
        np.testing.assert_array_equal(a.Zs, b.Zs)
        assert a.big == b.big and a.diagonal == b.diagonal


@pytest.mark.parametrize(
    ("i", "j", "value"),
    [(None, None, None), (2000, 1999, 1.0), (100, 650, 2.0), (1500, 10, np.nan), (10, 10, np.inf)],
)
def test_scan_in_threads_equals_one_thread(i, j, value):
    """Rows split among threads (q >= 1024 per thread): each part reads its own rows."""
    d = [700, 1400, 4]
    q = sum(d)
    rng = np.random.default_rng(2)
    a = np.zeros((q, q))
    a[np.arange(q), np.arange(q)] = rng.uniform(1, 2, q)
    a[700:2100, :700] = rng.normal(size=(1400, 700)) * (rng.uniform(size=(1400, 700)) < 0.01)
    a[:700, 700:2100] = a[700:2100, :700].T
    a[-4:, :] = rng.normal(size=(4, q))
    a[:, -4:] = a[-4:, :].T
    if i is not None:
        a[i, j] = value
    one, three = scan(a, d, threads=1), scan(a, d, threads=3)
    assert one == three
    edges = np.cumsum([0, *d])
    assert one.finite == bool(np.isfinite(a).all())
    assert one.diagonal == tuple(
        _is_diagonal(np.ascontiguousarray(a[edges[k] : edges[k + 1], edges[k] : edges[k + 1]]))
        for k in range(len(d))
    )


def test_guess_reads_the_first_rows_of_each_block():
    """A block not diagonal in its first rows is guessed not diagonal; an entry further down
    is left to the scan."""
    d = [30, 120]
    a = np.diag(np.arange(1.0, 151.0))
    assert guess(a, d) == (True, True)
    b = a.copy()
    b[35, 36] = b[36, 35] = 1.0  # in the big block's first 64 rows
    assert guess(b, d) == (True, False) == scan(b, d).diagonal
    c = a.copy()
    c[140, 141] = c[141, 140] = 1.0  # below them: the guess is wrong, the scan is not
    assert guess(c, d) == (True, True)
    assert scan(c, d).diagonal == (True, False)
    assert guess(np.asfortranarray(b), d) == (True, False)


@pytest.mark.parametrize("where", ["first rows", "further down"])
def test_lmm_keeps_a_guessed_structure_only_where_the_scan_confirms_it(where, monkeypatch):
    """With threads, lmm fits with the structure guessed from the first rows while the scan
    reads ZZ (zz_scan.Ahead); where the scan finds an entry the guess did not see, the fit
    is redone with the scan's structure: the dense path's results."""
    seen = []
    prepare_terms = lmm_module.prepare_terms

    def spy(*args, **kwargs):
        seen.append(kwargs["diagonal"])
        return prepare_terms(*args, **kwargs)

    monkeypatch.setattr(lmm_module, "prepare_terms", spy)
    st = design("nested_large", m=4)
    ZZ = st["ZZ"].copy()
    i = 31 if where == "first rows" else 140  # rows of the big block (30:150)
    ZZ[i, i + 1] = ZZ[i + 1, i] = 1e-300
    st = dict(st, ZZ=ZZ)
    res = lmm(**st, n_threads=2)
    assert seen[-1] == scan(ZZ, st["d"]).diagonal == (True, False)
    assert len(seen) == (1 if where == "first rows" else 2)
    _, th_d, _ = fit(st, "REML", False)
    np.testing.assert_allclose(res.theta, th_d.theta.T, rtol=1e-10)
    seen.clear()
    one = lmm(**st, n_threads=1)  # no scan ahead: the scan first
    assert seen == [(True, False)]
    np.testing.assert_array_equal(one.theta, res.theta)


def test_lmm_scans_ahead_only_with_threads_and_a_contiguous_ZZ(monkeypatch):
    made = []

    class Spy(Ahead):
        def __init__(self, ZZ, d):
            made.append(1)
            super().__init__(ZZ, d)

    monkeypatch.setattr(lmm_module, "Ahead", Spy)
    st = design("nested_large", m=3)
    lmm(**st, n_threads=2)
    assert made == [1]
    lmm(**st, n_threads=1)
    wide = np.zeros((st["ZZ"].shape[0], 2 * st["ZZ"].shape[1]))
    wide[:, ::2] = st["ZZ"]
    lmm(**dict(st, ZZ=wide[:, ::2]), n_threads=2)  # neither C nor F ordered
    assert made == [1]


@pytest.mark.parametrize(("i", "j"), [(0, 1), (140, 141), (3, 100)])
def test_lmm_scanning_ahead_rejects_nan_before_other_errors(i, j):
    """The scan's verdict on ZZ comes first, as when it ran before everything else: before
    a bad XY, and before a fit that the NaN upsets."""
    st = design("nested_large", m=3)
    st["ZZ"][i, j] = np.nan
    with pytest.raises(InputError, match="ZZ contains NaN or Inf"):
        lmm(**st, n_threads=2)
    XY = st["XY"].copy()
    XY[0, 0] = np.inf
    with pytest.raises(InputError, match="ZZ contains NaN or Inf"):
        lmm(**dict(st, XY=XY), n_threads=2)
