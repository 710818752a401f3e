"""Negative binomial counts drawn in sparse form: only the non-zeros cost a draw.

For cells c and genes g with NB means m_cg = base[s(c), g] effect[e(c), g] lib[c] (a
subject and gene term, a cell-class and gene term, a cell term) and sizes phi_g, every
count Y_cg ~ NB(m_cg, phi_g) independently, drawn without visiting the zeros:

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
per candidate (about (r - 1) / log r = 1.05 per non-zero at sparse means) rather than
per entry. :func:`sparse_nb_rows` writes a block of cells straight into the caller's CSR
arrays (rows, then increasing columns), in the caller's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from numba.cpython.unsafe.numbers import trailing_zeros

from flashmm_dask.numerics.jit import jit

__all__ = ["BUCKET_RATIO", "TERMS", "Buckets", "Scratch", "gene_buckets", "sparse_nb_rows"]

#: ratio of consecutive bucket bounds: candidates per non-zero about (r - 1) / log(r)
BUCKET_RATIO = 1.1
#: bucket levels below the largest: lower bounds share the lowest level (their genes are
#: then candidates at most 1e-12 times as often as the gene of the largest bound)
_BUCKET_DEPTH = int(np.ceil(np.log(1e12) / np.log(BUCKET_RATIO)))  # 290
#: a bucketed gene: its subject's factor of the mean and its column
TERMS = np.dtype([("base", np.float64), ("gene", np.int64)])
#: conditioned means above this are drawn by repeated Gamma-Poisson draws, not inversion
_INVERSION_MEAN = 8.0
#: NB means above this are refused (Poisson draws of larger rates are not exact)
_MAX_MEAN = 1e15


class Buckets(NamedTuple):
    """Each subject's genes grouped by geometric levels of the bound of their means.

    start : ndarray of int64, shape (S, J + 1)
        Bucket j of subject s is ``terms[s, start[s, j]:start[s, j + 1]]``.
    level : ndarray, shape (J,)
        The bound of bucket j: >= base[s, g] effect_max[g] for each of its genes, below
        ``BUCKET_RATIO`` times it unless it is the lowest level. Levels that hold no
        gene of any subject below the first and above the last are left out.
    terms : ndarray of ``TERMS`` records, shape (S, m)
        Each subject's genes (``gene``) with their base[s, g] (``base``), bucket after
        bucket, genes increasing within a bucket: the kernel reads a candidate's gene and
        mean from one place (one cache miss, not one in a row of base as well).
    """

    start: np.ndarray
    level: np.ndarray
    terms: np.ndarray


def gene_buckets(base: np.ndarray, effect_max: np.ndarray) -> Buckets:
    """:class:`Buckets` of the subject-by-gene factor ``base`` (S, m) of the mean
    (mu_g e^{b_sg}) and ``effect_max`` (m,), the maximum over cell classes of the
    class-by-gene factor."""
    n_subjects, n_genes = base.shape
    bound = base * effect_max
    # 1e300: an infinite bound keeps a finite level, whose means the kernel refuses
    np.minimum(bound, 1e300, out=bound)
    with np.errstate(divide="ignore"):
        steps = np.log(bound)
    steps /= np.log(BUCKET_RATIO)
    np.ceil(steps, out=steps)
    top = float(np.max(steps)) if np.isfinite(np.max(steps)) else 0.0
    lowest = top - _BUCKET_DEPTH
    # uint16 keys (at most _BUCKET_DEPTH + 2 levels): numpy's stable sort is a radix sort
    np.maximum(steps, lowest, out=steps)
    steps -= lowest
    key = steps.astype(np.uint16)
    del steps
    # one level more than the top, and levels a little high, absorb the rounding of log
    level = BUCKET_RATIO ** np.arange(lowest, top + 2) * (1.0 + 1e-9)
    key += level[key] < bound
    del bound
    # levels no subject uses at either end are left out (the kernel visits every level)
    used = np.flatnonzero(np.bincount(key.ravel(), minlength=len(level)))
    key -= int(used[0])
    level = level[used[0] : used[-1] + 1]
    n_levels = len(level)
    order = np.argsort(key, axis=1, kind="stable")
    # bucket j of subject s ends where its sorted keys pass j
    ends = np.take_along_axis(key, order, axis=1)
    start = np.zeros((n_subjects, n_levels + 1), dtype=np.int64)
    for s, row in enumerate(ends):
        start[s, 1:] = np.searchsorted(row, np.arange(n_levels), side="right")
    terms = np.empty((n_subjects, n_genes), dtype=TERMS)
    terms["base"] = np.take_along_axis(base, order, axis=1)
    terms["gene"] = order
    return Buckets(start, level, terms)


class Scratch(NamedTuple):
    """Work arrays of :func:`sparse_nb_rows` for ``n_genes`` genes, reused from block to
    block by one thread (:meth:`new`)."""

    floats: np.ndarray  # (2, m): a cell's candidates' p and base
    ints: np.ndarray  # (3, m): their positions in ``terms`` and genes; counts by gene
    bits: np.ndarray  # (ceil(m / 64),) int64: the genes kept in a cell, as a bit set

    @classmethod
    def new(cls, n_genes: int) -> Scratch:
        return cls(
            np.empty((2, n_genes)),
            np.empty((3, n_genes), dtype=np.int64),
            np.zeros(-(-n_genes // 64), dtype=np.int64),
        )


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
        while True:
            k = 1
            pk = first
            total = pk
            # no cap on k: the tail is summed until it holds u (P(Y >= 192 | Y > 0) is
            # 3e-5 at phi = 0.01 and a conditioned mean of 8); the terms shrink at least
            # geometrically (q < 0.97 on this branch), so pk reaches 0 if rounding left u
            # beyond the summed mass
            while u >= total and pk > 0.0:
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
def _cell_candidates(
    rng: np.random.Generator,
    start: np.ndarray,
    level: np.ndarray,
    s: int,
    f: float,
    cand_t: np.ndarray,
    cand_p: np.ndarray,
) -> int:
    """The candidates of one cell (subject s, library factor f): their positions in
    ``order[s]`` into cand_t and their probabilities p into cand_p; returns how many, or
    -1 when a bucket's rate exceeds 1e15."""
    k = 0
    for j in range(level.shape[0]):
        lo = start[s, j]
        hi = start[s, j + 1]
        if lo == hi:
            continue
        rate = level[j] * f  # -log(1 - p): p the candidates' probability
        if not rate <= _MAX_MEAN:
            return -1
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
    return k


