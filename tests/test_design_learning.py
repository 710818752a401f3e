"""A design learned from the first cell of each level equals one learned from every cell.

build_design learns formulaic's structure (levels, columns, stateful transforms) from the
first cell of each value of each factor column rather than by materialising X on every
cell (:func:`flashmm_dask.design.terms.learn_spec`). These tests build every design both
ways (the whole-obs way by learning from all cells) and require the same names, the same
learned state, bit-identical X and Z, the same fast-path decision and the same rank
errors, on factors, numbers, interactions, log(), stateful transforms (center, scale,
standardize) and level combinations that no cell has.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from flashmm_dask.design import formula as design_module
from flashmm_dask.design import terms as design_terms
from flashmm_dask.design.formula import Design, build_design
from flashmm_dask.errors import DesignError


def metadata(n: int = 3_000, seed: int = 0) -> pd.DataFrame:
    """Cell metadata with every kind of column; late levels appear only near the end."""
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame(
        {
            "donor": rng.choice([f"d{k}" for k in range(20)], n),  # strings
            "state": pd.Categorical(
                rng.choice(["S2", "S0", "S1"], n), categories=["S2", "S0", "S1", "unused"]
            ),
            "condition": pd.Series(rng.choice(["A", "B"], n), dtype="string"),
            "dose": rng.choice(["1", "2", "10"], n),  # numbers as strings are levels
            "male": rng.random(n) < 0.5,
            "k": rng.integers(0, 4, n),  # an integer column, a factor only through C()
            "libsize": rng.integers(50, 5000, n),
            "age": rng.uniform(20, 80, n).astype(np.float32),
            "time": rng.normal(size=n),
        }
    )
    obs.loc[n - 1, "donor"] = "d_last"  # a level first seen in the last cell
    obs.loc[n - 2, "k"] = 7  # a value of C(k) in no cell learned from
    return obs


def whole_obs_design(obs: pd.DataFrame, fixed: str, random, **kwargs) -> Design:
    """The design learned by materialising every cell (the way before learning from the
    first cells of each level)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(design_module, "_first_cells", lambda frame: np.arange(len(frame)))
        return build_design(obs, fixed, random, **kwargs)


def assert_same_design(new: Design, old: Design, obs: pd.DataFrame) -> None:
    assert new.covariates == old.covariates
    assert new.random_names == old.random_names
    assert new.d == old.d and new.components == old.components
    assert (new._fast is None) == (old._fast is None)
    for a, b in [
        (new._fixed_block, old._fixed_block),
        *zip(new._random_blocks, old._random_blocks, strict=True),
    ]:
        assert a.spec.column_names == b.spec.column_names
        assert a.spec.transform_state == b.spec.transform_state
        assert a.spec.encoder_state.keys() == b.spec.encoder_state.keys()
        for expr, (kind, state) in a.spec.encoder_state.items():
            assert kind == b.spec.encoder_state[expr][0]
            assert state.get("categories") == b.spec.encoder_state[expr][1].get("categories")
        np.testing.assert_array_equal(a.keep, b.keep)
    X_new, X_old = new.X(obs), old.X(obs)
    assert X_new.dtype == X_old.dtype and X_new.flags.c_contiguous
    np.testing.assert_array_equal(X_new, X_old)
    Z_new, Z_old = new.Z(obs), old.Z(obs)
    assert Z_new.shape == Z_old.shape and (Z_new != Z_old).nnz == 0


FORMULAS = [
    ("~ 0 + log(libsize) + age + male + state + state:condition", "~ 0 + donor"),
    ("~ log(libsize) + dose + state:condition", ["~ 0 + donor", "~ 0 + donor:time"]),
    ("~ 0 + state + state:log(libsize) + condition:age", "~ 0 + donor"),
    ("~ center(age) + state", "~ 0 + donor"),
    ("~ 0 + state + scale(libsize) + state:condition", "~ 0 + donor"),
    ("~ 0 + state + state:standardize(time)", "~ 0 + donor"),
    ("~ state + I(center(age) ** 2) + scale(log(libsize))", "~ 0 + donor"),
    ("~ 0 + C(k) + condition", "~ 0 + donor"),
    ("~ 0 + C(state) + condition", "~ 0 + donor"),
    ("~ 0 + state + log(age)", "~ 0 + donor:center(time)"),
]


@pytest.mark.parametrize(("fixed", "random"), FORMULAS)
def test_learning_from_the_first_cells_equals_learning_from_all(fixed, random) -> None:
    obs = metadata()
    new = build_design(obs, fixed, random, check_rank=False)  # 'unused' states: no cells
    assert_same_design(new, whole_obs_design(obs, fixed, random, check_rank=False), obs)


