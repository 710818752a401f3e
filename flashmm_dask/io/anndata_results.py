"""Results into an AnnData, where scverse users look for them.

For each stratum (or once, without strata) and each statistic s of coef, se, t, df, p
and padj, ``adata.varm[f"{prefix}_{s}"]`` is a DataFrame with one row per ``var_names``
entry and one column per term (the coefficients, then the contrasts), e.g.
``adata.varm["flashmm_padj"]["trt_in_cls1"]``. The prefix is ``key`` (default
``"flashmm"``) without strata and ``f"{key}_{level}"`` with them (``/`` in a level is
written ``_``, as h5ad and zarr keys cannot hold it). Features of ``adata`` that the
results do not cover get NaN.

``adata.uns[key]`` holds the run's parameters (method, formulas, df, transform,
alternative, p_adjust, contrasts, versions, ...; see
:func:`flashmm_dask.io.resultsets.run_parameters`), the terms, the varm keys written and,
with strata, ``strata``: level -> {varm_prefix, n_cells, n_features, terms}. Everything in it
is a string, a number, a list of strings or a dict of those, so the AnnData writes to
.h5ad and .zarr as it is.

Features are matched by name. The results' features must all be in ``adata.var_names``
(otherwise the results were fitted on other data, or with other feature names: gene ids
against symbols); names that repeat can only be matched when the order is the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from flashmm_dask.errors import InputError
from flashmm_dask.io.resultsets import result_sets, run_parameters, term_columns, term_names

if TYPE_CHECKING:
    import anndata as ad

    from flashmm_dask.io.resultsets import Results

#: The statistics written per term into ``varm``.
VARM_STATS = ("coef", "se", "t", "df", "p", "padj")


def _shown(names: Sequence[str], k: int = 5) -> str:
    out = ", ".join(repr(str(x)) for x in names[:k])
    return out + (f" and {len(names) - k} more" if len(names) > k else "")


def _duplicates(names: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    dupes: dict[str, None] = {}
    for name in names:
        if name in seen:
            dupes[name] = None
        seen.add(name)
    return list(dupes)


def feature_rows(var_names: Sequence[str], features: Sequence[str], where: str = "") -> np.ndarray:
    """The row of ``var_names`` of each result feature (matched by name).

    Raises
    ------
    InputError
        A feature is not in ``var_names``, or names repeat and the orders differ.
    """
    names = [str(v) for v in var_names]
    feats = [str(f) for f in features]
    if names == feats:
        return np.arange(len(names))
    for side, values, fix in (
        ("adata.var_names", names, "adata.var_names_make_unique()"),
        (f"the results' features{where}", feats, "fit unique feature names"),
    ):
        if dupes := _duplicates(values):
            raise InputError(
                f"{side} repeat {len(dupes)} name(s) ({_shown(dupes)}) and the order of the "
                f"two differs, so results cannot be matched to features by name; "
                f"use {fix}, or give the AnnData the results were fitted on"
            )
    # names are unique here (repeats were refused above): one hash lookup per feature
    rows = pd.Index(names).get_indexer(pd.Index(feats))
    if (rows < 0).any():
        missing = [f for f, row in zip(feats, rows, strict=True) if row < 0]
        raise InputError(
            f"{len(missing)} of the {len(feats)} features of the results{where} are not in "
            f"adata.var_names: {_shown(missing)}; adata.var_names are e.g. "
            f"{_shown(names, 3)}. Give the AnnData the results were fitted on (the same "
            "feature names, e.g. gene ids rather than symbols)"
        )
    return rows.astype(np.int64)


def _uns_safe(value: Any) -> Any:
    """``value`` in types that .h5ad and .zarr hold: no None, no mixed lists."""
    if isinstance(value, Mapping):
        return {str(k): _uns_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        items = [_uns_safe(v) for v in value if v is not None]
        if all(isinstance(v, str) for v in items):
            return items
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            return items
        return [str(v) for v in items]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _safe(level: Any) -> str:
    """A stratum's level as a key of varm and uns: '/' (a path separator in .h5ad and
    .zarr) becomes '_'."""
    return str(level).replace("/", "_")


def _prefix(key: str, level: str | None) -> str:
    return key if level is None else f"{key}_{_safe(level)}"


def write_results(
    adata: ad.AnnData,
    results: Results,
    *,
    key: str = "flashmm",
    contrasts: Mapping[str, str] | Sequence[str] | str | None = None,
    params: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Write results into ``adata.varm`` and ``adata.uns[key]`` (in place).

    Parameters
    ----------
    adata : anndata.AnnData
        The data the results were fitted on (or any AnnData whose ``var_names`` include
        the results' features).
    results : LmmFit, mapping level -> LmmFit (``flashmm(..., by=...)``), a results
        Dataset, or the path of a results store (e.g. ``OUTPUT/results.zarr``)
    key : prefix of the varm keys and the uns key
    contrasts : contrasts to test on fits and write next to the coefficients
    params : more parameters for ``uns[key]`` (e.g. the formulas of a fit:
        ``{"fixed": "~ 0 + cls + cls:trt", "random": "~ 0 + sam", "transform": "log2p1"}``)
    storage_options : fsspec options for a store URL

    Raises
    ------
    InputError
        ``adata`` is not an AnnData, or the features do not match its ``var_names``.
    """
    if not hasattr(adata, "varm") or not hasattr(adata, "var_names") or not hasattr(adata, "uns"):
        raise InputError(f"adata must be an AnnData; got {type(adata).__name__}")
    if not isinstance(key, str) or not key:
        raise InputError(f"key must be a non-empty string; got {key!r}")
    sets = result_sets(results, contrasts=contrasts, storage_options=storage_options)
    var_names = [str(v) for v in adata.var_names]
    planned: dict[str, pd.DataFrame] = {}
    strata: dict[str, Any] = {}
    for level, ds in sets:
        where = "" if level is None else f" of stratum {level!r}"
        features = [str(f) for f in ds["feature"].values]
        rows = feature_rows(var_names, features, where)
        covariates, contrast_names = term_names(ds)
        terms = [*[c for c in covariates if c not in contrast_names], *contrast_names]
        columns = {term: term_columns(ds, term) for term in terms}
        prefix = _prefix(key, level)
        for stat in VARM_STATS:
            values = np.full((len(var_names), len(terms)), np.nan)
            for j, term in enumerate(terms):
                values[rows, j] = columns[term][stat]
            planned[f"{prefix}_{stat}"] = pd.DataFrame(
                values, index=pd.Index(var_names), columns=terms
            )
        if level is not None:
            if _safe(level) in strata:
                raise InputError(
                    f"strata {strata[_safe(level)]['level']!r} and {str(level)!r} both have "
                    f"the key {_safe(level)!r} in varm and uns ('/' becomes '_'); rename one "
                    "of the levels"
                )
            strata[_safe(level)] = {
                "level": str(level),
                "varm_prefix": prefix,
                "n_cells": ds.attrs.get("n_cells"),
                "n_features": len(features),
                "terms": terms,
            }
    first = sets[0][1]
    info = run_parameters(first)
    if strata:
        info.pop("n_cells", None)
        info.pop("n_features", None)
        info["strata"] = strata
    else:
        info["varm_prefix"] = key
        info["terms"] = [*planned[f"{key}_coef"].columns]
    info["varm_keys"] = list(planned)
    info.update(dict(params or {}))
    # everything is checked and computed: now write
    for name, frame in planned.items():
        frame.index = adata.var_names
        adata.varm[name] = frame
    adata.uns[key] = _uns_safe(info)


__all__ = ["VARM_STATS", "feature_rows", "write_results"]
