"""The products of sparse expression blocks with the designs of all their strata, in one
compiled pass (the per-chunk work of :mod:`flashmm_dask.stats.reduce_strata`).

Stratum s has its own design: X_s (its cells x p_s) and Z_s (its cells x q_s). Its
statistics X_s'E_s, Z_s'E_s, colsums(E_s^2) and the non-zero counts of E_s are rows of
running sums shared by all strata: ``out`` (R x m, stratum s's rows
``bases[s] .. bases[s + 1]``, X first), ``Yn`` and ``nnz`` (S x m). Each selected cell c
of stratum s has one row of A = [X_s, Z_s] (its non-zeros, columns shifted by bases[s]);
the pass adds a * E[c, j] to ``out[col, j]`` for each of them, E[c, j]^2 to ``Yn[s, j]``
and 1 to ``nnz[s, j]``, straight into the running sums: nothing of their size is
allocated or added per chunk, and the rows of E are not copied per stratum.

Cells are visited by their last column of A (stratum, then subject), so that the rows of
``out`` being added to stay in cache. With many strata these rows are far larger than a
cache (29 states x 259 donors x 11,596 genes is 0.7 GB) and a chunk has about one cell
per (stratum, subject): each value would then be added to a line of ``out`` fetched from
memory for it alone. So one pass takes the cells of several blocks at once (their rows
are read where they lie, from a list of blocks: nothing is copied), and a (stratum,
subject) row gets the cells of all of them in a row: the memory traffic per value falls
about as one over the number of blocks.

Integer counts are transformed by table look-up, as in
:func:`flashmm_dask.stats.products.sparse_products`; each block is checked first
(:func:`fits_table`: integers in the table, strictly increasing column indices), and a
block that does not fit is reduced by the caller stratum by stratum.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from flashmm_dask.stats.products import _fits_table

__all__ = ["fits_table", "strata_products"]

logger = logging.getLogger(__name__)


def fits_table(E: sp.csr_matrix, table: np.ndarray) -> bool:
    """Whether the compiled pass can take block E: every stored value an integer in
    [0, len(table)), each row's column indices strictly increasing, and numba installed."""
    return _kernel() is not None and _fits_table(E, table)


def strata_products(
    blocks: Sequence[sp.csr_matrix],
    table: np.ndarray,
    parts: Sequence[tuple[int, np.ndarray, np.ndarray, np.ndarray, sp.csr_matrix]],
    bases: np.ndarray,
    out: np.ndarray,
    Yn: np.ndarray,
    nnz: np.ndarray,
) -> bool:
    """Add every stratum's X'E, Z'E, colsums(E^2) and non-zero counts of some blocks to
    the running sums ``out``, ``Yn`` and ``nnz`` (in place; see the module docstring).

    Parameters
    ----------
    blocks : sequence of scipy.sparse.csr_matrix
        The blocks as read (cells x m features, stored values, each passed by
        :func:`fits_table`); value t of a block is ``table[E.data[t]]``.
    table : ndarray
        From :func:`flashmm_dask.stats.products.lookup_table`.
    parts : sequence of (s, block, rows, X_s, Z_s)
        Per stratum present in the blocks: its index, the block (index into ``blocks``)
        and row of that block of each of its cells, and its design rows (dense
        n_s x p_s, CSR n_s x q_s).
    bases : ndarray
        The first row of each stratum in ``out``.
    out, Yn, nnz : ndarray
        The running sums (R x m float64, S x m float64, S x m int64).

    Returns
    -------
    bool
        False (nothing added) when numba is not installed.
    """
    kernel = _kernel()
    if kernel is None or not parts:
        return kernel is not None
    from numba.typed import List

    indptr, indices, values, which, cells, strata = [np.zeros(1, np.int64)], [], [], [], [], []
    for s, block, rows, X, Z in parts:
        A = sp.hstack([sp.csr_matrix(X), Z], format="csr", dtype=np.float64)
        A.eliminate_zeros()
        indptr.append(A.indptr[1:].astype(np.int64) + indptr[-1][-1])
        indices.append(A.indices.astype(np.int64) + int(bases[s]))
        values.append(A.data)
        which.append(block)
        cells.append(rows)
        strata.append(np.full(len(rows), s, dtype=np.int64))
    a_indptr = np.concatenate(indptr)
    a_indices = np.concatenate(indices)
    # each row's last column of A: its subject's (Z comes last), stratum by stratum; the
    # sort is stable, so a subject's cells are visited block by block
    last = np.full(len(a_indptr) - 1, -1, dtype=np.int64)
    has = np.diff(a_indptr) > 0
    last[has] = a_indices[a_indptr[1:][has] - 1]
    order = np.argsort(last, kind="stable")
    # one element type per list (numba's typed lists): the blocks' common dtypes
    index_type = np.result_type(*(E.indices.dtype for E in blocks))
    code_type = np.result_type(*(E.data.dtype for E in blocks))
    E_indptr, E_indices, E_codes = List(), List(), List()
    for E in blocks:
        E_indptr.append(np.ascontiguousarray(E.indptr, dtype=np.int64))
        E_indices.append(np.ascontiguousarray(E.indices, dtype=index_type))
        E_codes.append(np.ascontiguousarray(E.data, dtype=code_type))
    kernel(
        E_indptr,
        E_indices,
        E_codes,
        table,
        np.concatenate(which).astype(np.int64, copy=False),
        np.concatenate(cells).astype(np.int64, copy=False),
        np.concatenate(strata),
        a_indptr,
        a_indices,
        np.concatenate(values),
        order,
        out,
        Yn,
        nnz,
    )
    return True


