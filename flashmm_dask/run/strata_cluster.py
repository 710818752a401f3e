"""Steps 1 and 2 of a stratified run with the strata's statistics left on the workers.

The statistics of S strata are S models' worth of per-feature sums (29 cell states x 264
rows x 11,596 features is 0.7 GB). Gathered on the driver, copied, written from there and
sent back block by block, they cost more than the pass over the data that made them.
Here the chains of the one-pass reduction
(:func:`~flashmm_dask.stats.reduce_strata.strata_chains`) stay where they were summed:

- each stratum's rows (X'E over Z'E) are added over the chains by a task of their own,
  in the order of the reduction's tree, so that they equal, to the bit, those that
  :func:`~flashmm_dask.stats.reduce_strata.reduce_strata` returns; only the other chains'
  rows of that stratum move between workers;
- the driver receives each stratum's shared statistics (XX, ZX, ZZ, n) as a
  SummaryStats of no features (its ``head``: names, d, provenance), and its Ynorm and
  non-zero counts (m each);
- ``stats.zarr`` is written by one task per stratum (the root by the driver), beside
  the fit (:func:`save_in_background`);
- each stratum's rows are summed on the workers holding the chains in turn, and the
  tasks that read them are placed there (:meth:`ClusterStrata.at`);
- the task of each feature block takes its columns of its stratum's rows itself.

Statistics loaded from a store (``stats.load``, or those of an interrupted run) take the
same path: each stratum's rows are scattered once.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flashmm_dask.stats.graph import bind_options
from flashmm_dask.stats.reduce_strata import (
    StrataChains,
    add_heads,
    add_rows,
    chain_heads,
    chain_rows,
    in_tree_order,
    strata_chains,
    strata_graph,
)
from flashmm_dask.stats.store import save_local
from flashmm_dask.stats.strata import StratifiedStats, save_strata
from flashmm_dask.stats.summary import SummaryStats

__all__ = ["ClusterStrata", "reduce_on_cluster", "save_in_background", "scattered"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ClusterStrata:
    """Every stratum's statistics, the per-feature X'E and Z'E on the cluster.

    Attributes
    ----------
    heads : level -> the stratum's SummaryStats without features (XX, ZX, ZZ, n and the
        names), with ``by``, the groups and the strata's description
    features : the m features fitted (those of ``data.features``)
    Ynorm, nnz : level -> (m,) its sums of squares and non-zero counts (nnz may be None)
    rows : level -> a Future of its (p + q) x M rows, X'E over Z'E, M >= m
    columns : the columns of ``rows`` of the m features (None: all, M = m)
    saving : the write of ``stats.zarr`` going on beside the fit (None: none)
    homes : level -> the worker its rows are summed on (dealt over the workers holding
        the chains, so that both send and receive as many strata's rows); the tasks that
        read them are placed there (:meth:`at`), not on a worker they must be sent to
    """

    heads: StratifiedStats
    features: tuple[str, ...]
    Ynorm: dict[str, np.ndarray]
    nnz: dict[str, np.ndarray | None]
    rows: dict[str, Any]
    columns: np.ndarray | None = None
    saving: Future[None] | None = None
    homes: dict[str, str] = dataclasses.field(default_factory=dict)

    def at(self, level: str) -> dict[str, Any]:
        """The placement of a task that reads a stratum's rows (``client.submit``'s
        keywords): on the worker that holds them, or another when it is busy or lost."""
        return self.placed(self.homes.get(level))

    @staticmethod
    def placed(home: str | None) -> dict[str, Any]:
        """``client.submit``'s keywords for a task preferring the worker ``home``."""
        return {} if home is None else {"workers": [home], "allow_other_workers": True}

    def saved(self, *, quiet: bool = False) -> None:
        """Wait for ``stats.zarr`` to be written (:func:`save_in_background`), raising its
        error (logged instead with ``quiet``: when another error is already raised)."""
        if self.saving is None:
            return
        try:
            self.saving.result()
        except Exception:
            if not quiet:
                raise
            logger.exception("the summary statistics could not be saved")

    @property
    def by(self) -> str | None:
        return self.heads.by

    @property
    def groups(self) -> dict[str, str]:
        return self.heads.groups

    @property
    def m(self) -> int:
        return len(self.features)

    def __len__(self) -> int:
        return len(self.heads)

    def __iter__(self) -> Iterator[str]:
        return iter(self.heads)

    def attrs(self) -> dict[str, Any]:
        """The ``strata`` attribute of the stores (:meth:`StratifiedStats.attrs`)."""
        return self.heads.attrs()

    def block(self, level: str, sl: slice) -> tuple[Any, Any, np.ndarray]:
        """The arguments of the task of the features ``sl`` of a stratum: its rows (a
        Future), their columns (a slice, or positions) and the features' Ynorm."""
        columns = sl if self.columns is None else self.columns[sl]
        return self.rows[level], columns, self.Ynorm[level][sl]


def _stratum(
    head: SummaryStats,
    rows: np.ndarray,
    features: tuple[str, ...],
    columns: np.ndarray | None,
    Ynorm: np.ndarray,
    nnz: np.ndarray | None,
) -> SummaryStats:
    """The SummaryStats of a stratum from its head and its rows (X'E over Z'E)."""
    picked = rows if columns is None else rows[:, columns]
    return dataclasses.replace(
        head,
        XY=picked[: head.p],
        ZY=picked[head.p :],
        Ynorm=Ynorm,
        features=features,
        nnz=nnz,
    )


