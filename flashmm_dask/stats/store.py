"""The Zarr store of a SummaryStats: its format, the atomic local and in-place remote
writes, and the checked read (the bodies of :meth:`SummaryStats.save` and
:meth:`SummaryStats.load`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flashmm_dask.errors import InputError, StoreError
from flashmm_dask.io.paths import Location, locate
from flashmm_dask.io.writing import staged

if TYPE_CHECKING:
    from zarr.core.array_spec import ArrayConfigParams

    from flashmm_dask.stats.summary import SummaryStats

logger = logging.getLogger(__name__)

FORMAT = "flashmm_dask.summary_stats"
FORMAT_VERSION = 2

_ARRAYS = ("XX", "XY", "ZX", "ZY", "ZZ", "Ynorm")
# the most bytes (uncompressed) of a chunk of a statistic in the store
_CHUNK_BYTES = 8 << 20


def compressors() -> tuple[Any, ...]:
    """The codec of every statistic in the store: LZ4 in Blosc (no shuffle).

    Sums of log counts repeat few bit patterns, so LZ4 keeps a third of Z'E's bytes at
    about half the CPU time of Zarr's default (Zstandard, a sixth): a stratified run of 29
    states writes 0.7 GB of Z'E beside its fit, on the workers that fit. Standard Zarr v3
    (``blosc``), read by any Zarr reader.
    """
    from zarr.codecs import BloscCodec

    return (BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"),)


#: Zarr's runtime settings of every statistic written: every chunk is written as it is. By
#: default Zarr first compares each chunk with the fill value, to skip chunks of nothing
#: but fill; for Z'E of a stratum (24 MB) that scan cost as much as compressing it, and
#: chunks of sums are almost never all zero (a skipped one reads back the same zeros).
ARRAY_CONFIG: ArrayConfigParams = {"write_empty_chunks": True}


def chunk_shape(shape: tuple[int, ...], itemsize: int = 8) -> tuple[int, ...]:
    """The chunks of a statistic in the store: whole along every axis but the last (the
    features, for XY, ZY, Ynorm and nnz), cut along it into pieces of at most
    ``_CHUNK_BYTES``.

    Zarr's default cuts Z'E (259 x 11,596) into 32 chunks of 0.7 MiB, each a file and a
    compression of its own; a stratified run writes 29 of them, and whole columns in 8 MiB
    pieces write in 40% less time (the stored bytes are alike).
    """
    if not shape:
        return shape
    column = itemsize * int(np.prod(shape[:-1]))
    last = max(1, min(shape[-1], _CHUNK_BYTES // max(1, column)))
    return (*(max(1, k) for k in shape[:-1]), last)


def save_stats(
    stats: SummaryStats,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Write ``stats`` to a Zarr group (see :meth:`SummaryStats.save`)."""
    attrs = stats._attrs()
    loc = locate(path, storage_options, error=StoreError)
    if loc.local:

        def write(tmp: Path) -> None:
            stats._write_group(str(tmp), attrs, {})

        save_local(loc.url, overwrite, write, shown=loc.shown)
    else:
        _save_remote(stats, loc, attrs, overwrite)
    logger.info("wrote summary statistics (n=%d, m=%d) to %s", stats.n, stats.m, path)


def save_local(
    path: str | os.PathLike[str],
    overwrite: bool,
    write: Callable[[Path], object],
    *,
    shown: str | None = None,
) -> None:
    """``write(tmp)`` a statistics store, staged into place at the local ``path``
    (``shown`` in messages, default ``path``).

    Raises
    ------
    StoreError
        Something is at ``path`` and ``overwrite`` is False or it is not a statistics
        store, or the write fails (``path`` then holds what it held before).
    """
    target = Path(path)
    shown = os.fspath(path) if shown is None else shown
    if target.exists() or target.is_symlink():
        _refuse_replace(shown, overwrite, _is_stats_store(locate(target)))
    try:
        with staged(target) as tmp:
            write(tmp)
    except Exception as exc:
        raise StoreError(f"could not write summary statistics to {shown}: {exc}") from exc


def _save_remote(
    stats: SummaryStats, loc: Location, attrs: dict[str, Any], overwrite: bool
) -> None:
    # no rename is atomic on object stores: the group is written in place and marked
    # complete last (load() refuses it until then)
    fs, fs_path = loc.fs()
    if fs.exists(fs_path):
        _refuse_replace(loc.shown, overwrite, _is_stats_store(loc))
        fs.rm(fs_path, recursive=True)
    try:
        stats._write_group(loc.url, attrs, loc.options)
    except Exception as exc:
        raise StoreError(
            f"could not write summary statistics to {loc.shown}: {exc}; the store there is "
            "incomplete (load() refuses it); write it again with overwrite=True (--overwrite)"
        ) from exc


def load_summary(
    cls: type[SummaryStats],
    path: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> SummaryStats:
    """Read statistics written by :func:`save_stats` (see :meth:`SummaryStats.load`)."""
    import zarr

    try:
        loc = locate(path, storage_options, error=StoreError)
        group = zarr.open_group(loc.url, mode="r", storage_options=loc.options or None)
    except (FileNotFoundError, OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(
            f"no summary-statistics store at {path}: {exc}; write one with SummaryStats.save()"
        ) from exc
    attrs: dict[str, Any] = dict(group.attrs)
    found = attrs.get("format")
    if found != FORMAT:
        raise StoreError(
            f"{path} is not a summary-statistics store: its format is {found!r}, "
            f"expected {FORMAT!r}"
        )
    version = attrs.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise StoreError(f"{path} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise StoreError(
            f"{path} was written in format version {version} by flashmm_dask "
            f"{attrs.get('package_version', '?')}; this version reads format version "
            f"{FORMAT_VERSION}: upgrade flashmm_dask"
        )
    if "strata" in attrs:
        raise StoreError(
            f"{path} holds the statistics of several strata ({attrs['strata'].get('by')}); "
            "read it with flashmm_dask.load_stats"
        )
    if attrs.get("complete") is not True:
        raise StoreError(
            f"{path} is incomplete (its write was interrupted); compute and save the "
            "statistics again with overwrite=True (--overwrite)"
        )
    arrays: dict[str, np.ndarray] = {}
    try:
        for name in _ARRAYS:
            array = group[name]
            if not isinstance(array, zarr.Array):
                raise KeyError(f"{name!r} is a group, expected an array")
            arrays[name] = np.asarray(array[...])
        nnz = None
        if "nnz" in group:
            stored = group["nnz"]
            if not isinstance(stored, zarr.Array):
                raise KeyError("'nnz' is a group, expected an array")
            nnz = np.asarray(stored[:])
        return cls(
            **arrays,
            n=attrs["n"],
            d=tuple(attrs["d"]),
            covariates=attrs["covariates"],
            random=attrs["random"],
            components=attrs["components"],
            features=attrs["features"],
            provenance=attrs.get("provenance", {}),
            nnz=nnz,
        )
    except (KeyError, InputError) as exc:
        raise StoreError(f"{path} is not a consistent summary-statistics store: {exc}") from exc


def _is_stats_store(loc: Location) -> bool:
    import zarr

    try:
        group = zarr.open_group(loc.url, mode="r", storage_options=loc.options or None)
        return group.attrs.get("format") == FORMAT
    except Exception:  # anything that is not a readable group is not ours
        return False


def _refuse_replace(path: str, overwrite: bool, is_stats_store: bool) -> None:
    if not overwrite:
        raise StoreError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    if not is_stats_store:
        raise StoreError(
            f"{path} exists and is not a summary-statistics store; refusing to replace it. "
            "Choose another path or remove it yourself"
        )
