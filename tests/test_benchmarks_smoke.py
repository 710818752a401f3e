"""The benchmark scripts run, with tiny arguments, and print their ratio lines.

The timings themselves are not asserted (they are measured on purpose-sized data, see
benchmarks/RESULTS.md). What is asserted: each script's ``main`` finishes and prints its
"ratio ..." lines with finite numbers, and where a script computes something checkable it
is checked independently: the reduction's statistics against a dense NumPy computation
from the store, MixedLM's estimates against lmm's, the atlas run's feature count.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# the first number after the colon of each "ratio ...: ..." line
RATIO = re.compile(r"^ratio [^:\n]*:[^0-9\n]*?(-?[0-9][0-9.]*|\bnan\b|\binf\b)", re.MULTILINE)


@pytest.fixture
def bench(monkeypatch):
    """Import a benchmark script as a module (its folder on sys.path, as when run)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def load(name: str):
        sys.modules.pop(name, None)
        return importlib.import_module(name)

    return load


def ratios(text: str) -> list[float]:
    found = [float(x) for x in RATIO.findall(text)]
    assert found, f"no ratio lines in:\n{text}"
    assert all(math.isfinite(x) for x in found), found
    return found


def test_bench_fit(bench, capsys):
    bench("bench_fit").main(["--features", "30", "--cells", "1500", "--loop", "1"])
    out = capsys.readouterr().out
    # one ratio per (case, path): 3 + 2 + 2 rows
    assert len(ratios(out)) == 7
    assert "p=60 q=259 K=1" in out and "p=21 q=50 K=2" in out


def test_bench_peer(bench, capsys):
    args = ["--cells", "1500", "--features", "1", "--fit-features", "20", "--cases", "1,3"]
    rows = bench("bench_peer").main(args)
    assert len(ratios(capsys.readouterr().out)) == 2
    # MixedLM and lmm fit the same REML models: the estimates agree
    for label, _, diff in rows:
        assert np.isnan(diff) or diff < 1e-2, (label, diff)


@pytest.mark.distributed
def test_bench_reduce(bench, capsys, tmp_path):
    from flashmm_dask.design.formula import build_design

    module = bench("bench_reduce")
    args = ["--cells", "3000", "--genes", "40", "--chunk-cells", "1000,0", "--codecs"]
    results = module.main([*args, "lz4,none", "--repeat", "1", "--store-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert len(ratios(out)) == 4 and "peak memory" in out
    # the statistics of the benchmark's reduction, against a dense NumPy computation
    _, run = results[0]
    adata = ad.read_zarr(run["store"])
    E = np.log2(1.0 + adata.X.toarray())
    design = build_design(adata.obs, module.FIXED, module.RANDOM)
    X, Z = design.X(adata.obs), design.Z(adata.obs).toarray()
    stats = run["stats"]
    np.testing.assert_allclose(stats.XY, X.T @ E, rtol=1e-10)
    np.testing.assert_allclose(stats.ZY, Z.T @ E, rtol=1e-10)
    np.testing.assert_allclose(stats.Ynorm, (E * E).sum(axis=0), rtol=1e-10)
    assert stats.n == adata.n_obs


@pytest.mark.distributed
def test_bench_atlas(bench, capsys, tmp_path):
    args = ["--sizes", "1500", "--genes", "30", "--store-dir", str(tmp_path)]
    rows = bench("bench_atlas").main(args)
    out = capsys.readouterr().out
    assert len(ratios(out)) == 1 and "peak memory" in out
    for n_cells, nnz, *_ in rows:
        assert 0 < nnz < n_cells * 30
    summary = rows[-1][5]
    assert summary.n_features == 30
    assert {"statistics", "fitting"} <= set(summary.timings)


@pytest.mark.distributed
def test_bench_atlas_parts(bench, capsys, tmp_path):
    args = ["--cells", "1500", "--genes", "30", "--blocks", "1", "--repeat", "1"]
    found = bench("bench_atlas_parts").main([*args, "--store-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert ratios(out) == pytest.approx([round(v, 2) for v in found.values()], abs=0.006)
    # part 1: simulate / write, wall and CPU, against 10,000-cell appends and its own;
    # part 2: the cluster's reduce / read in two cell orders; part 3: per block
    assert len(found) == 7 and all(v > 0 for v in found.values())
    assert "simulate / write in its appends (CPU)" in found


@pytest.mark.distributed
def test_bench_scaling(bench, capsys, tmp_path):
    args = ["--cells", "1500", "--genes", "30", "--layouts", "1x1", "--chunk-cells", "500"]
    args += ["--block-sizes", "auto", "--repeat", "1", "--store-dir", str(tmp_path)]
    bench("bench_scaling").main(args)
    out = capsys.readouterr().out
    assert len(ratios(out)) == 1 and "auto =" in out


def test_calibration_runs_the_defaults_of_a_run(bench, capsys, tmp_path):
    from flashmm_dask.run.config import load_config

    args = ["--genes", "400", "--replicates", "2", "--donors", "3", "--out", str(tmp_path)]
    args += ["--data", "counts"]
    rows = bench("calibration").main(args)
    out = capsys.readouterr().out
    assert f"model.df={load_config().model.df}" in out.splitlines()[0]
    assert [(r["scenario"], r["S"]) for r in rows] == [
        ("between-donor", 3),
        ("cell-type-specific", 3),
    ]
    for r in rows:
        assert 0 <= r["fpr"][0] <= 1 and r["fpr"][1] > 0 and r["null"] > 600
    table = (tmp_path / "CALIBRATION.md").read_text()
    assert table.count("| counts | between-donor | 3 |") == 1 and "Command: `python" in table
    assert (tmp_path / "calibration.png").stat().st_size > 5000
    rows = bench("calibration").main(
        [*args, "--df", "satterthwaite", "--scenarios", "between-donor"]
    )
    assert "model.df=satterthwaite" in capsys.readouterr().out.splitlines()[0]
    # donors nested in condition: the treatment's df are about 2 S - 2 = 4, not n - p
    assert 3 < rows[0]["df"][0] < 5


def test_bench_structured(bench, capsys):
    args = ["--cells", "3000", "--features", "4", "--donors", "12", "--states", "6"]
    bench("bench_structured").main(
        [
            *args,
            "--responses",
            "2",
            "--lmer-repeats",
            "1",
            "--k2-features",
            "20",
            "--k2-cells",
            "1500",
            "--r-features",
            "10",
            "--r-cells",
            "600",
        ]
    )
    out = capsys.readouterr().out
    # nested, paths, (lmer where Rscript is installed), two K=2 rows, two K=1 rows
    assert len(ratios(out)) >= 6
    assert "max rel diff of theta" in out
    diff = float(re.search(r"max rel diff of theta ([0-9.e+-]+)", out).group(1))
    assert diff < 1e-10
