"""What the package owns in an output folder: a manifest of its files.

Every writer of an output folder (the run's results and statistics stores, the simulated
data, the tables, the plots, ``flashmm-dask test``'s contrasts table) registers what it
writes in ``OUTPUT/.flashmm-manifest.json`` through :func:`register`, before writing. Then:

* a path that exists but is not in the manifest is the user's: a run refuses to write over
  it unless ``--overwrite`` (:func:`refuse_foreign`);
* ``--overwrite`` removes exactly the manifest's files (:func:`clear_owned`), stale ones
  included, and never anything else;
* a run refused before any work leaves no folder behind (:func:`removed_if_unused`).

An output folder written before the manifest existed (a results store but no manifest)
is adopted: its standard names count as owned.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from flashmm_dask.errors import StoreError
from flashmm_dask.io.writing import write_file

logger = logging.getLogger(__name__)

__all__ = ["MANIFEST", "clear_owned", "owned", "refuse_foreign", "register", "removed_if_unused"]

MANIFEST = ".flashmm-manifest.json"
#: Names a run writes at the top of its output folder (adopted from an older output).
STANDARD = (
    "results.zarr",
    "stats.zarr",
    "simulated.zarr",
    "results.csv",
    "results.parquet",
    "contrasts.csv",
    "plots",
)


def _relative(folder: Path, path: str | os.PathLike[str]) -> str:
    """The name in ``folder`` of ``path``: an absolute path, a path ``folder / name`` (the
    folder as given, relative to the working directory: ``--output out``), or a name
    relative to the folder already (``results.zarr``)."""
    p = Path(path)
    if p.is_absolute():
        return p.relative_to(folder.absolute()).as_posix()
    if not folder.is_absolute() and folder != Path("."):
        try:
            return p.relative_to(folder).as_posix()
        except ValueError:
            pass
    return p.as_posix()


def _legacy(folder: Path) -> set[str]:
    """The standard names of an output written before the manifest (one with a results
    store of the package and no manifest)."""
    store = folder / "results.zarr"
    marker = [store / "zarr.json", store / ".zattrs"]
    if not any(
        m.exists() and "flashmm_dask.results" in m.read_text(errors="ignore") for m in marker
    ):
        return set()
    names = {n for n in STANDARD if n != "plots" and (folder / n).exists()}
    plots = folder / "plots"
    if plots.is_dir():
        names |= {f"plots/{p.name}" for p in plots.iterdir() if p.is_file()}
    return names


def owned(folder: str | os.PathLike[str]) -> set[str]:
    """The paths (relative, '/'-separated) the package owns in ``folder``."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        return _legacy(folder)
    try:
        entries = json.loads(path.read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError) as exc:
        raise StoreError(
            f"the manifest {str(path)!r} is unreadable ({exc}); remove it only if the "
            "folder holds nothing of yours besides flashmm-dask's outputs"
        ) from None
    return {str(e) for e in entries}


def register(folder: str | os.PathLike[str], paths: Iterable[str | os.PathLike[str]]) -> None:
    """Record ``paths`` (inside ``folder``) as the package's, before they are written.

    The manifest is replaced atomically; the folder is created if needed.
    """
    folder = Path(folder)
    names = owned(folder) | {_relative(folder, p) for p in paths}
    text = json.dumps({"format": "flashmm_dask.manifest", "files": sorted(names)}, indent=1)
    write_file(folder / MANIFEST, partial(Path.write_text, data=text + "\n", encoding="utf-8"))


def refuse_foreign(
    folder: str | os.PathLike[str], paths: Iterable[str | os.PathLike[str]], *, overwrite: bool
) -> None:
    """Refuse to write ``paths`` where one exists that the package did not write.

    Raises
    ------
    StoreError
        Names the first such path and says to move it or to rerun with ``--overwrite``.
    """
    if overwrite:
        return
    folder = Path(folder)
    mine = owned(folder)
    for path in paths:
        name = _relative(folder, path)
        if (folder / name).exists() and name not in mine:
            raise StoreError(
                f"output {str(folder)!r} holds {name!r}, which flashmm-dask did not write; "
                "move it away or choose another output.path (--output), or rerun with "
                "--overwrite to replace it"
            )


def clear_owned(folder: str | os.PathLike[str]) -> list[str]:
    """Remove every file and store the package owns in ``folder`` (nothing else).

    Returns
    -------
    list of str
        The names removed.
    """
    folder = Path(folder)
    removed = []
    for name in sorted(owned(folder)):
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        else:
            continue
        removed.append(name)
    # the folders of ours (strata/<name>/plots/...), deepest first, once empty: a folder
    # with a file of the user's stays, with its parents
    parents = {parent for n in removed for parent in Path(n).parents if parent != Path(".")}
    for sub in sorted(parents, key=lambda sub: len(sub.parts), reverse=True):
        try:
            (folder / sub).rmdir()
        except OSError:
            pass
    (folder / MANIFEST).unlink(missing_ok=True)
    if removed:
        logger.info("removed %d outputs of an earlier run from %s", len(removed), folder)
    return removed


@contextmanager
def removed_if_unused(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Remove ``folder`` again if it did not exist and a failure left it empty; in a folder
    that existed, remove a manifest this run started if none of its files was written."""
    folder = Path(folder)
    existed = folder.exists()
    had_manifest = (folder / MANIFEST).exists()
    try:
        yield
    except BaseException:
        if not existed and folder.is_dir():
            leftovers = [p for p in folder.iterdir() if p.name != MANIFEST]
            if not leftovers:
                shutil.rmtree(folder, ignore_errors=True)
        elif existed and not had_manifest and (folder / MANIFEST).exists():
            if not any((folder / name).exists() for name in owned(folder)):
                (folder / MANIFEST).unlink(missing_ok=True)
        raise