@pytest.mark.parametrize(("fixed", "random"), FORMULAS[:3])
def test_plain_designs_are_learned_from_one_cell_per_level(fixed, random, monkeypatch) -> None:
    """No formulaic evaluation sees more cells than the factors have levels (n = 3,000)."""
    seen: list[int] = []
    learn = design_terms._model_spec

    def counted(formula, parsed, frame, role, output):
        seen.append(len(frame))
        return learn(formula, parsed, frame, role, output)

    monkeypatch.setattr(design_terms, "_model_spec", counted)
    build_design(metadata(), fixed, random, check_rank=False)
    assert seen and max(seen) <= 20 + 1 + 3 + 2 + 3 + 2


def test_stateful_transforms_use_every_cell() -> None:
    """center(), scale() and standardize() keep their mean and sd over all cells."""
    obs = metadata()
    fixed = "~ 0 + state + center(age) + scale(time)"
    design = build_design(obs, fixed, "~ 0 + donor", check_rank=False)
    state = design._fixed_block.spec.transform_state
    age = obs["age"].to_numpy()
    assert state["center(age)"]["center"] == np.mean(age)
    assert state["scale(time)"]["scale"] == np.std(obs["time"].to_numpy(), ddof=1)
    X = design.X(obs)
    np.testing.assert_allclose(X[:, design.covariates.index("center(age)")].mean(), 0, atol=1e-5)


def test_absent_level_combinations() -> None:
    """Some state:condition cells absent: the same columns, and the same aliased columns."""
    obs = metadata()
    keep = ~((obs["state"] == "S1") & (obs["condition"] == "B"))
    obs = obs[keep].reset_index(drop=True)
    fixed, random = "~ 0 + state + state:condition + log(libsize)", "~ 0 + donor"
    with pytest.raises(DesignError) as new:
        build_design(obs, fixed, random)
    with pytest.raises(DesignError) as old:
        whole_obs_design(obs, fixed, random)
    assert str(new.value) == str(old.value)
    assert "aliased" in str(new.value)
    assert_same_design(
        build_design(obs, fixed, random, check_rank=False),
        whole_obs_design(obs, fixed, random, check_rank=False),
        obs,
    )
    # without the empty interaction cells' columns, full rank
    obs2 = obs.assign(state=obs["state"].cat.remove_unused_categories())
    fixed2 = "~ 0 + condition + state + age"
    assert_same_design(
        build_design(obs2, fixed2, random), whole_obs_design(obs2, fixed2, random), obs2
    )


def test_transform_failing_outside_the_first_cells_raises_as_before() -> None:
    """log of a negative number after the learning cells: formulaic's error at build time."""
    obs = metadata()
    obs["x"] = obs["time"].abs() + 1.0
    obs.loc[len(obs) - 5, "x"] = -1.0
    with pytest.raises(DesignError) as new, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        build_design(obs, "~ 0 + state + log(x)", "~ 0 + donor", check_rank=False)
    with pytest.raises(DesignError) as old, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        whole_obs_design(obs, "~ 0 + state + log(x)", "~ 0 + donor", check_rank=False)
    assert str(new.value) == str(old.value)
    assert "the fixed formula '~ 0 + state + log(x)' could not be evaluated on obs" in str(
        new.value
    )


def test_infinite_values_outside_the_first_cells_drop_the_fast_path() -> None:
    """log(0) late in the cells: formulaic's -inf and warning, and no fast path, as before."""
    obs = metadata()
    obs.loc[len(obs) - 3, "age"] = np.float32(0.0)
    fixed = "~ 0 + state + log(age)"
    with pytest.warns(RuntimeWarning, match="divide by zero"):
        new = build_design(obs, fixed, "~ 0 + donor", check_rank=False)
    with pytest.warns(RuntimeWarning, match="divide by zero"):
        old = whole_obs_design(obs, fixed, "~ 0 + donor", check_rank=False)
    assert new._fast is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert_same_design(new, old, obs)
        assert np.isneginf(new.X(obs.iloc[-3:])[0, -1])


def test_a_transform_that_fails_on_the_first_cells_alone_is_learned_from_all() -> None:
    """scale(x) of two equal values divides by 0 there, not over all cells."""
    obs = metadata()
    obs["x"] = obs["time"]
    first = design_module._first_cells(design_module._prepare(obs, ["state", "donor"]))
    obs.loc[first, "x"] = 1.0
    fixed = "~ 0 + state + scale(x)"
    new = build_design(obs, fixed, "~ 0 + donor", check_rank=False)
    assert_same_design(new, whole_obs_design(obs, fixed, "~ 0 + donor", check_rank=False), obs)
    assert np.isfinite(new.X(obs)).all()


def test_state_with_a_numeric_factor_that_does_not_parse_alone() -> None:
    """A backticked name beside center(): the state is then learned from every cell."""
    obs = metadata().assign(**{"my age": lambda o: o["time"] * 2})
    fixed = "~ 0 + state + `my age` + center(age)"
    new = build_design(obs, fixed, "~ 0 + donor", check_rank=False)
    assert_same_design(new, whole_obs_design(obs, fixed, "~ 0 + donor", check_rank=False), obs)
    assert new._fixed_block.spec.transform_state["center(age)"]["center"] == np.mean(obs["age"])
