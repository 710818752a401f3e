"""Reduction throughput: the one-pass statistics against a plain read pass of the same store.

Run: ``python benchmarks/bench_reduce.py`` (1,000,000 cells x 2,000 genes, ~5% non-zero,
CSR, on a local cluster of 2 worker processes), or smaller, e.g.
``python benchmarks/bench_reduce.py --cells 100000 --codecs lz4 --dense-cells 0``.

For each store variant (CSR with the codecs asked for; dense float32 rows when
``--dense-cells`` > 0) and each Dask partition size (``--chunk-cells``) it runs, in turn,

- the read pass: the same Dask array (same reader, same chunks) reduced by a trivial
  per-block sum of the stored values, summed in a tree;
- the reduction: :func:`flashmm_dask.stats.reduce.stats_graph` with the model below;

``--repeat`` times each, alternating, and reports the best wall time of each, the ratio
reduction / read pass (target <= 1.5) and the peak resident memory of the process tree
(driver + nannies + workers, sampled every 50 ms; target <= 2 GiB).

Model: fixed ``~ 0 + log(libsize) + cls + cls:trt``, random ``~ 0 + sam``, transform
log2(1 + counts), as the demo run. ``--profile`` also times one block in this process
(read, then the per-block reduction) and prints the functions that cost the most.
Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    DEFAULT_STORE_DIR,
    TreeMemory,
    free_disk,
    gib,
    load_average,
    local_client,
    machine_line,
    recoded_store,
    simulated_store,
    store_size,
    tree_cpu_seconds,
)

FIXED = "~ 0 + log(libsize) + cls + cls:trt"
RANDOM = "~ 0 + sam"
TRANSFORM = "log2p1"


def _block_sum(block: Any) -> float:
    """The read pass's trivial per-block reduction: the sum of the stored values."""
    values = block.data if hasattr(block, "indptr") else block
    return float(np.sum(values))


def _total(*parts: float) -> float:
    return float(sum(parts))


def read_graph(data: Any, split_every: int = 8) -> Any:
    """One delayed float: every block of ``data`` read and summed, summed in a tree."""
    from dask import delayed

    parts = [delayed(_block_sum, pure=True)(b) for b in data.to_delayed().ravel()]
    while len(parts) > 1:
        parts = [
            delayed(_total, pure=True)(*parts[k : k + split_every])
            for k in range(0, len(parts), split_every)
        ]
    return parts[0]


def run_pass(client: Any, graph: Any) -> tuple[float, int, Any]:
    """Compute ``graph`` on the cluster: (wall seconds, peak tree memory, result)."""
    with TreeMemory() as mem:
        start = time.perf_counter()
        result = client.compute(graph).result()
        seconds = time.perf_counter() - start
    return seconds, mem.peak, result


def best_passes(client: Any, expr: Any, design: Any, repeat: int) -> dict[str, Any]:
    """The best of ``repeat`` read passes and reductions of ``expr``, alternated: their
    seconds (wall, and CPU of the process tree), peak memory, the read's checksum, the
    statistics and the load."""
    from flashmm_dask.stats.reduce import stats_graph

    read_s, reduce_s, read_cpu, reduce_cpu, read_mem, reduce_mem = [], [], [], [], 0, 0
    checksum = stats = None
    for _ in range(repeat):
        cpu = tree_cpu_seconds()
        seconds, peak, checksum = run_pass(client, read_graph(expr.data))
        read_cpu.append(tree_cpu_seconds() - cpu)
        read_s.append(seconds)
        read_mem = max(read_mem, peak)
        cpu = tree_cpu_seconds()
        seconds, peak, stats = run_pass(client, stats_graph(expr, design, transform=TRANSFORM))
        reduce_cpu.append(tree_cpu_seconds() - cpu)
        reduce_s.append(seconds)
        reduce_mem = max(reduce_mem, peak)
    return {
        "chunk": int(expr.data.chunks[0][0]),
        "read": min(read_s),
        "reduce": min(reduce_s),
        "read_cpu": min(read_cpu),
        "reduce_cpu": min(reduce_cpu),
        "read_mem": read_mem,
        "reduce_mem": reduce_mem,
        "checksum": checksum,
        "load": load_average(),
        "stats": stats,
    }


def measure(client: Any, store: Path, chunk_cells: int | None, repeat: int) -> dict[str, Any]:
    """Best-of-``repeat`` read pass and reduction of one store at one partition size."""
    from flashmm_dask.design.formula import build_design
    from flashmm_dask.io.readers import read_expression

    expr = read_expression(str(store), chunk_cells=chunk_cells)
    best = best_passes(client, expr, build_design(expr.obs, FIXED, RANDOM), repeat)
    stats = best["stats"]
    return {
        **best,
        "blocks": len(expr.data.chunks[0]) * len(expr.data.chunks[1]),
        "p": stats.p,
        "q": stats.q,
        "store": store,
    }


