"""The output folder of a run: its file names, its lock, the outputs a run owns, and
write failures (disk full, read-only) turned into a StoreError that says what to do.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from flashmm_dask.errors import FlashmmError, StoreError
from flashmm_dask.io.outputs import clear_owned, register
from flashmm_dask.io.results import open_results, read_store_attrs, write_tables
from flashmm_dask.io.resultsets import (
    ResultSets,
    loaded,
    result_sets,
    top_items,
    write_stratum_top,
    write_top_tables,
)
from flashmm_dask.io.strata_results import load_strata, strata_attrs, write_strata_tables
from flashmm_dask.report.plots import make_report, strata_report
from flashmm_dask.report.summary import log_top_genes, report_outputs
from flashmm_dask.run.config import RunConfig
from flashmm_dask.run.progress import Timings
from flashmm_dask.run.stored_model import config_difference

logger = logging.getLogger(__name__)

RESULTS = "results.zarr"
STATS = "stats.zarr"
SIMULATED = "simulated.zarr"
LOCK = "run.lock"
REPORTS = ("top", "report.md")  # flashmm_dask.report.summary's outputs


def _is_write_failure(exc: BaseException) -> bool:
    """An OSError of the file system (full, read-only, permissions), not of a network."""
    return (
        isinstance(exc, OSError)
        and exc.errno is not None
        and not isinstance(exc, ConnectionError | TimeoutError)
    )


@contextmanager
def _writing(what: str, folder: Path) -> Iterator[None]:
    """Turn a file-system write failure into a StoreError that says what to do."""
    try:
        yield
    except FlashmmError:
        raise
    except OSError as exc:
        if not _is_write_failure(exc):
            raise
        raise _write_error(what, folder, exc) from exc


def _write_error(what: str, folder: Path, exc: OSError) -> StoreError:
    where = f" ({exc.filename})" if exc.filename else ""
    return StoreError(
        f"cannot write {what} in {str(folder)!r}: {exc.strerror or exc}{where}; free disk "
        "space or make the folder writable (or choose another output.path), then rerun the "
        "same command: it resumes, keeping the blocks already written"
    )


class OutputLock:
    """An exclusive lock file in the output folder, so two runs cannot share an output."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self.created = False  # the folder was made for this run (removed if left empty)

    def __enter__(self) -> OutputLock:
        with _writing("the lock file", self.path.parent):
            return self._acquire()

    def _acquire(self) -> OutputLock:
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise StoreError(
                f"output {str(self.path.parent)!r} is a file, not a folder; choose another "
                "output.path"
            )
        self.created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale():
                    holder = self.path.read_text().strip() or "another run"
                    raise StoreError(
                        f"output {str(self.path.parent)!r} is in use by a run ({holder}); "
                        "wait for it to finish, or point output.path elsewhere"
                    ) from None
                logger.warning("removing a stale lock left by a dead run: %s", self.path)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(me + "\n")
            return self
        raise StoreError(f"could not lock output {str(self.path.parent)!r}")

    def _stale(self) -> bool:
        try:
            host, pid = self.path.read_text().split()
        except (OSError, ValueError):
            return False
        if host != socket.gethostname():
            return False
        if int(pid) == os.getpid():
            # a rerun in a container with the same host name and pid (PID 1 of a pod)
            return True
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def __exit__(self, *exc: object) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError as error:  # e.g. the folder became read-only: keep the real error
            logger.warning(
                "could not remove the lock %s (%s); remove it before the next run",
                self.path,
                error,
            )
            return
        if self.created and exc[0] is not None:  # a failed run leaves no empty folder behind
            try:
                self.path.parent.rmdir()
            except OSError:  # not empty: something was written for the rerun
                pass


def _clear_output(folder: Path) -> None:
    """Remove the outputs of an earlier run: exactly the files of the folder's manifest."""
    clear_owned(folder)


