"""A catalogue of bad inputs, one case each, through the command line and the Python API.

Every case says how to make the input, the ``flashmm-dask`` arguments, a pattern the
error must match (the problem, then what to do about it), and the Python call with the
exception class it must raise. The command must exit non-zero with exactly one line on
standard error, "flashmm-dask: error: ...", and no traceback; and neither the command nor
the Python call may leave anything that looks complete: no results store marked
complete, no results.csv, no contrasts.csv (a finished store that a case starts from must
be left exactly as it was).

Every case runs the command's ``main`` in this process (fast); a handful also run the
console script in its own process with local worker processes, two at a time, to show
that nothing else (worker logs, a traceback) reaches standard error there either.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
import zarr
from pipeline_helpers import in_process_cli
from scipy import sparse

from flashmm_dask import (
    ConfigError,
    ContrastError,
    DataError,
    DesignError,
    InputError,
    StoreError,
    build_design,
    contrast_matrix,
    flashmm,
    lmm,
    read_expression,
    simulate_to_store,
)
from flashmm_dask.cli import main
from flashmm_dask.io.results import ResultsLayout, create_results, open_results
from flashmm_dask.run.config import load_config
from flashmm_dask.run.pipeline import prepare_inputs, run
from flashmm_dask.run.retest import retest
from flashmm_dask.stats.summary import SummaryStats

CLI = os.path.join(os.path.dirname(sys.executable), "flashmm-dask")
FIXED, RANDOM = "~ 0 + log(libsize) + cls + cls:trt", "~ 0 + sam"
PWNED = "PWNED"


@dataclass
class World:
    """What the cases are made from: a simulated AnnData store, a config that fits it on a
    threaded local cluster, a finished run of that config and an unfinished store."""

    root: Path
    base: Path
    adata: ad.AnnData
    config: Path
    finished: Path
    incomplete: Path


@dataclass
class Ctx:
    """One case's folder (the command runs in it) and the world."""

    dir: Path
    world: World

    @property
    def out(self) -> Path:
        return self.dir / "out"

    def run_args(self, *extra: str) -> list[str]:
        return ["run", str(self.world.config), "--output", str(self.out), "--quiet", *extra]

    def config(self, *overrides: str) -> Any:
        return load_config(self.world.config, [f"output.path={self.out}", *overrides])

    def store(self, name: str, X: Any = None, obs: pd.DataFrame | None = None) -> Path:
        """A copy of the base data with another matrix or obs, as an AnnData Zarr store."""
        a = self.world.adata
        copy = ad.AnnData(
            X=a.X if X is None else X,
            obs=a.obs if obs is None else obs,
            var=a.var[[]],
        )
        path = self.dir / name
        with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
            copy.write_zarr(path)
        return path

    def dense(self) -> np.ndarray:
        return np.asarray(self.world.adata.X.toarray(), dtype=np.float64)


Make = Callable[[Ctx], tuple[list[str], Callable[[], object]]]


@dataclass(frozen=True)
class Case:
    name: str
    make: Make  # builds the input; returns the CLI arguments and the Python call
    message: str  # regex the CLI line and the exception message must match
    error: type[Exception]  # what the Python call raises


# -- the cases --------------------------------------------------------------------------


def _missing_store(c: Ctx):
    path = c.dir / "missing.zarr"
    return c.run_args("--set", f"data.path={path}"), lambda: read_expression(path)


def _unreadable_store(c: Ctx):
    path = c.dir / "garbage.zarr"
    path.mkdir()
    (path / "zarr.json").write_text("{ this is not json")
    return c.run_args("--set", f"data.path={path}"), lambda: read_expression(path)


def _file_not_a_store(c: Ctx):
    path = c.dir / "data.zarr"
    path.write_text("cell,gene,count\n")
    return c.run_args("--set", f"data.path={path}"), lambda: read_expression(path)


def _not_anndata(c: Ctx):
    path = c.dir / "plain.zarr"
    group = zarr.open_group(path, mode="w")
    group.create_array("X", shape=(300, 8), dtype="f8")
    return c.run_args("--set", f"data.path={path}"), lambda: read_expression(path)


