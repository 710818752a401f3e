"""R's model.matrix coding of one formula, on top of formulaic.

formulaic builds every term with one indicator column per factor level; this module picks
the columns R would keep and names them R's way, so that coefficient names and contrasts
written for the R package work unchanged:

- terms are sorted by degree, keeping the written order within a degree;
- variables inside a term go in order of first appearance, the first varying fastest;
- a factor gets treatment contrasts if the term without it is empty or contained in an
  earlier term, otherwise one column per level (R's ``TermCode`` rule);
- without an intercept, the first factor of the first term that has one gets a column
  per level;
- names: "cls1", "cls2:trtB", "(Intercept)", "log(libsize)", "samA1:time".

:func:`build_block` returns a :class:`TermBlock`: the formulaic ModelSpec (learned from the
first cell of each level where that is what every cell would teach) plus the kept columns
and their R names, evaluated on any row subset of the cell metadata.
"""

from __future__ import annotations

import ast
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse

from flashmm_dask.errors import DesignError

if TYPE_CHECKING:  # formulaic is imported where it is used (its import is slow)
    from formulaic import ModelMatrix, ModelSpec
    from formulaic.formula import SimpleFormula

_ANSI = re.compile(r"\x1b\[[0-9;]*m|⧛|⧚")
INTERCEPT = "(Intercept)"


@dataclass(frozen=True, eq=False)
class TermBlock:
    """One formula, evaluated by formulaic with full indicator coding.

    Attributes
    ----------
    formula : str
        The formula as given.
    spec : formulaic.ModelSpec
        The learned structure (levels, transforms, full indicator columns).
    keep : ndarray of int64, shape (ncol,)
        Positions, among formulaic's columns, of the columns R keeps, in R's order.
    names : tuple of str, length ncol
        R's names of the kept columns.
    levels : dict of str to list
        The levels of each factor of the formula.
    """

    formula: str
    spec: ModelSpec
    keep: np.ndarray
    names: tuple[str, ...]
    levels: dict[str, list[Any]]

    def dense(self, frame: pd.DataFrame) -> np.ndarray:
        """Evaluate the block on ``frame`` as a dense (rows, ncol) float64 array."""
        if len(frame) == 0:  # formulaic cannot evaluate no rows
            return np.zeros((0, len(self.keep)), dtype=np.float64)
        mm = self._evaluate(frame, "numpy")
        return np.ascontiguousarray(np.asarray(mm)[:, self.keep], dtype=np.float64)

    def sparse(self, frame: pd.DataFrame) -> scipy.sparse.csc_matrix:
        """Evaluate the block on ``frame`` as a sparse (rows, ncol) float64 matrix."""
        if len(frame) == 0:
            return scipy.sparse.csc_matrix((0, len(self.keep)), dtype=np.float64)
        mm = self._evaluate(frame, "sparse")
        return scipy.sparse.csc_matrix(mm.__wrapped__, dtype=np.float64)[:, self.keep]

    def check(self, frame: pd.DataFrame, role: str) -> None:
        """Evaluate the block on ``frame`` (cells of the obs it is built from) for formulaic's
        errors, raised as :func:`build_block` raises them."""
        self._evaluate(frame, str(self.spec.output), role)

    def _evaluate(self, frame: pd.DataFrame, output: str, role: str | None = None) -> ModelMatrix:
        try:
            mm = self.spec.get_model_matrix(frame, context={}, output=output)
        except Exception as exc:  # formulaic raises several unrelated classes
            if role is not None:
                raise _unevaluable(role, self.formula, exc) from exc
            raise DesignError(
                f"formula '{self.formula}' could not be evaluated on a chunk of obs: {_clean(exc)}"
            ) from exc
        if mm.shape[0] != len(frame):
            raise DesignError(
                f"formula '{self.formula}' gave {mm.shape[0]} rows for {len(frame)} cells; "
                "check obs for missing values"
            )
        return mm


def _unevaluable(role: str, formula: str, exc: BaseException) -> DesignError:
    return DesignError(f"the {role} '{formula}' could not be evaluated on obs: {_clean(exc)}")


