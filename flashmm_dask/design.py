"""Formula designs: the fixed-effects matrix X and the random-effects matrix Z.

A design is written as the R package's users write it::

    fixed  = "~ 0 + log(libsize) + cls + cls:trt"
    random = ["~ 0 + sam", "~ 0 + sam:time"]

and becomes

    X   (n, p)  dense, one row per cell, columns named as R's ``model.matrix`` names them
    Z   (n, q)  sparse, Z = [Z_1 .. Z_K], q = d_1 + ... + d_K, one block per random component

so that contrasts written for the R package ("cls3:trtB - cls2:trtB") work unchanged.

Structure first, values later (formulaic's ModelSpec idea): :func:`build_design` learns the
structure once from the whole cell metadata (``obs``): factor levels, the columns each term
contributes, and which of them R keeps. :meth:`Design.X` and :meth:`Design.Z` then evaluate
that fixed structure on any row subset of ``obs`` (a chunk of cells) and return exactly the
rows of the full matrices, even when the chunk lacks some factor levels. A :class:`Design`
pickles, so it can be shipped to Dask workers.

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

import itertools
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.sparse

from flashmm_dask.errors import DesignError

__all__ = ["Design", "aliased_columns", "build_design"]

logger = logging.getLogger(__name__)

#: Rows of X formed at once when X'X is accumulated for the rank check.
RANK_CHUNK_ROWS = 100_000

#: A column is aliased when 1 - R^2 of its regression on the earlier columns is below this.
ALIAS_RTOL = 1e-9

_ANSI = re.compile(r"\x1b\[[0-9;]*m|⧛|⧚")
_INTERCEPT = "(Intercept)"


# --------------------------------------------------------------------------------------
# One formula -> one block of columns
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Block:
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
    spec: Any
    keep: np.ndarray
    names: tuple[str, ...]
    levels: dict[str, list[Any]]

    def dense(self, frame: pd.DataFrame) -> np.ndarray:
        """Evaluate the block on ``frame`` as a dense (rows, ncol) float64 array."""
        mm = self._evaluate(frame, "numpy")
        return np.ascontiguousarray(np.asarray(mm)[:, self.keep], dtype=np.float64)

    def sparse(self, frame: pd.DataFrame) -> scipy.sparse.csc_matrix:
        """Evaluate the block on ``frame`` as a sparse (rows, ncol) float64 matrix."""
        mm = self._evaluate(frame, "sparse")
        return scipy.sparse.csc_matrix(mm.__wrapped__, dtype=np.float64)[:, self.keep]

    def _evaluate(self, frame: pd.DataFrame, output: str) -> Any:
        try:
            mm = self.spec.get_model_matrix(frame, context={}, output=output)
        except Exception as exc:  # formulaic raises several unrelated classes
            raise DesignError(
                f"formula '{self.formula}' could not be evaluated on a chunk of obs: {_clean(exc)}"
            ) from exc
        if mm.shape[0] != len(frame):
            raise DesignError(
                f"formula '{self.formula}' gave {mm.shape[0]} rows for {len(frame)} cells; "
                "check obs for missing values"
            )
        return mm


def _clean(exc: BaseException) -> str:
    """formulaic's message on one line, without its terminal colour codes."""
    text = _ANSI.sub("", str(exc))
    return " ".join(text.split())