# -- the compiled loop (plain Python here; numba compiles it, see _kernel) --------------


def _strata_scatter(
    E_indptr: Sequence[np.ndarray],
    E_indices: Sequence[np.ndarray],
    E_codes: Sequence[np.ndarray],
    table: np.ndarray,
    blocks: np.ndarray,
    cells: np.ndarray,
    strata: np.ndarray,
    a_indptr: np.ndarray,
    a_indices: np.ndarray,
    a_values: np.ndarray,
    order: np.ndarray,
    out: np.ndarray,
    Yn: np.ndarray,
    nnz: np.ndarray,
) -> None:
    """See :func:`strata_products`: row i of A is row ``cells[i]`` of block
    ``blocks[i]`` (its CSR arrays ``E_indptr[b]``, ``E_indices[b]``, ``E_codes[b]``), in
    stratum ``strata[i]``; rows are visited in ``order``."""
    longest = 0
    for b in range(len(E_indptr)):
        indptr = E_indptr[b]
        for c in range(indptr.shape[0] - 1):
            longest = max(longest, indptr[c + 1] - indptr[c])
    row = np.empty(longest)
    for i in order:
        b = blocks[i]
        c = cells[i]
        s = strata[i]
        indptr = E_indptr[b]
        indices = E_indices[b]
        codes = E_codes[b]
        lo = indptr[c]
        hi = indptr[c + 1]
        for t in range(lo, hi):
            j = indices[t]
            x = codes[t]
            v = table[int(x)]
            Yn[s, j] += v * v
            if x != 0:
                nnz[s, j] += 1
            row[t - lo] = v
        for k in range(a_indptr[i], a_indptr[i + 1]):
            r = a_indices[k]
            a = a_values[k]
            for t in range(lo, hi):
                out[r, indices[t]] += a * row[t - lo]


_COMPILED: list[Callable[..., Any] | None] = []


def _kernel() -> Callable[..., Any] | None:
    """:func:`_strata_scatter` compiled (without the GIL), or None without numba."""
    if not _COMPILED:
        try:
            from flashmm_dask.numerics.jit import jit
        except ImportError:  # numba comes with dask-ml; without it, per-stratum products
            _COMPILED.append(None)
        else:
            _COMPILED.append(jit(_strata_scatter, nogil=True))
    return _COMPILED[0]
