"""The main job on real Dask clusters: equality with the in-process fit, worker counts,
resume after a kill, refusal of a different config, the output lock."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from distributed import Client, LocalCluster
from pipeline_helpers import assert_stores_equal, local_client, small_config

from flashmm_dask import StoreError, flashmm, lmmtest
from flashmm_dask.io.results import blocks_done, open_results
from flashmm_dask.run.config import dump_config
from flashmm_dask.run.output import LOCK
from flashmm_dask.run.pipeline import RESULTS, SIMULATED, run

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def one_worker():
    with local_client() as client:
        yield client


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, one_worker):
    out = tmp_path_factory.mktemp("reference")
    cfg = small_config(out)
    summary = run(cfg, client=one_worker)
    return cfg, summary


def test_run_equals_in_process_flashmm(reference_run):
    cfg, summary = reference_run
    ds = open_results(str(summary.store))
    fit = flashmm(
        str(summary.output / SIMULATED),
        cfg.model.fixed,
        cfg.model.random,
        is_counts=True,
        method=cfg.model.method,
        df=cfg.model.df,  # the run's defaults: satterthwaite, nonnegative
        nonnegative=cfg.model.nonnegative,
    )
    assert (cfg.model.df, cfg.model.nonnegative) == ("satterthwaite", True)
    np.testing.assert_array_equal(ds["status"].values, fit.status)
    np.testing.assert_allclose(ds["df"].values, fit.df.T, rtol=1e-12)
    np.testing.assert_allclose(ds["coef"].values, fit.coef.T, rtol=1e-12)
    np.testing.assert_allclose(ds["se"].values, fit.se.T, rtol=1e-12)
    np.testing.assert_allclose(ds["p"].values, fit.p.T, rtol=1e-12)
    np.testing.assert_allclose(ds["theta"].values, fit.theta.T, rtol=1e-12)
    np.testing.assert_array_equal(ds["niter"].values, fit.niter)
    np.testing.assert_array_equal(ds["converged"].values, fit.converged)
    np.testing.assert_allclose(ds["cov"].values, fit.cov, rtol=1e-12)
    tested = lmmtest(fit, contrast=dict(cfg.contrasts))
    for j, name in enumerate(cfg.contrasts):
        np.testing.assert_allclose(
            ds["contrast_coef"].values[:, j], tested[f"{name}_coef"], rtol=1e-12
        )
        np.testing.assert_allclose(ds["contrast_p"].values[:, j], tested[f"{name}_p"], rtol=1e-12)
    assert list(ds["feature"].values) == list(fit.features)
    assert ds.attrs["complete"] is True
    assert summary.n_blocks == 5 and summary.blocks_fitted == (0, 1, 2, 3, 4)
    assert (summary.output / "results.csv").exists() and (
        summary.output / "results.parquet"
    ).exists()


def test_several_worker_processes_agree(reference_run, tmp_path):
    _, summary = reference_run
    out = tmp_path / "three"
    with (
        LocalCluster(
            n_workers=3, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as client,
    ):
        other = run(small_config(out), client=client)
    assert_stores_equal(open_results(str(summary.store)), open_results(str(other.store)))


def test_rerun_of_a_complete_run_fits_nothing(reference_run, one_worker):
    cfg, summary = reference_run
    again = run(cfg, client=one_worker)
    assert again.blocks_fitted == ()
    assert again.n_converged == summary.n_converged


def test_different_config_on_existing_output_is_refused(reference_run, one_worker):
    cfg, summary = reference_run
    other = cfg.with_overrides(["model.method=ML"])
    with pytest.raises(StoreError, match=r"different configuration.*--overwrite"):
        run(other, client=one_worker)
    # nothing was touched
    assert open_results(str(summary.store)).attrs["method"] == "REML"


def test_overwrite_replaces_a_different_run(tmp_path, one_worker):
    cfg = small_config(tmp_path, "simulate.n_genes=12", "simulate.n_de_genes=3")
    run(cfg, client=one_worker)
    ml = cfg.with_overrides(["model.method=ML", "output.overwrite=true"])
    summary = run(ml, client=one_worker)
    assert open_results(str(summary.store)).attrs["method"] == "ML"
    assert summary.blocks_fitted == (0, 1)


def test_output_in_use_is_refused(tmp_path, one_worker):
    # a lock held by another live process on this host
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(f"{socket.gethostname()} {holder.pid}\n")
        with pytest.raises(StoreError, match="in use by a run"):
            run(small_config(tmp_path), client=one_worker)
        assert not (tmp_path / RESULTS).exists()
    finally:
        holder.kill()
        holder.wait()
    # once its holder is gone, the lock is stale and the run takes it over
    summary = run(small_config(tmp_path), client=one_worker)
    assert summary.n_blocks == 5 and not (tmp_path / LOCK).exists()


def test_resume_after_kill_fits_only_missing_blocks(tmp_path, one_worker):
    """Kill a running `flashmm-dask run` after some blocks, rerun: only the rest is fitted
    and the store equals an uninterrupted run."""
    out = tmp_path / "killed"
    # many small blocks, one worker, so the run is still going when we kill it
    cfg = small_config(out, "fit.block_size=1", "cluster.n_workers=1")
    config_file = tmp_path / "run.yaml"
    dump_config(cfg, config_file)
    cli = os.path.join(os.path.dirname(sys.executable), "flashmm-dask")
    proc = subprocess.Popen(
        [cli, "run", str(config_file), "--quiet"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    store = out / RESULTS
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if (store / "zarr.json").exists() and blocks_done(str(store)).sum() >= 3:
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be killed: {proc.stderr.read()}")
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()  # a pipe left to the garbage collector warns in a later test
    done_at_kill = blocks_done(str(store))
    assert 3 <= done_at_kill.sum() < done_at_kill.size, "kill did not land mid-run"
    assert not open_results(str(store), allow_incomplete=True).attrs["complete"]

    resumed = run(cfg, client=one_worker)
    assert set(resumed.blocks_fitted) == set(np.flatnonzero(~done_at_kill))
    history = open_results(str(resumed.store)).attrs["history"]
    assert history[-1]["blocks_fitted"] == sorted(resumed.blocks_fitted)
    uninterrupted = run(
        cfg.with_overrides([f"output.path={tmp_path / 'whole'}"]), client=one_worker
    )
    assert_stores_equal(
        open_results(str(resumed.store)), open_results(str(uninterrupted.store)), rtol=0
    )


def test_satterthwaite_and_by_in_a_run(tmp_path, one_worker):
    """model.df and test.p_adjust reach the store: df, p and padj equal the in-process fit."""
    from flashmm_dask.numerics.inference import p_adjust

    cfg = small_config(tmp_path, "model.df=satterthwaite", "test.p_adjust=BY")
    summary = run(cfg, client=one_worker)
    ds = open_results(str(summary.store))
    fit = flashmm(
        str(summary.output / SIMULATED),
        cfg.model.fixed,
        cfg.model.random,
        is_counts=True,
        df="satterthwaite",
    )
    np.testing.assert_allclose(ds["df"].values, fit.df.T, rtol=1e-10)
    assert np.all(ds["df"].values < fit.n - len(fit.covariates))
    np.testing.assert_allclose(ds["p"].values, fit.p.T, rtol=1e-10)
    np.testing.assert_allclose(ds["padj"].values, p_adjust(fit.p.T, "BY", axis=0), rtol=1e-10)
    tested = lmmtest(fit, contrast=dict(cfg.contrasts), df="satterthwaite")
    for j, name in enumerate(cfg.contrasts):
        np.testing.assert_allclose(ds["contrast_df"].values[:, j], tested[f"{name}_df"], rtol=1e-10)
        np.testing.assert_allclose(ds["contrast_p"].values[:, j], tested[f"{name}_p"], rtol=1e-10)
    assert ds.attrs["p_adjust"] == "BY"
