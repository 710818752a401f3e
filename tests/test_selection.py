"""Cell-selection expressions: parsed, never evaluated; pandas' meaning; clear errors."""

import numpy as np
import pandas as pd
import pytest

from flashmm_dask.design.selection import SelectionError, cell_mask, parse_cells


@pytest.fixture
def obs():
    return pd.DataFrame(
        {
            "cell_type": pd.Categorical(["T", "B", "doublet", "T", "Mono", "B"]),
            "n_genes": [250, 150, 300, 199, 200, 1000],
            "donor": ["D1", "D2", "D3", "D1", "D2", "D3"],
            "score": [0.5, np.nan, -1.5, 2.0, 1e3, 0.0],
            "is_doublet": [False, False, True, False, False, False],
            "odd name": [1, 2, 3, 4, 5, 6],
        }
    )


@pytest.mark.parametrize(
    ("text", "query"),
    [
        ("cell_type != 'doublet' and n_genes >= 200", None),
        ("donor in ['D1', 'D2']", None),
        ('donor not in ("D1",)', None),
        ("not (cell_type == 'T' or cell_type == 'B')", None),
        ("n_genes > 199 & ~(donor == 'D2') | score < 0", None),
        ("score >= -1.5", None),
        ("score != 0.5", None),
        ("200 <= n_genes", None),
        ("n_genes == 1e3", None),
        ("`odd name` > 3", None),
        ("not is_doublet", "~is_doublet"),
        ("is_doublet == True", None),
        ("cell_type in []", None),
        ('donor == "D\\"1" or donor == \'D1\'', None),
    ],
)
def test_matches_pandas_query(obs, text, query):
    expected = obs.eval(query or text).to_numpy(dtype=bool)
    got = parse_cells(text).mask(obs)
    np.testing.assert_array_equal(got, expected)


def test_missing_values_compare_as_pandas(obs):
    # NaN != x is True, every other comparison with NaN is False
    np.testing.assert_array_equal(parse_cells("score != 1").mask(obs), obs["score"].ne(1))
    assert not parse_cells("score < 1e9").mask(obs)[1]


def test_a_boolean_column_with_missing_values_is_a_condition(obs):
    """pandas' nullable booleans (a doublet call with NA): a missing value is not True, so
    the bare name selects as ``== True`` and ``not`` as ``!= True``."""
    obs = obs.assign(flag=pd.array([True, None, False, None, True, False], dtype="boolean"))
    for text, expected in (
        ("flag", [True, False, False, False, True, False]),
        ("not flag", [False, True, True, True, False, True]),
        ("flag and n_genes >= 200", [True, False, False, False, True, False]),
    ):
        np.testing.assert_array_equal(parse_cells(text).mask(obs), expected)
    np.testing.assert_array_equal(
        parse_cells("flag").mask(obs), parse_cells("flag == True").mask(obs)
    )
    np.testing.assert_array_equal(
        parse_cells("not flag").mask(obs), parse_cells("flag != True").mask(obs)
    )


def test_columns_listed_in_order():
    sel = parse_cells("(a > 1 and b == 'x') or a < 0 or `c d` in [1]")
    assert sel.columns == ("a", "b", "c d")


def test_unknown_columns_are_all_listed(obs):
    with pytest.raises(SelectionError, match=r"'celltype', 'ngenes'.*obs has cell_type"):
        parse_cells("celltype == 'T' and ngenes > 3").mask(obs)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("cell_type = 'T'", "compare with '=='"),
        ("cell_type == 'T", "unclosed string"),
        ("(n_genes > 3", "expected '\\)'"),
        ("n_genes > 3)", "unexpected '\\)'"),
        ("n_genes > ", "ends early"),
        ("1 < n_genes < 5", "chained comparison"),
        ("n_genes > 3 and", "ends early"),
        ("donor in 'D1'", "a list"),
        ("donor in [D1]", "a string, a number"),
        ("n_genes >> 3", "unexpected"),
        ("3 == 3", "two literals"),
        ("n_genes", "not boolean"),
        ("cell_type > 'T'", "does not apply"),
        ("12abc > 3", "unexpected"),
        ("`x > 1", "unclosed backtick"),
    ],
)
def test_invalid_expressions(obs, text, message):
    with pytest.raises(SelectionError, match=message):
        parse_cells(text).mask(obs)


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('touch /tmp/flashmm-pwned')",
        "n_genes.__class__.__bases__",
        "@n_genes > 3",
        "n_genes > 3; import os",
        "lambda: 1",
        "n_genes > 3 if True else False",
        "[c for c in n_genes]",
        "obs.drop(columns='donor')",
        "n_genes + 1 > 3",
        "exec('1')",
    ],
)
def test_injection_attempts_are_refused(obs, text, tmp_path):
    before = obs.copy()
    with pytest.raises(SelectionError):
        parse_cells(text).mask(obs)
    pd.testing.assert_frame_equal(obs, before)


def test_cell_mask_accepts_boolean_masks_and_none(obs):
    np.testing.assert_array_equal(cell_mask(obs, None), np.ones(6, bool))
    mask = np.array([1, 0, 1, 0, 1, 0], dtype=bool)
    np.testing.assert_array_equal(cell_mask(obs, mask), mask)
    np.testing.assert_array_equal(cell_mask(obs, pd.Series(mask)), mask)
    with pytest.raises(SelectionError, match="length 3"):
        cell_mask(obs, mask[:3])
    with pytest.raises(SelectionError, match="boolean mask"):
        cell_mask(obs, np.arange(6))
    with pytest.raises(SelectionError, match="selects none"):
        cell_mask(obs, "n_genes > 10000")
    with pytest.raises(SelectionError, match="string expression or a boolean mask"):
        parse_cells(3)  # type: ignore[arg-type]
