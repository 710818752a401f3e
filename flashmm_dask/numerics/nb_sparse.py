"""Negative binomial counts drawn in sparse form: only the non-zeros cost a draw.

For a block of cells c and genes g with NB means m_cg = base[s(c), g] effect[e(c), g]
lib[c] (a subject and gene term, a cell-class and gene term, a cell term) and sizes
phi_g, every count Y_cg ~ NB(m_cg, phi_g) independently, drawn without visiting the
zeros:

1. **Buckets** (once per model, :func:`gene_buckets`): each subject's genes are grouped
   by a bound of base[s, g] max_e effect[e, g], in geometric levels B_j = r^j (r =
   ``BUCKET_RATIO``), so that within a bucket the bound is at most r times each gene's.
2. **Candidates** (thinning), cell by cell: in bucket j of the cell's subject, every gene
   is a Bernoulli(p) trial, p = 1 - exp(-B_j lib[c]) >= 1 - exp(-m_cg) >= P(Y_cg > 0);
   the successes are found by geometric gaps (one exponential draw per candidate, none
   per gene that is skipped).
3. **Thinning**: a candidate is kept when u < P(Y_cg > 0), u ~ U(0, p), so each entry is
   non-zero with probability exactly P(Y_cg > 0), independently.
4. **Value**: given that it is kept, u is uniform on (0, P(Y > 0)), so it serves again
   to draw the count from NB(m_cg, phi_g) conditioned on Y > 0 by inversion from k = 1
   (pmf ratio (k + phi) / (k + 1) * m / (m + phi)) when its mean is small (the usual
   sparse case); larger means are drawn as Gamma-Poisson draws repeated until non-zero.

So the counts have exactly the distribution of the dense Gamma-Poisson draw, at a cost
per candidate (about 1.07 per non-zero at sparse means) rather than per entry. The
non-zeros come out in CSR order (rows, then increasing columns) and in the caller's
dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from flashmm_dask.numerics.jit import jit

__all__ = ["BUCKET_RATIO", "gene_buckets", "sparse_nb_block"]

#: ratio of consecutive bucket bounds: candidates per non-zero about (r - 1) / log(r)
BUCKET_RATIO = 1.1
#: bucket levels below the largest: lower bounds share the lowest level (their genes are
#: then candidates at most 1e-6 times as often as the gene of the largest bound)
_BUCKET_DEPTH = int(np.ceil(np.log(1e6) / np.log(BUCKET_RATIO)))  # 145
#: conditioned means above this are drawn by repeated Gamma-Poisson draws, not inversion
_INVERSION_MEAN = 8.0
#: NB means above this are refused (Poisson draws of larger rates are not exact)
_MAX_MEAN = 1e15


def gene_buckets(
    base: np.ndarray, effect_max: np.ndarray, phi: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each subject's genes grouped by geometric levels of the bound of their means.

    Parameters
    ----------
    base : ndarray, shape (S, m)
        Subject-by-gene factor of the mean (mu_g e^{b_sg}).
    effect_max : ndarray, shape (m,)
        Per gene, the maximum over cell classes of the class-by-gene factor.
    phi : ndarray, shape (m,)
        NB sizes.

    Returns
    -------
    order : ndarray of int32, shape (S, m)
        Each subject's genes, bucket after bucket, increasing within a bucket.
    start : ndarray of int64, shape (S, J + 1)
        Bucket j of subject s is ``order[s, start[s, j]:start[s, j + 1]]``.
    level : ndarray, shape (J,)
        The bound of bucket j: >= base[s, g] effect_max[g] for each of its genes, below
        ``BUCKET_RATIO`` times it unless it is the lowest level.
    terms : ndarray, shape (S, m, 2)
        base[s, g] and phi[g] in the order of ``order``: the kernel reads them
        forwards, not scattered over a row of base (a cache miss per non-zero).
    """
    n_subjects, n_genes = base.shape
    bound = base * effect_max
    # 1e300: an infinite bound keeps a finite level, whose means the kernel refuses
    clipped = np.minimum(bound, 1e300)
    with np.errstate(divide="ignore"):
        steps = np.ceil(np.log(clipped) / np.log(BUCKET_RATIO))
    top = float(np.max(steps)) if np.isfinite(np.max(steps)) else 0.0
    lowest = top - _BUCKET_DEPTH
    # uint8 keys (at most _BUCKET_DEPTH + 2 < 256 levels): numpy's stable sort is a radix
    key = (np.maximum(steps, lowest) - lowest).astype(np.uint8)
    # one level more than the top, and levels a little high, absorb the rounding of log
    level = BUCKET_RATIO ** np.arange(lowest, top + 2) * (1.0 + 1e-9)
    key += level[key] < clipped
    n_levels = len(level)
    order = np.argsort(key, axis=1, kind="stable").astype(np.int32)
    flat = key + n_levels * np.arange(n_subjects)[:, None]
    sizes = np.bincount(flat.ravel(), minlength=n_subjects * n_levels)
    start = np.zeros((n_subjects, n_levels + 1), dtype=np.int64)
    np.cumsum(sizes.reshape(n_subjects, n_levels), axis=1, out=start[:, 1:])
    terms = np.empty((n_subjects, n_genes, 2))
    terms[:, :, 0] = np.take_along_axis(base, order, axis=1)
    terms[:, :, 1] = phi[order]
    return order, start, level, terms


