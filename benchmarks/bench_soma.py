"""The same data as an AnnData Zarr store and as a TileDB-SOMA experiment, side by side.

Run: ``python benchmarks/bench_soma.py`` (1,000,000 cells x 2,000 genes, ~5% non-zero,
on a local cluster of 2 worker processes), or smaller, e.g.
``python benchmarks/bench_soma.py --cells 200000 --chunk-cells 0,10000``.

The Zarr store is simulated as for ``bench_reduce.py``; the SOMA experiment is written
from it (``tiledbsoma.io.from_anndata`` for obs and var, then X appended block by block,
so no step holds the whole matrix). For each partition size (``--chunk-cells``; 0 is the
reader's default of ~5 M non-zeros per block) and each source it runs, in turn,

- the read pass: every block read and its stored values summed (``bench_reduce``'s);
- the reduction: :func:`flashmm_dask.stats.reduce.stats_graph`, model of ``bench_reduce``;

and, for SOMA, both again with a cell filter pushed down (``--obs-filter``; cell types
other than "1" by default, about 2/3 of the cells). It reports the best of ``--repeat``
wall times, the peak resident memory of the process tree, the ratios SOMA / Zarr, and the
largest relative difference between the statistics of the two sources (0 expected).
Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    DEFAULT_STORE_DIR,
    gib,
    local_client,
    machine_line,
    simulated_store,
    store_size,
)
from bench_reduce import FIXED, RANDOM, TRANSFORM, best_passes


def soma_copy(store: Path, target: Path, block_cells: int = 100_000) -> tuple[Path, float]:
    """A SOMA experiment with the store's obs, var names and X (float32); its write time.

    An experiment already at ``target`` with the same shape is reused (write time 0).
    """
    import anndata as ad
    import pandas as pd
    import pyarrow as pa
    import scipy.sparse as sp
    import tiledbsoma
    import tiledbsoma.io

    from flashmm_dask.io.readers import read_expression

    expr = read_expression(str(store), chunk_cells=block_cells)
    n, m = expr.n_cells, expr.n_features
    if target.exists():
        with tiledbsoma.open(str(target)) as exp:
            if tuple(exp.ms["RNA"].X["data"].shape) == (n, m):
                return target, 0.0
        shutil.rmtree(target)
    start = time.perf_counter()
    shell = ad.AnnData(
        X=sp.csr_matrix((n, m), dtype=np.float32),
        obs=expr.obs,
        var=pd.DataFrame(index=expr.features),
    )
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tiledbsoma.io.from_anndata(str(tmp), shell, measurement_name="RNA")
    with tiledbsoma.open(str(tmp), mode="w") as exp:
        layer = exp.ms["RNA"].X["data"]
        first = 0
        for block in expr.data.to_delayed()[:, 0]:
            coo = block.compute(scheduler="sync").tocoo()
            layer.write(
                pa.Table.from_pydict(
                    {
                        "soma_dim_0": coo.row.astype(np.int64) + first,
                        "soma_dim_1": coo.col.astype(np.int64),
                        "soma_data": coo.data.astype(np.float32),
                    }
                )
            )
            first += coo.shape[0]
    tmp.rename(target)
    return target, time.perf_counter() - start


def measure(client: Any, expr: Any, repeat: int) -> dict[str, Any]:
    """Best-of-``repeat`` read pass and reduction of one lazy expression."""
    from flashmm_dask.design.formula import build_design

    best = best_passes(client, expr, build_design(expr.obs, FIXED, RANDOM), repeat)
    return {**best, "cells": expr.n_cells, "blocks": len(expr.data.chunks[0])}


def max_rel_diff(a: Any, b: Any) -> float:
    """The largest |a - b| / max|b| over the summary statistics."""
    worst = 0.0
    for key in ("XX", "XY", "ZX", "ZY", "ZZ", "Ynorm"):
        x, y = np.asarray(getattr(a, key)), np.asarray(getattr(b, key))
        worst = max(worst, float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300)))
    return worst


def main(argv: list[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Run the benchmark; also return (source label, measurements) per run."""
    from flashmm_dask.io.readers import read_expression
    from flashmm_dask.io.soma import read_soma

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--genes", type=int, default=2_000)
    ap.add_argument("--density", type=float, default=0.05, help="fraction of non-zeros")
    ap.add_argument("--samples", type=int, default=24, help="subjects (sam)")
    ap.add_argument("--chunk-cells", default="0,10000", help="comma-separated; 0: default")
    ap.add_argument("--obs-filter", default="cls != '1'", help="SOMA value filter on obs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--store-dir", type=Path, default=DEFAULT_STORE_DIR)
    args = ap.parse_args(argv)

    print(machine_line())
    print(
        f"data: {args.cells} cells x {args.genes} genes, density {args.density}; model "
        f"{FIXED} | {RANDOM}, transform {TRANSFORM}; {args.workers} workers x 1 thread"
    )
    args.store_dir.mkdir(parents=True, exist_ok=True)
    name = f"reduce-{args.cells}x{args.genes}-d{args.density:g}-s{args.samples}"
    store, zarr_s = simulated_store(
        args.store_dir / f"{name}.zarr",
        args.cells,
        args.genes,
        density=args.density,
        n_samples=args.samples,
        n_celltypes=3,
    )
    experiment, soma_s = soma_copy(store, args.store_dir / f"{name}.soma")
    print(
        f"zarr store {store} ({gib(store_size(store))}, written in {zarr_s:.1f} s; 0: reused)"
        f"\nSOMA experiment {experiment} ({gib(store_size(experiment))}, written in "
        f"{soma_s:.1f} s)"
    )
    header = (
        f"{'source':<14}{'cells':>9}{'chunk':>8}{'blocks':>7}{'read s':>9}{'reduce s':>10}"
        f"{'read peak':>11}{'reduce peak':>13}  load"
    )
    results: list[tuple[str, dict[str, Any]]] = []
    with local_client(args.workers) as client:
        print(header)
        for chunk in [int(c) or None for c in args.chunk_cells.split(",")]:
            sources = {
                "zarr": read_expression(str(store), chunk_cells=chunk),
                "soma": read_soma(experiment, chunk_cells=chunk),
                "soma-filtered": read_soma(
                    experiment, obs_filter=args.obs_filter, chunk_cells=chunk
                ),
            }
            row = {}
            for label, expr in sources.items():
                r = measure(client, expr, args.repeat)
                row[label] = r
                results.append((label, r))
                print(
                    f"{label:<14}{r['cells']:>9}{r['chunk']:>8}{r['blocks']:>7}"
                    f"{r['read']:>9.2f}{r['reduce']:>10.2f}{gib(r['read_mem']):>11}"
                    f"{gib(r['reduce_mem']):>13}  {r['load']}",
                    flush=True,
                )
            zarr, soma = row["zarr"], row["soma"]
            print(
                f"ratio soma/zarr (chunk {zarr['chunk']}): read {soma['read'] / zarr['read']:.2f}, "
                f"reduce {soma['reduce'] / zarr['reduce']:.2f}, reduce peak "
                f"{soma['reduce_mem'] / zarr['reduce_mem']:.2f}; statistics differ by "
                f"{max_rel_diff(soma['stats'], zarr['stats']):.1e} (relative)",
                flush=True,
            )
    sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
