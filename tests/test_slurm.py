"""flashmm-dask on a real (one-node) Slurm cluster: batch jobs, dask-jobqueue workers that
are Slurm jobs, and ``flashmm-dask run`` on Slurm against the same run on a local cluster.

The cluster comes from tests/slurm_cluster.py (root, the Slurm and MUNGE packages of
``.ci/install-slurm``; skipped without them unless FLASHMM_NO_SKIP=1). Evidence that
work ran under Slurm is taken from Slurm itself: the queue while jobs run, the jobcomp log
of finished jobs, and the SLURM_JOB_ID that slurmd gives the processes of a job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from needs import missing
from numpy.testing import assert_allclose, assert_array_equal
from slurm_cluster import (  # noqa: F401 (fixtures)
    SlurmTestCluster,
    fixture_slurm_cluster,
    fixture_slurm_session,
)

from flashmm_dask.io.results import open_results

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("flashmm-dask")
WORKER_JOB = "dask-worker"  # the job name dask-jobqueue gives its worker jobs


def _jobqueue() -> Any:
    # dask-jobqueue 0.9.0 replaces the SIGINT handler with sys.exit() on import
    # (dask/dask-jobqueue#696); keep pytest's
    handler = signal.getsignal(signal.SIGINT)
    try:
        import dask_jobqueue
    except ImportError:
        reason = "dask-jobqueue is not installed (pip install 'flashmm-dask[slurm]')"
        missing(reason)
    finally:
        signal.signal(signal.SIGINT, handler)
    return dask_jobqueue


def _n_jobs(slurm: SlurmTestCluster) -> int:
    """Two one-CPU worker jobs, or one on a one-CPU machine (they must run at once)."""
    return min(2, slurm.cpus)


# ------------------------------------------------------------------- the cluster itself


def test_batch_jobs_run_and_are_recorded(slurm_cluster: SlurmTestCluster) -> None:
    slurm = slurm_cluster
    script = slurm.jobs / "hello.sh"
    script.write_text(
        "#!/bin/bash\n"
        'echo "job=$SLURM_JOB_ID node=$SLURMD_NODENAME partition=$SLURM_JOB_PARTITION"\n'
    )
    output = f"--output={slurm.jobs}/%j.out"
    ok = slurm.sbatch("--job-name=hello", "--cpus-per-task=1", "--mem=64M", output, str(script))
    failing = slurm.sbatch("--job-name=fails", "--mem=64M", output, "--wrap=exit 3")

    records = slurm.wait_finished([ok, failing])

    assert records[ok]["JobState"] == "COMPLETED"
    assert records[ok]["ExitCode"] == "0:0"
    assert records[ok]["NodeList"] == slurm.node
    assert records[ok]["Name"] == "hello"
    assert records[failing]["JobState"] == "FAILED"
    assert records[failing]["ExitCode"] == "3:0"
    text = (slurm.jobs / f"{ok}.out").read_text()
    assert text.strip() == f"job={ok} node={slurm.node} partition={slurm.partition}"


# ------------------------------------------------------------ dask-jobqueue on Slurm


@pytest.mark.distributed
def test_slurmcluster_workers_are_slurm_jobs(
    slurm_cluster: SlurmTestCluster, tmp_path: Path
) -> None:
    import dask.array as da
    from distributed import Client

    slurm = slurm_cluster
    SLURMCluster = _jobqueue().SLURMCluster
    n_jobs = _n_jobs(slurm)
    logs = slurm.jobs / "jobqueue"
    data = np.random.default_rng(7).standard_normal((400, 30))

    with (
        SLURMCluster(
            cores=1,
            processes=1,
            memory="1GiB",
            walltime="00:10:00",
            queue=slurm.partition,
            python=sys.executable,
            interface="lo",  # scheduler and workers on loopback: no network needed
            local_directory=str(tmp_path),
            log_directory=str(logs),
            scheduler_options={"dashboard_address": ":0"},
        ) as cluster,
        Client(cluster) as client,
    ):
        cluster.scale(jobs=n_jobs)
        client.wait_for_workers(n_jobs, timeout=90)
        job_ids = {job.job_id for job in cluster.workers.values()}
        queue = slurm.queue()
        workers = client.scheduler_info(n_workers=-1)["workers"]
        in_job = client.run(lambda: os.environ.get("SLURM_JOB_ID"))

        x = da.from_array(data, chunks=(50, 30))
        gram = (x.T @ x).compute()
        column_sums = x.sum(axis=0).compute()

    # workers are the jobs Slurm lists, running on this node
    assert len(job_ids) == n_jobs
    assert {j for j, row in queue.items() if row["name"] == WORKER_JOB} == job_ids
    assert all(queue[j]["state"] == "RUNNING" and queue[j]["nodes"] == slurm.node for j in job_ids)
    assert sorted(w["name"] for w in workers.values()) == [
        f"SLURMCluster-{i}" for i in range(n_jobs)
    ]
    assert set(in_job.values()) == job_ids
    # the computation they ran
    assert_allclose(gram, data.T @ data, rtol=1e-12)
    assert_allclose(column_sums, data.sum(axis=0), rtol=1e-12)
    # closing the cluster ends the jobs; slurmctld records them, their logs are written
    records = slurm.wait_finished(sorted(job_ids))
    for job_id, record in records.items():
        assert record["Name"] == WORKER_JOB
        assert record["NodeList"] == slurm.node
        assert record["JobState"] in ("CANCELLED", "COMPLETED")
        assert "SLURMCluster-" in (logs / f"{WORKER_JOB}-{job_id}.err").read_text()


# --------------------------------------------------------- flashmm-dask run on Slurm

# configs/slurm.yaml describes a site (partition, account, modules, shared paths, a real
# data set); these overrides fit it to this machine and to simulated data.
SITE = {
    "cluster.slurm.cores": "1",
    "cluster.slurm.processes": "1",
    "cluster.slurm.memory": "1GiB",
    "cluster.slurm.walltime": "00:10:00",
    "cluster.slurm.account": "null",
    "cluster.slurm.job_extra_directives": "[]",
    "cluster.slurm.job_script_prologue": "[]",
    "cluster.slurm.interface": "lo",
    "cluster.slurm.adaptive": "null",
    "cluster.dashboard_address": "127.0.0.1:0",
}
SIMULATED = {
    "data.path": "null",
    "data.layer": "null",
    "data.obs": "null",
    "data.orientation": "null",
    "data.features": "null",
    "data.chunk_cells": "null",
    "stats.load": "null",
    "simulate.n_cells": "2000",
    "simulate.n_genes": "40",
    "simulate.n_samples": "6",
    "simulate.chunk_cells": "500",
    "simulate.seed": "11",
    "model.fixed": "~ 0 + log(libsize) + cls + cls:trt",
    "model.random": "~ 0 + sam",
    "model.transform": "log2p1",
    "model.pcs": "0",
    "contrasts": "{trt_in_cls1: 'cls1:trtB', trt_cls2_vs_cls1: 'cls2:trtB - cls1:trtB'}",
    "fit.block_size": "16",  # 3 blocks over the workers; the same layout on both clusters
    "output.plots": "false",
    "progress": "false",
}
COMPARED = ("coef", "se", "p", "theta", "converged", "contrast_coef", "contrast_p")


def _run_args(output: Path, overrides: dict[str, str]) -> list[str]:
    """Arguments of ``flashmm-dask run``: configs/slurm.yaml, the output, the overrides."""
    args = [str(ROOT / "configs" / "slurm.yaml"), "--output", str(output)]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    return args


def _worker_jobs(slurm: SlurmTestCluster, after: str) -> dict[str, dict[str, str]]:
    """Finished dask-jobqueue worker jobs submitted after job ``after`` (once none runs)."""
    slurm.wait_idle()
    finished = slurm.finished()
    return {j: r for j, r in finished.items() if r["Name"] == WORKER_JOB and int(j) > int(after)}


def _flashmm_run(slurm: SlurmTestCluster, output: Path, overrides: dict[str, str]) -> None:
    args = [str(CLI), "run", *_run_args(output, overrides)]
    done = subprocess.run(
        args,
        env=slurm.env(),
        cwd=output.parent,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout}\n{done.stderr[-4000:]}"


def _default_sigint() -> None:
    """In the child: SIGINT as a terminal's foreground job has it. A suite started in the
    background by a non-interactive shell ignores SIGINT, and children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.distributed
