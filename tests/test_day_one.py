"""What a new user meets on day one (issue 16), through the command line on small data.

Each test runs ``flashmm-dask`` as a user would (``main`` in this process, or the console
script where its standard error matters) on a few hundred simulated cells.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import re
import signal
import subprocess
import sys
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from pipeline_helpers import in_process_cli

from flashmm_dask import InputError, flashmm, simulate_to_store
from flashmm_dask.cli import main
from flashmm_dask.io.outputs import MANIFEST
from flashmm_dask.io.results import open_results
from flashmm_dask.run import progress
from flashmm_dask.run.progress import Timings, stop_on_signals

CLI = os.path.join(os.path.dirname(sys.executable), "flashmm-dask")
FIXED, RANDOM = "~ 0 + log(libsize) + cls + cls:trt", "~ 0 + sam"
QUICK = {
    "fit": {"block_size": 4},
    "cluster": {"n_workers": 1, "processes": False},
    "output": {"plots": False},
    "progress": False,
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "base.zarr"
    simulate_to_store(
        path, n_genes=8, n_cells=300, n_samples=4, n_de_genes=2, seed=3, store_chunk_cells=100
    )
    return path


def _write(path: Path, X, obs: pd.DataFrame, names) -> Path:
    with warnings.catch_warnings():  # anndata's about the duplicated names of a case
        warnings.simplefilter("ignore", UserWarning)
        adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=list(names)))
        with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
            adata.write_zarr(path)
    return path


def _config(path: Path, **sections) -> Path:
    tree = {**QUICK, **sections}
    path.write_text(yaml.safe_dump(tree))
    return path


def _cli(*args: str) -> tuple[int, str, str]:
    """``flashmm-dask ARGS`` in this process: status, standard output and standard error."""
    out, err = io.StringIO(), io.StringIO()
    with in_process_cli(), redirect_stderr(err), redirect_stdout(out):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def _error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flashmm-dask: error: "), err
    return lines[0]


# 1. a config of one's own inherits neither the demo's contrasts nor its model


def test_config_without_contrasts_runs_without_the_demo_contrasts(base, tmp_path):
    cfg = _config(
        tmp_path / "mine.yaml",
        data={"path": str(base)},
        model={"fixed": "~ 0 + log(libsize) + cls", "random": RANDOM},
    )
    code, _, err = _cli("run", cfg, "--output", tmp_path / "out", "--quiet")
    assert code == 0, err
    ds = open_results(tmp_path / "out" / "results.zarr")
    assert ds.sizes.get("contrast", 0) == 0
    assert list(ds["covariate"].values) == ["log(libsize)", "cls1", "cls2", "cls3"]


def test_config_without_a_model_is_refused_in_one_line(base, tmp_path):
    cfg = _config(tmp_path / "nomodel.yaml", data={"path": str(base)})
    code, _, err = _cli("run", cfg, "--output", tmp_path / "out", "--quiet")
    assert code == 2
    assert "config key 'model.fixed' is not set" in _error_line(err)
    assert not (tmp_path / "out" / "results.zarr").exists()


def test_demo_config_states_its_model_and_contrasts():
    demo = yaml.safe_load((Path(__file__).parents[1] / "configs" / "demo.yaml").read_text())
    assert demo["model"]["fixed"] == FIXED and demo["model"]["random"] == RANDOM
    assert set(demo["contrasts"]) == {"trt_in_cls1", "trt_cls2_vs_cls1"}


# 5. fit --stats refuses a config whose model is not the statistics' model


def test_fit_stats_refuses_another_model_and_takes_the_stored_one(base, tmp_path):
    cfg = _config(
        tmp_path / "run.yaml", data={"path": str(base)}, model={"fixed": FIXED, "random": RANDOM}
    )
    stats = tmp_path / "s" / "stats.zarr"
    code, _, err = _cli("stats", cfg, "--output", tmp_path / "s", "--quiet")
    assert code == 0, err
    other = _config(
        tmp_path / "other.yaml",
        data={"path": str(base)},
        model={"fixed": "~ 0 + log(libsize) + cls", "random": RANDOM},
    )
    code, _, err = _cli("fit", other, "--stats", stats, "--output", tmp_path / "o", "--quiet")
    assert code == 2
    line = _error_line(err)
    assert "config key 'model.fixed' ('~ 0 + log(libsize) + cls') differs" in line, line
    assert not (tmp_path / "o" / "results.zarr").exists()

    no_model = _config(tmp_path / "nomodel.yaml", data={"path": str(base)})
    code, _, err = _cli("fit", no_model, "--stats", stats, "--output", tmp_path / "f", "--quiet")
    assert code == 0, err
    ds = open_results(tmp_path / "f" / "results.zarr")
    assert ds.attrs["fixed"] == FIXED
    assert "cls2:trtB" in list(ds["covariate"].values)


def test_fit_stats_of_strata_refuses_another_model_or_selection(base, tmp_path):
    """The same check for the statistics of strata (model.by): another model or cell
    selection is refused in one line, before any work; the statistics' own is fitted."""
    model = {"fixed": "~ log(libsize) + trt", "random": RANDOM, "by": "cls"}
    data = {"path": str(base), "cells": "libsize > 0"}
    cfg = _config(tmp_path / "run.yaml", data=data, model=model)
    code, _, err = _cli("stats", cfg, "--output", tmp_path / "s", "--quiet")
    assert code == 0, err
    stats = tmp_path / "s" / "stats.zarr"
    for key, value, shown in (
        ("model.fixed", "~ trt", "config key 'model.fixed' ('~ trt') differs"),
        ("model.transform", "none", "config key 'model.transform' ('none') differs"),
        ("data.cells", "libsize > 1", "config key 'data.cells' ('libsize > 1') differs"),
    ):
        out = tmp_path / key
        code, _, err = _cli(
            "fit", cfg, "--stats", stats, "--output", out, "--set", f"{key}={value}"
        )
        assert code == 2 and shown in _error_line(err.strip().splitlines()[-1]), err
        assert not out.exists()
    code, _, err = _cli("fit", cfg, "--stats", stats, "--output", tmp_path / "f", "--quiet")
    assert code == 0, err


