"""Faults on a real multi-process Dask cluster: a ``dask scheduler`` and ``dask worker``
processes on the loopback interface, started and stopped here, used through
``cluster.kind: address`` (``--scheduler`` on the command line).

- a worker killed (SIGKILL) while blocks are fitted: the run completes and the store
  equals an uninterrupted run;
- the driver killed mid-run: the rerun resumes, fits only the blocks that were missing,
  and the store equals an uninterrupted run;
- a worker killed during the reduction: the statistics equal an undisturbed reduction;
- a read-only output, and a file system that fills up mid-run (small tmpfs mounts; the
  tests run as root, for whom permissions do not stop a write): a clear error, the store
  not marked complete, the blocks written before intact, and a resume once there is room;
- two runs on one output: the second is refused while the first holds it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed import Client
from needs import missing
from pipeline_helpers import VARIABLES, assert_stores_equal

from flashmm_dask import StoreError, load_stats, simulate_to_store
from flashmm_dask.io.results import blocks_done, open_results, read_store_attrs
from flashmm_dask.run.config import dump_config, load_config
from flashmm_dask.run.output import LOCK
from flashmm_dask.run.pipeline import RESULTS, compute_stats, run

pytestmark = pytest.mark.distributed

BIN = Path(sys.executable).parent
N_GENES, N_CELLS = 30, 2000
N_LONG = 200  # features (one per block) of the run whose driver is killed


class ExternalCluster:
    """A ``dask scheduler`` and ``dask worker`` processes (no nannies: a killed worker
    stays dead) on 127.0.0.1."""

    def __init__(self, folder: Path, n_workers: int):
        self.folder = folder
        self.file = folder / "scheduler.json"
        self.log = open(folder / "cluster.log", "ab")  # closed in close()
        self.scheduler = self._start(
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(self.file),
        )
        self.workers: list[subprocess.Popen] = []
        deadline = time.monotonic() + 60
        while not self.file.exists() or not self.file.stat().st_size:
            assert self.scheduler.poll() is None, "dask scheduler exited"
            assert time.monotonic() < deadline, "dask scheduler did not start"
            time.sleep(0.05)
        self.client = Client(scheduler_file=str(self.file), timeout=60)
        self.address = self.client.scheduler.address
        self.ensure(n_workers)

    def _start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [str(BIN / "dask"), *args], stdout=self.log, stderr=self.log, cwd=self.folder
        )

    def ensure(self, n: int) -> None:
        """Start workers until ``n`` are alive, and wait until the scheduler has them."""
        self.workers = [w for w in self.workers if w.poll() is None]
        while len(self.workers) < n:
            self.workers.append(
                self._start(
                    "worker",
                    "--scheduler-file",
                    str(self.file),
                    "--nthreads",
                    "1",
                    "--no-nanny",
                    "--no-dashboard",
                    "--host",
                    "127.0.0.1",
                    "--memory-limit",
                    "0",
                    "--local-directory",
                    str(self.folder / "workers"),
                    "--death-timeout",
                    "60",
                )
            )
        self.client.wait_for_workers(n, timeout=120)
        deadline = time.monotonic() + 60
        while len(self.client.scheduler_info()["workers"]) != n:
            assert time.monotonic() < deadline, "the scheduler still lists dead workers"
            time.sleep(0.1)

    def kill(self, pid: int) -> None:
        (worker,) = [w for w in self.workers if w.pid == pid]
        os.kill(pid, signal.SIGKILL)
        worker.wait(timeout=30)

    def idle(self, timeout: float = 60) -> None:
        """Wait until neither the scheduler nor a worker holds a task (those of a driver
        that was killed end or are forgotten), twice in a row, half a second apart."""

        def n_tasks(dask_worker: Any) -> int:
            return len(dask_worker.state.tasks)

        def n_scheduled(dask_scheduler: Any) -> int:
            return len(dask_scheduler.tasks)

        def busy() -> int:
            workers = sum(self.client.run(n_tasks).values())
            return workers + self.client.run_on_scheduler(n_scheduled)

        deadline = time.monotonic() + timeout
        quiet = 0
        while quiet < 2:
            assert time.monotonic() < deadline, "the cluster is still busy"
            quiet = 0 if busy() else quiet + 1
            time.sleep(0.5)

    def close(self) -> None:
        self.client.close()
        for proc in [*self.workers, self.scheduler]:
            proc.terminate()
        for proc in [*self.workers, self.scheduler]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.log.close()


#: the states of a task not yet done; a task whose result its dependents have taken is
#: "released" too (a chain's reduction tasks: each passes its running sums on)
NOT_DONE = ("released", "waiting", "queued", "processing", "no-worker")


def _busiest_worker(
    prefix: str, waiting: tuple[str, ...] = NOT_DONE
) -> Callable[[Any], tuple[int, int, int]]:
    """A function for ``run_on_scheduler``: (tasks with ``prefix`` in the states
    ``waiting``, pid of the worker holding most results with ``prefix``, how many it
    holds)."""

    def probe(dask_scheduler: Any) -> tuple[int, int, int]:
        pending = sum(
            1
            for key, ts in dask_scheduler.tasks.items()
            if str(key).startswith(prefix) and ts.state in waiting
        )
        held = {
            ws.pid: sum(1 for ts in ws.has_what if str(ts.key).startswith(prefix))
            for ws in dask_scheduler.workers.values()
        }
        pid = max(held, key=held.__getitem__)
        return pending, pid, held[pid]

    return probe


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class Background:
    """A call in a thread whose result or exception is kept for the test."""

    def __init__(self, fn: Callable[[], Any]):
        self.result: Any = None
        self.error: BaseException | None = None

        def target() -> None:
            try:
                self.result = fn()
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 300) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the call did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def _done(store: Path) -> np.ndarray:
    if not (store / "zarr.json").exists():
        return np.zeros(0, dtype=bool)
    try:
        return blocks_done(str(store))
    except (StoreError, OSError, ValueError):  # the store is being created
        return np.zeros(0, dtype=bool)


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[ExternalCluster]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        c = ExternalCluster(tmp_path_factory.mktemp("cluster"), n_workers=2)
        try:
            yield c
        finally:
            c.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.zarr"
    simulate_to_store(
        path, N_GENES, N_CELLS, n_samples=6, n_de_genes=6, seed=11, store_chunk_cells=100
    )
    return path


def _run_config(data: Path, cluster: ExternalCluster, output: Path, *extra: str) -> Any:
    """A run of ``data`` on the external cluster, one feature per block."""
    return load_config(
        None,
        [
            f"data.path={data}",
            f"output.path={output}",
            "cluster.kind=address",
            f"cluster.address={cluster.address}",
            "fit.block_size=1",
            "data.chunk_cells=1000",
            "output.plots=false",
            "output.tables=[]",
            "progress=false",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def config(data, cluster) -> Callable[..., Any]:
    """A run of the simulated data on the external cluster, one feature per block."""
    return lambda output, *extra: _run_config(data, cluster, output, *extra)


@pytest.fixture(scope="module")
def long_run(cluster, tmp_path_factory) -> tuple[Callable[..., Any], Any]:
    """A run with many more one-feature blocks than ``config``'s (a config maker and its
    uninterrupted store): long enough that a driver killed after a few blocks is killed
    mid-run. With 30 blocks the remaining ones could all finish between seeing the
    third and the kill."""
    data = tmp_path_factory.mktemp("long") / "data.zarr"
    simulate_to_store(
        data, N_LONG, N_CELLS, n_samples=6, n_de_genes=6, seed=12, store_chunk_cells=100
    )

    def make(output: Path, *extra: str) -> Any:
        return _run_config(data, cluster, output, *extra)

    summary = run(make(tmp_path_factory.mktemp("long-reference")))
    assert summary.n_blocks == N_LONG
    return make, open_results(str(summary.store))


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> Any:
    """The uninterrupted run every disturbed one must equal."""
    summary = run(config(tmp_path_factory.mktemp("reference")))
    assert summary.n_blocks == N_GENES and summary.status_counts["ok"] > N_GENES // 2
    return open_results(str(summary.store))


# -- killed processes -------------------------------------------------------------------


def test_worker_killed_while_fitting(cluster, config, reference, tmp_path):
    cluster.ensure(2)
    cfg = config(tmp_path / "out")
    store = tmp_path / "out" / RESULTS
    job = Background(lambda: run(cfg))
    _wait_for(lambda: _done(store).sum() >= 3, "three blocks")
    pending, pid, held = cluster.client.run_on_scheduler(_busiest_worker("flashmm-fit-"))
    done_at_kill = _done(store).sum()
    cluster.kill(pid)
    summary = job.join()

    assert 3 <= done_at_kill < N_GENES and pending > 0, "the kill did not land mid-run"
    assert held > 0, "the killed worker held no finished block"
    assert len(cluster.client.scheduler_info()["workers"]) == 1
    assert summary.blocks_fitted == tuple(range(N_GENES))
    ds = open_results(str(store))
    assert ds.attrs["complete"] is True
    assert_stores_equal(ds, reference, rtol=0)
    np.testing.assert_array_equal(ds["status"].values, reference["status"].values)


def test_driver_killed_then_resumed_fits_only_the_missing_blocks(cluster, long_run, tmp_path):
    config, reference = long_run
    cluster.ensure(2)
    out = tmp_path / "out"
    cfg = config(out)
    dump_config(cfg, tmp_path / "run.yaml")
    driver = subprocess.Popen(
        [str(BIN / "flashmm-dask"), "run", str(tmp_path / "run.yaml"), "--quiet"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    store = out / RESULTS
    try:
        _wait_for(lambda: _done(store).sum() >= 3 or driver.poll() is not None, "three blocks", 180)
        assert driver.poll() is None, f"the run ended first: {driver.stderr.read()}"
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        driver.wait(timeout=30)
        driver.stderr.close()
    assert (out / LOCK).exists(), "the killed driver's lock is left behind"
    cluster.idle()  # tasks the scheduler had started for the dead driver have ended
    done_before = _done(store)
    assert 3 <= done_before.sum() < N_LONG, "the kill did not land mid-run"
    assert read_store_attrs(str(store))["complete"] is False

    resumed = run(cfg)
    assert list(resumed.blocks_fitted) == list(np.flatnonzero(~done_before))
    history = open_results(str(store)).attrs["history"]
    assert history[-1]["blocks_fitted"] == list(resumed.blocks_fitted)
    assert_stores_equal(open_results(str(store)), reference, rtol=0)
    assert not (out / LOCK).exists()


def test_worker_killed_during_the_reduction(cluster, config, tmp_path):
    cluster.ensure(2)
    # 40 cell chunks, so that the reduction is still running when the worker is killed
    extra = ("data.chunk_cells=50", "stats.save=false")
    job = Background(
        lambda: compute_stats(config(tmp_path / "a", *extra), cluster.client, tmp_path)
    )
    n_chunks = N_CELLS // 50

    def probe() -> bool:
        # the chains' tasks done are released as the next one takes their sums: not pending
        scheduled = tuple(state for state in NOT_DONE if state != "released")
        pending, pid, held = cluster.client.run_on_scheduler(
            _busiest_worker("flashmm-block-", scheduled)
        )
        probe.state = (pending, pid, held)  # type: ignore[attr-defined]
        return 0 < pending <= n_chunks - 3 and held > 0

    _wait_for(probe, "three reduced chunks")
    pending, pid, _ = probe.state  # type: ignore[attr-defined]
    cluster.kill(pid)
    disturbed = job.join()
    assert pending > 0 and len(cluster.client.scheduler_info()["workers"]) == 1

    cluster.ensure(2)
    undisturbed = compute_stats(config(tmp_path / "b", *extra), cluster.client, tmp_path)
    for name in ("XX", "XY", "ZX", "ZY", "ZZ", "Ynorm"):
        np.testing.assert_array_equal(
            getattr(disturbed, name), getattr(undisturbed, name), err_msg=name
        )
    assert disturbed.n == undisturbed.n == N_CELLS
    assert disturbed.features == undisturbed.features


STRATA = ("model.by=cls", "model.fixed=~ log(libsize) + trt", "contrasts={trt: trtB}")


def _strata_done(store: Path) -> int:
    """Blocks written so far over every stratum's group of a stratified results store."""
    groups = store / "strata"
    if not groups.is_dir():
        return 0
    return sum(int(_done(group).sum()) for group in groups.iterdir() if group.is_dir())


