"""Structured random effects (K >= 2 with a diagonal Z_k'Z_k): structured vs dense vs K=1.

Run: ``python benchmarks/bench_structured.py [--cells 200000] [--features 100] [--sections
1,3]``. Prints, side by side in one run (with the 1-minute load), the sections asked for
(all by default):

1. the nested donor + donor:state fit (259 + 7,511 columns, atlas-shaped) against the
   donor-only K=1 fit of the same features;
2. structured vs dense vs K=1 on the same features of a smaller nested design;
3. lme4's InstEval (rows 1-10000, ``y ~ 1 + (1|s) + (1|d)``, q = 377 + 1,035) against lmer
   (``benchmarks/insteval_lmer.R``; skipped when Rscript is not installed);
4. bench_fit's K=2 case (p=21, q=25+25) against R FLASHMM's rate;
5. K=1 on statistics shaped like R FLASHMM's case (simuRNAseq counts, p=21, q=25) and on
   bench_fit's, against R FLASHMM's rate.

Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import gzip
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from flashmm_dask import lmm
from flashmm_dask.numerics.fisher import fit_theta, prepare
from flashmm_dask.numerics.fixed import fixed_effects

HERE = Path(__file__).parent
R_FEATURES_PER_S = 1000 / 1.33  # R FLASHMM 1.3.0's lmm, p=21, q=25 (RESULTS.md)


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def best(fn, repeat=3, clock=time.perf_counter):
    t = np.inf
    out = None
    for _ in range(repeat):
        t0 = clock()
        out = fn()
        t = min(t, clock() - t0)
    return t, out


def best_cpu(fn, repeat=3):
    """Best CPU time of the process (all threads): less disturbed by a loaded machine."""
    return best(fn, repeat, clock=time.process_time)


def group_stats(codes_list, X, Y):
    """ZZ, ZX, ZY of indicator components (codes per cell) without forming Z."""
    sizes = [int(c.max()) + 1 for c in codes_list]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    q = int(offsets[-1])
    ZZ = np.zeros((q, q))
    for i, ci in enumerate(codes_list):
        for j, cj in enumerate(codes_list):
            block = np.zeros((sizes[i], sizes[j]))
            np.add.at(block, (ci, cj), 1.0)
            ZZ[offsets[i] : offsets[i + 1], offsets[j] : offsets[j + 1]] = block
    ZX = np.vstack(
        [
            np.stack([np.bincount(c, X[:, k], s) for k in range(X.shape[1])], 1)
            for c, s in zip(codes_list, sizes, strict=True)
        ]
    )
    ZY = np.vstack(
        [
            np.stack([np.bincount(c, Y[:, k], s) for k in range(Y.shape[1])], 1)
            for c, s in zip(codes_list, sizes, strict=True)
        ]
    )
    return ZZ, ZX, ZY, sizes


def nested_stats(n, donors, states, m, seed=0):
    rng = np.random.default_rng(seed)
    donor = rng.integers(0, donors, n)
    state = rng.integers(0, states, n)
    X = np.column_stack([np.log(rng.integers(500, 5000, n)), np.eye(states)[state]])
    b1 = rng.normal(0, 0.3, (donors, m))
    b2 = rng.normal(0, 0.2, (donors * states, m))
    Y = X @ rng.normal(0, 0.5, (X.shape[1], m)) + b1[donor] + b2[donor * states + state]
    Y += rng.normal(0, 1, (n, m))
    ZZ, ZX, ZY, d = group_stats([donor, donor * states + state], X, Y)
    return dict(XX=X.T @ X, XY=X.T @ Y, ZX=ZX, ZY=ZY, ZZ=ZZ, Ynorm=np.sum(Y**2, 0), n=n, d=d)


def donor_only(st):
    q1 = st["d"][0]
    return dict(st, ZX=st["ZX"][:q1], ZY=st["ZY"][:q1], ZZ=st["ZZ"][:q1, :q1], d=[q1])


def fit_path(st, structured):
    sh = prepare(st["XX"], st["ZX"], st["ZZ"], st["n"], st["d"], "REML", structured=structured)
    XY, ZY = st["XY"].T.copy(), st["ZY"].T.copy()
    zry, yry = sh.residualise(XY, ZY, st["Ynorm"])
    th = fit_theta(sh, zry, yry)
    fixed_effects(sh, XY, ZY, th.theta, th.logdetM0)
    return th


def best_alternating(fns, repeat):
    """Best wall and CPU seconds of each function, run in turn ``repeat`` times (a load
    that comes and goes then touches both sides alike), and the last outputs."""
    wall = [np.inf] * len(fns)
    cpu = [np.inf] * len(fns)
    out = [None] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0, c0 = time.perf_counter(), time.process_time()
            out[i] = fn()
            wall[i] = min(wall[i], time.perf_counter() - t0)
            cpu[i] = min(cpu[i], time.process_time() - c0)
    return wall, cpu, out


def section_nested(cells, m, donors=259, states=29, repeat=7):
    print(f"\n[1] nested donor + donor:state, {cells} cells, {m} features (load {load()})")
    st = nested_stats(cells, donors, states, m)
    k1 = donor_only(st)
    lmm(**k1), lmm(**st)  # compiled kernels loaded
    (t1, t2), (c1, c2), (f1, f2) = best_alternating([lambda: lmm(**k1), lambda: lmm(**st)], repeat)
    q = sum(st["d"])
    print(
        f"  K=1 donor (q={donors}):          {t1:8.3f} s (CPU {c1:.3f} s)  mean niter "
        f"{f1.niter.mean():.1f}"
    )
    print(
        f"  K=2 nested (q={q}), structured: {t2:8.3f} s (CPU {c2:.3f} s)  mean niter "
        f"{f2.niter.mean():.1f}"
    )
    print(
        f"ratio nested / donor-only (q={q}, p={st['XX'].shape[0]}): {t2 / t1:.1f} x wall, "
        f"{c2 / c1:.1f} x CPU (best of {repeat} in turn; load {load()})"
    )


def section_paths(m, donors=40, states=10):
    print(
        f"\n[2] structured vs dense vs K=1, nested {donors} donors x {states} states, {m} "
        f"features (load {load()})"
    )
    st = nested_stats(1000 * donors, donors, states, m, seed=1)
    q = sum(st["d"])
    k1 = donor_only(st)
    t_k1, _ = best(lambda: lmm(**k1))
    t_s, th_s = best(lambda: fit_path(st, True))
    t_d, th_d = best(lambda: fit_path(st, False), repeat=1)
    err = np.max(np.abs(th_s.theta - th_d.theta) / np.abs(th_d.theta))
    print(f"  K=1 donor (q={donors}):      {t_k1:8.3f} s")
    print(f"  K=2 structured (q={q}): {t_s:8.3f} s")
    print(f"  K=2 dense (q={q}):      {t_d:8.3f} s   max rel diff of theta {err:.1e}")
    print(
        f"ratio dense / structured (q={q}): {t_d / t_s:.1f} x; structured / K=1: "
        f"{t_s / t_k1:.1f} x (load {load()})"
    )


def insteval_stats(m):
    with gzip.open(HERE / "data" / "insteval_10000.csv.gz", "rt") as fh:
        data = np.loadtxt(fh, delimiter=",", skiprows=1, dtype=np.int64)
    s, d, y = data[:, 0] - 1, data[:, 1] - 1, data[:, 2].astype(np.float64)
    rng = np.random.default_rng(0)
    Y = np.column_stack([y] + [rng.permutation(y) for _ in range(m - 1)])
    X = np.ones((y.size, 1))
    ZZ, ZX, ZY, sizes = group_stats([s, d], X, Y)
    return dict(
        XX=X.T @ X, XY=X.T @ Y, ZX=ZX, ZY=ZY, ZZ=ZZ, Ynorm=np.sum(Y**2, 0), n=y.size, d=sizes
    )


def lmer_seconds(repeats):
    """Best wall and CPU seconds of lmer per fit, and R's output (None where no Rscript)."""
    if shutil.which("Rscript") is None:
        return None, None, ""
    out = subprocess.run(
        ["Rscript", str(HERE / "insteval_lmer.R"), "time", str(repeats)],
        capture_output=True,
        text=True,
        check=True,
        cwd=HERE.parent,
    ).stdout
    wall = re.search(r"lmer seconds per fit: (.*)", out)
    cpu = re.search(r"lmer cpu seconds per fit: (.*)", out)
    assert wall is not None and cpu is not None, out
    return (
        min(float(x) for x in wall.group(1).split()),
        min(float(x) for x in cpu.group(1).split()),
        out,
    )


