"""End to end on a synthetic atlas shaped like FLASH-MM's tuberculosis data set.

Run: ``python benchmarks/bench_atlas.py`` (100k, 250k and 500k cells x 11,596 genes), or
``python benchmarks/bench_atlas.py --sizes 20000 --genes 2000`` for a quick run.

The paper's atlas: 499,713 cells x 11,596 genes, 259 donors, analysed with fixed effects
``~ 0 + log(libsize) + age + sex + state + state:condition`` and random ``~ 0 + donor``
(29 cell states; R FLASHMM took 1.4 hours, lme4 55.6 hours). Here each size is simulated
with the simuRNAseq model (:func:`flashmm_dask.simulate.simulate_to_store`, gene means set
for ~5% non-zeros): 259 donors nested in 2 conditions, 29 cell states; then obs is
rewritten with the paper's names (donor, state, condition) and donor-level age and sex.
The whole pipeline (:func:`flashmm_dask.run.pipeline.run`: reduction, fitting, tests, results
store, tables; plots with ``--plots``) runs on a local cluster, and the script prints the
wall time per phase, the peak resident memory of the process tree (driver + workers,
target <= 4 GiB at 5M cells) and the cost per non-zero of each size (linear in the
non-zeros when the cost per non-zero is flat). ``--nested`` fits random ``~ 0 + donor``
and ``~ 0 + donor:state`` (q = 259 + 7,511; the structured path) instead, into
``atlas-out-<cells>-nested``. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from _common import (
    DEFAULT_STORE_DIR,
    TreeMemory,
    free_disk,
    gib,
    load_average,
    machine_line,
    simulated_store,
    store_size,
)

FIXED = "~ 0 + log(libsize) + age + sex + state + state:condition"
RANDOM = "~ 0 + donor"
#: ``--nested``: donor and donor x state (q = 259 + 7,511), the structured path
NESTED = ["~ 0 + donor", "~ 0 + donor:state"]
N_DONORS = 259
N_STATES = 29
AGE_RANGE = (18, 80)


def atlas_obs(obs: pd.DataFrame, seed: int = 11) -> pd.DataFrame:
    """The simulator's obs with the paper's names and donor-level age and sex.

    sam -> donor, cls -> state (prefixed "S"), trt -> condition; every donor draws an age
    (uniform integer in AGE_RANGE) and a sex (F/M), copied to its cells.
    """
    donors = obs["sam"].cat.categories
    rng = np.random.default_rng(seed)
    age = pd.Series(rng.integers(*AGE_RANGE, len(donors)).astype(float), index=donors)
    sex = pd.Series(rng.choice(["F", "M"], len(donors)), index=donors)
    donor = obs["sam"].astype(str)
    state = obs["cls"].cat.rename_categories(lambda c: f"S{int(c):02d}")
    return pd.DataFrame(
        {
            "donor": obs["sam"],
            "state": state,
            "condition": obs["trt"],
            "libsize": obs["libsize"].to_numpy(),
            "age": age.reindex(donor).to_numpy(),
            "sex": pd.Categorical(sex.reindex(donor).to_numpy(), categories=["F", "M"]),
        },
        index=obs.index,
    )


def atlas_store(
    store_dir: Path, n_cells: int, n_genes: int, density: float, seed: int = 1
) -> tuple[Path, float]:
    """The simulated atlas store of ``n_cells`` cells (reused when present) and the
    seconds it took to write (0 when reused)."""
    import anndata as ad
    import zarr

    path = store_dir / f"atlas-{n_cells}x{n_genes}-d{density:g}.zarr"
    if path.exists() and _has_atlas_obs(path, n_cells, n_genes):
        return path, 0.0
    start = time.perf_counter()
    simulated_store(
        path,
        n_cells,
        n_genes,
        density=density,
        n_samples=N_DONORS,
        n_celltypes=N_STATES,
        seed=seed,
        reuse=False,
    )
    root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    obs = atlas_obs(ad.io.read_elem(root["obs"]))
    del root["obs"]
    ad.io.write_elem(root, "obs", obs)
    zarr.consolidate_metadata(str(path))
    return path, time.perf_counter() - start


def _has_atlas_obs(path: Path, n_cells: int, n_genes: int) -> bool:
    import zarr

    try:
        root = zarr.open_group(str(path), mode="r")
        shape = tuple(root["X"].attrs["shape"])
        return shape == (n_cells, n_genes) and "donor" in root["obs"]
    except (KeyError, ValueError, OSError):
        return False


def contrasts_for(store: Path, random: str | list[str] = RANDOM) -> dict[str, str]:
    """Two contrasts named as R would: condition B vs A in the first state, and its
    difference between the second and the first state."""
    from flashmm_dask.design.formula import build_design
    from flashmm_dask.io.readers import read_obs

    design = build_design(read_obs(str(store)), FIXED, random)
    inter = [c for c in design.covariates if ":" in c]
    return {"cond_in_first": inter[0], "cond_second_vs_first": f"{inter[1]} - {inter[0]}"}


def run_pipeline(
    store: Path,
    output: Path,
    overrides: tuple[str, ...] = (),
    plots: bool = False,
    client: Any = None,
    random: str | list[str] = RANDOM,
) -> tuple[Any, int, float]:
    """Run the pipeline on ``store`` into a fresh ``output``; (summary, peak bytes, wall s).

    With ``client`` None the pipeline opens (and closes) the local cluster its config
    describes, and the wall time includes starting it.
    """
    from flashmm_dask.run.config import load_config
    from flashmm_dask.run.pipeline import run

    if output.exists():
        shutil.rmtree(output)
    contrasts = contrasts_for(store, random)
    cfg = load_config(
        None,
        (
            f"data.path={store}",
            f"model.fixed={FIXED}",
            f"model.random={random}",
            "contrasts=" + "{" + ", ".join(f"{k}: '{v}'" for k, v in contrasts.items()) + "}",
            f"output.path={output}",
            f"output.plots={str(plots).lower()}",
            "progress=false",
            *overrides,
        ),
    )
    with TreeMemory() as mem:
        start = time.perf_counter()
        summary = run(cfg, client=client, show_progress=False)
        wall = time.perf_counter() - start
    return summary, mem.peak, wall


def stored_nnz(store: Path) -> int:
    import zarr

    return int(zarr.open_group(str(store), mode="r")["X/indptr"][-1])


def main(argv: list[str] | None = None) -> list[tuple[Any, ...]]:
    """Run the benchmark; also return, per size, (cells, non-zeros, wall s, peak bytes,
    timings, RunSummary, load)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,250000,500000", help="comma-separated cells")
    ap.add_argument("--genes", type=int, default=11_596)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--plots", action="store_true", help="also draw the report plots")
    ap.add_argument(
        "--nested",
        action="store_true",
        help=f"random effects {NESTED} (the structured path) instead of {RANDOM!r}",
    )
    ap.add_argument("--store-dir", type=Path, default=DEFAULT_STORE_DIR)
    ap.add_argument(
        "--compare-defaults",
        action="store_true",
        help="also fit the same statistics with R FLASHMM's settings (model.df residual, "
        "model.nonnegative false) and print both fitting phases",
    )
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    print(machine_line())
    random = NESTED if args.nested else RANDOM
    suffix = "-nested" if args.nested else ""
    print(f"model: {FIXED} | {random}; {args.workers} workers x 1 thread")
    print(f"free disk in {args.store_dir}: {gib(free_disk(args.store_dir))}")
    rows = []
    for n_cells in sizes:
        store, write_s = atlas_store(args.store_dir, n_cells, args.genes, args.density)
        nnz = stored_nnz(store)
        print(
            f"store {store.name}: {nnz:,} non-zeros (density {nnz / (n_cells * args.genes):.4f}),"
            f" {gib(store_size(store))} on disk, written in {write_s:.0f} s (0: reused)",
            flush=True,
        )
        summary, peak, wall = run_pipeline(
            store,
            args.store_dir / f"atlas-out-{n_cells}{suffix}",
            (f"cluster.n_workers={args.workers}",),
            plots=args.plots,
            random=random,
        )
        timings = summary.timings
        rows.append((n_cells, nnz, wall, peak, timings, summary, load_average()))
        if args.compare_defaults:
            old, _, _ = run_pipeline(
                store,
                args.store_dir / f"atlas-out-{n_cells}{suffix}-r",
                (
                    f"cluster.n_workers={args.workers}",
                    f"stats.load={args.store_dir / f'atlas-out-{n_cells}{suffix}' / 'stats.zarr'}",
                    "model.df=residual",
                    "model.nonnegative=false",
                ),
                random=random,
            )
            new_s, old_s = timings["fitting"], old.timings["fitting"]
            print(
                f"{n_cells} cells: fitting phase, run defaults (satterthwaite, nonnegative) "
                f"{new_s:.2f} s vs R FLASHMM's settings (residual, unconstrained) {old_s:.2f} "
                f"s: ratio {new_s / old_s:.2f} (target <= 1.5); load {load_average()}",
                flush=True,
            )
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
        print(
            f"{n_cells} cells: wall {wall:.1f} s ({phases}); peak memory {gib(peak)}; "
            f"{summary.n_converged}/{summary.n_features} converged; load {rows[-1][-1]}",
            flush=True,
        )
    print(
        f"{'cells':>8}{'non-zeros':>14}{'wall s':>9}{'stats s':>9}{'fit s':>8}"
        f"{'ns/nnz':>10}{'stats ns/nnz':>14}{'peak':>11}  load"
    )
    for n_cells, nnz, wall, peak, timings, _, load in rows:
        stats_s, fit_s = timings.get("statistics", np.nan), timings.get("fitting", np.nan)
        print(
            f"{n_cells:>8}{nnz:>14,}{wall:>9.1f}{stats_s:>9.1f}{fit_s:>8.1f}"
            f"{wall / nnz * 1e9:>10.1f}{stats_s / nnz * 1e9:>14.1f}{gib(peak):>11}  {load}"
        )
    for prev, cur in itertools.pairwise(rows):
        d_nnz = cur[1] - prev[1]
        d_stats = cur[4]["statistics"] - prev[4]["statistics"]
        d_wall = cur[2] - prev[2]
        print(
            f"marginal cost {prev[0]} -> {cur[0]} cells: statistics "
            f"{d_stats / d_nnz * 1e9:.1f} ns per non-zero, whole run {d_wall / d_nnz * 1e9:.1f}"
        )
    first = rows[0]
    for n_cells, nnz, wall, peak, timings, _, _ in rows:
        print(
            f"ratio cost per non-zero ({n_cells} cells / {first[0]} cells): statistics "
            f"{(timings['statistics'] / nnz) / (first[4]['statistics'] / first[1]):.2f}, "
            f"whole run {(wall / nnz) / (first[2] / first[1]):.2f} (1.00 = linear, fixed "
            f"costs make it < 1); fit / statistics "
            f"{timings['fitting'] / timings['statistics']:.2f}; peak {gib(peak)} "
            "(target <= 4 GiB at 5M cells)"
        )
    return rows


if __name__ == "__main__":
    main()
