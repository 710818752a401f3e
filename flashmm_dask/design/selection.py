"""Cell selection: ``"cell_type != 'doublet' and n_genes >= 200"`` -> a boolean mask.

The ``cells=`` argument of :func:`flashmm_dask.flashmm` and the ``data.cells`` config key
take an expression over the columns of the cell metadata (obs), written as pandas users
write ``DataFrame.query`` strings. The string is tokenised and parsed by a small
recursive-descent parser into a tree that is then evaluated column by column; it is never
passed to ``eval``, ``DataFrame.query`` or ``DataFrame.eval``, so a string can only
compare columns with literals.

Grammar (keywords are case-sensitive; whitespace between tokens is ignored)::

    expr       := conj (("or" | "|") conj)*
    conj       := neg (("and" | "&") neg)*
    neg        := ("not" | "~") neg | comparison
    comparison := operand [OP operand | ["not"] "in" list]      OP: == != < <= > >=
    operand    := "(" expr ")" | NAME | "`" any text "`" | STRING | NUMBER | True | False
    list       := "[" [literal ("," literal)* [","]] "]"  (or the same in parentheses)
    literal    := STRING | NUMBER | True | False | "-" NUMBER
    STRING     := '...' or "..." (backslash escapes the quote and itself)
    NUMBER     := 12 | -3 | 1.5 | .5 | 2e-3

A NAME is a column of obs (letters, digits, ``_`` and ``.``, not starting with a digit;
backticks quote any other name). A bare name is a condition when its column is boolean
(``is_doublet``, ``not is_doublet``; a missing value there is not True, so ``is_doublet``
is ``is_doublet == True``). Comparisons follow pandas: a missing value compares
unequal to everything (so ``x != 'a'`` selects the cells where x is missing), and
``in`` is :meth:`pandas.Series.isin`. Unknown columns are listed, with the columns obs has.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from flashmm_dask.errors import InputError

__all__ = ["Cells", "SelectionError", "cell_mask", "parse_cells"]

#: A selection of cells: an expression (:func:`parse_cells`), a boolean mask, or None (all).
Cells = str | Sequence[bool] | np.ndarray | None

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_NUMBER = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_OPS = ("==", "!=", "<=", ">=", "<", ">")
_KEYWORDS = {"and", "or", "not", "in", "True", "False"}
# the longest expression accepted: a guard against pathological input, not a real limit
_MAX_LENGTH = 100_000
_MAX_DEPTH = 200


class SelectionError(InputError):
    """A cell-selection expression that does not parse or names an unknown column."""


@dataclass(frozen=True)
class _Tok:
    kind: str  # "name", "str", "num", "bool", "op", "kw", "punct", "end"
    value: Any
    pos: int


# -- the tree ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Column:
    name: str
    pos: int


@dataclass(frozen=True)
class _Literal:
    value: Any


@dataclass(frozen=True)
class _Compare:
    left: _Node
    op: str
    right: _Node
    pos: int


@dataclass(frozen=True)
class _In:
    column: _Column
    values: tuple[Any, ...]
    negate: bool


@dataclass(frozen=True)
class _Bool:
    op: str  # "and", "or", "not"
    args: tuple[_Node, ...]


_Node = _Column | _Literal | _Compare | _In | _Bool


@dataclass(frozen=True)
class CellSelection:
    """A parsed cell-selection expression.

    Attributes
    ----------
    text : the expression as written
    columns : the obs columns it reads, in order of appearance
    """

    text: str
    columns: tuple[str, ...]
    _tree: _Node

    def mask(self, obs: pd.DataFrame) -> np.ndarray:
        """The (n,) boolean mask of the cells of ``obs`` the expression selects.

        Raises
        ------
        SelectionError
            A column is not in obs (all unknown columns are listed), or a comparison
            does not apply to the column's values.
        """
        missing = [c for c in self.columns if c not in obs.columns]
        if missing:
            raise SelectionError(
                f"cell selection {self.text!r} names unknown obs column"
                f"{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}; obs has "
                f"{', '.join(map(str, obs.columns))}"
            )
        return _condition(_evaluate(self._tree, obs, self.text), self._tree, self.text)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = self._tokenize()
        self.i = 0
        self.columns: list[str] = []

    def error(self, message: str) -> SelectionError:
        return SelectionError(f"cell selection {self.text!r}: {message}")

    def _tokenize(self) -> list[_Tok]:
        text, i, out = self.text, 0, []
        while i < len(text):
            c = text[i]
            if c.isspace():
                i += 1
            elif c in "'\"":
                value, j = [], i + 1
                while j < len(text) and text[j] != c:
                    if text[j] == "\\" and j + 1 < len(text) and text[j + 1] in (c, "\\"):
                        j += 1
                    value.append(text[j])
                    j += 1
                if j >= len(text):
                    raise self.error(f"unclosed string starting at position {i}; add a closing {c}")
                out.append(_Tok("str", "".join(value), i))
                i = j + 1
            elif c == "`":
                end = text.find("`", i + 1)
                if end < 0:
                    raise self.error(f"unclosed backtick at position {i}; add a closing '`'")
                out.append(_Tok("name", text[i + 1 : end], i))
                i = end + 1
            elif (number := _NUMBER.match(text, i)) is not None:
                number_value = float(number.group())
                if not math.isfinite(number_value):
                    raise self.error(f"number {number.group()!r} at position {i} is too large")
                if _NAME.match(text, number.end()):
                    raise self.error(f"unexpected {text[i:].split()[0]!r} at position {i}")
                is_int = re.fullmatch(r"\d+", number.group()) is not None
                out.append(_Tok("num", int(number.group()) if is_int else number_value, i))
                i = number.end()
            elif (name := _NAME.match(text, i)) is not None:
                word = name.group()
                if word in ("True", "False"):
                    out.append(_Tok("bool", word == "True", i))
                elif word in _KEYWORDS:
                    out.append(_Tok("kw", word, i))
                else:
                    out.append(_Tok("name", word, i))
                i = name.end()
            elif (op := next((o for o in _OPS if text.startswith(o, i)), None)) is not None:
                out.append(_Tok("op", op, i))
                i += len(op)
            elif c in "()[],&|~-":
                out.append(_Tok("punct", c, i))
                i += 1
            elif c == "=":
                raise self.error(f"'=' at position {i} assigns; compare with '=='")
            else:
                raise self.error(
                    f"unexpected character {c!r} at position {i}; use comparisons (== != < <= > "
                    ">=), in, and, or, not, parentheses and quoted strings"
                )
        out.append(_Tok("end", None, len(text)))
        return out

    def peek(self) -> _Tok:
        return self.tokens[self.i]

    def take(self) -> _Tok:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def at(self, kind: str, *values: Any) -> bool:
        tok = self.peek()
        return tok.kind == kind and (not values or tok.value in values)

    def expect(self, kind: str, value: Any, what: str) -> None:
        if not self.at(kind, value):
            raise self.unexpected(what)
        self.take()

    def unexpected(self, wanted: str) -> SelectionError:
        tok = self.peek()
        if tok.kind == "end":
            return self.error(f"the expression ends early; expected {wanted}")
        shown = self.text[tok.pos :].split()[0] if self.text[tok.pos :].split() else tok.value
        return self.error(f"unexpected {shown!r} at position {tok.pos}; expected {wanted}")

    def parse(self) -> _Node:
        if not self.text.strip():
            raise self.error("it is empty; write a condition such as \"cell_type != 'doublet'\"")
        tree = self.expr(0)
        if not self.at("end"):
            raise self.unexpected("'and', 'or' or the end of the expression")
        return tree

    def expr(self, depth: int) -> _Node:
        if depth > _MAX_DEPTH:
            raise self.error(f"it nests deeper than {_MAX_DEPTH} levels")
        return self.joined("or", "|", self.conj, depth)

    def conj(self, depth: int) -> _Node:
        return self.joined("and", "&", self.neg, depth)

    def joined(self, op: str, symbol: str, operand: Callable[[int], _Node], depth: int) -> _Node:
        """``operand (op operand)*``: the one operand, or the ``op`` of them all."""
        args = [operand(depth)]
        while self.at("kw", op) or self.at("punct", symbol):
            self.take()
            args.append(operand(depth))
        return args[0] if len(args) == 1 else _Bool(op, tuple(args))

    def neg(self, depth: int) -> _Node:
        if self.at("kw", "not") or self.at("punct", "~"):
            self.take()
            return _Bool("not", (self.neg(depth + 1),))
        return self.comparison(depth)

    def comparison(self, depth: int) -> _Node:
        left = self.operand(depth)
        if self.at("op"):
            op = self.take().value
            pos = self.tokens[self.i - 1].pos
            right = self.operand(depth)
            if self.at("op"):
                raise self.error(
                    f"chained comparison at position {self.peek().pos}; join comparisons with 'and'"
                )
            return _Compare(left, op, right, pos)
        negate = False
        if (
            self.at("kw", "not")
            and self.tokens[self.i + 1].kind == "kw"
            and (self.tokens[self.i + 1].value == "in")
        ):
            self.take()
            negate = True
        if self.at("kw", "in"):
            self.take()
            if not isinstance(left, _Column):
                raise self.error("'in' needs an obs column on its left, e.g. donor in ['D1', 'D2']")
            return _In(left, self.values(), negate)
        return left

    def operand(self, depth: int) -> _Node:
        tok = self.peek()
        if self.at("punct", "("):
            self.take()
            inner = self.expr(depth + 1)
            self.expect("punct", ")", "')'")
            return inner
        if tok.kind == "name":
            self.take()
            if tok.value not in self.columns:
                self.columns.append(tok.value)
            return _Column(tok.value, tok.pos)
        return _Literal(self.literal("an obs column, a string, a number or '('"))

    def literal(self, wanted: str) -> Any:
        sign = 1
        if self.at("punct", "-"):
            self.take()
            sign = -1
            if not self.at("num"):
                raise self.unexpected("a number after '-'")
        tok = self.peek()
        if (tok.kind in ("str", "bool") and sign == 1) or tok.kind == "num":
            self.take()
            return sign * tok.value if tok.kind == "num" else tok.value
        raise self.unexpected(wanted)

    def values(self) -> tuple[Any, ...]:
        if not (self.at("punct", "[") or self.at("punct", "(")):
            raise self.unexpected("a list such as ['D1', 'D2']")
        close = "]" if self.take().value == "[" else ")"
        out: list[Any] = []
        while not self.at("punct", close):
            out.append(self.literal("a string, a number or the end of the list"))
            if self.at("punct", ","):
                self.take()
            elif not self.at("punct", close):
                raise self.unexpected(f"',' or '{close}'")
        self.take()
        return tuple(out)


def parse_cells(text: str) -> CellSelection:
    """Parse a cell-selection expression (see the module docstring).

    Raises
    ------
    SelectionError
        The string does not parse; the message gives the position.
    """
    if not isinstance(text, str):
        raise SelectionError(
            f"a cell selection must be a string expression or a boolean mask, got "
            f"{type(text).__name__}"
        )
    if len(text) > _MAX_LENGTH:
        raise SelectionError(f"the cell selection is {len(text)} characters long; shorten it")
    parser = _Parser(text)
    tree = parser.parse()
    return CellSelection(text, tuple(parser.columns), tree)


# -- evaluation -------------------------------------------------------------------------


def _evaluate(node: _Node, obs: pd.DataFrame, text: str) -> Any:
    if isinstance(node, _Literal):
        return node.value
    if isinstance(node, _Column):
        return obs[node.name]
    if isinstance(node, _Bool):
        parts = [_condition(_evaluate(a, obs, text), a, text) for a in node.args]
        if node.op == "not":
            return ~parts[0]
        out = parts[0]
        for part in parts[1:]:
            out = out & part if node.op == "and" else out | part
        return out
    if isinstance(node, _In):
        return obs[node.column.name].isin(list(node.values)).to_numpy(dtype=bool) ^ node.negate
    assert isinstance(node, _Compare)
    left, right = _evaluate(node.left, obs, text), _evaluate(node.right, obs, text)
    if not isinstance(left, pd.Series) and not isinstance(right, pd.Series):
        raise SelectionError(
            f"cell selection {text!r}: the comparison at position {node.pos} compares two "
            "literals; compare an obs column"
        )
    try:
        result = _COMPARE[node.op](left, right)
    except TypeError as exc:
        raise SelectionError(
            f"cell selection {text!r}: the comparison at position {node.pos} does not apply "
            f"to the values ({exc}); compare numeric columns with numbers and text columns "
            "with quoted strings"
        ) from None
    values = np.asarray(result)
    if isinstance(result, pd.Series) and values.dtype != bool:
        values = result.fillna(node.op == "!=").to_numpy(dtype=bool)
    return values


def _condition(value: Any, node: _Node, text: str) -> np.ndarray:
    """A sub-expression as a boolean array: a comparison, or a boolean column."""
    if isinstance(value, pd.Series):
        if pd.api.types.is_bool_dtype(value.dtype):
            # a missing value (pandas' "boolean" dtype) is not True: ``flag`` is ``flag ==
            # True``, and ``not flag`` is ``flag != True``, as the comparisons treat it
            return value.fillna(False).to_numpy(dtype=bool)
        name = node.name if isinstance(node, _Column) else "?"
        raise SelectionError(
            f"cell selection {text!r}: column {name!r} is not boolean ({value.dtype}); "
            "compare it, e.g. " + f"{name} == 'value'"
        )
    if isinstance(value, np.ndarray) and value.dtype == bool:
        return value
    raise SelectionError(
        f"cell selection {text!r}: {value!r} is not a condition; write a comparison"
    )


def _eq(a: Any, b: Any) -> Any:
    return a == b


def _ne(a: Any, b: Any) -> Any:
    return a != b


_COMPARE = {
    "==": _eq,
    "!=": _ne,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def cell_mask(obs: pd.DataFrame, cells: Cells) -> np.ndarray:
    """The (n,) boolean mask of the selected cells of ``obs``.

    Parameters
    ----------
    obs : DataFrame, one row per cell
    cells : str, boolean array-like of length n, or None
        An expression (:func:`parse_cells`), a mask, or None for every cell.

    Raises
    ------
    SelectionError
        An invalid expression, a mask of another length or type, or no cell selected.
    """
    n = len(obs)
    if cells is None:
        return np.ones(n, dtype=bool)
    if isinstance(cells, str):
        mask = parse_cells(cells).mask(obs)
        shown = repr(cells)
    else:
        values = np.asarray(cells)
        if values.dtype != bool or values.ndim != 1:
            raise SelectionError(
                "cells must be an expression string or a 1-dimensional boolean mask, got "
                f"an array of dtype {values.dtype} and shape {values.shape}"
            )
        if values.shape[0] != n:
            raise SelectionError(f"the cell mask has length {values.shape[0]}; obs has {n} cells")
        mask, shown = values.copy(), "the cell mask"
    if not mask.any():
        raise SelectionError(f"{shown} selects none of the {n} cells; check the expression")
    return mask


def describe(cells: Cells) -> str | None:
    """A JSON-able description of a selection for provenance (the expression, or a count)."""
    if cells is None or isinstance(cells, str):
        return cells
    return f"<mask of {int(np.count_nonzero(cells))} cells>"
