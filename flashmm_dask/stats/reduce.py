"""Chunked expression -> SummaryStats in one pass over the data, with Dask.

The expression matrix E is a Dask array of cells x features (the transpose of the R
orientation Y = E'), chunked along cells (i) and possibly features (j); its blocks are
NumPy arrays or SciPy CSR matrices. Every statistic is a sum over cells, so for cell
chunk i with design rows X_i (n_i x p), Z_i (n_i x q) and expression block E_ij
(n_i x m_j), after the transform:

    per cell chunk i:        XX_i = X_i'X_i   ZX_i = Z_i'X_i   ZZ_i = Z_i'Z_i   n_i
    per block (i, j):        XY_ij = X_i'E_ij   ZY_ij = Z_i'E_ij   Ynorm_ij = colsums(E_ij^2)

With one feature chunk (the usual case) the graph has one task per cell chunk i: it
reads the block, evaluates the design on the obs rows of the chunk (the Design object is
a single graph key shared by all of them; the rows of obs are in the task, or, for an
obs over 4 MiB on a distributed client, sliced from one scattered copy) and adds all
seven partials into running sums. When the block's own tasks are a small reader (a
store's row chunk, not in-memory data, not shared with other blocks) they are run inside
that task, so the block is never held for it in a worker's memory nor sent to another
worker. The chunks are dealt into one chain per thread: each task adds its chunk into
the running sums of its chain, received from the chain's previous task (their only
consumer, on the same worker) and passed on, so that nothing of the size of Z'E (259
donors x 11,596 genes is 24 MB) is pickled, moved or summed per chunk or per task; the
chains' sums are added in a tree of fan-in ``split_every``. With several feature chunks,
one task per cell chunk evaluates the design, one computes the shared partials, and one
task per block (i, j) reads the block once and returns its three partials, summed over
cell chunks in a tree of fan-in ``split_every``. Sums are float64, the feature chunks are
concatenated, and the result is a :class:`~flashmm_dask.stats.summary.SummaryStats`.
Memory per task is set by the chunk size: no n-length dense matrix is ever formed, and
CSR blocks stay sparse: X'E, Z'E and Ynorm come from one compiled pass over the stored
values (:mod:`flashmm_dask.stats.products`), which also transforms integer counts by
table look-up.

Transforms (applied to each block before the products; sparse blocks only touch their
stored values, since every transform maps 0 to 0):

    "none"                          E
    "log2p1"                        log2(1 + E)       R FLASHMM's is_counts=TRUE
    "log1p_scaled" / "log1p_cpm"    log1p(E / rowsum(E) * target_sum)

The scaled transform needs the total of each cell over all features, so when the features
are split over several chunks the array is first rechunked to one feature chunk (each
block then spans n_i cells x all features; choose the cell chunk size accordingly).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp
from dask import delayed
from dask.base import tokenize
from dask.callbacks import Callback
from dask.delayed import Delayed

from flashmm_dask.errors import DataError, DesignError, FlashmmError, InputError
from flashmm_dask.stats.blocks import _SCALED_TRANSFORMS, TRANSFORMS, _block_partial, add_block
from flashmm_dask.stats.graph import (
    _BLOCK_PREFIX,
    Options,
    _InlineRead,
    _n_threads,
    _obs_chunk,
    _scattered,
    _tree_levels,
    _tree_sum,
    bind_options,
    chained,
    computed_signature,
)
from flashmm_dask.stats.products import BlockSums
from flashmm_dask.stats.summary import SummaryStats

__all__ = ["TRANSFORMS", "compute_counted", "reduce_stats", "stats_graph"]

logger = logging.getLogger(__name__)


class _Design(Protocol):
    """What reduce needs of flashmm_dask.design.formula.Design."""

    @property
    def covariates(self) -> Sequence[str]: ...

    @property
    def random_names(self) -> Sequence[str]: ...

    @property
    def components(self) -> Sequence[str]: ...

    @property
    def d(self) -> Sequence[int]: ...

    def X(self, obs: Any) -> np.ndarray: ...

    def Z(self, obs: Any) -> Any: ...


class _Expression(Protocol):
    """What reduce needs of flashmm_dask.io.readers.Expression."""

    @property
    def data(self) -> Any: ...

    @property
    def features(self) -> Any: ...

    @property
    def obs(self) -> Any: ...


# -- tasks (run on workers) -------------------------------------------------------------


def _design_chunk(design: _Design, obs: Any, start: int) -> tuple[np.ndarray, Any]:
    """X_i (n_i x p, dense) and Z_i (n_i x q, CSR or dense) for the obs rows of chunk i."""
    n_i = len(obs)
    both = getattr(design, "XZ", None)  # flashmm_dask.design.formula.Design reads obs once for both
    X, Z = both(obs) if callable(both) else (design.X(obs), design.Z(obs))
    X = np.asarray(X, dtype=np.float64)
    Z = sp.csr_matrix(Z, dtype=np.float64) if sp.issparse(Z) else np.asarray(Z, np.float64)
    p, q = len(design.covariates), len(design.random_names)
    if X.shape != (n_i, p) or Z.shape != (n_i, q):
        raise DesignError(
            f"the design evaluated on cells {start}..{start + n_i - 1} gave X of shape "
            f"{X.shape} and Z of shape {Z.shape}, expected ({n_i}, {p}) and ({n_i}, {q}); "
            "the design must give one row per obs row and one column per name"
        )
    return X, Z


def _shared_partial(XZ: tuple[np.ndarray, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(XX_i, ZX_i, ZZ_i, n_i) of one cell chunk.

    ZZ_i stays sparse where Z is (indicator components: a diagonal or block-sparse q x q;
    dense, donor x cell type's q = 7,770 is 483 MB per chunk and per partial sum). The
    sums add entry by entry in the same chunk order either way (the same bits), and
    :class:`SummaryStats` makes the total dense."""
    X, Z = XZ
    ZZ = Z.T @ Z
    return X.T @ X, np.asarray(Z.T @ X), ZZ.tocsr() if sp.issparse(ZZ) else ZZ, X.shape[0]


