"""The per-cell pass when each cell has one random-effect entry: fixed-effect rows grouped.

The atlas model (``~ 0 + log(libsize) + age + sex + state + state:condition | ~ 0 +
donor``, 11,596 genes) has too many distinct rows of A = [X_s, Z] in a chunk to group
whole rows (5,000 in 8,000 cells: :mod:`flashmm_dask.stats.products`' grouped path), so
each value of E was added to each entry of its row of A: sex, cell state,
state:condition and donor, four rows of A'E written per value. Here the two parts of a
row are taken apart into three:

- **columns set by the subject** (age, sex, condition: the same value in every cell of
  a subject) are left out: their X'E is u' Z'E, formed from Z'E when the sums are read
  (:meth:`~flashmm_dask.stats.block_sums.BlockSums.subject_columns`, which checks them
  block by block);
- **the rest of the fixed-effect part**, X_s (the columns of X that are mostly zero),
  has few distinct rows (29 states x 2 conditions), so cells with the same row of X_s
  form a group g and each value is added once, to its group's sum G[g] (unweighted);
  the group sums are kept by :class:`~flashmm_dask.stats.block_sums.BlockSums` over all
  the blocks a chain of tasks adds, and X_s'E = X_g' G is formed when the sums are read
  (one small sparse product per chain, not per block);
- **the random-effect part** is one entry per cell (a subject, with its weight), added to
  its row of Z'E as before; cells are visited subject by subject, so that row stays in
  cache.

Two writes per value instead of four, one dense column (log library size) instead of
three, and the rows of A are never built as a sparse matrix. Every value goes through the
same sums as before: only the order of the additions changes (the fixed-effect products
are summed per group or per subject first).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from flashmm_dask.stats.block_sums import BlockSums

__all__: list[str] = []  # used by flashmm_dask.stats.products


def one_entry_rows(Z: sp.csr_matrix) -> bool:
    """Whether every row of Z (CSR) stores exactly one entry."""
    n = Z.shape[0]
    return Z.nnz == n and bool(np.array_equal(Z.indptr, np.arange(n + 1)))


def add_by_random_entry(
    compiled: Any,
    E: sp.csr_matrix,
    table: np.ndarray | None,
    X: np.ndarray,
    dense: np.ndarray,
    Z: sp.csr_matrix,
    sums: BlockSums,
) -> bool:
    """Add the block's products into ``sums`` by the grouped pass; False (nothing added)
    when it does not apply: more than three dense columns of X to add, or too many
    distinct rows of X_s.

    ``compiled(name)`` gives this module's compiled loops; E is checked (codes in the
    table); ``dense`` marks X's columns that are mostly non-zero; Z has one entry per row
    (:func:`one_entry_rows`). Columns of X set by the subject (age, sex: their products
    come from Z'E, :meth:`BlockSums.subject_columns`) are left out of both.
    """
    by_subject = sums.subject_columns(X, Z)
    dense = dense & ~by_subject
    n_dense = int(dense.sum())
    if n_dense > 3:
        return False
    sparse = np.flatnonzero(~dense & ~by_subject)
    bits = np.ascontiguousarray(X).view(np.int64)
    keys = compiled("_fixed_keys")(bits, sparse)
    group, uniques = pd.factorize(keys)
    n_groups = len(uniques)
    if n_groups > sums.group_capacity:
        return False
    group = group.astype(np.int64, copy=False)
    first, same = compiled("_fixed_first")(bits, sparse, group, n_groups)
    if not same:  # two distinct rows with the same 64-bit key
        return False
    rows = np.zeros((n_groups, X.shape[1]))
    rows[:, sparse] = X[np.ix_(first, sparse)]
    found = sums.group_rows(rows)
    if found is None:
        return False
    where, G = found
    X3 = np.zeros((X.shape[0], 3))
    X3[:, :n_dense] = X[:, dense]
    codes, values = (E.data, np.zeros(0)) if table is not None else (np.zeros(0, np.int32), E.data)
    block = (
        E.indptr.astype(np.int64, copy=False),
        E.indices,
        codes,
        np.zeros(0) if table is None else table,
        values,
        X3,
    )
    D = np.zeros((E.shape[1], 4))  # [colsums(E^2), E'X3]
    order = np.argsort(Z.indices, kind="stable")  # subject by subject
    rows_z = (sums.p + Z.indices).astype(np.int64)
    compiled("_grouped_cells")(block, where[group], rows_z, Z.data, order, G, sums.rows, D, n_dense)
    sums.XY[dense] += D[:, 1 : 1 + n_dense].T
    sums.Ynorm += D[:, 0]
    return True


# -- compiled loops (plain Python here; numba compiles them) ----------------------------


def _grouped_cells(
    block: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    group: np.ndarray,
    row: np.ndarray,
    weight: np.ndarray,
    order: np.ndarray,
    G: np.ndarray,
    out: np.ndarray,
    D: np.ndarray,
    n_dense: int,
) -> None:
    """Add each row of E to its group's row of G, times ``weight[c]`` to row ``row[c]``
    of ``out``, and [colsums(E^2), E'X3] to D (m, 4), visiting the cells in ``order``.

    ``block`` is (indptr, indices, codes, table, values, X3) as for
    :func:`~flashmm_dask.stats.products._scatter_products` (codes checked by the caller),
    with X3 the dense columns of X (n_dense of them, zero padded to three).
    """
    indptr, indices, codes, table, values, X3 = block
    lookup = table.size > 0
    sums = D.reshape(-1)  # D flat: its row j at 4 j
    for c in order:
        # the rows added to, as 1-d views; column indices and codes as unsigned integers
        # (checked to be in range), so that no negative index is wrapped around: the
        # loop is a third shorter
        g_row = G[group[c]]
        z_row = out[row[c]]
        w = weight[c]
        x0 = X3[c, 0]
        x1 = X3[c, 1]
        x2 = X3[c, 2]
        for t in range(indptr[c], indptr[c + 1]):
            j = np.uint64(indices[t])
            v = table[np.uint64(codes[t])] if lookup else values[t]
            g_row[j] += v
            z_row[j] += w * v
            j4 = np.uint64(4) * j
            sums[j4] += v * v
            sums[j4 + np.uint64(1)] += x0 * v
            # the same way for every value of the block
            if n_dense > 1:
                sums[j4 + np.uint64(2)] += x1 * v
                if n_dense > 2:
                    sums[j4 + np.uint64(3)] += x2 * v


def _fixed_keys(bits: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """A 64-bit key (FNV-1a style) of each row of X's ``columns``, from X's bits."""
    n = bits.shape[0]
    keys = np.empty(n, dtype=np.int64)
    prime = np.int64(1099511628211)
    for c in range(n):
        h = np.int64(-3750763034362895579)
        for r in columns:
            h = (h ^ bits[c, r]) * prime
        keys[c] = h
    return keys


def _fixed_first(
    bits: np.ndarray, columns: np.ndarray, group: np.ndarray, n_groups: int
) -> tuple[np.ndarray, bool]:
    """The first row of each group, and whether every row's ``columns`` equal (bit for
    bit) those of its group's first (X's bits)."""
    first = np.full(n_groups, -1, dtype=np.int64)
    for c in range(group.shape[0]):
        g = group[c]
        f = first[g]
        if f < 0:
            first[g] = c
            continue
        for r in columns:
            if bits[c, r] != bits[f, r]:
                return first, False
    return first, True


def _codes_fit(indptr: np.ndarray, indices: np.ndarray, codes: np.ndarray, size: int) -> bool:
    """Whether every code is an integer in [0, size) and each row's column indices are
    strictly increasing.

    Counted without branches over all the values (which the compiler vectorises),
    comparing each index with the one before it, then the comparisons across two rows
    taken back out."""
    nnz = indices.shape[0]
    bad = 0
    for t in range(nnz):
        x = codes[t]
        bad += (x < 0) | (x >= size) | (np.floor(x) != x)  # NaN: the last
    for t in range(1, nnz):
        bad += indices[t] <= indices[t - 1]
    for c in range(1, indptr.shape[0] - 1):
        t = indptr[c]  # the first value after row c - 1 (counted once, where not empty)
        if t > indptr[c - 1] and t < nnz:
            bad -= indices[t] <= indices[t - 1]
    return bad == 0
