"""The products of one sparse expression block with the designs of all its strata, in one
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
``out`` being added to stay in cache. Integer counts are transformed by table look-up, as
in :func:`flashmm_dask.stats.products.sparse_products`; the values are checked (integers
in the table, strictly increasing column indices) before anything is added, so a block
that does not fit leaves the sums as they were and the caller takes the per-stratum path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = ["strata_products"]

logger = logging.getLogger(__name__)


def strata_products(
    E: sp.csr_matrix,
    table: np.ndarray,
    parts: Sequence[tuple[int, np.ndarray, np.ndarray, sp.csr_matrix]],
    bases: np.ndarray,
    out: np.ndarray,
    Yn: np.ndarray,
    nnz: np.ndarray,
) -> bool:
    """Add every stratum's X'E, Z'E, colsums(E^2) and non-zero counts of one block to
    the running sums ``out``, ``Yn`` and ``nnz`` (in place; see the module docstring).

    Parameters
    ----------
    E : scipy.sparse.csr_matrix
        The block as read (n_i cells x m features, stored values; any numeric dtype);
        value t is ``table[E.data[t]]``.
    table : ndarray
        From :func:`flashmm_dask.stats.products.lookup_table`.
    parts : sequence of (s, rows, X_s, Z_s)
        Per stratum present in the block: its index, the rows of E of its cells, and its
        design rows (dense n_s x p_s, CSR n_s x q_s).
    bases : ndarray
        The first row of each stratum in ``out``.
    out, Yn, nnz : ndarray
        The running sums (R x m float64, S x m float64, S x m int64).

    Returns
    -------
    bool
        False (nothing added) when a value is not an integer in the table, a row's
        column indices are not strictly increasing, or numba is not installed.
    """
    kernel = _kernel()
    if kernel is None or not parts:
        return kernel is not None
    indptr, indices, values, cells, strata = [np.zeros(1, np.int64)], [], [], [], []
    for s, rows, X, Z in parts:
        A = sp.hstack([sp.csr_matrix(X), Z], format="csr", dtype=np.float64)
        A.eliminate_zeros()
        indptr.append(A.indptr[1:].astype(np.int64) + indptr[-1][-1])
        indices.append(A.indices.astype(np.int64) + int(bases[s]))
        values.append(A.data)
        cells.append(rows)
        strata.append(np.full(len(rows), s, dtype=np.int64))
    a_indptr = np.concatenate(indptr)
    a_indices = np.concatenate(indices)
    # each row's last column of A: its subject's (Z comes last), stratum by stratum
    last = np.full(len(a_indptr) - 1, -1, dtype=np.int64)
    has = np.diff(a_indptr) > 0
    last[has] = a_indices[a_indptr[1:][has] - 1]
    order = np.argsort(last, kind="stable")
    status = kernel(
        E.indptr.astype(np.int64, copy=False),
        E.indices,
        E.data,
        table,
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
    return status == 0


# -- the compiled loop (plain Python here; numba compiles it, see _kernel) --------------


def _strata_scatter(
    indptr: np.ndarray,
    indices: np.ndarray,
    codes: np.ndarray,
    table: np.ndarray,
    cells: np.ndarray,
    strata: np.ndarray,
    a_indptr: np.ndarray,
    a_indices: np.ndarray,
    a_values: np.ndarray,
    order: np.ndarray,
    out: np.ndarray,
    Yn: np.ndarray,
    nnz: np.ndarray,
) -> int:
    """See :func:`strata_products`: row i of A is row ``cells[i]`` of E, in stratum
    ``strata[i]``; rows are visited in ``order``. Returns 1 (nothing added) when a value
    does not fit the table or a row's indices are not strictly increasing, else 0."""
    size = table.size
    longest = 0
    for i in range(cells.shape[0]):
        c = cells[i]
        lo = indptr[c]
        hi = indptr[c + 1]
        longest = max(longest, hi - lo)
        previous = -1
        for t in range(lo, hi):
            j = indices[t]
            x = codes[t]
            if not (x >= 0 and x < size) or j <= previous:
                return 1
            if int(x) != x:
                return 1
            previous = j
    row = np.empty(longest)
    for i in order:
        c = cells[i]
        s = strata[i]
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
    return 0


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
