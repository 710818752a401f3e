"""The summary statistics of every stratum (and of selected cells) in one pass.

The grouped form of :mod:`flashmm_dask.stats.reduce`: each cell carries a stratum code
(:class:`~flashmm_dask.design.strata.Strata`; -1 for a cell in no fitted stratum, e.g. not
selected). The task of cell chunk i reads the expression block once, splits its rows by
code, evaluates each present stratum s's design on its rows and accumulates s's

    XX_is, ZX_is, ZZ_is, n_is, XY_is, ZY_is, Ynorm_is, nnz_is

(nnz: the number of cells in which each feature is non-zero, for ``min_cells``). The
per-feature ones (XY, ZY, Ynorm, nnz) of all strata come from one compiled pass over the
block (:mod:`flashmm_dask.stats.strata_products`) that adds them straight into the running
sums; blocks that pass cannot take (dense blocks, transforms other than ``none`` and
``log2p1``, values that are not counts, no numba) are reduced stratum by stratum with the
products of the unstratified reduction. Unselected cells cost nothing beyond their read.

When the running sums are larger than a cache (many strata x subjects x features), a chunk
has about one cell per (stratum, subject), and a pass over one chunk would fetch a line of
the sums from memory for nearly every value. Its chunk then waits in the chain's sums
(read, not yet added) until the waiting chunks hold ``_FOLD_BYTES`` of stored values or
the chain ends, and one pass adds them all, each stratum's design evaluated once on its
cells of all of them (:func:`_accumulate`); waiting chunks are kept in 16-bit integers
where they fit (:class:`~flashmm_dask.stats.strata_products.Packed`), so a pass takes
twice the cells for the same memory.
Columns of a stratum's X set by the subject (the intercept, donor-level covariates) are
left out of the compiled pass while each of its cells has one entry of Z, equal to 1:
their X'E is u' Z'E, added when the chain ends (:class:`_Sums`,
:mod:`flashmm_dask.stats.subject_columns`).

The statistics of S strata are S times those of one model (S x (p_s + q_s + 1) x m
float64; 29 cell states x 260 x 11,596 features is 0.7 GB), so partials are not returned
per chunk and summed in a tree as in the unstratified reduction: the chunks are dealt into
``chains`` chains, and each chunk's task adds its strata's statistics into the running
sums of its chain, which it receives from the previous task of the chain (their only
consumer) and passes on. The chains' sums are then added in a tree of fan-in
``split_every`` (or, in a run, stratum by stratum where they lie, in the same order:
:func:`strata_chains` and :mod:`flashmm_dask.run.strata_cluster`). Every block is still
read exactly once, whatever the number of strata; memory is ``chains`` running sums, each
with at most ``_FOLD_BYTES`` of waiting chunks, plus one chunk per task: set by the model,
the number of features and ``chains``, not by the number of cells.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from dask import delayed
from dask.delayed import Delayed

from flashmm_dask.design.strata import Strata, group_names
from flashmm_dask.errors import DataError, InputError
from flashmm_dask.stats.blocks import _as_block, _block_partial
from flashmm_dask.stats.cell_pass import one_entry_rows
from flashmm_dask.stats.graph import (
    Options,
    _InlineRead,
    _tree_sum,
    bind_options,
    chained,
    computed_signature,
)
from flashmm_dask.stats.products import lookup_table
from flashmm_dask.stats.reduce import (
    _chunking,
    _design_chunk,
    _Expression,
    _record,
    _shared_partial,
    _validate,
    compute_counted,
    stats_graph,
)
from flashmm_dask.stats.strata import StratifiedStats
from flashmm_dask.stats.strata_products import Packed, fits_table, strata_products
from flashmm_dask.stats.subject_columns import SubjectColumns
from flashmm_dask.stats.summary import SummaryStats

__all__ = ["reduce_strata", "strata_graph"]

logger = logging.getLogger(__name__)

# chunks wait to be added in one pass over several (see _accumulate) when the running
# sums are larger than this (a processor's last-level cache), until the waiting chunks'
# stored values and indices reach _FOLD_BYTES
_FOLD_ABOVE = 32 << 20
_FOLD_BYTES = 256 << 20


def _nonzero_counts(E: np.ndarray | sp.csr_matrix) -> np.ndarray:
    """(m,) int64: cells of the block in which each feature is non-zero."""
    m = E.shape[1]
    if isinstance(E, sp.csr_matrix):
        if not E.has_canonical_format:
            E = E.astype(np.float64)
            E.sum_duplicates()
        return np.bincount(E.indices[E.data != 0], minlength=m).astype(np.int64)
    return np.count_nonzero(E, axis=0).astype(np.int64)


class _StratumDesign:
    """Stratum s's design on its rows of a chunk (:meth:`Strata.XZ`), as
    :func:`~flashmm_dask.stats.reduce._design_chunk` reads a design."""

    def __init__(self, strata: Strata, s: int) -> None:
        self.strata, self.s = strata, s
        design = strata.designs[s]
        self.covariates, self.random_names = design.covariates, design.random_names
        self.components, self.d = design.components, design.d

    def XZ(self, obs: Any) -> tuple[Any, Any]:
        return self.strata.XZ(self.s, obs)

    def X(self, obs: Any) -> np.ndarray:
        return np.asarray(self.XZ(obs)[0])

    def Z(self, obs: Any) -> Any:
        return self.XZ(obs)[1]


@dataclass(frozen=True)
class _Chunk:
    """A cell chunk read and waiting in a chain's sums for the pass over several."""

    E: Packed
    obs: Any
    codes: np.ndarray
    start: int


