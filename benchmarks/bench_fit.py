"""Fit throughput of lmm: the K=1 spectral path, the general path and a one-feature loop.

Run: ``python benchmarks/bench_fit.py [--features 5000] [--defaults-only]``. Prints features
per second and the ratio to R FLASHMM 1.3.0's ``lmm`` (1000 features with p=21, q=25 in
1.33 s on this machine type, i.e. 752 features/s), then the fitting phase of a run with the
old defaults (residual df, unconstrained) and the new ones (Satterthwaite, nonnegative).
``--baseline DIR`` instead times ``lmm`` of another checkout (DIR holds its
``flashmm_dask``) against this one in the same process, alternating, best of ``--repeat``,
with the 1-minute load. Not a test: it asserts nothing. statsmodels' MixedLM on the
cell-level data (the Python peer) is compared in ``bench_peer.py``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import numpy as np

from flashmm_dask import lmm
from flashmm_dask.numerics.fisher import fit_theta, prepare
from flashmm_dask.numerics.fixed import fixed_effects

R_FEATURES_PER_S = 1000 / 1.33
LOOP = 200  # features fitted by the one-at-a-time loop


def summary_stats(n, p, d, m, seed=0, block=250, no_subject=0.0):
    """Summary statistics of simulated cells: p-1 cell-type dummies + log libsize in X,
    subject indicators (and subject x time slopes for K=2) in Z, features with random
    subject effects (none for a fraction ``no_subject`` of them)."""
    rng = np.random.default_rng(seed)
    n_subj = d[0]
    subject = rng.integers(0, n_subj, n)
    cell_type = rng.integers(0, p - 1, n)
    X = np.column_stack([np.log(rng.integers(500, 5000, n)), np.eye(p - 1)[cell_type]])
    Z = np.eye(n_subj)[subject]
    if len(d) == 2:
        Z = np.column_stack([Z, Z * rng.uniform(1, 3, n)[:, None]])
    XY = np.empty((p, m))
    ZY = np.empty((Z.shape[1], m))
    Ynorm = np.empty(m)
    for s in range(0, m, block):
        k = min(block, m - s)
        b = rng.normal(0, 0.3, (n_subj, k))
        b[:, : round(no_subject * k)] = 0.0
        Y = X @ rng.normal(0, 0.5, (p, k)) + b[subject] + rng.normal(0, 1, (n, k))
        XY[:, s : s + k], ZY[:, s : s + k] = X.T @ Y, Z.T @ Y
        Ynorm[s : s + k] = np.einsum("ij,ij->j", Y, Y)
    return dict(XX=X.T @ X, XY=XY, ZX=Z.T @ X, ZY=ZY, ZZ=Z.T @ Z, Ynorm=Ynorm, n=n, d=list(d))


def rate(fn, m, repeat=3):
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return m / best, best


def general_path(st):
    """lmm with the spectral path switched off (the batched general-K algebra)."""
    sh = prepare(st["XX"], st["ZX"], st["ZZ"], st["n"], st["d"], "REML")
    XY, ZY = st["XY"].T.copy(), st["ZY"].T.copy()
    zry, yry = sh.residualise(XY, ZY, st["Ynorm"])
    th = fit_theta(sh, zry, yry, spectral=False)
    fixed_effects(sh, XY, ZY, th.theta, th.logdetM0, spectral=False)


def one_at_a_time(st, m_loop):
    for j in range(m_loop):
        lmm(
            st["XX"],
            st["XY"][:, [j]],
            st["ZX"],
            st["ZY"][:, [j]],
            st["ZZ"],
            st["Ynorm"][[j]],
            st["n"],
            st["d"],
        )


def run_defaults(m, cells, repeat=3):
    """The fitting phase of a run (the worker's block_arrays, one contrast) with the old
    defaults (residual df, unconstrained) and the new ones (Satterthwaite df, variances
    >= 0), side by side on the same features, a third of them without subject variance."""
    from flashmm_dask.run.worker import SharedModel, block_arrays

    print(f"\nrun defaults, m = {m} features (a third without subject variance), one thread")
    print(f"{'case':<18}{'residual+free s':>16}{'satt.+nonneg s':>16}{'ratio':>8}{'boundary':>10}")
    for label, p, d in (("p=21 q=25 K=1", 21, (25,)), ("p=60 q=259 K=1", 60, (259,))):
        st = summary_stats(cells, p, d, m, no_subject=1 / 3)
        L = np.zeros((p, 1))
        L[1, 0], L[2, 0] = 1.0, -1.0
        base = dict(XX=st["XX"], ZX=st["ZX"], ZZ=st["ZZ"], n=st["n"], d=tuple(d))
        common = dict(method="REML", max_iter=50, epsilon=1e-5, L=L, alternative="two.sided")
        old = SharedModel(**base, **common, store_cov=True, store="", df="residual")
        new = SharedModel(
            **base, **common, store_cov=True, store="", df="satterthwaite", nonnegative=True
        )
        times = {"old": np.inf, "new": np.inf}
        for _ in range(repeat):  # interleaved, so that both see the same load
            for key, model in (("old", old), ("new", new)):
                t0 = time.perf_counter()
                out = block_arrays(model, st["XY"], st["ZY"], st["Ynorm"])
                times[key] = min(times[key], time.perf_counter() - t0)
        n_boundary = int(np.sum(out["status"] == 5))
        ratio = times["new"] / times["old"]
        print(f"{label:<18}{times['old']:>16.3f}{times['new']:>16.3f}{ratio:>8.2f}{n_boundary:>10}")


def load() -> str:
    """The 1-minute load average."""
    return f"{os.getloadavg()[0]:.2f}"


def _package_modules() -> dict[str, object]:
    return {k: v for k, v in sys.modules.items() if k.split(".")[0] == "flashmm_dask"}


def baseline_lmm(path: str):
    """``lmm`` of the checkout at ``path``, imported beside this one: its modules are kept
    apart from sys.modules and put back in place around each call (lazy imports inside
    the package then find their own tree)."""
    ours = _package_modules()
    for k in ours:
        del sys.modules[k]
    sys.path.insert(0, os.path.abspath(path))
    try:
        base = importlib.import_module("flashmm_dask").lmm
        theirs = _package_modules()
    finally:
        sys.path.pop(0)
        for k in _package_modules():
            del sys.modules[k]
        sys.modules.update(ours)

    def call(**kwargs):
        sys.modules.update(theirs)
        try:
            return base(**kwargs)
        finally:
            sys.modules.update(ours)

    return call


def compare(path: str, m: int, cells: int, repeat: int) -> None:
    """This checkout's ``lmm`` against the one at ``path``, alternating, best of ``repeat``
    (wall and CPU time of the process: on a loaded machine the CPU time is the steadier);
    "x R" is against R FLASHMM's rate at p=21, q=25 (none at q=259)."""
    import bench_structured

    other = baseline_lmm(path)
    cases = [
        ("bench_fit p=21 q=25", summary_stats(cells, 21, (25,), m)),
        ("R-shaped p=21 q=25", bench_structured.r_shaped_stats(m, cells)),
        ("bench_fit p=60 q=259", summary_stats(cells, 60, (259,), m)),
        ("bench_fit K=2 q=25+25", summary_stats(cells, 21, (25, 25), m)),
    ]
    print(f"m = {m} features, best of {repeat}, alternating; baseline {path}")
    print(
        f"{'case':<22}{'baseline ms':>12}{'this ms':>9}{'ratio':>7}{'cpu ms':>15}{'ratio':>7}"
        f"{'x R':>13}  load"
    )
    for label, st in cases:
        a, b = other(**st), lmm(**st)  # compile and warm both
        for name in ("coef", "se", "p", "theta", "cov"):
            x, y = getattr(a, name), getattr(b, name)
            diff = np.nanmax(np.abs(x - y) / (1 + np.abs(x)))
            if diff > 1e-9:
                print(f"  {label}: {name} differs by {diff:.1e}")
        wall = {"baseline": np.inf, "this": np.inf}
        cpu = dict(wall)
        loads = []
        for _ in range(repeat):
            for key, fn in (("baseline", other), ("this", lmm)):
                t0, c0 = time.perf_counter(), time.process_time()
                fn(**st)
                wall[key] = min(wall[key], time.perf_counter() - t0)
                cpu[key] = min(cpu[key], time.process_time() - c0)
            loads.append(os.getloadavg()[0])
        xr = "" if "q=259" in label else f"{m / wall['baseline'] / R_FEATURES_PER_S:.0f} / "
        xr += "" if "q=259" in label else f"{m / wall['this'] / R_FEATURES_PER_S:.0f}"
        print(
            f"{label:<22}{wall['baseline'] * 1e3:>12.2f}{wall['this'] * 1e3:>9.2f}"
            f"{wall['baseline'] / wall['this']:>7.2f}"
            f"{cpu['baseline'] * 1e3:>8.1f} /{cpu['this'] * 1e3:>5.1f}"
            f"{cpu['baseline'] / cpu['this']:>7.2f}{xr:>13}  {min(loads):.2f}-{max(loads):.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=5000)
    ap.add_argument("--cells", type=int, default=20000)
    ap.add_argument("--loop", type=int, default=LOOP, help="features of the one-at-a-time loop")
    ap.add_argument("--defaults-only", action="store_true", help="only the run-defaults comparison")
    ap.add_argument("--baseline", help="a checkout whose lmm to time against this one")
    ap.add_argument("--repeat", type=int, default=21, help="rounds of --baseline")
    args = ap.parse_args(argv)
    if args.baseline:
        compare(args.baseline, args.features, args.cells, args.repeat)
        return
    if args.defaults_only:
        run_defaults(args.features, args.cells)
        return
    loop = min(args.loop, args.features)
    m = args.features
    print(f"m = {m} features; R FLASHMM 1.3.0 reference: {R_FEATURES_PER_S:.0f} features/s")
    print(f"{'case':<28}{'path':<18}{'features/s':>12}{'seconds':>10}{'x R':>8}")
    ratios = []
    for label, p, d in (
        ("p=21 q=25 K=1", 21, (25,)),
        ("p=60 q=259 K=1", 60, (259,)),
        ("p=21 q=50 K=2", 21, (25, 25)),
    ):
        st = summary_stats(args.cells, p, d, m)
        rows = []
        if len(d) == 1:
            rows.append(("spectral (auto)", *rate(lambda st=st: lmm(**st), m)))
        else:
            rows.append(("general (auto)", *rate(lambda st=st: lmm(**st), m)))
        if len(d) == 1 and d[0] <= 50:
            rows.append(("general", *rate(lambda st=st: general_path(st), m)))
        rows.append(("one-at-a-time", *rate(lambda st=st: one_at_a_time(st, loop), loop, 1)))
        for path, fps, sec in rows:
            print(f"{label:<28}{path:<18}{fps:>12.0f}{sec:>10.3f}{fps / R_FEATURES_PER_S:>8.1f}")
            ratios.append(f"ratio to R FLASHMM ({label}, {path}): {fps / R_FEATURES_PER_S:.1f} x")
    print("\n".join(ratios))
    run_defaults(m, args.cells)


if __name__ == "__main__":
    main()
