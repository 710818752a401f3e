"""R's model matrices built directly from factor codes: the fast path of the design.

formulaic evaluates a formula on a chunk of cells in about 3 ms whatever the chunk's size
(its materializer walks the formula and builds every factor's full indicator coding),
which is a large part of the one-pass reduction when it is done for every chunk, for X
and again for Z. Most single-cell designs are made of terms that need no such machinery:

    (Intercept)                         a column of ones
    cls, cls:trt, sam                   indicators of factor levels (R-coded)
    libsize, log(libsize), age          a numeric column, or a unary NumPy function of one
    cls:log(libsize), sam:time          a factor's indicators times a numeric value

For such a formula every term puts at most one non-zero in each row: its column is the
mixed-radix number of the row's level codes (the first variable of the term varies
fastest, as in R; a treatment-coded factor's first level gives no column), its value the
product of the term's numeric values (1 without any). :class:`FastBlock` writes those
entries with NumPy from the codes of each factor (``cat.codes`` mapped to the design's
levels) and the numeric columns, and gives the same matrix as formulaic followed by R's
column selection (the structure comes from the same :func:`~flashmm_dask.design.terms.r_terms`).

:func:`plan_block` returns None for a formula with anything else (``C(x)``, ``I(x ** 2)``,
``poly``, ``scale``, three numeric factors in one term), and :meth:`FastDesign.X` /
:meth:`FastDesign.Z` return None for a chunk that is not plain (a missing or unseen
level, a non-finite numeric value, a missing column, not a DataFrame): the design then
evaluates it with formulaic, which raises the errors users know. The design also compares
both paths on a sample of the cells when it is built and keeps the fast one only if they
agree exactly (:func:`flashmm_dask.design.formula.build_design`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse

from flashmm_dask.design.terms import r_terms

if TYPE_CHECKING:
    from formulaic import ModelSpec
    from formulaic.formula import SimpleFormula

__all__ = ["FastBlock", "FastDesign", "Numeric", "combine", "plan_block"]

# "log(libsize)", "np.log1p(x)": a unary function of one column
_CALL = re.compile(r"^(np\.)?([A-Za-z_]\w*)\(([A-Za-z_]\w*)\)$")


@dataclass(frozen=True)
class Numeric:
    """A numeric variable: an obs column, or a unary NumPy ufunc of one."""

    column: str
    func: np.ufunc | None


@dataclass(frozen=True)
class _Term:
    """One R term: ``variables`` in R's order, their radix (levels kept; 1 for numerics)."""

    offset: int
    variables: tuple[str, ...]
    drop_first: tuple[bool, ...]
    radix: tuple[int, ...]
    numeric: tuple[bool, ...]