def _parse(formula: str, role: str) -> Any:
    """Parse one formula with formulaic, keeping the written term order.

    Parameters
    ----------
    formula : str
        A one-sided formula such as ``"~ 0 + sam"``.
    role : str
        Where the formula came from ("fixed formula", "random formula 'sam'"), for messages.

    Returns
    -------
    formulaic.Formula
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


def _required_columns(parsed: Any) -> set[str]:
    """Names a parsed formula needs from obs (transform functions such as log excluded)."""
    from formulaic.transforms import TRANSFORMS

    return {str(v) for v in parsed.required_variables} - set(TRANSFORMS)


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


def _r_columns(parsed: Any, levels: Mapping[str, Sequence[Any]]) -> list[tuple[str, str]]:
    """R's columns of a formula, with the names formulaic gives them under full coding.

    Parameters
    ----------
    parsed : formulaic.Formula
        The formula with terms in written order.
    levels : mapping of str to sequence
        The levels of each factor (formulaic's learned categories); numeric variables
        are absent.

    Returns
    -------
    list of (R name, formulaic name)
        One entry per R column, in R's order.
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

    columns = [(_INTERCEPT, "Intercept")] if intercept else []
    for term, code in zip(terms, codes, strict=True):
        f_order = [f.expr for f in term.factors]
        r_order = sorted(f_order, key=var_order.__getitem__)
        options: list[list[tuple[str, str | None]]] = []
        for v in r_order:
            if v not in levels:
                options.append([(v, None)])
            else:
                drop_first = code[v] == 1
                options.append([(v, str(lv)) for lv in levels[v][int(drop_first) :]])
        # R varies the first variable fastest: product over the reversed list, reversed.
        for combo in itertools.product(*reversed(options)):
            level_of = dict(combo)
            r_name = ":".join(f"{v}{level_of[v]}" if v in levels else v for v in r_order)
            f_name = ":".join(f"{v}[{level_of[v]}]" if v in levels else v for v in f_order)
            columns.append((r_name, f_name))
    return columns


def _factor_levels(spec: Any) -> dict[str, list[Any]]:
    """Levels of each categorical factor of a formulaic ModelSpec, in formulaic's order."""
    return {
        expr: list(state["categories"])
        for expr, (kind, state) in spec.encoder_state.items()
        if getattr(kind, "value", None) == "categorical"
    }


def _build_block(
    formula: str, parsed: Any, frame: pd.DataFrame, role: str, *, dense: bool
) -> _Block:
    """Learn the structure of one formula from the whole of ``frame`` (prepared obs).

    Parameters
    ----------
    formula : str
        The formula as given, for messages.
    parsed : formulaic.Formula
        The parsed formula.
    frame : pandas.DataFrame
        All cells' metadata, prepared by :func:`_prepare`.
    role : str
        Where the formula came from, for messages.
    dense : bool
        Whether the block is evaluated dense (X) or sparse (Z).
    """
    from formulaic import model_matrix

    try:
        mm = model_matrix(
            parsed,
            frame,
            ensure_full_rank=False,
            na_action="raise",
            output="numpy" if dense else "sparse",
            context={},
        )
    except Exception as exc:
        raise DesignError(
            f"the {role} '{formula}' could not be evaluated on obs: {_clean(exc)}"
        ) from exc
    spec = mm.model_spec
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
    return _Block(formula, spec, np.asarray(keep, dtype=np.int64), tuple(names), levels)


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


def _component_name(parsed: Any) -> str:
    terms = [str(t) for t in parsed if t.degree > 0]
    return " + ".join(terms) if terms else _INTERCEPT


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
    _fixed_block: _Block = field(repr=False, compare=False)
    _random_blocks: tuple[_Block, ...] = field(repr=False, compare=False)
    _columns: tuple[str, ...] = field(repr=False, compare=False)
    _levels: tuple[tuple[str, frozenset[Any]], ...] = field(repr=False, compare=False)

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
        frame = self._frame(obs)
        if len(frame) == 0:
            return np.zeros((0, self.p), dtype=np.float64)
        return self._fixed_block.dense(frame)

    def Z(self, obs: pd.DataFrame) -> scipy.sparse.csr_matrix:
        """Random-effects design of the cells in ``obs``, components side by side.

        Parameters
        ----------
        obs : pandas.DataFrame, n_chunk rows
            Any row subset of the obs the design was built from.

        Returns
        -------
        scipy.sparse.csr_matrix of float64, shape (n_chunk, q)
        """
        frame = self._frame(obs)
        if len(frame) == 0:
            return scipy.sparse.csr_matrix((0, self.q), dtype=np.float64)
        blocks = [block.sparse(frame) for block in self._random_blocks]
        return scipy.sparse.csr_matrix(scipy.sparse.hstack(blocks, format="csr"))

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

    fixed_parsed = _parse(fixed, "fixed formula")
    random_pairs = _normalise_random(random)
    random_parsed = [_parse(f, "random formula") for _, f in random_pairs]
    names = [
        name or _component_name(parsed)
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
        for col in sorted(_required_columns(parsed)):
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

    fixed_block = _build_block(fixed, fixed_parsed, frame, "fixed formula", dense=True)
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
        block = _build_block(formula, parsed, frame, "random formula", dense=False)
        if len(block.names) < 2:
            raise DesignError(
                f"random component '{name}' has a single level; a random effect needs at "
                "least 2: remove the component or use a grouping with 2 or more levels"
            )
        random_blocks.append(block)

    levels = tuple(
        (col, frozenset(frame[col].cat.categories))
        if isinstance(frame[col].dtype, pd.CategoricalDtype)
        else (col, frozenset(frame[col].unique()))
        for col in used
        if not pd.api.types.is_numeric_dtype(frame[col])
    )
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
    )
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
# Rank
# --------------------------------------------------------------------------------------


def aliased_columns(XX: np.ndarray, rtol: float = ALIAS_RTOL) -> np.ndarray:
    """Columns of X that are linear combinations of earlier columns, from X'X alone.

    Column j is aliased when its squared distance to the span of the earlier non-aliased
    columns, relative to its squared norm (1 - R^2 of that regression), is at most ``rtol``;
    a zero column is aliased. This is R's ``lm`` convention: the earliest columns are kept.

    Parameters
    ----------
    XX : ndarray, shape (p, p)
        X'X, symmetric positive semi-definite.
    rtol : float
        Threshold on 1 - R^2.

    Returns
    -------
    ndarray of int64, shape (n_aliased,)
        Indices of the aliased columns, increasing.
    """
    XX = np.asarray(XX, dtype=np.float64)
    norms = np.sqrt(np.clip(np.diag(XX), 0.0, None))
    scale = np.where(norms > 0, norms, 1.0)
    S = XX / np.outer(scale, scale)
    kept: list[int] = []
    aliased: list[int] = []
    L = np.zeros((0, 0))
    for j in range(XX.shape[0]):
        if norms[j] == 0:
            aliased.append(j)
            continue
        w = scipy.linalg.solve_triangular(L, S[kept, j], lower=True) if kept else np.zeros(0)
        resid = S[j, j] - w @ w
        if resid <= rtol:
            aliased.append(j)
            continue
        k = len(kept)
        L_new = np.zeros((k + 1, k + 1))
        L_new[:k, :k] = L
        L_new[k, :k] = w
        L_new[k, k] = np.sqrt(resid)
        L = L_new
        kept.append(j)
    return np.asarray(aliased, dtype=np.int64)


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