def test_worker_killed_while_fitting_strata(cluster, config, tmp_path):
    """A stratified run keeps each stratum's per-feature sums on the workers (they are
    never gathered): a worker killed while the strata are fitted takes some of them with
    it, the scheduler recomputes them from the reduction's lineage, and every stratum's
    results equal those of an undisturbed run, to the bit."""
    cluster.ensure(2)
    undisturbed = run(config(tmp_path / "undisturbed", *STRATA))
    cfg = config(tmp_path / "out", *STRATA)
    store = tmp_path / "out" / RESULTS
    job = Background(lambda: run(cfg))
    _wait_for(lambda: _strata_done(store) >= 3, "three blocks")
    # the worker that holds most strata's sums: they are lost with it
    _, pid, sums = cluster.client.run_on_scheduler(_busiest_worker("flashmm-rows-"))
    pending, _, _ = cluster.client.run_on_scheduler(_busiest_worker("flashmm-fit-"))
    done_at_kill = _strata_done(store)
    cluster.kill(pid)
    summary = job.join()

    n_blocks = undisturbed.n_blocks
    assert 3 <= done_at_kill < n_blocks and pending > 0, "the kill did not land mid-run"
    assert sums > 0, "the killed worker held no stratum's sums"
    assert len(cluster.client.scheduler_info()["workers"]) == 1
    assert summary.by == "cls" and summary.strata == undisturbed.strata
    assert summary.status_counts == undisturbed.status_counts
    assert read_store_attrs(str(store))["complete"] is True
    for level in undisturbed.strata:
        ds = open_results(str(store / "strata" / level))
        reference = open_results(str(undisturbed.store / "strata" / level))
        assert ds.attrs["complete"] is True
        assert_stores_equal(ds, reference, rtol=0)
        np.testing.assert_array_equal(ds["status"].values, reference["status"].values)
    assert load_stats(tmp_path / "out" / "stats.zarr").keys() == set(undisturbed.strata)


