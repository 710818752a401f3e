"""The design's fast path (flashmm_dask.design.fast) against formulaic's evaluation.

A design built from plain terms evaluates X and Z with NumPy from factor codes; these
tests build the same design without the fast path (formulaic, then R's column selection:
the path that tests/test_design.py checks against R) and require identical matrices,
column for column and bit for bit, on chunks of every kind. Terms that are not plain fall
back to formulaic, and so do chunks that are not (missing, unseen levels), with formulaic's
errors.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import scipy.sparse

from flashmm_dask.design import fast as design_fast
from flashmm_dask.design import formula as design_module
from flashmm_dask.design.formula import Design, build_design
from flashmm_dask.errors import DesignError


def metadata(n: int = 600, seed: int = 0) -> pd.DataFrame:
    """Cell metadata with every kind of column a design reads."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "sam": rng.choice([f"s{k}" for k in range(12)], n),  # strings
            "cls": pd.Categorical(
                rng.choice(["c", "a", "b"], n), categories=["c", "a", "b", "unused"]
            ),
            "trt": pd.Series(rng.choice(["A", "B"], n), dtype="string"),
            "dose": rng.choice(["1", "2", "10"], n),  # numbers as strings are levels
            "male": rng.random(n) < 0.5,  # a factor FALSE, TRUE
            "libsize": rng.integers(50, 5000, n),  # int64
            "age": rng.uniform(20, 80, n).astype(np.float32),
            "time": rng.normal(size=n),
        }
    )


def formulaic_only(design: Design) -> Design:
    return dataclasses.replace(design, _fast=None)


def assert_same_matrices(design: Design, chunk: pd.DataFrame) -> None:
    assert design._fast is not None and design._fast.values(chunk) is not None  # fast path
    slow = formulaic_only(design)
    X, X_ref = design.X(chunk), slow.X(chunk)
    assert X.dtype == np.float64 and X.flags["C_CONTIGUOUS"] and X.shape == X_ref.shape
    np.testing.assert_array_equal(X, X_ref)
    Z, Z_ref = design.Z(chunk), slow.Z(chunk)
    assert isinstance(Z, scipy.sparse.csr_matrix) and Z.dtype == np.float64
    assert Z.shape == Z_ref.shape
    np.testing.assert_array_equal(Z.toarray(), Z_ref.toarray())
    for both in (design.XZ(chunk), slow.XZ(chunk)):
        np.testing.assert_array_equal(both[0], X_ref)
        np.testing.assert_array_equal(both[1].toarray(), Z_ref.toarray())


PLAIN = [
    ("~ 0 + log(libsize) + cls + cls:trt", "~ 0 + sam"),
    ("~ log(libsize) + cls * trt", ["~ 0 + sam", "~ 0 + sam:time"]),
    ("~ age + male + dose + cls:dose", {"subject": "~ 0 + sam"}),
    ("~ 0 + cls:log2(age) + trt", "~ sam"),
    ("~ np.log1p(libsize) + age:libsize + cls", "~ 0 + sam + sam:age"),
    ("~ 1", ["~ 0 + sam", "~ 0 + cls:trt"]),
    ("~ 0 + time + cls:trt:male", "~ 0 + sam:male"),
]


@pytest.mark.parametrize(("fixed", "random"), PLAIN)
def test_fast_path_gives_formulaics_matrices(fixed: str, random) -> None:
    obs = metadata()
    design = build_design(obs, fixed, random, check_rank=False)
    assert design._fast is not None
    rng = np.random.default_rng(1)
    chunks = [
        obs,
        obs.iloc[:1],
        obs.iloc[100:350],
        obs.iloc[rng.permutation(len(obs))[:97]],  # shuffled rows, another index
        obs.iloc[:40].set_index(pd.Index([f"cell{k}" for k in range(40)])),
        obs[obs["cls"] == "a"],  # a chunk without some levels
        obs.iloc[:0],
    ]
    for chunk in chunks:
        assert_same_matrices(design, chunk)


def test_names_and_values_against_r_coding() -> None:
    """Spot values written out by hand: R's columns, first variable fastest."""
    obs = metadata(n=4)
    obs["cls"] = pd.Categorical(["a", "b", "c", "b"], categories=["c", "a", "b", "unused"])
    obs["trt"] = ["A", "B", "B", "A"]
    obs["libsize"] = [1, 10, 100, 1000]
    design = build_design(obs, "~ 0 + log(libsize) + cls + cls:trt", "~ 0 + sam", check_rank=False)
    assert design.covariates == (
        "log(libsize)",
        "clsc",
        "clsa",
        "clsb",
        "clsunused",
        "clsc:trtB",
        "clsa:trtB",
        "clsb:trtB",
        "clsunused:trtB",
    )
    expected = np.zeros((4, 9))
    expected[:, 0] = np.log([1, 10, 100, 1000])
    expected[[0, 1, 2, 3], [2, 3, 1, 3]] = 1
    expected[[1, 2], [7, 5]] = 1
    np.testing.assert_array_equal(design.X(obs), expected)


