"""Calibration of the treatment test: residual df (n - p) vs Satterthwaite's df.

Run: ``python benchmarks/calibration.py [--genes 20000] [--cells-per-subject 100]``.

Data from :func:`flashmm_dask.simulate_rnaseq` (negative binomial counts, subjects nested in
treatment, subject random effects of variance 0.1 on the log scale), one cell type, 6, 10
and 20 subjects per treatment group (seeds are chosen so that the groups are balanced),
``--cells-per-subject`` cells per subject on average. Model (log2(1 + counts))::

    y ~ log(libsize) + trt + (1 | sam)       REML

The treatment effect ``trtB`` is constant within subjects, so its t-test has about
2 S - 2 degrees of freedom, not n - p. For each S:

- null data (no DE genes): the false-positive rate of the t-test at alpha = 0.05 and a QQ
  plot of the p-values, with the residual and with Satterthwaite's df (the same t);
- data with DE genes (|log fold change| uniform on [0.25, 1]): the power at p < 0.05 and
  at a Benjamini-Hochberg FDR of 0.05, and the realised false discovery proportion.

Writes ``benchmarks/calibration.png`` and the table ``benchmarks/CALIBRATION.md``, and prints
the table. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.stats

from flashmm_dask import flashmm, simulate_rnaseq
from flashmm_dask.numerics.inference import p_adjust, t_pvalues

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _common import machine_line  # noqa: E402

ALPHA = 0.05
FIXED = "~ log(libsize) + trt"
RANDOM = "~ 0 + sam"
TERM = "trtB"


def balanced_seed(S: int, n_cells: int, start: int) -> int:
    """The first seed >= start whose simulated subjects split S / S between treatments."""
    for seed in range(start, start + 10_000):
        obs = simulate_rnaseq(
            n_genes=1, n_cells=n_cells, n_samples=2 * S, n_celltypes=1, n_de_genes=0, seed=seed
        ).obs
        if (obs.groupby("trt", observed=True)["sam"].nunique() == S).all():
            return seed
    raise RuntimeError(f"no balanced seed for S = {S}")


def fit(S: int, n_genes: int, n_de: int, cells_per_subject: int, seed: int):
    """Simulate, fit with Satterthwaite's df; return p (residual), p (Satterthwaite), df, DE."""
    n_cells = 2 * S * cells_per_subject
    adata = simulate_rnaseq(
        n_genes=n_genes,
        n_cells=n_cells,
        n_samples=2 * S,
        n_celltypes=1,
        n_de_genes=n_de,
        seed=seed,
    )
    groups = adata.obs.groupby("trt", observed=True)["sam"].nunique()
    assert (groups == S).all(), f"unbalanced subjects {groups.to_dict()}"
    res = flashmm(adata, FIXED, RANDOM, is_counts=True, df="satterthwaite", n_threads=2)
    j = res.covariates.index(TERM)
    fitted = res.converged
    t, df_sat = res.t[j], res.df[j]
    p_res = t_pvalues(t, res.n - len(res.covariates))
    p_sat = res.p[j]
    de = np.asarray(adata.var["de"], dtype=bool)
    keep = fitted & np.isfinite(p_res)
    return p_res[keep], p_sat[keep], df_sat[keep], de[keep], res.theta[0][keep], n_cells


def summarise(p: np.ndarray, de: np.ndarray) -> dict[str, float]:
    padj = p_adjust(p, "BH")
    found = padj < ALPHA
    return {
        "power": float(np.mean(p[de] < ALPHA)),
        "power_bh": float(np.mean(found[de])),
        "fdp": float(np.sum(found & ~de) / max(1, np.sum(found))),
    }