# -- write failures ---------------------------------------------------------------------


def _mount_tmpfs(folder: Path, options: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if res.returncode:
        missing(f"cannot mount a tmpfs here (not root, or no mount): {res.stderr.strip()}")


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    points: list[Path] = []
    yield points
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_read_only_output_is_refused_clearly(config, mounts, tmp_path):
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "ro,size=1M")
    mounts.append(ro)
    for output in (ro, ro / "out"):
        with pytest.raises(StoreError, match=r"Read-only file system.*make the folder writable"):
            run(config(output))
    dump_config(config(ro / "out"), tmp_path / "run.yaml")
    res = subprocess.run(
        [str(BIN / "flashmm-dask"), "run", str(tmp_path / "run.yaml"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2
    assert res.stderr.startswith("flashmm-dask: error: cannot write the lock file")
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Read-only file system" in res.stderr
    assert list(ro.iterdir()) == []


def test_disk_full_mid_run_then_resumed(cluster, config, reference, mounts, tmp_path):
    """A 1.5 MiB file system holds the empty store and about 10 of the 30 blocks."""
    cluster.ensure(2)
    small = tmp_path / "small"
    _mount_tmpfs(small, "size=1536k")
    mounts.append(small)
    cfg = config(small / "out", "stats.save=false", "output.tables=[csv]")
    store = small / "out" / RESULTS
    with pytest.raises(StoreError) as raised:
        run(cfg)
    message = str(raised.value)
    assert "cannot write the results store" in message
    assert "No space left on device" in message and "rerun the same command" in message
    cluster.idle()
    assert not (small / "out" / LOCK).exists()
    attrs = read_store_attrs(str(store))
    assert attrs["complete"] is False
    done = _done(store)
    assert 0 < done.sum() < N_GENES, "the disk did not fill up mid-run"
    # the blocks that were written are intact
    partial = open_results(str(store), allow_incomplete=True)
    rows = np.flatnonzero(done)
    for name in (*VARIABLES, "status"):
        if name in ("padj", "contrast_padj"):  # computed when the store is finalized
            continue
        np.testing.assert_array_equal(
            partial[name].values[rows], reference[name].values[rows], err_msg=name
        )
    assert not (small / "out" / "results.csv").exists()

    subprocess.run(["mount", "-o", "remount,size=64M", str(small)], check=True)
    resumed = run(cfg)
    assert list(resumed.blocks_fitted) == list(np.flatnonzero(~done))
    assert_stores_equal(open_results(str(store)), reference, rtol=0)
    assert (small / "out" / "results.csv").exists()


# -- two runs, one output ---------------------------------------------------------------


def test_second_run_on_the_same_output_is_refused(config, reference, tmp_path):
    out = tmp_path / "out"
    cfg = config(out)
    dump_config(cfg, tmp_path / "run.yaml")
    first = subprocess.Popen(
        [str(BIN / "flashmm-dask"), "run", str(tmp_path / "run.yaml"), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: (out / LOCK).exists() or first.poll() is not None, "the lock", 120)
        assert first.poll() is None, "the first run ended before the second started"
        with pytest.raises(StoreError, match=rf"in use by a run \({socket.gethostname()} "):
            run(cfg)
        holder = (out / LOCK).read_text().split()
        assert holder == [socket.gethostname(), str(first.pid)]
    finally:
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert_stores_equal(open_results(str(out / RESULTS)), reference, rtol=0)
    assert not (out / LOCK).exists()
