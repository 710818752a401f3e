"""Drawing the simulated counts block by block: library sizes and sparse NB counts.

Cells come in blocks of ``RNG_BLOCK_CELLS``, each with its own random stream, so that
the data do not depend on the chunking or the threads of :mod:`flashmm_dask.simulate`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from flashmm_dask.errors import InputError
from flashmm_dask.numerics.nb_sparse import sparse_nb_block

#: Cells per independent random stream; part of the model's reproducibility contract.
RNG_BLOCK_CELLS = 128
_MAX_LIBSIZE_REDRAWS = 10_000


@dataclass(frozen=True)
class _Model:
    """Everything but the counts: O(n_cells + n_subjects * n_genes) memory.

    The NB mean of cell c and gene g is base[s, g] effect[e, g] lib[c] (s the cell's
    subject, e its effect class): base is (n_subjects, n_genes), mu_g e^{b_sg}; effect is
    (n_celltypes + 1, n_genes), e^{beta_g} in the row of its cell type, the last row ones
    (untreated cells); lib the library size over its geometric mean. ``varies`` marks the
    columns of effect that are not all ones; ``buckets`` are
    :func:`~flashmm_dask.numerics.nb_sparse.gene_buckets` of base, effect and dispersion.
    """

    obs: pd.DataFrame
    var: pd.DataFrame
    uns: dict[str, Any]
    base: np.ndarray
    effect: np.ndarray
    varies: np.ndarray
    buckets: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
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
    blocks = _map_blocks(
        lambda k: _block_libsize(stream, k, n_cells, shape, scale), n_cells, n_threads
    )
    return np.concatenate(list(blocks))


_Block = tuple[np.ndarray, np.ndarray, np.ndarray]  # CSR indptr, indices, data


def _block_counts(model: _Model, block: int) -> _Block:
    """Counts of one block of cells (cells in block x n_genes) as CSR arrays."""
    rows = _block_rows(block, len(model.subject_code))
    indptr, indices, data, largest, status = sparse_nb_block(
        _block_rng(model.counts_seed, block),
        model.effect,
        model.varies,
        *model.buckets,
        model.subject_code[rows],
        model.effect_code[rows],
        model.lib[rows],
        np.empty(0, model.dtype),
    )
    if status:
        raise InputError(
            f"NB means too large to draw in cells {rows.start + 1}.."
            f"{rows.stop}; lower gene_mean or var_randomeffects"
        )
    if model.dtype.kind in "iu" and largest > np.iinfo(model.dtype).max:
        raise InputError(
            f"counts up to {largest} do not fit dtype {model.dtype}; use dtype='int64'"
        )
    return indptr, indices, data


def _map_blocks(
    func: Callable[[int], Any], n_cells: int, n_threads: int, ahead: int = 0
) -> Iterator[Any]:
    """func(k) for every cell block k, in order, at most max(ahead, 2 n_threads) blocks
    in flight (computed while the consumer works on earlier ones)."""
    n_blocks = -(-n_cells // RNG_BLOCK_CELLS)
    if n_threads == 1:
        yield from map(func, range(n_blocks))
        return
    with ThreadPoolExecutor(n_threads) as pool:
        pending: deque[Any] = deque()
        try:
            for k in range(n_blocks):
                pending.append(pool.submit(func, k))
                if len(pending) >= max(ahead, 2 * n_threads):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # an error or a consumer that stops: do not draw the blocks ahead
            for future in pending:
                future.cancel()


def _iter_chunks(model: _Model, chunk_cells: int, n_threads: int) -> Iterator[sp.csr_matrix]:
    """The count matrix in consecutive CSR chunks of chunk_cells rows (the last shorter).

    The blocks of the next chunk are drawn while the consumer writes this one, so memory
    holds about two chunks.
    """
    n_cells, n_genes = len(model.subject_code), len(model.dispersion)
    ahead = -(-chunk_cells // RNG_BLOCK_CELLS)
    blocks = _map_blocks(lambda k: _block_counts(model, k), n_cells, n_threads, ahead)
    parts: list[_Block] = []
    buffered = 0
    for block in blocks:
        rows = len(block[0]) - 1
        taken = 0
        while buffered + rows - taken >= chunk_cells:
            # the chunk ends inside (or at the end of) this block: split it
            cut = taken + chunk_cells - buffered
            parts.append(_rows(block, taken, cut))
            yield _csr(parts, n_genes)
            parts, buffered, taken = [], 0, cut
        if taken < rows:
            parts.append(_rows(block, taken, rows))
            buffered += rows - taken
    if parts:
        yield _csr(parts, n_genes)


def _rows(block: _Block, first: int, stop: int) -> _Block:
    """Rows [first, stop) of a block's CSR arrays (views)."""
    indptr, indices, data = block
    if first == 0 and stop == len(indptr) - 1:
        return block
    lo, hi = indptr[first], indptr[stop]
    return indptr[first : stop + 1] - lo, indices[lo:hi], data[lo:hi]


def _csr(parts: list[_Block], n_genes: int) -> sp.csr_matrix:
    """The rows of consecutive blocks as one CSR matrix (each value copied once)."""
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