def _clean(exc: BaseException) -> str:
    """formulaic's message on one line, without its terminal colour codes."""
    text = _ANSI.sub("", str(exc))
    return " ".join(text.split())


def parse_formula(formula: str, role: str) -> SimpleFormula:
    """Parse one formula with formulaic, keeping the written term order.

    Parameters
    ----------
    formula : str
        A one-sided formula such as ``"~ 0 + sam"``.
    role : str
        Where the formula came from ("fixed formula", "random formula 'sam'"), for messages.

    Returns
    -------
    formulaic.formula.SimpleFormula
        A simple (unstructured) formula with its terms in written order.
    """
    from formulaic import Formula

    if not isinstance(formula, str):
        raise DesignError(f"the {role} must be a string such as '~ 0 + sam', got {formula!r}")
    if "|" in formula:
        raise DesignError(
            f"the {role} '{formula}' contains '|'; lme4-style terms such as '(1 | sam)' are "
            "not supported: write the random effect as its own formula, e.g. random='~ 0 + sam'"
        )
    try:
        parsed = Formula(formula, _ordering="none")
    except Exception as exc:
        raise DesignError(
            f"the {role} '{formula}' could not be parsed: {_clean(exc)}; "
            "write it as in R, e.g. '~ 0 + log(libsize) + cls + cls:trt'"
        ) from exc
    if type(parsed).__name__ != "SimpleFormula":
        raise DesignError(
            f"the {role} '{formula}' must be one-sided ('~ 0 + cls'); remove the response "
            "on the left of '~'"
        )
    return parsed


def required_columns(parsed: SimpleFormula) -> set[str]:
    """Names a parsed formula needs from obs (transform functions such as log excluded).

    formulaic 1.2 reports no variable for a factor with a stateful transform
    (``center(age)``: it evaluates the transform's variable hook without the data and
    drops the factor's variables on the error), so the names of each factor's expression
    are added here.
    """
    from formulaic.transforms import TRANSFORMS

    names = {str(v) for v in parsed.required_variables}
    values: set[str] = set()
    for term in parsed:
        for factor in term.factors:
            values |= _expression_names(str(factor.expr))
    # a transform's name read as a value is a column (an obs column 'bs' or 'Treatment')
    return (names | values) - (set(TRANSFORMS) - values)


