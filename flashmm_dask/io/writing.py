"""How the package writes: staged into place, stamped with the versions that made it.

Every local store and file the package writes (the results and statistics stores,
AnnData stores, tables, report.md, the output manifest) goes through :func:`staged`: it is
written under a hidden temporary sibling and swapped in only once whole, so a reader
never sees half of it and a failed write leaves what was there before. Stores at remote
fsspec URLs cannot be renamed atomically; their writers write in place and mark the store
complete last (see :mod:`flashmm_dask.io.results`, :mod:`flashmm_dask.stats.store`).

:func:`package_versions` is the one collector of the installed versions that stores,
reports and the command line record.
"""

from __future__ import annotations

import functools
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from flashmm_dask.errors import StoreError

__all__ = ["package_version", "package_versions", "staged", "write_file"]

#: The distributions whose versions shape the numbers (recorded by runs).
VERSIONED = ("flashmm-dask", "numpy", "scipy", "dask", "distributed", "zarr", "anndata")


def package_versions(
    names: Sequence[str] = VERSIONED, *, missing: str | None = None
) -> dict[str, str]:
    """The installed version of each distribution in ``names``, by name.

    Parameters
    ----------
    names : distribution names, e.g. ``("flashmm-dask", "numpy")``
    missing : the value for a distribution that is not installed; None leaves it out

    Looked up once per process (a look-up scans the installed distributions: ~20 ms,
    which a stratified run would pay for every stratum's results group).
    """
    return dict(_installed(tuple(names), missing))


@functools.cache
def _installed(names: tuple[str, ...], missing: str | None) -> tuple[tuple[str, str], ...]:
    out = []
    for name in names:
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            if missing is not None:
                out.append((name, missing))
    return tuple(out)


def package_version() -> str:
    """The installed version of flashmm-dask; "unknown" in a source tree not installed."""
    return package_versions(("flashmm-dask",), missing="unknown")["flashmm-dask"]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


@contextmanager
def staged(
    path: str | os.PathLike[str], *, overwrite: bool = True, parents: bool = True
) -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``path`` to write into; swap it in on success.

    A file replaces a file in one rename. A folder (or a file where a folder was) cannot:
    the old one is moved aside first and moved back should the second rename fail. An
    exception in the body removes the temporary and leaves ``path`` as it was.

    Parameters
    ----------
    path : the file or folder to write
    overwrite : whether something at ``path`` may be replaced; when False, something there
        (or appearing there while the body runs) raises StoreError
    parents : create missing parent folders; when False a missing parent raises StoreError

    Raises
    ------
    StoreError
        ``path`` exists and ``overwrite`` is False, or its folder is missing (``parents``
        False).
    """
    path = Path(path)
    if not overwrite and _exists(path):
        raise StoreError(
            f"{str(path)!r} already exists; pass overwrite=True (--overwrite) to replace it "
            "or choose another path"
        )
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise StoreError(f"folder {str(path.parent)!r} does not exist; create it first")
    tag = uuid.uuid4().hex[:12]
    tmp = path.with_name(f".{path.name}.tmp-{tag}")
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    exists = _exists(path)
    try:
        if exists and not overwrite:
            raise StoreError(f"{str(path)!r} appeared while it was being written; not replaced")
        if not exists or (path.is_file() and tmp.is_file()):
            os.replace(tmp, path)
            return
        old = path.with_name(f".{path.name}.old-{tag}")
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        _remove(old)
    finally:
        _remove(tmp)


def write_file(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` a file under a temporary name, then rename it to ``path`` (staged).

    The parent folder is created when missing; returns ``path`` as a Path.
    """
    final = Path(path)
    with staged(final) as tmp:
        write(tmp)
    return final
