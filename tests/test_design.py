"""Tests of flashmm_dask.design.formula against R's model matrices and R's naming rules.

Reference values: tests/reference/*.json hold the cell metadata (``cells``) and R's
X'X, Z'X, Z'Z and column names (``summary``) computed by R FLASHMM 1.3.0 from R's
``model.matrix``. Names for formulas not in the cases follow R's documented coding rule
(terms.formula / model.matrix) and are written out by hand below.
"""

from __future__ import annotations

import itertools
import json
import pickle
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse

from flashmm_dask.design import formula as design_module
from flashmm_dask.design.formula import Design, build_design
from flashmm_dask.errors import DesignError, InputError
from flashmm_dask.numerics.linalg import aliased_columns

REFERENCE = Path(__file__).parent / "reference"
FIXED = "~ 0 + log(libsize) + cls + cls:trt"
RANDOM = {"simu_reml_k1": "~ 0 + sam", "simu_reml_k2": ["~ 0 + sam", "~ 0 + sam:time"]}


@cache
def _case(name: str) -> dict:
    with open(REFERENCE / f"{name}.json") as fh:
        return json.load(fh)


def simu_obs(name: str = "simu_reml_k2") -> pd.DataFrame:
    cells = _case(name)["cells"]
    return pd.DataFrame({k: cells[k] for k in ["sam", "cls", "trt", "libsize", "time"]})


def doc_obs() -> pd.DataFrame:
    cells = _case("doc_example_reml")["cells"]
    return pd.DataFrame({"trt": cells["trt"], "sam": cells["sam"]})


def assert_close_to_r(ours: np.ndarray, theirs: list, rtol: float = 1e-10) -> None:
    theirs_arr = np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs_arr.shape
    np.testing.assert_allclose(ours, theirs_arr, rtol=rtol, atol=rtol * np.abs(theirs_arr).max())


def check_against_summary(design: Design, obs: pd.DataFrame, summary: dict) -> None:
    assert list(design.covariates) == summary["covariates"]
    assert list(design.random_names) == summary["random"]
    assert list(design.d) == list(np.atleast_1d(summary["d"]))
    X = design.X(obs)
    Z = design.Z(obs)
    assert X.shape == (summary["n"], design.p)
    assert Z.shape == (summary["n"], design.q)
    assert_close_to_r(X.T @ X, summary["XX"])
    assert_close_to_r(np.asarray(Z.T @ X), summary["ZX"])
    assert_close_to_r((Z.T @ Z).toarray(), summary["ZZ"])


# --------------------------------------------------------------------------------------
# Against R
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["simu_reml_k1", "simu_reml_k2"])
def test_simu_cases_match_r_names_and_statistics(case: str) -> None:
    obs = simu_obs(case)
    design = build_design(obs, FIXED, RANDOM[case])
    check_against_summary(design, obs, _case(case)["summary"])


def test_simu_k2_components() -> None:
    design = build_design(simu_obs(), FIXED, RANDOM["simu_reml_k2"])
    assert design.components == ("sam", "sam:time")
    assert design.random == ("~ 0 + sam", "~ 0 + sam:time")
    assert design.K == 2 and design.q == sum(design.d) == 20
    assert design.random_names[10:] == tuple(f"{s}:time" for s in design.random_names[:10])


def test_doc_example_matches_r() -> None:
    obs = doc_obs()
    design = build_design(obs, "~ 0 + trt", "~ 0 + sam")
    summary = _case("doc_example_reml")["summary"]
    assert design.covariates == ("trtA", "trtB")
    # R's level order: "A1", "A10", "A2", ...
    assert design.random_names[:3] == ("samA1", "samA10", "samA2")
    check_against_summary(design, obs, summary)


def test_single_random_component_spanning_two_terms_matches_r() -> None:
    # One component "~ 0 + sam + sam:time" has the same Z as the two components together.
    obs = simu_obs()
    design = build_design(obs, FIXED, "~ 0 + sam + sam:time")
    summary = _case("simu_reml_k2")["summary"]
    assert design.components == ("sam + sam:time",)
    assert design.d == (20,)
    assert list(design.random_names) == summary["random"]
    assert_close_to_r((design.Z(obs).T @ design.Z(obs)).toarray(), summary["ZZ"])