# 8. duplicated feature names are made unique (as anndata does), with a warning


def test_duplicated_feature_names_are_made_unique_with_a_warning(base, tmp_path, caplog):
    a = ad.read_zarr(base)
    names = ["g"] * 3 + [f"u{i}" for i in range(a.n_vars - 3)]
    dup = _write(tmp_path / "dup.zarr", a.X, a.obs, names)
    cfg = _config(
        tmp_path / "run.yaml",
        data={"path": str(dup), "features": ["g-1", "g-2", "u0"]},
        model={"fixed": FIXED, "random": RANDOM},
    )
    res = subprocess.run(
        [CLI, "run", str(cfg), "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "duplicated feature names" in res.stderr and "'g' x3" in res.stderr
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(dict.fromkeys(table["feature"])) == ["g-1", "g-2", "u0"]

    # the repeated name itself selects every column of that name, reported with positions
    with caplog.at_level(logging.WARNING, logger="flashmm_dask"):
        code, _, err = _cli(
            "run", cfg, "--output", tmp_path / "all", "--set", "data.features=[u1, g]"
        )
    assert code == 0, err
    assert "'g' at positions 0, 1, 2" in caplog.text
    table = pd.read_csv(tmp_path / "all" / "results.csv")
    assert list(dict.fromkeys(table["feature"])) == ["g", "g-1", "g-2", "u1"]

    # an unknown name is reported with the true number of features
    code, _, err = _cli(
        "run", cfg, "--output", tmp_path / "none", "--set", "data.features=[NOTAGENE]", "--quiet"
    )
    assert code == 2
    line = err.strip().splitlines()[-1]  # after the warning's log line
    assert f"the data have {a.n_vars} features" in _error_line(line)
    assert not (tmp_path / "none").exists()


# 9. integer ids in a random formula are a grouping factor, as in lme4


def test_integer_donor_ids_are_a_factor(base, tmp_path, caplog):
    a = ad.read_zarr(base)
    codes = {s: i + 1 for i, s in enumerate(sorted(a.obs["sam"].astype(str).unique()))}
    obs = a.obs.copy()
    obs["donor"] = obs["sam"].astype(str).map(codes).astype(np.int64)
    ints = _write(tmp_path / "ints.zarr", a.X, obs, a.var_names)
    cfg = _config(
        tmp_path / "run.yaml",
        data={"path": str(ints)},
        model={"fixed": FIXED, "random": "~ 0 + donor"},
    )
    with caplog.at_level(logging.INFO, logger="flashmm_dask"):
        code, _, err = _cli("run", cfg, "--output", tmp_path / "ints")
    assert code == 0, err
    assert "'donor' holds integers: read as factor" in caplog.text
    cfg2 = _config(
        tmp_path / "sam.yaml", data={"path": str(base)}, model={"fixed": FIXED, "random": RANDOM}
    )
    code, _, err = _cli("run", cfg2, "--output", tmp_path / "sam", "--quiet")
    assert code == 0, err
    x, y = (
        open_results(tmp_path / "ints" / "results.zarr"),
        open_results(tmp_path / "sam" / "results.zarr"),
    )
    assert x.sizes["feature"] == y.sizes["feature"]
    np.testing.assert_allclose(x["coef"].values, y["coef"].values, rtol=1e-10)
    np.testing.assert_allclose(x["theta"].values, y["theta"].values, rtol=1e-8)


# 10. a misspelled keyword is refused before the data are read


def test_misspelled_keyword_is_refused_before_reading(tmp_path):
    with pytest.raises(InputError, match=r"'layers' \(did you mean 'layer'\?\); valid keywords"):
        flashmm(tmp_path / "does-not-exist.zarr", FIXED, RANDOM, layers="counts")
    with pytest.raises(InputError, match=r"'metod' \(did you mean 'method'\?\)"):
        flashmm(tmp_path / "does-not-exist.zarr", FIXED, RANDOM, metod="ML")


# 4. progress: a log line at every tenth outside a terminal, a labelled bar in one


def _progress_config(base: Path, tmp_path: Path) -> Path:
    return _config(
        tmp_path / "run.yaml",
        data={"path": str(base), "chunk_cells": 20},
        model={"fixed": FIXED, "random": RANDOM},
        progress=True,
    )


def test_progress_is_logged_at_every_tenth_outside_a_terminal(base, tmp_path):
    res = subprocess.run(
        [CLI, "run", str(_progress_config(base, tmp_path)), "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    lines = re.findall(r"reduction: (\d+)% \((\d+)/(\d+) tasks", res.stderr)
    # how many tenths are seen depends on how fast the tasks finish between the feed's
    # updates; the line at every tenth is checked in test_progress_logs_every_tenth_crossed
    assert len(lines) >= 1, res.stderr
    percents = [int(p) for p, _, _ in lines]
    assert percents == sorted(percents) and percents[-1] == 100
    assert all(p % 10 == 0 for p in percents)
    assert lines[-1][1] == lines[-1][2]
    assert "fitting: 100%" in res.stderr
    assert "Traceback" not in res.stderr


def test_progress_logs_every_tenth_crossed(caplog):
    from flashmm_dask.run.progress import PhaseProgress

    progress = PhaseProgress.__new__(PhaseProgress)  # the feed's updates, without a scheduler
    progress.what, progress.live, progress.logged = "reduction", False, 0
    with caplog.at_level(logging.INFO, logger="flashmm_dask.run.progress"):
        for done in range(22):
            progress.update(done, 21, 0.1 * done)
    percents = [
        int(re.match(r"reduction: (\d+)%", r.getMessage()).group(1)) for r in caplog.records
    ]
    assert percents == list(range(10, 101, 10))  # one line at each tenth, none twice


def test_progress_bar_in_a_terminal_is_labelled(base, tmp_path):
    parent, child = pty.openpty()
    with open(tmp_path / "stdout", "w") as out:
        proc = subprocess.Popen(
            [CLI, "run", str(_progress_config(base, tmp_path)), "--output", str(tmp_path / "o")],
            stdout=out,
            stderr=child,
        )
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(parent, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(parent)
    assert proc.wait(timeout=300) == 0
    shown = b"".join(chunks).decode(errors="replace")
    assert re.search(r"\rreduction \[#* *\] +\d+% \| \d+/\d+ tasks", shown), shown
    assert re.search(r"\rfitting \[#+ *\] 100% \|", shown), shown


# 3. Ctrl-C: one line, status 130, the local cluster closed


def _default_sigint() -> None:
    """In the child: SIGINT as a terminal's foreground job has it. A suite started in the
    background by a non-interactive shell ignores SIGINT, and children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("phase", ["reduction: ", "fitting: "])
def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, phase):
    cfg = _config(
        tmp_path / "run.yaml",
        simulate={"n_cells": 20000, "n_genes": 200, "chunk_cells": 500, "seed": 2},
        data={"chunk_cells": 500},
        model={"fixed": FIXED, "random": RANDOM},
        fit={"block_size": 4},
        cluster={"n_workers": 2, "processes": True},
    )
    proc = subprocess.Popen(
        [CLI, "run", str(cfg), "--output", str(tmp_path / "out")],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        preexec_fn=_default_sigint,
    )
    assert proc.stderr is not None
    seen = []
    with proc.stderr:  # closed here: a pipe left to the garbage collector warns later
        for line in proc.stderr:
            seen.append(line)
            if phase in line:
                break
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole group gets it
        rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, "".join(seen) + rest
    assert rest.strip().splitlines() == [
        "flashmm-dask: interrupted; rerun the same command to resume"
    ], rest
    with pytest.raises(ProcessLookupError):  # no worker process left behind
        for _ in range(50):
            os.killpg(proc.pid, 0)
            time.sleep(0.2)


def test_an_interrupt_a_library_swallowed_still_stops_the_run():
    """Ctrl-C that lands where a library catches the KeyboardInterrupt (a finalizer, a
    callback) is remembered: the phase it came in ends with KeyboardInterrupt and the next
    one never starts, so the run stops with 130 instead of finishing."""
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    timings = Timings()
    try:
        stop_on_signals()
        with pytest.raises(KeyboardInterrupt), timings.phase("statistics"):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the handler runs here, at the latest
            except KeyboardInterrupt:
                pass  # swallowed, as a library's except clause would
        assert "statistics" in timings
        with pytest.raises(KeyboardInterrupt), timings.phase("fitting"):
            raise AssertionError("a phase started after the interrupt")
        assert "fitting" not in timings
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])
        progress._interrupted.clear()


# 6. the output folder: the package replaces only what it owns


def test_output_folder_holds_a_manifest_and_foreign_files_are_safe(base, tmp_path):
    cfg = _config(
        tmp_path / "run.yaml", data={"path": str(base)}, model={"fixed": FIXED, "random": RANDOM}
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_text("my own table\n")
    code, _, err = _cli("run", cfg, "--output", out, "--quiet")
    assert code == 2
    assert "holds 'results.csv', which flashmm-dask did not write" in _error_line(err)
    assert "--overwrite" in _error_line(err)
    assert (out / "results.csv").read_text() == "my own table\n"
    assert sorted(p.name for p in out.iterdir()) == ["results.csv"]

    (out / "results.csv").rename(out / "mine.csv")
    (out / "plots").mkdir()
    (out / "plots" / "my-figure.png").write_bytes(b"mine")
    code, _, err = _cli("run", cfg, "--output", out, "--quiet", "--set", "output.plots=true")
    assert code == 0, err
    manifest = json.loads((out / MANIFEST).read_text())["files"]
    assert {"results.zarr", "stats.zarr", "results.csv", "results.parquet"} <= set(manifest)
    assert "plots/convergence.png" in manifest and "plots/my-figure.png" not in manifest
    store = out / "results.zarr"
    code, _, err = _cli("test", store, "-c", "x=cls1:trtB", "--quiet")
    assert code == 0, err
    assert "contrasts.csv" in json.loads((out / MANIFEST).read_text())["files"]

    # --overwrite with another config: the manifest's files go (the stale contrasts.csv
    # too), the user's stay
    code, _, err = _cli(
        "run", cfg, "--output", out, "--quiet", "--overwrite", "--set", "model.method=ML"
    )
    assert code == 0, err
    assert not (out / "contrasts.csv").exists()
    assert not (out / "plots" / "convergence.png").exists()
    assert (out / "plots" / "my-figure.png").read_bytes() == b"mine"
    assert (out / "mine.csv").read_text() == "my own table\n"
    assert open_results(store).attrs["method"] == "ML"


def test_overwrite_of_a_stratified_run_keeps_the_users_files_among_its_plots(base, tmp_path):
    """The strata's plots are the manifest's files like any other: --overwrite removes
    them and the folders they leave empty, never a file of the user's beside them."""
    model = {"fixed": "~ log(libsize) + trt", "random": RANDOM, "by": "cls"}
    cfg = _config(tmp_path / "run.yaml", data={"path": str(base)}, model=model)
    out = tmp_path / "out"
    code, _, err = _cli("run", cfg, "--output", out, "--quiet", "--set", "output.plots=true")
    assert code == 0, err
    plots = sorted(out.glob("strata/*/plots/*.png"))
    assert plots and all(f"{p.relative_to(out)}" in _manifest(out) for p in plots)
    mine = [out / "strata" / "notes.txt", plots[0].parent / "mine.txt"]
    for path in mine:
        path.write_text("mine")
    code, _, err = _cli(
        "run", cfg, "--output", out, "--quiet", "--overwrite", "--set", "model.method=ML"
    )
    assert code == 0, err
    assert all(path.read_text() == "mine" for path in mine)
    assert not any(p.exists() for p in plots)  # plots=false now: the old ones are gone
    assert sorted(p.relative_to(out).parts[:2] for p in out.glob("strata/*")) == [
        ("strata", plots[0].parent.parent.name),  # the folder with the user's file
        ("strata", "notes.txt"),
    ]


def test_a_relative_output_folder_records_names_in_it(base, tmp_path, monkeypatch):
    """--output out (relative): the manifest names its files relative to the folder, so
    --overwrite finds them, a top table of a contrast no longer in the config included."""
    monkeypatch.chdir(tmp_path)
    model = {"fixed": FIXED, "random": RANDOM}
    cfg = _config(tmp_path / "run.yaml", data={"path": str(base)}, model=model)
    code, _, err = _cli(
        "run", cfg, "--output", "out", "--quiet", "--set", "contrasts.old=cls1:trtB"
    )
    assert code == 0, err
    names = _manifest(tmp_path / "out")
    assert "top/old.csv" in names and not any(n.startswith("out/") for n in names), names
    code, _, err = _cli("run", cfg, "--output", "out", "--quiet", "--overwrite")
    assert code == 0, err
    assert not (tmp_path / "out" / "top" / "old.csv").exists()


def test_report_of_a_stratified_store_writes_plots_tables_and_report(base, tmp_path):
    """flashmm-dask report on a model.by run's store: each stratum's plots, its top
    tables and report.md again (it wrote the plots only), all in the manifest."""
    model = {"fixed": "~ log(libsize) + trt", "random": RANDOM, "by": "cls"}
    cfg = _config(tmp_path / "run.yaml", data={"path": str(base)}, model=model)
    out = tmp_path / "out"
    code, _, err = _cli("run", cfg, "--output", out, "--quiet", "--set", "contrasts.t=trtB")
    assert code == 0, err
    tables = sorted(p.relative_to(out) for p in out.glob("top/*/*.csv"))
    (out / "report.md").unlink()
    for path in tables:
        (out / path).unlink()
    code, text, err = _cli("report", out / "results.zarr")
    assert code == 0, err
    assert (out / "report.md").exists() and tables
    assert all((out / path).exists() for path in tables)
    plots = sorted(p.relative_to(out).as_posix() for p in out.glob("strata/*/plots/*.png"))
    assert plots and set(plots) <= _manifest(out)
    assert "report.md" in _manifest(out) and "top tables" in text


def test_a_stratum_where_the_selected_features_are_zero_leaves_the_others(base, tmp_path):
    """A gene that one cell type does not express: that stratum's rows are all_zero, the
    others are fitted (the run failed as a whole after its data pass); every stratum
    zero is still refused."""
    adata = ad.read_zarr(base)
    X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    X[(adata.obs["cls"] == "1").to_numpy(), 0] = 0
    path = _write(tmp_path / "d.zarr", X, adata.obs, adata.var_names)
    model = {"fixed": "~ log(libsize) + trt", "random": RANDOM, "by": "cls"}
    data = {"path": str(path), "features": [str(adata.var_names[0])]}
    cfg = _config(tmp_path / "run.yaml", data=data, model=model)
    code, _, err = _cli("run", cfg, "--output", tmp_path / "out", "--quiet")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "out" / "results.csv", dtype={"stratum": str})
    status = table.groupby("stratum")["status"].first()
    assert status["1"] == "all_zero" and (status.drop("1") != "all_zero").all(), status
    X[:, 0] = 0
    path = _write(tmp_path / "z.zarr", X, adata.obs, adata.var_names)
    cfg = _config(tmp_path / "z.yaml", data={**data, "path": str(path)}, model=model)
    code, _, err = _cli("run", cfg, "--output", tmp_path / "z", "--quiet")
    assert code == 2 and "zero in every cell of every stratum" in _error_line(err), err


def _manifest(out: Path) -> set[str]:
    return set(json.loads((out / MANIFEST).read_text())["files"])


def test_a_refused_run_leaves_no_folder(base, tmp_path):
    cfg = _config(tmp_path / "run.yaml", data={"path": str(base)}, model={"fixed": FIXED})
    out = tmp_path / "new" / "out"
    code, _, err = _cli("run", cfg, "--output", out, "--quiet")
    assert code == 2 and "model.random" in _error_line(err)
    assert not out.exists()
    code, _, err = _cli("run", cfg, "--output", out, "--set", "model.random=~ 0 + nosuch")
    assert code == 2 and "nosuch" in _error_line(err.strip().splitlines()[-1])
    assert not out.exists()


def test_a_different_configuration_names_the_key(base, tmp_path):
    cfg = _config(
        tmp_path / "run.yaml", data={"path": str(base)}, model={"fixed": FIXED, "random": RANDOM}
    )
    code, _, err = _cli("run", cfg, "--output", tmp_path / "out", "--quiet")
    assert code == 0, err
    code, _, err = _cli(
        "run", cfg, "--output", tmp_path / "out", "--quiet", "--set", "model.max_iter=7"
    )
    assert code == 2
    assert "it differs in model.max_iter (50 there, 7 here)" in _error_line(err)


def test_version_and_help_texts(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("flashmm-dask ")
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    text = capsys.readouterr().out
    for option in ("--cells", "--genes", "--samples", "--celltypes", "--de-genes", "--seed"):
        assert re.search(rf"{option} \w+\s+\S", text), option  # each has a help text
    with pytest.raises(SystemExit):
        main(["stats", "--help"])
    text = capsys.readouterr().out
    assert "--no-plots" not in text and "--out " not in text and "--output" in text


def test_niter_is_an_integer_column_in_the_tables(base, tmp_path):
    cfg = _config(
        tmp_path / "run.yaml", data={"path": str(base)}, model={"fixed": FIXED, "random": RANDOM}
    )
    code, _, err = _cli("run", cfg, "--output", tmp_path / "out", "--quiet")
    assert code == 0, err
    text = (tmp_path / "out" / "results.csv").read_text().splitlines()
    header = text[0].split(",")
    niter = [row.split(",")[header.index('"niter"')] for row in text[1:]]
    assert all(v.isdigit() for v in niter), niter[:5]
    parquet = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert str(parquet["niter"].dtype) == "Int64"
