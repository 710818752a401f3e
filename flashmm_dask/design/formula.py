"""Formula designs: the fixed-effects matrix X and the random-effects matrix Z.

A design is written as the R package's users write it::

    fixed  = "~ 0 + log(libsize) + cls + cls:trt"
    random = ["~ 0 + sam", "~ 0 + sam:time"]

and becomes

    X   (n, p)  dense, one row per cell, columns named as R's ``model.matrix`` names them
    Z   (n, q)  sparse, Z = [Z_1 .. Z_K], q = d_1 + ... + d_K, one block per random component

so that contrasts written for the R package ("cls3:trtB - cls2:trtB") work unchanged.

Structure first, values later (formulaic's ModelSpec idea): :func:`build_design` learns the
structure once from the cell metadata (``obs``): factor levels, the columns each term
contributes, and which of them R keeps. It learns them from the first cell of each level
(what formulaic would learn from every cell; stateful transforms such as ``center(x)``
from every cell) and then walks all cells in chunks (values, rank), so the driver's memory
does not grow with the cells beyond obs itself. :meth:`Design.X` and :meth:`Design.Z` then
evaluate that fixed structure on any row subset of ``obs`` (a chunk of cells) and return
exactly the rows of the full matrices, even when the chunk lacks some factor levels. A
:class:`Design` pickles, so it can be shipped to Dask workers.

R's naming and coding
---------------------
formulaic builds every matrix, each term with *full* indicator coding of its factors; the
design then keeps the columns that R keeps and names them as R does:

* Terms are sorted by degree (main effects, then two-way interactions, ...), keeping the
  written order within a degree (R's ``keep.order = FALSE``). Within a term the variables
  follow their first appearance in the formula, and the first one varies fastest:
  ``cls1:trtB, cls2:trtB, cls3:trtB``.
* A factor F in a term T is coded by treatment contrasts (its first level dropped) when T
  without F is empty or is contained in a preceding term; otherwise by one indicator per
  level. Without an intercept, the first factor of the first term that has one is coded by
  indicators. This is the rule of R's ``terms.formula``/``model.matrix`` (Chambers & Hastie
  1992, sec. 2.4.1); it differs from patsy/formulaic's default in a few corner cases, such
  as ``~ a:b`` with an intercept, where R gives a rank-deficient matrix.
* Names: ``(Intercept)``; a factor level is the variable name followed by the level
  (``cls2``, ``samA10``); a numeric variable keeps its expression (``log(libsize)``);
  interactions join these with ``:``.
* Levels: the categories' order of a pandas Categorical column (unused categories are kept,
  as R keeps unused factor levels); otherwise the sorted unique values (R's ``factor()``
  default; strings are sorted by code point, as R does with ``LC_COLLATE=C``). Numbers stored
  as strings ("1", "2", "3") are levels; numeric columns stay numeric. Boolean columns are
  factors with levels FALSE, TRUE, as R's logical vectors are.

Random components: a single formula is one component; a sequence gives one component per
formula; a mapping names them. A random formula with an intercept (``~ sam``) follows R too
and gives an ``(Intercept)`` column plus contrasts; the usual form is ``~ 0 + sam``.

Only treatment coding is supported (R's default ``contr.treatment``); numeric terms must
give one column each (``poly(x, 2)``-style matrix terms are not supported).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.sparse

from flashmm_dask.design.fast import FastDesign, combine, plan_block
from flashmm_dask.design.terms import (
    TermBlock,
    build_block,
    component_name,
    parse_formula,
    required_columns,
)
from flashmm_dask.errors import DesignError
from flashmm_dask.numerics.linalg import aliased_columns

__all__ = ["Design", "build_design"]

logger = logging.getLogger(__name__)

#: Rows of X formed at once when X'X is accumulated for the rank check (and when the
#: fast path is checked on every cell).
RANK_CHUNK_ROWS = 100_000
#: The roles of the formulas, in messages.
FIXED, RANDOM = "fixed formula", "random formula"


# --------------------------------------------------------------------------------------
# obs handling
# --------------------------------------------------------------------------------------


def _prepare(obs: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """The used columns of ``obs`` with a fresh index, in the dtypes formulaic reads as R does.

    Booleans become factors with levels FALSE, TRUE; pandas string dtypes become objects.
    """
    missing = [c for c in columns if c not in obs.columns]
    if missing:
        raise DesignError(
            f"column '{missing[0]}' not found in obs; available: "
            f"{', '.join(map(str, obs.columns))}; pass the cell metadata the design was built from"
        )
    frame = obs.loc[:, list(columns)].reset_index(drop=True)
    for c in columns:
        dtype = frame[c].dtype
        if (
            pd.api.types.is_string_dtype(dtype)
            and not pd.api.types.is_object_dtype(dtype)
            and not isinstance(dtype, pd.CategoricalDtype)
        ):
            # formulaic takes pandas' string dtypes for numbers; plain objects are factors
            frame[c] = frame[c].astype(object)
        elif pd.api.types.is_bool_dtype(dtype):
            frame[c] = pd.Categorical(
                np.where(frame[c].to_numpy(dtype=bool), "TRUE", "FALSE"),
                categories=["FALSE", "TRUE"],
            )
    return frame


def _first_cells(frame: pd.DataFrame) -> np.ndarray:
    """Positions of the first cell of each value of each non-numeric column, sorted.

    formulaic learns from these cells the levels it learns from all of them, so a design
    costs O(levels) rather than O(n p) (:func:`flashmm_dask.design.terms.build_block`).
    """
    first = np.zeros(len(frame), dtype=bool)
    first[0] = True
    for col in frame.columns:
        if not pd.api.types.is_numeric_dtype(frame[col]):
            first |= ~frame[col].duplicated().to_numpy()
    return np.flatnonzero(first)


def _check_missing_values(frame: pd.DataFrame) -> None:
    counts = frame.isna().sum()
    bad = counts[counts > 0]
    if len(bad):
        col, count = bad.index[0], int(bad.iloc[0])
        raise DesignError(
            f"obs column '{col}' has {count} missing (NaN) value{'s' * (count != 1)} out of "
            f"{len(frame)} cells; drop those cells or fill the values before building the design"
        )


def _normalise_random(random: str | Sequence[str] | Mapping[str, str]) -> list[tuple[str, str]]:
    """(name or "", formula) per random component."""
    if isinstance(random, str):
        pairs = [("", random)]
    elif isinstance(random, Mapping):
        pairs = [(str(k), v) for k, v in random.items()]
    elif isinstance(random, Sequence):
        pairs = [("", f) for f in random]
    else:
        raise DesignError(
            "random must be a formula string, a list of formulas or a mapping "
            f"{{name: formula}}, got {type(random).__name__}"
        )
    if not pairs:
        raise DesignError("random has no components; give at least one, e.g. random='~ 0 + sam'")
    return pairs


# --------------------------------------------------------------------------------------
# The design
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Design:
    """Fixed and random design of a linear mixed model, learned once, evaluated per chunk.

    Build it with :func:`build_design`.

    Attributes
    ----------
    fixed : str
        The fixed formula as given.
    random : tuple of str, length K
        One formula per random component.
    covariates : tuple of str, length p
        Column names of X, as R's ``model.matrix`` names them.
    random_names : tuple of str, length q
        Column names of Z, R style.
    components : tuple of str, length K
        Names of the random components, e.g. ``("sam", "sam:time")``.
    d : tuple of int, length K
        Sizes of the components; ``sum(d) == q``.
    """

    fixed: str
    random: tuple[str, ...]
    covariates: tuple[str, ...]
    random_names: tuple[str, ...]
    components: tuple[str, ...]
    d: tuple[int, ...]
    _fixed_block: TermBlock = field(repr=False, compare=False)
    _random_blocks: tuple[TermBlock, ...] = field(repr=False, compare=False)
    _columns: tuple[str, ...] = field(repr=False, compare=False)
    _levels: tuple[tuple[str, frozenset[Any]], ...] = field(repr=False, compare=False)
    _fast: FastDesign | None = field(default=None, repr=False, compare=False)
    # the levels it was learned from, in order (build_design's ``like``)
    _learned_from: tuple[tuple[str, Any], ...] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def p(self) -> int:
        """Number of fixed-effect coefficients (columns of X)."""
        return len(self.covariates)

    @property
    def q(self) -> int:
        """Number of random effects (columns of Z)."""
        return len(self.random_names)

    @property
    def K(self) -> int:
        """Number of random components."""
        return len(self.d)

    def X(self, obs: pd.DataFrame) -> np.ndarray:
        """Fixed-effects design of the cells in ``obs``.

        Parameters
        ----------
        obs : pandas.DataFrame, n_chunk rows
            Any row subset of the obs the design was built from (a chunk of cells).

        Returns
        -------
        ndarray of float64, shape (n_chunk, p), C-contiguous
        """
        X = None if self._fast is None else self._fast.X(obs)
        return self._fixed_block.dense(self._frame(obs)) if X is None else X

    def Z(self, obs: pd.DataFrame) -> scipy.sparse.csr_matrix:
        """Random-effects design of the cells in ``obs``, components side by side.

        Parameters
        ----------
        obs : pandas.DataFrame, n_chunk rows
            As for :meth:`X`.

        Returns
        -------
        scipy.sparse.csr_matrix of float64, shape (n_chunk, q)
        """
        Z = None if self._fast is None else self._fast.Z(obs)
        if Z is not None:
            return Z
        frame = self._frame(obs)
        blocks = [block.sparse(frame) for block in self._random_blocks]
        return scipy.sparse.csr_matrix(scipy.sparse.hstack(blocks, format="csr"))

    def XZ(self, obs: pd.DataFrame) -> tuple[np.ndarray, scipy.sparse.csr_matrix]:
        """``(X(obs), Z(obs))`` of a chunk of cells ``obs`` (as for :meth:`X`), reading the
        columns of ``obs`` once for both."""
        both = None if self._fast is None else self._fast.XZ(obs)
        return (self.X(obs), self.Z(obs)) if both is None else both

    def to_dict(self) -> dict[str, Any]:
        """The design's formulas and names as plain JSON-serialisable values."""
        return {
            "fixed": self.fixed,
            "random": list(self.random),
            "components": list(self.components),
            "covariates": list(self.covariates),
            "random_names": list(self.random_names),
            "d": list(self.d),
        }

    def _frame(self, obs: pd.DataFrame) -> pd.DataFrame:
        if not isinstance(obs, pd.DataFrame):
            raise DesignError(f"obs must be a pandas DataFrame, got {type(obs).__name__}")
        frame = _prepare(obs, self._columns)
        for col, known in self._levels:
            values = frame[col]
            unseen = ~values.isin(known) & values.notna()
            if unseen.any():
                new = sorted({str(v) for v in values[unseen]})
                raise DesignError(
                    f"obs column '{col}' has level(s) {', '.join(map(repr, new[:5]))} that were "
                    "not in the obs the design was built from; build the design from all cells"
                )
        return frame


