"""Shared pieces of the benchmark scripts: machine facts, memory sampling, stores, clusters.

Not part of the package and not a test: the scripts print what they measure. Stores are
written with the package's own simulator (:func:`flashmm_dask.simulate.simulate_to_store`)
and then, where a benchmark needs it, re-encoded (other Zarr codecs) or densified chunk by
chunk, so no step holds a whole matrix in memory.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

GIB = 2**30
#: Default folder for benchmark stores (large; reused between runs when they match).
DEFAULT_STORE_DIR = Path(os.environ.get("FLASHMM_BENCH_DIR", "/tmp/flashmm-bench"))


# -- the machine ------------------------------------------------------------------------


def load_average() -> str:
    """The 1/5/15-minute load averages, as ``uptime`` prints them."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def machine_line() -> str:
    """CPU model, cores, memory and Python, for the head of a benchmark's output."""
    import psutil

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = psutil.virtual_memory().total / GIB
    return (
        f"machine: {cpu}, {os.cpu_count()} cores, {mem:.1f} GiB; Python "
        f"{platform.python_version()}; load {load_average()}"
    )


# -- memory of the process tree ---------------------------------------------------------


@dataclass
class TreeMemory:
    """Peak resident memory of this process and all its descendants, sampled in a thread.

    Dask workers of a LocalCluster are child processes (nanny and worker), so summing the
    RSS of the tree covers the driver and every worker. Pages shared between processes
    are counted once per process, so the figure is an upper bound. Use as a context
    manager; ``peak`` is in bytes, ``baseline`` the first sample.
    """

    interval: float = 0.05
    peak: int = 0
    baseline: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def sample(self) -> int:
        import psutil

        root = psutil.Process()
        total = 0
        for proc in (root, *root.children(recursive=True)):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += proc.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self.baseline = self.peak = self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.sample())


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"


@contextlib.contextmanager
def timed() -> Iterator[dict[str, float]]:
    """``with timed() as t: ...`` then ``t["s"]`` is the wall time in seconds."""
    out: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["s"] = time.perf_counter() - start


# -- clusters ---------------------------------------------------------------------------


@contextlib.contextmanager
def local_client(n_workers: int, threads_per_worker: int = 1) -> Iterator[Any]:
    """A distributed client on a LocalCluster built the way the pipeline builds it."""
    from flashmm_dask.run.cluster import open_client
    from flashmm_dask.run.config import load_config

    cfg = load_config(
        None,
        (
            "cluster.kind=local",
            f"cluster.n_workers={n_workers}",
            f"cluster.threads_per_worker={threads_per_worker}",
        ),
    )
    with open_client(cfg.cluster) as client:
        client.wait_for_workers(n_workers)
        yield client


# -- stores -----------------------------------------------------------------------------


def gene_mean_for_density(density: float, dispersion: float = 2.0) -> float:
    """NB mean whose probability of a non-zero count is ``density`` (size ``dispersion``).

    The simulator's default dispersion is 1 + Poisson(1), mean 2; library sizes and
    random effects move the realised density a little, so the scripts report it.
    """
    if not 0 < density < 1:
        raise ValueError(f"density must be in (0, 1), got {density}")
    return float(dispersion * ((1.0 - density) ** (-1.0 / dispersion) - 1.0))


