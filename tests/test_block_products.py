"""flashmm_dask.stats.products: X'E, Z'E and colsums(E^2) of one sparse block.

Every path of the compiled pass (cells grouped by their design row, or scattered per
cell; counts transformed by table look-up or values given; up to two or more dense
columns of X; more than two entries in a row of [X_s, Z]; cells visited in order or by
group) is compared with the dense NumPy products, and the pass must refuse what the
look-up cannot handle (so that the caller takes the checked general path).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from flashmm_dask.stats import products as block_products
from flashmm_dask.stats.products import BlockSums, dense_as_csr, lookup_table, sparse_products


def counts(n: int = 300, m: int = 40, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    values = rng.negative_binomial(1, 0.5, size=(n, m)) * (rng.random((n, m)) < 0.3)
    return sp.csr_matrix(values.astype(np.int32))


def design_rows(n: int, *, dense_columns: int, slope: bool, seed: int = 1):
    """X = [dense columns (libsize-like), cls indicators, cls x trt]; Z = [sam] (and a
    random slope per sam, which makes every row of Z distinct)."""
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, 3, n)
    trt = rng.integers(0, 2, n)
    sam = rng.integers(0, 6, n)
    dense = rng.uniform(1, 5, (n, dense_columns))
    X = np.column_stack([dense, np.eye(3)[cls], np.eye(3)[cls] * trt[:, None]])
    Z = np.eye(6)[sam]
    if slope:
        Z = np.column_stack([Z, Z * rng.normal(size=n)[:, None]])
    return X, sp.csr_matrix(Z)


def expected(E: np.ndarray, X: np.ndarray, Z: sp.csr_matrix):
    Zd = Z.toarray()
    return X.T @ E, Zd.T @ E, (E * E).sum(axis=0)


def assert_products(got, want) -> None:
    assert got is not None
    if isinstance(got, BlockSums):
        got = got.partials()
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())


@pytest.mark.parametrize("dense_columns", [0, 1, 2, 3])
@pytest.mark.parametrize("slope", [False, True])
@pytest.mark.parametrize("transform", ["log2p1", "none"])
def test_table_pass_equals_dense_products(dense_columns: int, slope: bool, transform: str) -> None:
    E = counts()
    X, Z = design_rows(E.shape[0], dense_columns=dense_columns, slope=slope)
    values = E.toarray().astype(float)
    want = expected(np.log2(1 + values) if transform == "log2p1" else values, X, Z)
    assert_products(sparse_products(E, X, Z, lookup_table(transform)), want)


@pytest.mark.parametrize("slope", [False, True])
def test_values_pass_equals_dense_products(slope: bool) -> None:
    E = counts().astype(np.float64)
    E.data = np.random.default_rng(3).normal(size=E.nnz)  # any values, negatives included
    X, Z = design_rows(E.shape[0], dense_columns=2, slope=slope)
    assert_products(sparse_products(E, X, Z), expected(E.toarray(), X, Z))


def test_grouped_and_per_cell_and_ordered_passes_agree(monkeypatch) -> None:
    E = counts(n=500, m=30)
    X, Z = design_rows(E.shape[0], dense_columns=1, slope=False)
    table = lookup_table("log2p1")
    want = expected(np.log2(1 + E.toarray()), X, Z)
    rows = np.column_stack([X[:, 1:], Z.toarray()])
    assert len(np.unique(rows, axis=0)) * E.shape[1] <= E.nnz  # so it is grouped
    group_sums = block_products._compiled("_group_sums")
    calls = []
    monkeypatch.setitem(
        block_products._COMPILED, "_group_sums", lambda *a: calls.append(1) or group_sums(*a)
    )
    assert_products(sparse_products(E, X, Z, table), want)  # the group loop
    assert calls == [1]
    monkeypatch.setattr(block_products, "_ORDER_BYTES", 0)
    assert_products(sparse_products(E, X, Z, table), want)  # grouped, by group
    assert calls == [1]
    monkeypatch.setattr(block_products, "_row_groups", lambda *args, **kwargs: None)
    assert_products(sparse_products(E, X, Z, table), want)  # per cell, by subject
    monkeypatch.setattr(block_products, "_ORDER_BYTES", 1 << 40)
    assert_products(sparse_products(E, X, Z, table), want)  # per cell
    assert calls == [1]


@pytest.mark.parametrize("slope", [False, True])
def test_products_added_into_running_sums(slope: bool) -> None:
    """Blocks added into one BlockSums (grouped, or per cell with a slope) give the sum of
    their products; a block the table refuses adds nothing."""
    table = lookup_table("log2p1")
    E1, E2 = counts(seed=0), counts(seed=1)
    X, Z = design_rows(E1.shape[0], dense_columns=2, slope=slope)
    sums = BlockSums(X.shape[1], Z.shape[1], E1.shape[1])
    for E in (E1, E2):
        assert sparse_products(E, X, Z, table, sums) is sums
    want1 = expected(np.log2(1 + E1.toarray()), X, Z)
    want2 = expected(np.log2(1 + E2.toarray()), X, Z)
    assert_products(sums.partials(), [a + b for a, b in zip(want1, want2, strict=True)])
    before = [a.copy() for a in sums.partials()]
    E1.data[-1] = -1
    assert sparse_products(E1, X, Z, table, sums) is None
    for a, b in zip(sums.partials(), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_rows_with_more_than_two_design_entries() -> None:
    """Rows of [X_s, Z] with 4 non-zeros, scattered per cell: two in the pass, two after."""
    E = counts()
    X, Z = design_rows(E.shape[0], dense_columns=1, slope=True)
    X = np.column_stack([X, np.random.default_rng(5).normal(size=(E.shape[0], 3)) * (X[:, 1:2])])
    assert_products(
        sparse_products(E, X, Z, lookup_table("none")), expected(E.toarray().astype(float), X, Z)
    )


def test_row_groups_refuse_too_many_groups_and_key_collisions(monkeypatch) -> None:
    X, Z = design_rows(100, dense_columns=0, slope=False)
    group, first = block_products._row_groups(np.ascontiguousarray(X), Z, max_groups=100)
    rows = np.column_stack([X, Z.toarray()])
    np.testing.assert_array_equal(rows[first][group], rows)
    assert block_products._row_groups(np.ascontiguousarray(X), Z, max_groups=len(first) - 1) is None
    keys = block_products._compiled("_row_keys")
    monkeypatch.setitem(
        block_products._COMPILED, "_row_keys", lambda *args: np.zeros_like(keys(*args))
    )  # every row the same key: the check finds rows that differ
    assert block_products._row_groups(np.ascontiguousarray(X), Z, max_groups=100) is None


@pytest.mark.parametrize(
    "change",
    ["negative", "too large", "fraction", "nan", "duplicate", "unsorted"],
)
def test_table_pass_refuses_what_it_cannot_look_up(change: str) -> None:
    E = counts().astype(np.float32)
    X, Z = design_rows(E.shape[0], dense_columns=1, slope=False)
    t = E.indptr[5]  # first entry of row 5 (rows 5 and 6 have >= 2 entries)
    assert E.indptr[6] - t >= 2
    if change == "negative":
        E.data[t] = -1
    elif change == "too large":
        E.data[t] = 1 << 16
    elif change == "fraction":
        E.data[t] = 2.5
    elif change == "nan":
        E.data[t] = np.nan
    elif change == "duplicate":
        E.indices[t + 1] = E.indices[t]
    else:
        E.indices[t], E.indices[t + 1] = E.indices[t + 1], E.indices[t]
    assert sparse_products(E, X, Z, lookup_table("log2p1")) is None


def test_integer_valued_floats_use_the_table() -> None:
    E = counts().astype(np.float32)
    X, Z = design_rows(E.shape[0], dense_columns=1, slope=False)
    want = expected(np.log2(1 + E.toarray().astype(float)), X, Z)
    assert_products(sparse_products(E, X, Z, lookup_table("log2p1")), want)


def test_without_numba_scipy_gives_the_same(monkeypatch) -> None:
    E = counts()
    X, Z = design_rows(E.shape[0], dense_columns=1, slope=True)
    monkeypatch.setattr(block_products, "_compiled", lambda name: None)
    want = expected(np.log2(1 + E.toarray()), X, Z)
    assert_products(sparse_products(E, X, Z, lookup_table("log2p1")), want)
    E.data[0] = -3
    assert sparse_products(E, X, Z, lookup_table("log2p1")) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.uint16])
@pytest.mark.parametrize("numba", [True, False])
def test_dense_as_csr(dtype, numba: bool, monkeypatch) -> None:
    if not numba:
        monkeypatch.setattr(block_products, "_compiled", lambda name: None)
    values = counts().toarray().astype(dtype)
    csr = dense_as_csr(values, 0.5)
    assert isinstance(csr, sp.csr_matrix) and csr.dtype == dtype and csr.has_canonical_format
    np.testing.assert_array_equal(csr.toarray(), values)
    assert dense_as_csr(values, 0.01) is None  # more non-zeros than that
    assert dense_as_csr(np.asfortranarray(values), 0.5).nnz == csr.nnz
    assert dense_as_csr(values.astype(bool), 0.5) is None


def test_lookup_tables() -> None:
    k = np.arange(1 << 16)
    np.testing.assert_array_equal(lookup_table("none"), k.astype(float))
    np.testing.assert_allclose(lookup_table("log2p1"), np.log2(1.0 + k), rtol=1e-15)
    assert lookup_table("log1p_scaled") is None


def atlas_rows(n: int, classes: tuple[int, ...], seed: int, subjects_seed: int = 2):
    """X = [libsize-like, age, sex indicators, cls, cls x trt] with age, sex and trt set
    by the subject (drawn from ``subjects_seed``: the same subjects in every block by
    default), so X_s has few distinct rows; Z = one subject indicator per row (too many
    distinct rows of [X_s, Z] to group whole rows)."""
    rng, by_subject = np.random.default_rng(seed), np.random.default_rng(subjects_seed)
    trt, sex = by_subject.integers(0, 2, 40), by_subject.integers(0, 2, 40)
    age = by_subject.uniform(20, 80, 40)
    sam = rng.integers(0, 40, n)
    cls = rng.choice(classes, n)
    X = np.column_stack(
        [
            rng.uniform(6, 9, n),
            age[sam],
            np.eye(2)[sex[sam]],
            np.eye(4)[cls],
            np.eye(4)[cls] * trt[sam][:, None],
        ]
    )
    return X, sp.csr_matrix(np.eye(40)[sam])


@pytest.mark.parametrize("transform", ["log2p1", "none"])
@pytest.mark.parametrize("same_subjects", [True, False])
def test_grouped_fixed_rows_pass_equals_dense_products(
    transform: str, same_subjects: bool, monkeypatch
) -> None:
    """One Z entry per cell: the fixed-effect rows grouped and the columns set by the
    subject left out (the pass of cell_pass), over several blocks into one BlockSums,
    equals the dense products; the same with the groups emptied into X'E between blocks
    (a small group capacity), and per cell when the groups do not fit. The class columns
    are zero in the first block, so set by the subject there, and not in the second;
    with subjects redrawn in each block, age and sex are not set by the subject either."""
    monkeypatch.setattr(block_products, "_ORDER_BYTES", 0)  # whole rows never grouped
    table = lookup_table(transform)
    blocks = [counts(n=400, m=50, seed=s) for s in range(3)]
    classes = [(0, 1, 2), (1, 2, 3), (0, 2, 3)]  # 6 groups a block (class x trt), 8 in all
    designs = [
        atlas_rows(400, c, seed=10 + s, subjects_seed=2 if same_subjects else s)
        for s, c in enumerate(classes)
    ]
    want = [np.zeros((12, 50)), np.zeros((40, 50)), np.zeros(50)]
    for E, (X, Z) in zip(blocks, designs, strict=True):
        values = E.toarray().astype(float)
        for total, part in zip(want, expected(table[values.astype(int)], X, Z), strict=True):
            total += part
    passes = []
    add = block_products.cell_pass.add_by_random_entry
    monkeypatch.setattr(
        block_products.cell_pass,
        "add_by_random_entry",
        lambda *args: passes.append(add(*args)) or passes[-1],
    )
    # sex (2) x class (3) x trt (2) groups a block once sex is not set by the subject
    fits = (None, 7) if same_subjects else (None, 13)
    for capacity in fits:
        sums = BlockSums(12, 40, 50)
        if capacity is not None:
            sums.group_capacity = capacity  # emptied before a block
        for E, (X, Z) in zip(blocks, designs, strict=True):
            assert sparse_products(E, X, Z, table, sums) is sums
        by_subject = sums._by_subject.copy()
        if capacity is None:  # the group rows written (none emptied), not the capacity
            groups = len(sums._group_X)
            assert 8 <= groups < sums.group_capacity
            assert sums.nbytes == sums.rows.nbytes + sums.Ynorm.nbytes + groups * 50 * 8
        assert_products(sums, want)
        # age, sex: set by the subject throughout, or not
        np.testing.assert_array_equal(by_subject[1:4], [same_subjects] * 3)
        assert not by_subject[[0, *range(4, 12)]].any()
    assert passes == [True] * 6
    sums = BlockSums(12, 40, 50)
    sums.group_capacity = 5  # fewer than a block's groups: the per-cell pass
    for E, (X, Z) in zip(blocks, designs, strict=True):
        sparse_products(E, X, Z, table, sums)
    assert_products(sums, want)
    assert passes[6:] == [False] * 3


def test_subject_columns_stop_for_other_blocks() -> None:
    """Products added any other way (a slope in Z, a dense block) after blocks with
    columns left out add them first; a block of transformed values (what a block the
    table refuses becomes) leaves them out too."""
    table = lookup_table("log2p1")
    X, Z = atlas_rows(400, (0, 1, 2), seed=10)
    E1, E2 = counts(n=400, m=50, seed=0), counts(n=400, m=50, seed=1)
    want1 = expected(np.log2(1 + E1.toarray()), X, Z)
    for second in ("slope", "dense", "values"):
        sums = BlockSums(12, 40, 50)
        sparse_products(E1, X, Z, table, sums)
        assert sums._by_subject[1:4].all()
        if second == "slope":
            Z2 = Z.multiply(np.random.default_rng(4).normal(size=(400, 1))).tocsr()
            sparse_products(E2, X, Z2, table, sums)
            want2 = expected(np.log2(1 + E2.toarray()), X, Z2)
        elif second == "dense":
            values = np.log2(1 + E2.toarray())
            sums.add(X.T @ values, Z.T @ values, (values * values).sum(axis=0))
            want2 = expected(values, X, Z)
        else:
            E = E2.astype(np.float64)
            E.data = np.log2(1 + E.data)
            sparse_products(E, X, Z, None, sums)
            want2 = expected(E.toarray(), X, Z)
        assert sums._by_subject[1:4].all() == (second == "values")
        assert_products(sums, [a + b for a, b in zip(want1, want2, strict=True)])


def test_codes_check_across_empty_rows() -> None:
    """The branch-free check compares indices within rows only, empty rows between."""
    check = block_products._compiled("_codes_fit")
    E = sp.csr_matrix(np.array([[0, 1, 2], [0, 0, 0], [3, 0, 0], [0, 0, 0], [0, 4, 5]]))
    table = lookup_table("log2p1")
    assert check(E.indptr, E.indices, E.data, table.size)
    indices = E.indices.copy()
    indices[-1] = indices[-2]  # a duplicate in the last row
    assert not check(E.indptr, indices, E.data, table.size)
    for code in (-1, 1 << 16):
        data = E.data.copy()
        data[2] = code
        assert not check(E.indptr, E.indices, data, table.size)
    assert not check(E.indptr, E.indices, np.array([1.0, 2.5, 3, 4, 5]), table.size)
    assert not check(E.indptr, E.indices, np.array([1.0, np.nan, 3, 4, 5]), table.size)