@dataclass(frozen=True)
class _Fold:
    """What every task of a one-feature-chunk graph reads its chunks with: one graph key
    shared by all of them, not six arguments of each."""

    design: _Design
    features: tuple[str, ...]
    transform: str
    target_sum: float
    check: bool
    source: str


class _Chain:
    """The running sums of one chain of cell chunks (:func:`_fold_chunk`): [XX, ZX, ZZ,
    n] and :class:`BlockSums`, passed from each task of the chain to the next."""

    __slots__ = ("shared", "sums")

    def __init__(self, shared: list[Any], sums: BlockSums) -> None:
        self.shared, self.sums = shared, sums

    def __sizeof__(self) -> int:
        # what dask.sizeof reports to the scheduler (which then keeps a chain where its
        # sums are) and to a worker's memory accounting
        return self.sums.nbytes


def _fold_chunk(
    chain: _Chain | None, block: Any, rows: Any, start: int, last: bool, fold: _Fold
) -> Any:
    """Add one cell chunk (its block read here when an :class:`_InlineRead`; ``rows`` its
    obs rows, ``start`` its first cell) into the running sums of its chain (None: the
    chain's first chunk); return them, or [XX, ZX, ZZ, n, XY, ZY, Ynorm] after the
    chain's ``last`` chunk."""
    if isinstance(block, _InlineRead):
        block = block.read()
    XZ = _design_chunk(fold.design, rows, start)
    part = _shared_partial(XZ)
    if chain is None:
        sums = BlockSums(XZ[0].shape[1], XZ[1].shape[1], len(fold.features))
        chain = _Chain([_owned(a) for a in part], sums)
    else:
        for k, a in enumerate(part):
            chain.shared[k] += a
    add_block(
        block,
        XZ,
        fold.features,
        start,
        0,
        fold.transform,
        fold.target_sum,
        fold.check,
        fold.source,
        chain.sums,
    )
    return [*chain.shared, *chain.sums.partials()] if last else chain


def _owned(a: Any) -> Any:
    """A partial as a writable float64 array (a cell count as it is), copied only when it
    is not already one."""
    if not isinstance(a, np.ndarray):
        return a
    if a.dtype != np.float64 or not a.flags.writeable:
        return np.array(a, dtype=np.float64)
    return a


def _sum_partials(*parts: tuple[Any, ...]) -> tuple[Any, ...]:
    """Elementwise sum of partial tuples (float64 arrays and cell counts); the first is
    added to in place where it is writable (each partial has its sum as its only
    consumer)."""
    total = [_owned(a) for a in parts[0]]
    for part in parts[1:]:
        for k, a in enumerate(part):
            total[k] += a
    return tuple(total)


