"""Calibration of the tests a run reports: null false-positive rate and BH FDP.

Run: ``python benchmarks/calibration.py [--df satterthwaite] [--nonnegative true]``.

The fit settings are those of a run with the default config (:mod:`flashmm_dask.run.config`:
``model.method``, ``model.df``, ``model.max_iter``, ``model.epsilon`` and, where the code
has it, ``model.nonnegative``); ``--df`` and ``--nonnegative`` override them. The script
prints what it used.

Data (simulated here, independently of the package's simulator): negative binomial counts
(or, with ``--data normal``, the log means below plus N(0, 1) noise)
of ``--genes`` genes in cells of S donors per condition (A, B; donors nested in condition),
``--cells-per-donor`` cells each, three cell types drawn per cell, library sizes varying
between cells; log mean per cell and gene

    log m_cg = log(libsize_c / 1e4) + log mu_g + gamma_{cls(c), g} + b_{donor(c), g}
               + beta_g [effect applies to c]

with b_dg ~ N(0, s2_g): the donor variance s2_g differs between genes (log-uniform on
[0.02, 0.5]) and is zero for a third of them. ``--de-fraction`` of the genes are DE with
|beta_g| uniform on [0.3, 1.0] (random sign). Two scenarios:

- between-donor: the effect applies to every cell of condition B (constant within donor);
  model ``log2(1 + counts) ~ log(libsize) + trt + (1 | donor)``, test ``trtB``;
- cell-type-specific: the effect applies to cell type 1 of condition B; model
  ``~ 0 + log(libsize) + cls + cls:trt + (1 | donor)``, test ``cls1:trtB``;
- "cell-type-specific, by cls" (only with ``--scenarios``): the same data sets, fitted as a
  run with ``model.by: cls`` fits cell type 1 (its cells only, its own donor and residual
  variances): ``~ log(libsize) + trt + (1 | donor)``, test ``trtB``.

Each data set is reduced to summary statistics in-process (``sslmm``, blocks of genes) and
fitted with ``lmm`` (no Dask cluster). For each scenario and S: the false-positive rate at
alpha = 0.05 over the null genes (also among the null genes without donor variance) and the
false discovery proportion of Benjamini-Hochberg at 0.05, averaged over ``--replicates``
data sets (a new design each), with Monte Carlo standard errors from the spread between
replicates. The goal: FPR in [0.04, 0.06] and FDP <= 0.06 in every row.

Writes ``CALIBRATION.md`` and ``calibration.png`` into ``--out`` (default this folder)
and prints the table. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import flashmm_dask as fm
from flashmm_dask.design.check import check_design_replication
from flashmm_dask.numerics.inference import p_adjust
from flashmm_dask.run.config import load_config

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _common import machine_line  # noqa: E402

ALPHA = 0.05
GOAL_FPR = (0.04, 0.06)
GOAL_FDP = 0.06
SCENARIOS = {
    "between-donor": ("~ log(libsize) + trt", "trtB"),
    "cell-type-specific": ("~ 0 + log(libsize) + cls + cls:trt", "cls1:trtB"),
    # the same data as cell-type-specific, fitted as a run with model.by: cls fits cell
    # type 1: its own model, with its own donor and residual variances (not a default row)
    "cell-type-specific, by cls": ("~ log(libsize) + trt", "trtB"),
}
#: Scenarios fitted on the cells of one cell type, and the data they are simulated as.
STRATUM = {"cell-type-specific, by cls": ("1", "cell-type-specific")}
DEFAULT_SCENARIOS = ["between-donor", "cell-type-specific"]
RANDOM = "~ 0 + donor"
N_CELLTYPES = 3
GENE_BLOCK = 2000
DATA = {
    "counts": "NB counts (dispersion 0.2), log2(1 + counts)",
    "normal": "Gaussian on the log scale (log m + N(0, 1) noise: the mixed model itself)",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The fit settings: a run's defaults, with the command line's overrides."""

    method: str
    df: str
    max_iter: int
    epsilon: float
    nonnegative: bool | None  # None: this version of the code has no such option
    boundary_df: str | None = None  # likewise

    def lmm_options(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method,
            "df": self.df,
            "max_iter": self.max_iter,
            "epsilon": self.epsilon,
        }
        if self.nonnegative is not None:
            out["nonnegative"] = self.nonnegative
        if self.boundary_df is not None:
            out["boundary_df"] = self.boundary_df
        return out

    def line(self) -> str:
        nonneg = "n/a (no such option)" if self.nonnegative is None else str(self.nonnegative)
        boundary = "n/a (no such option)" if self.boundary_df is None else self.boundary_df
        return (
            f"model.method={self.method}, model.df={self.df}, model.nonnegative={nonneg}, "
            f"model.boundary_df={boundary}, model.max_iter={self.max_iter}, "
            f"model.epsilon={self.epsilon:g}"
        )


