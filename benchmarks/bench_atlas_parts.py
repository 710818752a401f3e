"""The reduction and the simulator at the atlas shape, each against its I/O floor.

Run: ``python benchmarks/bench_atlas_parts.py --cells 200000`` (11,596 genes, 5%
non-zeros, 259 donors, 29 states: the shape of FLASH-MM's tuberculosis atlas).

1. **Simulator vs plain store write**: the wall and CPU time of
   :func:`~flashmm_dask.simulate.simulate_to_store` against writing the same shape through
   the same writer (``append_x``, same codec and chunks) from one pre-drawn chunk of the
   same density appended over and over (chunks are compressed independently, so the
   bytes written are alike), in appends of 10,000 cells (the target's baseline) and of
   the simulation's own chunk (anndata's append rewrites the last, partial Zarr chunk of
   data and indices, so larger appends write faster: the like-for-like figure). Target:
   simulate / write <= 2.
2. **Reduction vs read pass, per block, in-process CPU time** (ns per stored value): the
   read of a block (decompression), the design rows and their own products (X_i, Z_i,
   X'X, Z'X, Z'Z), and the block's products with the atlas model and log2(1 + counts)
   added into running sums, as a reduction task does
   (:func:`flashmm_dask.stats.blocks.add_block` into one
   :class:`~flashmm_dask.stats.products.BlockSums`); for the blocks as stored (cells in
   random donor order) and for the same blocks with their cells sorted by donor.
3. **Reduction vs read pass on a local cluster** (``--workers`` processes x 1 thread,
   wall time and the CPU time of the process tree, best of ``--repeat``, alternated), as
   bench_reduce.py measures it, for the store as simulated (cells in random donor order)
   and for a copy with its cells sorted by donor (written once beside it). Target <= 1.5.

``--store PATH`` measures 2 and 3 on an existing atlas store (read only; 1 is skipped);
``--parts 1`` runs part 1 alone.

The machine line and the 1-minute load are printed beside the figures; ratios are
measured side by side. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    DEFAULT_STORE_DIR,
    load_average,
    local_client,
    machine_line,
    simulation_chunk_cells,
)
from bench_atlas import FIXED, N_DONORS, N_STATES, RANDOM, atlas_store
from bench_reduce import best_passes

GENES = 11_596


def plain_write_seconds(store: Path, path: Path, append_cells: int) -> tuple[float, float]:
    """Wall and CPU seconds (this process, all threads) to write a store of the shape of
    ``store`` through ``append_x`` (Zarr chunks of 10,000 cells) from one chunk of
    ``store`` (its first ``append_cells`` cells) appended until the cell count is
    reached."""
    import anndata as ad
    import zarr

    from flashmm_dask.io.anndata_store import append_x, create_zarr_root
    from flashmm_dask.io.writing import staged

    root = zarr.open_group(str(store), mode="r")
    X = ad.io.sparse_dataset(root["X"])
    n_cells = X.shape[0]
    chunk = X[: min(append_cells, n_cells)]
    repeats, tail = divmod(n_cells, chunk.shape[0])

    def chunks() -> Any:
        for _ in range(repeats):
            yield chunk
        if tail:
            yield chunk[:tail]

    start, cpu = time.perf_counter(), time.process_time()
    with staged(path, overwrite=True) as tmp:
        group = create_zarr_root(tmp)
        append_x(group, chunks(), 10_000)
    return time.perf_counter() - start, time.process_time() - cpu


def block_costs(store: Path, n_blocks: int) -> dict[str, dict[str, float]]:
    """CPU ns per stored value of reading blocks, evaluating their design rows (with the
    shared products) and adding their products into running sums (after one warm-up
    block), as stored and with each block's cells sorted by donor."""
    import dask

    from flashmm_dask.design.formula import build_design
    from flashmm_dask.io.readers import read_expression
    from flashmm_dask.stats.blocks import add_block
    from flashmm_dask.stats.products import BlockSums
    from flashmm_dask.stats.reduce import _design_chunk, _shared_partial

    expr = read_expression(str(store))
    design = build_design(expr.obs, FIXED, RANDOM)
    features = tuple(str(f) for f in expr.features)
    donor = expr.obs["donor"].cat.codes.to_numpy()
    sums = BlockSums(len(design.covariates), len(design.random_names), len(features))
    out: dict[str, dict[str, float]] = {}
    for label in ("random donor order", "grouped by donor"):
        cost = {"read": 0.0, "design": 0.0, "products": 0.0}
        nnz, start = 0, 0
        delayed_blocks = expr.data.to_delayed().ravel()[: n_blocks + 1]
        for k, delayed_block in enumerate(delayed_blocks):
            c0 = time.process_time()
            (block,) = dask.compute(delayed_block, scheduler="sync")
            c1 = time.process_time()
            obs = expr.obs.iloc[start : start + block.shape[0]]
            if label == "grouped by donor":
                order = np.argsort(donor[start : start + block.shape[0]], kind="stable")
                block, obs = block[order], obs.iloc[order]
            c2 = time.process_time()
            XZ = _design_chunk(design, obs, start)
            _shared_partial(XZ)
            c3 = time.process_time()
            add_block(block, XZ, features, start, 0, "log2p1", 1e4, True, "", sums)
            c4 = time.process_time()
            if k or len(delayed_blocks) == 1:  # the first warms caches and compiled kernels
                cost["read"] += c1 - c0
                cost["design"] += c3 - c2
                cost["products"] += c4 - c3
                nnz += int(block.nnz)
            start += block.shape[0]
        out[label] = {key: value / nnz * 1e9 for key, value in cost.items()}
    return out