def _assemble(
    shared: tuple[np.ndarray, np.ndarray, np.ndarray, int],
    per_feature_chunk: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    names: Mapping[str, Any],
) -> SummaryStats:
    """SummaryStats from the shared totals and the totals of each feature chunk."""
    XX, ZX, ZZ, n = shared
    return SummaryStats(
        XX=XX,
        XY=np.concatenate([t[0] for t in per_feature_chunk], axis=1),
        ZX=ZX,
        ZY=np.concatenate([t[1] for t in per_feature_chunk], axis=1),
        ZZ=ZZ,
        Ynorm=np.concatenate([t[2] for t in per_feature_chunk]),
        n=int(n),
        **names,
    )


def _assemble_fused(names: Mapping[str, Any], *parts: tuple[Any, ...]) -> SummaryStats:
    """SummaryStats from the sum of the chains' :func:`_fold_chunk` sums (one feature
    chunk), added here: one task, not a sum and then the assembly."""
    XX, ZX, ZZ, n, XY, ZY, Ynorm = _sum_partials(*parts)
    return _assemble((XX, ZX, ZZ, n), [(XY, ZY, Ynorm)], names)


# -- graph ------------------------------------------------------------------------------


def _chunking(
    expr: _Expression, data: Any, options: Options
) -> tuple[tuple[str, ...], np.ndarray, str]:
    """The feature names, the first cell of each cell chunk (and the number of cells
    last), and a token that makes the graph's keys unique."""
    features = tuple(str(f) for f in expr.features)
    cell_starts = np.concatenate([[0], np.cumsum(data.chunks[0])]).astype(int)
    # unique keys: hashing obs and the design would cost O(n) and buys nothing here
    token = tokenize(data.name, options, uuid.uuid4().hex)
    return features, cell_starts, token