def build_design(
    obs: pd.DataFrame,
    fixed: str,
    random: str | Sequence[str] | Mapping[str, str],
    *,
    check_rank: bool = True,
    like: Sequence[Design] = (),
) -> Design:
    """Learn a design from the cell metadata.

    Parameters
    ----------
    obs : pandas.DataFrame, n rows
        Cell metadata, one row per cell (all cells: factor levels are learned here).
    fixed : str
        Fixed-effects formula, e.g. ``"~ 0 + log(libsize) + cls + cls:trt"``.
    random : str, sequence of str, or mapping of str to str
        Random-effects formula(s): one string is one component; a sequence gives one
        component per formula, named by its right-hand side without ``0 +`` (``"sam"``,
        ``"sam:time"``); a mapping ``{name: formula}`` names the components.
    check_rank : bool, default True
        Check that X has full column rank (X'X is accumulated over chunks of at most
        :data:`RANK_CHUNK_ROWS` cells) and name the aliased columns if it has not.
    like : sequence of Design, optional
        Designs of the same formulas learned from other cells (other strata's): when one
        has the fast path (terms with no state learned from the data) and these cells
        have its factor levels, in the same order, formulaic would learn that design
        here, so it is taken without learning it again or comparing its fast path with
        formulaic again (each costs ~50 ms with a factor of hundreds of levels); the
        cells are still checked as any design's are.

    Returns
    -------
    Design

    Raises
    ------
    DesignError
        Empty obs; a formula that does not parse or names a column missing from obs;
        missing values in a used column; a random component with fewer than 2 columns;
        X not of full column rank (with ``check_rank``).
    """
    if not isinstance(obs, pd.DataFrame):
        raise DesignError(f"obs must be a pandas DataFrame, got {type(obs).__name__}")
    if len(obs) == 0:
        raise DesignError("obs has no cells (0 rows); a design needs the metadata of every cell")

    fixed_parsed = parse_formula(fixed, "fixed formula")
    random_pairs = _normalise_random(random)
    random_parsed = [parse_formula(f, "random formula") for _, f in random_pairs]
    names = [
        name or component_name(parsed)
        for (name, _), parsed in zip(random_pairs, random_parsed, strict=True)
    ]
    for name in names:
        if names.count(name) > 1:
            raise DesignError(
                f"random component '{name}' is given twice; give each component once, or "
                "name them with a mapping {name: formula}"
            )

    used: list[str] = []
    for role, formula, parsed in [
        ("fixed formula", fixed, fixed_parsed),
        *[("random formula", f, p) for (_, f), p in zip(random_pairs, random_parsed, strict=True)],
    ]:
        for col in sorted(required_columns(parsed)):
            if col not in obs.columns:
                raise DesignError(
                    f"column '{col}' not found in obs; available: "
                    f"{', '.join(map(str, obs.columns))} (used by the {role} '{formula}'); "
                    "fix the formula or add the column to obs"
                )
            if col not in used:
                used.append(col)

    frame = _prepare(obs, used)
    _check_missing_values(frame)
    rows = _first_cells(frame)
    first = frame.iloc[rows]  # every value of every non-numeric column
    for known in like:
        if _learns_as(known, fixed, random_pairs, used, first):
            design = _checked_fast_path(known, obs, frame, rows, compare=False)
            if check_rank:
                _check_rank(design, obs)
            return design

    fixed_block = build_block(fixed, fixed_parsed, frame, FIXED, dense=True, rows=rows)
    for expr, lv in fixed_block.levels.items():
        if len(lv) < 2:
            raise DesignError(
                f"factor '{expr}' in the fixed formula has a single level ({lv[0]!r} in every "
                "cell); remove it from the formula"
            )
    if not fixed_block.names:
        raise DesignError(
            f"the fixed formula '{fixed}' gives no columns; add at least one term, e.g. '~ 1'"
        )
    random_blocks = []
    for name, (_, formula), parsed in zip(names, random_pairs, random_parsed, strict=True):
        block = build_block(formula, parsed, frame, RANDOM, dense=False, rows=rows)
        if len(block.names) < 2:
            raise DesignError(
                f"random component '{name}' has a single level; a random effect needs at "
                "least 2: remove the component or use a grouping with 2 or more levels"
            )
        random_blocks.append(block)

    learned_from = _ordered_levels(first, used)
    levels = tuple((col, frozenset(values)) for col, values in learned_from)
    design = Design(
        fixed=fixed,
        random=tuple(f for _, f in random_pairs),
        covariates=fixed_block.names,
        random_names=tuple(n for b in random_blocks for n in b.names),
        components=tuple(names),
        d=tuple(len(b.names) for b in random_blocks),
        _fixed_block=fixed_block,
        _random_blocks=tuple(random_blocks),
        _columns=tuple(used),
        _levels=levels,
        _learned_from=learned_from,
        _fast=combine(
            plan_block(fixed_parsed, fixed_block.levels, fixed_block.spec, first),
            [
                plan_block(parsed, block.levels, block.spec, first)
                for parsed, block in zip(random_parsed, random_blocks, strict=True)
            ],
        ),
    )
    design = _checked_fast_path(design, obs, frame, rows)
    if check_rank:
        _check_rank(design, obs)
    logger.debug(
        "design: p=%d covariates %s; K=%d components %s with d=%s",
        design.p,
        design.covariates,
        design.K,
        design.components,
        design.d,
    )
    return design


