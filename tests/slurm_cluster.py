"""A throwaway one-node Slurm cluster for the tests marked ``slurm``.

The session fixture ``slurm_session`` writes a ``slurm.conf`` for this host (its real
CPUs, its memory less a margin, one partition ``debug``) and a MUNGE key into a temporary
folder, starts ``munged``, ``slurmctld`` and ``slurmd`` there as child processes, waits
until ``sinfo`` shows the node idle, and exports ``SLURM_CONF`` so that every subprocess
(sbatch, squeue, dask-jobqueue's calls, ``flashmm-dask run``) talks to this cluster. On
teardown it cancels what is left in the queue and stops the daemons by process id.

No cgroups (``proctrack/linuxproc``, ``task/none``) and no accounting database: finished
jobs are recorded by ``jobcomp/filetxt`` in ``jobcomp.log``, which
:meth:`SlurmTestCluster.finished` reads, the evidence that jobs really ran under Slurm.

It needs root (slurmd runs jobs as their user) and the Slurm and MUNGE binaries
(``.ci/install-slurm``). Without them the tests are skipped with the reason, unless
``FLASHMM_NO_SKIP=1`` (set in CI; tests/needs.py), which turns the skip into a failure.
``FLASHMM_KEEP_SLURM=1`` keeps the temporary folder (configs, daemon and job logs).

A test module imports ``fixture_slurm_session`` and ``fixture_slurm_cluster``; its tests ask
for ``slurm_cluster``: the session's cluster, its queue emptied before and after each test.
(Pytest registers each under its ``name``; the ``fixture_`` names keep linters from reading
a test's argument as a redefinition of the import.)
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from needs import missing

KEEP = "FLASHMM_KEEP_SLURM"
PARTITION = "debug"
COMMANDS = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel")
STARTUP_TIMEOUT = 60.0


@dataclass(frozen=True)
class SlurmTestCluster:
    """A running one-node Slurm cluster (see the module docstring).

    Attributes
    ----------
    root : the temporary folder holding everything below
    conf : its slurm.conf (exported as ``SLURM_CONF``)
    node : the node name (this host's short name);  partition : the only partition
    cpus : CPUs of the node, i.e. how many one-CPU jobs run at once
    memory_mb : the node's schedulable memory (RealMemory)
    jobcomp : the completed-jobs log;  jobs : a folder for job output files
    """

    root: Path
    conf: Path
    node: str
    partition: str
    cpus: int
    memory_mb: int
    jobcomp: Path
    jobs: Path

    def env(self) -> dict[str, str]:
        """The environment for a subprocess that should use this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def command(self, *args: str, timeout: float = 30.0) -> str:
        """Run a Slurm client command against this cluster; its stdout."""
        done = subprocess.run(
            args, env=self.env(), capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} exited with {done.returncode}: {done.stderr.strip()}"
            )
        return done.stdout

    def sbatch(self, *args: str) -> str:
        """Submit a batch job (``sbatch --parsable ARGS``); its job id."""
        return self.command("sbatch", "--parsable", *args).strip().split(";")[0]

    def queue(self) -> dict[str, dict[str, str]]:
        """Jobs in the queue now: job id -> name, state and node list."""
        out = self.command("squeue", "--noheader", "--format=%i|%j|%T|%N")
        rows = (line.split("|") for line in out.splitlines() if line.strip())
        return {r[0]: {"name": r[1], "state": r[2], "nodes": r[3]} for r in rows}

    def finished(self) -> dict[str, dict[str, str]]:
        """Finished jobs from the jobcomp log: job id -> its fields (JobState, ExitCode, ...)."""
        if not self.jobcomp.exists():
            return {}
        records = {}
        for line in self.jobcomp.read_text().splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            if "JobId" in fields:
                records[fields["JobId"]] = fields
        return records

    def wait_finished(self, job_ids: list[str], timeout: float = 60.0) -> dict[str, dict[str, str]]:
        """The jobcomp records of ``job_ids``, once all of them are written."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.finished()
            if all(j in records for j in job_ids):
                return {j: records[j] for j in job_ids}
            if time.monotonic() > deadline:
                missing = [j for j in job_ids if j not in records]
                raise TimeoutError(
                    f"Slurm jobs {missing} not finished after {timeout:g} s; "
                    f"queue: {self.queue()}; logs in {self.root / 'log'}"
                )
            time.sleep(0.2)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Wait until no job is queued, running or completing."""
        deadline = time.monotonic() + timeout
        while queue := self.queue():
            if time.monotonic() > deadline:
                raise TimeoutError(f"Slurm jobs still queued after {timeout:g} s: {queue}")
            time.sleep(0.2)

    def cancel_all(self, timeout: float = 30.0) -> None:
        """Cancel every job in the queue and wait until the queue is empty."""
        jobs = list(self.queue())
        if jobs:
            self.command("scancel", *jobs)
        self.wait_idle(timeout)


