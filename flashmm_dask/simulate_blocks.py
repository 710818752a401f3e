"""Drawing the simulated counts block by block: library sizes and sparse NB counts.

Cells come in blocks of ``RNG_BLOCK_CELLS``, each with its own random stream, so that
the data do not depend on the chunking or the threads of :mod:`flashmm_dask.simulate`.
The counts of a run of cells (a chunk, or a piece of one) are drawn by one thread
straight into that run's CSR arrays; pieces are drawn ahead, on ``n_threads`` threads,
while the consumer (the store's writer) works on the chunk before.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from flashmm_dask.errors import InputError
from flashmm_dask.numerics.nb_sparse import Buckets, Scratch, sparse_nb_rows

#: Cells per independent random stream; part of the model's reproducibility contract.
RNG_BLOCK_CELLS = 128
_MAX_LIBSIZE_REDRAWS = 10_000


@dataclass(frozen=True)
class _Model:
    """Everything but the counts: O(n_cells + n_subjects * n_genes) memory.

    The NB mean of cell c and gene g is base[s, g] effect[e, g] lib[c] (s the cell's
    subject, e its effect class): base is (n_subjects, n_genes), mu_g e^{b_sg}, held in
    ``buckets`` (:func:`~flashmm_dask.numerics.nb_sparse.gene_buckets` of base and the
    maxima of effect); effect is (n_celltypes + 1, n_genes), e^{beta_g} in the row of its
    cell type, the last row ones (untreated cells), ``varies`` marking its columns that
    are not all ones; lib the library size over its geometric mean.
    """

    obs: pd.DataFrame
    var: pd.DataFrame
    uns: dict[str, Any]
    effect: np.ndarray
    varies: np.ndarray
    buckets: Buckets
    dispersion: np.ndarray
    subject_code: np.ndarray
    effect_code: np.ndarray
    lib: np.ndarray
    counts_seed: np.random.SeedSequence
    dtype: np.dtype


def _block_rng(stream: np.random.SeedSequence, block: int) -> np.random.Generator:
    """The generator of cell block ``block``: the block-th child of ``stream.spawn``."""
    child = np.random.SeedSequence(stream.entropy, spawn_key=(*stream.spawn_key, block))
    return np.random.Generator(np.random.PCG64(child))


# ------------------------------------------------------------------------- generation


def _block_rows(block: int, n_cells: int) -> slice:
    return slice(block * RNG_BLOCK_CELLS, min(n_cells, (block + 1) * RNG_BLOCK_CELLS))


def _libsize_groups(mu: np.ndarray, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gamma shapes and scales of the reference library, one per distinct p.

    Genes sharing p = phi / (phi + mu) sum to one NB(sum phi, p) count, exactly, so the
    default (integer mu and phi) costs a few draws per cell instead of n_genes.
    """
    p, group = np.unique(phi / (phi + mu), return_inverse=True)
    shape = np.bincount(group, weights=phi, minlength=len(p))
    return shape, np.bincount(group, weights=mu, minlength=len(p)) / shape


def _block_libsize(
    stream: np.random.SeedSequence, block: int, n_cells: int, shape: np.ndarray, scale: np.ndarray
) -> np.ndarray:
    """Reference library sizes of one block of cells, shape (cells in block,), all > 0."""
    rows = _block_rows(block, n_cells)
    rng = _block_rng(stream, block)

    def draw(k: int) -> np.ndarray:
        return rng.poisson(rng.standard_gamma(shape, size=(k, len(shape))) * scale).sum(axis=1)

    libsize = draw(rows.stop - rows.start)
    for _ in range(_MAX_LIBSIZE_REDRAWS):
        empty = np.flatnonzero(libsize == 0)
        if empty.size == 0:
            return libsize.astype(np.float64)
        libsize[empty] = draw(empty.size)
    raise InputError(
        f"reference library sizes stay 0 after {_MAX_LIBSIZE_REDRAWS} draws "
        f"(sum of gene_mean = {np.sum(shape * scale):.3g}); raise gene_mean or n_genes"
    )


