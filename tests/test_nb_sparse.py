"""Tests of the simulator's sparse NB kernel (flashmm_dask.numerics.nb_sparse) and of how
the simulator draws its pieces (flashmm_dask.simulate_blocks): the buckets' bounds cover
every mean, the kernel equals a plain reference drawing from the same random numbers,
and pieces are drawn ahead of the consumer.

The distribution itself is tested in test_simulate.py (against dense Gamma-Poisson draws).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats

from flashmm_dask.errors import InputError
from flashmm_dask.numerics.nb_sparse import (
    BUCKET_RATIO,
    Scratch,
    gene_buckets,
    sparse_nb_rows,
)
from flashmm_dask.simulate import RNG_BLOCK_CELLS, simulate_rnaseq
from flashmm_dask.simulate_blocks import _map_ordered, _pieces

# ----------------------------------------------------------------------------- buckets


def bucket_of(start_row: np.ndarray) -> np.ndarray:
    """The bucket of each position of a subject's ``terms``."""
    return np.repeat(np.arange(len(start_row) - 1), np.diff(start_row))


def test_bucket_bounds_cover_every_mean_and_are_within_the_ratio():
    rng = np.random.default_rng(5)
    n_subjects, n_genes = 7, 300
    base = np.exp(rng.normal(np.log(0.05), 1.5, (n_subjects, n_genes)))
    # bounds on the levels themselves (r^k, one rounding either side), and a few far below
    # the largest (they share the lowest level)
    k = rng.integers(-40, 10, 60)
    base[:, :60] = BUCKET_RATIO ** k.astype(float) * (1 + rng.choice([-1, 0, 1], 60) * 2e-16)
    base[2, 60:70] = 1e-30
    effect_max = np.where(rng.random(n_genes) < 0.2, np.exp(rng.uniform(0, 1, n_genes)), 1.0)
    start, level, terms = gene_buckets(base, effect_max)
    assert np.all(np.diff(level) > 0) and start.shape == (n_subjects, len(level) + 1)
    j_all = np.concatenate([bucket_of(row) for row in start])
    assert j_all.min() == 0 and j_all.max() == len(level) - 1  # no unused end levels
    for s in range(n_subjects):
        genes = terms["gene"][s]
        np.testing.assert_array_equal(np.sort(genes), np.arange(n_genes))
        j = bucket_of(start[s])
        bound = base[s, genes] * effect_max[genes]
        assert np.all(level[j] >= bound), s  # p_j >= P(Y > 0) for every cell
        above = j > 0  # the lowest level holds the bounds far below the largest
        assert np.all(level[j][above] < BUCKET_RATIO * bound[above] * (1 + 1e-8)), s
        assert np.all(np.diff(genes)[np.diff(j) == 0] > 0)  # genes increasing in a bucket
        np.testing.assert_array_equal(terms["base"][s], base[s, genes])
    assert np.all(bucket_of(start[2])[np.isin(terms["gene"][2], np.arange(60, 70))] == 0)


# -------------------------------------------------------------- kernel against reference


def reference_rows(rng, effect, varies, phi, buckets, subject, klass, lib):
    """Counts drawn as sparse_nb_rows draws them, written plainly: per cell and bucket,
    candidates by geometric gaps; a candidate kept when u < P(Y > 0) computed exactly,
    its count the NB's inverse CDF (conditioned on > 0) at the same u, or Gamma-Poisson
    draws repeated until non-zero above a conditioned mean of 8. A CSR matrix, and how
    many counts each way (inversion, Gamma-Poisson)."""
    start, level, terms = buckets
    rows, cols, vals = [], [], []
    ways = [0, 0]
    for c in range(len(lib)):
        s, e, f = subject[c], klass[c], lib[c]
        candidates = []
        for j in range(len(level)):
            lo, hi = start[s, j], start[s, j + 1]
            rate = level[j] * f
            if lo == hi:
                continue
            t = lo - 1
            while True:
                t += 1 + np.floor(rng.standard_exponential() * (1.0 / rate))
                if t >= hi:
                    break
                candidates.append((int(t), -np.expm1(-rate)))
        for t, p in candidates:
            g = terms["gene"][s, t]
            m = terms["base"][s, t] * f
            if varies[g]:
                m *= effect[e, g]
            size = phi[g]
            u = rng.random() * p
            p0 = (1.0 + m / size) ** -size
            if u >= 1.0 - p0:
                continue
            if m / (1.0 - p0) <= 8.0:
                k = np.arange(1, 2000)
                q = m / (m + size)
                pmf = p0 * np.cumprod(np.r_[size * q, (k + size) / (k + 1) * q])
                y = 1 + int(np.searchsorted(np.cumsum(pmf), u, side="right"))
                ways[0] += 1
            else:
                ways[1] += 1
                y = 0
                while y == 0:
                    y = rng.poisson(m * rng.standard_gamma(size) / size)
            rows.append(c)
            cols.append(g)
            vals.append(y)
    shape = (len(lib), effect.shape[1])
    return sp.csr_matrix((vals, (rows, cols)), shape=shape, dtype=np.int64), ways