@pytest.mark.parametrize(
    "fixed",
    [
        "~ 0 + C(dose) + cls",
        "~ I(age ** 2) + cls",
        "~ np.power(age, 2) + cls",
        "~ 0 + cls + age:time:libsize",  # three numbers in one term
        "~ 0 + cls + exp10(time)",  # a formulaic function that is not a ufunc
    ],
)
def test_terms_that_are_not_plain_use_formulaic(fixed: str) -> None:
    obs = metadata()
    design = build_design(obs, fixed, "~ 0 + sam", check_rank=False)
    assert design._fast is None
    assert design.X(obs.iloc[:5]).shape == (5, design.p)


def test_fast_path_is_dropped_when_it_differs_from_formulaic(monkeypatch) -> None:
    obs = metadata()
    dense = design_fast.FastBlock.dense

    def off_by_one_ulp(self, values, n):
        out = dense(self, values, n)
        out[-1, -1] = np.nextafter(out[-1, -1], np.inf)
        return out

    monkeypatch.setattr(design_fast.FastBlock, "dense", off_by_one_ulp)
    design = build_design(obs, "~ 0 + log(libsize) + cls", "~ 0 + sam", check_rank=False)
    assert design._fast is None
    np.testing.assert_array_equal(design.X(obs), formulaic_only(design).X(obs))


def test_the_check_covers_every_level(monkeypatch) -> None:
    """Levels first seen after the first FAST_CHECK_ROWS cells are compared too."""
    monkeypatch.setattr(design_module, "FAST_CHECK_ROWS", 5)
    obs = metadata()
    obs.loc[len(obs) - 1, "sam"] = "s_last"
    late = design_fast.FastBlock.sparse

    def wrong_for_last_level(self, values, n):
        out = late(self, values, n).tolil()
        out[:, -1] = 0
        return out.tocsr()

    monkeypatch.setattr(design_fast.FastBlock, "sparse", wrong_for_last_level)
    design = build_design(obs, "~ 0 + cls", "~ 0 + sam", check_rank=False)
    assert design.random_names[-1] == "sams_last"
    assert design._fast is None


def test_non_finite_numbers_fall_back_to_formulaic() -> None:
    obs = metadata()
    design = build_design(
        obs, "~ 0 + log(time + 10) + log(age) + cls", "~ 0 + sam", check_rank=False
    )
    assert design._fast is None  # 'log(time + 10)' is not a plain function of a column
    design = build_design(obs, "~ 0 + log(age) + cls", "~ 0 + sam", check_rank=False)
    assert design._fast is not None
    chunk = obs.iloc[:6].copy()
    chunk["age"] = np.float32(0.0)  # log(0) = -inf: formulaic's result, and its warning
    with pytest.warns(RuntimeWarning, match="divide by zero"):
        X = design.X(chunk)
    assert np.isneginf(X[:, 0]).all()


def test_unseen_and_missing_levels_raise_formulaics_errors() -> None:
    obs = metadata()
    design = build_design(obs, "~ 0 + cls + trt", "~ 0 + sam", check_rank=False)
    assert design._fast is not None
    chunk = obs.iloc[:10].copy()
    chunk.loc[0, "sam"] = "nope"
    with pytest.raises(DesignError, match=r"level.*'nope'.*not in the obs the design was built"):
        design.Z(chunk)
    chunk = obs.iloc[:10].copy()
    chunk["cls"] = chunk["cls"].cat.add_categories(["new"])
    chunk.loc[3, "cls"] = "new"
    with pytest.raises(DesignError, match="'new'"):
        design.X(chunk)
    with pytest.raises(DesignError, match="column 'trt' not found in obs"):
        design.X(obs.drop(columns="trt"))


def test_categories_in_another_order_are_mapped_to_the_designs_levels() -> None:
    obs = metadata()
    design = build_design(obs, "~ 0 + cls + cls:trt", "~ 0 + sam", check_rank=False)
    chunk = obs.iloc[:50].copy()
    chunk["cls"] = chunk["cls"].cat.reorder_categories(["b", "unused", "a", "c"])
    chunk["sam"] = pd.Categorical(chunk["sam"])  # strings in the design, categories here
    assert_same_matrices(design, chunk)
    np.testing.assert_array_equal(design.X(chunk), design.X(obs.iloc[:50]))


def test_design_with_fast_path_pickles() -> None:
    import pickle

    obs = metadata()
    design = build_design(
        obs, "~ 0 + log(libsize) + cls + cls:trt", ["~ 0 + sam", "~ 0 + sam:time"], check_rank=False
    )
    again = pickle.loads(pickle.dumps(design))
    assert again._fast is not None
    np.testing.assert_array_equal(again.X(obs), design.X(obs))
    np.testing.assert_array_equal(again.Z(obs).toarray(), design.Z(obs).toarray())