def profile_block(store: Path, chunk_cells: int | None, blocks: int = 4) -> None:
    """Time reading and reducing the first blocks in this process; print the top costs."""
    import dask

    from flashmm_dask.design.formula import build_design
    from flashmm_dask.io.readers import read_expression
    from flashmm_dask.stats.blocks import add_block
    from flashmm_dask.stats.products import BlockSums
    from flashmm_dask.stats.reduce import _design_chunk

    expr = read_expression(str(store), chunk_cells=chunk_cells)
    design = build_design(expr.obs, FIXED, RANDOM)
    delayed_blocks = expr.data.to_delayed().ravel()[: blocks + 1]
    features = tuple(str(f) for f in expr.features)
    # added into running sums, as a reduction task does
    sums = BlockSums(len(design.covariates), len(design.random_names), len(features))
    t_read = t_design = t_reduce = 0.0
    nnz = 0
    profiler = cProfile.Profile()
    start = 0
    for k, blk in enumerate(delayed_blocks):
        t0 = time.perf_counter()
        (block,) = dask.compute(blk, scheduler="sync")
        t1 = time.perf_counter()
        XZ = _design_chunk(design, expr.obs.iloc[start : start + block.shape[0]], start)
        t2 = time.perf_counter()
        if k > 0:
            profiler.enable()
        add_block(block, XZ, features, start, 0, TRANSFORM, 1e4, True, "", sums)
        t3 = time.perf_counter()
        if k > 0:  # the first block warms caches and compiled kernels
            profiler.disable()
            t_read += t1 - t0
            t_design += t2 - t1
            t_reduce += t3 - t2
            nnz += int(block.nnz) if hasattr(block, "nnz") else int(np.count_nonzero(block))
        start += block.shape[0]
    print(
        f"profile ({blocks} blocks of {chunk_cells or 'default'} cells, in-process, after one "
        f"warm-up block), ns per non-zero: read {t_read / nnz * 1e9:.1f}, design X_i, Z_i "
        f"{t_design / nnz * 1e9:.1f} ({t_design / blocks * 1e3:.1f} ms per chunk), "
        f"products and transform {t_reduce / nnz * 1e9:.1f}"
    )
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(10)
    lines = [line for line in text.getvalue().splitlines() if line.strip()]
    print("\n".join(lines[-11:]))


def main(argv: list[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Run the benchmark; also return (store label, measurements) per run, whose
    ``stats`` is the SummaryStats the reduction computed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--genes", type=int, default=2_000)
    ap.add_argument("--density", type=float, default=0.05, help="fraction of non-zeros")
    ap.add_argument("--samples", type=int, default=24, help="subjects (sam)")
    ap.add_argument("--celltypes", type=int, default=3, help="cell types (cls)")
    ap.add_argument("--chunk-cells", default="10000", help="comma-separated; 0: the default")
    ap.add_argument("--codecs", default="lz4", help="comma-separated: lz4,zstd,none")
    ap.add_argument("--dense-cells", type=int, default=0, help="also a dense store of N cells")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--store-dir", type=Path, default=DEFAULT_STORE_DIR)
    ap.add_argument("--profile", action="store_true", help="profile one block in-process")
    args = ap.parse_args(argv)

    print(machine_line())
    print(
        f"store: {args.cells} cells x {args.genes} genes, density {args.density}; model "
        f"{FIXED} | {RANDOM}, transform {TRANSFORM}; {args.workers} workers x 1 thread"
    )
    print(f"free disk in {args.store_dir}: {gib(free_disk(args.store_dir))}")
    base_name = f"reduce-{args.cells}x{args.genes}-d{args.density:g}-s{args.samples}.zarr"
    base, write_s = simulated_store(
        args.store_dir / base_name,
        args.cells,
        args.genes,
        density=args.density,
        n_samples=args.samples,
        n_celltypes=args.celltypes,
    )
    print(f"simulated store {base} ({gib(store_size(base))}) in {write_s:.1f} s (0: reused)")
    variants: list[tuple[str, Path]] = []
    for codec in args.codecs.split(","):
        path = base if codec == "lz4" else base.with_name(f"{base.stem}-{codec}.zarr")
        variants.append((f"csr-{codec}", recoded_store(base, path, codec)))
    if args.dense_cells:
        small_name = f"reduce-{args.dense_cells}x{args.genes}-d{args.density:g}.zarr"
        small, _ = simulated_store(
            args.store_dir / small_name,
            args.dense_cells,
            args.genes,
            density=args.density,
            n_samples=args.samples,
            n_celltypes=args.celltypes,
        )
        dense = recoded_store(small, small.with_name(f"{small.stem}-dense.zarr"), "lz4", dense=True)
        variants.append(("dense-lz4", dense))
    chunks = [int(c) or None for c in args.chunk_cells.split(",")]
    if args.profile:
        profile_block(variants[0][1], chunks[0])

    header = (
        f"{'store':<11}{'cells':>9}{'chunk':>8}{'blocks':>7}{'read s':>9}{'reduce s':>10}"
        f"{'ratio':>7}{'read peak':>11}{'reduce peak':>13}  load"
    )
    results = []
    with local_client(args.workers) as client:
        print(header)
        for label, path in variants:
            n_cells = args.dense_cells if label.startswith("dense") else args.cells
            for chunk in chunks:
                r = measure(client, path, chunk, args.repeat)
                results.append((label, r))
                print(
                    f"{label:<11}{n_cells:>9}{r['chunk']:>8}{r['blocks']:>7}{r['read']:>9.2f}"
                    f"{r['reduce']:>10.2f}{r['reduce'] / r['read']:>7.2f}"
                    f"{gib(r['read_mem']):>11}{gib(r['reduce_mem']):>13}  {r['load']}",
                    flush=True,
                )
    for label, r in results:
        print(
            f"ratio reduce/read ({label}, chunk {r['chunk']}, p={r['p']}, q={r['q']}): "
            f"{r['reduce'] / r['read']:.2f} (target <= 1.5); peak memory "
            f"{gib(r['reduce_mem'])} (target <= 2 GiB)"
        )
    sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
