"""Tests of flashmm_dask.design.contrasts: R reference matrices, grammar, linearity, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flashmm_dask.design.contrasts import contrast_matrix
from flashmm_dask.errors import ContrastError, InputError

REFERENCE = Path(__file__).parent / "reference"
SIMU = ["log(libsize)", "cls1", "cls2", "cls3", "cls1:trtB", "cls2:trtB", "cls3:trtB"]
TRT = ["trtA", "trtB"]
ABCD = ["A", "B", "C", "D"]


def _case(name: str) -> dict:
    with open(REFERENCE / f"{name}.json") as f:
        return json.load(f)


def _raises(contrast, names, *fragments: str) -> str:
    """Assert contrast_matrix raises ContrastError whose message holds every fragment."""
    with pytest.raises(ContrastError) as info:
        contrast_matrix(contrast, names)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# --- R reference values ---------------------------------------------------------------


@pytest.mark.parametrize("case", ["simu_reml_k1", "simu_ml_k1", "simu_reml_k2"])
def test_reference_simu_contrast_matrix(case):
    ref = _case(case)
    names = ref["summary"]["covariates"]
    labels = ref["contrasts"]["names"]
    assert labels == ["second-first", "first"]
    L = contrast_matrix(
        dict(zip(labels, ["cls2:trtB - cls1:trtB", "cls1:trtB"], strict=True)), names
    )
    expected = np.array(ref["contrasts"]["matrix"], dtype=float)
    assert L.shape == expected.shape == (len(names), 2)
    assert list(L.index) == names and list(L.columns) == labels
    assert (L.dtypes == np.float64).all()
    np.testing.assert_array_equal(L.to_numpy(), expected)


@pytest.mark.parametrize("case", ["doc_example_reml", "doc_example_ml"])
def test_reference_doc_example_weights(case):
    ref = _case(case)
    contrast = ref["lmmtest"]["contrast"]
    L = contrast_matrix({contrast["name"]: "trtB - trtA"}, ref["summary"]["covariates"])
    assert list(L.columns) == [contrast["name"]]
    np.testing.assert_array_equal(L[contrast["name"]].to_numpy(), contrast["weights"])


# --- grammar --------------------------------------------------------------------------


def test_average_of_others():
    L = contrast_matrix({"avg": "A-(B+C+D)/3"}, ABCD)
    np.testing.assert_allclose(L["avg"].to_numpy(), [1, -1 / 3, -1 / 3, -1 / 3], rtol=1e-15)


def test_names_with_parentheses_and_colons():
    L = contrast_matrix({"a": "2*log(libsize) - cls1", "x": "cls3:trtB - cls2:trtB"}, SIMU)
    np.testing.assert_array_equal(L["a"].to_numpy(), [2, -1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(L["x"].to_numpy(), [0, 0, 0, 0, 0, -1, 1])
    # a name that is itself parenthesised, inside a parenthesised group
    L = contrast_matrix("((Intercept) - x)/2 + (x)", ["(Intercept)", "x"])
    np.testing.assert_array_equal(L.iloc[:, 0].to_numpy(), [0.5, 0.5])


@pytest.mark.parametrize("names", [["A", "AB"], ["AB", "A"]])
def test_longest_match(names):
    L = contrast_matrix({"c": "AB - 2*A"}, names)
    assert L.loc["AB", "c"] == 1.0 and L.loc["A", "c"] == -2.0


def test_backtick_quoted_names():
    names = ["name with space", "b-c", "log(libsize)"]
    L = contrast_matrix({"q": "`name with space` - 3*`b-c` + `log(libsize)`/2"}, names)
    np.testing.assert_array_equal(L["q"].to_numpy(), [1, -3, 0.5])


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("A - B*2 + C/4", [1, -2, 0.25, 0]),
        ("-A + +B", [-1, 1, 0, 0]),
        ("--A", [1, 0, 0, 0]),
        ("2*(A - B)*3", [6, -6, 0, 0]),
        ("(A - B)/2/2", [0.25, -0.25, 0, 0]),
        ("1.5e1*A - .5*D + 2E-1*C", [15, 0, 0.2, -0.5]),
        ("(A + 1) - 1 + 0*B", [1, 0, 0, 0]),
        ("(A - A + 1)*B", [0, 1, 0, 0]),
        ("  A\t-\nB ", [1, -1, 0, 0]),
        ("-(A)", [-1, 0, 0, 0]),
    ],
)
def test_arithmetic(expression, expected):
    L = contrast_matrix({"c": expression}, ABCD)
    np.testing.assert_allclose(L["c"].to_numpy(), expected, rtol=1e-15, atol=0)
    # no negative zeros for the coefficients that are not mentioned
    assert not np.signbit(L["c"].to_numpy()[np.asarray(expected) == 0]).any()


def test_input_forms_and_order():
    by_list = contrast_matrix(["trtB - trtA", "trtA"], TRT)
    assert list(by_list.columns) == ["trtB - trtA", "trtA"]
    assert list(by_list.index) == TRT
    np.testing.assert_array_equal(by_list.to_numpy(), [[-1, 1], [1, 0]])
    single = contrast_matrix("trtB - trtA", TRT)
    assert list(single.columns) == ["trtB - trtA"]
    pd.testing.assert_frame_equal(single, by_list[["trtB - trtA"]])
    by_map = contrast_matrix({"z": "trtA", "a": "trtB - trtA"}, tuple(TRT))
    assert list(by_map.columns) == ["z", "a"]  # mapping order, not sorted
    by_index = contrast_matrix({"z": "trtA"}, pd.Index(TRT))
    assert list(by_index.index) == TRT


# --- linearity (property-style) ---------------------------------------------------------


def _expression(weights: np.ndarray, names: list[str]) -> str:
    """Write a weight vector as an expression, with repr() numbers (may use e-notation)."""
    return " + ".join(
        f"{float(w)!r}*`{n}`" if n.startswith("log") else f"({float(w)!r})*{n}"
        for w, n in zip(weights, names, strict=True)
    )


def test_linearity_random_combinations():
    rng = np.random.default_rng(20240611)
    for _ in range(40):
        a = rng.normal(size=len(SIMU)) * 10.0 ** rng.integers(-6, 4, size=len(SIMU))
        b = rng.integers(-5, 6, size=len(SIMU)).astype(float)
        b[rng.integers(len(SIMU))] = 7.0  # never all zero
        s = float(rng.choice([-3.0, -0.5, 0.25, 2.0]))
        ea, eb = _expression(a, SIMU), _expression(b, SIMU)
        L = contrast_matrix(
            {
                "a": ea,
                "b": eb,
                "sum": f"{ea} + {eb}",
                "diff": f"({ea}) - ({eb})",
                "scaled": f"{s!r}*({ea}) + ({eb})/{s!r}",
            },
            SIMU,
        )
        np.testing.assert_allclose(L["a"], a, rtol=1e-14)
        np.testing.assert_array_equal(L["b"], b)
        np.testing.assert_allclose(L["sum"], L["a"] + L["b"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(L["diff"], a - b, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(L["scaled"], s * a + b / s, rtol=1e-12, atol=1e-12)


# --- errors -----------------------------------------------------------------------------


def test_error_class_is_an_input_error():
    assert issubclass(ContrastError, InputError)


def test_unknown_name_lists_valid_names():
    message = _raises({"B-A": "trtB - trtC"}, TRT, "contrast 'B-A'", "'trtC'", "position 7")
    assert message.endswith("valid names: trtA, trtB")


@pytest.mark.parametrize(
    ("expression", "fragments"),
    [
        ("cls10:trtB", ["unknown coefficient 'cls10:trtB'", "position 0"]),
        ("cls1:trtBx - cls1", ["unknown coefficient 'cls1:trtBx'"]),
        ("cls1:trtC", ["unknown coefficient 'cls1:trtC'", "position 0"]),
        ("cls1 - cls4:trtB", ["unknown coefficient 'cls4:trtB'", "position 7"]),
        ("`cls 1`", ["unknown coefficient 'cls 1'"]),
        ("`cls1", ["unclosed backtick", "position 0"]),
    ],
)
def test_unknown_or_misquoted_names(expression, fragments):
    _raises({"c": expression}, SIMU, "contrast 'c'", *fragments)


@pytest.mark.parametrize(
    ("expression", "fragments"),
    [
        ("__import__('os').system('touch PWNED')", ["unknown coefficient '__import__'"]),
        ("trtA; import os", ["unexpected character ';'", "position 4"]),
        ("trtA if True else trtB", ["unknown coefficient 'if'", "position 5"]),
        ("trtA**2", ["unexpected '*'", "position 5"]),
        ("trtA^2", ["unexpected character '^'"]),
        ("[trtA]", ["unexpected character '['"]),
        ("lambda: trtA", ["unknown coefficient 'lambda'"]),
    ],
)
def test_code_is_never_executed(expression, fragments, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _raises({"c": expression}, TRT, *fragments)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    ("expression", "fragments"),
    [
        ("", ["expression is empty"]),
        ("   ", ["expression is empty"]),
        ("(trtA - trtB", ["unclosed '('", "position 0"]),
        ("((trtA) - trtB", ["unclosed '('", "position 0"]),
        ("trtA - trtB)", ["unmatched ')'", "position 11"]),
        ("()", ["unexpected ')'", "position 1"]),
        ("trtA -", ["ends after '-'", "position 5"]),
        ("* trtA", ["unexpected '*'", "position 0"]),
        ("trtA * / trtB", ["unexpected '/'", "position 7"]),
        ("trtA trtB", ["unexpected coefficient 'trtB'", "position 5"]),
        ("2 3*trtA", ["unexpected number '3'", "position 2"]),
        ("(trtA trtB)", ["unexpected coefficient 'trtB'", "')'"]),
    ],
)
def test_syntax_errors(expression, fragments):
    _raises({"bad": expression}, TRT, "contrast 'bad'", *fragments)


@pytest.mark.parametrize(
    ("expression", "fragments"),
    [
        ("trtA*trtB", ["'*' at position 4", "linear"]),
        ("(trtA + 1)*(trtB - 1)", ["'*' at position 10", "linear"]),
        ("trtA/trtB", ["'/' at position 4", "divides by a term that contains coefficients"]),
        ("trtA/0", ["division by zero at position 4"]),
        ("trtA/(2 - 2)", ["division by zero"]),
        ("trtA + 1", ["constant term 1 ", "linear combination"]),
        ("trtA - trtA + 2.5", ["constant term 2.5 "]),
        ("3", ["constant term 3 "]),
        ("trtA - trtA", ["all weights are zero"]),
        ("0*trtB", ["all weights are zero"]),
        ("0", ["all weights are zero"]),
        ("1e999*trtA", ["number '1e999'", "too large"]),
        ("1e300*1e300*trtA", ["overflow"]),
    ],
)
def test_semantic_errors(expression, fragments):
    _raises({"bad": expression}, TRT, "contrast 'bad'", *fragments)


def test_first_bad_contrast_is_named():
    _raises({"ok": "trtA", "bad": "trtB +"}, TRT, "contrast 'bad'")


@pytest.mark.parametrize(
    ("contrast", "fragments"),
    [
        (5, ["got int"]),
        (None, ["got NoneType"]),
        (b"trtA", ["got bytes"]),
        (np.array(["trtA"]), ["got ndarray"]),
        (["trtA", 3], ["contrast number 2", "must be a string", "got int"]),
        ({"x": 1.5}, ["contrast number 1", "got float"]),
        ({1: "trtA"}, ["contrast names must be non-empty strings", "got 1"]),
        ({"": "trtA"}, ["contrast names must be non-empty strings"]),
        ([], ["no contrasts given"]),
        ({}, ["no contrasts given"]),
        (["trtA", "trtB", "trtA"], ["duplicate contrast name 'trtA'"]),
    ],
)
def test_bad_contrast_input(contrast, fragments):
    _raises(contrast, TRT, *fragments)


@pytest.mark.parametrize(
    ("names", "fragments"),
    [
        ("trtA", ["got str"]),
        (None, ["got NoneType"]),
        ([], ["non-empty strings"]),
        (["trtA", 2], ["non-empty strings", "got 2"]),
        (["trtA", ""], ["non-empty strings"]),
        (["trtA", "trtB", "trtA"], ["duplicate coefficient names: trtA"]),
    ],
)
def test_bad_names(names, fragments):
    _raises("trtA", names, *fragments)


def test_long_name_list_is_truncated_in_message():
    names = [f"x{k}" for k in range(100)]
    message = _raises("y", names, "unknown coefficient 'y'", "x0, x1", "...")
    assert "x99" not in message