def _unknown_layer(c: Ctx):
    base = c.world.base
    return c.run_args("--set", "data.layer=counts"), lambda: read_expression(base, layer="counts")


def _with_value(value: float) -> Make:
    def make(c: Ctx):
        X = c.dense()
        X[17, 3] = value
        path = c.store("bad.zarr", X=X)
        return c.run_args("--set", f"data.path={path}"), lambda: flashmm(
            path, FIXED, RANDOM, is_counts=True
        )

    return make


def _obs_length(c: Ctx):
    csv = c.dir / "short.csv"
    c.world.adata.obs.iloc[:-3].to_csv(csv)
    base = c.world.base
    return c.run_args("--set", f"data.obs={csv}"), lambda: read_expression(base, obs=csv)


def _obs_file_missing(c: Ctx):
    csv = c.dir / "nosuch.csv"
    base = c.world.base
    return c.run_args("--set", f"data.obs={csv}"), lambda: read_expression(base, obs=csv)


def _formula(fixed: str, random: str = RANDOM, obs: Callable[[pd.DataFrame], None] | None = None):
    def make(c: Ctx):
        frame = c.world.adata.obs.copy()
        args = c.run_args("--set", f"model.fixed={fixed}", "--set", f"model.random={random}")
        if obs is not None:
            obs(frame)
            path = c.store("obs.zarr", obs=frame)
            args += ["--set", f"data.path={path}"]
        return args, lambda: build_design(frame, fixed, random)

    return make


def _double_libsize(frame: pd.DataFrame) -> None:
    frame["lib2"] = 2 * frame["libsize"]


def _one_batch(frame: pd.DataFrame) -> None:
    frame["batch"] = "b1"


def _sum_d_not_q(c: Ctx):
    stats = c.dir / "stats.zarr"
    shutil.copytree(c.world.finished / "stats.zarr", stats)
    group = zarr.open_group(stats, mode="r+")
    q = len(group.attrs["random"])
    group.attrs["d"] = [q + 1]
    s = SummaryStats.load(str(c.world.finished / "stats.zarr"))
    args = ["fit", str(c.world.config), "--stats", str(stats), "--output", str(c.out), "--quiet"]
    return args, lambda: lmm(s.XX, s.XY, s.ZX, s.ZY, s.ZZ, s.Ynorm, s.n, [s.q + 1])


def _empty_features(c: Ctx):
    return c.run_args("--set", "data.features=[]"), lambda: c.config("data.features=[]")


def _unknown_features(c: Ctx):
    cfg = c.config("data.features=[gene1, nosuch]")
    return c.run_args("--set", "data.features=[gene1, nosuch]"), lambda: prepare_inputs(cfg, c.out)


def _all_zero(c: Ctx):
    path = c.store("zeros.zarr", X=sparse.csr_matrix(c.world.adata.X.shape, dtype=np.int32))
    cfg = c.config(f"data.path={path}")
    return c.run_args("--set", f"data.path={path}"), lambda: run(cfg)


def _config_contrast(expression: str) -> Make:
    def make(c: Ctx):
        names = list(open_results(c.world.finished / "results.zarr")["covariate"].values)
        return c.run_args("--set", f"contrasts.bad={expression}"), lambda: contrast_matrix(
            {"bad": expression}, names
        )

    return make


def _test_contrast(expression: str) -> Make:
    def make(c: Ctx):
        store = c.dir / "results.zarr"
        shutil.copytree(c.world.finished / "results.zarr", store)
        args = ["test", str(store), "-c", f"x={expression}", "--quiet"]
        return args, lambda: retest(str(store), {"x": expression})

    return make


def _config_file(text: str) -> Make:
    def make(c: Ctx):
        path = c.dir / "bad.yaml"
        path.write_text(text)
        return ["run", str(path), "--output", str(c.out), "--quiet"], lambda: load_config(path)

    return make


def _unreachable(c: Ctx):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    cfg = c.config("cluster.kind=address", f"cluster.address={address}")
    return c.run_args("--scheduler", address), lambda: run(cfg)


