"""Contrast strings such as ``"cls3:trtB - cls2:trtB"`` -> a contrast matrix L.

The equivalent of R FLASHMM's ``contrast.matrix(contrast, model.matrix.names)``. Each
contrast is an arithmetic expression over the coefficient names; it must be linear in the
coefficients, and becomes one column of the p x c matrix L (rows: coefficients; columns:
contrasts) whose effect lmmtest estimates as L' b.

Grammar (whitespace between tokens is ignored)::

    expr    := term (("+" | "-") term)*
    term    := unary (("*" | "/") unary)*
    unary   := ("+" | "-") unary | primary
    primary := NUMBER | NAME | "`" any text "`" | "(" expr ")"
    NUMBER  := 12 | 1.5 | .5 | 2e-3 | 1.5E+2

A NAME is the longest coefficient name that starts at the current position, so
``log(libsize)`` and ``cls1:trtB`` are single names while ``(B+C)`` is a parenthesised
group. A name that contains spaces or operators can be quoted with backticks. The string
is parsed by a small recursive-descent parser; it is never evaluated as Python.

Each sub-expression evaluates to a weight vector over the names plus a constant. A
product is allowed when at most one factor contains names; a divisor must be a non-zero
number. The result must have a zero constant term and at least one non-zero weight.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from flashmm_dask.errors import ContrastError

__all__ = ["contrast_matrix"]

_NUMBER = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
# what an unknown coefficient name looks like, for messages: "cls4:trtB", "__import__"
_WORD = re.compile(r"[A-Za-z0-9_.:]*[A-Za-z0-9_.]")


@dataclass(frozen=True)
class _Token:
    kind: str  # "num", "name", "end" or the operator itself: + - * / ( )
    text: str  # the source text, for messages
    pos: int  # 0-based offset in the expression
    value: float = 0.0  # the number, or the index of the name


@dataclass(frozen=True)
class _Linear:
    """The value of a sub-expression: sum_k w[k] * names[k] + const."""

    w: tuple[float, ...]
    const: float

    @property
    def has_names(self) -> bool:  # a weight that cancelled to 0 does not count
        return any(x != 0.0 for x in self.w)

    def scale(self, s: float) -> _Linear:
        return _Linear(tuple(x * s for x in self.w), self.const * s)

    def add(self, other: _Linear, sign: float) -> _Linear:
        w = tuple(a + sign * b for a, b in zip(self.w, other.w, strict=True))
        return _Linear(w, self.const + sign * other.const)


class _Parser:
    """Tokenise and parse one contrast expression over fixed coefficient names."""

    def __init__(self, label: str, text: str, names: list[str]) -> None:
        self.label, self.text, self.names = label, text, names
        self.index = {name: k for k, name in enumerate(names)}
        # longest first, so that "AB" wins over "A" and "log(libsize)" over "("
        self.by_length = sorted(names, key=len, reverse=True)
        self.tokens = self._tokenize()
        self.i = 0

    def error(self, message: str) -> ContrastError:
        return ContrastError(f"contrast {self.label!r}: {message}")

    def unknown(self, word: str, pos: int) -> ContrastError:
        listed = ", ".join(self.names[:30]) + (", ..." if len(self.names) > 30 else "")
        return self.error(f"unknown coefficient {word!r} at position {pos}; valid names: {listed}")

    def _tokenize(self) -> list[_Token]:
        text, i, tokens = self.text, 0, []
        while i < len(text):
            if text[i].isspace():
                i += 1
            elif text[i] == "`":
                end = text.find("`", i + 1)
                if end < 0:
                    raise self.error(f"unclosed backtick at position {i}; add a closing '`'")
                if text[i + 1 : end] not in self.index:
                    raise self.unknown(text[i + 1 : end], i)
                tokens.append(_Token("name", text[i : end + 1], i, self.index[text[i + 1 : end]]))
                i = end + 1
            elif name := next((n for n in self.by_length if text.startswith(n, i)), None):
                end = i + len(name)
                tail = _WORD.match(text, end)
                if tail and _WORD.fullmatch(name[-1]):  # "cls10" is not "cls1" then "0"
                    raise self.unknown(text[i : tail.end()], i)
                tokens.append(_Token("name", name, i, self.index[name]))
                i = end
            elif number := _NUMBER.match(text, i):
                if not math.isfinite(value := float(number.group())):
                    raise self.error(f"number {number.group()!r} at position {i} is too large")
                tokens.append(_Token("num", number.group(), i, value))
                i = number.end()
            elif text[i] in "+-*/()":
                tokens.append(_Token(text[i], text[i], i))
                i += 1
            elif word := _WORD.match(text, i):
                raise self.unknown(word.group(), i)
            else:
                raise self.error(
                    f"unexpected character {text[i]!r} at position {i}; allowed are "
                    "coefficient names, numbers, + - * / and parentheses"
                )
        tokens.append(_Token("end", "", len(text)))
        return tokens

    def take(self) -> _Token:
        self.i += 1
        return self.tokens[self.i - 1]

    def unexpected(self, token: _Token, expected: str) -> ContrastError:
        if token.kind == "end":
            last = self.tokens[-2]
            return self.error(
                f"the expression ends after {last.text!r} at position {last.pos}; "
                f"expected {expected}"
            )
        what = {"name": "coefficient ", "num": "number "}.get(token.kind, "")
        return self.error(
            f"unexpected {what}{token.text!r} at position {token.pos}; expected {expected}"
        )

    def parse(self) -> list[float]:
        """The weights over ``names``, after checking that they form a contrast."""
        if self.tokens[0].kind == "end":
            raise self.error("the expression is empty; write e.g. 'trtB - trtA'")
        value = self.expr()
        token = self.tokens[self.i]
        if token.kind == ")":
            raise self.error(f"unmatched ')' at position {token.pos}; remove it or add a '('")
        if token.kind != "end":
            raise self.unexpected(token, "an operator (+ - * /)")
        if not all(math.isfinite(x) for x in (value.const, *value.w)):
            raise self.error("the weights overflow to infinity or NaN; use smaller numbers")
        if value.const != 0.0:
            raise self.error(
                f"constant term {value.const:g} is not allowed; a contrast must be a linear "
                "combination of coefficients"
            )
        if not value.has_names:
            raise self.error("all weights are zero (the terms cancel); weight some coefficient")
        return [x + 0.0 for x in value.w]  # + 0.0 turns -0.0 into 0.0

    def expr(self) -> _Linear:
        value = self.term()
        while self.tokens[self.i].kind in ("+", "-"):
            sign = 1.0 if self.take().kind == "+" else -1.0
            value = value.add(self.term(), sign)
        return value

    def term(self) -> _Linear:
        value = self.unary()
        while self.tokens[self.i].kind in ("*", "/"):
            op = self.take()
            right = self.unary()
            if op.kind == "*" and value.has_names and right.has_names:
                raise self.error(
                    f"'*' at position {op.pos} multiplies two terms that both contain "
                    "coefficients; a contrast must be linear in the coefficients"
                )
            if op.kind == "*":
                value = right.scale(value.const) if right.has_names else value.scale(right.const)
            elif right.has_names:
                raise self.error(
                    f"'/' at position {op.pos} divides by a term that contains coefficients; "
                    "a contrast must be linear in the coefficients"
                )
            elif right.const == 0.0:
                raise self.error(f"division by zero at position {op.pos}")
            else:
                value = value.scale(1.0 / right.const)
        return value

    def unary(self) -> _Linear:
        if self.tokens[self.i].kind in ("+", "-"):
            sign = 1.0 if self.take().kind == "+" else -1.0
            return self.unary().scale(sign)
        return self.primary()

    def primary(self) -> _Linear:
        token = self.take()
        if token.kind == "num":
            return _Linear((0.0,) * len(self.names), token.value)
        if token.kind == "name":
            return _Linear(tuple(float(k == token.value) for k in range(len(self.names))), 0.0)
        if token.kind == "(":
            value = self.expr()
            close = self.take()
            if close.kind == "end":
                raise self.error(f"unclosed '(' at position {token.pos}; add a ')'")
            if close.kind != ")":
                raise self.unexpected(close, "an operator (+ - * /) or ')'")
            return value
        raise self.unexpected(token, "a coefficient name, a number or '('")


def _contrast_items(contrast: object) -> list[tuple[str, str]]:
    """Normalise the accepted forms of ``contrast`` to (name, expression) pairs."""
    if isinstance(contrast, str):
        items: list[tuple[object, object]] = [(contrast, contrast)]
    elif isinstance(contrast, Mapping):
        items = list(contrast.items())
        for name, _ in items:
            if not isinstance(name, str) or not name:
                raise ContrastError(f"contrast names must be non-empty strings; got {name!r}")
    elif isinstance(contrast, Sequence) and not isinstance(contrast, bytes | bytearray):
        items = [(c, c) for c in contrast]
    else:
        raise ContrastError(
            "contrast must be a string, a mapping {name: expression} or a sequence of "
            f"strings; got {type(contrast).__name__}"
        )
    if not items:
        raise ContrastError("no contrasts given; pass e.g. {'B-A': 'trtB - trtA'}")
    seen: dict[str, str] = {}
    for k, (name, expression) in enumerate(items):
        if not isinstance(expression, str):
            raise ContrastError(
                f"contrast number {k + 1}: the expression must be a string; "
                f"got {type(expression).__name__} {expression!r}"
            )
        if name in seen:
            raise ContrastError(f"duplicate contrast name {name!r}; give each a unique name")
        seen[str(name)] = expression
    return list(seen.items())


def _check_names(names: object) -> list[str]:
    if isinstance(names, str | bytes | Mapping) or not isinstance(names, Iterable):
        raise ContrastError(
            f"names must be a sequence of coefficient names; got {type(names).__name__}"
        )
    names = list(names)
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad or not names:
        raise ContrastError(
            f"coefficient names must be non-empty strings; got {bad[0] if bad else names!r}"
        )
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ContrastError(f"duplicate coefficient names: {', '.join(dupes)}")
    return names


def contrast_matrix(
    contrast: str | Mapping[str, str] | Sequence[str], names: Sequence[str]
) -> pd.DataFrame:
    """Build the contrast matrix L from contrast expressions over coefficient names.

    Parameters
    ----------
    contrast : str, mapping of str to str, or sequence of str
        The contrasts: ``{"B-A": "trtB - trtA"}``, or expressions that are also their own
        column names (``["trtB - trtA"]`` or ``"trtB - trtA"``). See the module docstring
        for the grammar.
    names : sequence of str, length p
        The coefficient names (R ``model.matrix`` column names), e.g. ``["trtA", "trtB"]``.

    Returns
    -------
    pandas.DataFrame, shape (p, c)
        float64 weights; index ``names`` in order, columns the contrast names in order.

    Raises
    ------
    ContrastError
        If an expression cannot be parsed, names an unknown coefficient, is not a non-zero
        linear combination of coefficients, or the input has the wrong type or duplicates.

    Examples
    --------
    >>> contrast_matrix({"avg": "A-(B+C+D)/3"}, ["A", "B", "C", "D"])["avg"].round(3).tolist()
    [1.0, -0.333, -0.333, -0.333]
    """
    names = _check_names(names)
    columns = {
        label: _Parser(label, text, names).parse() for label, text in _contrast_items(contrast)
    }
    return pd.DataFrame(columns, index=pd.Index(names), dtype="float64")
