"""Negative binomial counts drawn in sparse form: only the non-zeros cost a draw.

For a block of cells c and genes g with NB means m_cg = base[s(c), g] effect[e(c), g]
lib[c] (a gene and subject term, a gene and cell-class term, a cell term) and sizes
phi_g, every count Y_cg ~ NB(m_cg, phi_g) independently, drawn without visiting the
zeros:

1. **Candidates** (thinning): for gene g, a bound m_g >= m_cg over the block's cells gives
   p_g = 1 - P(Y = 0 | m_g) >= P(Y_cg > 0). Candidate cells are the successes of
   Bernoulli(p_g) trials, found by geometric gaps (one exponential draw per candidate,
   none per cell that is skipped).
2. **Thinning**: a candidate is kept with probability P(Y_cg > 0) / p_g, so each cell is
   non-zero with probability exactly P(Y_cg > 0), independently.
3. **Value**: a kept count is drawn from NB(m_cg, phi_g) conditioned on Y > 0: by
   inversion from k = 1 (pmf ratio (k + phi) / (k + 1) * m / (m + phi)) when its mean is
   small (the usual sparse case), else as Gamma-Poisson draws repeated until non-zero.

So the counts have exactly the distribution of the dense Gamma-Poisson draw, at a cost
per candidate (about 1 / acceptance per non-zero) rather than per entry. The non-zeros
come out in CSR order (rows, then increasing columns).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from flashmm_dask.numerics.jit import jit

__all__ = ["sparse_nb_block"]

#: conditioned means above this are drawn by repeated Gamma-Poisson draws, not inversion
_INVERSION_MEAN = 8.0
#: NB means above this are refused (Poisson draws of larger rates are not exact)
_MAX_MEAN = 1e15


def _compile(fn: Callable[..., Any]) -> Any:
    """``fn`` compiled without the GIL, with IEEE semantics (as NumPy)."""
    return jit(fn, nogil=True, error_model="numpy")


@_compile
def _truncated_nb(
    rng: np.random.Generator, m: float, phi: float, log_p0: float, p_pos: float
) -> int:
    """One draw of NB(m, phi) conditioned on being > 0; log_p0 = log P(Y = 0) and
    p_pos = P(Y > 0)."""
    if m / p_pos <= _INVERSION_MEAN:
        q = m / (m + phi)
        first = np.exp(log_p0) * phi * q  # P(Y = 1)
        limit = 64.0 + 16.0 * m / p_pos
        while True:
            u = rng.random() * p_pos
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
    while True:
        y = rng.poisson(m * rng.standard_gamma(phi) / phi)
        if y > 0:
            return y


@_compile
def sparse_nb_block(
    rng: np.random.Generator,
    base: np.ndarray,
    base_max: np.ndarray,
    effect: np.ndarray,
    effect_max: np.ndarray,
    effect_min: np.ndarray,
    phi: np.ndarray,
    subject: np.ndarray,
    klass: np.ndarray,
    lib: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The NB counts of a block of cells in CSR form, drawing only the non-zeros.

    Parameters
    ----------
    rng : numpy.random.Generator
        The block's own stream.
    base : ndarray, shape (S, m)
        Subject-by-gene factor of the mean (mu_g e^{b_sg}), C-contiguous.
    base_max : ndarray, shape (m,)
        Its maximum over subjects, per gene.
    effect : ndarray, shape (K, m)
        Class-by-gene factor (e^{beta}), C-contiguous; ``effect_max`` and ``effect_min``
        (m,) its maximum and minimum per gene.
    phi : ndarray, shape (m,)
        NB sizes, > 0.
    subject, klass : ndarray of int64, shape (n,)
        Each cell's column of ``base`` and of ``effect``.
    lib : ndarray, shape (n,)
        Each cell's factor of the mean (library size over its geometric mean).

    Returns
    -------
    indptr (n + 1,), indices (nnz,) int32, counts (nnz,) int64, status int
        status 1 (and nothing drawn) when a mean exceeds 1e15: counts that large cannot
        be drawn exactly.

    Notes
    -----
    Candidates are found gene by gene (one uniform per candidate), sorted by cell, and
    thinned cell by cell, so that base[s] and effect[e] are read in increasing gene order.
    """
    n = lib.shape[0]
    m_genes = phi.shape[0]
    lib_max = 0.0
    for c in range(n):
        lib_max = max(lib_max, lib[c])
    # the columns of effect that differ from one (DE genes) are looked up, the others not
    varies = np.empty(m_genes, dtype=np.bool_)
    for g in range(m_genes):
        varies[g] = effect_max[g] != 1.0 or effect_min[g] != 1.0
    p_max = np.empty(m_genes)
    capacity = 1024
    cand_c = np.empty(capacity, dtype=np.int32)
    cand_g = np.empty(capacity, dtype=np.int32)
    n_cand = 0
    for g in range(m_genes):
        ph = phi[g]
        bound = base_max[g] * effect_max[g] * lib_max
        if not bound <= _MAX_MEAN:
            return np.zeros(n + 1, np.int64), cand_g[:0], np.zeros(0, np.int64), 1
        rate = ph * np.log1p(bound / ph)  # -log(1 - p_g)
        p_max[g] = -np.expm1(-rate)
        if not rate > 0.0:
            continue
        scale = 1.0 / rate
        c = -1
        while True:
            # failures before the next success: floor(E / rate), E ~ Exp(1)
            gap = np.floor(rng.standard_exponential() * scale)
            if gap >= n - c - 1:
                break
            c += 1 + int(gap)
            if n_cand == capacity:
                capacity *= 2
                more_c = np.empty(capacity, dtype=np.int32)
                more_g = np.empty(capacity, dtype=np.int32)
                more_c[:n_cand] = cand_c[:n_cand]
                more_g[:n_cand] = cand_g[:n_cand]
                cand_c, cand_g = more_c, more_g
            cand_c[n_cand] = c
            cand_g[n_cand] = g
            n_cand += 1
    # candidates by cell (a stable counting sort keeps the genes increasing)
    start = np.zeros(n + 1, dtype=np.int64)
    for t in range(n_cand):
        start[cand_c[t] + 1] += 1
    for c in range(n):
        start[c + 1] += start[c]
    fill = start[:-1].copy()
    genes = np.empty(n_cand, dtype=np.int32)
    for t in range(n_cand):
        c = cand_c[t]
        genes[fill[c]] = cand_g[t]
        fill[c] += 1
    # thinning and values, cell by cell: the kept entries are in CSR order
    indptr = np.zeros(n + 1, dtype=np.int64)
    indices = np.empty(n_cand, dtype=np.int32)
    counts = np.empty(n_cand, dtype=np.int64)
    nnz = 0
    for c in range(n):
        s = subject[c]
        e = klass[c]
        f = lib[c]
        for t in range(start[c], start[c + 1]):
            g = genes[t]
            ph = phi[g]
            m = base[s, g] * f
            if varies[g]:
                m *= effect[e, g]
            u = rng.random() * p_max[g]
            if u >= m:  # P(Y > 0) = 1 - (1 + m / phi)^-phi <= 1 - e^-m <= m
                continue
            log_p0 = -ph * np.log1p(m / ph)
            p_pos = -np.expm1(log_p0)
            if u >= p_pos:
                continue
            indices[nnz] = g
            counts[nnz] = _truncated_nb(rng, m, ph, log_p0, p_pos)
            nnz += 1
        indptr[c + 1] = nnz
    return indptr, indices[:nnz].copy(), counts[:nnz].copy(), 0
