"""Small runs of the pipeline shared by the pipeline and CLI tests."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from distributed import Client, LocalCluster

from flashmm_dask.run.config import load_config


@contextmanager
def local_client(*, threads_per_worker: int = 1, processes: bool = True) -> Iterator[Client]:
    """A client of a one-worker LocalCluster on the loopback interface (the module
    fixtures of the pipeline tests)."""
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=threads_per_worker,
            processes=processes,
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


SMALL = (
    "simulate.n_cells=1500",
    "simulate.n_genes=30",
    "simulate.n_samples=6",
    "simulate.seed=7",
    "simulate.chunk_cells=400",
    "fit.block_size=7",
    "output.plots=false",
    "progress=false",
)
VARIABLES = (
    "coef",
    "se",
    "t",
    "p",
    "df",
    "padj",
    "theta",
    "se_theta",
    "dlogL",
    "logLik",
    "niter",
    "converged",
    "cov",
    "contrast_coef",
    "contrast_se",
    "contrast_t",
    "contrast_p",
    "contrast_padj",
)


def small_config(output: Path, *extra: str):
    return load_config(None, (*SMALL, f"output.path={output}", *extra))


def assert_stores_equal(a, b, rtol=1e-12):
    """Two opened results stores hold the same numbers (NaN where the other has NaN)."""
    for name in VARIABLES:
        x, y = a[name].values, b[name].values
        if x.dtype == bool:
            np.testing.assert_array_equal(x, y, err_msg=name)
        else:
            np.testing.assert_allclose(x, y, rtol=rtol, atol=0, err_msg=name)
    for coord in ("feature", "covariate", "component", "contrast"):
        assert list(a[coord].values) == list(b[coord].values)


@contextmanager
def in_process_cli() -> Iterator[None]:
    """Undo what ``main`` configures for its process: log levels and handlers, and the
    SIGINT and SIGTERM handlers."""
    root, dist = logging.getLogger(), logging.getLogger("distributed")
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    saved = (root.level, list(root.handlers), dist.level, handlers)
    try:
        yield
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        dist.setLevel(saved[2])
        signal.signal(signal.SIGINT, saved[3][0])
        signal.signal(signal.SIGTERM, saved[3][1])
        logging.captureWarnings(False)
