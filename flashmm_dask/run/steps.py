"""The steps from expression data to summary statistics, walked by
:func:`flashmm_dask.api.flashmm` and by runs (:mod:`flashmm_dask.run.inputs`).

1. :func:`checked_expression`: the data read, with cell metadata, the integer grouping
   columns of the random formulas as factors.
2. :func:`checked_design`: the design of the formulas on obs, checked for random
   components that the fixed effects absorb before the expression is read.
3. :func:`with_pcs`: the top principal components added to obs, the formula and the
   design (the design is rebuilt only when there are components to add).
4. The reduction: :func:`flashmm_dask.stats.reduce.stats_graph` (one Dask pass).

The caller says only what differs: the message for data without cell metadata (an
argument of the API, a config key of a run) and when the design check runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import dask.array as da
import numpy as np

from flashmm_dask.design.check import check_design_replication
from flashmm_dask.design.formula import Design, build_design
from flashmm_dask.design.groupings import factor_groupings
from flashmm_dask.errors import InputError
from flashmm_dask.io.readers import Expression
from flashmm_dask.stats.blocks import transform_block

Random = str | Sequence[str] | Mapping[str, str]


def resolve_transform(is_counts: bool, transform: str | None) -> str:
    """The chunk transform from R's ``is_counts`` flag or an explicit transform name."""
    if transform is None:
        return "log2p1" if is_counts else "none"
    if is_counts and transform == "none":
        raise InputError(
            "is_counts=True asks for log2(1 + counts) but transform='none' was given; "
            "pass one of them"
        )
    return transform


def with_factor_groupings(expr: Expression, fixed: str, random: Random) -> Expression:
    """``expr`` with the integer grouping columns of the random formulas as factors
    (:func:`flashmm_dask.design.groupings.factor_groupings`)."""
    obs, converted = factor_groupings(expr.obs, fixed, random)
    return dataclasses.replace(expr, obs=obs) if converted else expr


def require_obs(expr: Expression, missing: str) -> Expression:
    """``expr``, refused with InputError(``missing``) when it carries no cell metadata."""
    if expr.obs is None:
        raise InputError(missing)
    return expr


def checked_expression(expr: Expression, fixed: str, random: Random, missing: str) -> Expression:
    """Step 1: ``expr`` with cell metadata (else InputError(``missing``)) and its grouping
    columns as factors."""
    return with_factor_groupings(require_obs(expr, missing), fixed, random)


def checked_design(expr: Expression, fixed: str, random: Random, *, check: bool) -> Design:
    """Step 2: the design of the formulas on ``expr.obs``; with ``check``, a random
    component that the fixed effects absorb is refused from the cell metadata alone
    (:mod:`flashmm_dask.design.check`), before the expression is read."""
    design = build_design(expr.obs, fixed, random)
    if check:
        check_design_replication(design, expr.obs)
    return design


def with_pcs(
    expr: Expression, design: Design, k: int, transform: str, fixed: str, random: Random
) -> tuple[Expression, Design]:
    """Step 3: the data and design with the top ``k`` principal components as covariates
    (``expr`` and ``design`` themselves when ``k`` is 0)."""
    expr, fixed_with_pcs = add_pcs(expr, k, transform, fixed)
    if fixed_with_pcs == fixed:
        return expr, design
    return expr, build_design(expr.obs, fixed_with_pcs, random)


def add_pcs(expr: Expression, k: int, transform: str, fixed: str) -> tuple[Expression, str]:
    """Add the top-k principal components of the transformed expression as covariates.

    The components come from ``dask_ml.decomposition.PCA`` over the chunked data
    (each chunk densified on its own, never the whole matrix). They are added to obs as
    ``PC1..PCk`` and to the fixed formula.
    """
    # dask_ml brings scikit-learn: imported only by the runs that ask for components
    from dask_ml.decomposition import PCA

    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
        raise InputError(f"pcs must be a non-negative integer; got {k!r}")
    if k == 0:
        return expr, fixed
    if k >= min(expr.n_cells, expr.n_features):
        raise InputError(
            f"pcs = {k} must be below the number of cells ({expr.n_cells}) and of "
            f"features ({expr.n_features})"
        )
    if expr.obs is None:
        raise InputError("pcs needs cell metadata (obs) to add the components to")
    data = expr.data.rechunk({1: -1})

    def dense_block(block: Any) -> np.ndarray:
        out = transform_block(block, transform)
        return out.toarray() if hasattr(out, "toarray") else out

    dense = data.map_blocks(dense_block, dtype=np.float64, meta=np.empty((0, 0)))
    scores = PCA(
        n_components=k, svd_solver="randomized", iterated_power=7, random_state=0
    ).fit_transform(dense)
    scores = np.asarray(da.compute(scores)[0])
    obs = expr.obs.copy()
    names = [f"PC{i + 1}" for i in range(k)]
    clash = [c for c in names if c in obs.columns]
    if clash:
        raise InputError(f"obs already has columns {clash}; rename them to use pcs")
    for i, name in enumerate(names):
        obs[name] = scores[:, i]
    return (
        Expression(data=expr.data, features=expr.features, obs=obs, source=expr.source),
        fixed + " + " + " + ".join(names),
    )