@dataclass(frozen=True)
class FastBlock:
    """Columns ``0..ncol-1`` of a model matrix as a list of terms, each at most one
    non-zero per row (see the module docstring)."""

    ncol: int
    terms: tuple[_Term, ...]

    def shifted(self, offset: int) -> FastBlock:
        """The same block with its columns starting at ``offset``."""
        terms = tuple(
            _Term(t.offset + offset, t.variables, t.drop_first, t.radix, t.numeric)
            for t in self.terms
        )
        return FastBlock(self.ncol, terms)

    def entries(
        self, values: Mapping[str, np.ndarray], n: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Column, value and presence of each term's entry in each row, shape (terms, n)."""
        T = len(self.terms)
        cols = np.empty((T, n), dtype=np.int64)
        vals = np.ones((T, n), dtype=np.float64)
        present = np.ones((T, n), dtype=bool)
        for k, term in enumerate(self.terms):
            cols[k] = term.offset
            stride = 1
            for var, drop, radix, numeric in zip(
                term.variables, term.drop_first, term.radix, term.numeric, strict=True
            ):
                if numeric:
                    vals[k] *= values[var]
                    continue
                code = values[var]
                if drop:
                    code = code - 1
                    present[k] &= code >= 0
                cols[k] += code * stride
                stride *= radix
        return cols, vals, present

    def dense(self, values: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        """The (n, ncol) float64 matrix, C-contiguous."""
        out = np.zeros((n, self.ncol), dtype=np.float64)
        flat = out.reshape(-1)
        cols, vals, present = self.entries(values, n)
        cols += np.arange(n, dtype=np.int64) * self.ncol  # positions in the flat array
        for k in range(len(self.terms)):
            if present[k].all():
                flat[cols[k]] = vals[k]
            else:
                flat[cols[k][present[k]]] = vals[k][present[k]]
        return out

    def sparse(self, values: Mapping[str, np.ndarray], n: int) -> scipy.sparse.csr_matrix:
        """The (n, ncol) float64 matrix as CSR, columns sorted in each row, no zeros stored."""
        cols, vals, present = self.entries(values, n)
        present &= vals != 0
        by_row = present.T  # row-major order of the (n, terms) entries: row by row
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(by_row.sum(axis=1), out=indptr[1:])
        return scipy.sparse.csr_matrix(
            (vals.T[by_row], cols.T[by_row], indptr), shape=(n, self.ncol), dtype=np.float64
        )


def _numeric_of(expr: str, columns: Sequence[str]) -> Numeric | None:
    """The Numeric an expression stands for, or None when it is not a plain one."""
    from formulaic.transforms import TRANSFORMS

    if expr in columns:
        return Numeric(expr, None)
    match = _CALL.match(expr.replace(" ", ""))
    if match is None or match.group(3) not in columns:
        return None
    prefix, name, column = match.groups()
    func = getattr(np, name, None) if prefix else TRANSFORMS.get(name)
    if isinstance(func, np.ufunc) and func.nin == 1 and func.nout == 1:
        return Numeric(column, func)
    return None


def plan_block(
    parsed: SimpleFormula,
    levels: Mapping[str, Sequence[Any]],
    spec: ModelSpec,
    frame: pd.DataFrame,
) -> tuple[FastBlock, dict[str, pd.Index], dict[str, Numeric]] | None:
    """The fast evaluation of one formula, or None when it has a term that is not plain.

    Parameters
    ----------
    parsed : formulaic.formula.SimpleFormula
        The formula with terms in written order.
    levels : mapping of str to sequence
        Levels of each factor, as formulaic learned them.
    spec : formulaic.ModelSpec
        The learned structure (which variables are numerical).
    frame : pandas.DataFrame
        The prepared obs the design was built from (for the column names and dtypes).

    Returns
    -------
    (FastBlock, factors, numerics) or None
        ``factors`` maps each factor (an obs column) to its levels, ``numerics`` each
        numeric variable (its expression) to a :class:`Numeric`.
    """
    columns = [str(c) for c in frame.columns]
    kinds = {expr: getattr(kind, "value", None) for expr, (kind, _) in spec.encoder_state.items()}
    factors: dict[str, pd.Index] = {}
    numerics: dict[str, Numeric] = {}
    intercept, terms = r_terms(parsed, levels)
    out: list[_Term] = []
    offset = 0
    if intercept:
        out.append(_Term(0, (), (), (), ()))
        offset = 1
    for term in terms:
        radix: list[int] = []
        numeric: list[bool] = []
        for var, drop in zip(term.variables, term.drop_first, strict=True):
            if var in levels and kinds.get(var) == "categorical" and var in columns:
                factors[var] = pd.Index(list(levels[var]))
                radix.append(len(levels[var]) - int(drop))
                numeric.append(False)
                continue
            plain = _numeric_of(var, columns) if kinds.get(var) == "numerical" else None
            if plain is None or frame[plain.column].dtype.kind not in "iuf":
                return None
            numerics[var] = plain
            radix.append(1)
            numeric.append(True)
        if sum(numeric) > 2:  # a product of three numbers depends on formulaic's order
            return None
        out.append(_Term(offset, term.variables, term.drop_first, tuple(radix), tuple(numeric)))
        offset += int(np.prod(radix))
    return FastBlock(offset, tuple(out)), factors, numerics


def _codes(series: pd.Series, levels: pd.Index) -> np.ndarray | None:
    """Position of each value of a factor column among ``levels``; None if any is missing
    or unseen."""
    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        codes = series.array.codes
        if codes.size and codes.min() < 0:
            return None
        codes = levels.get_indexer(dtype.categories)[codes]
    elif pd.api.types.is_bool_dtype(dtype) and dtype.kind == "b":
        # prepared as a factor with levels FALSE, TRUE, as R's logical vectors are
        codes = levels.get_indexer(["FALSE", "TRUE"])[series.to_numpy().astype(np.intp)]
    else:
        codes = levels.get_indexer(series)
    if codes.size and codes.min() < 0:
        return None
    return codes.astype(np.int64, copy=False)


def _numbers(series: pd.Series, numeric: Numeric) -> np.ndarray | None:
    """The values of a numeric variable in float64; None if any is not finite."""
    raw = series.to_numpy()
    if raw.dtype.kind not in "iuf":
        return None
    with np.errstate(all="ignore"):
        # the function sees the column's own dtype, as it does under formulaic
        values = np.asarray(raw if numeric.func is None else numeric.func(raw), dtype=np.float64)
    if not np.isfinite(values).all():
        return None
    return values


@dataclass(frozen=True)
class FastDesign:
    """X and Z of a design evaluated from factor codes (see the module docstring).

    Attributes
    ----------
    fixed : FastBlock
        The columns of X.
    random : FastBlock
        The columns of Z, components side by side.
    factors : dict of str to pandas.Index
        Levels of each factor column.
    numerics : dict of str to Numeric
        Each numeric variable, by its expression.
    """

    fixed: FastBlock
    random: FastBlock
    factors: Mapping[str, pd.Index]
    numerics: Mapping[str, Numeric]

    def values(self, obs: pd.DataFrame) -> dict[str, np.ndarray] | None:
        """Codes of the factors and values of the numerics for the rows of ``obs``, or None
        when the chunk needs formulaic (see the module docstring)."""
        if not isinstance(obs, pd.DataFrame):
            return None
        out: dict[str, np.ndarray] = {}
        for column, levels in self.factors.items():
            if column not in obs.columns:
                return None
            codes = _codes(obs[column], levels)
            if codes is None:
                return None
            out[column] = codes
        for expr, numeric in self.numerics.items():
            if numeric.column not in obs.columns:
                return None
            values = _numbers(obs[numeric.column], numeric)
            if values is None:
                return None
            out[expr] = values
        return out

    def XZ(self, obs: pd.DataFrame) -> tuple[np.ndarray, scipy.sparse.csr_matrix] | None:
        """(X, Z) of the rows of ``obs``, reading its columns once, or None (then use
        formulaic)."""
        values = self.values(obs)
        if values is None:
            return None
        return self.fixed.dense(values, len(obs)), self.random.sparse(values, len(obs))

    def X(self, obs: pd.DataFrame) -> np.ndarray | None:
        """X (n, p) float64 of the rows of ``obs``, or None (then use formulaic)."""
        values = self.values(obs)
        return None if values is None else self.fixed.dense(values, len(obs))

    def Z(self, obs: pd.DataFrame) -> scipy.sparse.csr_matrix | None:
        """Z (n, q) CSR of the rows of ``obs``, or None (then use formulaic)."""
        values = self.values(obs)
        return None if values is None else self.random.sparse(values, len(obs))


def combine(
    fixed: tuple[FastBlock, dict[str, pd.Index], dict[str, Numeric]] | None,
    random: Sequence[tuple[FastBlock, dict[str, pd.Index], dict[str, Numeric]] | None],
) -> FastDesign | None:
    """The FastDesign of a fixed and random formulas' plans, None if any has none."""
    if fixed is None or any(r is None for r in random):
        return None
    plans = [fixed, *[r for r in random if r is not None]]
    factors: dict[str, pd.Index] = {}
    numerics: dict[str, Numeric] = {}
    for _, f, num in plans:
        for column, levels in f.items():
            if column in factors and not factors[column].equals(levels):
                return None
            factors[column] = levels
        numerics.update(num)
    terms: list[_Term] = []
    offset = 0
    for block, _, _ in plans[1:]:
        terms.extend(block.shifted(offset).terms)
        offset += block.ncol
    return FastDesign(fixed[0], FastBlock(offset, tuple(terms)), factors, numerics)
