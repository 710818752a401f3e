"""The products of sparse expression blocks with the designs of all their strata, in one
compiled pass (the per-chunk work of :mod:`flashmm_dask.stats.reduce_strata`).

Stratum s has its own design: X_s (its cells x p_s) and Z_s (its cells x q_s). Its
statistics X_s'E_s, Z_s'E_s, colsums(E_s^2) and the non-zero counts of E_s are rows of
running sums shared by all strata: ``out`` (R x m, stratum s's rows
``bases[s] .. bases[s + 1]``, X first), ``Yn`` and ``nnz`` (S x m). Each selected cell c
of stratum s adds, for each value E[c, j] of its row, a * E[c, j] to X'E or Z'E for each
non-zero a of its design rows, E[c, j]^2 to Ynorm and 1 to the count: all in one pass over
the value, straight into sums the size of the statistics (nothing of their size is
allocated per cell, and the rows of E are not copied per stratum).

Columns of X set by the subject (the intercept, age, sex, a donor's condition) may be
left out of the pass (``skip``; the caller forms their X'E from Z'E,
:mod:`flashmm_dask.stats.subject_columns`): with donor-level covariates only the log
library size is left of X_s, one multiply-add per value.

Two things keep the sums being added to in cache:

- the per-feature sums of a stratum that every one of its cells adds to (Ynorm, the count
  and the first ``_INLINE`` columns of X'E that are not left out: the covariates) are
  interleaved, ``T[s, j] = [Ynorm, count, X'E_0 .. X'E_4, unused]`` (64 bytes, one cache
  line per feature; 32 bytes, ``[Ynorm, count, X'E_0, X'E_1]``, where no stratum adds
  more than two columns there), and added into ``out``, ``Yn`` and ``nnz`` after the
  pass; each value then touches one line of T and the line of its subject's row of Z'E;
- cells are visited by their last column of Z (stratum, then subject), so that a subject's
  row of Z'E gets all its cells in a row. With many strata these rows are far larger than
  a cache (29 states x 259 donors x 11,596 genes is 0.7 GB) and a chunk has about one cell
  per (stratum, subject): each value would then be added to a line fetched from memory
  for it alone. So one pass takes the cells of several blocks (read where they lie, from
  a list of blocks: nothing is copied); each pass streams the rows of Z'E it adds to
  through memory about once, so the memory traffic per value falls about as one over
  the number of blocks (the caller keeps waiting blocks in 16-bit integers where they
  fit, twice the cells a pass for the same memory).

Integer counts are transformed by table look-up, as in
:func:`flashmm_dask.stats.products.sparse_products`; each block is checked first
(:func:`fits_table`: integers in the table, strictly increasing column indices), and a
block that does not fit is reduced by the caller stratum by stratum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from flashmm_dask.stats.products import _fits_table, compiled

__all__ = ["Packed", "fits_table", "strata_products"]

# the columns of X whose sums are interleaved with Ynorm and the count in T, whose rows
# (Ynorm, count, those columns, one unused) fill a 64-byte cache line (the compiled loop
# adds five: x0 .. x4)
_INLINE = 5
_T_WIDTH = _INLINE + 3
# the width of T's rows where no stratum adds more than two columns of X in the pass
_T_NARROW = 4


def fits_table(E: sp.csr_matrix, table: np.ndarray) -> bool:
    """Whether the compiled pass can take block E: every stored value an integer in
    [0, len(table)), each row's column indices strictly increasing, and numba installed."""
    return _kernel() is not None and _fits_table(E, table)