def _which(command: str) -> str | None:
    """A command on PATH or in the sbin folders (the daemons live there, and a non-login
    root shell may not have them on PATH)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(command, path=path)


def unavailable() -> str | None:
    """Why a test Slurm cluster cannot be started here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the Slurm tests start slurmd, which must run as root"
    missing = [c for c in COMMANDS if _which(c) is None]
    if missing:
        return f"Slurm/MUNGE commands not found: {', '.join(missing)}; run .ci/install-slurm"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node_hardware() -> dict[str, int]:
    """CPUs and topology as slurmd detects them (``slurmd -C``), else from nproc."""
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    try:
        out = subprocess.run(
            [_which("slurmd") or "slurmd", "-C"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        found = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", out) if k in keys}
        if set(found) == set(keys):
            return found
    except (OSError, subprocess.SubprocessError):
        pass
    return {"CPUs": len(os.sched_getaffinity(0))}


def _schedulable_memory_mb() -> int:
    """MemTotal less a margin (10%, at least 512 MiB) for the OS and the daemons."""
    text = Path("/proc/meminfo").read_text()
    match = re.search(r"^MemTotal:\s+(\d+) kB", text, re.MULTILINE)
    total = int(match.group(1)) // 1024 if match else 4096
    return max(256, total - max(512, total // 10))


def write_config(root: Path, node: str) -> SlurmTestCluster:
    """Folders, MUNGE key and slurm.conf of a one-node cluster in ``root``."""
    # munged insists that every folder above its socket and key is searchable by all and
    # writable by its owner only (whatever the umask)
    root.chmod(0o755)
    for sub in ("munge", "log", "state", "spool", f"spool/slurmd.{node}", "jobs"):
        (root / sub).mkdir(exist_ok=True)
        (root / sub).chmod(0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)

    hw = _node_hardware()
    memory = _schedulable_memory_mb()
    node_hw = " ".join(f"{k}={v}" for k, v in hw.items())
    lines = [
        "ClusterName=flashmmtest",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root / 'munge' / 'munge.socket'}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}/slurmd.%n",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        # no cgroups: containers often have none usable (and cgroup v2 needs systemd's help)
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        # no slurmdbd: finished jobs go to a text file instead of sacct
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={root / 'jobcomp.log'}",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        # CPUs (not cores) are the unit, so one-CPU jobs fill every hardware thread
        "SelectTypeParameters=CR_CPU_Memory",
        "DefMemPerCPU=256",
        "MpiDefault=none",
        "ReturnToService=2",
        "MailProg=/bin/true",
        "InactiveLimit=0",
        "KillWait=5",
        "MinJobAge=300",
        f"NodeName={node} NodeAddr=127.0.0.1 {node_hw} RealMemory={memory} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
    ]
    conf = root / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return SlurmTestCluster(
        root=root,
        conf=conf,
        node=node,
        partition=PARTITION,
        cpus=hw["CPUs"],
        memory_mb=memory,
        jobcomp=root / "jobcomp.log",
        jobs=root / "jobs",
    )


def _log_tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return f"({path} not written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class _Daemons:
    """The child processes of one cluster, stopped in reverse order by their pids."""

    def __init__(self, cluster: SlurmTestCluster):
        self.cluster = cluster
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with open(self.cluster.root / "log" / f"{name}.out", "wb") as out:
            proc = subprocess.Popen(
                [_which(name) or name, *args],
                env=self.cluster.env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append((name, proc))
        return proc

    def wait_until(self, what: str, ready: Callable[[], bool], log: Path) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not ready():
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                        + _log_tail(self.cluster.root / "log" / f"{name}.out")
                        + "\n"
                        + _log_tail(log)
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"timed out after {STARTUP_TIMEOUT:g} s waiting for {what}:\n" + _log_tail(log)
                )
            time.sleep(0.2)

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)
        self.procs.clear()


def _node_state(cluster: SlurmTestCluster) -> str:
    done = subprocess.run(
        ["sinfo", "--noheader", "--Node", f"--nodes={cluster.node}", "--format=%T"],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else ""


@contextmanager
def running_slurm(root: Path) -> Iterator[SlurmTestCluster]:
    """Start munged, slurmctld and slurmd for a cluster in ``root``; stop them on exit."""
    node = socket.gethostname().split(".")[0]
    cluster = write_config(root, node)
    socket_path = root / "munge" / "munge.socket"
    daemons = _Daemons(cluster)
    try:
        daemons.start(
            "munged",
            "--foreground",
            f"--socket={socket_path}",
            f"--key-file={root / 'munge' / 'munge.key'}",
            f"--pid-file={root / 'munge' / 'munged.pid'}",
            f"--seed-file={root / 'munge' / 'munged.seed'}",
            f"--log-file={root / 'log' / 'munged.log'}",
        )
        daemons.wait_until("the MUNGE socket", socket_path.exists, root / "log" / "munged.log")
        daemons.start("slurmctld", "-D")
        daemons.start("slurmd", "-D", "-N", node)
        daemons.wait_until(
            f"node {node} to be idle in sinfo",
            lambda: _node_state(cluster) == "idle",
            root / "log" / "slurmctld.log",
        )
        yield cluster
    finally:
        try:
            if daemons.procs:
                cluster.cancel_all()
        finally:
            daemons.stop()


@pytest.fixture(scope="session", name="slurm_session")
def fixture_slurm_session() -> Iterator[SlurmTestCluster]:
    """A running one-node Slurm cluster, with ``SLURM_CONF`` exported for the session."""
    reason = unavailable()
    if reason is not None:
        missing(reason)
    # not tmp_path (or $TMPDIR): munged refuses a socket below private (0700) folders, and
    # a socket path must stay short
    root = Path(tempfile.mkdtemp(prefix="flashmm-slurm-", dir="/tmp"))
    try:
        with running_slurm(root) as cluster, pytest.MonkeyPatch.context() as mp:
            mp.setenv("SLURM_CONF", str(cluster.conf))
            yield cluster
    finally:
        if os.environ.get(KEEP, "") in ("", "0"):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(name="slurm_cluster")
def fixture_slurm_cluster(slurm_session: SlurmTestCluster) -> Iterator[SlurmTestCluster]:
    """The session's Slurm cluster with an empty queue, emptied again after the test."""
    slurm_session.cancel_all()
    yield slurm_session
    slurm_session.cancel_all()
