"""Scaling with workers, and the partition sizes of the reduction and of the fit.

Run: ``python benchmarks/bench_scaling.py`` (a 100,000-cell x 11,596-gene atlas store as
in ``bench_atlas.py``), or ``--cells 20000 --genes 2000`` for a quick run. Three parts:

1. workers: the whole pipeline with 1 worker x 1 thread, 2 workers x 1 thread and
   1 worker x 2 threads: wall time per phase and peak memory of the process tree;
2. reduction partition (``data.chunk_cells``): the statistics alone (``stats_graph`` on a
   2-worker cluster) for several cells-per-chunk, with the read pass of the same chunks
   and the peak memory;
3. fit partition (``fit.block_size``): the pipeline from saved statistics
   (``stats.load``) for several features-per-block and ``auto``
   (:func:`flashmm_dask.run.pipeline.auto_block_size`), fitting time and peak memory.

Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from _common import (
    DEFAULT_STORE_DIR,
    gib,
    load_average,
    local_client,
    machine_line,
)
from bench_atlas import FIXED, RANDOM, atlas_store, run_pipeline, stored_nnz
from bench_reduce import read_graph, run_pass


def part_workers(store: Path, out: Path, layouts: list[tuple[int, int]]) -> Path:
    """Part 1; returns the saved statistics of the first run (for part 3)."""
    print("\n1. workers (whole pipeline)")
    print(f"{'workers x threads':<19}{'wall s':>8}{'stats s':>9}{'fit s':>8}{'peak':>11}  load")
    saved = out / "stats-for-blocks.zarr"
    results = {}
    for workers, threads in layouts:
        summary, peak, wall = run_pipeline(
            store,
            out / f"scaling-{workers}x{threads}",
            (f"cluster.n_workers={workers}", f"cluster.threads_per_worker={threads}"),
        )
        t = summary.timings
        results[(workers, threads)] = t
        print(
            f"{f'{workers} x {threads}':<19}{wall:>8.1f}{t['statistics']:>9.1f}"
            f"{t['fitting']:>8.1f}{gib(peak):>11}  {load_average()}",
            flush=True,
        )
        if not saved.exists():
            shutil.copytree(out / f"scaling-{workers}x{threads}" / "stats.zarr", saved)
    base = results.get((1, 1))
    for key, t in results.items():
        if base and key != (1, 1):
            print(
                f"ratio speed-up {key[0]} workers x {key[1]} threads over 1 x 1: statistics "
                f"{base['statistics'] / t['statistics']:.2f}, fitting "
                f"{base['fitting'] / t['fitting']:.2f}"
            )
    return saved


def part_chunks(store: Path, chunks: list[int], workers: int, repeat: int) -> None:
    """Part 2: the reduction alone at several cells-per-chunk."""
    from flashmm_dask.design.formula import build_design
    from flashmm_dask.io.readers import read_expression
    from flashmm_dask.stats.reduce import stats_graph

    print(f"\n2. reduction partition (data.chunk_cells), {workers} workers, best of {repeat}")
    print(
        f"{'chunk_cells':>11}{'blocks':>8}{'nnz/block':>11}{'read s':>8}{'reduce s':>10}"
        f"{'ratio':>7}{'peak':>11}  load"
    )
    nnz = stored_nnz(store)
    rows = []
    with local_client(workers) as client:
        for chunk in chunks:
            expr = read_expression(str(store), chunk_cells=chunk)
            design = build_design(expr.obs, FIXED, RANDOM)
            read_s, reduce_s, peak = [], [], 0
            for _ in range(repeat):
                read_s.append(run_pass(client, read_graph(expr.data))[0])
                graph = stats_graph(expr, design, transform="log2p1")
                seconds, mem, _ = run_pass(client, graph)
                reduce_s.append(seconds)
                peak = max(peak, mem)
            blocks = len(expr.data.chunks[0])
            rows.append((chunk, min(reduce_s)))
            print(
                f"{chunk:>11}{blocks:>8}{nnz // blocks:>11,}{min(read_s):>8.2f}"
                f"{min(reduce_s):>10.2f}{min(reduce_s) / min(read_s):>7.2f}{gib(peak):>11}"
                f"  {load_average()}",
                flush=True,
            )
    best = min(rows, key=lambda r: r[1])
    default = next((r for r in rows if r[0] == 10_000), None)
    if default:
        print(
            f"ratio reduction time default chunk (10000) / best chunk ({best[0]}): "
            f"{default[1] / best[1]:.2f}"
        )


def part_blocks(store: Path, saved: Path, out: Path, sizes: list[str], workers: int) -> None:
    """Part 3: the fit alone (statistics loaded) at several features-per-block."""
    from flashmm_dask.run.pipeline import auto_block_size
    from flashmm_dask.stats.summary import SummaryStats

    stats = SummaryStats.load(str(saved))
    auto = auto_block_size(stats.m, stats.p, stats.q, len(stats.d), workers)
    print(
        f"\n3. fit partition (fit.block_size), {workers} workers; m={stats.m}, p={stats.p}, "
        f"q={stats.q}; auto = {auto}"
    )
    print(f"{'block_size':>11}{'blocks':>8}{'fit s':>8}{'wall s':>8}{'peak':>11}  load")
    rows = []
    for size in sizes:
        summary, peak, wall = run_pipeline(
            store,
            out / f"blocks-{size}",
            (
                f"stats.load={saved}",
                f"fit.block_size={size}",
                f"cluster.n_workers={workers}",
                "output.tables=[]",
            ),
        )
        fit_s = summary.timings["fitting"]
        rows.append((size, fit_s))
        print(
            f"{size:>11}{summary.n_blocks:>8}{fit_s:>8.1f}{wall:>8.1f}{gib(peak):>11}"
            f"  {load_average()}",
            flush=True,
        )
    best = min(rows, key=lambda r: r[1])
    chosen = next(t for s, t in rows if s == "auto")
    print(f"ratio fit time auto ({auto}) / best ({best[0]}): {chosen / best[1]:.2f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--genes", type=int, default=11_596)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--layouts", default="1x1,2x1,1x2", help="workers x threads, comma-separated")
    ap.add_argument("--chunk-cells", default="5000,10000,25000,50000")
    ap.add_argument("--block-sizes", default="64,256,1024,auto,8192")
    ap.add_argument("--workers", type=int, default=2, help="workers of parts 2 and 3")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--store-dir", type=Path, default=DEFAULT_STORE_DIR)
    args = ap.parse_args(argv)

    print(machine_line())
    store, write_s = atlas_store(args.store_dir, args.cells, args.genes, args.density)
    print(
        f"store {store.name}: {stored_nnz(store):,} non-zeros, written in {write_s:.0f} s "
        f"(0: reused); model {FIXED} | {RANDOM}"
    )
    out = args.store_dir / f"scaling-{args.cells}x{args.genes}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    start = time.perf_counter()
    layouts = [tuple(int(v) for v in lay.split("x")) for lay in args.layouts.split(",")]
    saved = part_workers(store, out, layouts)  # type: ignore[arg-type]
    part_chunks(store, [int(c) for c in args.chunk_cells.split(",")], args.workers, args.repeat)
    part_blocks(store, saved, out, args.block_sizes.split(","), args.workers)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