# --------------------------------------------------------------------------------------
# The fast path
# --------------------------------------------------------------------------------------

#: Cells on which the fast path is compared with formulaic when a design is built, besides
#: the first cell of every level of every factor.
FAST_CHECK_ROWS = 1_000


def _ordered_levels(first: pd.DataFrame, used: Sequence[str]) -> tuple[tuple[str, Any], ...]:
    """The levels formulaic learns from the cells ``first``: each categorical column's
    categories in order, each other non-numeric column's values (formulaic sorts them)."""
    return tuple(
        (col, tuple(first[col].cat.categories))
        if isinstance(first[col].dtype, pd.CategoricalDtype)
        else (col, frozenset(first[col].unique()))
        for col in used
        if not pd.api.types.is_numeric_dtype(first[col])
    )


def _learns_as(
    like: Design,
    fixed: str,
    random_pairs: list[tuple[str, str]],
    used: list[str],
    first: pd.DataFrame,
) -> bool:
    """Whether formulaic learns ``like`` from the cells ``first``: the same formulas and
    columns, no state learned from the data (the fast path covers only such terms) and
    the same levels in the same order."""
    learned_from = like._learned_from
    return (
        like._fast is not None
        and learned_from is not None
        and (like.fixed, like.random, like._columns)
        == (fixed, tuple(f for _, f in random_pairs), tuple(used))
        and learned_from == _ordered_levels(first, used)
    )


