"""Strata and cell selection: which cells each model sees, and each stratum's design.

A *stratum* is the set of selected cells that share one level of an obs column (``by``,
e.g. ``"cell_type"``); each stratum gets its own model, with its own variance components,
and the statistics of all of them come from one pass over the expression
(:mod:`flashmm_dask.stats.reduce_strata`). Without ``by`` there is one stratum, the selected
cells (all cells without a selection).

Each stratum's design is learned from that stratum's cells alone, exactly as if they
were the whole data set selected by hand (:func:`select_obs`): categorical columns keep
only the categories present among those cells (R's ``droplevels``), so a donor absent
from a stratum has no Z column there and a cell type absent from it no X column, and
sorted unique values give the levels of other columns. A stratum whose design cannot be
fitted is *skipped* and reported, never dropped silently: no selected cells; fewer cells
than coefficients + 1; a fixed factor with a single level there (e.g. only one
condition); a random component with fewer than 2 levels (too few donors); X not of full
rank; or a random component that the stratum's fixed effects absorb (one donor per
condition there: :mod:`flashmm_dask.design.check`, from the stratum's cell metadata, before
any data pass; a component with few degrees of freedom left is warned of, naming the
stratum). The :class:`~flashmm_dask.errors.DesignError` message is the reason.

Cells with a missing value in a column the formulas (or ``by``) use are an error, unless
``drop_missing`` is set: then they are left out of every stratum and counted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from flashmm_dask.design.check import check_design_replication
from flashmm_dask.design.formula import Design, build_design
from flashmm_dask.design.selection import Cells, cell_mask, describe
from flashmm_dask.design.terms import parse_formula, required_columns
from flashmm_dask.errors import DesignError, InputError

__all__ = ["Strata", "group_name", "group_names", "plan_strata", "select_obs"]

logger = logging.getLogger(__name__)

_SAFE_GROUP = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def select_obs(obs: pd.DataFrame, mask: Sequence[bool] | np.ndarray) -> pd.DataFrame:
    """The rows of ``obs`` where ``mask`` is True, categorical columns reduced to the
    categories present (R's ``droplevels(subset(...))``).

    This is what a user would select by hand to fit one stratum: the fit of
    ``flashmm(data[mask], ..., metadata=select_obs(obs, mask))`` equals stratum ``level``
    of ``flashmm(data, ..., by=...)`` when ``mask`` selects that level's cells.
    """
    sub = obs.loc[np.asarray(mask, dtype=bool)].copy()
    for col in sub.columns:
        if isinstance(sub[col].dtype, pd.CategoricalDtype):
            sub[col] = sub[col].cat.remove_unused_categories()
    return sub


def group_name(level: str, position: int) -> str:
    """The name of a stratum's group in a store, alone: the level itself when it is a safe
    path component (letters, digits, ``_ . + -``, not starting with ``.``), else
    ``s<position>``. The strata of a store take :func:`group_names`, which keeps them apart."""
    text = str(level)
    if _SAFE_GROUP.fullmatch(text) and len(text) <= 100:
        return text
    return f"s{position}"


def group_names(levels: Sequence[str]) -> dict[str, str]:
    """Level -> the name of its group in a store, distinct for distinct levels, also where
    file names ignore case: a safe level keeps its own name (the first of those that differ
    in case only), and any other takes ``s<position>``, or ``s<position>_<k>`` where that
    is a level's name too ('a b' and a level 's0')."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    later = []
    for position, level in enumerate(levels):
        name = group_name(level, position)
        if name == str(level) and name.lower() not in taken:
            out[level] = name
            taken.add(name.lower())
        else:
            later.append((position, level))
    for position, level in later:
        name, k = f"s{position}", 0
        while name.lower() in taken:
            k += 1
            name = f"s{position}_{k}"
        out[level] = name
        taken.add(name.lower())
    return {level: out[level] for level in levels}


@dataclass(frozen=True)
class Strata:
    """The strata of a run: the cells and the design of each fitted stratum.

    Attributes
    ----------
    by : the obs column, or None (one stratum: the selected cells)
    levels : the labels of the fitted strata, in level order (``("all",)`` without by)
    designs : one Design per fitted stratum
    codes : (n,) int32, the stratum of each cell (index into ``levels``), -1 for a cell
        in no fitted stratum (not selected, missing value, skipped stratum)
    categories : per fitted stratum, the categories of each categorical design column
        among its cells (chunks are recoded to them before the design is evaluated)
    skipped : level -> the reason it was not fitted, in level order
    n_selected : cells selected (after drop_missing)
    n_dropped : selected cells dropped for a missing value (drop_missing)
    cells : the selection as given (an expression, a mask description or None)
    """

    by: str | None
    levels: tuple[str, ...]
    designs: tuple[Design, ...]
    codes: np.ndarray
    categories: tuple[dict[str, list[Any]], ...]
    skipped: dict[str, str] = field(default_factory=dict)
    n_selected: int = 0
    n_dropped: int = 0
    cells: str | None = None

    @property
    def n_strata(self) -> int:
        return len(self.levels)

    @property
    def n_cells(self) -> tuple[int, ...]:
        """Cells of each fitted stratum."""
        counts = np.bincount(self.codes[self.codes >= 0], minlength=len(self.levels))
        return tuple(int(c) for c in counts)

    def frame(self, s: int, obs: pd.DataFrame) -> pd.DataFrame:
        """Rows of stratum ``s`` (any chunk of them) recoded to the stratum's categories."""
        cats = self.categories[s]
        if not cats:
            return obs
        obs = obs.copy()
        for col, values in cats.items():
            obs[col] = obs[col].cat.set_categories(values)
        return obs

    def XZ(self, s: int, obs: pd.DataFrame) -> tuple[Any, Any]:
        """X and Z of stratum ``s`` on its rows ``obs`` (any chunk of them).

        The fast path of the design maps the chunk's category codes to the stratum's
        levels itself; only formulaic needs the columns recoded (:meth:`frame`).
        """
        design = self.designs[s]
        both = None if design._fast is None else design._fast.XZ(obs)
        return design.XZ(self.frame(s, obs)) if both is None else both

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (for provenance and store attributes)."""
        return {
            "by": self.by,
            "levels": list(self.levels),
            "n_cells": list(self.n_cells),
            "skipped": dict(self.skipped),
            "n_selected": int(self.n_selected),
            "n_dropped_missing": int(self.n_dropped),
            "cells": self.cells,
        }


def _used_columns(fixed: str, random: str | Sequence[str] | Mapping[str, str]) -> list[str]:
    formulas = [fixed]
    if isinstance(random, str):
        formulas.append(random)
    elif isinstance(random, Mapping):
        formulas += [str(v) for v in random.values()]
    else:
        formulas += [str(v) for v in random]
    used: list[str] = []
    for formula in formulas:
        for col in sorted(required_columns(parse_formula(formula, "formula"))):
            if col not in used:
                used.append(col)
    return used


def _levels(values: pd.Series) -> list[Any]:
    if isinstance(values.dtype, pd.CategoricalDtype):
        return list(values.cat.categories)
    return sorted(pd.unique(values.dropna()), key=lambda v: (str(type(v)), v))


def _distinct_labels(by: str, labels: list[str]) -> None:
    """Refuse levels of ``by`` that print the same (an object column holding 1 and "1",
    after a concatenation of batches): their strata would share a name, and one would
    hide the other in every result keyed by level."""
    counts = pd.Series(labels).value_counts()
    clashes = sorted(counts.index[counts > 1])
    if clashes:
        raise DesignError(
            f"obs column '{by}' has distinct values that print the same: "
            f"{', '.join(map(repr, clashes[:5]))} (e.g. the number 1 and the text '1'); "
            f"make the column one type (obs['{by}'] = obs['{by}'].astype(str)) so that "
            "each stratum has its own name"
        )


def plan_strata(
    obs: pd.DataFrame,
    fixed: str,
    random: str | Sequence[str] | Mapping[str, str],
    *,
    by: str | None = None,
    cells: Cells = None,
    drop_missing: bool = False,
    check_design: bool = True,
) -> Strata:
    """The strata of a run (see the module docstring).

    Parameters
    ----------
    obs : cell metadata, one row per cell
    fixed, random : the formulas, applied to each stratum's cells
    by : obs column whose levels are the strata, or None
    cells : a selection expression (:mod:`flashmm_dask.design.selection`), a boolean mask or None
    drop_missing : leave out the cells with a missing value in a used column instead of
        raising
    check_design : check each stratum's random components against its fixed effects
        (:func:`~flashmm_dask.design.check.check_design_replication`); False: as R FLASHMM,
        any design is fitted

    Raises
    ------
    SelectionError
        An invalid selection, or one that selects no cell.
    DesignError
        An unknown ``by`` column or formula column; missing values without
        ``drop_missing``; every stratum skipped (with the reasons); without ``by``, a
        design that cannot be fitted on the selected cells (or whose fixed effects absorb a
        random component there).
    """
    if not isinstance(obs, pd.DataFrame):
        raise InputError(f"obs must be a pandas DataFrame, got {type(obs).__name__}")
    mask = cell_mask(obs, cells)
    used = _used_columns(fixed, random)
    if by is not None:
        if not isinstance(by, str) or by not in obs.columns:
            raise DesignError(
                f"by={by!r} is not an obs column; obs has {', '.join(map(str, obs.columns))}"
            )
        if by not in used:
            used.append(by)
    unknown = [c for c in used if c not in obs.columns]
    if unknown:
        raise DesignError(
            f"column{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} not found in "
            f"obs; available: {', '.join(map(str, obs.columns))}; fix the formula or add "
            "the column to obs"
        )
    missing = obs[used].isna().to_numpy().any(axis=1) & mask
    n_dropped = int(missing.sum())
    if n_dropped:
        if not drop_missing:
            counts = obs.loc[mask, used].isna().sum()
            col = str(counts[counts > 0].index[0])
            raise DesignError(
                f"obs column '{col}' has {int(counts[col])} missing value(s) among the "
                f"{int(mask.sum())} selected cells; drop those cells (data.drop_missing: "
                "true, drop_missing=True, or a cell selection) or fill the values"
            )
        logger.info("dropping %d cells with a missing value in %s", n_dropped, used)
        mask &= ~missing
    n_selected = int(mask.sum())
    if n_selected == 0:
        raise DesignError("no cell is left once the cells with missing values are dropped")
    codes = np.full(len(obs), -1, dtype=np.int32)
    if by is None:
        groups: list[tuple[str, np.ndarray]] = [("all", mask)]
    else:
        column = obs[by]
        groups = [(str(level), mask & (column == level).to_numpy()) for level in _levels(column)]
        _distinct_labels(by, [label for label, _ in groups])
    levels: list[str] = []
    designs: list[Design] = []
    categories: list[dict[str, list[Any]]] = []
    skipped: dict[str, str] = {}
    learned: list[Design] = []  # the distinct designs of the strata so far
    for label, rows in groups:
        n_s = int(rows.sum())
        if n_s == 0:
            skipped[label] = "no selected cells"
            continue
        sub = select_obs(obs[used], rows)
        try:
            # an earlier stratum's design where these cells learn the same one
            design = build_design(sub, fixed, random, like=learned)
        except DesignError as exc:
            if by is None:
                raise
            skipped[label] = str(exc)
            continue
        if n_s <= design.p:
            if by is None:
                raise DesignError(
                    f"the {n_s} selected cells are too few for {design.p} coefficients"
                )
            skipped[label] = f"{n_s} cells for {design.p} coefficients"
            continue
        if check_design:
            where = "the selected cells" if by is None else f"stratum {by}={label}"
            try:
                check_design_replication(design, sub, where=where)
            except DesignError as exc:
                if by is None:
                    raise
                skipped[label] = str(exc)
                continue
        if all(design is not known for known in learned):
            learned.append(design)
        codes[rows] = len(levels)
        levels.append(label)
        designs.append(design)
        categories.append(
            {
                col: list(sub[col].cat.categories)
                for col in design._columns
                if isinstance(sub[col].dtype, pd.CategoricalDtype)
            }
        )
    for label, reason in skipped.items():
        logger.warning("stratum %s=%s is skipped: %s", by, label, reason)
    if not levels:
        shown = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:5])
        raise DesignError(f"no stratum of {by!r} can be fitted ({shown})")
    return Strata(
        by=by,
        levels=tuple(levels),
        designs=tuple(designs),
        codes=codes,
        categories=tuple(categories),
        skipped=skipped,
        n_selected=n_selected,
        n_dropped=n_dropped,
        cells=describe(cells),
    )