def _expression_names(expr: str) -> set[str]:
    """The names an expression reads as values (not those it calls, nor modules whose
    attributes it reads), e.g. {"age"} of ``I(center(age) ** 2)`` and of
    ``np.log1p(age)``; none when it is not Python (formulaic's backtick names)."""
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        return set()
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    # np of np.log1p(x): a module whose attribute is read, not a value
    called |= {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    return {
        node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and id(node) not in called
    }


def _r_codes(
    terms: Sequence[frozenset[str]],
    var_order: Mapping[str, int],
    n_levels: Mapping[str, int],
    intercept: bool,
) -> list[dict[str, int]]:
    """R's coding of each variable in each term: 1 = treatment contrasts, 2 = indicators.

    Parameters
    ----------
    terms : sequence of frozenset of str
        The variables of each term, terms in R's order (by degree).
    var_order : mapping of str to int
        Position of each variable in order of first appearance in the formula.
    n_levels : mapping of str to int
        Number of levels of each factor; numeric variables are absent.
    intercept : bool
        Whether the formula has an intercept.

    Returns
    -------
    list of dict
        For each term, variable -> code, as R's ``terms.formula`` (``TermCode``) and
        ``model.matrix`` compute it.
    """
    codes = []
    for i, term in enumerate(terms):
        code = {}
        for v in term:
            rest = term - {v}
            in_margin = not rest or any(rest <= earlier for earlier in terms[:i])
            code[v] = 1 if in_margin else 2
        codes.append(code)
    if not intercept:
        # The first factor (with 2+ levels) of the first term that has one: indicators.
        for code in codes:
            factors = [v for v in sorted(code, key=var_order.__getitem__) if n_levels.get(v, 0) > 1]
            if factors:
                code[factors[0]] = 2
                break
    return codes


@dataclass(frozen=True)
class RTerm:
    """One term of a formula as R codes it.

    Attributes
    ----------
    variables : tuple of str
        The term's variables in R's order (first appearance in the formula); the first
        varies fastest over the term's columns.
    drop_first : tuple of bool
        Per variable: True for treatment contrasts (first level dropped), False for one
        indicator per level; False for numeric variables.
    formulaic_order : tuple of str
        The same variables in formulaic's order (which names formulaic's columns).
    """

    variables: tuple[str, ...]
    drop_first: tuple[bool, ...]
    formulaic_order: tuple[str, ...]


def r_terms(parsed: SimpleFormula, levels: Mapping[str, Sequence[Any]]) -> tuple[bool, list[RTerm]]:
    """Whether a formula has an intercept, and its other terms in R's order, R-coded.

    Parameters
    ----------
    parsed : formulaic.formula.SimpleFormula
        The formula with terms in written order.
    levels : mapping of str to sequence
        The levels of each factor (formulaic's learned categories); numeric variables
        are absent.

    Returns
    -------
    (bool, list of RTerm)
    """
    written = list(parsed)
    intercept = any(t.degree == 0 for t in written)
    terms = sorted((t for t in written if t.degree > 0), key=lambda t: t.degree)
    var_order: dict[str, int] = {}
    for term in written:
        for factor in term.factors:
            var_order.setdefault(factor.expr, len(var_order))
    codes = _r_codes(
        [frozenset(f.expr for f in t.factors) for t in terms],
        var_order,
        {v: len(lv) for v, lv in levels.items()},
        intercept,
    )
    out = []
    for term, code in zip(terms, codes, strict=True):
        f_order = tuple(f.expr for f in term.factors)
        r_order = tuple(sorted(f_order, key=var_order.__getitem__))
        drop = tuple(v in levels and code[v] == 1 for v in r_order)
        out.append(RTerm(r_order, drop, f_order))
    return intercept, out


def _r_columns(parsed: SimpleFormula, levels: Mapping[str, Sequence[Any]]) -> list[tuple[str, str]]:
    """R's columns of a formula, with the names formulaic gives them under full coding.

    Parameters
    ----------
    parsed, levels
        As for :func:`r_terms`.

    Returns
    -------
    list of (R name, formulaic name)
        One entry per R column, in R's order.
    """
    intercept, terms = r_terms(parsed, levels)
    columns = [(INTERCEPT, "Intercept")] if intercept else []
    for term in terms:
        options: list[list[tuple[str, str | None]]] = []
        for v, drop_first in zip(term.variables, term.drop_first, strict=True):
            if v not in levels:
                options.append([(v, None)])
            else:
                options.append([(v, str(lv)) for lv in levels[v][int(drop_first) :]])
        # R varies the first variable fastest: product over the reversed list, reversed.
        for combo in itertools.product(*reversed(options)):
            level_of = dict(combo)
            r_name = ":".join(f"{v}{level_of[v]}" if v in levels else v for v in term.variables)
            f_name = ":".join(
                f"{v}[{level_of[v]}]" if v in levels else v for v in term.formulaic_order
            )
            columns.append((r_name, f_name))
    return columns


def component_name(parsed: SimpleFormula) -> str:
    """A random component's default name: its formula's terms ("sam", "sam:time"), or
    "(Intercept)" for ``~ 1``."""
    terms = [str(t) for t in parsed if t.degree > 0]
    return " + ".join(terms) if terms else INTERCEPT


def _factor_levels(spec: ModelSpec) -> dict[str, list[Any]]:
    """Levels of each categorical factor of a formulaic ModelSpec, in formulaic's order."""
    return {
        expr: list(state["categories"])
        for expr, (kind, state) in spec.encoder_state.items()
        if getattr(kind, "value", None) == "categorical"
    }


def _model_spec(
    formula: str, parsed: SimpleFormula | str, frame: pd.DataFrame, role: str, output: str
) -> ModelSpec:
    """formulaic's ModelSpec of ``parsed`` learned from ``frame``, R-style (no rank
    reduction, missing values refused)."""
    from formulaic import model_matrix

    try:
        mm = model_matrix(
            parsed, frame, ensure_full_rank=False, na_action="raise", output=output, context={}
        )
    except Exception as exc:
        raise _unevaluable(role, formula, exc) from exc
    return mm.model_spec


def build_block(
    formula: str,
    parsed: SimpleFormula,
    frame: pd.DataFrame,
    role: str,
    *,
    dense: bool,
    rows: np.ndarray | None = None,
) -> TermBlock:
    """Learn the structure of one formula from the cells of ``frame`` (prepared obs).

    Parameters
    ----------
    formula : str
        The formula as given, for messages.
    parsed : formulaic.formula.SimpleFormula
        The parsed formula.
    frame : pandas.DataFrame
        All cells' metadata, prepared by :func:`_prepare`.
    role : str
        Where the formula came from, for messages.
    dense : bool
        Whether the block is evaluated dense (X) or sparse (Z).
    rows : ndarray of int, optional
        The cells to learn from, default all: they must hold the first cell of each value
        of every non-numeric column of ``frame``.

    Notes
    -----
    What formulaic learns from the data is, per factor, its levels (a categorical column's
    categories, or an object column's sorted distinct values) and, per stateful transform
    (``center(x)``, ``scale(x)``, ...), a state computed over every cell. The levels learned
    from ``rows`` are those of all cells, so the design costs O(len(rows)) rather than a
    dense matrix of every cell. Stateful transforms are learned again from the formula's
    numeric factors alone on every cell (n x their number). Whatever else depends on the
    data (levels of an expression such as ``C(x)``, a formula that fails on ``rows`` alone,
    state the numeric factors do not reproduce) is learned from every cell.
    """
    output = "numpy" if dense else "sparse"
    spec = None
    if rows is not None:
        try:
            spec = _model_spec(formula, parsed, frame.iloc[rows], role, output)
        except DesignError:  # e.g. scale(x) of one cell, log(-1): decided on every cell
            spec = None
    if spec is not None and not _learned_as_from_all(spec, frame):
        spec = None
    elif spec is not None and spec.transform_state:
        numeric = [e for e, (kind, _) in spec.encoder_state.items() if kind.value == "numerical"]
        try:
            state = _model_spec(formula, "~ 0 + " + " + ".join(numeric), frame, role, "numpy")
        except DesignError:  # e.g. an expression that does not parse alone: every cell
            spec = None
        else:
            same = set(state.transform_state) == set(spec.transform_state)
            spec = spec.update(transform_state=state.transform_state) if same else None
    if spec is None:
        spec = _model_spec(formula, parsed, frame, role, output)
    return _kept_columns(formula, parsed, spec, role)


def _learned_as_from_all(spec: ModelSpec, frame: pd.DataFrame) -> bool:
    """Whether ``spec``, learned from the first cell of each value of each non-numeric
    column of ``frame``, is what all of ``frame`` gives, but for stateful transforms: each
    factor is such a column or a numeric expression, and some factor is numeric where a
    transform has state."""
    covered = {str(c) for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])}
    numeric = False
    for expr, (kind, state) in spec.encoder_state.items():
        if getattr(kind, "value", None) == "numerical" and not state:
            numeric = True
        elif getattr(kind, "value", None) != "categorical" or expr not in covered:
            return False
    return numeric or not spec.transform_state


def _kept_columns(formula: str, parsed: SimpleFormula, spec: ModelSpec, role: str) -> TermBlock:
    """The TermBlock of a learned spec: the columns R keeps, named as R names them."""
    levels = _factor_levels(spec)
    position = {name: i for i, name in enumerate(spec.column_names)}
    keep: list[int] = []
    names: list[str] = []
    for r_name, f_name in _r_columns(parsed, levels):
        if f_name not in position:
            raise DesignError(
                f"the {role} '{formula}' has a term that flashmm_dask cannot name as R does "
                f"(column {r_name!r}); use plain variables, functions of one numeric "
                "variable such as log(x), and their interactions"
            )
        keep.append(position[f_name])
        names.append(r_name)
    return TermBlock(formula, spec, np.asarray(keep, dtype=np.int64), tuple(names), levels)
