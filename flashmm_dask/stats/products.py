"""The products of one sparse expression block with its design rows, in one compiled pass.

For a CSR block E (n_i cells x m_j features) whose values are already transformed (or
are integer counts transformed by table look-up), X_i (n_i x p) dense and Z_i (n_i x q)::

    X'E (p x m_j),  Z'E (q x m_j),  Ynorm = colsums(E^2) (m_j)

Designs are mostly zeros: factor indicators in X, one subject indicator per row of Z. Let
A = [X_s, Z], X_s the columns of X that are mostly zero, and X_d the others (the intercept,
log library size, age): each is a short dense row per cell. Then

- **grouped** (few distinct rows of A, e.g. at 2,000 genes or cells sorted by subject
  within few cell types): cells whose rows of A are identical (same cell type, treatment
  and subject) form a group g, and A'E = A_g' S with S (n_groups x m_j) the sum of E's
  rows in each group. The pass over E adds each value to one row of S (and its square to
  Ynorm, its products with the first three columns of X_d to E'X_d); A_g'S is a small
  sparse product afterwards. Grouped only when S fits a cache (``_ORDER_BYTES``).
- **per cell, grouped fixed-effect rows** (the atlas case: 259 donors x 29 states): when
  each cell has one entry of Z (a subject indicator, or one slope), cells whose rows of
  X_s are alike form groups, and each value is added once to its group's sums and once
  to its subject's row of Z'E (:mod:`flashmm_dask.stats.cell_pass`); X_s'E is formed
  from the group sums when the running sums are read.
- **per cell** (otherwise, e.g. two random components): A'E costs one multiply-add per
  pair of non-zeros of a row of E and of the same row of A, added straight into the
  caller's running sums (:class:`BlockSums`).

The first and the last are one loop, :func:`_scatter_products`, compiled with numba
(``njit(nogil=True, cache=True)``): in the grouped case A is the cell-to-group
indicator (and the usual grouped case, with at most three dense columns of X, has its
own lighter loop, :func:`_group_sums`). Per cell, cells are visited subject by subject
(by their last column of A) when the rows added to are larger than a cache.

Integer counts (or integer-valued floats) below ``_LOOKUP_MAX`` are transformed inside the
pass by table look-up (log2(1 + k), or k itself), so a block is never converted to float64
or copied. The codes are checked (integers in the table, column indices strictly
increasing) before anything is added to the running sums (by the group loop as it goes,
into its small group sums); a block that does not fit (duplicates to sum, values outside
the table) adds nothing and the caller takes the general path (canonical float64 values,
checked and transformed with NumPy).

Without numba the same sums come from scipy's sparse products.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

from flashmm_dask.stats import cell_pass
from flashmm_dask.stats.block_sums import BlockSums

__all__ = ["BlockSums", "compiled", "dense_as_csr", "lookup_table", "sparse_products"]

logger = logging.getLogger(__name__)

# integer values below this are transformed by table look-up (the one table of the
# package: stats.blocks looks values up in it too)
_LOOKUP_MAX = 1 << 16
# columns of X non-zero in more than this fraction of a chunk's cells are multiplied as
# dense columns; the others are in A with Z
_DENSE_COLUMN = 0.5
# cells are grouped when their group sums (n_groups x m_j float64) are at most this, and
# visited by subject when the rows of A'E added to per cell are larger than this
_ORDER_BYTES = 4 << 20
# the tables of _LOOKUP_MAX entries, by transform (built once per process)
_TABLES: dict[str, np.ndarray] = {}


def lookup_table(transform: str) -> np.ndarray | None:
    """The transform of each integer 0 .. _LOOKUP_MAX - 1 as float64, for the transforms
    that map a count to a value alone ("none": k, "log2p1": log2(1 + k)); None otherwise."""
    if transform not in ("none", "log2p1"):
        return None
    if transform not in _TABLES:
        k = np.arange(float(_LOOKUP_MAX))
        _TABLES[transform] = k if transform == "none" else np.log2(k + 1.0)
    return _TABLES[transform]


def sparse_products(
    E: sp.csr_matrix,
    X: np.ndarray,
    Z: sp.spmatrix | np.ndarray,
    table: np.ndarray | None = None,
    into: BlockSums | None = None,
) -> BlockSums | None:
    """Add (X'E, Z'E, colsums(E^2)) of a CSR block E (n_i x m_j), X (n_i x p) dense, to
    running sums.

    Parameters
    ----------
    E : scipy.sparse.csr_matrix
        With a ``table``: the stored values as read (any numeric dtype, duplicates
        allowed); value t of the block is ``table[E.data[t]]``. Without: the transformed
        float64 values, canonical (no duplicate entries).
    X : ndarray, shape (n_i, p)
    Z : scipy.sparse matrix or ndarray, shape (n_i, q)
    table : ndarray, optional
        From :func:`lookup_table`.
    into : BlockSums, optional
        Running sums to add the products to (fresh ones without).

    Returns
    -------
    BlockSums or None
        The sums added to (read them with :meth:`BlockSums.partials`); None (only with a
        table; nothing is added) when a stored value is not an integer in
        [0, len(table)) or a row's indices are not strictly increasing: then transform
        the block and call again without a table.
    """
    n_i, m = E.shape
    sums = BlockSums(X.shape[1], Z.shape[1], m) if into is None else into

    def refused() -> bool:
        # checked before anything is added to the sums (the group loop checks as it goes)
        return table is not None and not _fits_table(E, table)

    Zs = sp.csr_matrix(Z, dtype=np.float64)
    kernel = _compiled("_scatter_products")
    if kernel is None:
        if refused():
            return None
        if table is not None:
            E = sp.csr_matrix((table[E.data.astype(np.intp)], E.indices, E.indptr), shape=E.shape)
        Ynorm = np.bincount(E.indices, weights=E.data * E.data, minlength=m)
        sums.add(np.asarray(E.T @ X).T, (Zs.T @ E).toarray(), Ynorm)
        return sums
    dense = np.count_nonzero(X, axis=0) > _DENSE_COLUMN * n_i
    groups = None
    if _few_rows(Zs, min(E.nnz, _ORDER_BYTES // 8) // max(m, 1)):
        groups = _row_groups(
            np.ascontiguousarray(X[:, ~dense]),
            Zs,
            max_groups=min(E.nnz, _ORDER_BYTES // 8) // max(m, 1),
        )
    if groups is None:
        if refused():
            return None
        if cell_pass.one_entry_rows(Zs) and cell_pass.add_by_random_entry(
            _compiled, E, table, X, dense, Zs, sums
        ):
            return sums
    sums.direct()  # the paths below add every column of X'E themselves
    Xd = X[:, dense]
    Xr = np.ascontiguousarray(Xd[:, 3:])
    block = _block(E, table, Xd)
    D = np.zeros((m, 4))  # [colsums(E^2), E'X3]
    rest = np.zeros((Xr.shape[1], m))
    if groups is not None:
        # few distinct rows of [X_s, Z] (cells of the same cell type, treatment and
        # subject): E's rows summed by group (S, small enough for a cache), then A_g'S
        Xs = X[:, ~dense]
        group, first = groups
        S = np.zeros((len(first) + 1, m))
        group_sums = _compiled("_group_sums")
        if Xr.shape[1] == 0 and group_sums is not None:  # the lighter loop of the same sums
            if group_sums(block, group, S, D, Xd.shape[1]):
                return None  # a code off the table: nothing added
        else:
            if refused():
                return None
            A = _indicator(group, len(first))
            _scatter(kernel, block, Xr, A, A.indices, np.arange(n_i), S, D, rest, Xd.shape[1])
        sums.XY[~dense] += sp.csr_matrix(Xs[first]).T @ S[:-1]
        sums.ZY[...] += Zs[first].T @ S[:-1]
    else:
        # per cell: each entry of a row of A = [X_s, Z] is added to its row of the sums
        A = sp.hstack([sp.csr_matrix(X[:, ~dense]), Zs], format="csr", dtype=np.float64)
        A.eliminate_zeros()
        target = np.concatenate([np.flatnonzero(~dense), sums.p + np.arange(sums.q)])
        order = np.arange(n_i)
        if A.shape[1] * m * 8 > _ORDER_BYTES:
            # visiting cells by their last column of A (the random-effect level: Z's
            # columns come last and have the most levels) keeps the rows being added to
            # in cache, which pays when they are much larger than a core's cache and
            # costs when not (the rows of E are then read out of order). By the first
            # column (a cell type of X) the subject rows, most of Z'E, were written at
            # random: 1.3-1.8x slower at 259 subjects x 11,596 genes
            last = np.full(n_i, A.shape[1], dtype=np.int64)
            has = np.diff(A.indptr) > 0
            last[has] = A.indices[A.indptr[1:][has] - 1]
            order = np.argsort(last, kind="stable")
        _scatter(kernel, block, Xr, A, target[A.indices], order, sums.rows, D, rest, Xd.shape[1])
    sums.XY[dense] += np.concatenate([D[:, 1:].T, rest])[: Xd.shape[1]]
    sums.Ynorm += D[:, 0]
    return sums


def _block(E: sp.csr_matrix, table: np.ndarray | None, Xd: np.ndarray) -> tuple[np.ndarray, ...]:
    """The block as the compiled loops take it: (indptr, indices, codes, table, values,
    X3), with codes (the stored values, to look up in ``table``) or values (transformed,
    without a table), and X3 the first three columns of X_d (zero padded)."""
    codes, values = (E.data, np.zeros(0)) if table is not None else (np.zeros(0, np.int32), E.data)
    return (
        E.indptr.astype(np.int64, copy=False),
        E.indices,
        codes,
        np.zeros(0) if table is None else table,
        values,
        _first_dense(Xd),
    )


def _few_rows(Z: sp.csr_matrix, max_groups: int) -> bool:
    """Whether the rows of Z might have at most ``max_groups`` distinct values (a cheap
    bound: the columns used, over the most entries in a row)."""
    if max_groups < 1:
        return False
    if Z.nnz == 0:
        return True
    used = np.count_nonzero(np.bincount(Z.indices, minlength=Z.shape[1]))
    return bool(used <= max_groups * int(np.diff(Z.indptr).max()))


def _scatter(
    kernel: Callable[..., Any],
    block: tuple[np.ndarray, ...],
    Xr: np.ndarray,
    A: sp.csr_matrix,
    rows: np.ndarray,
    order: np.ndarray,
    out: np.ndarray,
    D: np.ndarray,
    rest: np.ndarray,
    n_dense: int,
) -> None:
    """Run :func:`_scatter_products`: entry s of A (CSR) adds to row ``rows[s]`` of out."""
    kernel(
        block,
        Xr,
        A.indptr.astype(np.int64, copy=False),
        rows.astype(np.int64, copy=False),
        A.data,
        order,
        out,
        D,
        rest,
        n_dense,
        int(np.diff(A.indptr).max(initial=0)),
    )


def _indicator(group: np.ndarray, n_groups: int) -> sp.csr_matrix:
    """The (n, n_groups) CSR indicator of each row's group."""
    n = len(group)
    indptr = np.arange(n + 1, dtype=np.int64)
    return sp.csr_matrix((np.ones(n), group, indptr), shape=(n, n_groups))


