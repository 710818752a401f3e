"""Dask clients from the ``cluster`` section of a run configuration.

Kinds: ``local`` (a LocalCluster sized to the machine, the embedded default),
``address`` (an existing scheduler), ``slurm`` (dask-jobqueue's SLURMCluster: workers are
Slurm jobs) and ``kubernetes`` (dask-kubernetes' KubeCluster). Every kind yields a
``distributed.Client``; the pipeline runs the same code on all of them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flashmm_dask.errors import ConfigError

logger = logging.getLogger(__name__)


def local_workers(requested: int | None) -> int:
    """Worker processes for a LocalCluster: as requested, else one per CPU (at most 8)."""
    if requested:
        return int(requested)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, 8))


def _local(cfg: Any) -> Any:
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=local_workers(cfg.n_workers),
        threads_per_worker=cfg.threads_per_worker,
        processes=cfg.processes,
        memory_limit=cfg.memory_limit,
        # the scheduler's HTTP server always listens; null asks for no fixed port
        dashboard_address=cfg.dashboard_address or "127.0.0.1:0",
        host="127.0.0.1",
    )


def slurm_cluster(cfg: Any) -> Any:
    """A dask-jobqueue SLURMCluster from the ``cluster.slurm`` settings, scaled."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ConfigError(
            "cluster.kind 'slurm' needs dask-jobqueue; install it with "
            "pip install 'flashmm-dask[slurm]'"
        ) from None
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
    if s.adaptive is not None and (s.adaptive.minimum is not None or s.adaptive.maximum):
        cluster.adapt(minimum_jobs=s.adaptive.minimum or 0, maximum_jobs=s.adaptive.maximum)
    else:
        cluster.scale(jobs=s.n_jobs)
    return cluster


def kubernetes_cluster(cfg: Any) -> Any:
    """A dask-kubernetes KubeCluster whose pods run ``dask scheduler``/``dask worker``."""
    from flashmm_dask.kube import kube_cluster

    return kube_cluster(cfg)


@contextmanager
def open_client(cfg: Any, *, timeout: float = 30.0) -> Iterator[Any]:
    """A ``distributed.Client`` for the ``cluster`` config section, closed on exit."""
    from distributed import Client

    cluster = None
    if cfg.kind == "address":
        try:
            client = Client(cfg.address, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            raise ConfigError(
                f"cannot reach the Dask scheduler at {cfg.address!r} ({exc}); start it with "
                "'dask scheduler' or fix cluster.address"
            ) from None
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
    logger.info("Dask client: %s", client)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
