"""Indicator fixed effects that vary within the levels of a random component that holds no
interaction with them (a paired design fitted with a donor intercept only) are named in one
warning; nested designs, numeric covariates and designs with the interaction component are
quiet."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

import flashmm_dask as fm
from flashmm_dask.design.check import check_design_replication, design_crossproducts
from flashmm_dask.design.within import within_level_effects


def cells(n: int = 600, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    donor = rng.integers(12, size=n)
    return pd.DataFrame(
        {
            "donor": [f"D{k}" for k in donor],
            "cond": rng.choice(["ctl", "stim"], n),  # every donor in both: paired
            "group": np.where(donor < 6, "A", "B"),  # donors nested in group
            "cls": rng.choice(list("abc"), n),
            "lib": rng.uniform(1.0, 2.0, n),
        }
    )


def found(fixed, random):
    obs = cells()
    design = fm.build_design(obs, fixed, random)
    XX, ZX, ZZ = design_crossproducts(design, obs)
    args = (design.d, len(obs), design.covariates, design.components)
    return within_level_effects(XX, ZX, ZZ, *args)


@pytest.mark.parametrize(
    "fixed, random, expected",
    [
        ("~ cond", "~ 0 + donor", {"donor": ["condstim"]}),
        ("~ log(lib) + cond", "~ 0 + donor", {"donor": ["condstim"]}),
        ("~ cond", ["~ 0 + donor", "~ 0 + donor:cond"], {}),
        ("~ group + log(lib)", "~ 0 + donor", {}),
        ("~ 0 + cls + cls:group", ["~ 0 + donor", "~ 0 + donor:cls"], {}),
        (
            "~ 0 + cls + cls:group",
            "~ 0 + donor",
            {"donor": ["clsa", "clsb", "clsc", "clsa:groupB", "clsb:groupB", "clsc:groupB"]},
        ),
    ],
)
def test_effects_varying_within_donors(fixed, random, expected):
    assert found(fixed, random) == expected


def test_one_warning_names_them_and_the_remedy(caplog):
    obs = cells()
    with caplog.at_level(logging.WARNING, logger="flashmm_dask"):
        check_design_replication(fm.build_design(obs, "~ cond", "~ 0 + donor"), obs, where="x")
    (message,) = [r.getMessage() for r in caplog.records if "vary within" in r.getMessage()]
    assert "(x): 'condstim' within the levels of random component 'donor'" in message
    assert "'~ 0 + donor:condition'" in message and "0.18" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flashmm_dask"):
        design = fm.build_design(obs, "~ cond", ["~ 0 + donor", "~ 0 + donor:cond"])
        check_design_replication(design, obs)
    assert not [r for r in caplog.records if "vary within" in r.getMessage()]


def test_a_classical_split_plot_is_quiet():
    """One observation per whole plot and subplot level (lme4's Alfalfa, a split plot):
    the interaction of the subplot factor with the whole plot is the residual itself."""
    plots = [f"P{k}" for k in range(12)]
    obs = pd.DataFrame(
        {
            "plot": np.repeat(plots, 4),
            "date": np.tile(["d1", "d2", "d3", "d4"], 12),
            "variety": np.repeat(np.arange(12) % 3, 4).astype(str),
        }
    )
    design = fm.build_design(obs, "~ variety + date", "~ 0 + plot")
    XX, ZX, ZZ = design_crossproducts(design, obs)
    args = (design.d, len(obs), design.covariates, design.components)
    assert within_level_effects(XX, ZX, ZZ, *args) == {}
    doubled = pd.concat([obs, obs], ignore_index=True)  # two cells per plot and date
    design = fm.build_design(doubled, "~ variety + date", "~ 0 + plot")
    XX, ZX, ZZ = design_crossproducts(design, doubled)
    args = (design.d, len(doubled), design.covariates, design.components)
    assert within_level_effects(XX, ZX, ZZ, *args) == {"plot": ["dated2", "dated3", "dated4"]}
