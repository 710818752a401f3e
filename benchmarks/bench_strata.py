"""One model per cell state (``model.by: state``) vs the joint model, on the TB-shaped atlas.

Run: ``python benchmarks/bench_strata.py [--cells 200000] [--genes 11596] [--repeats 2]``.

The atlas of :mod:`bench_atlas` (259 donors nested in 2 conditions, 29 cell states,
donor-level age and sex, ~5% non-zeros). Two runs of the whole pipeline
(:func:`flashmm_dask.run.pipeline.run`: statistics, fitting, tests, results store, tables; no
plots) on the same local cluster (the one a run opens: ``run.cluster.open_client``),
alternated ``--repeats`` times (best of each reported):

- joint: ``~ 0 + log(libsize) + age + sex + state + state:condition``, random ``~ 0 + donor``
  (p = 61, q = 259), the two contrasts of bench_atlas;
- strata: ``model.by: state`` with ``~ log(libsize) + age + sex + condition``, random
  ``~ 0 + donor`` (29 models, p = 5, q = 259 each), contrast ``condition: conditionB``.

Prints the wall time and the phases of each, the ratio strata / joint (target <= 1.3), the
peak memory of the process tree and the load. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import time

from _common import (
    DEFAULT_STORE_DIR,
    TreeMemory,
    gib,
    load_average,
    local_client,
    machine_line,
)
from bench_atlas import FIXED, RANDOM, atlas_store, contrasts_for, stored_nnz

STRATA_FIXED = "~ log(libsize) + age + sex + condition"


def run_once(store, output, overrides, client):
    import shutil

    from flashmm_dask.run.config import load_config
    from flashmm_dask.run.pipeline import run

    if output.exists():
        shutil.rmtree(output)
    cfg = load_config(None, (f"data.path={store}", f"output.path={output}", *overrides))
    with TreeMemory() as mem:
        start = time.perf_counter()
        summary = run(cfg, client=client, show_progress=False)
        wall = time.perf_counter() - start
    return summary, wall, mem.peak


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=200_000)
    ap.add_argument("--genes", type=int, default=11_596)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--store-dir", type=type(DEFAULT_STORE_DIR), default=DEFAULT_STORE_DIR)
    args = ap.parse_args(argv)

    print(machine_line())
    store, write_s = atlas_store(args.store_dir, args.cells, args.genes, args.density)
    print(f"store {store.name}: {stored_nnz(store):,} non-zeros, written in {write_s:.0f} s")
    joint_contrasts = contrasts_for(store)
    common = ("output.plots=false", "progress=false", "output.tables=[csv]")
    runs = {
        "joint": (
            f"model.fixed={FIXED}",
            f"model.random={RANDOM}",
            "contrasts={" + ", ".join(f"{k}: '{v}'" for k, v in joint_contrasts.items()) + "}",
            *common,
        ),
        "strata": (
            f"model.fixed={STRATA_FIXED}",
            f"model.random={RANDOM}",
            "model.by=state",
            "contrasts={condition: conditionB}",
            *common,
        ),
    }
    best: dict[str, tuple[float, dict, int, str]] = {}
    # the local cluster a run opens (run.cluster.open_client: its workers' malloc settings
    # included), as the other benchmarks use it
    with local_client(args.workers) as client:
        for repeat in range(args.repeats):
            for name, overrides in runs.items():
                output = args.store_dir / f"strata-bench-{name}"
                summary, wall, peak = run_once(store, output, overrides, client)
                load = load_average()
                phases = ", ".join(f"{k} {v:.1f} s" for k, v in summary.timings.items())
                print(
                    f"[{repeat}] {name}: wall {wall:.1f} s ({phases}); peak {gib(peak)}; "
                    f"load {load}",
                    flush=True,
                )
                if name not in best or wall < best[name][0]:
                    best[name] = (wall, dict(summary.timings), peak, load)
    print(f"{'run':>8}{'wall s':>9}{'stats s':>9}{'fit s':>8}{'final s':>9}{'tables s':>10}  peak")
    for name, (wall, t, peak, load) in best.items():
        print(
            f"{name:>8}{wall:>9.1f}{t.get('statistics', 0):>9.1f}{t.get('fitting', 0):>8.1f}"
            f"{t.get('finalize', 0):>9.1f}{t.get('tables', 0):>10.1f}  {gib(peak)}  load {load}"
        )
    ratio = best["strata"][0] / best["joint"][0]
    print(f"strata / joint wall time (best of {args.repeats}): {ratio:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