def _head(names: dict[str, Any], small: list[Any]) -> SummaryStats:
    """A stratum's statistics without features, from its summed [XX, ZX, ZZ, n]."""
    XX, ZX, ZZ, n = small
    p, q = len(names["covariates"]), len(names["random"])
    return SummaryStats(
        XX=XX,
        XY=np.zeros((p, 0)),
        ZX=ZX,
        ZY=np.zeros((q, 0)),
        ZZ=ZZ,
        Ynorm=np.zeros(0),
        n=int(n),
        d=names["d"],
        covariates=names["covariates"],
        random=names["random"],
        components=names["components"],
        features=(),
        provenance=names["provenance"],
    )


def reduce_on_cluster(
    client: Any,
    expr: Any,
    strata: Any,
    features: np.ndarray | None,
    wait: Any,
    **options: Any,
) -> ClusterStrata:
    """Reduce every stratum's statistics in one pass, leaving X'E and Z'E on the workers.

    ``options``: those of :func:`~flashmm_dask.stats.reduce_strata.strata_graph`;
    ``features``: the positions of the features to fit (None: all); ``wait(futures)``
    waits for the reduction (with its progress).
    """
    bound, arguments = bind_options(strata_graph, options)
    built: StrataChains = strata_chains(expr, strata, bound, arguments["chains"])
    chains = client.compute(built.chains)
    wait(chains)
    heads = client.gather(client.map(chain_heads, chains, pure=False))
    small, Yn, nnz = in_tree_order(heads, built.split_every, add_heads)
    held = client.who_has(chains)
    workers = sorted({address for c in chains for address in held.get(c.key, ())})
    rows: dict[str, Any] = {}
    shared: dict[str, SummaryStats] = {}
    homes: dict[str, str] = {}
    for s, names in enumerate(built.names):
        level = names["level"]
        if workers:
            homes[level] = workers[s % len(workers)]
        place = ClusterStrata.placed(homes.get(level))
        parts = [client.submit(chain_rows, c, s, pure=False) for c in chains]
        rows[level] = client.submit(
            _stratum_rows,
            built.split_every,
            *parts,
            key=f"flashmm-rows-{built.token}-{s}",
            **place,
        )
        shared[level] = _head(names, small[s])
    all_features = built.features
    picked = slice(None) if features is None else features
    return ClusterStrata(
        StratifiedStats(shared, built.by, built.groups, built.info),
        all_features if features is None else tuple(all_features[i] for i in features),
        {level: Yn[s][picked] for s, level in enumerate(shared)},
        {level: nnz[s][picked] for s, level in enumerate(shared)},
        rows,
        None if features is None else np.asarray(features, dtype=np.intp),
        homes=homes,
    )


def _stratum_rows(split_every: int, *parts: np.ndarray) -> np.ndarray:
    """A stratum's rows summed over the chains (a new array: see add_rows)."""
    return in_tree_order(list(parts), split_every, add_rows)


def scattered(client: Any, stats: StratifiedStats) -> ClusterStrata:
    """Statistics held by the driver (loaded from a store) sent to the cluster once."""
    heads = {level: _no_features(s) for level, s in stats.items()}
    rows = [np.vstack([np.asarray(s.XY), np.asarray(s.ZY)]) for s in stats.values()]
    futures = client.scatter(rows, hash=False) if rows else []
    first = next(iter(stats.values()))
    return ClusterStrata(
        StratifiedStats(heads, stats.by, stats.groups, stats.info),
        tuple(first.features),
        {level: np.asarray(s.Ynorm) for level, s in stats.items()},
        {level: s.nnz for level, s in stats.items()},
        dict(zip(stats, futures, strict=True)),
    )


def _no_features(stats: SummaryStats) -> SummaryStats:
    return dataclasses.replace(
        stats,
        XY=np.zeros((stats.p, 0)),
        ZY=np.zeros((stats.q, 0)),
        Ynorm=np.zeros(0),
        features=(),
        nnz=None,
    )


def _write_group(path: str, *stratum: Any) -> None:
    """Write the SummaryStats group of a stratum at ``path`` (a task on a worker);
    ``stratum``: the arguments of :func:`_stratum`."""
    stats = _stratum(*stratum)
    stats._write_group(path, stats._attrs(), {})


def save_on_cluster(client: Any, stats: ClusterStrata, path: Path) -> None:
    """Write ``stats.zarr`` at the local ``path``: a store of strata (one task per
    stratum's group), or with no ``by``, the one stratum's plain statistics store."""

    def write_groups(tmp: Path) -> None:
        futures = [
            client.submit(
                _write_group,
                str(tmp if stats.by is None else tmp / "strata" / stats.groups[level]),
                stats.heads[level],
                stats.rows[level],
                stats.features,
                stats.columns,
                stats.Ynorm[level],
                stats.nnz[level],
                pure=False,
                **stats.at(level),
            )
            for level in stats
        ]
        client.gather(futures)

    if stats.by is None:
        save_local(path, True, write_groups)
    else:
        save_strata(path, stats.attrs(), write_groups, overwrite=True)


def save_in_background(save: Callable[[], None], stats: ClusterStrata) -> ClusterStrata:
    """``stats`` with ``save()`` (the write of ``stats.zarr``, :func:`save_on_cluster`)
    going on in a thread of the driver: its tasks run on the workers while the driver
    prepares the strata's models and creates their results groups, and the fit's tasks
    fill the workers' waits for the strata's rows. The fit waits for it before it returns
    (:meth:`ClusterStrata.saved`), so that a resumed run finds the statistics."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="flashmm-save-stats")
    try:
        future = pool.submit(save)
    finally:
        pool.shutdown(wait=False)
    return dataclasses.replace(stats, saving=future)