@dataclass(frozen=True)
class Packed:
    """A CSR block of counts as it waits for the compiled pass: its column indices and
    codes (each an integer in the look-up table, checked by :func:`fits_table`) in 16-bit
    integers where they fit (at most 65,536 features and table entries), else as read:
    half the memory of int32 indices and codes, so a pass over the blocks that fit in a
    bound of memory takes twice the cells."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]
    dtype: np.dtype

    @classmethod
    def of(cls, E: sp.csr_matrix, table: np.ndarray) -> Packed:
        narrow = E.shape[1] <= 1 << 16 and len(table) <= 1 << 16
        indices = E.indices.astype(np.uint16) if narrow else E.indices
        data = E.data.astype(np.uint16) if narrow else E.data
        return cls(E.indptr, indices, data, (int(E.shape[0]), int(E.shape[1])), E.data.dtype)

    @property
    def nbytes(self) -> int:
        """The stored values and indices."""
        return int(self.data.nbytes + self.indices.nbytes)

    def csr(self) -> sp.csr_matrix:
        """The block as read."""
        return sp.csr_matrix(
            (self.data.astype(self.dtype), self.indices.astype(np.int32), self.indptr),
            shape=self.shape,
        )


def strata_products(
    blocks: Sequence[Any],
    table: np.ndarray,
    parts: Sequence[tuple[int, np.ndarray, np.ndarray, np.ndarray, Any, np.ndarray | None]],
    bases: np.ndarray,
    out: np.ndarray,
    Yn: np.ndarray,
    nnz: np.ndarray,
) -> bool:
    """Add every stratum's X'E, Z'E, colsums(E^2) and non-zero counts of some blocks to
    the running sums ``out``, ``Yn`` and ``nnz`` (in place; see the module docstring).

    Parameters
    ----------
    blocks : sequence of CSR blocks
        The blocks as read (cells x m features, stored values, each passed by
        :func:`fits_table`): anything with a CSR matrix's ``indptr``, ``indices`` and
        ``data`` (of any integer or float types); value t of a block is
        ``table[E.data[t]]``.
    table : ndarray
        From :func:`flashmm_dask.stats.products.lookup_table`.
    parts : sequence of (s, block, rows, X_s, Z_s, skip)
        Per stratum present in the blocks: its index, the block (index into ``blocks``)
        and row of that block of each of its cells, its design rows (dense n_s x p_s,
        CSR n_s x q_s), and the columns of X_s left out (bool p_s; None: none).
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

    n_rows = sum(len(part[2]) for part in parts)
    # the columns of X added in the pass over the values: the first _INLINE of those not
    # left out go to T (zeros where a stratum has fewer), Z and the others to rows of out
    added = [
        np.arange(X.shape[1]) if skip is None else np.flatnonzero(~np.asarray(skip))
        for _, _, _, X, _, skip in parts
    ]
    n_head = max(min(len(k), _INLINE) for k in added)
    head = np.zeros((n_rows, _INLINE))
    rest, which, cells, strata, last = [], [], [], [], []
    first = 0
    for (s, block, rows, X, Z, _), columns in zip(parts, added, strict=True):
        p = X.shape[1]
        inline, beyond = columns[:_INLINE], columns[_INLINE:]
        head[first : first + len(rows), : len(inline)] = X[:, inline]
        first += len(rows)
        Zs = sp.csr_matrix(Z, dtype=np.float64)
        Zs.eliminate_zeros()
        Zs.sort_indices()
        tail = sp.hstack([Zs, sp.csr_matrix(X[:, beyond])], format="csr")
        tail.eliminate_zeros()
        tail.sort_indices()  # Z's entries first: the first is added in the pass over values
        base = int(bases[s])
        rows_of = np.concatenate([base + p + np.arange(Zs.shape[1]), base + beyond])
        rest.append((tail.indptr, rows_of[tail.indices], tail.data))
        # the visit's order: by the last column of Z (the subject), stratum by stratum
        key = np.full(Zs.shape[0], -1, dtype=np.int64)
        has = np.diff(Zs.indptr) > 0
        key[has] = base + p + Zs.indices[Zs.indptr[1:][has] - 1]
        last.append(key)
        which.append(block)
        cells.append(rows)
        strata.append(np.full(len(rows), s, dtype=np.int64))
    r_indptr, r_rows, r_values = _stacked(rest)
    # the sort is stable: a subject's cells are visited block by block
    order = np.argsort(np.concatenate(last), kind="stable")
    # one element type per list (numba's typed lists): the blocks' common dtypes
    index_type = np.result_type(*(E.indices.dtype for E in blocks))
    code_type = np.result_type(*(E.data.dtype for E in blocks))
    E_indptr, E_indices, E_codes = List(), List(), List()
    for E in blocks:
        E_indptr.append(np.ascontiguousarray(E.indptr, dtype=np.int64))
        E_indices.append(np.ascontiguousarray(E.indices, dtype=index_type))
        E_codes.append(np.ascontiguousarray(E.data, dtype=code_type))
    T = np.zeros((len(Yn), out.shape[1], _T_NARROW if n_head <= 2 else _T_WIDTH))
    kernel(
        (E_indptr, E_indices, E_codes, table),
        np.concatenate(which).astype(np.int64, copy=False),
        np.concatenate(cells).astype(np.int64, copy=False),
        np.concatenate(strata),
        (head, n_head),
        (r_indptr, r_rows, r_values),
        order,
        T,
        out,
    )
    for (s, *_), columns in zip(parts, added, strict=True):
        inline = columns[:_INLINE]
        out[int(bases[s]) + inline] += T[s, :, 2 : 2 + len(inline)].T
        Yn[s] += T[s, :, 0]
        nnz[s] += T[s, :, 1].astype(np.int64)
    return True