@pytest.fixture(scope="module")
def small_model():
    """5 subjects, 3 cell classes (one with DE genes), 70 genes with means from 1e-3 to
    40 (both value branches), 200 cells."""
    rng = np.random.default_rng(2)
    n_subjects, n_genes, n_cells = 5, 70, 200
    mu = np.geomspace(1e-3, 40.0, n_genes)
    base = mu * np.exp(rng.normal(0, 0.4, (n_subjects, n_genes)))
    effect = np.ones((3, n_genes))
    effect[0, -10:] = np.exp(rng.uniform(-1, 1, 10))
    phi = rng.uniform(0.3, 6.0, n_genes)
    buckets = gene_buckets(base, effect.max(axis=0))
    cells = {
        "subject": rng.integers(0, n_subjects, n_cells),
        "klass": rng.integers(0, 3, n_cells),
        "lib": np.exp(rng.normal(0, 0.5, n_cells)),
    }
    return effect, (effect != 1).any(axis=0), phi, buckets, cells


def kernel_rows(small_model, seed, first, dtype):
    """sparse_nb_rows of all the model's cells, written from ``first`` on, as CSR."""
    effect, varies, phi, buckets, cells = small_model
    n = len(cells["lib"])
    n_genes = effect.shape[1]
    indptr = np.zeros(n - first + 1, dtype=np.int64)
    indices = np.full((n - first) * n_genes + 5, -1, dtype=np.int32)
    counts = np.zeros(len(indices), dtype=dtype)
    nnz, largest, status = sparse_nb_rows(
        np.random.default_rng(seed),
        effect,
        varies,
        phi,
        *buckets,
        cells["subject"],
        cells["klass"],
        cells["lib"],
        first,
        indptr,
        indices,
        counts,
        0,
        *Scratch.new(n_genes),
    )
    assert status == 0
    assert np.all(indices[nnz:] == -1)  # nothing written past the entries counted
    matrix = sp.csr_matrix((counts[:nnz], indices[:nnz], indptr), shape=(n - first, n_genes))
    return matrix, largest


@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_equals_plain_reference_from_the_same_random_numbers(small_model, seed):
    effect, varies, phi, buckets, cells = small_model
    rng = np.random.default_rng(seed)
    want, ways = reference_rows(rng, effect, varies, phi, buckets, **cells)
    assert want.nnz > 1000 and min(ways) > 100  # both value branches are reached
    got, largest = kernel_rows(small_model, seed, 0, np.int64)
    got.check_format(full_check=True)  # sorted, in-range column indices
    assert got.has_sorted_indices
    np.testing.assert_array_equal(got.indptr, want.indptr)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.data, want.data)
    assert largest == want.max()
    # cells before ``first`` are drawn (the stream passes them) but not written
    later, _ = kernel_rows(small_model, seed, 37, np.float32)
    assert later.dtype == np.float32
    np.testing.assert_array_equal(later.toarray(), want[37:].toarray())


