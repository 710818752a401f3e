"""A stratified run's work done beside other work: ``stats.zarr`` saved beside the fit
(whole when the fit returns, and when it fails, so that the rerun reuses it; a failed
save is the run's error), each stratum's rows summed and read on one worker, and the top
tables written beside the results table (the files write_top_tables writes), by a task
per stratum on the cluster."""

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from distributed import get_task_stream
from pipeline_helpers import local_client
from test_strata import atlas

from flashmm_dask import load_stats, write_store
from flashmm_dask.errors import StoreError
from flashmm_dask.io.resultsets import write_top_tables
from flashmm_dask.io.strata_results import load_strata
from flashmm_dask.report import summary as report_summary
from flashmm_dask.run import pipeline_strata
from flashmm_dask.run.config import load_config
from flashmm_dask.run.pipeline import run
from flashmm_dask.run.strata_cluster import ClusterStrata, save_in_background
from flashmm_dask.stats.strata import StratifiedStats

pytestmark = pytest.mark.distributed


def _empty() -> ClusterStrata:
    return ClusterStrata(StratifiedStats({}, "cls", {}), (), {}, {}, {})


def test_saved_waits_and_raises_the_error_of_the_save(caplog) -> None:
    gate = threading.Event()
    done = []

    def slow() -> None:
        gate.wait(5)
        done.append(True)

    stats = save_in_background(slow, _empty())
    assert not done
    gate.set()
    stats.saved()
    assert done == [True]

    def failing() -> None:
        raise StoreError("cannot write the summary statistics: disk full")

    stats = save_in_background(failing, _empty())
    with pytest.raises(StoreError, match="disk full"):
        stats.saved()
    with caplog.at_level(logging.ERROR):
        stats.saved(quiet=True)  # another error is on its way: this one is logged
    assert "could not be saved" in caplog.text
    _empty().saved()  # nothing saved: nothing to wait for


@pytest.fixture(scope="module")
def client():
    with local_client() as client:
        yield client


def _settings(data, output):
    return (
        f"data.path={data}",
        "model.fixed=~ log(libsize) + trt",
        "model.random=~ 0 + sam",
        "contrasts={trt: trtB}",
        "model.by=cls",
        "fit.block_size=7",
        "output.plots=false",
        "progress=false",
        f"output.path={output}",
    )


def test_a_failed_fit_leaves_the_whole_statistics_for_the_rerun(
    tmp_path, client, monkeypatch
) -> None:
    adata = atlas(n_cells=1500, n_genes=12, seed=7)
    data = write_store(adata, tmp_path / "atlas.zarr", chunk_cells=500)
    out = tmp_path / "out"
    cfg = load_config(None, _settings(data, out))
    fit = pipeline_strata.fit_strata_stores

    def failing(*args, **kwargs):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(pipeline_strata, "fit_strata_stores", failing)
    with pytest.raises(RuntimeError, match="worker lost"):
        run(cfg, client=client)
    saved = load_stats(out / "stats.zarr")  # complete: the fit waited for it
    assert list(saved) == ["1", "2", "3"]

    monkeypatch.setattr(pipeline_strata, "fit_strata_stores", fit)
    with get_task_stream(client) as stream:
        summary = run(cfg, client=client)
    assert summary.strata == ("1", "2", "3")
    # each stratum's top tables were written by a task on the cluster
    keys = [str(task["key"]) for task in stream.data]
    assert sum(key.startswith("write_stratum_top") for key in keys) == 3
    again = load_stats(out / "stats.zarr")
    for level in saved:
        np.testing.assert_array_equal(again[level].ZY, saved[level].ZY)
        np.testing.assert_array_equal(again[level].XY, saved[level].XY)

    # the top tables, written beside results.csv: those write_top_tables writes, listed
    # among the run's files before report.md
    reference = write_top_tables(load_strata(out / "results.zarr"), tmp_path / "reference")
    assert len(reference) == 3
    files = [Path(f) for f in summary.files]
    for path in reference:
        relative = path.relative_to(tmp_path / "reference")
        assert (out / relative).read_bytes() == path.read_bytes()
        assert files.index(out / relative) < files.index(out / "report.md")

    # the report lists the top tables its caller wrote, and does not write them again
    def unexpected(*args, **kwargs):
        raise AssertionError("the top tables were written again")

    monkeypatch.setattr(report_summary, "write_top_tables", unexpected)
    listed = report_summary.report_outputs(
        out / "results.zarr", tmp_path / "again", top=[tmp_path / "x.csv"]
    )
    assert listed == [tmp_path / "x.csv", tmp_path / "again" / "report.md"]


def test_rows_are_summed_on_the_workers_in_turn_and_read_there(tmp_path) -> None:
    """Each stratum's rows are summed on a worker holding a chain, dealt in turn, and the
    tasks that read them (its write, its blocks) are placed on that worker."""
    from distributed import Client, LocalCluster, wait

    from flashmm_dask.run.inputs import cluster_strata_stats, prepare_strata

    adata = atlas(n_cells=1500, n_genes=12, seed=7)
    data = write_store(adata, tmp_path / "atlas.zarr", chunk_cells=250)
    cfg = load_config(None, (*_settings(data, tmp_path / "out"), "stats.save=false"))
    inputs = prepare_strata(cfg, tmp_path / "out")
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as client,
    ):
        stats = cluster_strata_stats(cfg, client, tmp_path / "out", inputs)
        workers = sorted(client.scheduler_info()["workers"])
        assert list(stats.homes) == ["1", "2", "3"]
        assert set(stats.homes.values()) <= set(workers)
        wait(list(stats.rows.values()))
        held = client.who_has(list(stats.rows.values()))
        for level, home in stats.homes.items():
            assert list(held[stats.rows[level].key]) == [home]
            assert stats.at(level) == {"workers": [home], "allow_other_workers": True}
        if len(set(stats.homes.values())) == 2:  # both workers hold a chain: dealt in turn
            assert stats.homes["1"] != stats.homes["2"] and stats.homes["1"] == stats.homes["3"]