def draw_libsize(
    stream: np.random.SeedSequence, n_cells: int, mu: np.ndarray, phi: np.ndarray, n_threads: int
) -> np.ndarray:
    """Reference library sizes of all cells, (n_cells,) > 0: the column sums of an NB(mu,
    phi) reference matrix, drawn block by block from ``stream``."""
    shape, scale = _libsize_groups(mu, phi)
    n_blocks = -(-n_cells // RNG_BLOCK_CELLS)
    blocks = _map_ordered(
        lambda k: _block_libsize(stream, k, n_cells, shape, scale),
        range(n_blocks),
        n_threads,
        2 * n_threads,
    )
    return np.concatenate(list(blocks))


_Rows = tuple[np.ndarray, np.ndarray, np.ndarray]  # CSR indptr, indices, data

#: dtypes the kernel writes directly (others, e.g. longdouble, are converted afterwards)
_KERNEL_DTYPES = frozenset(np.dtype(t) for t in "bBhHiIlLqQfd")


def _draw_rows(model: _Model, rows: range) -> _Rows:
    """The counts of cells ``rows`` (consecutive) as CSR arrays, drawn block by block
    into them (one thread, one set of work arrays)."""
    n_cells, n_genes = len(model.subject_code), len(model.dispersion)
    dtype = model.dtype if model.dtype in _KERNEL_DTYPES else np.dtype(np.int64)
    scratch = Scratch.new(n_genes)
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    indices = np.empty(0, dtype=np.int32)
    data = np.empty(0, dtype=dtype)
    nnz = 0
    for block in range(rows.start // RNG_BLOCK_CELLS, -(-rows.stop // RNG_BLOCK_CELLS)):
        cells = _block_rows(block, n_cells)
        first = max(rows.start, cells.start) - cells.start  # cells before it: drawn, not kept
        stop = min(rows.stop, cells.stop) - cells.start  # cells after it: not drawn
        done = cells.start + first - rows.start  # rows written before this block
        need = nnz + (stop - first) * n_genes  # room for every gene of every cell
        if need > len(indices):
            # the density so far (5% over) for the rows left, and room for one block
            expected = nnz / done * len(rows) * 1.05 if done else 0.0
            indices, data = _grown(indices, data, nnz, max(need, int(expected) + need - nnz))
        span = slice(cells.start, cells.start + stop)
        nnz, largest, status = sparse_nb_rows(
            _block_rng(model.counts_seed, block),
            model.effect,
            model.varies,
            model.dispersion,
            *model.buckets,
            model.subject_code[span],
            model.effect_code[span],
            model.lib[span],
            first,
            indptr[done : done + stop - first + 1],
            indices,
            data,
            nnz,
            *scratch,
        )
        if status:
            raise InputError(
                f"NB means too large to draw in cells {cells.start + 1}.."
                f"{cells.stop}; lower gene_mean or var_randomeffects"
            )
        if model.dtype.kind in "iu" and largest > np.iinfo(model.dtype).max:
            raise InputError(
                f"counts up to {largest} do not fit dtype {model.dtype}; use dtype='int64'"
            )
    return indptr, indices[:nnz], data[:nnz].astype(model.dtype, copy=False)


def _grown(
    indices: np.ndarray, data: np.ndarray, nnz: int, capacity: int
) -> tuple[np.ndarray, np.ndarray]:
    """Arrays like ``indices`` and ``data`` of length ``capacity``, their first ``nnz``
    entries copied."""
    more_indices = np.empty(capacity, dtype=indices.dtype)
    more_data = np.empty(capacity, dtype=data.dtype)
    more_indices[:nnz] = indices[:nnz]
    more_data[:nnz] = data[:nnz]
    return more_indices, more_data


def _map_ordered(
    func: Callable[[Any], Any], items: Iterable[Any], n_threads: int, in_flight: int
) -> Iterator[Any]:
    """func(item) for every item, in order; on ``n_threads`` > 1 threads, the first
    ``in_flight`` items start at once (before the first result is asked for), and then
    ``in_flight`` items are computed while the consumer works on the one before them."""
    if n_threads == 1:
        return map(func, items)
    results = _threaded(func, iter(items), n_threads, in_flight)
    next(results)  # the first items are submitted
    return results


def _threaded(
    func: Callable[[Any], Any], items: Iterator[Any], n_threads: int, in_flight: int
) -> Iterator[Any]:
    """:func:`_map_ordered` on a thread pool: yields None once the first items are
    submitted, then the results."""
    with ThreadPoolExecutor(n_threads) as pool:
        pending = deque(pool.submit(func, item) for item in itertools.islice(items, in_flight))
        try:
            yield None
            while pending:
                result = pending.popleft().result()
                pending.extend(pool.submit(func, item) for item in itertools.islice(items, 1))
                yield result
        finally:  # an error or a consumer that stops: do not compute the items ahead
            for future in pending:
                future.cancel()


def _pieces(n_cells: int, chunk_cells: int, n_threads: int) -> tuple[list[range], int]:
    """The rows of each piece drawn by one thread, and the most pieces in a chunk.

    A chunk is one piece unless there are too few chunks for the threads: then pieces
    are a whole number of RNG blocks, about n_cells / n_threads cells (a piece that starts
    inside a block draws the block's cells before it again).
    """
    per_thread = -(-n_cells // n_threads)
    size = min(chunk_cells, -(-per_thread // RNG_BLOCK_CELLS) * RNG_BLOCK_CELLS)
    pieces = []
    for lo in range(0, n_cells, chunk_cells):
        hi = min(n_cells, lo + chunk_cells)
        pieces += [range(a, min(hi, a + size)) for a in range(lo, hi, size)]
    return pieces, -(-chunk_cells // size)


def _iter_chunks(model: _Model, chunk_cells: int, n_threads: int) -> Iterator[sp.csr_matrix]:
    """The count matrix in consecutive CSR chunks of chunk_cells rows (the last shorter).

    With ``n_threads`` > 1 the first chunks are drawn from the call on, and the next
    chunks while the consumer writes one, so memory holds about ``n_threads`` + 1 chunks.
    """
    n_cells, n_genes = len(model.subject_code), len(model.dispersion)
    pieces, per_chunk = _pieces(n_cells, chunk_cells, n_threads)
    drawn = _map_ordered(
        lambda rows: _draw_rows(model, rows), pieces, n_threads, max(n_threads, per_chunk)
    )
    return _chunks(pieces, drawn, chunk_cells, n_genes)


def _chunks(
    pieces: list[range], drawn: Iterator[_Rows], chunk_cells: int, n_genes: int
) -> Iterator[sp.csr_matrix]:
    """The drawn pieces joined into chunks (a chunk ends at a multiple of chunk_cells
    and at the last cell)."""
    parts: list[_Rows] = []
    for rows, part in zip(pieces, drawn, strict=True):
        parts.append(part)
        if rows.stop % chunk_cells == 0 or rows is pieces[-1]:
            yield _csr(parts, n_genes)
            parts = []


def _csr(parts: list[_Rows], n_genes: int) -> sp.csr_matrix:
    """The rows of consecutive pieces as one CSR matrix (copied only if more than one)."""
    if len(parts) == 1:
        indptr, indices, data = parts[0]
    else:
        offsets = np.cumsum([0] + [part[0][-1] for part in parts])
        indptr = np.concatenate(
            [[0]] + [part[0][1:] + offset for part, offset in zip(parts, offsets, strict=False)]
        )
        indices = np.concatenate([part[1] for part in parts])
        data = np.concatenate([part[2] for part in parts])
    # scipy's choice of index dtype (both int32 while they fit), without its checks: the
    # kernel's arrays are valid CSR with sorted indices
    index_dtype = np.int32 if indptr[-1] <= np.iinfo(np.int32).max else np.int64
    matrix = sp.csr_matrix((len(indptr) - 1, n_genes), dtype=data.dtype)
    matrix.indptr = indptr.astype(index_dtype)
    matrix.indices = indices.astype(index_dtype, copy=False)
    matrix.data = data
    matrix.has_sorted_indices = True
    return matrix
