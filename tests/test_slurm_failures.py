"""A Slurm that cannot give workers stops a run at once, in one line (issue 16).

Against the real one-node Slurm of tests/slurm_cluster.py: a worker job that sbatch
refuses (a partition that does not exist) ends ``flashmm-dask run`` within a minute with
sbatch's own error and status 2; worker jobs that are accepted but never start (held
until an hour from now) end it after ``cluster.worker_timeout``, their jobs cancelled.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import (  # noqa: F401 (fixtures)
    SlurmTestCluster,
    fixture_slurm_cluster,
    fixture_slurm_session,
)
from test_slurm import SIMULATED, SITE, _jobqueue, _run_args

pytestmark = pytest.mark.slurm

CLI = Path(sys.executable).with_name("flashmm-dask")


def _run(slurm: SlurmTestCluster, tmp_path: Path, **extra: str) -> tuple[int, str, float]:
    overrides = {
        **SITE,
        **SIMULATED,
        "cluster.kind": "slurm",
        "cluster.slurm.queue": slurm.partition,
        "cluster.slurm.n_jobs": "1",
        "cluster.slurm.log_directory": str(tmp_path / "logs"),
        **extra,
    }
    start = time.monotonic()
    done = subprocess.run(
        [str(CLI), "run", *_run_args(tmp_path / "out", overrides)],
        env=slurm.env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    return done.returncode, done.stderr, time.monotonic() - start


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if "flashmm-dask: error" in line]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


def test_refused_submission_is_one_line_with_sbatchs_error(
    slurm_cluster: SlurmTestCluster, tmp_path: Path
) -> None:
    _jobqueue()
    code, stderr, seconds = _run(slurm_cluster, tmp_path, **{"cluster.slurm.queue": "nosuch"})
    assert code == 2, stderr
    line = _error_line(stderr)
    assert "Slurm refused the worker job: sbatch: error: invalid partition specified: nosuch" in (
        line
    ), line
    assert stderr.strip().splitlines()[-1] == line  # nothing after it
    assert seconds < 60
    assert slurm_cluster.queue() == {}


def test_workers_that_never_start_time_out(slurm_cluster: SlurmTestCluster, tmp_path: Path) -> None:
    _jobqueue()
    code, stderr, seconds = _run(
        slurm_cluster,
        tmp_path,
        **{
            "cluster.worker_timeout": "8",
            # accepted, but held until an hour from now: the worker never arrives
            "cluster.slurm.job_extra_directives": "['--begin=now+3600']",
        },
    )
    assert code == 2, stderr
    line = _error_line(stderr)
    assert "no Dask worker joined within 8 s (0 of 1 Slurm workers)" in line, line
    assert "cluster.worker_timeout" in line
    assert seconds < 60
    slurm_cluster.wait_idle(timeout=30)  # the pending worker job was cancelled


def test_the_log_says_how_many_workers_joined(
    slurm_cluster: SlurmTestCluster, tmp_path: Path
) -> None:
    _jobqueue()
    code, stderr, _ = _run(slurm_cluster, tmp_path)
    assert code == 0, stderr[-3000:]
    assert "1 of 1 Slurm workers joined after" in stderr, stderr[-3000:]
