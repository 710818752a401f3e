"""Dask clients from the ``cluster`` section of a run configuration.

Kinds: ``local`` (a LocalCluster sized to the machine, the embedded default),
``address`` (an existing scheduler), ``slurm`` (dask-jobqueue's SLURMCluster: workers are
Slurm jobs) and ``kubernetes`` (dask-kubernetes' KubeCluster). Every kind yields a
``distributed.Client``; the pipeline runs the same code on all of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flashmm_dask.errors import ConfigError
from flashmm_dask.run.cluster_checks import check_sbatch, wait_for_workers
from flashmm_dask.run.config import ClusterConfig
from flashmm_dask.run.kube import kube_cluster

logger = logging.getLogger(__name__)


def local_workers(requested: int | None) -> int:
    """Worker processes for a LocalCluster: as requested, else one per CPU (at most 8)."""
    if requested:
        return int(requested)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, 8))


@contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Start child processes with SIGINT ignored (inherited through fork and exec).

    Ctrl-C reaches every process of the terminal's foreground group: local worker
    processes would each print a KeyboardInterrupt traceback. Ignoring it there leaves the
    interrupt to the driver, which stops the run and closes the cluster.
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def _silence_distributed() -> dict[str, int]:
    """No more log records from distributed, tornado or asyncio: the run is being stopped
    and closing a busy cluster logs cancelled tasks and killed workers by the dozen.
    Returns the levels before, for :func:`_restore_levels`."""
    before = {}
    for name in ("distributed", "tornado", "asyncio"):
        before[name] = logging.getLogger(name).level
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    return before


def _restore_levels(levels: dict[str, int]) -> None:
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def _local(cfg: ClusterConfig) -> Any:
    # distributed is imported when a cluster opens, not with this module: it sets up its
    # loggers from dask's config on import, which the command line configures first
    from distributed import LocalCluster

    with _children_ignore_sigint():
        return _local_cluster(cfg, LocalCluster)


#: glibc's mmap threshold in a local worker process. Dask sets MALLOC_TRIM_THRESHOLD_ in
#: the workers (to hand freed memory back), and setting any malloc tunable freezes the mmap
#: threshold at 128 KiB: every larger temporary of the fit is then mapped and unmapped, its
#: pages faulted in again each time (a block of the nested donor + donor:state model took
#: 3.2-3.4 s instead of 1.6 s). Up to this size they come from the heap again.
MMAP_THRESHOLD = 32 << 20

#: glibc's trim threshold and arena count in a local worker process. Dask's 64 KiB trim
#: threshold hands the heap's free top back to the system at once, and each thread of a
#: worker (its task thread, Zarr's and Blosc's) allocates from an arena of its own: the
#: 24 MB buffers each chunk of the expression is decompressed into were mapped afresh and
#: faulted in page by page (8.5-10 s of the workers' system time in the reduction of the
#: 1M-cell atlas, against 1.8-2.0 s with one arena and a 128 MiB threshold: the joint
#: model's run 17-18 s -> 14 s). A worker may keep up to this much freed memory.
TRIM_THRESHOLD = 128 << 20
ARENA_MAX = 1


def _local_cluster(cfg: ClusterConfig, LocalCluster: Any) -> Any:
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    environ.setdefault("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)
    environ.setdefault("MALLOC_ARENA_MAX", ARENA_MAX)
    if str(environ.get("MALLOC_TRIM_THRESHOLD_", "65536")) == "65536":  # Dask's default
        environ["MALLOC_TRIM_THRESHOLD_"] = TRIM_THRESHOLD
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        return LocalCluster(
            n_workers=local_workers(cfg.n_workers),
            threads_per_worker=cfg.threads_per_worker,
            processes=cfg.processes,
            memory_limit=cfg.memory_limit,
            # the scheduler's HTTP server always listens; null asks for no fixed port
            dashboard_address=cfg.dashboard_address or "127.0.0.1:0",
            # every server on the loopback interface only. Threads would talk over inproc://,
            # which takes no host and leaves the workers' HTTP servers on all interfaces
            host="127.0.0.1",
            protocol="tcp://",
        )


def slurm_cluster(cfg: ClusterConfig) -> Any:
    """A dask-jobqueue SLURMCluster from the ``cluster.slurm`` settings, scaled."""
    first = "dask_jobqueue" not in sys.modules
    handler = signal.getsignal(signal.SIGINT)
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ConfigError(
            "cluster.kind 'slurm' needs dask-jobqueue; install it with "
            "pip install 'flashmm-dask[slurm]'"
        ) from None
    if threading.current_thread() is threading.main_thread():
        # dask-jobqueue 0.9.0 sets SIGINT to sys.exit() on import (dask/dask-jobqueue#696):
        # Ctrl-C would end the run with status 0 and no message. Imported earlier by
        # someone else, its handler is replaced by Python's own
        if first:
            signal.signal(signal.SIGINT, handler)
        elif getattr(signal.getsignal(signal.SIGINT), "__module__", "") == "dask_jobqueue.runner":
            signal.signal(signal.SIGINT, signal.default_int_handler)
    s = cfg.slurm
    kwargs: dict[str, Any] = {
        "cores": s.cores,
        "processes": s.processes,
        "memory": s.memory,
        "walltime": s.walltime,
        "queue": s.queue,
        "account": s.account,
        "job_extra_directives": list(s.job_extra_directives),
        "job_script_prologue": list(s.job_script_prologue),
        "local_directory": s.local_directory,
        "log_directory": s.log_directory,
        "interface": s.interface,
        "scheduler_options": {"dashboard_address": cfg.dashboard_address or ":0"},
    }
    cluster = SLURMCluster(**{k: v for k, v in kwargs.items() if v is not None})
    try:
        check_sbatch(cluster.job_script())  # sbatch's own error now, not a hang later
    except BaseException:
        cluster.close()
        raise
    if s.adaptive is not None and (s.adaptive.minimum is not None or s.adaptive.maximum):
        # maximum null: no upper limit (dask-jobqueue's stubs say int)
        limits: dict[str, Any] = {"maximum_jobs": s.adaptive.maximum}
        cluster.adapt(minimum_jobs=s.adaptive.minimum or 0, **limits)
    else:
        # adapt, not scale: a worker job that ends (walltime, preemption, node failure) is
        # then replaced; after scale(jobs=n) it is not, and the run waits without workers
        cluster.adapt(minimum_jobs=s.n_jobs, maximum_jobs=s.n_jobs)
    return cluster


def _expected_workers(cfg: ClusterConfig) -> int:
    """Workers a Slurm cluster starts before any work: n_jobs, or the adaptive minimum."""
    s = cfg.slurm
    jobs = (s.adaptive.minimum or 0) if s.adaptive is not None else s.n_jobs
    return int(jobs) * int(s.processes)


def kubernetes_cluster(cfg: ClusterConfig) -> Any:
    """A dask-kubernetes KubeCluster whose pods run ``dask scheduler``/``dask worker``."""
    return kube_cluster(cfg)


def _unreachable(address: str, why: str) -> ConfigError:
    return ConfigError(
        f"cannot reach the Dask scheduler at {address!r} ({why}); start it with "
        "'dask scheduler' or fix cluster.address"
    )


def probe_scheduler(address: str, timeout: float = 10.0) -> None:
    """Fail at once when nothing listens at a ``tcp://host:port`` scheduler address.

    ``distributed.Client`` retries a refused connection until its timeout; a refused or
    unresolvable address is conclusive, so it is reported without the wait. Other
    protocols (tls://, ws://, ...) are left to the client.
    """
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "tcp", address
    if scheme != "tcp":
        return
    host, colon, port = rest.rstrip("/").rpartition(":")
    if not colon or not port.isdigit():
        raise ConfigError(
            f"cluster.address {address!r} has no port; write e.g. tcp://127.0.0.1:8786"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise _unreachable(address, exc.strerror or str(exc) or type(exc).__name__) from None


def _not_a_task_failure(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Compute Failed")


def _quiet_task_errors() -> Any:
    """A worker plugin that drops the workers' "Compute Failed" log records.

    A failed task's exception is raised again in the driver, which reports it once (one
    line for a user error such as NaN in the data); the workers of a local cluster would
    otherwise print it, with its traceback, on the same terminal first.
    """
    from distributed.diagnostics.plugin import WorkerPlugin

    class QuietTaskErrors(WorkerPlugin):
        name = "flashmm-quiet-task-errors"

        def setup(self, worker: Any) -> None:
            logging.getLogger("distributed.worker").addFilter(_not_a_task_failure)

    return QuietTaskErrors()


@contextmanager
def open_client(cfg: ClusterConfig, *, timeout: float = 30.0) -> Iterator[Any]:
    """A ``distributed.Client`` for the ``cluster`` config section, closed on exit."""
    from distributed import Client

    cluster = None
    if cfg.kind == "address":
        address = str(cfg.address)  # required with kind 'address' (load_config checks)
        probe_scheduler(address, timeout=min(timeout, 10.0))
        try:
            client = Client(address, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            raise _unreachable(address, str(exc)) from None
    else:
        if cfg.kind == "local":
            cluster = _local(cfg)
        elif cfg.kind == "slurm":
            cluster = slurm_cluster(cfg)
        elif cfg.kind == "kubernetes":
            cluster = kubernetes_cluster(cfg)
        else:
            raise ConfigError(f"unknown cluster.kind {cfg.kind!r}")
        client = Client(cluster)
        expected = _expected_workers(cfg) if cfg.kind == "slurm" else 0
        if expected:  # an adaptive cluster from zero starts jobs only once there is work
            try:
                wait_for_workers(client, expected, cfg.worker_timeout, "Slurm")
            except BaseException:
                client.close()
                cluster.close()
                raise
        if cfg.kind == "local" and not logging.getLogger("distributed").isEnabledFor(logging.DEBUG):
            client.register_plugin(_quiet_task_errors())
    logger.info("Dask client: %s", client)
    restore: dict[str, int] = {}
    try:
        yield client
    except BaseException:
        # the run failed (or was interrupted) and says why in one line: closing the
        # cluster under way (a slow worker killed after 4 s, cancelled tasks, a worker's
        # heartbeat to the closing scheduler) is not news
        restore = _silence_distributed()
        if cfg.kind == "local":  # its worker processes share the terminal: quiet them too
            with contextlib.suppress(Exception):
                client.run(_silence_distributed)
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        _restore_levels(restore)