def run_settings(
    df: str | None, nonnegative: str | None, boundary_df: str | None = None
) -> Settings:
    """The model settings of a run with the default config, with overrides."""
    overrides = []
    if df is not None:
        overrides.append(f"model.df={df}")
    keys = {f.name for f in dataclasses.fields(type(load_config().model))}
    has_nonnegative, has_boundary = "nonnegative" in keys, "boundary_df" in keys
    for key, value, present in (
        ("nonnegative", nonnegative, has_nonnegative),
        ("boundary_df", boundary_df, has_boundary),
    ):
        if value is not None:
            if not present:
                raise SystemExit(f"this version of flashmm_dask has no model.{key}")
            overrides.append(f"model.{key}={value}")
    model = load_config(None, overrides).model
    return Settings(
        method=model.method,
        df=model.df,
        max_iter=int(model.max_iter),
        epsilon=float(model.epsilon),
        nonnegative=bool(model.nonnegative) if has_nonnegative else None,
        boundary_df=model.boundary_df if has_boundary else None,
    )


def simulate_cells(S: int, cells_per_donor: int, rng: np.random.Generator) -> pd.DataFrame:
    """Cell metadata: S donors per condition, cell types and library sizes per cell."""
    donors = [f"{t}{k + 1}" for t in "AB" for k in range(S)]
    counts = rng.poisson(cells_per_donor, size=2 * S).clip(10)
    donor = np.repeat(np.arange(2 * S), counts)
    return pd.DataFrame(
        {
            "donor": pd.Categorical(np.array(donors)[donor], categories=donors),
            "trt": pd.Categorical(np.where(donor < S, "A", "B"), categories=["A", "B"]),
            "cls": pd.Categorical(
                (rng.integers(N_CELLTYPES, size=donor.size) + 1).astype(str),
                categories=[str(k + 1) for k in range(N_CELLTYPES)],
            ),
            "libsize": 1e4 * rng.lognormal(0.0, 0.35, size=donor.size),
        }
    )