def _stacked(
    pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSR arrays (indptr, columns, values) of the rows of several CSR pieces, one
    under the other (int64 indptr and columns)."""
    indptr = [np.zeros(1, np.int64)]
    for piece_indptr, _, _ in pieces:
        indptr.append(piece_indptr[1:].astype(np.int64) + indptr[-1][-1])
    return (
        np.concatenate(indptr),
        np.concatenate([c for _, c, _ in pieces]).astype(np.int64, copy=False),
        np.concatenate([v for _, _, v in pieces]),
    )


# -- the compiled loop (plain Python here; numba compiles it, see _kernel) --------------


def _strata_scatter(
    E: tuple[Any, Any, Any, np.ndarray],
    blocks: np.ndarray,
    cells: np.ndarray,
    strata: np.ndarray,
    head: tuple[np.ndarray, int],
    rest: tuple[np.ndarray, np.ndarray, np.ndarray],
    order: np.ndarray,
    T: np.ndarray,
    out: np.ndarray,
) -> None:
    """See :func:`strata_products`.

    ``E`` is (indptr, indices, codes, table): row i of the design is row ``cells[i]`` of
    block ``blocks[i]`` (its CSR arrays ``indptr[b]``, ``indices[b]``, ``codes[b]``;
    value ``table[code]``), in stratum ``strata[i]``; rows are visited in ``order``.
    ``head`` is (H, n_head): ``H[i]`` (n x _INLINE) holds the row's first n_head columns
    of X added in the pass (zeros after), whose sums are columns 2 .. 2 + n_head of
    ``T[s]`` (S x m x width: Ynorm, the count, X'E of those columns; width 4 when
    n_head <= 2, else _T_WIDTH);
    ``rest`` (CSR) the row's other entries as rows of ``out``. The first entry of
    ``rest`` (the subject) and ``head`` are added in the one pass over the row's values
    (a zero of ``head`` adds 0: the line of T is there anyway); further entries of
    ``rest`` in one more pass each.
    """
    E_indptr, E_indices, E_codes, table = E
    H, n_head = head
    r_indptr, r_rows, r_values = rest
    longest = 0
    for b in range(len(E_indptr)):
        indptr = E_indptr[b]
        for c in range(indptr.shape[0] - 1):
            longest = max(longest, indptr[c + 1] - indptr[c])
    row = np.empty(longest)
    for i in order:
        indptr = E_indptr[blocks[i]]
        indices = E_indices[blocks[i]]
        codes = E_codes[blocks[i]]
        lo = indptr[cells[i]]
        hi = indptr[cells[i] + 1]
        Ts = T[strata[i]]
        x0 = H[i, 0]
        x1 = H[i, 1]
        x2 = H[i, 2]
        x3 = H[i, 3]
        x4 = H[i, 4]
        q0 = r_indptr[i]
        nr = r_indptr[i + 1] - q0
        r0 = r_rows[q0] if nr > 0 else 0
        b0 = r_values[q0] if nr > 0 else 0.0
        for t in range(lo, hi):
            j = indices[t]
            code = codes[t]
            v = table[int(code)]
            Ts[j, 0] += v * v
            if code != 0:
                Ts[j, 1] += 1.0
            # the same way for every value of the pass
            if n_head > 0:
                Ts[j, 2] += x0 * v
                if n_head > 1:
                    Ts[j, 3] += x1 * v
                    if n_head > 2:
                        Ts[j, 4] += x2 * v
                        Ts[j, 5] += x3 * v
                        Ts[j, 6] += x4 * v
            if nr > 0:  # the same way for every value of the row
                out[r0, j] += b0 * v
            row[t - lo] = v
        for k in range(q0 + 1, q0 + nr):
            r = r_rows[k]
            a = r_values[k]
            for t in range(lo, hi):
                out[r, indices[t]] += a * row[t - lo]


def _kernel() -> Callable[..., Any] | None:
    """:func:`_strata_scatter` compiled (without the GIL), or None without numba."""
    return compiled(_strata_scatter)