class _Sums:
    """The running sums of every stratum's statistics in one chain of chunks.

    ``out`` (R x m) holds stratum s's X'E then Z'E in rows ``bases[s] .. bases[s + 1]``,
    ``Yn`` and ``nnz`` (S x m) its colsums(E^2) and non-zero counts
    (:mod:`flashmm_dask.stats.strata_products`), ``small[s]`` its [XX, ZX, ZZ, n] (None
    while no chunk had its cells). ``pending``: chunks read but not yet added (see
    :func:`_accumulate`; none once the chain's last chunk is added). ``subjects[s]``:
    the columns of stratum s's X left out of the compiled pass (their X'E is added by
    :meth:`settle` when the chain ends, or by :meth:`direct` before the stratum's cells
    are added any other way).
    """

    def __init__(self, strata: Strata, m: int) -> None:
        self.subjects = [SubjectColumns(d.p, d.q) for d in strata.designs]
        self.p = [d.p for d in strata.designs]
        self.bases = np.concatenate([[0], np.cumsum([d.p + d.q for d in strata.designs])])
        self.out = np.zeros((int(self.bases[-1]), m))
        self.Yn = np.zeros((strata.n_strata, m))
        self.nnz = np.zeros((strata.n_strata, m), dtype=np.int64)
        self.small: list[list[Any] | None] = [None] * strata.n_strata
        self.pending: list[_Chunk] = []

    def __sizeof__(self) -> int:
        # what dask.sizeof reports to the scheduler (which then keeps a chain where its
        # sums are) and to a worker's memory accounting
        return int(self.out.nbytes + self.Yn.nbytes + self.nnz.nbytes + self.pending_bytes())

    def pending_bytes(self) -> int:
        """The stored values and indices of the pending chunks."""
        return sum(c.E.nbytes for c in self.pending)

    def direct(self, s: int, lost: np.ndarray | None = None) -> None:
        """Add stratum s's X'E of the columns ``lost`` (left out so far; None: all of
        them, and none left out from now on) as u' Z'E of the cells added."""
        if lost is None:
            lost = self.subjects[s].stop()
        if lost.any():
            base, p = int(self.bases[s]), self.p[s]
            ZY = self.out[base + p : int(self.bases[s + 1])]
            self.out[base + np.flatnonzero(lost)] += self.subjects[s].products(lost, ZY)

    def settle(self) -> None:
        """Every stratum's X'E complete (the chain's last chunk added)."""
        for s in range(len(self.subjects)):
            self.direct(s)

    def add_small(self, s: int, item: tuple[Any, ...]) -> None:
        self.small[s] = self.added(self.small[s], item)

    @staticmethod
    def added(sums: list[Any] | None, item: tuple[Any, ...]) -> list[Any]:
        """[XX, ZX, ZZ, n] of a stratum with ``item`` added (``sums`` None: none yet)."""
        if sums is None:
            return [np.array(a, dtype=np.float64) if isinstance(a, np.ndarray) else a for a in item]
        for k, a in enumerate(item):
            sums[k] = sums[k] + a
        return sums

    def add_stratum(self, s: int, XY: Any, ZY: Any, Ynorm: Any, nnz: Any) -> None:
        base, p = int(self.bases[s]), self.p[s]
        self.out[base : base + p] += XY
        self.out[base + p : int(self.bases[s + 1])] += ZY
        self.Yn[s] += Ynorm
        self.nnz[s] += nnz

    def __iadd__(self, other: _Sums) -> _Sums:
        assert not self.pending and not other.pending, "a chain's last task adds its chunks"
        self.out += other.out
        self.Yn += other.Yn
        self.nnz += other.nnz
        for s, item in enumerate(other.small):
            if item is not None:
                self.add_small(s, tuple(item))
        return self

    def stratum(self, s: int) -> dict[str, Any]:
        """Stratum s's statistics (XX, XY, ZX, ZY, ZZ, Ynorm, n, nnz)."""
        small = self.small[s]
        assert small is not None, "a planned stratum has cells"
        XX, ZX, ZZ, n = small
        base, p = int(self.bases[s]), self.p[s]
        return {
            "XX": XX,
            "XY": self.out[base : base + p],
            "ZX": ZX,
            "ZY": self.out[base + p : int(self.bases[s + 1])],
            "ZZ": ZZ,
            "Ynorm": self.Yn[s],
            "n": int(n),
            "nnz": self.nnz[s],
        }