def section_insteval(m, lmer_repeats):
    print(f"\n[3] InstEval rows 1-10000, y ~ 1 + (1|s) + (1|d), q = 377 + 1035 (load {load()})")
    st = insteval_stats(m)
    one = dict(st, XY=st["XY"][:, :1], ZY=st["ZY"][:, :1], Ynorm=st["Ynorm"][:1])
    t_one, fit1 = best(lambda: lmm(**one))
    c_one, _ = best_cpu(lambda: lmm(**one))
    t_m, fit_m = best(lambda: lmm(**st))
    print(
        f"  flashmm_dask, y alone:      {t_one:8.3f} s (CPU {c_one:.3f} s)  niter "
        f"{int(fit1.niter[0])}  theta (s, d, residual) "
        f"{np.array2string(fit1.theta[:, 0], precision=10)}"
    )
    print(
        f"  flashmm_dask, {m} responses: {t_m:8.3f} s  ({t_m / m:.4f} s per response; "
        f"niter {np.mean(fit_m.niter):.1f} per response, max {int(np.max(fit_m.niter))})"
    )
    t_lmer, c_lmer, out = lmer_seconds(lmer_repeats)
    if t_lmer is None or c_lmer is None:
        print("  lmer: Rscript not installed")
        return
    print("  lmer (best of the runs): " + out.strip().replace("\n", "\n    "))
    print(
        f"ratio lmer / flashmm_dask per response: {t_lmer / t_one:.1f} x (y alone), "
        f"{t_lmer / (t_m / m):.1f} x ({m} responses); CPU time, y alone: "
        f"{c_lmer / c_one:.1f} x (load {load()})"
    )


