"""Variance components the data cannot tell apart (a factor with one cell per level, two
components with the same levels) are refused before the data pass, with one line naming
them; identifiable designs pass; the Gram matrix equals its cell-level definition."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import flashmm_dask as fm
from flashmm_dask.design.check import check_design_replication, design_crossproducts
from flashmm_dask.design.identifiable import dependent_components, gram

CLI = os.path.join(os.path.dirname(sys.executable), "flashmm-dask")


def cells(n: int = 240, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    donor = np.arange(n) % 12
    return pd.DataFrame(
        {
            "trt": np.where(donor < 6, "A", "B"),
            "sam": [f"D{k}" for k in donor],
            "sam2": [f"S{k}" for k in donor],  # the same levels under other names
            "cell": [f"c{i}" for i in range(n)],
            "pair": [f"p{i // 2}" for i in range(n)],  # two cells per level
            "batch": rng.integers(4, size=n).astype(str),
            "x": rng.normal(size=n),
        }
    )


def brute_gram(X: np.ndarray, Zs: list[np.ndarray]) -> np.ndarray:
    """tr(P V_j P V_k) from the n x n matrices themselves."""
    n = X.shape[0]
    P = np.eye(n) - X @ np.linalg.pinv(X)
    Vs = [np.eye(n), *(Z @ Z.T for Z in Zs)]
    PVP = [P @ V @ P for V in Vs]
    return np.array([[np.sum(a * b) for b in PVP] for a in PVP])


@pytest.mark.parametrize(
    "fixed, random",
    [
        ("~ trt", ["~ 0 + sam", "~ 0 + batch"]),
        ("~ trt + x", ["~ 0 + sam", "~ 0 + sam:x"]),
        ("~ 0 + trt + batch", ["~ 0 + sam", "~ 0 + pair", "~ 0 + cell"]),
    ],
)
def test_gram_equals_its_cell_level_definition(fixed, random):
    obs = cells()
    design = fm.build_design(obs, fixed, random)
    X, Z = design.X(obs), design.Z(obs).toarray()
    XX, ZX, ZZ = design_crossproducts(design, obs)
    edges = np.cumsum([0, *design.d])
    Zs = [Z[:, a:b] for a, b in itertools.pairwise(edges)]
    np.testing.assert_allclose(
        gram(XX, ZX, ZZ, design.d, len(obs)), brute_gram(X, Zs), rtol=1e-10, atol=1e-8
    )


@pytest.mark.parametrize(
    "random, named",
    [
        ("~ 0 + cell", "random component 'cell' cannot be told apart from the residual"),
        (["~ 0 + sam", "~ 0 + cell"], "random component 'cell' cannot be told apart from"),
        (["~ 0 + sam", "~ 0 + sam2"], "the variances of 'sam' and 'sam2' cannot be told apart"),
    ],
)
def test_dependent_components_are_refused_in_one_line(random, named):
    obs = cells()
    design = fm.build_design(obs, "~ trt", random)
    with pytest.raises(fm.DesignError) as raised:
        check_design_replication(design, obs)
    message = str(raised.value)
    assert named in message and "\n" not in message
    assert "remove the redundant random component" in message


@pytest.mark.parametrize(
    "random",
    ["~ 0 + sam", "~ 0 + pair", ["~ 0 + sam", "~ 0 + batch"], ["~ 0 + sam", "~ 0 + sam:x"]],
)
def test_identifiable_designs_pass(random):
    obs = cells()
    design = fm.build_design(obs, "~ trt", random)
    XX, ZX, ZZ = design_crossproducts(design, obs)
    assert dependent_components(XX, ZX, ZZ, design.d, len(obs), design.components) == []
    check_design_replication(design, obs)


def test_lmmfit_refuses_and_check_design_false_fits_as_r():
    obs = cells()
    design = fm.build_design(obs, "~ trt", ["~ 0 + sam", "~ 0 + sam2"])
    X, Z = design.XZ(obs)
    Y = np.random.default_rng(1).normal(size=(3, len(obs)))
    with pytest.raises(fm.DesignError, match="'var1' and 'var2' cannot be told apart"):
        fm.lmmfit(Y, X, Z, design.d)
    fit = fm.lmmfit(Y, X, Z, design.d, check_design=False)  # R FLASHMM fits it regardless
    assert fit.coef.shape == (design.p, 3)


def test_cli_refuses_with_one_line_and_writes_nothing(tmp_path: Path):
    store = tmp_path / "sim.zarr"
    fm.simulate_to_store(store, 8, 300, n_samples=6, seed=3, store_chunk_cells=100)
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(store)},
                "model": {"fixed": "~ trt", "random": ["~ 0 + sam", "~ 0 + sam:trt"]},
                "cluster": {"n_workers": 1, "processes": False},
                "output": {"plots": False},
                "progress": False,
            }
        )
    )
    out = tmp_path / "out"
    res = subprocess.run(
        [CLI, "run", str(config), "--output", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("flashmm-dask: error: the variances of 'sam' and 'sam:trt'")
    assert not out.exists()


def test_a_slope_in_large_units_does_not_hide_a_dependence():
    """The emptiness of a component is judged against its own size: a random slope on a
    covariate of ~1e4 made the residual and the other components look empty (not checked)."""
    obs = cells()
    obs["counts"] = np.random.default_rng(2).uniform(5e3, 2e4, len(obs))
    design = fm.build_design(obs, "~ trt", ["~ 0 + sam", "~ 0 + sam2", "~ 0 + sam:counts"])
    with pytest.raises(fm.DesignError, match="'sam' and 'sam2' cannot be told apart"):
        check_design_replication(design, obs)


def test_a_component_zero_in_every_cell_is_refused():
    obs = cells().assign(zero=0.0)
    design = fm.build_design(obs, "~ trt", ["~ 0 + sam", "~ 0 + sam:zero"])
    with pytest.raises(fm.DesignError, match="random component 'sam:zero' is zero in every cell"):
        check_design_replication(design, obs)