@_compile
def sparse_nb_rows(
    rng: np.random.Generator,
    effect: np.ndarray,
    varies: np.ndarray,
    phi: np.ndarray,
    start: np.ndarray,
    level: np.ndarray,
    terms: np.ndarray,
    subject: np.ndarray,
    klass: np.ndarray,
    lib: np.ndarray,
    first: int,
    indptr: np.ndarray,
    indices: np.ndarray,
    counts: np.ndarray,
    nnz: int,
    floats: np.ndarray,
    ints: np.ndarray,
    bits: np.ndarray,
) -> tuple[int, int, int]:
    """Draw the NB counts of cells 0..n-1 from ``rng``, and write those of cells
    ``first``..n-1 into CSR arrays from entry ``nnz`` on.

    Parameters
    ----------
    rng : numpy.random.Generator
        The cells' own stream: the cells before ``first`` are drawn (the stream passes
        through them) but not written.
    effect : ndarray, shape (K, m)
        Class-by-gene factor of the mean (e^{beta}), C-contiguous; read only where
        ``varies`` (m,) is true (its column is not all ones).
    phi : ndarray, shape (m,)
        NB sizes, > 0.
    start, level, terms
        :class:`Buckets` of the subject-by-gene factor of the mean (mu_g e^{b_sg}) and
        the maxima of ``effect`` per gene; C-contiguous.
    subject, klass : ndarray of int64, shape (n,)
        Each cell's row of ``base`` and of ``effect``.
    lib : ndarray, shape (n,)
        Each cell's factor of the mean (library size over its geometric mean).
    first : int
        The first cell written.
    indptr : ndarray of int64, shape (n - first + 1,)
        Entries 1.. are set: the end of each written cell's entries.
    indices, counts : ndarray
        Column indices and counts (any dtype) written from ``nnz`` on; they must have
        room for (n - first) m more entries.
    nnz : int
        Entries already in ``indices`` and ``counts``.
    floats, ints, bits
        A :class:`Scratch` for m genes; ``bits`` all zero (and left so).

    Returns
    -------
    nnz, the largest count, status
        nnz the entries now in ``indices``; status 1 (and nothing more written) when a
        mean exceeds 1e15: counts that large cannot be drawn exactly.
    """
    n = lib.shape[0]
    cand_p, cand_b = floats[0], floats[1]
    cand_t, cand_g, values = ints[0], ints[1], ints[2]
    largest = 0
    for c in range(n):
        s = subject[c]
        e = klass[c]
        f = lib[c]
        written = c >= first
        k = _cell_candidates(rng, start, level, s, f, cand_t, cand_p)
        if k < 0:
            return nnz, largest, 1
        # the terms of all candidates first: independent loads, whose cache misses (a
        # subject's row is out of cache) overlap instead of stalling each draw
        for i in range(k):
            term = terms[s, cand_t[i]]
            cand_g[i] = term.gene
            cand_b[i] = term.base
        for i in range(k):
            g = cand_g[i]
            m = cand_b[i] * f
            if varies[g]:
                m *= effect[e, g]
            ph = phi[g]
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
            largest = max(largest, y)
            if written:
                values[g] = y
                bits[g >> 6] |= np.int64(1) << (g & 63)
        if written:
            # the kept genes in increasing order: the set bits of each word, lowest first
            for w in range(bits.shape[0]):
                word = bits[w]
                if word == 0:
                    continue
                bits[w] = 0
                while word != 0:
                    g = (w << 6) + trailing_zeros(word)  # type: ignore[call-arg]  # numba intrinsic
                    indices[nnz] = g
                    counts[nnz] = values[g]
                    nnz += 1
                    word &= word - 1
            indptr[c - first + 1] = nnz
    return nnz, largest, 0