def qq(ax, p_res: np.ndarray, p_sat: np.ndarray, title: str) -> None:
    m = p_res.size
    expected = -np.log10((np.arange(1, m + 1) - 0.5) / m)
    lo = scipy.stats.beta.ppf(0.025, np.arange(1, m + 1), np.arange(m, 0, -1))
    hi = scipy.stats.beta.ppf(0.975, np.arange(1, m + 1), np.arange(m, 0, -1))
    ax.fill_between(expected, -np.log10(lo), -np.log10(hi), color="0.85", label="95% band")
    ax.plot(expected, -np.log10(np.sort(p_res)), ".", ms=2, label="residual df (n - p)")
    ax.plot(expected, -np.log10(np.sort(p_sat)), ".", ms=2, label="Satterthwaite df")
    top = expected.max()
    ax.plot([0, top], [0, top], "k-", lw=0.7)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("expected -log10 p")
    ax.set_ylabel("observed -log10 p")


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the study; return the table rows (also written to CALIBRATION.md)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genes", type=int, default=20000, help="genes per simulated data set")
    parser.add_argument("--de-genes", type=int, default=2000, help="DE genes of the power runs")
    parser.add_argument("--cells-per-subject", type=int, default=100)
    parser.add_argument("--subjects", type=int, nargs="+", default=[6, 10, 20])
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = time.perf_counter()
    rows = []
    fig, axes = plt.subplots(1, len(args.subjects) + 1, figsize=(4 * (len(args.subjects) + 1), 4))
    for i, S in enumerate(args.subjects):
        n_cells = 2 * S * args.cells_per_subject
        seed = balanced_seed(S, n_cells, 1000 * S)
        p_res, p_sat, df_sat, _, theta1, n_cells = fit(
            S, args.genes, 0, args.cells_per_subject, seed
        )
        m = p_res.size
        fpr_res, fpr_sat = float(np.mean(p_res < ALPHA)), float(np.mean(p_sat < ALPHA))
        de_seed = balanced_seed(S, n_cells, 1000 * S + 500)
        q_res, q_sat, _, de, _, _ = fit(
            S, args.genes, args.de_genes, args.cells_per_subject, de_seed
        )
        rows.append(
            {
                "S": S,
                "cells": n_cells,
                "null_genes": m,
                "fpr_res": fpr_res,
                "fpr_sat": fpr_sat,
                "mc_se": float(np.sqrt(ALPHA * (1 - ALPHA) / m)),
                "df_median": float(np.nanmedian(df_sat)),
                "df_q": np.nanpercentile(df_sat, [10, 90]),
                "neg_theta": float(np.mean(theta1 < 0)),
                "de_genes": int(de.sum()),
                "res": summarise(q_res, de),
                "sat": summarise(q_sat, de),
            }
        )
        qq(axes[i], p_res, p_sat, f"null, {S} + {S} subjects, {n_cells} cells, {m} genes")
        print(f"S = {S}: done at {time.perf_counter() - start:.0f} s", flush=True)
    ax = axes[-1]
    s = [r["S"] for r in rows]
    ax.plot(s, [r["fpr_res"] for r in rows], "o-", label="FPR, residual df")
    ax.plot(s, [r["fpr_sat"] for r in rows], "s-", label="FPR, Satterthwaite")
    ax.axhline(ALPHA, color="k", lw=0.7)
    ax.plot(s, [r["res"]["power"] for r in rows], "o--", label="power, residual df")
    ax.plot(s, [r["sat"]["power"] for r in rows], "s--", label="power, Satterthwaite")
    ax.set_xlabel("subjects per group")
    ax.set_ylabel("rate at p < 0.05")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    figure = args.out / "calibration.png"
    fig.savefig(figure, dpi=110)
    elapsed = time.perf_counter() - start
    table = markdown(rows, args, elapsed)
    (args.out / "CALIBRATION.md").write_text(table)
    print(table)
    return rows


def markdown(rows: list[dict], args: argparse.Namespace, elapsed: float) -> str:
    lines = [
        "# Calibration of the treatment test: residual vs Satterthwaite df",
        "",
        f"Measured by `python benchmarks/calibration.py` (--genes {args.genes}, --de-genes "
        f"{args.de_genes}, --cells-per-subject {args.cells_per_subject}) in {elapsed:.0f} s; "
        f"{machine_line()}. Data: "
        "`simulate_rnaseq` (NB counts, subject random effects of variance 0.1 on the log "
        "scale, one cell type), subjects nested in treatment, S subjects per group; model "
        f"`log2(1 + counts) {FIXED} + (1 | sam)`, REML; test of `{TERM}`, a "
        "between-subject effect. The t statistic is the same for both; only the df differ.",
        "",
        "Null data (no DE genes): false-positive rate at alpha = 0.05 (Monte Carlo standard "
        "error in brackets), Satterthwaite df (median and 10-90% range; about 2S - 2 is "
        "expected), and the share of genes whose subject variance is estimated below zero.",
        "",
        "| S per group | cells | genes | FPR residual df | FPR Satterthwaite | "
        "Satterthwaite df median (10-90%) | theta_sam < 0 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['S']} | {r['cells']} | {r['null_genes']} | {r['fpr_res']:.4f} "
            f"({r['mc_se']:.4f}) | {r['fpr_sat']:.4f} ({r['mc_se']:.4f}) | "
            f"{r['df_median']:.1f} ({r['df_q'][0]:.1f}-{r['df_q'][1]:.1f}) | "
            f"{r['neg_theta']:.3f} |"
        )
    lines += [
        "",
        f"Data with {rows[0]['de_genes']} DE genes of {args.genes} (|log fold change| "
        "uniform on [0.25, 1]): power at p < 0.05, power at BH FDR 0.05, and the realised "
        "false discovery proportion among the BH discoveries.",
        "",
        "| S per group | power residual | power Satterthwaite | BH power residual | "
        "BH power Satterthwaite | FDP residual | FDP Satterthwaite |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        a, b = r["res"], r["sat"]
        lines.append(
            f"| {r['S']} | {a['power']:.3f} | {b['power']:.3f} | {a['power_bh']:.3f} | "
            f"{b['power_bh']:.3f} | {a['fdp']:.3f} | {b['fdp']:.3f} |"
        )
    lines += [
        "",
        "Figure: `calibration.png` (QQ plots of the null p-values; the rates against S).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
