"""Where a store lives: a local path or an fsspec URL, resolved once by :func:`locate`.

Every store the package reads or writes (expression stores, summary statistics, results
stores and their strata) is reached through a :class:`Location`. A path without a
protocol, or a ``file://`` URL, is a local path (made absolute, so that tasks on other
processes reach the same file); any other URL (``memory://``, ``s3://``, ``gs://``, ...;
remote protocols need their fsspec package, e.g. s3fs or gcsfs) keeps its
``storage_options`` for the filesystem.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from flashmm_dask.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["Location", "locate"]


@dataclass(frozen=True, eq=False)
class Location:
    """Where a store lives.

    Parameters
    ----------
    url : str
        Absolute local path (``local`` True) or fsspec URL, as used to open it.
    shown : str
        The location as the user gave it, for messages.
    storage_options : mapping
        fsspec options for URLs (empty for local paths).
    local : bool
        Whether ``url`` is a path on the local filesystem.
    """

    url: str
    shown: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    local: bool = True

    @property
    def suffix(self) -> str:
        """The lower-case suffix of the last path component (``".h5ad"``, ``".zarr"``)."""
        return os.path.splitext(self.url.rstrip("/"))[1].lower()

    @property
    def options(self) -> dict[str, Any]:
        """``storage_options`` as a fresh dict (what zarr and fsspec take)."""
        return dict(self.storage_options)

    def fs(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem of the location and the path on it."""
        if self.local:
            return LocalFileSystem(), self.url
        fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return fs, path

    def exists(self) -> bool:
        """Whether anything is there (a dangling local link counts)."""
        if self.local:
            return os.path.lexists(self.url)
        fs, path = self.fs()
        return bool(fs.exists(path))


def locate(
    path: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    error: type[Exception] = DataError,
) -> Location:
    """Resolve a path or URL into a :class:`Location`; ``file://`` URLs become local paths.

    Parameters
    ----------
    path : local path or fsspec URL
    storage_options : fsspec options for URLs (ignored, with a debug message, for local
        paths)
    error : the exception class raised when the URL's filesystem cannot be made (the
        readers raise DataError, the stores StoreError)
    """
    shown = os.fspath(path)
    options = dict(storage_options or {})
    if "://" not in shown and "::" not in shown:
        if options:
            logger.debug("storage_options ignored for the local path %s", shown)
        return Location(os.path.abspath(os.path.expanduser(shown)), shown, {}, local=True)
    try:
        fs, local_path = fsspec.core.url_to_fs(shown, **options)
    except (ImportError, ValueError, OSError) as exc:
        raise error(
            f"cannot open {shown!r}: {exc}. Install the fsspec filesystem for this protocol "
            "(for example s3fs for s3://, gcsfs for gs://) and check storage_options."
        ) from exc
    if isinstance(fs, LocalFileSystem):
        return Location(local_path, shown, {}, local=True)
    return Location(shown.rstrip("/"), shown, options, local=False)
