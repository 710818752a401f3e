"""Integer grouping columns of random formulas read as factors, as lme4 reads ``(1|donor)``.

A random-effect grouping is a factor: lme4 fits ``(1 | donor)`` with integer donor ids as
one random intercept per donor. formulaic (like R's ``model.matrix``) takes an integer
column for a number, so ``random: "~ 0 + donor"`` with integer ids would give one column
(and be refused as "a single level"). :func:`factor_groupings` converts such columns of
the cell metadata to factors before the design is built, and logs which ones.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from flashmm_dask.design.terms import parse_formula, required_columns

logger = logging.getLogger(__name__)

__all__ = ["factor_groupings", "grouping_columns"]


def _formulas(random: str | Sequence[str] | Mapping[str, str]) -> list[str]:
    if isinstance(random, str):
        return [random]
    if isinstance(random, Mapping):
        return [str(f) for f in random.values()]
    return [str(f) for f in random]


def _is_factor(series: pd.Series) -> bool:
    return not pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)


def grouping_columns(
    obs: pd.DataFrame, fixed: str, random: str | Sequence[str] | Mapping[str, str]
) -> list[str]:
    """The integer columns of ``obs`` that the random formulas use as groupings.

    A column is a grouping when it appears as a plain variable in a random-formula term
    that holds no other factor (``donor`` in ``~ 0 + donor``; not ``time`` in
    ``~ 0 + sam:time``, a random slope within the factor ``sam``), has an integer dtype
    and is not used by the fixed formula (where it keeps its numeric meaning).
    """
    try:
        in_fixed = required_columns(parse_formula(fixed, "fixed formula"))
        parsed = [parse_formula(f, "random formula") for f in _formulas(random)]
    except Exception:
        return []  # build_design reports the formula's problem
    found: list[str] = []
    for formula in parsed:
        for term in formula:
            names = [str(f.expr) for f in term.factors]
            if not all(n in obs.columns for n in names):
                continue  # a transform such as log(x): numeric by intent
            if any(_is_factor(obs[n]) for n in names):
                continue
            for n in names:
                if pd.api.types.is_integer_dtype(obs[n]) and n not in in_fixed:
                    found.append(n)
    return list(dict.fromkeys(found))


def factor_groupings(
    obs: pd.DataFrame, fixed: str, random: str | Sequence[str] | Mapping[str, str]
) -> tuple[pd.DataFrame, list[str]]:
    """``obs`` with its integer grouping columns (:func:`grouping_columns`) as factors.

    The levels are the ids as strings in numeric order ("1", "2", ..., "10"), as R's
    ``factor`` orders integers; a log line names the converted columns.

    Returns
    -------
    (pandas.DataFrame, list of str)
        The metadata (the same object when nothing changed) and the converted columns.
    """
    columns = grouping_columns(obs, fixed, random)
    if not columns:
        return obs, []
    out = obs.copy()
    for name in columns:
        values: Any = out[name]
        levels = [str(v) for v in sorted(pd.unique(values.dropna()))]
        out[name] = pd.Categorical(values.astype("string").astype(object), categories=levels)
    logger.info(
        "random-effect grouping column%s %s hold%s integers: read as factor%s (one level per "
        "id, as lme4 reads (1 | %s))",
        "s" if len(columns) > 1 else "",
        ", ".join(repr(c) for c in columns),
        "" if len(columns) > 1 else "s",
        "s" if len(columns) > 1 else "",
        columns[0],
    )
    return out, columns
