"""Checks that a batch cluster can start: the job is accepted, and workers arrive.

A Slurm submission that fails (a wrong partition, an account the user cannot charge, the
controller down) would otherwise be retried in the background while the run waits
forever for workers. :func:`check_sbatch` asks ``sbatch --test-only`` about the very job
script dask-jobqueue would submit and reports sbatch's own error in one line;
:func:`wait_for_workers` bounds the wait for the first worker (``cluster.worker_timeout``)
and logs how many joined.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
from typing import Any

from flashmm_dask.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["check_sbatch", "wait_for_workers"]

#: Seconds ``sbatch --test-only`` may take (it retries an unreachable controller ~20 s).
SBATCH_TIMEOUT = 50.0


def _sbatch_error(stderr: str) -> str:
    lines = [" ".join(line.split()) for line in stderr.splitlines() if line.strip()]
    return "; ".join(dict.fromkeys(lines)) or "no message"


def check_sbatch(job_script: str, *, timeout: float = SBATCH_TIMEOUT) -> None:
    """Refuse a worker job that Slurm would not accept, with sbatch's own error.

    Parameters
    ----------
    job_script : the batch script of one worker job (``SLURMCluster.job_script()``)
    timeout : seconds to wait for sbatch

    Raises
    ------
    ConfigError
        ``sbatch`` is missing, does not answer, or refuses the job (its message quoted).
    """
    fd, path = tempfile.mkstemp(prefix="flashmm-worker-", suffix=".sh")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(job_script)
        try:
            done = subprocess.run(
                ["sbatch", "--test-only", path],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError:
            raise ConfigError(
                "cluster.kind is 'slurm' but sbatch is not on PATH; run on a Slurm login "
                "node (or load Slurm's module), or choose another cluster.kind"
            ) from None
        except subprocess.TimeoutExpired:
            raise ConfigError(
                f"sbatch did not answer within {timeout:g} s; check that Slurm's controller "
                "runs (sinfo), or choose another cluster.kind"
            ) from None
    finally:
        os.unlink(path)
    if done.returncode != 0:
        raise ConfigError(
            f"Slurm refused the worker job: {_sbatch_error(done.stderr)}; fix cluster.slurm "
            "(queue is the partition, account, memory, walltime, job_extra_directives) or "
            "check that Slurm runs (sinfo)"
        )


def wait_for_workers(client: Any, expected: int, timeout: float, what: str) -> int:
    """Wait until a worker has joined (at most ``timeout`` seconds); log how many did.

    Returns
    -------
    int
        The number of workers that joined.

    Raises
    ------
    ConfigError
        No worker joined in time.
    """
    start = time.monotonic()
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        raise ConfigError(
            f"no Dask worker joined within {timeout:g} s (0 of {expected} {what} workers); "
            "the jobs may be pending or failing: check the queue (squeue -u $USER) and the "
            "jobs' logs (cluster.slurm.log_directory); cluster.worker_timeout sets the wait"
        ) from None
    joined = len(client.scheduler_info().get("workers", {}))
    logger.info(
        "%d of %d %s workers joined after %.0f s; the run starts (the others join as they start)",
        joined,
        expected,
        what,
        time.monotonic() - start,
    )
    return joined