def simulate_genes(
    obs: pd.DataFrame,
    n_genes: int,
    scenario: str,
    de_fraction: float,
    rng: np.random.Generator,
    data: str = "counts",
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """log2(1 + NB counts) (or, with data="normal", log m + N(0, 1)), genes x cells, and
    the truth (DE, donor variance)."""
    n_donors = len(obs["donor"].cat.categories)
    donor = obs["donor"].cat.codes.to_numpy()
    cls = obs["cls"].cat.codes.to_numpy()
    treated = (obs["trt"] == "B").to_numpy()
    applies = treated if scenario == "between-donor" else treated & (cls == 0)
    log_mu = rng.normal(0.0, 0.8, size=n_genes)
    gamma = rng.normal(0.0, 0.4, size=(n_genes, N_CELLTYPES))
    s2 = np.exp(rng.uniform(np.log(0.02), np.log(0.5), size=n_genes))
    s2[rng.permutation(n_genes)[: n_genes // 3]] = 0.0
    b = rng.normal(size=(n_genes, n_donors)) * np.sqrt(s2)[:, None]
    de = np.zeros(n_genes, dtype=bool)
    de[rng.permutation(n_genes)[: round(de_fraction * n_genes)]] = True
    beta = np.where(de, rng.uniform(0.3, 1.0, n_genes) * rng.choice([-1, 1], n_genes), 0.0)
    log_m = (
        np.log(obs["libsize"].to_numpy() / 1e4)[None, :]
        + log_mu[:, None]
        + gamma[:, cls]
        + b[:, donor]
        + beta[:, None] * applies[None, :]
    )
    truth = {"de": de, "zero_donor_var": s2 == 0}
    if data == "normal":  # the mixed model itself: log m plus N(0, 1) noise
        return log_m + rng.normal(size=log_m.shape), truth
    size = 5.0  # NB dispersion 1/size = 0.2
    counts = rng.negative_binomial(size, size / (size + np.exp(log_m)))
    return np.log2(1.0 + counts), truth


def one_replicate(
    S: int, scenario: str, data: str, args: argparse.Namespace, settings: Settings, seed: int
) -> dict[str, Any]:
    """Simulate one data set, reduce and fit it; return its null and BH figures."""
    rng = np.random.default_rng(seed)
    fixed, term = SCENARIOS[scenario]
    stratum, simulated = STRATUM.get(scenario, (None, scenario))
    obs = simulate_cells(S, args.cells_per_donor, rng)
    keep = np.ones(len(obs), dtype=bool) if stratum is None else (obs["cls"] == stratum).to_numpy()
    fitted_obs = obs[keep]
    design = fm.build_design(fitted_obs, fixed, RANDOM)
    check_design_replication(design, fitted_obs)
    X, Z = design.X(fitted_obs), design.Z(fitted_obs)
    j = design.covariates.index(term)
    p, df, de, zero, theta, ok = [], [], [], [], [], []
    for start in range(0, args.genes, GENE_BLOCK):
        Y, truth = simulate_genes(
            obs, min(GENE_BLOCK, args.genes - start), simulated, args.de_fraction, rng, data
        )
        stats = fm.sslmm(X, Y[:, keep], Z, d=design.d)
        fit = fm.lmm(
            stats.XX,
            stats.XY,
            stats.ZX,
            stats.ZY,
            stats.ZZ,
            stats.Ynorm,
            stats.n,
            stats.d,
            output_cov=False,
            warn_zero=False,
            **settings.lmm_options(),
        )
        p.append(fit.p[j])
        df.append(fit.df_array()[j])
        theta.append(fit.theta[0])
        ok.append(np.isfinite(fit.p[j]))
        de.append(truth["de"])
        zero.append(truth["zero_donor_var"])
    pv, dfv, dev, zerov, thetav, okv = map(np.concatenate, (p, df, de, zero, theta, ok))
    null = ~dev & okv
    found = p_adjust(np.where(okv, pv, np.nan), "BH") < ALPHA
    return {
        "cells": len(fitted_obs),
        "null": int(null.sum()),
        "fpr": float(np.mean(pv[null] < ALPHA)),
        "fpr_zero": float(np.mean(pv[null & zerov] < ALPHA)),
        "fdp": float(np.sum(found & ~dev) / max(1, np.sum(found))),
        "power": float(np.mean(found[dev])),
        "df": dfv[null],
        "theta_le0": float(np.mean(thetav[okv] <= 0)),
        "not_finite": int((~okv).sum()),
        "null_p": pv[null],
    }


def summarise(reps: list[dict[str, Any]]) -> dict[str, Any]:
    def mean_se(key: str) -> tuple[float, float]:
        values = np.array([r[key] for r in reps])
        return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))

    out: dict[str, Any] = {k: mean_se(k) for k in ("fpr", "fpr_zero", "fdp", "power", "theta_le0")}
    out["cells"] = int(np.mean([r["cells"] for r in reps]))
    out["null"] = int(sum(r["null"] for r in reps))
    out["not_finite"] = int(sum(r["not_finite"] for r in reps))
    df = np.concatenate([r["df"] for r in reps])
    out["df"] = (float(np.nanmedian(df)), *np.nanpercentile(df, [10, 90]))
    out["null_p"] = np.concatenate([r["null_p"] for r in reps])
    fpr, fdp = out["fpr"][0], out["fdp"][0]
    out["goal"] = GOAL_FPR[0] <= fpr <= GOAL_FPR[1] and fdp <= GOAL_FDP
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genes", type=int, default=5000, help="genes per data set")
    parser.add_argument("--replicates", type=int, default=20, help="data sets per row")
    parser.add_argument("--donors", type=int, nargs="+", default=[3, 6, 10, 20])
    parser.add_argument("--cells-per-donor", type=int, default=60)
    parser.add_argument("--de-fraction", type=float, default=0.1)
    parser.add_argument("--scenarios", nargs="+", default=DEFAULT_SCENARIOS, choices=SCENARIOS)
    parser.add_argument(
        "--data",
        nargs="+",
        choices=list(DATA),
        default=list(DATA),
        help="NB counts, log2(1 + x), and/or the mixed model's Gaussian on the log scale",
    )
    parser.add_argument("--df", choices=["residual", "satterthwaite"], help="model.df")
    parser.add_argument("--nonnegative", choices=["true", "false"], help="model.nonnegative")
    parser.add_argument("--boundary-df", choices=["lmertest", "retain"], help="model.boundary_df")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--out", type=Path, default=HERE)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the study; return the table rows (also written to CALIBRATION.md)."""
    args = parse(argv)
    # per-block notes of lmm (e.g. undefined Satterthwaite df) are counted in the table
    quiet = logging.getLogger("flashmm_dask.model.lmm")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return study(args, argv)
    finally:
        quiet.setLevel(level)


def study(args: argparse.Namespace, argv: list[str] | None) -> list[dict[str, Any]]:
    """The rows of the table, written with the figure into ``args.out``."""
    settings = run_settings(args.df, args.nonnegative, args.boundary_df)
    print(f"fit settings (a run's defaults and overrides): {settings.line()}", flush=True)
    machine = machine_line()
    start = time.perf_counter()
    rows = []
    for data in args.data:
        for scenario in args.scenarios:
            for S in args.donors:
                reps = [
                    one_replicate(
                        S, scenario, data, args, settings, args.seed * 100_003 + 1000 * S + r
                    )
                    for r in range(args.replicates)
                ]
                row = {"data": data, "scenario": scenario, "S": S, **summarise(reps)}
                rows.append(row)
                print(
                    f"{data}, {scenario}, {S} donors per group: FPR {row['fpr'][0]:.4f} "
                    f"({row['fpr'][1]:.4f}), FDP {row['fdp'][0]:.4f} ({row['fdp'][1]:.4f}) "
                    f"at {time.perf_counter() - start:.0f} s",
                    flush=True,
                )
    elapsed = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    figure(rows, args.out / "calibration.png", settings)
    table = markdown(rows, args, settings, elapsed, machine, argv)
    (args.out / "CALIBRATION.md").write_text(table)
    print(table)
    return rows


def figure(rows: list[dict[str, Any]], path: Path, settings: Settings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["data"], r["scenario"]) for r in rows))
    donors = sorted({r["S"] for r in rows})
    ncols = max(2, len(groups))
    fig, axes = plt.subplots(2, ncols, figsize=(4.2 * ncols, 8), squeeze=False)
    for data, scenario in groups:
        sub = [r for r in rows if (r["data"], r["scenario"]) == (data, scenario)]
        for ax, key in ((axes[0, 0], "fpr"), (axes[0, 1], "fdp")):
            ax.errorbar(
                [r["S"] for r in sub],
                [r[key][0] for r in sub],
                yerr=[2 * r[key][1] for r in sub],
                marker={"between-donor": "o", "cell-type-specific": "s"}.get(scenario, "^"),
                ls="-" if data == "counts" else "--",
                capsize=3,
                label=f"{scenario}, {data}",
            )
    axes[0, 0].axhspan(*GOAL_FPR, color="0.9", label="goal")
    axes[0, 0].axhline(ALPHA, color="k", lw=0.7)
    axes[0, 0].set_ylabel("false-positive rate at p < 0.05 (+- 2 MC se)")
    axes[0, 1].axhline(GOAL_FDP, color="k", lw=0.7, ls="--", label="goal")
    axes[0, 1].axhline(ALPHA, color="k", lw=0.7)
    axes[0, 1].set_ylabel("BH FDP at 0.05 (+- 2 MC se)")
    for ax in axes[0, :2]:
        ax.set_xlabel("donors per group")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(donors, labels=[str(x) for x in donors])
        ax.legend(fontsize=7)
    for ax in axes[0, 2:]:
        ax.axis("off")
    for ax, (data, scenario) in zip(axes[1], groups, strict=False):
        for r in rows:
            if (r["data"], r["scenario"]) != (data, scenario):
                continue
            p = np.sort(r["null_p"])
            expected = -np.log10((np.arange(1, p.size + 1) - 0.5) / p.size)
            ax.plot(expected, -np.log10(p), ".", ms=1.5, label=f"{r['S']} per group")
        top = ax.get_xlim()[1]
        ax.plot([0, top], [0, top], "k-", lw=0.7)
        ax.set_title(f"null p-values: {scenario}, {data}", fontsize=9)
        ax.set_xlabel("expected -log10 p")
        ax.set_ylabel("observed -log10 p")
        ax.legend(fontsize=7, markerscale=4)
    for ax in axes[1, len(groups) :]:
        ax.axis("off")
    fig.suptitle(settings.line(), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    settings: Settings,
    elapsed: float,
    machine: str,
    argv: list[str] | None,
) -> str:
    command = "python benchmarks/calibration.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    lines = [
        "# Calibration of a run's tests: null false-positive rate and BH FDP",
        "",
        f"Command: `{command.strip()}`, {elapsed:.0f} s on {machine.removeprefix('machine: ')} "
        f"(load {os.getloadavg()[0]:.2f} at the end).",
        "",
        f"Fit settings (the defaults of a run, `flashmm_dask.run.config`, with the command's "
        f"overrides): {settings.line()}.",
        "",
        "Data (see the script's docstring): "
        + "; ".join(f"*{k}*: {DATA[k]}" for k in args.data)
        + f". {args.genes} genes per "
        f"data set, {args.replicates} data sets per row (a new design and new genes each), "
        f"{args.de_fraction:.0%} DE genes (|log fold change| uniform on [0.3, 1]), donor "
        "variance log-uniform on [0.02, 0.5] and zero for a third of the genes, about "
        f"{args.cells_per_donor} cells per donor, 3 cell types. Scenarios: *between-donor* "
        "(`~ log(libsize) + trt`, test `trtB`, constant within donor) and "
        "*cell-type-specific* (`~ 0 + log(libsize) + cls + cls:trt`, test `cls1:trtB`, the "
        "effect in cell type 1 only)"
        + (
            "; *cell-type-specific, by cls*: the same data sets, cell type 1's cells only, "
            "`~ log(libsize) + trt`, test `trtB` (what a run with `model.by: cls` fits there)"
            if any(s in STRATUM for s in args.scenarios)
            else ""
        )
        + "; random `~ 0 + donor`.",
        "",
        "FPR: share of the null genes with p < 0.05 (all null genes, and those without donor "
        "variance); FDP: false discoveries among the Benjamini-Hochberg discoveries at 0.05; "
        "means over the data sets, Monte Carlo standard errors (between data sets) in "
        f"brackets. Goal: FPR in [{GOAL_FPR[0]}, {GOAL_FPR[1]}] and FDP <= {GOAL_FDP}.",
        "",
        "| data | scenario | donors per group | cells | null genes | FPR | FPR, no donor "
        "variance | BH FDP | BH power | df median (10-90%) | theta_donor <= 0 | no p-value "
        "| goal |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['scenario']} | {r['S']} | {r['cells']} | {r['null']} | "
            f"{r['fpr'][0]:.4f} ({r['fpr'][1]:.4f}) | "
            f"{r['fpr_zero'][0]:.4f} ({r['fpr_zero'][1]:.4f}) | "
            f"{r['fdp'][0]:.4f} ({r['fdp'][1]:.4f}) | {r['power'][0]:.3f} | "
            f"{r['df'][0]:.1f} ({r['df'][1]:.1f}-{r['df'][2]:.1f}) | "
            f"{r['theta_le0'][0]:.3f} | {r['not_finite']} | "
            f"{'met' if r['goal'] else '**missed**'} |"
        )
    lines += [
        "",
        "*no p-value*: genes of the row whose p-value is not finite (not fitted: all zero; "
        "or Satterthwaite's df undefined), left out of FPR and FDP; *theta_donor <= 0*: share "
        "of the fitted genes whose donor variance is estimated at or below zero.",
        "",
        "Figure: `calibration.png` (FPR and FDP against the donors per group, with 2 MC se; "
        "QQ plots of the null p-values).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
