"""Security: YAML is loaded safely, contrast strings are parsed and never evaluated, local
clusters listen on the loopback interface only, and credentials (storage_options) never
reach the results store, the saved statistics, the tables or the logs."""

from __future__ import annotations

import ast
import inspect
import io
import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import psutil
import pytest

from flashmm_dask import ConfigError, ContrastError, contrast_matrix, simulate_to_store
from flashmm_dask.cli import main
from flashmm_dask.design import contrasts as contrasts_module
from flashmm_dask.io.results import open_results
from flashmm_dask.io.results_attrs import REDACTED
from flashmm_dask.run.cluster import open_client
from flashmm_dask.run.config import load_config
from flashmm_dask.run.pipeline import run

CLI = os.path.join(os.path.dirname(sys.executable), "flashmm-dask")
PWNED = "PWNED"
SECRET = "s3cr3t-T0KEN-do-not-store"
NAMES = ["(Intercept)", "cls1", "cls2", "cls1:trtB", "cls2:trtB", "log(libsize)"]

# tags that PyYAML's unsafe loaders turn into calls
YAML_ATTACKS = [
    f'model: !!python/object/apply:os.system ["touch {PWNED}"]\n',
    f"model:\n  fixed: !!python/object/apply:subprocess.call [[touch, {PWNED}]]\n",
    "model:\n  fixed: !!python/name:os.system\n",
    f"contrasts: !!python/object/new:os.system [touch {PWNED}]\n",
]

CONTRAST_ATTACKS = [
    f"__import__('os').system('touch {PWNED}')",
    f"open('{PWNED}', 'w')",
    f"exec(\"open('{PWNED}', 'w')\")",
    f'eval(\'open("{PWNED}", "w")\')',
    "cls1.__class__.__mro__",
    "cls1; import os",
    "lambda: cls1",
    "[c for c in (cls1,)]",
    "cls1 if cls2 else cls1",
    "cls1 ** 2",
    "cls1 @ cls2",
    "`cls1`.__class__",
    "{cls1}",
]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # where an executed attack would create PWNED
    return tmp_path


def _cli(args: list[str]) -> tuple[int, str]:
    """``flashmm-dask ARGS`` in this process, undoing what ``main`` sets up for its own."""
    err, root = io.StringIO(), logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("distributed").level)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            code = main(args)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        logging.getLogger("distributed").setLevel(saved[2])
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
        logging.captureWarnings(False)
    return code, err.getvalue()


# -- YAML -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", YAML_ATTACKS)
def test_yaml_tags_that_run_code_are_refused(text, in_tmp):
    path = in_tmp / "attack.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"cannot read config file .*(tag|constructor)"):
        load_config(path)
    code, stderr = _cli(["run", str(path), "--quiet"])
    assert code == 2 and stderr.startswith("flashmm-dask: error: cannot read config file")
    assert not (in_tmp / PWNED).exists()


def test_override_values_are_read_safely(in_tmp):
    attack = f"model.fixed=!!python/object/apply:os.system [touch {PWNED}]"
    with pytest.raises(ConfigError, match="cannot parse the value of override"):
        load_config(None, [attack])
    assert not (in_tmp / PWNED).exists()


# -- contrasts --------------------------------------------------------------------------


@pytest.mark.parametrize("expression", CONTRAST_ATTACKS)
def test_contrast_strings_are_parsed_not_evaluated(expression, in_tmp):
    with pytest.raises(ContrastError, match="contrast 'x'"):
        contrast_matrix({"x": expression}, NAMES)
    assert not (in_tmp / PWNED).exists()


def test_the_contrast_parser_calls_no_evaluator():
    """No eval, exec, compile or import machinery anywhere in the contrast module."""
    tree = ast.parse(inspect.getsource(contrasts_module))
    called = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert not called & {"eval", "exec", "compile", "__import__", "getattr", "globals"}
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert not imported & {"ast", "builtins", "importlib", "numexpr", "sympy"}