def test_matrix_types() -> None:
    obs = simu_obs()
    design = build_design(obs, FIXED, RANDOM["simu_reml_k2"])
    X = design.X(obs)
    Z = design.Z(obs)
    assert X.dtype == np.float64 and X.flags["C_CONTIGUOUS"]
    assert isinstance(Z, scipy.sparse.csr_matrix) and Z.dtype == np.float64
    # each cell is in one sample: one indicator and one time entry per row
    assert np.array_equal(np.diff(Z.indptr), np.full(len(obs), 2))


# --------------------------------------------------------------------------------------
# Chunks and pickling
# --------------------------------------------------------------------------------------


def _stack(design: Design, obs: pd.DataFrame, bounds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    chunks = [obs.iloc[a:b] for a, b in itertools.pairwise(bounds)]
    X = np.vstack([design.X(c) for c in chunks])
    Z = scipy.sparse.vstack([design.Z(c) for c in chunks]).toarray()
    return X, Z


@pytest.mark.parametrize("size", [7, 256, 1000, 2999, 3000])
def test_chunked_evaluation_stacks_to_full(size: int) -> None:
    obs = simu_obs()
    design = build_design(obs, FIXED, RANDOM["simu_reml_k2"])
    bounds = [*range(0, len(obs), size), len(obs)]
    X, Z = _stack(design, obs, bounds)
    np.testing.assert_array_equal(X, design.X(obs))
    np.testing.assert_array_equal(Z, design.Z(obs).toarray())


def test_one_row_chunks_give_the_rows_of_the_full_matrices() -> None:
    obs = simu_obs()
    design = build_design(obs, FIXED, RANDOM["simu_reml_k2"])
    X, Z = _stack(design, obs, list(range(41)))
    np.testing.assert_array_equal(X, design.X(obs)[:40])
    np.testing.assert_array_equal(Z, design.Z(obs)[:40].toarray())


@pytest.mark.parametrize("column", ["sam", "cls", "trt"])
def test_chunks_missing_levels_keep_all_columns(column: str) -> None:
    obs = simu_obs()
    design = build_design(obs, FIXED, RANDOM["simu_reml_k2"])
    X_full = design.X(obs)
    Z_full = design.Z(obs).toarray()
    level = sorted(obs[column].unique())[-1]
    rows = np.flatnonzero((obs[column] == level).to_numpy())
    chunk = obs.iloc[rows]
    np.testing.assert_array_equal(design.X(chunk), X_full[rows])
    np.testing.assert_array_equal(design.Z(chunk).toarray(), Z_full[rows])


def test_shuffled_row_subset_and_other_index() -> None:
    obs = simu_obs()
    design = build_design(obs, FIXED, RANDOM["simu_reml_k2"])
    rows = np.random.default_rng(1).permutation(len(obs))[:123]
    chunk = obs.iloc[rows].set_index(pd.Index([f"cell{i}" for i in rows]))
    np.testing.assert_array_equal(design.X(chunk), design.X(obs)[rows])
    np.testing.assert_array_equal(design.Z(chunk).toarray(), design.Z(obs).toarray()[rows])


def test_empty_chunk() -> None:
    obs = simu_obs()
    design = build_design(obs, FIXED, RANDOM["simu_reml_k2"])
    assert design.X(obs.iloc[:0]).shape == (0, 7)
    assert design.Z(obs.iloc[:0]).shape == (0, 20)


def test_design_pickles() -> None:
    obs = simu_obs()
    design = build_design(obs, FIXED, RANDOM["simu_reml_k2"])
    clone = pickle.loads(pickle.dumps(design))
    assert clone == design
    assert clone.to_dict() == design.to_dict()
    np.testing.assert_array_equal(clone.X(obs), design.X(obs))
    np.testing.assert_array_equal(clone.Z(obs).toarray(), design.Z(obs).toarray())
    # and the clone still evaluates chunks that lack levels
    chunk = obs[obs["sam"] == "B4"]
    np.testing.assert_array_equal(clone.Z(chunk).toarray(), design.Z(chunk).toarray())


def test_to_dict_is_json() -> None:
    design = build_design(simu_obs(), FIXED, RANDOM["simu_reml_k2"])
    assert json.loads(json.dumps(design.to_dict()))["d"] == [10, 10]


# --------------------------------------------------------------------------------------
# R's naming and coding rules on other formulas
# --------------------------------------------------------------------------------------


def names(obs: pd.DataFrame, fixed: str) -> list[str]:
    return list(build_design(obs, fixed, "~ 0 + sam", check_rank=False).covariates)


def test_intercept_formula_names_and_values() -> None:
    obs = simu_obs()
    design = build_design(obs, "~ log(libsize) + cls", "~ 0 + sam")
    assert design.covariates == ("(Intercept)", "log(libsize)", "cls2", "cls3")
    expected = np.column_stack(
        [
            np.ones(len(obs)),
            np.log(obs["libsize"].to_numpy(dtype=float)),
            (obs["cls"] == "2").to_numpy(dtype=float),
            (obs["cls"] == "3").to_numpy(dtype=float),
        ]
    )
    np.testing.assert_allclose(design.X(obs), expected, rtol=1e-15)


@pytest.mark.parametrize(
    ("formula", "expected"),
    [
        ("~ 0 + trt", ["trtA", "trtB"]),
        ("~ cls*trt", ["(Intercept)", "cls2", "cls3", "trtB", "cls2:trtB", "cls3:trtB"]),
        # term order: by degree, whatever the written order
        (
            "~ 0 + cls:trt + log(libsize) + cls",
            ["log(libsize)", "cls1", "cls2", "cls3", "cls1:trtB", "cls2:trtB", "cls3:trtB"],
        ),
        # variables inside a term follow their first appearance in the formula
        ("~ 0 + trt + cls + cls:trt", ["trtA", "trtB", "cls2", "cls3", "trtB:cls2", "trtB:cls3"]),
        # without margins R codes by indicators; the first variable varies fastest
        (
            "~ 0 + cls:trt",
            ["cls1:trtA", "cls2:trtA", "cls3:trtA", "cls1:trtB", "cls2:trtB", "cls3:trtB"],
        ),
        (
            "~ 0 + cls:trt + trt",
            ["trtA", "trtB", "cls2:trtA", "cls3:trtA", "cls2:trtB", "cls3:trtB"],
        ),
        ("~ 0 + libsize", ["libsize"]),
        (
            "~ time + sam:time",
            [
                "(Intercept)",
                "time",
                *[f"time:sam{s}" for s in ["A2", "A3", "A4", "A5", "A6", "B1", "B2", "B3", "B4"]],
            ],
        ),
    ],
)
def test_r_names(formula: str, expected: list[str]) -> None:
    assert names(simu_obs(), formula) == expected


def test_random_names_with_numeric_interaction() -> None:
    design = build_design(simu_obs(), FIXED, "~ 0 + sam:time")
    assert design.components == ("sam:time",)
    assert design.random_names[:2] == ("samA1:time", "samA2:time")


def test_numeric_column_stays_numeric() -> None:
    obs = simu_obs()
    design = build_design(obs, "~ 0 + libsize + trt", "~ 0 + sam")
    assert design.covariates == ("libsize", "trtA", "trtB")
    np.testing.assert_array_equal(design.X(obs)[:, 0], obs["libsize"].to_numpy(dtype=float))


def test_level_order_strings_numbers_as_strings_and_categoricals() -> None:
    n = 12
    obs = pd.DataFrame(
        {
            "g": ["2", "10", "1"] * 4,  # numbers as strings sort as strings, as in R
            "h": pd.Categorical(["x", "y", "z"] * 4, categories=["z", "x", "y", "unused"]),
            "sam": ["s1", "s2"] * 6,
            "v": np.arange(n, dtype=float),
        }
    )
    design = build_design(obs, "~ 0 + g + v", "~ 0 + h", check_rank=False)
    assert design.covariates == ("g1", "g10", "g2", "v")
    # Categorical: categories order, unused categories kept (as R keeps unused levels)
    assert design.random_names == ("hz", "hx", "hy", "hunused")
    Z = design.Z(obs).toarray()
    np.testing.assert_array_equal(Z[:, 0], (obs["h"] == "z").to_numpy(dtype=float))
    np.testing.assert_array_equal(Z[:, 3], np.zeros(n))
    X = design.X(obs)
    np.testing.assert_array_equal(X[:, 1], (obs["g"] == "10").to_numpy(dtype=float))


@pytest.mark.parametrize("dtype", ["category", "string", "string[pyarrow]"])
def test_factor_dtypes_give_the_r_design(dtype: str) -> None:
    obs = simu_obs("simu_reml_k1").astype({"sam": dtype, "cls": dtype, "trt": dtype})
    design = build_design(obs, FIXED, RANDOM["simu_reml_k1"])
    check_against_summary(design, obs, _case("simu_reml_k1")["summary"])
    rows = np.flatnonzero((obs["sam"] == "B7").to_numpy())
    np.testing.assert_array_equal(design.X(obs.iloc[rows]), design.X(obs)[rows])


def test_boolean_column_is_a_factor_like_r_logical() -> None:
    obs = simu_obs()
    obs["treated"] = obs["trt"] == "B"
    design = build_design(obs, "~ 0 + treated", "~ 0 + sam")
    assert design.covariates == ("treatedFALSE", "treatedTRUE")
    np.testing.assert_array_equal(design.X(obs)[:, 1], obs["treated"].to_numpy(dtype=float))
    np.testing.assert_array_equal(
        design.X(obs.iloc[:50]), build_design(obs, "~ 0 + trt", "~ 0 + sam").X(obs.iloc[:50])
    )


# --------------------------------------------------------------------------------------
# Random components
# --------------------------------------------------------------------------------------


def test_named_random_components() -> None:
    obs = simu_obs()
    design = build_design(obs, FIXED, {"subject": "~ 0 + sam", "slope": "~ 0 + sam:time"})
    assert design.components == ("subject", "slope")
    assert design.d == (10, 10)
    reference = build_design(obs, FIXED, RANDOM["simu_reml_k2"])
    np.testing.assert_array_equal(design.Z(obs).toarray(), reference.Z(obs).toarray())


def test_random_intercept_follows_r() -> None:
    obs = simu_obs()
    design = build_design(obs, FIXED, "~ sam")
    assert design.components == ("sam",)
    assert design.random_names[:3] == ("(Intercept)", "samA2", "samA3")
    Z = design.Z(obs).toarray()
    np.testing.assert_array_equal(Z[:, 0], np.ones(len(obs)))
    np.testing.assert_array_equal(Z[:, 1], (obs["sam"] == "A2").to_numpy(dtype=float))


# --------------------------------------------------------------------------------------
# Rank
# --------------------------------------------------------------------------------------


def test_aliased_columns_finds_linear_combinations_of_earlier_columns() -> None:
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(size=(3, 50))
    X = np.column_stack([a, b, a - 2 * b, c, np.zeros(50), 3 * c])
    assert aliased_columns(X.T @ X).tolist() == [2, 4, 5]
    assert aliased_columns(X[:, [0, 1, 3]].T @ X[:, [0, 1, 3]]).tolist() == []


def test_rank_deficient_design_names_the_aliased_column() -> None:
    obs = simu_obs()
    obs.loc[obs["cls"] == "3", "trt"] = "A"  # no treated cell of type 3: cls3:trtB is zero
    with pytest.raises(DesignError) as err:
        build_design(obs, FIXED, "~ 0 + sam")
    assert str(err.value) == (
        "X is not full column rank: columns 'cls3:trtB' are aliased (linear combinations of "
        "other columns); remove them from the fixed formula"
    )
    design = build_design(obs, FIXED, "~ 0 + sam", check_rank=False)
    assert design.covariates[-1] == "cls3:trtB"


def test_rank_check_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # X'X accumulated over many chunks finds the same aliasing as over one
    monkeypatch.setattr(design_module, "RANK_CHUNK_ROWS", 401)
    obs = simu_obs()
    with pytest.raises(DesignError, match=r"columns 'log2\(libsize\)' are aliased"):
        build_design(obs, "~ 0 + log(libsize) + cls + log2(libsize)", "~ 0 + sam")
    build_design(obs, FIXED, "~ 0 + sam")


def test_r_rank_deficient_coding_is_reported() -> None:
    # R codes "~ cls:trt" with an intercept by indicators: 1 + 6 columns of rank 6
    with pytest.raises(DesignError, match=r"columns 'cls3:trtB' are aliased"):
        build_design(simu_obs(), "~ cls:trt", "~ 0 + sam")


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def test_missing_column() -> None:
    obs = simu_obs()[["sam", "cls", "trt"]]
    with pytest.raises(DesignError) as err:
        build_design(obs, "~ 0 + cls", "~ 0 + donor")
    assert str(err.value).startswith("column 'donor' not found in obs; available: sam, cls, trt")
    assert "'~ 0 + donor'" in str(err.value)
    assert isinstance(err.value, InputError)


def test_chunk_missing_a_column() -> None:
    obs = simu_obs()
    design = build_design(obs, FIXED, "~ 0 + sam")
    with pytest.raises(DesignError, match="column 'libsize' not found in obs"):
        design.X(obs.drop(columns="libsize"))


@pytest.mark.parametrize(
    ("fixed", "random", "which"),
    [
        ("~ 0 + (cls", "~ 0 + sam", "fixed formula '~ 0 + (cls'"),
        ("~ 0 + cls", "~ 0 + sam +", "random formula '~ 0 + sam +'"),
    ],
)
def test_syntax_error_names_the_formula(fixed: str, random: str, which: str) -> None:
    with pytest.raises(DesignError, match="could not be parsed") as err:
        build_design(simu_obs(), fixed, random)
    assert which in str(err.value)
    assert "\x1b" not in str(err.value)


def test_lme4_bar_syntax_is_explained() -> None:
    with pytest.raises(DesignError, match=r"random='~ 0 \+ sam'"):
        build_design(simu_obs(), FIXED, "~ (1 | sam)")


def test_formula_with_response_is_rejected() -> None:
    with pytest.raises(DesignError, match="one-sided"):
        build_design(simu_obs(), "y ~ 0 + cls", "~ 0 + sam")


def test_single_level_random_component() -> None:
    obs = simu_obs()
    obs["batch"] = "b1"
    with pytest.raises(DesignError) as err:
        build_design(obs, FIXED, ["~ 0 + sam", "~ 0 + batch"])
    assert str(err.value).startswith(
        "random component 'batch' has a single level; a random effect needs at least 2"
    )


def test_single_level_fixed_factor() -> None:
    obs = simu_obs()
    obs["batch"] = "b1"
    with pytest.raises(DesignError, match="factor 'batch' in the fixed formula has a single"):
        build_design(obs, "~ 0 + log(libsize) + batch", "~ 0 + sam")


@pytest.mark.parametrize(("column", "value"), [("libsize", np.nan), ("sam", None)])
def test_missing_values_name_column_and_count(column: str, value: object) -> None:
    obs = simu_obs()
    obs[column] = obs[column].astype(object)
    obs.loc[[3, 17, 2000], column] = value
    with pytest.raises(DesignError, match=f"obs column '{column}' has 3 missing"):
        build_design(obs, FIXED, "~ 0 + sam")


def test_unused_column_with_missing_values_is_fine() -> None:
    obs = simu_obs()
    obs.loc[5, "time"] = np.nan
    design = build_design(obs, FIXED, "~ 0 + sam")
    assert design.X(obs).shape == (3000, 7)


def test_empty_obs() -> None:
    with pytest.raises(DesignError, match="0 rows"):
        build_design(simu_obs().iloc[:0], FIXED, "~ 0 + sam")


def test_no_random_component() -> None:
    with pytest.raises(DesignError, match="random has no components"):
        build_design(simu_obs(), FIXED, [])


def test_duplicate_component() -> None:
    with pytest.raises(DesignError, match="random component 'sam' is given twice"):
        build_design(simu_obs(), FIXED, ["~ 0 + sam", "~0+sam"])


def test_unseen_level_in_a_chunk() -> None:
    obs = simu_obs()
    design = build_design(obs.iloc[:2000], FIXED, "~ 0 + sam")
    chunk = obs.iloc[:10].copy()
    chunk.iloc[0, chunk.columns.get_loc("sam")] = "Z9"
    with pytest.raises(DesignError, match=r"level.*'Z9'.*not in the obs the design was built"):
        design.Z(chunk)


@pytest.mark.parametrize("name", ["Treatment", "bs", "center", "C"])
def test_columns_named_like_formulaic_transforms_are_columns(name: str) -> None:
    """An obs column called like one of formulaic's transforms or contrasts (R's CO2 has
    'Treatment') is read as the column, as formulaic itself does; it was left out of the
    frame and formulaic failed on its transform of that name."""
    obs = pd.DataFrame(
        {
            "g": pd.Categorical(list("aabbccdd")),
            name: pd.Categorical(list("xyxyxyxy")),
            "x": np.arange(8.0),
        }
    )
    design = build_design(obs, f"~ {name} + log(x + 1)", f"~ 0 + g + g:{name}")
    assert list(design.covariates) == ["(Intercept)", f"{name}y", "log(x + 1)"]
    X = design.X(obs)
    np.testing.assert_array_equal(X[:, 1], (obs[name] == "y").to_numpy(dtype=float))
    np.testing.assert_allclose(X[:, 2], np.log(obs["x"] + 1))
    assert design.q == 8  # g, and g:{name} coded as R codes it (the y level in each g)