def free_disk(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free


def store_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def simulated_store(
    path: Path,
    n_cells: int,
    n_genes: int,
    *,
    density: float,
    n_samples: int,
    n_celltypes: int,
    seed: int = 1,
    store_chunk_cells: int = 10_000,
    reuse: bool = True,
) -> tuple[Path, float]:
    """A simuRNAseq AnnData Zarr store (CSR X, anndata's default codec) and its write time.

    An existing store at ``path`` with the same shape is reused (write time 0).
    """
    from flashmm_dask.simulate import simulate_to_store

    if reuse and _same_shape(path, n_cells, n_genes):
        return path, 0.0
    chunk = simulation_chunk_cells(n_genes, density)
    with timed() as t:
        simulate_to_store(
            path,
            n_genes,
            n_cells,
            n_samples=n_samples,
            n_celltypes=n_celltypes,
            gene_mean=gene_mean_for_density(density),
            seed=seed,
            chunk_cells=chunk,
            store_chunk_cells=store_chunk_cells,
            overwrite=True,
            n_threads=max(1, os.cpu_count() or 1),
        )
    return path, t["s"]


def simulation_chunk_cells(n_genes: int, density: float) -> int:
    """The cells :func:`simulated_store` draws and appends at a time (about 200 MB of
    non-zeros, 1,000 to 100,000 cells)."""
    return max(1_000, min(100_000, int(2e8 / max(1.0, n_genes * density * 16))))


def _same_shape(path: Path, n_cells: int, n_genes: int) -> bool:
    if not path.exists():
        return False
    import zarr

    try:
        attrs = zarr.open_group(str(path), mode="r")["X"].attrs
        return tuple(attrs["shape"]) == (n_cells, n_genes)
    except (KeyError, ValueError, OSError):
        return False


def compressor(name: str) -> Any:
    """A numcodecs compressor for a Zarr format 2 array: lz4, zstd (both Blosc) or none."""
    import numcodecs

    if name == "none":
        return None
    if name in ("lz4", "zstd"):
        return numcodecs.Blosc(cname=name, clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    raise ValueError(f"unknown codec {name!r}; choose lz4, zstd or none")


def recoded_store(src: Path, dst: Path, codec: str, *, dense: bool = False) -> Path:
    """Copy an AnnData Zarr store with X re-encoded: another codec, or dense float32 rows.

    obs, var and uns are copied with anndata; X is copied one stored chunk at a time
    (CSR: data/indices/indptr with the same chunks; dense: row chunks of the CSR rows
    of about the same cells), so memory is one chunk.
    """
    import anndata as ad
    import zarr

    if dst.exists():
        return dst
    source = zarr.open_group(str(src), mode="r")
    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    root = zarr.open_group(str(tmp), mode="w-", zarr_format=2)
    root.attrs.update(dict(source.attrs))
    for key in ("obs", "var", "uns"):
        if key in source:
            ad.io.write_elem(root, key, ad.io.read_elem(source[key]))
    X = source["X"]
    n, m = (int(s) for s in X.attrs["shape"])
    if dense:
        _dense_copy(X, root, n, m, codec)
    else:
        out = root.create_group("X")
        out.attrs.update(dict(X.attrs))
        for name in ("data", "indices", "indptr"):
            arr = X[name]
            new = out.create_array(
                name,
                shape=arr.shape,
                chunks=arr.chunks,
                dtype=arr.dtype,
                compressors=compressor(codec),
            )
            step = arr.chunks[0]
            for start in range(0, arr.shape[0], step):
                new[start : start + step] = arr[start : start + step]
    zarr.consolidate_metadata(str(tmp))
    os.replace(tmp, dst)
    return dst


def _dense_copy(X: Any, root: Any, n: int, m: int, codec: str) -> None:
    import anndata as ad

    rows = max(1, min(n, int(64 * 2**20 // (4 * m))))
    out = root.create_array(
        "X", shape=(n, m), chunks=(rows, m), dtype=np.float32, compressors=compressor(codec)
    )
    out.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    csr = ad.io.sparse_dataset(X)
    for start in range(0, n, rows):
        out[start : start + rows] = csr[start : start + rows].toarray().astype(np.float32)


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its children (the cluster's
    nannies and workers) so far: with the machine shared, a steadier measure than wall
    time."""
    import psutil

    root = psutil.Process()
    total = 0.0
    for proc in (root, *root.children(recursive=True)):
        try:
            times = proc.cpu_times()
        except psutil.Error:  # a process that has just ended
            continue
        total += times.user + times.system
    return total