def test_conditioned_counts_have_the_whole_nb_tail():
    # phi = 0.01 and a conditioned mean of 7.9 (the inversion branch): P(Y >= 192 | Y > 0)
    # is 2.7e-5, which a cap on the inversion's terms (64 + 16 times the conditioned mean,
    # 190 here) had cut off; ~1.9 million non-zeros expect 44 counts >= 195
    phi, m, n_genes, n_cells = 0.01, 0.2571, 1000, 60_000
    base = np.full((1, n_genes), m)
    effect = np.ones((1, n_genes))
    buckets = gene_buckets(base, effect[0])
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    indices = np.empty(n_cells * n_genes // 20, dtype=np.int32)
    counts = np.empty(len(indices), dtype=np.int64)
    zeros = np.zeros(n_cells, dtype=np.int64)
    nnz, _, status = sparse_nb_rows(
        np.random.default_rng(8),
        effect,
        np.zeros(n_genes, dtype=bool),
        np.full(n_genes, phi),
        *buckets,
        zeros,
        zeros,
        np.ones(n_cells),
        0,
        indptr,
        indices,
        counts,
        0,
        *Scratch.new(n_genes),
    )
    assert status == 0
    nb = stats.nbinom(phi, phi / (phi + m))
    p_pos = nb.sf(0)
    assert 7.8 < m / p_pos < 8.0 and 0.8 * n_cells * n_genes * p_pos < nnz
    y = counts[:nnz]
    for at in (20, 100, 195):
        expected = nnz * nb.sf(at - 1) / p_pos
        z = (np.sum(y >= at) - expected) / np.sqrt(expected)
        assert abs(z) < 5, (at, np.sum(y >= at), expected)
    assert y.max() >= 195


def test_means_too_large_are_refused_on_every_thread_count():
    for n_threads in (1, 2):
        with pytest.raises(InputError, match="too large"):
            simulate_rnaseq(5, 300, gene_mean=1e16, seed=1, n_threads=n_threads)


@pytest.mark.parametrize("dtype", ["longdouble", "uint8"])
def test_counts_in_a_dtype_the_kernel_does_not_write_or_a_small_one(dtype):
    a = simulate_rnaseq(20, 300, seed=4, dtype="int32")
    b = simulate_rnaseq(20, 300, seed=4, dtype=dtype)
    assert b.X.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())


# ---------------------------------------------------------------- pieces and threads


@pytest.mark.parametrize(
    ("n_cells", "chunk_cells", "n_threads"),
    [(300, 10_000, 1), (300, 10_000, 2), (1000, 130, 2), (1000, 10_000, 3), (5, 2, 4)],
)
def test_pieces_cover_the_cells_once_and_end_at_chunk_edges(n_cells, chunk_cells, n_threads):
    pieces, per_chunk = _pieces(n_cells, chunk_cells, n_threads)
    np.testing.assert_array_equal(np.concatenate(pieces), np.arange(n_cells))
    chunks = {}
    for rows in pieces:
        chunks.setdefault(rows.start // chunk_cells, []).append(rows)
        assert rows.start // chunk_cells == (rows.stop - 1) // chunk_cells  # in one chunk
    assert max(map(len, chunks.values())) <= per_chunk
    if n_cells <= chunk_cells and n_threads > 1:  # one chunk: split for the threads
        assert len(pieces) == min(n_threads, -(-n_cells // RNG_BLOCK_CELLS))
        assert all(rows.start % RNG_BLOCK_CELLS == 0 for rows in pieces)


def test_items_are_drawn_ahead_before_the_first_is_asked_for_and_not_after_a_stop():
    started = [threading.Event() for _ in range(6)]
    release = threading.Event()

    def work(k):
        started[k].set()
        if k >= 2:
            release.wait(10)
        return k * k

    results = _map_ordered(work, range(6), n_threads=2, in_flight=3)
    # the first two start without a result asked for
    assert started[0].wait(10) and started[1].wait(10)
    assert next(results) == 0 and next(results) == 1
    # items 2 and 3 hold both threads, 4 waits for one: the consumer stops, so 4 is
    # cancelled (and 5 never submitted) while 2 and 3 finish
    assert started[2].wait(10) and started[3].wait(10)
    threading.Timer(1.0, release.set).start()
    results.close()
    assert not started[4].is_set() and not started[5].is_set()
    assert list(_map_ordered(work, range(6), n_threads=1, in_flight=2)) == [0, 1, 4, 9, 16, 25]