def _record(options: Options, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The provenance of the statistics: the transform (its target sum when it scales),
    ``extra`` (formulas, strata), then the caller's provenance."""
    record: dict[str, Any] = {"transform": options.transform, **extra}
    if options.transform in _SCALED_TRANSFORMS:
        record["target_sum"] = float(options.target_sum)
    record.update(options.provenance or {})
    return record


def _validate(expr: _Expression, design: _Design, options: Options) -> None:
    transform, target_sum, split_every = options.transform, options.target_sum, options.split_every
    if transform not in TRANSFORMS:
        raise InputError(f"unknown transform {transform!r}; choose one of {list(TRANSFORMS)}")
    if transform in _SCALED_TRANSFORMS and not (np.isfinite(target_sum) and target_sum > 0):
        raise InputError(f"target_sum must be a positive number, got {target_sum!r}")
    if isinstance(split_every, bool) or not isinstance(split_every, int) or split_every < 2:
        raise InputError(f"split_every must be an integer >= 2, got {split_every!r}")
    data = expr.data
    if not isinstance(data, da.Array) or data.ndim != 2:
        raise InputError(
            f"expr.data must be a 2-dimensional dask array (cells x features), got "
            f"{type(data).__name__}; for in-memory matrices use SummaryStats.from_arrays"
        )
    if any(np.isnan(c) for c in data.chunks[0] + data.chunks[1]):
        raise InputError(
            "expr.data has unknown chunk sizes; call expr.data.compute_chunk_sizes() first"
        )
    n, m = data.shape
    if n == 0 or m == 0:
        raise DataError(f"the expression matrix is empty ({n} cells x {m} features)")
    if len(expr.obs) != n:
        raise DataError(
            f"obs has {len(expr.obs)} rows but the expression matrix has {n} cells; "
            "they must describe the same cells in the same order"
        )
    if len(expr.features) != m:
        raise DataError(f"there are {len(expr.features)} feature names for {m} expression columns")
    if sum(design.d) != len(design.random_names):
        raise DesignError(
            f"design.d = {design.d} adds up to {sum(design.d)}, but the design has "
            f"{len(design.random_names)} random-effect columns"
        )


# stats_graph, reduce_stats and the stratified strata_graph, reduce_strata are public and
# take the same keyword options: they are written once, in stats_graph's signature; the
# others take ``**options`` and show (and bind) a signature derived from it (as
# simulate_to_store does from simulate_rnaseq's). Behind them one Options value and one
# graph builder per kind serve all four.
def stats_graph(
    expr: _Expression,
    design: _Design,
    *,
    transform: str = "none",
    target_sum: float = 1e4,
    split_every: int = 8,
    check: bool = True,
    provenance: Mapping[str, Any] | None = None,
) -> Delayed:
    """The lazy one-pass computation of the summary statistics.

    Parameters
    ----------
    expr : Expression
        ``expr.data`` a dask array (cells x features), blocks ndarray or CSR;
        ``expr.features`` the m feature names; ``expr.obs`` a DataFrame with one row
        per cell.
    design : Design
        Evaluated chunk by chunk: ``design.X(obs_rows)`` (n_i x p),
        ``design.Z(obs_rows)`` (n_i x q); names ``covariates``, ``random_names``,
        ``components`` and sizes ``d``.
    transform : {"none", "log2p1", "log1p_scaled", "log1p_cpm"}
        Applied to each block before the products (see the module docstring).
    target_sum : float
        Total each cell is scaled to by the ``log1p_scaled``/``log1p_cpm`` transform
        (1e6 gives counts per million).
    split_every : int
        Fan-in of the tree that sums the partials over cell chunks.
    check : bool
        Raise :class:`DataError` on NaN/Inf, or on negative or non-integer values with a
        counts transform, naming the data, the cells and the feature.
    provenance : mapping, optional
        Extra provenance (formulas, source); ``transform`` and ``target_sum`` are added.

    Returns
    -------
    dask.delayed.Delayed
        Computes to a :class:`SummaryStats`. Compute it once (``.compute()``,
        ``client.compute``); each expression block is read once.
    """
    options = Options(transform, target_sum, split_every, check, provenance)
    return _build_graph(expr, design, options)[0]


def _build_graph(expr: _Expression, design: _Design, options: Options) -> tuple[Delayed, int]:
    """The delayed SummaryStats and the number of expression blocks it reads."""
    _validate(expr, design, options)
    transform, target_sum, check = options.transform, options.target_sum, options.check
    split_every = options.split_every
    data = expr.data
    if transform in _SCALED_TRANSFORMS and data.numblocks[1] > 1:
        logger.info(
            "transform %r needs the total of each cell over all features: rechunking "
            "%d feature chunks into one",
            transform,
            data.numblocks[1],
        )
        data = data.rechunk({1: -1})
    features, cell_starts, token = _chunking(expr, data, options)
    feature_starts = np.concatenate([[0], np.cumsum(data.chunks[1])]).astype(int)
    source = str(getattr(expr, "source", "") or "")
    blocks = data.to_delayed()
    n_i, n_j = blocks.shape

    # the design reads obs by position; a string index would be most of the graph's bytes
    obs = expr.obs.reset_index(drop=True)
    fused: list[Any] = []
    if n_j == 1:  # chains of tasks that fold the chunks into running sums
        fold = _Fold(design, features, transform, target_sum, check, source)
        fold_key = delayed(fold, name=f"flashmm-fold-{token}", traverse=False)
        fused = chained(
            _fold_chunk, data, obs, cell_starts, token, _n_threads(), lambda *_: (fold_key,)
        )
    else:
        design_key = delayed(design, name=f"flashmm-design-{token}", traverse=False)
        features_key = delayed(features, name=f"flashmm-features-{token}", traverse=False)
        obs_future = _scattered(obs)
        shared: list[Any] = []
        per_block: list[list[Any]] = [[] for _ in range(n_j)]
        for i in range(n_i):
            start, stop = int(cell_starts[i]), int(cell_starts[i + 1])
            obs_i = _obs_chunk(obs, obs_future, start, stop, f"flashmm-obs-{token}-{i}")
            XZ_i = delayed(_design_chunk, pure=True)(
                design_key, obs_i, start, dask_key_name=f"flashmm-design-chunk-{token}-{i}"
            )
            shared.append(
                delayed(_shared_partial, pure=True)(
                    XZ_i, dask_key_name=f"flashmm-shared-{token}-{i}"
                )
            )
            for j in range(n_j):
                per_block[j].append(
                    delayed(_block_partial, pure=True)(
                        blocks[i, j],
                        XZ_i,
                        features_key,
                        start,
                        int(feature_starts[j]),
                        transform,
                        target_sum,
                        check,
                        source,
                        dask_key_name=f"{_BLOCK_PREFIX}{token}-{i}-{j}",
                    )
                )
        shared_total = _tree_sum(shared, f"flashmm-shared-sum-{token}", split_every, _sum_partials)
        feature_totals = [
            _tree_sum(parts, f"flashmm-feature-sum-{token}-{j}", split_every, _sum_partials)
            for j, parts in enumerate(per_block)
        ]
    formulas: dict[str, Any] = {}
    # formulas, when the design carries them (flashmm_dask.design.formula.Design does)
    fixed = getattr(design, "fixed", None)
    if isinstance(fixed, str):
        formulas = {"fixed": fixed, "random": list(getattr(design, "random", ()))}
    record = _record(options, formulas)
    names = {
        "d": tuple(int(k) for k in design.d),
        "covariates": tuple(str(c) for c in design.covariates),
        "random": tuple(str(r) for r in design.random_names),
        "components": tuple(str(c) for c in design.components),
        "features": features,
        "provenance": record,
    }
    logger.debug("summary-statistics graph: %d cell chunks x %d feature chunks", n_i, n_j)
    # one key, not an argument that dask would walk name by name (11,596 features)
    names_key = delayed(names, name=f"flashmm-names-{token}", traverse=False)
    if fused:
        graph = delayed(_assemble_fused, pure=True)(
            names_key,
            *_tree_levels(fused, f"flashmm-sum-{token}", split_every, _sum_partials),
            dask_key_name=f"flashmm-stats-{token}",
        )
    else:
        graph = delayed(_assemble, pure=True)(
            shared_total, feature_totals, names_key, dask_key_name=f"flashmm-stats-{token}"
        )
    return graph, n_i * n_j


def reduce_stats(expr: _Expression, design: _Design, **options: Any) -> SummaryStats:
    """Compute the summary statistics of a chunked expression matrix in one pass.

    Parameters
    ----------
    expr, design, transform, target_sum, split_every, check, provenance
        As in :func:`stats_graph`.
    progress : callable, optional
        ``progress(done, total)`` after each expression block is reduced, on the local
        (threaded, synchronous, multiprocessing) schedulers. On a distributed client it
        is called once at the end; for live progress there compute :func:`stats_graph`
        with ``client.compute`` and ``distributed.progress``.

    Returns
    -------
    SummaryStats

    Raises
    ------
    DataError
        NaN/Inf, negative values with a counts transform, obs/feature names that do
        not match the expression matrix, or a chunk that cannot be read (corrupt store).
    InputError
        An unknown transform or invalid argument.
    """
    bound, arguments = bind_options(reduce_stats, options)
    return compute_counted(_build_graph(expr, design, bound), expr, arguments["progress"])


reduce_stats.__signature__ = computed_signature(stats_graph, "SummaryStats")  # type: ignore[attr-defined]


def compute_counted(
    built: tuple[Delayed, int], expr: _Expression, progress: Callable[[int, int], None] | None
) -> Any:
    """Compute a reduction graph of ``expr`` and the number of expression blocks it reads
    (``built``), calling ``progress(done, total)`` after each block on the local schedulers
    (once at the end on a distributed client, which runs no local callbacks)."""
    graph, total = built
    source = str(getattr(expr, "source", "the expression data"))
    if progress is None:
        return _compute(graph, source)
    done = 0

    def _posttask(key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        nonlocal done
        if isinstance(key, str) and key.startswith(_BLOCK_PREFIX):
            tail = key.rsplit("-", 1)[1]  # a task of several chunks: "0x<blocks>"
            done += int(tail.split("x")[1]) if "x" in tail else 1
            progress(done, total)

    with Callback(posttask=_posttask):
        stats = _compute(graph, source)
    if done < total:
        progress(total, total)
    return stats


def _compute(graph: Delayed, source: str) -> Any:
    try:
        (stats,) = dask.compute(graph)
    except Exception as exc:
        error = unreadable(exc, source)
        if error is None:
            raise
        raise error from exc
    return stats


def unreadable(exc: BaseException, source: str) -> DataError | None:
    """The DataError for an exception raised while the expression chunks were read and
    reduced (a codec error of a corrupt chunk, a truncated file), or None for errors of
    other kinds (flashmm_dask's own, network errors), which are raised as they are."""
    if isinstance(exc, FlashmmError | ConnectionError | TimeoutError):
        return None
    if not isinstance(exc, OSError | RuntimeError | ValueError | KeyError | EOFError):
        return None
    return DataError(
        f"reading the expression data failed ({type(exc).__name__}: {exc}); a chunk of "
        f"{source} is unreadable, corrupt or truncated: re-copy or re-write the store "
        "(--debug shows the traceback)"
    )
