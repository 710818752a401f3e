"""The Zarr store of a SummaryStats: its format, the atomic local and in-place remote
writes, and the checked read (the bodies of :meth:`SummaryStats.save` and
:meth:`SummaryStats.load`)."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flashmm_dask.errors import InputError, StoreError

if TYPE_CHECKING:
    from flashmm_dask.stats.summary import SummaryStats

logger = logging.getLogger(__name__)

FORMAT = "flashmm_dask.summary_stats"
FORMAT_VERSION = 2

_ARRAYS = ("XX", "XY", "ZX", "ZY", "ZZ", "Ynorm")


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flashmm-dask")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def save_stats(
    stats: SummaryStats,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Write ``stats`` to a Zarr group (see :meth:`SummaryStats.save`)."""
    attrs = stats._attrs()
    options = dict(storage_options or {})
    local = _local_path(path, options)
    if local is not None:
        _save_local(stats, local, attrs, overwrite)
    else:
        _save_remote(stats, str(path), attrs, overwrite, options)
    logger.info("wrote summary statistics (n=%d, m=%d) to %s", stats.n, stats.m, path)


def _save_local(stats: SummaryStats, path: Path, attrs: dict[str, Any], overwrite: bool) -> None:
    if path.exists() or path.is_symlink():
        _refuse_replace(str(path), overwrite, _is_stats_store(str(path), {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    tmp = path.parent / f".{path.name}.partial-{token}"
    old = path.parent / f".{path.name}.old-{token}"
    try:
        stats._write_group(str(tmp), attrs, {})
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old.exists():
                os.replace(old, path)
            raise
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoreError(f"could not write summary statistics to {path}: {exc}") from exc
    shutil.rmtree(old, ignore_errors=True)


def _save_remote(
    stats: SummaryStats, url: str, attrs: dict[str, Any], overwrite: bool, options: dict[str, Any]
) -> None:
    import fsspec

    fs, fs_path = fsspec.core.url_to_fs(url, **options)
    if fs.exists(fs_path):
        _refuse_replace(url, overwrite, _is_stats_store(url, options))
        fs.rm(fs_path, recursive=True)
    try:
        stats._write_group(url, attrs, options)
    except Exception as exc:
        raise StoreError(
            f"could not write summary statistics to {url}: {exc}; the store there is "
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

    options = dict(storage_options or {})
    try:
        group = zarr.open_group(str(path), mode="r", storage_options=options or None)
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


def _local_path(path: str | os.PathLike[str], options: Mapping[str, Any]) -> Path | None:
    """The local filesystem path of ``path``, or None for a non-local fsspec URL."""
    if isinstance(path, os.PathLike):
        return Path(path)
    if "://" not in path:
        return Path(path)
    if path.startswith("file://") and not options:
        return Path(path[len("file://") :])
    return None


def _is_stats_store(path: str, options: Mapping[str, Any]) -> bool:
    import zarr

    try:
        group = zarr.open_group(path, mode="r", storage_options=dict(options) or None)
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