def section_k2(m, cells):
    import bench_fit

    print(
        f"\n[4] bench_fit K=2 (p=21, q=25+25, subject + subject x slope), {m} features "
        f"(load {load()})"
    )
    st = bench_fit.summary_stats(cells, 21, (25, 25), m)
    sh = prepare(st["XX"], st["ZX"], st["ZZ"], st["n"], st["d"], "REML")
    t_auto, _ = best(lambda: lmm(**st))
    t_d, _ = best(lambda: fit_path(st, False))
    # (the structured path, one feature at a time in NumPy, is far slower at this q)
    for name, t in ((f"lmm (auto: {sh.path})", t_auto), ("dense", t_d)):
        print(f"  {name:<24}{m / t:10.0f} features/s")
        print(f"ratio to R FLASHMM (K=2 q=50, {name}): {m / t / R_FEATURES_PER_S:.1f} x")


def r_shaped_stats(m, cells):
    """Statistics shaped like R FLASHMM's case: simuRNAseq counts, log2(1 + counts),
    ``~ 0 + log(libsize) + cls + cls:trt`` (p = 21), ``~ 0 + sam`` (q = 25)."""
    import flashmm_dask as fm

    data = fm.simulate_rnaseq(m, cells, n_samples=25, n_celltypes=10, n_treatments=2, seed=1)
    design = fm.build_design(data.obs, "~ 0 + log(libsize) + cls + cls:trt", "~ 0 + sam")
    X, Z = design.X(data.obs), design.Z(data.obs)
    Y = data.X.toarray() if hasattr(data.X, "toarray") else np.asarray(data.X)
    Y = np.log2(1.0 + Y)
    return dict(
        XX=X.T @ X,
        XY=X.T @ Y,
        ZX=np.asarray(Z.T @ X),
        ZY=np.asarray(Z.T @ Y),
        ZZ=np.asarray((Z.T @ Z).todense()) if hasattr(Z, "todense") else Z.T @ Z,
        Ynorm=np.sum(Y**2, 0),
        n=cells,
        d=[Z.shape[1]],
    )


def section_r_case(m, cells):
    import bench_fit

    print(
        f"\n[5] K=1, p=21, q=25, {m} features: R-shaped statistics vs bench_fit's (load {load()})"
    )
    for name, st in (
        ("R-shaped (simuRNAseq)", r_shaped_stats(m, cells)),
        ("bench_fit", bench_fit.summary_stats(cells, 21, (25,), m)),
    ):
        t, fit = best(lambda st=st: lmm(**st), repeat=5)
        print(f"  {name:<24}{m / t:10.0f} features/s  mean niter {np.nanmean(fit.niter):.1f}")
        print(
            f"ratio to R FLASHMM (K=1 q=25, {name}): {m / t / R_FEATURES_PER_S:.1f} x "
            f"(load {load()})"
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=200000)
    ap.add_argument("--features", type=int, default=100)
    ap.add_argument("--donors", type=int, default=259)
    ap.add_argument("--states", type=int, default=29)
    ap.add_argument("--responses", type=int, default=20, help="InstEval responses")
    ap.add_argument("--lmer-repeats", type=int, default=3)
    ap.add_argument("--k2-features", type=int, default=2000)
    ap.add_argument("--k2-cells", type=int, default=20000)
    ap.add_argument("--r-features", type=int, default=2000)
    ap.add_argument("--r-cells", type=int, default=20000)
    ap.add_argument(
        "--sections", default="1,2,3,4,5", help="the sections to run, comma-separated (1-5)"
    )
    args = ap.parse_args(argv)
    sections = {int(x) for x in args.sections.split(",")}
    if 1 in sections:
        section_nested(args.cells, args.features, args.donors, args.states)
    if 2 in sections:
        section_paths(args.features, max(2, args.donors // 6), max(2, args.states // 3))
    if 3 in sections:
        section_insteval(args.responses, args.lmer_repeats)
    if 4 in sections:
        section_k2(args.k2_features, args.k2_cells)
    if 5 in sections:
        section_r_case(args.r_features, args.r_cells)


if __name__ == "__main__":
    main()