def _checked_fast_path(
    design: Design,
    obs: pd.DataFrame,
    frame: pd.DataFrame,
    first: np.ndarray,
    *,
    compare: bool = True,
) -> Design:
    """The design, without its fast path unless it evaluates every cell and X and Z from it
    equal formulaic's exactly on the first :data:`FAST_CHECK_ROWS` cells and the cells
    ``first`` (the first cell of each factor level); ``compare=False``: the comparison was
    made for this very design on other cells (:func:`build_design`'s ``like``).

    The prepared cells ``frame`` are walked in chunks of :data:`RANK_CHUNK_ROWS`; a chunk
    that the fast path cannot evaluate (e.g. log(0) somewhere) is evaluated by formulaic,
    which raises (missing values after a transform) or warns there as it did when the
    design was learned from every cell.
    """
    fast = design._fast
    slow = dataclasses.replace(design, _fast=None)
    plain = fast is not None
    for start in range(0, len(frame), RANK_CHUNK_ROWS):
        chunk = frame.iloc[start : start + RANK_CHUNK_ROWS]
        if fast is not None and fast.values(chunk) is not None:
            continue
        plain = False  # formulaic's values (and warnings) then, everywhere
        slow._fixed_block.check(chunk, FIXED)
        for block in slow._random_blocks:
            block.check(chunk, RANDOM)
    if fast is None or not plain:
        return slow
    if not compare:
        return design
    sample = obs.iloc[np.union1d(np.arange(min(len(obs), FAST_CHECK_ROWS)), first)]
    X, Z = fast.X(sample), fast.Z(sample)
    if (
        X is not None
        and Z is not None
        and np.array_equal(X, slow.X(sample))
        and (Z != slow.Z(sample)).nnz == 0
    ):
        return design
    logger.debug("design: formulaic evaluates every chunk (the fast path differs from it)")
    return slow


# --------------------------------------------------------------------------------------
# Rank
# --------------------------------------------------------------------------------------


def _check_rank(design: Design, obs: pd.DataFrame) -> None:
    """Raise DesignError naming the aliased columns when X is not of full column rank."""
    XX = np.zeros((design.p, design.p))
    for start in range(0, len(obs), RANK_CHUNK_ROWS):
        Xc = design.X(obs.iloc[start : start + RANK_CHUNK_ROWS])
        XX += Xc.T @ Xc
    bad = aliased_columns(XX)
    if len(bad):
        cols = ", ".join(f"'{design.covariates[j]}'" for j in bad)
        raise DesignError(
            f"X is not full column rank: columns {cols} are aliased (linear combinations of "
            "other columns); remove them from the fixed formula"
        )
