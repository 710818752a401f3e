"""The pieces of the reductions' task graphs (:mod:`flashmm_dask.stats.reduce`,
:mod:`flashmm_dask.stats.reduce_strata`): reads run inside the task that reduces a block,
obs rows sent once and sliced on the cluster, the chains of tasks that fold the chunks
into running sums, and the tree that sums the chains' sums; and the keyword options all
the reductions take (:class:`Options`, bound by the functions that show a signature
derived from :func:`~flashmm_dask.stats.reduce.stats_graph`'s)."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import cloudpickle
import dask
import numpy as np
from dask import delayed
from dask.delayed import Delayed
from dask.optimization import cull

__all__: list[str] = []  # internal to the reductions

# obs larger than this is scattered once to a distributed client, not put in the tasks
_SCATTER_OBS_BYTES = 4 << 20
# a block's read is done inside the task that reduces it when its tasks pickle to less
_INLINE_BYTES = 1 << 16
# the key prefix of the per-block tasks (progress counts them)
_BLOCK_PREFIX = "flashmm-block-"


class _InlineRead:
    """The tasks that read one expression block, run by the task that reduces it.

    The block then has no key of its own: it never waits in a worker's memory for the
    reduction, nor is it moved to another worker to be reduced there.
    """

    __slots__ = ("graph", "key")

    def __init__(self, graph: dict[Any, Any], key: Any) -> None:
        self.graph = graph
        self.key = key

    def __getstate__(self) -> tuple[dict[Any, Any], Any]:
        return self.graph, self.key

    def __setstate__(self, state: tuple[dict[Any, Any], Any]) -> None:
        self.graph, self.key = state

    def read(self) -> Any:
        """The block (computed in this thread)."""
        return dask.get(self.graph, self.key)


def _is_literal(task: Any) -> bool:
    """Whether a graph node is data rather than a computation (dask's DataNode)."""
    return type(task).__name__ == "DataNode"


def _tree_levels(
    parts: list[Any], name: str, split_every: int, add: Callable[..., Any]
) -> list[Any]:
    """Sum a list of delayed partials in a tree of fan-in ``split_every`` until at most
    ``split_every`` are left (for the task that sums those and uses the total)."""
    level = 0
    while len(parts) > split_every:
        parts = [
            delayed(add, pure=True)(
                *parts[k : k + split_every], dask_key_name=f"{name}-{level}-{k // split_every}"
            )
            for k in range(0, len(parts), split_every)
        ]
        level += 1
    return parts


def _tree_sum(parts: list[Any], name: str, split_every: int, add: Callable[..., Any]) -> Any:
    """Sum a list of delayed partials in a tree of fan-in ``split_every`` (``add`` sums
    the partials of several tasks)."""
    level = 0
    while len(parts) > 1:
        parts = [
            delayed(add, pure=True)(
                *parts[k : k + split_every], dask_key_name=f"{name}-{level}-{k // split_every}"
            )
            for k in range(0, len(parts), split_every)
        ]
        level += 1
    return parts[0]


def _scattered(obs: Any) -> Any:
    """obs scattered once to the active distributed client when it is larger than
    _SCATTER_OBS_BYTES (a Future), else None (the rows of each chunk are in its task).

    Each task carrying its own rows makes a graph as large as obs (tens of MiB at a
    million cells, which distributed warns about); scattered, the graph holds one
    reference and each chunk's rows are sliced on the cluster.
    """
    if int(obs.memory_usage(index=False, deep=True).sum()) <= _SCATTER_OBS_BYTES:
        return None
    try:
        from distributed import default_client
    except ImportError:
        return None
    try:
        client = default_client()
    except ValueError:  # no client: a local scheduler, which copies nothing
        return None
    return client.scatter(obs, hash=False)


def _obs_rows(obs: Any, start: int, stop: int) -> Any:
    """The obs rows of cells start..stop - 1."""
    return obs.iloc[start:stop]


def _obs_chunk(obs: Any, obs_future: Any, start: int, stop: int, key: str) -> Any:
    """The obs rows of a cell chunk for its task: in the task itself (a key of its own
    would be computed on one worker and sent to the one that holds the block), or, for a
    large obs scattered once (``obs_future``), a task ``key`` that slices it there."""
    if obs_future is None:
        return obs.iloc[start:stop]
    return delayed(_obs_rows, pure=True)(obs_future, start, stop, dask_key_name=key)


def _n_threads() -> int:
    """The threads that will run the reduction: the active distributed client's, else
    the local scheduler's."""
    try:
        from distributed import default_client

        return max(1, sum(default_client().nthreads().values()))
    except (ImportError, ValueError):  # no distributed, or no client
        return max(1, int(dask.config.get("num_workers", None) or os.cpu_count() or 1))


def chained(
    fold: Callable[..., Any],
    data: Any,
    obs: Any,
    cell_starts: np.ndarray,
    token: str,
    n_chains: int,
    args: Callable[[int, int], tuple[Any, ...]],
) -> list[Any]:
    """The last task of each of ``n_chains`` chains that fold the cell chunks of ``data``
    (one feature chunk) into running sums.

    Chunk i is folded by ``fold(sums, block_i, obs_i, start, last, *args(start, stop))``
    into the sums of chain ``i % n_chains`` (``sums`` None for a chain's first chunk,
    ``last`` True for its last), which the task returns; ``obs`` is sent once to a
    distributed client when large. The block is read inside the task when its read is a
    small task of its own (see :func:`_inline_reads`). The tasks' keys start with
    _BLOCK_PREFIX (progress counts them).
    """
    blocks = list(data.to_delayed()[:, 0])
    reads = _inline_reads(blocks)
    obs_future = _scattered(obs)
    ends: list[Any] = [None] * min(len(blocks), n_chains)
    for i, block in enumerate(blocks):
        start, stop = int(cell_starts[i]), int(cell_starts[i + 1])
        c = i % len(ends)
        ends[c] = delayed(fold, pure=True)(
            ends[c],
            block if reads is None else reads[i],
            _obs_chunk(obs, obs_future, start, stop, f"flashmm-obs-{token}-{i}"),
            start,
            i + len(ends) >= len(blocks),
            *args(start, stop),
            dask_key_name=f"{_BLOCK_PREFIX}{token}-{i}-0",
        )
    return ends


def _inline_reads(blocks: Sequence[Any]) -> list[_InlineRead] | None:
    """The reads of the blocks (delayed, one per cell chunk) as _InlineRead, or None when a
    block's tasks are more than a small reader (in-memory data in the graph, or tasks
    shared with other blocks, which would then be run more than once)."""
    graph = dict(blocks[0].__dask_graph__())
    owner: dict[Any, int] = {}
    reads = []
    for i, block in enumerate(blocks):
        sub, _ = cull(graph, [block.key])
        for key, task in sub.items():
            if owner.setdefault(key, i) != i and not _is_literal(task):
                return None  # a computation shared by several blocks
            if owner[key] == i and len(cloudpickle.dumps(task)) > _INLINE_BYTES:
                return None
        reads.append(_InlineRead(sub, block.key))
    return reads


@dataclass(frozen=True)
class Options:
    """The keyword options of the reductions (:mod:`flashmm_dask.stats.reduce`'s
    ``stats_graph``, ``reduce_stats`` and their stratified forms), checked by its
    ``_validate``."""

    transform: str
    target_sum: float
    split_every: int
    check: bool
    provenance: Mapping[str, Any] | None


def computed_signature(graph: Callable[..., Delayed], returns: str) -> inspect.Signature:
    """The signature of the function that computes ``graph``'s result (shown by help(),
    IDEs and inspect.signature, and bound by :func:`bind_options`): ``graph``'s, with
    ``progress`` before ``provenance`` and the return type ``returns``."""
    progress = inspect.Parameter(
        "progress",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation="Callable[[int, int], None] | None",
    )
    parameters: list[inspect.Parameter] = []
    for parameter in inspect.signature(graph).parameters.values():
        parameters += [progress, parameter] if parameter.name == "provenance" else [parameter]
    return inspect.Signature(parameters, return_annotation=returns)


def bind_options(
    function: Callable[..., Any], options: Mapping[str, Any]
) -> tuple[Options, dict[str, Any]]:
    """The keyword ``options`` given to ``function`` (whose ``**options`` stand for the
    keywords of its signature), with the signature's defaults filled in: the Options and
    all the keyword arguments by name. A name not in the signature raises the TypeError
    Python raises for a wrong keyword; the values are checked later (``_validate``)."""
    try:
        bound = inspect.signature(function).bind_partial(**options)
    except TypeError as exc:  # "got an unexpected keyword argument 'x'"
        raise TypeError(f"{function.__name__}() {exc}") from None
    bound.apply_defaults()
    arguments = bound.arguments
    return Options(**{f.name: arguments[f.name] for f in fields(Options)}), arguments