def run_outputs(cfg: RunConfig) -> list[str]:
    """The names a run of ``cfg`` writes at the top of its output folder (plots aside)."""
    names = [RESULTS]
    if cfg.stats.save:
        names.append(STATS)
    if cfg.data.path is None:
        names.append(SIMULATED)
    return names + [f"results.{kind}" for kind in cfg.output.tables]


def _check_existing(store: Path, cfg: RunConfig) -> bool:
    """Whether the store exists for this very config; refuse a different one."""
    if not store.exists():
        return False
    attrs = read_store_attrs(str(store))
    if attrs.get("config_hash") == cfg.hash():
        return True
    if cfg.output.overwrite:
        logger.warning("overwriting %s, which holds a run with another config", store.parent)
        _clear_output(store.parent)
        return False
    differs = config_difference(attrs.get("config"), cfg)
    raise StoreError(
        f"output {str(store.parent)!r} holds a run with a different configuration"
        + (f" (it differs in {differs})" if differs else "")
        + "; rerun with --overwrite to replace it, or choose another output.path (--output)"
    )


def _top_tables(
    sets: ResultSets, folder: Path, client: Any, pool: Executor
) -> Callable[[], list[Path]]:
    """Start writing the top tables of a stratified store; returns what waits for them.

    With a cluster (``client``), each stratum's tables are written by a task of their own
    (:func:`~flashmm_dask.io.resultsets.write_stratum_top`: Python formats them, holding
    the GIL of the process it runs in), so that they do not wait for the driver, which
    meanwhile writes the results table; else in a thread of the driver (``pool``)."""
    if client is None:
        return pool.submit(write_top_tables, sets, folder).result
    by_level = dict(sets)
    futures = [
        client.submit(write_stratum_top, by_level[level], items, folder, pure=False)
        for level, items in top_items(sets).items()
    ]

    def gathered() -> list[Path]:
        return [path for paths in client.gather(futures) for path in paths]

    return gathered


def write_outputs(
    cfg: RunConfig, store: Path, folder: Path, timings: Timings, client: Any = None
) -> list[Path]:
    """The tables and plots (as the config asks) and the report of a finished store, each
    in its timed phase, registered as the run's outputs.

    A stratified store gets tables with a ``stratum`` column and plots per stratum; its
    top tables are written on the cluster when a ``client`` is given (see
    :func:`_top_tables`).
    """
    formats = tuple(cfg.output.tables)
    tables: Callable[[], list[Path]]
    plots: Callable[[], list[Path]]
    stratified = strata_attrs(store) is not None
    read: list[ResultSets] = []

    def strata_sets() -> ResultSets:
        """Every stratum read once, in threads, for both the tables and the report."""
        if not read:
            read.append(list(load_strata(store)))
        return read[0]

    if not stratified:  # a plain store (also one stratum of selected cells)
        ds = open_results(str(store))
        tables = partial(write_tables, ds, folder, formats=formats)
        plots = partial(make_report, ds, folder)
    else:

        def tables() -> list[Path]:
            return write_strata_tables(store, folder, formats, loaded=strata_sets())

        plots = partial(strata_report, store, folder)
    files: list[Path] = []
    top: Callable[[], list[Path]] | None = None
    with ThreadPoolExecutor(1, thread_name_prefix="flashmm-top-tables") as pool:
        if cfg.output.tables:
            with timings.phase("tables"):
                if stratified:
                    # a top table per stratum and term written beside the results table
                    # (Arrow formats it in threads that release the GIL); the report
                    # then lists them
                    top = _top_tables(strata_sets(), folder, client, pool)
                files += tables()
        if cfg.output.plots:
            with timings.phase("plots"):
                files += plots()
        with timings.phase("report"):
            sets = strata_sets() if stratified else loaded(result_sets(str(store)))
            written = None if top is None else top()
            files += report_outputs(
                store, folder, tables=bool(cfg.output.tables), sets=sets, top=written
            )
            log_top_genes(store, sets=sets)  # the results read once for the report and log
    register(folder, files)
    return files