def test_interrupted_slurm_run_stops_cleanly_and_resumes(
    slurm_cluster: SlurmTestCluster, tmp_path: Path
) -> None:
    """Ctrl-C (or the driver script's time-limit signal) ends a Slurm run with status 130,
    its worker jobs cancelled and the output unlocked; the same command then finishes."""
    slurm = slurm_cluster
    _jobqueue()
    output = tmp_path / "out"
    overrides = {
        **SITE,
        **SIMULATED,
        "cluster.kind": "slurm",
        "cluster.slurm.queue": slurm.partition,
        "cluster.slurm.n_jobs": "1",
        "cluster.slurm.log_directory": str(tmp_path / "logs"),
        "cluster.slurm.local_directory": str(tmp_path / "scratch"),
    }
    args = [str(CLI), "run", *_run_args(output, overrides)]
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            args,
            env=slurm.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_default_sigint,
        )
    try:
        # the statistics phase runs on the Slurm workers: interrupt it there
        deadline = time.monotonic() + 90
        while "statistics ..." not in log.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 130, f"status {rc}:\n{text[-3000:]}"
    assert "interrupted; rerun the same command to resume" in text
    assert not (output / "run.lock").exists()
    slurm.wait_idle(timeout=30)  # the worker job was cancelled, not left to its walltime

    _flashmm_run(slurm, output, overrides)
    ds = open_results(output / "results.zarr")
    assert ds.sizes["feature"] == 40
    assert bool(ds["converged"].values.any())


