"""Designs whose random component the fixed effects absorb are refused before the data pass
(API and command line: one line, exit 2, nothing written); few degrees of freedom are
warned of; nested designs with enough donors and crossed designs pass."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import flashmm_dask as fm
from flashmm_dask.design.check import (
    CALIBRATED_DF,
    check_design_replication,
    check_replication,
    design_crossproducts,
    replication,
)
from flashmm_dask.design.strata import plan_strata

CLI = os.path.join(os.path.dirname(sys.executable), "flashmm-dask")
FIXED, RANDOM = "~ 0 + log(libsize) + cls + cls:trt", "~ 0 + sam"


def nested_obs(donors_per_condition: tuple[int, ...], n: int = 1200, seed: int = 0):
    """Cells of donors nested in conditions A, B, ...; 3 cell types in every donor."""
    rng = np.random.default_rng(seed)
    conditions = "ABCD"[: len(donors_per_condition)]
    trt = rng.integers(len(conditions), size=n)
    donor = np.array([rng.integers(donors_per_condition[t]) for t in trt])
    return pd.DataFrame(
        {
            "trt": pd.Categorical(np.array(list(conditions))[trt]),
            "sam": [f"{conditions[t]}{k + 1}" for t, k in zip(trt, donor, strict=True)],
            "cls": pd.Categorical(rng.integers(3, size=n).astype(str)),
            "libsize": rng.uniform(500.0, 5000.0, n),
            "batch": rng.integers(4, size=n).astype(str),
        }
    )


def reps(obs, fixed, random):
    design = fm.build_design(obs, fixed, random)
    XX, ZX, ZZ = design_crossproducts(design, obs, chunk_rows=250)
    return design, replication(XX, ZX, ZZ, design.d, design.covariates, design.components)


@pytest.mark.parametrize("fixed", ["~ trt", "~ log(libsize) + trt", FIXED])
@pytest.mark.parametrize("per", [1, 2, 3, 6])
def test_donors_nested_in_condition_keep_donors_minus_conditions(per, fixed):
    _, (r,) = reps(nested_obs((per, per)), fixed, "~ 0 + sam")
    assert (r.component, r.rank, r.df, r.absorbed) == ("sam", 2 * per, 2 * per - 2, 2)
    if fixed == "~ trt":
        assert r.absorbing == ("(Intercept)", "trtB")
    if fixed == FIXED:  # the intercept is cls1 + cls2 + cls3, trt the sum of cls:trtB
        assert r.absorbing == ("cls0", "cls1", "cls2", "cls0:trtB", "cls1:trtB", "cls2:trtB")


@pytest.mark.parametrize("fixed", ["~ trt", FIXED, "~ 0 + sam + cls"])
@pytest.mark.parametrize("per", [2, 6])
def test_components_of_many_levels_equal_the_ranks_of_the_cell_matrices(per, fixed):
    """donor x cell type has more levels than X has columns: its ranks come from a p x p
    eigenproblem (a diagonal Z_k'Z_k), and must be those of the cell-level matrices."""
    obs = nested_obs((per, per), n=900, seed=per)
    design, found = reps(obs, fixed, ["~ 0 + sam", "~ 0 + sam:cls"])
    X, Z = design.X(obs), design.Z(obs).toarray()
    rank_x = np.linalg.matrix_rank(X)
    start = 0
    for r, size in zip(found, design.d, strict=True):
        Zk = Z[:, start : start + size]
        start += size
        assert r.rank == np.linalg.matrix_rank(Zk)
        assert r.df == np.linalg.matrix_rank(np.hstack([X, Zk])) - rank_x
        assert r.absorbed == r.rank - r.df
    assert found[1].rank > design.p  # the p x p eigenproblem was the one used
    if "sam" in fixed:  # donor as a fixed effect absorbs the donor component
        assert found[0].df == 0 and found[1].absorbing


def test_crossproducts_equal_those_of_the_full_matrices():
    obs = nested_obs((3, 4), n=700)
    design = fm.build_design(obs, FIXED, ["~ 0 + sam", "~ 0 + batch"])
    X, Z = design.X(obs), design.Z(obs).toarray()
    XX, ZX, ZZ = design_crossproducts(design, obs, chunk_rows=97)
    np.testing.assert_allclose(XX, X.T @ X, rtol=1e-12)
    np.testing.assert_allclose(ZX, Z.T @ X, rtol=1e-12)
    np.testing.assert_allclose(ZZ, Z.T @ Z, rtol=1e-12)


def test_one_donor_per_condition_is_refused_naming_component_and_terms():
    obs = nested_obs((1, 1))
    design = fm.build_design(obs, "~ trt", "~ 0 + sam")
    with pytest.raises(fm.DesignError) as raised:
        check_design_replication(design, obs)
    message = str(raised.value)
    assert "\n" not in message
    assert "random component 'sam' has no replication left" in message
    assert "'(Intercept)', 'trtB'" in message and "several 'sam' levels" in message


def test_a_component_given_also_as_fixed_effect_is_refused():
    obs = nested_obs((3, 3))
    design = fm.build_design(obs, "~ trt + batch", ["~ 0 + sam", "~ 0 + batch"])
    with pytest.raises(fm.DesignError, match=r"component 'batch'.*'batch1', 'batch2'"):
        check_design_replication(design, obs)


def test_few_degrees_of_freedom_give_one_warning(caplog):
    obs = nested_obs((2, 2))
    design = fm.build_design(obs, FIXED, RANDOM)
    with caplog.at_level(logging.WARNING, logger="flashmm_dask"):
        (r,) = check_design_replication(design, obs)
    assert r.df == 2
    warned = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    # one warning of the df; one of the cell types varying within donors (design/within.py)
    df_warned = [rec for rec in warned if "freedom left" in rec.message]
    assert len(df_warned) == 1 and len(warned) == 2
    assert "random component 'sam' keeps 2 of its 4 levels' dimensions" in df_warned[0].message
    (within,) = [rec.getMessage() for rec in warned if "vary within" in rec.getMessage()]
    assert "'cls0', 'cls1', 'cls2'" in within and "random component 'sam'" in within


def test_enough_donors_and_crossed_designs_pass_quietly(caplog):
    nested = nested_obs((6, 6))
    crossed = nested.assign(batch=(np.arange(len(nested)) % 12).astype(str))  # crosses donors
    with caplog.at_level(logging.WARNING, logger="flashmm_dask"):
        (r,) = check_design_replication(fm.build_design(nested, FIXED, RANDOM), nested)
        both = check_design_replication(
            fm.build_design(crossed, FIXED, ["~ 0 + sam", "~ 0 + batch"]), crossed
        )
    assert r.df == CALIBRATED_DF == 10
    assert [(b.component, b.df, b.absorbed) for b in both] == [("sam", 10, 2), ("batch", 11, 1)]
    # no warning of the df; the cell types vary within donors (design/within.py), in both
    assert [r.getMessage() for r in caplog.records if "vary within" not in r.getMessage()] == []
    assert len(caplog.records) == 2


def test_fewer_df_than_the_calibration_needs_are_named_in_one_warning(caplog):
    nested = nested_obs((3, 4))
    crossed = nested_obs((5, 5))  # batch (4 levels) crosses donors and conditions
    with caplog.at_level(logging.WARNING, logger="flashmm_dask"):
        (r,) = check_design_replication(fm.build_design(nested, FIXED, RANDOM), nested)
        both = check_design_replication(
            fm.build_design(crossed, FIXED, ["~ 0 + sam", "~ 0 + batch"]), crossed
        )
    assert r.df == 5
    assert [(b.component, b.df, b.absorbed) for b in both] == [("sam", 8, 2), ("batch", 3, 1)]
    # one warning of the df per design (and one of the cell types within donors each)
    first, second = (r.getMessage() for r in caplog.records if "freedom left" in r.getMessage())
    assert len(caplog.records) == 4
    assert "random component 'sam' keeps 5 of its 7 levels' dimensions" in first
    assert "fewer than 10" in first and "CALIBRATION.md" in first and "very few" not in first
    assert "'sam' keeps 8 of its 10" in second and "'batch' keeps 3 of its 4" in second


def test_scaling_of_the_columns_does_not_change_the_answer():
    obs = nested_obs((1, 1))
    design = fm.build_design(obs, "~ trt", "~ 0 + sam")
    XX, ZX, ZZ = design_crossproducts(design, obs)
    s = np.array([1e-6, 1e7])
    with pytest.raises(fm.DesignError):
        check_replication(XX * np.outer(s, s), ZX * s * 1e3, ZZ * 1e6, [2], ["a", "b"], ["sam"])


# -- the Python entry points ------------------------------------------------------------


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Simulated stores: one donor per condition, and 3 + 3 donors (subjects nested)."""
    root = tmp_path_factory.mktemp("designs")
    out = {}
    for name, samples, seed in (("confounded", 2, 1), ("nested", 6, 11)):
        path = root / f"{name}.zarr"
        fm.simulate_to_store(
            path, 12, 600, n_samples=samples, n_de_genes=2, seed=seed, store_chunk_cells=200
        )
        out[name] = path
    for name, per in (("confounded", 1), ("nested", 3)):
        obs = fm.read_expression(out[name]).obs
        assert (obs.groupby("trt", observed=True)["sam"].nunique() == per).all()
    return out


def _spoil_expression(store: Path) -> None:
    """Make every chunk of the expression unreadable: only the metadata can be read."""
    for chunk in (store / "X").rglob("*"):
        if chunk.is_file() and not chunk.name.startswith((".z", "zarr")):
            chunk.write_bytes(b"\x00not a chunk")


def test_flashmm_refuses_before_reading_the_expression(stores, tmp_path):
    spoiled = tmp_path / "spoiled.zarr"
    shutil.copytree(stores["confounded"], spoiled)
    _spoil_expression(spoiled)
    with pytest.raises(fm.DesignError, match=r"component 'sam' has no replication left"):
        fm.flashmm(spoiled, FIXED, RANDOM, is_counts=True)


def test_lmm_stats_refuses_and_check_design_false_fits_as_r(stores):
    expr = fm.read_expression(stores["confounded"])
    design = fm.build_design(expr.obs, FIXED, RANDOM)
    stats = fm.reduce_stats(expr, design, transform="log2p1")
    with pytest.raises(fm.DesignError, match=r"component 'sam'"):
        fm.lmm_stats(stats)
    fit = fm.lmm_stats(stats, check_design=False)  # R FLASHMM fits it regardless
    assert fit.coef.shape == (design.p, 12)


def test_nested_design_with_three_donors_per_condition_is_fitted(stores, caplog):
    with caplog.at_level(logging.WARNING, logger="flashmm_dask"):
        fit = fm.flashmm(stores["nested"], FIXED, RANDOM, is_counts=True)
    assert np.isfinite(fit.coef).all()
    (warned,) = [r.getMessage() for r in caplog.records if "freedom left" in r.getMessage()]
    assert "'sam' keeps 4 of its 6" in warned and "CALIBRATION.md" in warned
    assert "very few" not in warned


# -- the command line ---------------------------------------------------------------------


def _config(path: Path, data: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(data)},
                "model": {"fixed": FIXED, "random": RANDOM},
                "cluster": {"n_workers": 1, "processes": False},
                "output": {"plots": False},
                "progress": False,
            }
        )
    )
    return path


def _one_line_refusal(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("flashmm-dask: error: random component 'sam' has no replication")
    assert "Traceback" not in res.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["run", "stats"])
def test_cli_refuses_with_one_line_and_writes_nothing(command, stores, tmp_path):
    config = _config(tmp_path / "run.yaml", stores["confounded"])
    out = tmp_path / "out"
    res = subprocess.run(
        [CLI, command, str(config), "--output", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    _one_line_refusal(res)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_cli_fit_on_saved_statistics_refuses(stores, tmp_path):
    expr = fm.read_expression(stores["confounded"])
    design = fm.build_design(expr.obs, FIXED, RANDOM)
    saved = tmp_path / "stats.zarr"
    fm.reduce_stats(expr, design, transform="log2p1").save(str(saved))
    config = _config(tmp_path / "run.yaml", stores["confounded"])
    existing = tmp_path / "existing"  # an output folder made before: kept, left empty
    existing.mkdir()
    for out in (tmp_path / "out", existing):
        res = subprocess.run(
            [CLI, "fit", str(config), "--stats", str(saved), "--output", str(out), "--quiet"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        _one_line_refusal(res)
    assert not (tmp_path / "out").exists()
    assert existing.is_dir() and not any(existing.iterdir())


def test_each_stratum_with_few_df_is_named_in_its_warning(stores, caplog):
    with caplog.at_level(logging.WARNING, logger="flashmm_dask"):
        fits = fm.flashmm(stores["nested"], "~ trt", RANDOM, is_counts=True, by="cls")
    warned = [r.getMessage() for r in caplog.records if "freedom left" in r.getMessage()]
    assert len(warned) == len(fits) > 1
    for level, message in zip(fits, warned, strict=True):
        assert f"(stratum cls={level}): random component 'sam' keeps 4 of its 6" in message


def test_a_stratum_with_one_donor_per_condition_is_skipped_before_the_data_pass(stores, caplog):
    """The strata of runs and of flashmm(by=): plan_strata checks each stratum's design."""
    obs = nested_obs((3, 3))
    confounded = (obs["cls"] == "2").to_numpy()
    obs.loc[confounded, "sam"] = np.where(obs.loc[confounded, "trt"] == "A", "A1", "B1")
    with caplog.at_level(logging.WARNING, logger="flashmm_dask"):
        strata = plan_strata(obs, "~ trt", RANDOM, by="cls")
    assert strata.levels == ("0", "1")
    assert "random component 'sam' has no replication left" in strata.skipped["2"]
    assert "stratum cls=2 is skipped: random component 'sam'" in caplog.text
    with pytest.raises(fm.DesignError, match=r"component 'sam' has no replication left"):
        plan_strata(obs, "~ trt", RANDOM, cells="cls == '2'")
    unchecked = plan_strata(obs, "~ trt", RANDOM, by="cls", check_design=False)
    assert unchecked.levels == ("0", "1", "2")  # as R FLASHMM: fitted regardless