def dense_as_csr(values: np.ndarray, max_fraction: float) -> sp.csr_matrix | None:
    """A 2-D numeric array as CSR (stored dtype) when at most ``max_fraction`` of its
    values are non-zero, else None."""
    if values.ndim != 2 or values.dtype.kind not in "iuf":
        return None
    counter, filler = _compiled("_row_counts"), _compiled("_fill_rows")
    if counter is None or filler is None:
        if np.count_nonzero(values) > max_fraction * values.size:
            return None
        return sp.csr_matrix(values)
    values = np.ascontiguousarray(values)
    indptr = np.zeros(values.shape[0] + 1, dtype=np.int64)
    np.cumsum(counter(values), out=indptr[1:])
    if indptr[-1] > max_fraction * values.size:
        return None
    indices, data = filler(values, indptr)
    return sp.csr_matrix((data, indices, indptr), shape=values.shape)


def _fits_table(E: sp.csr_matrix, table: np.ndarray) -> bool:
    """Whether every stored value is an integer in [0, len(table)), E canonical."""
    check = _compiled("_codes_fit")
    if check is not None:
        return bool(check(E.indptr, E.indices, E.data, table.size))
    data = E.data
    if not data.size:
        return E.has_canonical_format
    low, high = data.min(), data.max()
    if not (low >= 0 and high < table.size):
        return False
    if data.dtype.kind == "f" and not np.array_equal(data, np.floor(data)):
        return False
    return bool(E.has_canonical_format)