def simulate_and_write(args: argparse.Namespace, found: dict[str, float]) -> Path:
    """Part 1: simulate the atlas store afresh and write a plain store of its shape; the
    ratios go into ``found``."""
    store = args.store_dir / f"atlas-{args.cells}x{args.genes}-d{args.density:g}.zarr"
    if store.exists():
        shutil.rmtree(store)  # simulate afresh: its time is measured
    # imported before the clock starts: importing the package (dask, anndata, zarr, numba:
    # ~2 s CPU) is not the simulation's time, and the plain write below finds it imported
    importlib.import_module("flashmm_dask.simulate")
    cpu = time.process_time()
    store, sim_s = atlas_store(args.store_dir, args.cells, args.genes, args.density)
    sim_cpu, load_sim = time.process_time() - cpu, load_average()
    plain = args.store_dir / "plain-write.zarr"
    write_s, write_cpu = plain_write_seconds(store, plain, 10_000)
    print(
        f"1. simulate_to_store {sim_s:.1f} s wall, {sim_cpu:.1f} s CPU (load {load_sim}) vs "
        f"plain write of the same shape {write_s:.1f} s wall, {write_cpu:.1f} s CPU (load "
        f"{load_average()}): ratio {sim_s / write_s:.2f} wall, {sim_cpu / write_cpu:.2f} "
        "CPU (target <= 2)",
        flush=True,
    )
    found["simulate / write (wall)"] = sim_s / write_s
    found["simulate / write (CPU)"] = sim_cpu / write_cpu
    chunk = simulation_chunk_cells(args.genes, args.density)
    same_s, same_cpu = plain_write_seconds(store, plain, chunk)
    print(
        f"1. plain write in the simulation's appends ({chunk} cells) {same_s:.1f} s wall, "
        f"{same_cpu:.1f} s CPU (load {load_average()}): simulate / write {sim_s / same_s:.2f} "
        f"wall, {sim_cpu / same_cpu:.2f} CPU",
        flush=True,
    )
    found["simulate / write in its appends (wall)"] = sim_s / same_s
    found["simulate / write in its appends (CPU)"] = sim_cpu / same_cpu
    shutil.rmtree(plain)
    return store


