"""Calibration of per-cell-type tests when the donor variance differs between cell types:
one joint model with cell-type interactions vs one model per cell type (``by=``).

Run: ``python benchmarks/calibration_strata.py [--genes 10000] [--cells 50] [--donors 6]``.

Null data, generated directly on the analysis scale: ``--donors`` donors per condition
(A, B), each with ``--cells`` cells of each of two cell types; in cell type c a gene's value
in a cell of donor d is ``b_cd + e``, with donor effects ``b_cd ~ N(0, v_c)`` drawn
independently per cell type (v_1 = 0.6, v_2 = 0.05) and residual ``e ~ N(0, s_c^2)``
(s_1 = 1, s_2 = 2). No gene responds to the condition. Fitted:

- joint (R FLASHMM's usual model): ``~ 0 + ct + ct:trt``, random ``~ 0 + donor``, tests of
  ``ct1:trtB`` and ``ct2:trtB``: one donor variance and one residual variance shared by the
  two cell types;
- strata: ``flashmm(..., by="ct")`` with ``~ trt``, random ``~ 0 + donor``, test of
  ``trtB`` in each cell type, with its own variances.

Prints the false-positive rate at alpha = 0.05 of each test, with the residual and with
Satterthwaite's df (Monte Carlo standard error in brackets). Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as st

from flashmm_dask import flashmm

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _common import machine_line  # noqa: E402

ALPHA = 0.05
DONOR_VAR = {"1": 0.6, "2": 0.05}
RESIDUAL_SD = {"1": 1.0, "2": 2.0}


def simulate(n_genes: int, n_donors: int, n_cells: int, seed: int):
    """(cells x genes values, obs) of the null data described in the module docstring."""
    rng = np.random.default_rng(seed)
    donors = [f"{t}{k}" for t in "AB" for k in range(1, n_donors + 1)]
    rows, parts = [], []
    for ct in ("1", "2"):
        effects = rng.normal(0.0, np.sqrt(DONOR_VAR[ct]), size=(len(donors), n_genes))
        for d, donor in enumerate(donors):
            noise = rng.normal(0.0, RESIDUAL_SD[ct], size=(n_cells, n_genes))
            parts.append(effects[d] + noise)
            rows += [(donor, donor[0], ct)] * n_cells
    obs = pd.DataFrame(rows, columns=["donor", "trt", "ct"]).astype("category")
    obs.index = [f"c{i}" for i in range(len(obs))]
    return np.vstack(parts), obs


def rate(p: np.ndarray) -> str:
    p = p[np.isfinite(p)]
    r = float(np.mean(p < ALPHA))
    return f"{r:.3f} ({np.sqrt(r * (1 - r) / p.size):.3f})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--genes", type=int, default=10_000)
    ap.add_argument("--cells", type=int, default=50, help="cells per donor and cell type")
    ap.add_argument("--donors", type=int, default=6, help="donors per condition")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    values, obs = simulate(args.genes, args.donors, args.cells, args.seed)
    common = {"orientation": "cells_x_features", "metadata": obs, "df": "satterthwaite"}
    joint = flashmm(values, "~ 0 + ct + ct:trt", "~ 0 + donor", **common)
    strata = flashmm(values, "~ trt", "~ 0 + donor", by="ct", **common)
    print(machine_line())
    print(
        f"{args.donors} donors per condition, {args.cells} cells per donor and cell type, "
        f"{args.genes} null genes; donor variance {DONOR_VAR}, residual sd {RESIDUAL_SD}; "
        f"{time.perf_counter() - start:.0f} s"
    )
    print()
    print("| cell type | model | test | FPR residual df | FPR Satterthwaite df |")
    print("| --- | --- | --- | --- | --- |")
    for ct in ("1", "2"):
        name = f"ct{ct}:trtB"
        j = joint.covariates.index(name)
        p_res = 2 * st.t.sf(np.abs(joint.t[j]), joint.n - len(joint.covariates))
        print(
            f"| {ct} | joint `~ 0 + ct + ct:trt` | `{name}` | {rate(p_res)} | {rate(joint.p[j])} |"
        )
        fit = strata[ct]
        k = fit.covariates.index("trtB")
        p_res = 2 * st.t.sf(np.abs(fit.t[k]), fit.n - len(fit.covariates))
        print(f"| {ct} | strata `by: ct`, `~ trt` | `trtB` | {rate(p_res)} | {rate(fit.p[k])} |")


if __name__ == "__main__":
    main()