@dataclass(frozen=True)
class _Fold:
    """What every task of the chains reads its chunk with (one graph key)."""

    strata: Strata
    features: tuple[str, ...]
    transform: str
    target_sum: float
    check: bool


def _accumulate(
    total: _Sums | None,
    block: Any,
    obs: Any,
    start: int,
    last: bool,
    codes: np.ndarray,
    fold: _Fold,
) -> _Sums:
    """The chain's running sums with the cells of one more chunk added, each stratum's
    to its own rows; ``total`` is updated in place (its only consumer).

    A chunk that the compiled pass can take waits in ``total.pending`` while the running
    sums are larger than a cache (``_FOLD_ABOVE``), until the pending chunks hold
    ``_FOLD_BYTES`` of stored values or the chain ends: one pass then adds them all (see
    :mod:`flashmm_dask.stats.strata_products`). Memory stays set by those bounds, not by
    the number of cells.
    """
    if isinstance(block, _InlineRead):
        block = block.read()
    E = _as_block(block, sparsify=True)
    if E.shape[0] != len(codes):
        raise DataError(
            f"the expression block of cells {start}.. has {E.shape[0]} rows but the obs "
            f"chunk has {len(codes)}; expression and obs must have the same cells"
        )
    if total is None:
        total = _Sums(fold.strata, E.shape[1])
    table = lookup_table(fold.transform)
    if isinstance(E, sp.csr_matrix) and table is not None and fits_table(E, table):
        total.pending.append(_Chunk(Packed.of(E, table), obs, codes, start))
        if last or total.out.nbytes <= _FOLD_ABOVE or total.pending_bytes() >= _FOLD_BYTES:
            _add_pending(total, fold, table)
    else:
        # dense blocks, other transforms, values off the table, no numba: stratum by stratum
        _add_each(total, E, _strata_parts(total, fold.strata, obs, codes, start), start, fold)
    if last:
        _add_pending(total, fold, table)
        total.settle()
    return total