def _compile(fn: Callable[..., Any]) -> Any:
    """``fn`` compiled without the GIL, with IEEE semantics (as NumPy)."""
    return jit(fn, nogil=True, error_model="numpy")


@_compile
def _truncated_nb(rng: np.random.Generator, u: float, m: float, phi: float, p_pos: float) -> int:
    """One draw of NB(m, phi) conditioned on being > 0, from u ~ U(0, p_pos) where
    p_pos = P(Y > 0)."""
    if m / p_pos <= _INVERSION_MEAN:
        q = m / (m + phi)
        first = (1.0 - p_pos) * phi * q  # P(Y = 1)
        limit = 64.0 + 16.0 * m / p_pos
        while True:
            k = 1
            pk = first
            total = pk
            while u >= total and pk > 0.0 and k < limit:
                pk *= (k + phi) / (k + 1.0) * q
                k += 1
                total += pk
            if u < total:
                return k
            # rounding left u beyond the summed mass: draw again (probability ~1e-16)
            u = rng.random() * p_pos
    while True:
        y = rng.poisson(m * rng.standard_gamma(phi) / phi)
        if y > 0:
            return y


@_compile
def sparse_nb_block(
    rng: np.random.Generator,
    effect: np.ndarray,
    varies: np.ndarray,
    order: np.ndarray,
    start: np.ndarray,
    level: np.ndarray,
    terms: np.ndarray,
    subject: np.ndarray,
    klass: np.ndarray,
    lib: np.ndarray,
    like: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """The NB counts of a block of cells in CSR form, drawing only the non-zeros.

    Parameters
    ----------
    rng : numpy.random.Generator
        The block's own stream.
    effect : ndarray, shape (K, m)
        Class-by-gene factor of the mean (e^{beta}), C-contiguous; read only where
        ``varies`` (m,) is true (its column is not all ones).
    order, start, level, terms
        :func:`gene_buckets` of the subject-by-gene factor of the mean (mu_g e^{b_sg}),
        the maxima of ``effect`` per gene and the NB sizes (> 0); C-contiguous.
    subject, klass : ndarray of int64, shape (n,)
        Each cell's subject (row of ``start`` and ``terms``) and row of ``effect``.
    lib : ndarray, shape (n,)
        Each cell's factor of the mean (library size over its geometric mean).
    like : ndarray, shape (0,)
        An array of the dtype of the counts returned.

    Returns
    -------
    indptr (n + 1,) int64, indices (nnz,) int32, counts (nnz,) of ``like``'s dtype,
    the largest count, status
        status 1 (and nothing drawn) when a mean exceeds 1e15: counts that large cannot
        be drawn exactly.
    """
    n = lib.shape[0]
    m_genes = order.shape[1]
    n_levels = level.shape[0]
    capacity = 1024
    kept_g = np.empty(capacity, dtype=np.int32)
    kept_y = np.empty(capacity, dtype=np.int64)
    indptr = np.zeros(n + 1, dtype=np.int64)
    # a cell's candidates (at most one per gene), then their terms
    cand_t = np.empty(m_genes, dtype=np.int64)
    cand_p = np.empty(m_genes)
    cand_g = np.empty(m_genes, dtype=np.int32)
    cand_b = np.empty(m_genes)
    cand_phi = np.empty(m_genes)
    sort_y = np.empty(m_genes, dtype=np.int64)
    nnz = 0
    largest = 0
    for c in range(n):
        s = subject[c]
        e = klass[c]
        f = lib[c]
        k = 0
        for j in range(n_levels):
            lo = start[s, j]
            hi = start[s, j + 1]
            if lo == hi:
                continue
            rate = level[j] * f  # -log(1 - p): p the candidates' probability
            if not rate <= _MAX_MEAN:
                return indptr, kept_g[:0], np.zeros(0, like.dtype), 0, 1
            if not rate > 0.0:
                continue
            p = -np.expm1(-rate)
            scale = 1.0 / rate
            t = lo - 1
            while True:
                # failures before the next success: floor(E / rate), E ~ Exp(1)
                gap = np.floor(rng.standard_exponential() * scale)
                if gap >= hi - t - 1:
                    break
                t += 1 + int(gap)
                cand_t[k] = t
                cand_p[k] = p
                k += 1
        # the terms of all candidates first: independent loads, whose cache misses (a
        # subject's row is out of cache) overlap instead of stalling each draw
        for i in range(k):
            t = cand_t[i]
            cand_g[i] = order[s, t]
            cand_b[i] = terms[s, t, 0]
            cand_phi[i] = terms[s, t, 1]
        for i in range(k):
            g = cand_g[i]
            m = cand_b[i] * f
            if varies[g]:
                m *= effect[e, g]
            ph = cand_phi[i]
            u = rng.random() * cand_p[i]
            # u < P(Y > 0) keeps the entry; by inversion from the same u (uniform on
            # (0, P(Y > 0)) once kept) its count is 1 when u < P(Y = 1) = p0 m phi /
            # (m + phi). Both are decided without a logarithm unless u falls between
            # P(Y = 1) > e^-m m phi / (m + phi) and P(Y > 0) < 1 - e^-m, with the cubic
            # Taylor bounds of e^-m (and 1e-12 for the rounding of the bounds)
            cubic = m * m * (0.5 - m / 6.0)
            if u < (1.0 - m + cubic) * (m * ph / (m + ph)) * (1.0 - 1e-12):
                y = 1
            else:
                if u >= (m - cubic) * (1.0 + 1e-12):
                    continue
                p_pos = -np.expm1(-ph * np.log1p(m / ph))
                if u >= p_pos:
                    continue
                y = _truncated_nb(rng, u, m, ph, p_pos)
            if nnz == capacity:
                capacity *= 2
                more_g = np.empty(capacity, dtype=np.int32)
                more_y = np.empty(capacity, dtype=np.int64)
                more_g[:nnz] = kept_g[:nnz]
                more_y[:nnz] = kept_y[:nnz]
                kept_g, kept_y = more_g, more_y
            kept_g[nnz] = g
            kept_y[nnz] = y
            largest = max(largest, y)
            nnz += 1
        # genes increase within a bucket only (cand_g, free now, is the sort's scratch)
        row = indptr[c]
        _sort_by_gene(kept_g[row:nnz], kept_y[row:nnz], cand_g, sort_y)
        indptr[c + 1] = nnz
    indices = np.empty(nnz, dtype=np.int32)
    counts = np.empty(nnz, dtype=like.dtype)
    for t in range(nnz):
        indices[t] = kept_g[t]
        counts[t] = kept_y[t]
    return indptr, indices, counts, largest, 0


@_compile
def _sort_by_gene(
    genes: np.ndarray, values: np.ndarray, tmp_g: np.ndarray, tmp_y: np.ndarray
) -> None:
    """Sort a cell's entries by gene in place: a radix sort by bytes (the scratch
    arrays at least as long), each pass with 256 counters in L1."""
    n = genes.shape[0]
    top = 0
    for i in range(n):
        top = max(top, genes[i])
    bins = np.empty(256, dtype=np.int64)
    shift = 0
    while True:
        _radix_pass(genes, values, tmp_g, tmp_y, n, shift, bins)
        shift += 8
        if (top >> shift) == 0:
            tmp_to_genes = True
            break
        _radix_pass(tmp_g, tmp_y, genes, values, n, shift, bins)
        shift += 8
        if (top >> shift) == 0:
            tmp_to_genes = False
            break
    if tmp_to_genes:
        genes[:] = tmp_g[:n]
        values[:] = tmp_y[:n]


@_compile
def _radix_pass(
    src_g: np.ndarray,
    src_y: np.ndarray,
    dst_g: np.ndarray,
    dst_y: np.ndarray,
    n: int,
    shift: int,
    bins: np.ndarray,
) -> None:
    """One stable counting pass of :func:`_sort_by_gene` on byte ``shift // 8``."""
    bins[:] = 0
    for i in range(n):
        bins[(src_g[i] >> shift) & 255] += 1
    total = 0
    for b in range(256):
        size = bins[b]
        bins[b] = total
        total += size
    for i in range(n):
        b = (src_g[i] >> shift) & 255
        dst_g[bins[b]] = src_g[i]
        dst_y[bins[b]] = src_y[i]
        bins[b] += 1