@pytest.mark.distributed
def test_contrast_code_through_the_command_line(tmp_path):
    """The console script refuses a config whose contrast is code, before any cluster."""
    data = tmp_path / "data.zarr"
    simulate_to_store(data, 6, 200, n_samples=4, n_de_genes=1, seed=2, store_chunk_cells=100)
    res = subprocess.run(
        [
            CLI,
            "run",
            "configs/demo.yaml",
            "--quiet",
            "--output",
            str(tmp_path / "out"),
            "--set",
            f"data.path={data}",
            "--set",
            f"contrasts.x=__import__('os').system('touch {tmp_path / PWNED}')",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        timeout=300,
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "flashmm-dask: error: contrast 'x': unknown coefficient '__import__' at position 0; "
        "valid names: log(libsize), cls1, cls2, cls3, cls1:trtB, cls2:trtB, cls3:trtB"
    ]
    assert not (tmp_path / PWNED).exists()
    assert not (tmp_path / "out" / "results.zarr").exists()


# -- the network ------------------------------------------------------------------------


def _listening(process: psutil.Process) -> set[tuple[str, int]]:
    """(ip, port) of every socket the process listens on."""
    return {
        (c.laddr.ip, c.laddr.port)
        for c in process.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


def _loopback(addresses: set) -> bool:
    ips = {a[0] if isinstance(a, tuple) else a for a in addresses}
    return all(ipaddress.ip_address(ip).is_loopback for ip in ips)


@pytest.mark.distributed
@pytest.mark.parametrize("processes", [True, False], ids=["processes", "threads"])
@pytest.mark.parametrize("dashboard", ["127.0.0.1:0", None], ids=["default", "null"])
def test_local_cluster_listens_on_loopback_only(processes, dashboard):
    cfg = load_config(
        None,
        [
            "cluster.n_workers=1",
            f"cluster.processes={str(processes).lower()}",
            f"cluster.dashboard_address={'null' if dashboard is None else dashboard}",
        ],
    ).cluster
    before = _listening(psutil.Process())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        with open_client(cfg) as client:
            assert client.dashboard_link.startswith("http://127.0.0.1:")
            assert client.scheduler.address.startswith("tcp://127.0.0.1:")
            if processes:

                def worker_listens() -> list[str]:  # runs in the worker process
                    import psutil

                    return sorted(
                        c.laddr.ip
                        for c in psutil.Process().net_connections(kind="inet")
                        if c.status == psutil.CONN_LISTEN
                    )

                workers = client.run(worker_listens)
                assert workers and all(ips and _loopback(set(ips)) for ips in workers.values()), (
                    workers
                )
            # the scheduler, its dashboard (and, with threads, the workers) live here
            opened = _listening(psutil.Process()) - before
            assert opened, "the scheduler's dashboard should listen"
            assert _loopback(opened), opened


# -- credentials ------------------------------------------------------------------------


@pytest.mark.distributed
def test_credentials_are_not_written(tmp_path, caplog):
    data = tmp_path / "data.zarr"
    simulate_to_store(data, 8, 300, n_samples=4, n_de_genes=2, seed=5, store_chunk_cells=100)
    options = {"key": "AKIAEXAMPLEKEY", "secret": SECRET, "client_kwargs": {"token": SECRET}}
    out = tmp_path / "out"
    cfg = load_config(
        {
            # a config states its model (no demo model by default, issue 16)
            "data": {"path": str(data), "storage_options": options},
            "model": {"fixed": "~ 0 + log(libsize) + cls + cls:trt", "random": "~ 0 + sam"},
        },
        [
            f"output.path={out}",
            "cluster.n_workers=1",
            "cluster.processes=false",
            "fit.block_size=3",
            "progress=false",
        ],
    )
    assert cfg.data.storage_options["secret"] == SECRET
    # the config hash, kept in the store, does not depend on the credentials either
    assert cfg.hash() == cfg.with_overrides(["data.storage_options.secret=other"]).hash()
    with caplog.at_level(logging.DEBUG):
        summary = run(cfg)
    ds = open_results(str(summary.store))
    stored = ds.attrs["config"]["data"]["storage_options"]
    assert stored == {"key": REDACTED, "secret": REDACTED, "client_kwargs": REDACTED}
    assert SECRET not in json.dumps(ds.attrs)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "results.csv" for p in files) and any(p.suffix == ".png" for p in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
        assert b"AKIAEXAMPLEKEY" not in path.read_bytes(), path
    assert SECRET not in caplog.text and SECRET not in summary.line()
