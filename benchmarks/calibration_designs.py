"""Calibration of a run's tests on designs beside calibration.py's: unbalanced donors and
paired conditions (null false-positive rate and BH FDP, Monte Carlo standard errors).

Each data set: NB counts (dispersion 0.2) of log-normal means, log2(1 + counts), 10% DE
genes (|log fold change| uniform on [0.3, 1]), donor variance log-uniform on [0.02, 0.5]
and zero for a third of the genes. Designs:

- *unbalanced*: donors nested in the condition (``--donors`` per condition), cells per donor
  log-normal (median 40, 5-300), ``~ log(libsize) + trt``, random ``~ 0 + donor``;
- *unbalanced, treated donors vary more*: the same, the treatment's effect varying between
  donors (so the treated donors' variance is larger: one donor variance is misspecified);
- *paired, donor only*: ``--donors`` donors in all, each with cells in both conditions, and
  a donor-by-condition variance of the same law as the donor variance (zero for another
  third of the genes), fitted with random ``~ 0 + donor`` alone;
- *paired, donor + donor:trt*: the same data sets, random ``["~ 0 + donor", "~ 0 + donor:trt"]``.

Fit settings: a run's defaults (``flashmm_dask.run.config``), ``--method ML`` to change the
method. Prints a markdown table (goal: FPR in [0.04, 0.06], FDP <= 0.06).

    python benchmarks/calibration_designs.py [--reps 20] [--genes 2000] [--donors 6]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import flashmm_dask as fm
from flashmm_dask.numerics.inference import p_adjust

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line
from calibration import run_settings

ALPHA = 0.05
DESIGNS = (
    "unbalanced",
    "unbalanced, treated donors vary more",
    "paired, donor only",
    "paired, donor + donor:trt",
)


def variances(m: int, rng: np.random.Generator) -> np.ndarray:
    s2 = np.exp(rng.uniform(np.log(0.02), np.log(0.5), size=m))
    s2[rng.permutation(m)[: m // 3]] = 0.0
    return s2


def cells(design: str, donors: int, rng: np.random.Generator) -> pd.DataFrame:
    if design.startswith("unbalanced"):
        per = np.clip(np.round(np.exp(rng.normal(np.log(40), 1.0, 2 * donors))), 5, 300)
        donor = np.repeat(np.arange(2 * donors), per.astype(int))
        trt = np.where(donor < donors, "A", "B")
    else:
        donor = np.repeat(np.arange(donors), rng.poisson(80, donors).clip(20))
        trt = rng.choice(["A", "B"], donor.size)
    return pd.DataFrame(
        {
            "donor": pd.Categorical([f"D{k}" for k in donor]),
            "trt": pd.Categorical(trt, categories=["A", "B"]),
            "libsize": 1e4 * rng.lognormal(0.0, 0.35, donor.size),
        }
    )


def expression(obs: pd.DataFrame, m: int, rng: np.random.Generator, varying: bool):
    """log2(1 + NB counts), genes x cells, and which genes are DE; with ``varying`` the
    condition's effect also varies between donors (variance of the same law as the donor
    variance)."""
    donor = obs["donor"].cat.codes.to_numpy()
    treated = (obs["trt"] == "B").to_numpy()
    n_donors = donor.max() + 1
    de = np.zeros(m, dtype=bool)
    de[rng.permutation(m)[: m // 10]] = True
    beta = np.where(de, rng.uniform(0.3, 1.0, m) * rng.choice([-1, 1], m), 0.0)
    b = rng.normal(size=(m, n_donors)) * np.sqrt(variances(m, rng))[:, None]
    slope = rng.normal(size=(m, n_donors)) * np.sqrt(variances(m, rng))[:, None] * varying
    log_m = (
        np.log(obs["libsize"].to_numpy() / 1e4)[None, :]
        + rng.normal(0.0, 0.8, m)[:, None]
        + b[:, donor]
        + (beta[:, None] + slope[:, donor]) * treated[None, :]
    )
    size = 5.0
    counts = rng.negative_binomial(size, size / (size + np.exp(log_m)))
    return np.log2(1.0 + counts), de


def one(design: str, args: argparse.Namespace, options: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    obs = cells(design, args.donors, rng)
    # the condition's effect varies between donors: in the paired designs a donor-by-
    # condition variance, with donors nested in the condition a larger donor variance
    # under treatment than under control (a model with one donor variance is misspecified)
    Y, de = expression(obs, args.genes, rng, varying=design != "unbalanced")
    if design.startswith("unbalanced"):
        random: str | list[str] = "~ 0 + donor"
    else:
        random = "~ 0 + donor" if design.endswith("only") else ["~ 0 + donor", "~ 0 + donor:trt"]
    dz = fm.build_design(obs, "~ log(libsize) + trt", random)
    X, Z = dz.XZ(obs)
    fit = fm.lmmfit(Y, X, Z, dz.d, check_design=False, output_cov=False, **options)
    j = list(dz.covariates).index("trtB")
    p = fit.p[j]
    ok = np.isfinite(p)
    null = ~de & ok
    found = p_adjust(np.where(ok, p, np.nan), "BH") < ALPHA
    return {
        "fpr": np.mean(p[null] < ALPHA),
        "fpr01": np.mean(p[null] < 0.01),
        "fdp": np.sum(found & ~de) / max(1, np.sum(found)),
        "power": np.mean(found[de]),
        "not_ok": np.mean(~np.isin(fit.status_names(), ["ok", "boundary"])),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--donors", type=int, default=6)
    parser.add_argument("--method", choices=["REML", "ML"], default=None)
    parser.add_argument("--designs", nargs="+", choices=DESIGNS, default=list(DESIGNS))
    args = parser.parse_args(argv)
    settings = run_settings(None, None)
    options = settings.lmm_options()
    if args.method:
        options["method"] = args.method
    t0 = time.time()
    print(f"# {machine_line()}")
    print(f"# settings: {options}; {args.reps} data sets of {args.genes} genes per row")
    print("| design | donors | FPR | FPR at 0.01 | BH FDP | BH power | not ok/boundary | goal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for design in args.designs:
        rows = pd.DataFrame([one(design, args, options, 1000 + r) for r in range(args.reps)])
        mean, se = rows.mean(), rows.std(ddof=1) / np.sqrt(len(rows))
        met = 0.04 <= mean["fpr"] <= 0.06 and mean["fdp"] <= 0.06
        print(
            f"| {design} | {args.donors} | {mean['fpr']:.4f} ({se['fpr']:.4f}) | "
            f"{mean['fpr01']:.4f} ({se['fpr01']:.4f}) | {mean['fdp']:.4f} ({se['fdp']:.4f}) "
            f"| {mean['power']:.3f} | {mean['not_ok']:.4f} | {'met' if met else '**missed**'} |",
            flush=True,
        )
    print(f"# {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