@pytest.mark.distributed
def test_flashmm_run_on_slurm_equals_local_run(
    slurm_cluster: SlurmTestCluster, tmp_path: Path
) -> None:
    slurm = slurm_cluster
    _jobqueue()
    assert CLI.exists(), f"{CLI} not found; install the package into the virtualenv"
    n_jobs = _n_jobs(slurm)
    logs = slurm.jobs / "pipeline"
    on_slurm = {
        **SITE,
        **SIMULATED,
        "cluster.kind": "slurm",
        "cluster.slurm.queue": slurm.partition,
        "cluster.slurm.n_jobs": str(n_jobs),
        "cluster.slurm.log_directory": str(logs),
        "cluster.slurm.local_directory": str(tmp_path / "scratch"),
    }
    on_local = {
        **on_slurm,
        "cluster.kind": "local",
        "cluster.n_workers": str(n_jobs),
        "cluster.threads_per_worker": "1",
    }
    # a marker job: every job id after it belongs to this test
    mark = slurm.sbatch("--job-name=mark", "--mem=16M", "--output=/dev/null", "--wrap=true")
    _flashmm_run(slurm, tmp_path / "slurm", on_slurm)
    workers = _worker_jobs(slurm, after=mark)
    _flashmm_run(slurm, tmp_path / "local", on_local)

    # the Slurm run's workers were n_jobs Slurm jobs on this node, now finished ...
    assert len(workers) == n_jobs, f"expected {n_jobs} worker jobs, jobcomp has {workers}"
    assert all(r["NodeList"] == slurm.node for r in workers.values())
    for job_id in workers:
        assert "SLURMCluster-" in (logs / f"{WORKER_JOB}-{job_id}.err").read_text()
    # ... and the local run submitted none
    assert _worker_jobs(slurm, after=mark) == workers

    a = open_results(tmp_path / "slurm" / "results.zarr")
    b = open_results(tmp_path / "local" / "results.zarr")
    assert a.attrs["config"]["cluster"]["kind"] == "slurm"
    assert b.attrs["config"]["cluster"]["kind"] == "local"
    assert a.sizes["feature"] == 40
    assert_array_equal(a["feature"].values, b["feature"].values)
    assert_array_equal(a["covariate"].values, b["covariate"].values)
    assert int(a["converged"].sum()) > 30
    for name in COMPARED:
        x, y = a[name].values, b[name].values
        if x.dtype == bool:
            assert_array_equal(x, y, err_msg=name)
        else:
            assert_allclose(x, y, rtol=1e-12, atol=0, equal_nan=True, err_msg=name)


# ------------------------------------------------------- deploy/slurm/flashmm-dask.sbatch


@pytest.mark.distributed
def test_driver_job_script_runs_and_resumes(
    slurm_cluster: SlurmTestCluster, tmp_path: Path
) -> None:
    slurm = slurm_cluster
    _jobqueue()
    if slurm.cpus < 2:
        missing("the driver job and a worker job need 2 CPUs at once")
    script = ROOT / "deploy" / "slurm" / "flashmm-dask.sbatch"
    output = tmp_path / "out"
    overrides = {
        **SITE,
        **SIMULATED,
        "cluster.kind": "slurm",
        "cluster.slurm.queue": slurm.partition,
        "cluster.slurm.n_jobs": "1",  # the driver holds one of the CPUs
        "cluster.slurm.log_directory": str(tmp_path / "logs"),
        "cluster.slurm.local_directory": str(tmp_path / "scratch"),
    }

    def submit() -> str:
        # command-line options override the script's #SBATCH lines (its site placeholders)
        return slurm.sbatch(
            f"--partition={slurm.partition}",
            "--cpus-per-task=1",
            "--mem=1G",
            "--time=00:10:00",
            f"--output={tmp_path}/driver-%j.log",
            f"--export=ALL,FLASHMM_VENV={sys.prefix}",
            f"--chdir={tmp_path}",
            str(script),
            *_run_args(output, overrides),
        )

    first = submit()
    record = slurm.wait_finished([first], timeout=120)[first]
    log = (tmp_path / f"driver-{first}.log").read_text()
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "40 features in 3 blocks (3 fitted now)" in log
    ds = open_results(output / "results.zarr")
    assert ds.attrs["config"]["cluster"]["kind"] == "slurm"
    assert len(_worker_jobs(slurm, after=first)) == 1

    again = submit()
    record = slurm.wait_finished([again], timeout=120)[again]
    log = (tmp_path / f"driver-{again}.log").read_text()
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "40 features in 3 blocks (0 fitted now)" in log
    # a finished run is not fitted again: no worker jobs
    assert _worker_jobs(slurm, after=again) == {}
