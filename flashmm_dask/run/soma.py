"""The data of a run from a TileDB-SOMA experiment, with the config's filters pushed down.

:func:`read_for_run` is the run's side of :func:`flashmm_dask.io.soma.read_soma`: it checks
that SOMA-only keys meet a SOMA path (and that keys that do not apply to SOMA are unset),
then reads only the obs columns the formulas use and, where the transform allows, only the
selected features.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flashmm_dask.design.terms import parse_formula, required_columns
from flashmm_dask.errors import InputError
from flashmm_dask.io.readers import Expression
from flashmm_dask.io.soma import SOMA_PREFIX, is_soma, read_soma
from flashmm_dask.run.config import SOMA_KEYS, ModelConfig, RunConfig

__all__ = ["obs_columns", "read_for_run"]


def read_for_run(
    cfg: RunConfig, source: object, storage_options: Mapping[str, Any]
) -> Expression | None:
    """The run's data when ``source`` is a SOMA experiment, else None.

    Pushes down what the config allows: ``data.obs_filter`` and ``data.var_filter``; the
    obs columns the formulas (and ``model.by``) use, unless a generic cell selection
    (``data.cells``) needs them all; and ``data.features`` unless the cell totals of a
    scaled transform or the principal components of ``model.pcs`` need every feature (then
    they are subset after the reduction, as for AnnData stores).

    Raises
    ------
    InputError
        SOMA-only keys set for another kind of data, or keys that do not apply to SOMA.
    """
    data = cfg.data
    set_keys = [f"data.{k}" for k in SOMA_KEYS if getattr(data, k) is not None]
    if not is_soma(source):
        if set_keys:
            raise InputError(
                f"{', '.join(set_keys)} apply to TileDB-SOMA experiments only, but "
                f"data.path {source!r} is not one; remove them (or give a SOMA path: a folder "
                f"that is an experiment, *.soma or {SOMA_PREFIX}...)"
            )
        return None
    for key in ("obs", "orientation"):
        if getattr(data, key) is not None:
            raise InputError(
                f"data.{key} does not apply to a SOMA experiment (its cells are the rows of "
                "X and its metadata its obs); remove it"
            )
    scaled = cfg.model.transform in ("log1p_scaled", "log1p_cpm")
    if scaled and data.var_filter is not None:
        raise InputError(
            f"data.var_filter with transform {cfg.model.transform!r}: the cell totals need "
            "every feature; select features with data.features instead (subset after the "
            "reduction)"
        )
    features = data.features
    if isinstance(features, Mapping):
        column = features["var_column"]
        raise InputError(
            f"data.features {{var_column: {column}}} does not apply to a SOMA experiment; "
            f'select those features with data.var_filter: "{column} == True" (pushed down)'
        )
    return read_soma(
        source,
        measurement=data.measurement or "RNA",
        layer=data.layer,
        obs_filter=data.obs_filter,
        obs_columns=None if getattr(data, "cells", None) else obs_columns(cfg.model),
        var_filter=data.var_filter,
        features=None if scaled or cfg.model.pcs else features,
        var_column=data.var_column,
        chunk_cells=data.chunk_cells,
        storage_options=storage_options,
    )


def obs_columns(model: ModelConfig) -> list[str]:
    """The obs columns a model section uses: its formulas' variables and ``by``."""
    random = model.random
    formulas = [model.fixed, *([random] if isinstance(random, str) else random or ())]
    used: list[str] = []
    for formula in formulas:
        used += sorted(required_columns(parse_formula(formula, "formula")))
    by = getattr(model, "by", None)
    return list(dict.fromkeys([*used, *([by] if isinstance(by, str) else [])]))