def _strata_parts(
    total: _Sums, strata: Strata, obs: Any, codes: np.ndarray, start: int
) -> list[tuple[int, np.ndarray, np.ndarray, Any]]:
    """(s, rows, X_s, Z_s) of each stratum with cells among ``codes`` (their positions,
    ascending, and design rows); each stratum's XX, ZX, ZZ and n are added to ``total``."""
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(-1, strata.n_strata + 1))
    parts = []
    for s in range(strata.n_strata):
        lo, hi = int(bounds[s + 1]), int(bounds[s + 2])
        if lo == hi:
            continue
        rows = order[lo:hi]
        XZ = _design_chunk(_StratumDesign(strata, s), obs.iloc[rows], start)
        total.add_small(s, _shared_partial(XZ))
        parts.append((s, rows, *XZ))
    return parts


def _add_each(
    total: _Sums,
    E: Any,
    parts: list[tuple[int, np.ndarray, np.ndarray, Any]],
    start: int,
    fold: _Fold,
) -> None:
    """Add each stratum's products of its rows of E (``parts``: its rows of E and
    design rows) with the products of the unstratified reduction."""
    for s, rows, X, Z in parts:
        total.direct(s)  # every column of X from now on
        E_s = E if len(rows) == E.shape[0] else E[rows]
        XY, ZY, Ynorm = _block_partial(
            E_s, (X, Z), fold.features, start, 0, fold.transform, fold.target_sum, fold.check
        )
        total.add_stratum(s, XY, ZY, Ynorm, _nonzero_counts(E_s))


def _add_pending(total: _Sums, fold: _Fold, table: np.ndarray | None) -> None:
    """Add the pending chunks: each stratum's design evaluated once on its cells of all
    of them, then one compiled pass over their values (or, where it cannot be taken,
    chunk by chunk and stratum by stratum)."""
    chunks, total.pending = total.pending, []
    if not chunks:
        return
    codes = np.concatenate([c.codes for c in chunks])
    obs = chunks[0].obs if len(chunks) == 1 else pd.concat([c.obs for c in chunks])
    block = np.repeat(np.arange(len(chunks)), [len(c.codes) for c in chunks])
    row = np.concatenate([np.arange(len(c.codes)) for c in chunks])
    parts = _strata_parts(total, fold.strata, obs, codes, chunks[0].start)
    assert table is not None, "pending chunks passed fits_table"
    if all(sp.issparse(Z) for *_, Z in parts) and strata_products(
        [c.E for c in chunks],
        table,
        [(s, block[rows], row[rows], X, Z, _left_out(total, s, X, Z)) for s, rows, X, Z in parts],
        total.bases,
        total.out,
        total.Yn,
        total.nnz,
    ):
        return
    for b, chunk in enumerate(chunks):
        mine = []
        for s, rows, X, Z in parts:
            here = block[rows] == b
            if here.any():
                mine.append((s, row[rows[here]], X[here], Z[here]))
        _add_each(total, chunk.E.csr(), mine, chunk.start, fold)


def _left_out(total: _Sums, s: int, X: np.ndarray, Z: sp.csr_matrix) -> np.ndarray:
    """The columns of stratum s's X (its rows of the pass) to leave out of the pass: those
    set by the subject (:class:`SubjectColumns`) while every cell has one entry of Z;
    the products of columns that lose their place are added first."""
    if not one_entry_rows(sp.csr_matrix(Z)):
        total.direct(s)
        return np.zeros(X.shape[1], dtype=bool)
    keep, lost = total.subjects[s].update(X, sp.csr_matrix(Z))
    total.direct(s, lost)
    return keep


def _sum_strata(*parts: _Sums) -> _Sums:
    """The sum of the running sums of several chains (the first is added to in place:
    each chain's sums have this task as their only consumer)."""
    total = parts[0]
    for part in parts[1:]:
        total += part
    return total


