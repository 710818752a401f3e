"""The Python peer: statsmodels' MixedLM on cell-level data against flashmm-dask's lmm.

Run: ``python benchmarks/bench_peer.py [--cells 20000 --features 3]``. For each case
(p=21/q=25 and p=60/q=259 with one variance component, p=21/q=50 with two: subject
intercepts and subject slopes on a cell covariate) it simulates cells, fits the first
``--features`` features with ``statsmodels.MixedLM`` (REML, the cell-level data in memory:
what a Python user would pick instead) and with :func:`flashmm_dask.model.lmm` from the summary
statistics, compares the estimates (max relative difference of coef and theta over the
features MixedLM converged on), and prints

- MixedLM's features/s (one model per feature);
- lmm's features/s from summary statistics (``--fit-features`` features, best of 3);
- lmm's features/s including the statistics computed from the same cell-level data
  (X'Y, Z'Y, colsums(Y^2): dense products, the in-memory equivalent of the reduction);

and the speed-up over MixedLM. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from flashmm_dask import lmm

CASES = (
    ("p=21 q=25 K=1", 21, (25,)),
    ("p=60 q=259 K=1", 60, (259,)),
    ("p=21 q=50 K=2", 21, (25, 25)),
)


def simulate_cells(n: int, p: int, d: tuple[int, ...], m: int, seed: int = 0) -> dict:
    """Cell-level data: X (n, p) = [log libsize, cell-type dummies], subject of each cell,
    slope covariate u, Z (n, q) = [subject indicators (, indicators * u)], Y (n, m)."""
    rng = np.random.default_rng(seed)
    n_subj = d[0]
    subject = rng.integers(0, n_subj, n)
    cell_type = rng.integers(0, p - 1, n)
    X = np.column_stack([np.log(rng.integers(500, 5000, n)), np.eye(p - 1)[cell_type]])
    u = rng.uniform(1, 3, n)
    Z = np.eye(n_subj)[subject]
    b = rng.normal(0, 0.3, (n_subj, m))
    Y = X @ rng.normal(0, 0.5, (p, m)) + b[subject] + rng.normal(0, 1, (n, m))
    if len(d) == 2:
        Z = np.column_stack([Z, Z * u[:, None]])
        Y += rng.normal(0, 0.2, (n_subj, m))[subject] * u[:, None]
    return {"X": X, "Z": Z, "Y": Y, "subject": subject, "u": u, "d": list(d)}


def summary(cells: dict) -> dict:
    """The statistics lmm needs, from the cell-level data (R orientation)."""
    X, Z, Y = cells["X"], cells["Z"], cells["Y"]
    return {
        "XX": X.T @ X,
        "XY": X.T @ Y,
        "ZX": Z.T @ X,
        "ZY": Z.T @ Y,
        "ZZ": Z.T @ Z,
        "Ynorm": np.einsum("ij,ij->j", Y, Y),
        "n": X.shape[0],
        "d": cells["d"],
    }


def mixedlm_fits(cells: dict, k: int) -> tuple[float, list[dict]]:
    """Seconds per feature of statsmodels MixedLM (REML) and its estimates, k features."""
    import statsmodels.api as sm
    from statsmodels.regression.mixed_linear_model import MixedLMParams

    X, subject, u = cells["X"], cells["subject"], cells["u"]
    two = len(cells["d"]) == 2
    exog_re = np.column_stack([np.ones_like(u), u]) if two else None
    out = []
    start = time.perf_counter()
    for j in range(k):
        model = sm.MixedLM(cells["Y"][:, j], X, groups=subject, exog_re=exog_re)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter; 'converged' is recorded
            if two:  # independent intercept and slope variances, as FLASH-MM's K=2
                free = MixedLMParams.from_components(np.ones(X.shape[1]), np.eye(2))
                res = model.fit(reml=True, free=free)
            else:
                res = model.fit(reml=True)
        out.append(
            {
                "coef": np.asarray(res.fe_params),
                "theta": np.r_[np.diag(np.atleast_2d(res.cov_re)), res.scale],
                "converged": bool(res.converged),
            }
        )
    return (time.perf_counter() - start) / k, out


def lmm_rate(st: dict, repeat: int = 3) -> float:
    """Features per second of lmm on the statistics (best of ``repeat``)."""
    m = st["XY"].shape[1]
    best = np.inf
    for _ in range(repeat):
        start = time.perf_counter()
        lmm(**st)
        best = min(best, time.perf_counter() - start)
    return m / best


def main(argv: list[str] | None = None) -> list[tuple[str, float, float]]:
    """Run the benchmark; also return (case, speed-up over MixedLM, max relative
    difference of the estimates) per case."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=20_000)
    ap.add_argument("--features", type=int, default=3, help="features fitted by MixedLM")
    ap.add_argument("--fit-features", type=int, default=2_000, help="features fitted by lmm")
    ap.add_argument("--cases", default="all", help="comma-separated case numbers 1,2,3")
    args = ap.parse_args(argv)
    chosen = range(len(CASES))
    if args.cases != "all":
        chosen = [int(c) - 1 for c in args.cases.split(",")]

    print(f"{args.cells} cells; MixedLM on {args.features} features; lmm on {args.fit_features}")
    header = (
        f"{'case':<16}{'MixedLM f/s':>13}{'lmm f/s':>11}{'lmm+stats f/s':>15}"
        f"{'x MixedLM':>11}{'max rel diff':>14}"
    )
    print(header)
    ratios = []
    for idx in chosen:
        label, p, d = CASES[idx]
        cells = simulate_cells(args.cells, p, d, max(args.features, args.fit_features))
        per_feature, fits = mixedlm_fits(cells, args.features)
        few = {**cells, "Y": cells["Y"][:, : args.features]}
        ours = lmm(**summary(few))
        diff = np.nan  # over the features MixedLM says it converged on
        for j, fit in enumerate(fits):
            if not fit["converged"]:
                continue
            diff = 0.0 if np.isnan(diff) else diff
            for name in ("coef", "theta"):
                a, b = fit[name], getattr(ours, name)[:, j]
                diff = max(diff, float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-3))))
        start = time.perf_counter()
        st = summary(cells)
        stats_s = time.perf_counter() - start
        rate = lmm_rate(st)
        with_stats = args.fit_features / (args.fit_features / rate + stats_s)
        converged = sum(f["converged"] for f in fits)
        ratios.append((label, with_stats * per_feature, diff))
        print(
            f"{label:<16}{1 / per_feature:>13.2f}{rate:>11.0f}{with_stats:>15.0f}"
            f"{with_stats * per_feature:>11.0f}{diff:>14.1e}  (MixedLM converged "
            f"{converged}/{len(fits)})",
            flush=True,
        )
    for label, ratio, _ in ratios:
        print(f"ratio lmm+stats / MixedLM ({label}): {ratio:.0f} x faster per feature")
    return ratios


if __name__ == "__main__":
    main()
