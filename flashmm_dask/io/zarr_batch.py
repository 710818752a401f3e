"""The Zarr work of creating a group and of writing a block in a few calls, not one per array.

Every synchronous Zarr call (``group[name]``, ``array[rows] = x``, ``create_array``) is a
round trip to the thread of Zarr's event loop. On a Dask worker, whose own event-loop
thread holds the GIL while it receives data, the caller waits at each round trip for the
GIL to be handed back (up to the interpreter's switch interval, 5 ms): creating a results
group of 26 arrays took 0.15-0.2 s there (55 ms alone), and a stratified run creates one
per stratum. Here the arrays of a group are created, or looked up, concurrently in one
coroutine run by one round trip (:func:`run`); the stores are those the one-call-at-a-time
code wrote, byte for byte. A block's values are written concurrently in one call, and
the block marked done in a second (a failure of any write leaves it unmarked).

Used by :mod:`flashmm_dask.io.results` (:func:`create_arrays` for ``create_results``,
:func:`write_arrays` for ``write_block``) and
:func:`flashmm_dask.io.strata_results.load_strata` (:func:`read_groups`: every stratum's
results read in one call, not 15 calls per stratum in threads).
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import zarr
import zarr.api.asynchronous as zarr_async
from zarr.core.group import AsyncGroup
from zarr.core.sync import sync
from zarr.errors import ZarrUserWarning

from flashmm_dask.errors import StoreError
from flashmm_dask.io.results_layout import _COORDS, _VARS, ResultsLayout
from flashmm_dask.model.status import STATUS

__all__ = ["arrays_of", "create_arrays", "read_groups", "run", "settled", "write_arrays"]

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` on Zarr's event loop: one round trip, whatever it awaits."""
    return sync(coroutine)


async def settled(awaitables: Iterable[Awaitable[Any]]) -> list[Any]:
    """``asyncio.gather`` of ``awaitables`` that lets every one finish before it raises
    the first error: a write that fails does not leave others still writing into a
    store that its caller then removes or rewrites."""
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


async def _async_group(group: zarr.Group) -> AsyncGroup:
    """The asynchronous group at the path of an open ``group`` (its mode kept)."""
    return await AsyncGroup.open(group.store_path, zarr_format=3)


async def arrays_of(group: AsyncGroup, names: Iterable[str]) -> dict[str, Any]:
    """The arrays of ``group`` among ``names`` (absent names left out), looked up
    concurrently; a name that is a group raises StoreError (the store is corrupt)."""

    async def get(name: str) -> Any:
        try:
            return await group.getitem(name)
        except KeyError:
            return None

    wanted = list(names)
    nodes = await asyncio.gather(*(get(name) for name in wanted))
    out: dict[str, Any] = {}
    for name, node in zip(wanted, nodes, strict=True):
        if node is None:
            continue
        if not isinstance(node, zarr.AsyncArray):
            raise StoreError(
                f"{name!r} in the results store is a group, not an array; it is corrupt"
            )
        out[name] = node
    return out


def compressors() -> tuple[Any, ...]:
    """The codec of every per-feature result: LZ4 in Blosc with byte shuffle.

    On a stratum's results (11,596 features, 5.9 MB) it encodes in 2.9 ms and decodes in
    0.9 against Zarr's default Zstandard's 15 and 4.7 ms, for 4.8 MB against 4.6 MB: the
    workers write a block beside their fits, and the driver reads every block back for
    the tables. Standard Zarr v3 (``blosc``), read by any Zarr reader.
    """
    from zarr.codecs import BloscCodec

    return (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)


