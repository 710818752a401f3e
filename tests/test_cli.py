"""The flashmm-dask command line: help, the demo, user errors as one line, test and report
on a finished store, stats then fit from saved statistics."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from pipeline_helpers import SMALL, assert_stores_equal

from flashmm_dask.cli import main
from flashmm_dask.io.results import open_results
from flashmm_dask.numerics.inference import contrast_tests

CLI = os.path.join(os.path.dirname(sys.executable), "flashmm-dask")
COMMANDS = ("run", "demo", "simulate", "stats", "fit", "test", "report")


def cli(*args, cwd=None):
    return subprocess.run([CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def small_args(output):
    args = ["--quiet", "--output", str(output), "--workers", "1"]
    for item in SMALL:
        args += ["--set", item]
    return args


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: flashmm-dask " + command in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "does-not-exist.yaml"], "does-not-exist.yaml"),
        (["run", "configs/demo.yaml", "--set", "model.method=GLS"], "model.method"),
        (["run", "configs/demo.yaml", "--set", "cluster.slurm.coress=2"], "coress"),
        (["test", "no-store.zarr", "-c", "x=a - b"], "no-store.zarr"),
        (["report", "no-store.zarr"], "no-store.zarr"),
    ],
)
def test_user_errors_are_one_line(args, message):
    res = cli(*args, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("flashmm-dask: error: ") and message in lines[0]
    assert "Traceback" not in res.stderr


def test_debug_shows_the_traceback():
    res = cli("run", "does-not-exist.yaml", "--debug")
    assert res.returncode != 0 and "Traceback" in res.stderr


@pytest.mark.distributed
def test_demo_then_test_and_report(tmp_path):
    out = tmp_path / "demo"
    # `test` reuses the store's residual df (R FLASHMM's), no longer the run default
    residual = ["--set", "model.df=residual", "--set", "model.nonnegative=false"]
    res = cli("demo", *small_args(out), *residual)
    assert res.returncode == 0, res.stderr
    assert "features in 5 blocks" in res.stdout
    for name in ("results.zarr", "results.csv", "results.parquet", "stats.zarr"):
        assert (out / name).exists(), name
    store = out / "results.zarr"
    ds = open_results(str(store))

    res = cli(
        "test",
        str(store),
        "-c",
        "B_in_cls2=cls2:trtB",
        "-c",
        "d=cls3:trtB - cls2:trtB",
        "--alternative",
        "greater",
    )
    assert res.returncode == 0, res.stderr
    table = pd.read_csv(out / "contrasts.csv")
    covariates = list(ds["covariate"].values)
    L = np.zeros((len(covariates), 2))
    L[covariates.index("cls2:trtB"), 0] = 1
    L[covariates.index("cls3:trtB"), 1] = 1
    L[covariates.index("cls2:trtB"), 1] = -1
    coef, _, p = contrast_tests(
        ds["coef"].values, ds["cov"].values, L, ds["df"].values[0, 0], "greater"
    )
    for j, name in enumerate(["B_in_cls2", "d"]):
        rows = table[table.term == name]
        np.testing.assert_allclose(rows["coef"], coef[:, j], rtol=1e-12)
        np.testing.assert_allclose(rows["p"], p[:, j], rtol=1e-12)
    # the single-coefficient contrast equals the fitted coefficient
    np.testing.assert_allclose(
        table[table.term == "B_in_cls2"]["coef"],
        ds["coef"].values[:, covariates.index("cls2:trtB")],
    )

    res = cli("report", str(store))
    assert res.returncode == 0, res.stderr
    assert (out / "plots" / "convergence.png").stat().st_size > 5000


@pytest.mark.distributed
def test_stats_then_fit_from_saved_statistics(tmp_path):
    first = tmp_path / "first"
    res = cli(
        "stats",
        "configs/demo.yaml",
        *small_args(first),
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert res.returncode == 0, res.stderr
    stats = first / "stats.zarr"
    assert stats.exists() and not (first / "results.zarr").exists()
    res = cli(
        "fit",
        "configs/demo.yaml",
        "--stats",
        str(stats),
        *small_args(tmp_path / "fit"),
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert res.returncode == 0, res.stderr
    res = cli(
        "run",
        "configs/demo.yaml",
        *small_args(tmp_path / "whole"),
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert res.returncode == 0, res.stderr
    assert_stores_equal(
        open_results(str(tmp_path / "fit" / "results.zarr")),
        open_results(str(tmp_path / "whole" / "results.zarr")),
        rtol=0,
    )


@pytest.mark.distributed
def test_fit_from_saved_statistics_applies_data_features(tmp_path):
    """data.features selects among the features of statistics loaded with --stats (it was
    ignored: every feature was fitted), and the selected features' results are those of
    the whole fit."""
    root = os.path.dirname(os.path.dirname(__file__))
    res = cli("stats", "configs/demo.yaml", *small_args(tmp_path / "first"), cwd=root)
    assert res.returncode == 0, res.stderr
    stats = tmp_path / "first" / "stats.zarr"

    def fit(out, *extra):
        return cli(
            "fit", "configs/demo.yaml", "--stats", str(stats), *small_args(out), *extra, cwd=root
        )

    whole = tmp_path / "whole"
    res = fit(whole)
    assert res.returncode == 0, res.stderr
    names = list(open_results(str(whole / "results.zarr"))["feature"].values)
    chosen = [names[4], names[1]]
    picked = tmp_path / "picked"
    res = fit(picked, "--set", f"data.features=[{chosen[0]}, {chosen[1]}]")
    assert res.returncode == 0, res.stderr
    ds = open_results(str(picked / "results.zarr"))
    assert list(ds["feature"].values) == [names[1], names[4]]  # in the statistics' order
    full = open_results(str(whole / "results.zarr"))
    np.testing.assert_array_equal(ds["coef"].values, full["coef"].values[[1, 4]])
    res = fit(tmp_path / "bad", "--set", "data.features=[no_such_gene]")
    assert res.returncode == 2 and "no_such_gene" in res.stderr