def _assemble_strata(
    total: _Sums,
    strata_info: dict[str, Any],
    names: list[dict[str, Any]],
    by: str | None,
    features: tuple[str, ...],
) -> StratifiedStats:
    out: dict[str, SummaryStats] = {}
    for s, name in enumerate(names):
        name = dict(name)
        level = name.pop("level")
        out[level] = SummaryStats(**total.stratum(s), features=features, **name)
    return StratifiedStats(out, by, group_names(list(out)), strata_info)


@dataclass(frozen=True)
class StrataChains:
    """The reduction of every stratum up to its chains: the delayed running sums of
    each chain (:class:`_Sums`) and what names each stratum's statistics.

    ``names``: per stratum, its level, d, covariates, random, components and provenance
    (the keywords of its SummaryStats beside the arrays).
    """

    chains: list[Delayed]
    names: list[dict[str, Any]]
    features: tuple[str, ...]
    features_key: Delayed
    info: dict[str, Any]
    by: str | None
    groups: dict[str, str]
    split_every: int
    token: str
    n_reads: int


def strata_chains(expr: _Expression, strata: Strata, options: Options, chains: int) -> StrataChains:
    """The chains of the one-pass reduction of every stratum (see the module docstring)."""
    for design in strata.designs:
        _validate(expr, design, options)
    if len(strata.codes) != expr.data.shape[0]:
        raise DataError(
            f"the strata describe {len(strata.codes)} cells but the data have "
            f"{expr.data.shape[0]}; plan them from the data's obs"
        )
    data = expr.data
    if data.numblocks[1] > 1:
        # the rows of each stratum are taken from whole-feature blocks (and the scaled
        # transform needs each cell's total over all features)
        data = data.rechunk({1: -1})
    features, starts, token = _chunking(expr, data, options)
    fold = _Fold(strata, tuple(features), options.transform, options.target_sum, options.check)
    fold_key = delayed(fold, name=f"flashmm-fold-{token}", traverse=False)
    features_key = delayed(features, name=f"flashmm-features-{token}", traverse=False)
    columns = sorted({c for d in strata.designs for c in d._columns})
    if isinstance(chains, bool) or not isinstance(chains, int) or chains < 1:
        raise InputError(f"chains must be a positive integer, got {chains!r}")
    parts = chained(
        _accumulate,
        data,
        expr.obs[columns].reset_index(drop=True),
        starts,
        token,
        chains,
        lambda start, stop: (strata.codes[start:stop], fold_key),
    )
    record = _record(options, {"by": strata.by, "cells": strata.cells})
    names: list[dict[str, Any]] = []
    for level, design in zip(strata.levels, strata.designs, strict=True):
        names.append(
            {
                "level": level,
                "d": tuple(int(k) for k in design.d),
                "covariates": tuple(design.covariates),
                "random": tuple(design.random_names),
                "components": tuple(design.components),
                "provenance": {
                    **record,
                    "fixed": design.fixed,
                    "random": list(design.random),
                    "stratum": level,
                },
            }
        )
    groups = group_names(strata.levels)
    return StrataChains(
        parts,
        names,
        tuple(features),
        features_key,
        strata.describe(),
        strata.by,
        groups,
        options.split_every,
        token,
        len(data.chunks[0]),
    )


def _graph(expr: _Expression, strata: Strata, options: Options, chains: int) -> tuple[Delayed, int]:
    """The delayed StratifiedStats and the number of expression blocks it reads."""
    built = strata_chains(expr, strata, options, chains)
    graph = delayed(_assemble_strata, pure=True)(
        _tree_sum(
            built.chains, f"flashmm-strata-sum-{built.token}", built.split_every, _sum_strata
        ),
        built.info,
        built.names,
        built.by,
        built.features_key,  # once in the graph, not once per stratum
        dask_key_name=f"flashmm-strata-stats-{built.token}",
    )
    return graph, built.n_reads


# -- the chains' sums taken apart where they are (the pipeline's statistics stay on the
# workers: only each stratum's shared statistics, Ynorm and nnz reach the driver)


