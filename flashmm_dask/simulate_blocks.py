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
    (untreated cells); lib the library size over its geometric mean. base_max and
    effect_max are their maxima per gene.
    """

    obs: pd.DataFrame
    var: pd.DataFrame
    uns: dict[str, Any]
    base: np.ndarray
    base_max: np.ndarray
    effect: np.ndarray
    effect_max: np.ndarray
    effect_min: np.ndarray
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


def _block_counts(model: _Model, block: int) -> sp.csr_matrix:
    """Counts of one block of cells, shape (cells in block, n_genes), CSR."""
    rows = _block_rows(block, len(model.subject_code))
    indptr, indices, data, status = sparse_nb_block(
        _block_rng(model.counts_seed, block),
        model.base,
        model.base_max,
        model.effect,
        model.effect_max,
        model.effect_min,
        model.dispersion,
        model.subject_code[rows],
        model.effect_code[rows],
        model.lib[rows],
    )
    if status:
        raise InputError(
            f"NB means too large to draw in cells {rows.start + 1}.."
            f"{rows.stop}; lower gene_mean or var_randomeffects"
        )
    if model.dtype.kind in "iu" and data.size and data.max() > np.iinfo(model.dtype).max:
        raise InputError(
            f"counts up to {data.max()} do not fit dtype {model.dtype}; use dtype='int64'"
        )
    shape = (rows.stop - rows.start, len(model.dispersion))
    return sp.csr_matrix((data.astype(model.dtype), indices, indptr), shape=shape)


def _map_blocks(func: Callable[[int], Any], n_cells: int, n_threads: int) -> Iterator[Any]:
    """func(k) for every cell block k, in order, at most 2 n_threads blocks in flight."""
    n_blocks = -(-n_cells // RNG_BLOCK_CELLS)
    if n_threads == 1:
        yield from map(func, range(n_blocks))
        return
    with ThreadPoolExecutor(n_threads) as pool:
        pending: deque[Any] = deque()
        for k in range(n_blocks):
            pending.append(pool.submit(func, k))
            if len(pending) >= 2 * n_threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _iter_chunks(model: _Model, chunk_cells: int, n_threads: int) -> Iterator[sp.csr_matrix]:
    """The count matrix in consecutive CSR chunks of chunk_cells rows (the last shorter)."""
    buffer: list[sp.csr_matrix] = []
    buffered = 0
    blocks = _map_blocks(lambda k: _block_counts(model, k), len(model.subject_code), n_threads)
    for block in blocks:
        buffer.append(block)
        buffered += block.shape[0]
        while buffered >= chunk_cells:
            # split only the last block, so that each count is copied once
            last = buffer.pop()
            keep = buffered - chunk_cells
            head = last[: last.shape[0] - keep] if keep else last
            yield _stack([*buffer, head])
            buffer = [last[last.shape[0] - keep :]] if keep else []
            buffered = keep
    if buffered:
        yield _stack(buffer)


def _stack(blocks: list[sp.csr_matrix]) -> sp.csr_matrix:
    return sp.vstack(blocks, format="csr") if len(blocks) > 1 else blocks[0]