def grouped_copy(store: Path, store_dir: Path) -> Path:
    """A copy of ``store`` with its cells sorted by donor (reused when present)."""
    import anndata as ad

    from flashmm_dask.io.anndata_store import write_store

    path = store_dir / f"{store.stem}-by-donor.zarr"
    if not path.exists():
        adata = ad.read_zarr(store)
        order = np.argsort(adata.obs["donor"].cat.codes.to_numpy(), kind="stable")
        write_store(adata[order].copy(), path)
    return path


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark; also return the ratios printed on the "ratio" lines."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=200_000)
    ap.add_argument("--genes", type=int, default=GENES)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=3, help="blocks profiled in-process")
    ap.add_argument("--store-dir", type=Path, default=DEFAULT_STORE_DIR)
    ap.add_argument("--store", type=Path, help="an existing atlas store: skip part 1")
    ap.add_argument("--parts", default="123", help="the parts to run, e.g. 1 or 23")
    args = ap.parse_args(argv)
    print(machine_line())
    print(
        f"atlas shape: {args.cells} cells x {args.genes} genes, density {args.density}, "
        f"{N_DONORS} donors, {N_STATES} states; model {FIXED} | {RANDOM}, log2p1"
    )
    args.store_dir.mkdir(parents=True, exist_ok=True)
    found: dict[str, float] = {}
    if args.store is not None:
        store = args.store
        print(f"store {store} (part 1 skipped)")
    elif "1" in args.parts:
        store = simulate_and_write(args, found)
    else:  # the store of an earlier run (simulated now when there is none)
        store = atlas_store(args.store_dir, args.cells, args.genes, args.density)[0]
    _reduction_parts(args, store, found)
    for name, value in found.items():
        print(f"ratio {name}: {value:.2f}")
    return found


def _reduction_parts(args: argparse.Namespace, store: Path, found: dict[str, float]) -> None:
    """Parts 2 and 3 (as ``args.parts`` asks) on ``store``; the ratios go into ``found``."""
    if "2" in args.parts:
        _block_part(args, store, found)
    if "3" not in args.parts:
        return
    from flashmm_dask.design.formula import build_design
    from flashmm_dask.io.readers import read_expression

    orders = {"random donor order": store, "grouped by donor": grouped_copy(store, args.store_dir)}
    with local_client(args.workers) as client:
        for label, path in orders.items():
            expr = read_expression(str(path))
            best = best_passes(client, expr, build_design(expr.obs, FIXED, RANDOM), args.repeat)
            read_s, read_cpu = best["read"], best["read_cpu"]
            reduce_s, reduce_cpu = best["reduce"], best["reduce_cpu"]
            print(
                f"3. cluster ({args.workers} workers x 1 thread, best of {args.repeat}), "
                f"{label}: read pass {read_s:.2f} s ({read_cpu:.1f} s CPU), reduction "
                f"{reduce_s:.2f} s ({reduce_cpu:.1f} s CPU), ratio {reduce_s / read_s:.2f} "
                f"wall, {reduce_cpu / read_cpu:.2f} CPU (target <= 1.5); load {load_average()}",
                flush=True,
            )
            found[f"reduce / read on the cluster, {label} (wall)"] = reduce_s / read_s


def _block_part(args: argparse.Namespace, store: Path, found: dict[str, float]) -> None:
    """Part 2: the per-block costs, in both cell orders."""
    per_block = []
    for label, cost in block_costs(store, args.blocks).items():
        ratio = (cost["read"] + cost["design"] + cost["products"]) / cost["read"]
        per_block.append(ratio)
        print(
            f"2. per block, CPU ns per value, {label}: read {cost['read']:.1f}, design "
            f"{cost['design']:.1f}, products into the sums {cost['products']:.1f}; (read + "
            f"design + products) / read {ratio:.2f}; load {load_average()}",
            flush=True,
        )
    # one line for both orders (each is on its "2." line), so the cluster's two fit in five
    found["(read + reduce) / read per block, CPU, the slower cell order"] = max(per_block)


if __name__ == "__main__":
    main()