def _different_config(c: Ctx):
    shutil.copytree(c.world.finished, c.out)
    cfg = c.config("model.method=ML")
    return c.run_args("--set", "model.method=ML"), lambda: run(cfg)


def _corrupt_chunk(c: Ctx):
    path = c.dir / "corrupt.zarr"
    shutil.copytree(c.world.base, path)
    chunks = sorted(p for p in (path / "X" / "data").rglob("*") if p.is_file())
    chunks = [p for p in chunks if not p.name.startswith((".z", "zarr"))]
    chunks[1].write_bytes(b"\x00garbage" * 8)
    return c.run_args("--set", f"data.path={path}"), lambda: flashmm(
        path, FIXED, RANDOM, is_counts=True
    )


def _truncated_h5ad(c: Ctx):
    path = c.dir / "data.h5ad"
    c.world.adata.write_h5ad(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return c.run_args("--set", f"data.path={path}"), lambda: read_expression(path)


def _cells(k: int) -> Make:
    def make(c: Ctx):
        a = c.world.adata
        path = c.store("cells.zarr", X=a.X[:k], obs=a.obs.iloc[:k])
        cfg = c.config(f"data.path={path}")
        return c.run_args("--set", f"data.path={path}"), lambda: prepare_inputs(cfg, c.out)

    return make


def _output_is_a_file(c: Ctx):
    c.out.write_text("not a folder\n")
    cfg = c.config()
    return c.run_args(), lambda: run(cfg)


def _report_incomplete(c: Ctx):
    store = c.world.incomplete
    return ["report", str(store), "--out", str(c.dir), "--quiet"], lambda: open_results(store)


def _test_not_a_results_store(c: Ctx):
    base = c.world.base
    return ["test", str(base), "-c", "x=cls1:trtB", "--quiet"], lambda: retest(
        str(base), {"x": "cls1:trtB"}
    )


def _config_is_a_folder(c: Ctx):
    return ["run", str(c.dir), "--quiet"], lambda: load_config(c.dir)


def _stats_missing(c: Ctx):
    path = c.dir / "nosuch-stats.zarr"
    args = ["fit", str(c.world.config), "--stats", str(path), "--output", str(c.out), "--quiet"]
    return args, lambda: SummaryStats.load(str(path))


def _override(text: str) -> Make:
    def make(c: Ctx):
        return c.run_args("--set", text), lambda: c.config(text)

    return make


def _misspelled_keyword(c: Ctx):
    base = c.world.base
    return c.run_args("--set", "data.layers=counts"), lambda: flashmm(
        base, FIXED, RANDOM, layers="counts"
    )


def _float_grouping(frame: pd.DataFrame) -> None:
    # a float column is a number, not a grouping: still refused (integers are factors)
    frame["donor"] = 1.5


CASES = [
    Case("missing store", _missing_store, r"no such store.*give the path", DataError),
    Case("unreadable store", _unreadable_store, r"unreadable or corrupt", DataError),
    Case("a file, not a store", _file_not_a_store, r"not an HDF5.*directories", DataError),
    Case("not an AnnData store", _not_anndata, r"not an AnnData store.*give the", DataError),
    Case("unknown layer", _unknown_layer, r"layer 'counts' not found.*available", DataError),
    Case("NaN in expression", _with_value(np.nan), r"NaN or Inf.*remove or impute", DataError),
    Case("Inf in expression", _with_value(np.inf), r"NaN or Inf.*remove or impute", DataError),
    Case("negative counts", _with_value(-2.0), r"negative values.*transform", DataError),
    Case(
        "non-integer values under log2p1",
        _with_value(0.6931),
        r"not counts: feature .* non-integer values .*0\.6931.*data\.layer: counts.*"
        r"transform: none",
        DataError,
    ),
    Case(
        "misspelled keyword",
        _misspelled_keyword,
        r"'(data\.)?layers'.*did you mean 'layer'",
        InputError,
    ),
    Case(
        "float column as a random grouping",
        _formula(FIXED, "~ 0 + donor", obs=_float_grouping),
        r"single level.*at least 2",
        DesignError,
    ),
    Case("obs length mismatch", _obs_length, r"obs has 297 rows.*one obs row per", DataError),
    Case("obs file missing", _obs_file_missing, r"no such obs file.*give the path", DataError),
    Case(
        "formula column missing",
        _formula("~ 0 + cls + donor"),
        r"column 'donor' not found in obs; available: .*fix the formula",
        DesignError,
    ),
    Case("formula syntax error", _formula("~ 0 + (cls"), r"fixed formula", DesignError),
    Case(
        "rank-deficient fixed design",
        _formula("~ 0 + libsize + lib2 + cls", obs=_double_libsize),
        r"not full column rank.*'lib2'.*remove",
        DesignError,
    ),
    Case(
        "random effect with a single level",
        _formula(FIXED, "~ 0 + batch", obs=_one_batch),
        r"single level.*at least 2",
        DesignError,
    ),
    Case("sum(d) != q", _sum_d_not_q, r"sum\(d\).*", InputError),
    Case("empty feature selection", _empty_features, r"empty list.*remove the key", ConfigError),
    Case("unknown features", _unknown_features, r"'nosuch'.*data have", InputError),
    Case("all features zero", _all_zero, r"all 8 features are zero.*check the", DataError),
    Case(
        "contrast names an unknown coefficient",
        _config_contrast("cls9:trtB - cls1:trtB"),
        r"cls9:trtB",
        ContrastError,
    ),
    Case(
        "unknown coefficient in flashmm-dask test",
        _test_contrast("cls1:trtC"),
        r"cls1:trtC",
        ContrastError,
    ),
    Case("contrast syntax error", _test_contrast("cls1:trtB -"), r"contrast 'x'", ContrastError),
    Case(
        "contrast that tries to run code",
        _test_contrast(f"__import__('os').system('touch {PWNED}')"),
        r"__import__",
        ContrastError,
    ),
    Case(
        "contrast in the config that tries to run code",
        _config_contrast(f'exec(\'open("{PWNED}", "w")\')'),
        r"exec",
        ContrastError,
    ),
    Case(
        "malformed YAML",
        _config_file("model:\n  fixed: [unclosed\n"),
        r"cannot read config file .*line \d+",
        ConfigError,
    ),
    Case(
        "unknown config key",
        _config_file("model:\n  methd: REML\n"),
        r"'model.methd' is unknown; valid keys under 'model': .*method",
        ConfigError,
    ),
    Case(
        "wrong type in config",
        _config_file("model:\n  max_iter: many\n"),
        r"'model.max_iter' must be a positive integer; got 'many'",
        ConfigError,
    ),
    Case("config is a folder", _config_is_a_folder, r"is a folder; give the path", ConfigError),
    Case(
        "max_iter zero", _override("model.max_iter=0"), r"must be a positive integer", ConfigError
    ),
    Case(
        "unreachable scheduler",
        _unreachable,
        r"cannot reach the Dask scheduler.*start it with 'dask scheduler'",
        ConfigError,
    ),
    Case(
        "output holds another configuration",
        _different_config,
        r"different configuration \(it differs in model\.method \('REML' there, 'ML' here\)\); "
        r"rerun with --overwrite",
        StoreError,
    ),
    Case("output is a file", _output_is_a_file, r"is a file, not a folder", StoreError),
    Case("corrupt Zarr chunk", _corrupt_chunk, r"corrupt or truncated: re-copy", DataError),
    Case("truncated .h5ad", _truncated_h5ad, r"truncated.*Re-copy or re-write", DataError),
    Case("zero cells", _cells(0), r"empty: 0 x 8; it needs at least one cell", DataError),
    Case("one cell", _cells(1), r"1 cell\(s\); a mixed model needs many cells", DataError),
    Case("report of an unfinished store", _report_incomplete, r"incomplete.*Rerun", StoreError),
    Case(
        "test on a store that holds no results",
        _test_not_a_results_store,
        r"not a results store; give the results.zarr in a run's output folder",
        StoreError,
    ),
    Case("statistics store missing", _stats_missing, r"no summary-statistics store", StoreError),
]


# -- running them -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("world")
    base = root / "base.zarr"
    simulate_to_store(
        base, n_genes=8, n_cells=300, n_samples=6, n_de_genes=2, seed=3, store_chunk_cells=100
    )
    config = root / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(base)},
                "model": {"fixed": FIXED, "random": RANDOM},
                "fit": {"block_size": 4},
                "cluster": {"n_workers": 1, "processes": False},
                "output": {"plots": False},
                "progress": False,
            }
        )
    )
    finished = root / "finished"
    run(load_config(config, [f"output.path={finished}"]))
    incomplete = root / "incomplete.zarr"
    layout = ResultsLayout(("g1", "g2"), ("a", "b"), ("sam", "residual"), (), block_size=1)
    create_results(incomplete, layout, {"method": "REML"})
    return World(root, base, ad.read_zarr(base), config, finished, incomplete)


