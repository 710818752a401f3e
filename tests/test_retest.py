"""``flashmm-dask test`` on stores fitted with Satterthwaite's df: new contrasts equal a run
with those contrasts in its config, df included; the statistics must be the run's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from pipeline_helpers import local_client, small_config

from flashmm_dask import InputError, StoreError
from flashmm_dask.io.results import open_results
from flashmm_dask.numerics.inference import p_adjust
from flashmm_dask.run.pipeline import STATS, run
from flashmm_dask.run.retest import retest

pytestmark = pytest.mark.distributed

CLI = os.path.join(os.path.dirname(sys.executable), "flashmm-dask")
# within donors (df near n), then the average treatment effect (between donors: df small)
NEW = {
    "b1": "cls3:trtB - cls2:trtB",
    "b2": "(cls1:trtB + cls2:trtB)/2 - cls3:trtB",
    "avg": "(cls1:trtB + cls2:trtB + cls3:trtB)/3",
}
COLUMNS = {"coef": "contrast_coef", "se": "contrast_se", "t": "contrast_t", "df": "contrast_df"}
COLUMNS |= {"p": "contrast_p", "padj": "contrast_padj"}


@pytest.fixture(scope="module")
def client():
    with local_client(processes=False) as c:
        yield c


@pytest.fixture(scope="module")
def runs(tmp_path_factory, client):
    """A Satterthwaite run with the default contrasts, and one with NEW in its config."""
    root = tmp_path_factory.mktemp("retest")
    first = run(small_config(root / "a", "model.df=satterthwaite"), client=client)
    contrasts = "contrasts={" + ", ".join(f"{k}: '{v}'" for k, v in NEW.items()) + "}"
    second = run(small_config(root / "b", "model.df=satterthwaite", contrasts), client=client)
    return first, second


def _assert_table_equals_run(table: pd.DataFrame, ds, rtol: float) -> None:
    assert list(ds["contrast"].values) == list(NEW)
    for j, name in enumerate(NEW):
        rows = table[table.term == name]
        assert list(rows["feature"]) == [str(f) for f in ds["feature"].values]
        for column, variable in COLUMNS.items():
            np.testing.assert_allclose(
                rows[column], ds[variable].values[:, j], rtol=rtol, err_msg=f"{name} {column}"
            )


def test_new_contrasts_on_a_satterthwaite_store_equal_a_run_with_them(runs):
    first, second = runs
    table = retest(str(first.store), NEW)
    ds = open_results(str(second.store))
    assert ds.attrs["config"]["model"]["df"] == "satterthwaite"
    # Satterthwaite's df: near n within donors, far below it between donors
    n = ds.attrs["n_cells"]
    within, between = (table[table.term == t]["df"].to_numpy() for t in ("b1", "avg"))
    assert np.all(within > 0.9 * n) and np.all(between < 20) and np.ptp(between) > 0
    _assert_table_equals_run(table, ds, rtol=1e-9)


def test_the_command_line_uses_the_runs_statistics(runs, tmp_path):
    first, second = runs
    out = tmp_path / "new.csv"
    args = [CLI, "test", str(first.store), "--out", str(out), "--quiet"]
    for name, expression in NEW.items():
        args += ["-c", f"{name}={expression}"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    _assert_table_equals_run(pd.read_csv(out), open_results(str(second.store)), rtol=1e-9)


def test_statistics_elsewhere_are_found_with_stats(runs, tmp_path):
    first, second = runs
    moved = tmp_path / "run"
    shutil.copytree(first.output / "results.zarr", moved / "results.zarr")
    with pytest.raises(InputError, match=r"need the run's summary statistics.*--stats PATH"):
        retest(str(moved / "results.zarr"), NEW)
    res = subprocess.run(
        [CLI, "test", str(moved / "results.zarr"), "-c", "x=cls1:trtB", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2
    assert res.stderr.strip().startswith("flashmm-dask: error: the store was fitted with")
    assert len(res.stderr.strip().splitlines()) == 1
    table = retest(str(moved / "results.zarr"), NEW, stats=str(first.output / STATS))
    _assert_table_equals_run(table, open_results(str(second.store)), rtol=1e-9)


def test_statistics_of_another_run_are_refused(runs, tmp_path, client):
    first, _ = runs
    other = run(
        small_config(tmp_path / "other", "model.df=satterthwaite", "simulate.seed=8"),
        client=client,
    )
    with pytest.raises(StoreError, match=r"do not reproduce the results store"):
        retest(str(first.store), NEW, stats=str(other.output / STATS))


def test_residual_df_stores_keep_their_df(tmp_path, client):
    summary = run(small_config(tmp_path / "res", "model.df=residual"), client=client)
    shutil.rmtree(summary.output / STATS)  # not needed with the residual df
    table = retest(str(summary.store), NEW)
    ds = open_results(str(summary.store))
    assert np.all(table["df"] == ds["df"].values[0, 0])


def test_new_contrasts_are_adjusted_as_the_run_and_carry_its_status(tmp_path, client):
    """A run adjusted by Benjamini-Yekutieli: the retested contrasts' padj are the run's
    own (not BH), and each row has the feature's status, as the run's tables."""
    contrasts = "contrasts={" + ", ".join(f"{k}: '{v}'" for k, v in NEW.items()) + "}"
    summary = run(
        small_config(tmp_path / "by", "model.df=residual", "test.p_adjust=BY", contrasts),
        client=client,
    )
    ds = open_results(str(summary.store))
    assert ds.attrs["p_adjust"] == "BY"
    table = retest(str(summary.store), NEW)
    _assert_table_equals_run(table, ds, rtol=1e-12)
    bh = p_adjust(ds["contrast_p"].values, "BH", axis=0)
    assert not np.allclose(table[table.term == "b1"]["padj"], bh[:, 0])  # BY, not BH
    run_table = pd.read_csv(summary.output / "results.csv", float_precision="round_trip")
    for name in NEW:
        mine = table[table.term == name].reset_index(drop=True)
        theirs = run_table[run_table.term == name].reset_index(drop=True)
        assert list(mine.columns) == list(theirs.columns)
        assert list(mine["status"]) == list(theirs["status"])
        np.testing.assert_allclose(mine["padj"], theirs["padj"], rtol=1e-12)