async def _create_arrays(group: zarr.Group, layout: ResultsLayout) -> None:
    target = await _async_group(group)
    sizes = layout.dim_sizes()
    names = {
        "feature": layout.features,
        "covariate": layout.covariates,
        "covariate2": layout.covariates,
        "component": layout.components,
        "contrast": layout.contrasts,
    }

    async def coordinate(dim: str) -> None:
        coord = await target.create_array(
            dim,
            shape=(sizes[dim],),
            dtype=str,  # zarr's variable-length UTF-8 "string" type: no warnings, read as str
            chunks=(max(1, sizes[dim]),),
            fill_value="",
            dimension_names=(dim,),
        )
        if sizes[dim]:
            await coord.setitem(slice(None), np.array(names[dim], dtype=object))

    jobs: list[Coroutine[Any, Any, Any]] = [coordinate(dim) for dim in _COORDS]
    fill = {"bool": False, "int8": -1}
    for name in layout.variables():
        var = _VARS[name]
        dims = ("feature", *var.dims)
        shape = tuple(sizes[d] for d in dims)
        attributes: dict[str, Any] = {"description": var.description}
        if name == "status":
            attributes.update(flag_values=list(range(len(STATUS))), flag_meanings=" ".join(STATUS))
        jobs.append(
            target.create_array(
                name,
                shape=shape,
                dtype=var.dtype,
                chunks=(layout.block_size, *(max(1, s) for s in shape[1:])),
                fill_value=fill.get(var.dtype, np.nan),
                compressors=compressors(),
                dimension_names=dims,
                attributes=attributes,
            )
        )
    jobs.append(
        target.create_array(
            "block_done",
            shape=(layout.n_blocks,),
            dtype="bool",
            chunks=(1,),
            fill_value=False,
            dimension_names=("block",),
            attributes={"description": "whether the block's features have been written"},
        )
    )
    await asyncio.gather(*jobs)


def create_arrays(
    group: zarr.Group, layout: ResultsLayout, attrs: Mapping[str, Any] | None
) -> None:
    """Create every array of ``layout`` in the empty results ``group`` (concurrently, in
    one call), consolidate the metadata, then write the group's attributes, unless
    ``attrs`` is None (see :func:`create_results
    <flashmm_dask.io.results.create_results>`)."""
    run(_create_arrays(group, layout))
    # Array metadata is final: consolidate it into the root document. zarr warns that
    # consolidated metadata is not (yet) in the v3 specification; zarr-python and xarray
    # read it, and it is what lets xarray.open_zarr(path) open the store without a warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=ZarrUserWarning)
        zarr.consolidate_metadata(group.store, zarr_format=3)
    # The attributes come last: until they are written the group is not a results store.
    if attrs is not None:
        root = zarr.open_group(store=group.store, mode="r+")
        root.update_attributes(dict(attrs))  # one metadata write, not one per key


def write_arrays(
    group: zarr.Group,
    b: int,
    block_size: int,
    check: Callable[[dict[str, tuple[int, ...]], int], dict[str, np.ndarray]],
) -> None:
    """Write block ``b`` of the results ``group``: its arrays are looked up in one call,
    ``check(shapes, m)`` (the array shapes by name, the number of features) returns the
    arrays to write, checked; they are written concurrently in one call (a failure of
    any leaves the block unmarked), then the block is marked in ``block_done``."""
    found = run(_lookup(group, [*_VARS, "feature", "block_done"]))
    shapes = {name: tuple(array.shape) for name, array in found.items()}
    m = int(shapes["feature"][0])
    checked = check(shapes, m)
    start = int(b) * block_size
    rows = slice(start, min(start + block_size, m))

    run(settled(found[name].setitem(rows, value) for name, value in checked.items()))
    # The resume record is written last: a block that is marked done is whole.
    zarr.Array(found["block_done"])[int(b)] = True


async def _lookup(group: zarr.Group, names: Iterable[str]) -> dict[str, Any]:
    return await arrays_of(await _async_group(group), names)


#: What :func:`read_groups` gives of each array: its dimension names, values, attributes.
Read = tuple[tuple[str, ...], np.ndarray, dict[str, Any]]


def read_groups(
    paths: Sequence[str], names: Iterable[str]
) -> list[tuple[dict[str, Any], dict[str, Read | None]]]:
    """The attributes of the groups at the local ``paths`` and their arrays among
    ``names`` (absent names left out; a member that is not an array with dimension names
    maps to None), every group and array read concurrently, in one call."""
    wanted = list(names)

    async def member(group: AsyncGroup, name: str) -> tuple[str, Read | None] | None:
        try:
            node = await group.getitem(name)
        except KeyError:
            return None
        dims = getattr(node.metadata, "dimension_names", None)
        if not isinstance(node, zarr.AsyncArray) or dims is None or None in dims:
            return name, None
        values = await node.getitem(...)
        return name, (tuple(str(d) for d in dims), np.asarray(values), dict(node.attrs))

    async def one(path: str) -> tuple[dict[str, Any], dict[str, Read | None]]:
        group = await zarr_async.open_group(store=path, mode="r")
        found = await asyncio.gather(*(member(group, name) for name in wanted))
        return dict(group.attrs), dict(item for item in found if item is not None)

    async def every() -> list[tuple[dict[str, Any], dict[str, Read | None]]]:
        return list(await asyncio.gather(*(one(path) for path in paths)))

    return run(every())