def chain_heads(sums: _Sums) -> tuple[list[Any], np.ndarray, np.ndarray]:
    """A chain's small running sums: each stratum's [XX, ZX, ZZ, n] (None when the chain
    saw none of its cells), and Ynorm and nnz of every stratum (S x m)."""
    return sums.small, sums.Yn, sums.nnz


def chain_rows(sums: _Sums, s: int) -> np.ndarray:
    """Stratum s's rows of a chain's running sums: X'E over Z'E, (p_s + q_s) x m (a view)."""
    return sums.out[int(sums.bases[s]) : int(sums.bases[s + 1])]


def in_tree_order(parts: list[Any], split_every: int, add: Callable[..., Any]) -> Any:
    """``add`` applied to the chains' parts in the order of the reduction's tree of fan-in
    ``split_every`` (:func:`~flashmm_dask.stats.graph._tree_sum` over the chains), so
    that sums taken apart are added exactly as the whole ones are."""
    while len(parts) > 1:
        parts = [add(*parts[k : k + split_every]) for k in range(0, len(parts), split_every)]
    return parts[0]


def add_rows(*parts: np.ndarray) -> np.ndarray:
    """The sum of the chains' rows of one stratum, in a new array: the first part is a
    view of its chain's sums, which other strata's tasks read too, so a copy of that
    chain made after an in-place add would carry the sum into a recomputation of this
    stratum's rows (after a worker is lost) and count the other chains twice."""
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total


def add_heads(*parts: tuple[list[Any], np.ndarray, np.ndarray]) -> tuple[list[Any], Any, Any]:
    """The sum of several chains' :func:`chain_heads`, as :meth:`_Sums.__iadd__` adds them."""
    small: list[Any] = list(parts[0][0])
    Yn, nnz = parts[0][1].copy(), parts[0][2].copy()
    for other_small, other_Yn, other_nnz in parts[1:]:
        Yn += other_Yn
        nnz += other_nnz
        for s, item in enumerate(other_small):
            if item is not None:
                small[s] = _Sums.added(small[s], tuple(item))
    return small, Yn, nnz


def strata_graph(expr: _Expression, strata: Strata, **options: Any) -> Delayed:
    """The lazy one-pass computation of every stratum's statistics.

    Parameters are those of :func:`flashmm_dask.stats.reduce.stats_graph`, with the
    :class:`~flashmm_dask.design.strata.Strata` (from
    :func:`~flashmm_dask.design.strata.plan_strata` on ``expr.obs``) in place of the design.
    ``chains``: the number of running sums (the chunks of one chain are reduced one after
    the other; give about the number of worker threads).

    Returns
    -------
    dask.delayed.Delayed
        Computes to a :class:`~flashmm_dask.stats.strata.StratifiedStats`.
    """
    bound, arguments = bind_options(strata_graph, options)
    return _graph(expr, strata, bound, arguments["chains"])[0]


def _strata_signature() -> inspect.Signature:
    """strata_graph's signature: stats_graph's (its keyword options written once, there),
    with the strata in place of the design and ``chains`` last."""
    strata = inspect.Parameter(
        "strata", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="Strata"
    )
    chains = inspect.Parameter(
        "chains", inspect.Parameter.KEYWORD_ONLY, default=2, annotation="int"
    )
    parameters = [
        strata if p.name == "design" else p
        for p in inspect.signature(stats_graph).parameters.values()
    ]
    return inspect.Signature([*parameters, chains], return_annotation="Delayed")


strata_graph.__signature__ = _strata_signature()  # type: ignore[attr-defined]


def reduce_strata(expr: _Expression, strata: Strata, **options: Any) -> StratifiedStats:
    """Compute :func:`strata_graph` (each expression block read once).

    ``progress(done, total)`` is called after each block on the local schedulers.
    """
    bound, arguments = bind_options(reduce_strata, options)
    built = _graph(expr, strata, bound, arguments["chains"])
    stats: StratifiedStats = compute_counted(built, expr, arguments["progress"])
    return stats


reduce_strata.__signature__ = computed_signature(strata_graph, "StratifiedStats")  # type: ignore[attr-defined]