def _looks_complete(folder: Path) -> dict[str, str]:
    """Everything under ``folder`` that looks like the output of a finished run."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.name in ("results.csv", "contrasts.csv", "results.parquet"):
            found[str(path)] = path.read_text(errors="replace")
        elif path.name == "zarr.json" and path.parent.suffix == ".zarr":
            try:
                attrs = json.loads(path.read_text()).get("attributes", {})
            except ValueError:  # the case of a corrupt zarr.json
                continue
            if attrs.get("complete") is True and attrs.get("format") == "flashmm_dask.results":
                found[str(path)] = json.dumps(attrs, sort_keys=True)
    return found


def _make(case: Case, world: World, folder: Path) -> tuple[Ctx, list[str], Callable[[], object]]:
    ctx = Ctx(folder, world)
    with warnings.catch_warnings():  # of anndata and zarr, writing the inputs
        warnings.simplefilter("ignore")
        args, api = case.make(ctx)
    return ctx, args, api


def _cli(args: list[str]) -> tuple[int, str]:
    """``flashmm-dask ARGS`` in this process: the exit status and standard error."""
    err = io.StringIO()
    with in_process_cli(), redirect_stderr(err), redirect_stdout(io.StringIO()):
        code = main(args)
    return code, err.getvalue()


#: a warning the package logs before the failure (the design check's, on this small design
#: of 3 donors per condition): the format of the console script's log lines
PACKAGE_WARNING = re.compile(r"^\S+ \S+ WARNING flashmm_dask(\.\w+)*: ")


def _check_line(case: Case, code: int, stderr: str) -> None:
    assert code != 0
    lines = [line for line in stderr.strip().splitlines() if not PACKAGE_WARNING.match(line)]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("flashmm-dask: error: "), lines[0]
    assert "Traceback" not in stderr
    assert re.search(case.message, lines[0]), f"{case.message!r} not in {lines[0]!r}"


def test_the_catalogue_is_large_enough():
    assert len({case.name for case in CASES}) == len(CASES) >= 25


@pytest.mark.distributed  # some cases start a threaded local Dask cluster
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_refused_clearly(case: Case, world, tmp_path, monkeypatch):
    _, args, api = _make(case, world, tmp_path)
    monkeypatch.chdir(tmp_path)  # where code in a contrast would create PWNED
    before = _looks_complete(tmp_path)
    code, stderr = _cli(args)
    assert code == 2, stderr
    _check_line(case, code, stderr)
    assert _looks_complete(tmp_path) == before

    with pytest.raises(case.error) as raised:
        api()
    assert re.search(case.message, str(raised.value)), str(raised.value)
    assert _looks_complete(tmp_path) == before
    assert not (tmp_path / PWNED).exists()


# The console script as a user runs it, in its own process, with local worker processes:
# nothing but the one line reaches standard error (no worker logs, no traceback), after the
# package's own warnings where it logs any.
SCRIPT_CASES = [
    "NaN in expression",
    "corrupt Zarr chunk",
    "malformed YAML",
    "unreachable scheduler",
    "output holds another configuration",
    "contrast that tries to run code",
]


@pytest.fixture(scope="module")
def script_runs(world, tmp_path_factory):
    """The console script on the SCRIPT_CASES, started two at a time."""
    by_name = {case.name: case for case in CASES}
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = {}
        for name in SCRIPT_CASES:
            folder = tmp_path_factory.mktemp("script")
            ctx, args, _ = _make(by_name[name], world, folder)
            if args[0] == "run":
                args += ["--set", "cluster.processes=true"]
            runs[name] = (
                ctx,
                _looks_complete(folder),
                pool.submit(
                    subprocess.run,
                    [CLI, *args],
                    capture_output=True,
                    text=True,
                    cwd=folder,
                    timeout=300,
                ),
            )
        yield runs


@pytest.mark.distributed
@pytest.mark.parametrize("name", SCRIPT_CASES)
def test_console_script_prints_one_line(name, script_runs):
    case = next(case for case in CASES if case.name == name)
    ctx, before, future = script_runs[name]
    res = future.result()
    assert res.returncode == 2, res.stderr
    _check_line(case, res.returncode, res.stderr)
    assert _looks_complete(ctx.dir) == before
    assert not (ctx.dir / PWNED).exists()


class _RecordLevel:
    """A worker (and nanny) plugin that writes the level of the ``distributed`` logger of
    its process to a file when the process closes."""

    def __init__(self, folder: str, kind: str) -> None:
        self.folder, self.kind = folder, kind
        self.name = f"record-level-{kind}"

    def teardown(self, *_: object, **__: object) -> None:
        import logging
        import os

        level = logging.getLogger("distributed").level
        with open(os.path.join(self.folder, f"{self.kind}-{os.getpid()}"), "w") as f:
            f.write(str(level))


@pytest.mark.distributed
def test_a_failed_run_quiets_the_local_processes_before_closing_them(tmp_path):
    """A local cluster's worker processes write to the run's terminal: when a run fails
    they are silenced before the cluster closes (a heartbeat to the closing scheduler would
    otherwise print a traceback under the one-line error)."""
    import logging

    from distributed.diagnostics.plugin import NannyPlugin, WorkerPlugin

    from flashmm_dask.run.cluster import open_client
    from flashmm_dask.run.config import ClusterConfig

    class WorkerLevel(_RecordLevel, WorkerPlugin):
        pass

    class NannyLevel(_RecordLevel, NannyPlugin):
        pass

    cfg = ClusterConfig(n_workers=1, threads_per_worker=1, processes=True)
    with pytest.raises(DataError, match="the data is bad"):
        with open_client(cfg) as client:
            client.register_plugin(WorkerLevel(str(tmp_path), "worker"))
            client.register_plugin(NannyLevel(str(tmp_path), "nanny"))
            raise DataError("the data is bad")
    levels = {p.name.split("-")[0]: int(p.read_text()) for p in tmp_path.iterdir()}
    assert levels == {"worker": logging.CRITICAL + 1, "nanny": logging.CRITICAL + 1}
    assert logging.getLogger("distributed").level != logging.CRITICAL + 1  # restored here


@pytest.mark.distributed
def test_local_worker_processes_keep_large_temporaries_on_the_heap(monkeypatch):
    """Dask's MALLOC_TRIM_THRESHOLD_ (64 KiB) freezes glibc's mmap threshold at 128 KiB in
    the workers and hands freed memory back at once; a local cluster's worker processes get
    MALLOC_MMAP_THRESHOLD_, one arena and a larger trim threshold instead, and a user's own
    settings (the environment overrides dask's config) are kept."""
    from flashmm_dask.run.cluster import ARENA_MAX, MMAP_THRESHOLD, TRIM_THRESHOLD, open_client
    from flashmm_dask.run.config import ClusterConfig

    names = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX")

    def environ() -> tuple[str | None, ...]:
        return tuple(os.environ.get(name) for name in names)

    cfg = ClusterConfig(n_workers=1, threads_per_worker=1, processes=True)
    for name in names:
        monkeypatch.delenv(name, raising=False)
    with open_client(cfg) as client:
        (ours,) = client.run(environ).values()
    assert ours == (str(MMAP_THRESHOLD), str(TRIM_THRESHOLD), str(ARENA_MAX))
    for name, value in zip(names, ("4096", "1000", "4"), strict=True):
        monkeypatch.setenv(name, value)
    with open_client(cfg) as client:
        (theirs,) = client.run(environ).values()
    assert theirs == ("4096", "1000", "4")