def _first_dense(Xd: np.ndarray) -> np.ndarray:
    """The first three columns of X_d, padded with zeros to three, C-contiguous."""
    out = np.zeros((Xd.shape[0], 3))
    k = min(3, Xd.shape[1])
    out[:, :k] = Xd[:, :k]
    return out


def _row_groups(
    Xs: np.ndarray, Zs: sp.csr_matrix, max_groups: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """(group of each cell, its first cell per group) over the rows of A = [X_s, Z], or
    None when there are more than ``max_groups`` distinct rows (or numba is missing)."""
    import pandas as pd

    keys_of, first_of = _compiled("_row_keys"), _compiled("_first_rows")
    if keys_of is None or first_of is None or max_groups < 1:
        return None
    x_bits = Xs.view(np.int64)
    z_indptr = Zs.indptr.astype(np.int64, copy=False)
    z_bits = Zs.data.view(np.int64)
    keys = keys_of(x_bits, z_indptr, Zs.indices, z_bits)
    group, uniques = pd.factorize(keys)
    if len(uniques) > max_groups:
        return None
    group = group.astype(np.int64, copy=False)
    first, same = first_of(x_bits, z_indptr, Zs.indices, z_bits, group, len(uniques))
    if not same:  # two distinct rows with the same 64-bit key
        return None
    return group, first


# -- compiled loops (plain Python here; numba compiles them, see _compiled) -------------


def _scatter_products(
    block: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    Xr: np.ndarray,
    a_indptr: np.ndarray,
    a_rows: np.ndarray,
    a_values: np.ndarray,
    order: np.ndarray,
    out: np.ndarray,
    D: np.ndarray,
    rest: np.ndarray,
    n_dense: int,
    a_max: int,
) -> None:
    """Add A'E to the rows of ``out``, [colsums(E^2), E'X3] to D (m, 4) and E'Xr to
    ``rest`` (p_r, m), in one pass.

    ``block`` is (indptr, indices, codes, table, values, X3): E (n x m) as CSR, and X3
    (n, 3) the first three dense columns of X (zero padded). Value t of E is
    ``table[codes[t]]`` when ``table`` is not empty (codes checked to be integers in
    [0, len(table)) by the caller), else ``values[t]``. A (n x
    n_A) is CSR (a_indptr, a_values) whose entry s is added to row ``a_rows[s]`` of
    ``out``; the last row of ``out`` takes zero-weight terms. Xr (n, p_r) holds the dense
    columns after the first three. Up to four entries of a row of A and the three columns
    of X3 are applied inline, in the one pass over the row's values (the atlas model has
    up to four: sex, cell state, state:condition, donor); further ones need one more pass
    over the row each. ``order`` is the order in which the rows are visited and ``a_max``
    the most entries in a row of A; ``n_dense`` is the number of columns of X3 that are
    not padding.
    """
    indptr, indices, codes, table, values, X3 = block
    spare = out.shape[0] - 1
    lookup = table.size > 0
    keep_row = a_max > 4 or Xr.shape[1] > 0
    longest = 0
    if keep_row:  # the row's values, for the entries of A and columns of X after those inline
        for c in range(indptr.shape[0] - 1):
            longest = max(longest, indptr[c + 1] - indptr[c])
    row = np.empty(longest)
    for c in order:
        lo = indptr[c]
        hi = indptr[c + 1]
        s0 = a_indptr[c]
        na = a_indptr[c + 1] - s0
        # the spare row with weight 0 where the row of A has fewer entries
        k0 = a_rows[s0] if na > 0 else spare
        a0 = a_values[s0] if na > 0 else 0.0
        k1 = a_rows[s0 + 1] if na > 1 else spare
        a1 = a_values[s0 + 1] if na > 1 else 0.0
        k2 = a_rows[s0 + 2] if na > 2 else spare
        a2 = a_values[s0 + 2] if na > 2 else 0.0
        k3 = a_rows[s0 + 3] if na > 3 else spare
        a3 = a_values[s0 + 3] if na > 3 else 0.0
        x0 = X3[c, 0]
        x1 = X3[c, 1]
        x2 = X3[c, 2]
        for t in range(lo, hi):
            j = indices[t]
            v = table[int(codes[t])] if lookup else values[t]
            out[k0, j] += a0 * v
            D[j, 0] += v * v
            D[j, 1] += x0 * v
            # branches that go the same way for every value of the row (or block)
            if na > 1:
                out[k1, j] += a1 * v
                if na > 2:
                    out[k2, j] += a2 * v
                    if na > 3:
                        out[k3, j] += a3 * v
            if n_dense > 1:
                D[j, 2] += x1 * v
                if n_dense > 2:
                    D[j, 3] += x2 * v
            if keep_row:
                row[t - lo] = v
        for r in range(Xr.shape[1]):
            xr = Xr[c, r]
            for t in range(lo, hi):
                rest[r, indices[t]] += xr * row[t - lo]
        for s in range(s0 + 4, s0 + na):
            ks = a_rows[s]
            av = a_values[s]
            for t in range(lo, hi):
                out[ks, indices[t]] += av * row[t - lo]


def _group_sums(
    block: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    group: np.ndarray,
    out: np.ndarray,
    D: np.ndarray,
    n_dense: int,
) -> int:
    """:func:`_scatter_products` when A is the indicator of ``group`` (each row of E is
    added to the row of its group) and X has at most three dense columns: the same sums
    (into ``out`` and D, fresh: the group sums are small), in a loop that does only that
    and checks the codes as it goes (status 1, stopping, when a code is not an integer in
    the table or a row's indices are not strictly increasing; else 0)."""
    indptr, indices, codes, table, values, X3 = block
    lookup = table.size > 0
    size = table.size
    for c in range(indptr.shape[0] - 1):
        g = group[c]
        x0 = X3[c, 0]
        x1 = X3[c, 1]
        x2 = X3[c, 2]
        previous = -1
        for t in range(indptr[c], indptr[c + 1]):
            j = indices[t]
            if lookup:
                x = codes[t]
                if not (x >= 0 and x < size) or j <= previous:
                    return 1
                kx = int(x)
                if kx != x:
                    return 1
                v = table[kx]
                previous = j
            else:
                v = values[t]
            out[g, j] += v
            D[j, 0] += v * v
            D[j, 1] += x0 * v
            if n_dense > 1:
                D[j, 2] += x1 * v
                if n_dense > 2:
                    D[j, 3] += x2 * v
    return 0


def _row_keys(
    x_bits: np.ndarray, z_indptr: np.ndarray, z_indices: np.ndarray, z_bits: np.ndarray
) -> np.ndarray:
    """A 64-bit key (FNV-1a style) of each row of [X_s, Z]: X_s's bits (n, p_s) and
    Z's CSR entries (column, value bits)."""
    n = x_bits.shape[0]
    keys = np.empty(n, dtype=np.int64)
    prime = np.int64(1099511628211)
    for c in range(n):
        h = np.int64(-3750763034362895579)
        for r in range(x_bits.shape[1]):
            h = (h ^ x_bits[c, r]) * prime
        for s in range(z_indptr[c], z_indptr[c + 1]):
            h = (h ^ np.int64(z_indices[s])) * prime
            h = (h ^ z_bits[s]) * prime
        keys[c] = h
    return keys


def _first_rows(
    x_bits: np.ndarray,
    z_indptr: np.ndarray,
    z_indices: np.ndarray,
    z_bits: np.ndarray,
    group: np.ndarray,
    n_groups: int,
) -> tuple[np.ndarray, bool]:
    """The first row of each group, and whether every row equals its group's first."""
    first = np.full(n_groups, -1, dtype=np.int64)
    for c in range(group.shape[0]):
        g = group[c]
        f = first[g]
        if f < 0:
            first[g] = c
            continue
        for r in range(x_bits.shape[1]):
            if x_bits[c, r] != x_bits[f, r]:
                return first, False
        lo, hi, f_lo = z_indptr[c], z_indptr[c + 1], z_indptr[f]
        if hi - lo != z_indptr[f + 1] - f_lo:
            return first, False
        for s in range(hi - lo):
            if z_indices[lo + s] != z_indices[f_lo + s] or z_bits[lo + s] != z_bits[f_lo + s]:
                return first, False
    return first, True


def _row_counts(values: np.ndarray) -> np.ndarray:
    """The number of non-zeros in each row of a 2-D array."""
    n, m = values.shape
    counts = np.zeros(n, dtype=np.int64)
    for i in range(n):
        k = 0
        for j in range(m):
            k += values[i, j] != 0
        counts[i] = k
    return counts


def _fill_rows(values: np.ndarray, indptr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR indices and data of a 2-D array, given its indptr."""
    n, m = values.shape
    indices = np.empty(indptr[n], dtype=np.int32)
    data = np.empty(indptr[n], dtype=values.dtype)
    k = 0
    for i in range(n):
        for j in range(m):
            v = values[i, j]
            if v != 0:
                indices[k] = j
                data[k] = v
                k += 1
    return indices, data


_COMPILED: dict[str, Any] = {}  # by the loop's name (unique among the reduction's loops)


def compiled(loop: Callable[..., Any]) -> Callable[..., Any] | None:
    """A loop of the reduction compiled by :func:`~flashmm_dask.numerics.jit.jit` (once,
    without the GIL), or None without numba (the callers then take scipy's products)."""
    name = loop.__name__
    if name not in _COMPILED:
        try:
            from flashmm_dask.numerics.jit import jit
        except ImportError:  # numba comes with dask-ml; without it scipy does the products
            logger.info("numba is not installed: sparse products use scipy (slower)")
            _COMPILED[name] = None
        else:
            _COMPILED[name] = jit(loop, nogil=True)
    return _COMPILED[name]


def _compiled(name: str) -> Callable[..., Any] | None:
    """The loop ``name`` of this module or of :mod:`~flashmm_dask.stats.cell_pass`,
    :func:`compiled`."""
    return compiled(globals()[name] if name in globals() else getattr(cell_pass, name))
