"""Results of one or many strata, from a fit or a store, and their sorted per-term tables.

Everything a user may hold after a fit is turned into a list of ``(stratum, Dataset)``
pairs in the results store layout (:mod:`flashmm_dask.io.results`) by
:func:`result_sets`: an :class:`~flashmm_dask.LmmFit` (stratum None), a mapping level ->
LmmFit (what ``flashmm(..., by=...)`` returns), an ``xarray.Dataset`` or a mapping of them,
or the path of a results store (stratified or not, read by
:func:`flashmm_dask.io.strata_results.iter_strata`). The AnnData export, the top tables and the
run report read only these pairs.

A *term* is a coefficient or a contrast; a name that is both is taken as the contrast (as
in the plots). :func:`top_table` is one term's rows of the tidy results table (feature,
coef, se, t, df, p, padj and status), sorted by p (ties by |t|, largest first; NaN last).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from flashmm_dask.errors import InputError
from flashmm_dask.io.tables import write_frame_csv
from flashmm_dask.io.writing import package_versions, write_file
from flashmm_dask.model.fit import LmmFit
from flashmm_dask.numerics.inference import p_adjust

if TYPE_CHECKING:
    import pandas as pd
    import xarray as xr

    #: Results in any form :func:`result_sets` takes.
    Results: TypeAlias = (
        LmmFit
        | Mapping[str, LmmFit]
        | xr.Dataset
        | Mapping[str, xr.Dataset]
        | str
        | os.PathLike[str]
    )

logger = logging.getLogger(__name__)

#: Sub-folder of a run's output that receives the top tables.
TOP_DIR = "top"
#: Columns of a top table (and ``stratum`` first when it spans strata).
TOP_COLUMNS = ("feature", "coef", "se", "t", "df", "p", "padj", "status")
_STATS = ("coef", "se", "t", "df", "p", "padj")

ResultSets = list[tuple[str | None, "xr.Dataset"]]


# -- a fit as a results Dataset ----------------------------------------------------------


def fit_dataset(
    fit: LmmFit,
    contrasts: Mapping[str, str] | Sequence[str] | str | None = None,
    *,
    alternative: str = "two.sided",
    method: str = "BH",
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """An :class:`LmmFit` as a Dataset in the results store layout.

    Parameters
    ----------
    fit : LmmFit
    contrasts : contrast expressions over the fit's coefficients (as
        :func:`flashmm_dask.contrast_matrix` takes them), optional; tested with
        :func:`flashmm_dask.model.lmmtest` and the fit's df method (needs ``fit.cov``)
    alternative : alternative of the contrast tests (the coefficients' p are the fit's)
    method : multiple-testing adjustment of ``padj``, "BH" or "BY", within each term
    attrs : extra attributes (e.g. ``fixed``, ``random``, ``transform``)

    Returns
    -------
    xarray.Dataset
        ``coef``, ``se``, ``t``, ``df``, ``p``, ``padj`` (feature, covariate); ``niter``,
        ``converged``, ``status`` (feature,); ``contrast_*`` (feature, contrast) when
        contrasts are given; attributes method, df_method, n_cells, epsilon, alternative,
        p_adjust and ``contrasts`` (name -> expression).
    """
    import xarray as xr

    from flashmm_dask.design.contrasts import contrast_matrix
    from flashmm_dask.io.results import finite_features, fit_arrays, status_codes
    from flashmm_dask.model.lmmtest import lmmtest

    if not isinstance(fit, LmmFit):
        raise InputError(f"expected an LmmFit; got {type(fit).__name__}")
    arrays = fit_arrays(fit)
    fc = ("feature", "covariate")
    data: dict[str, Any] = {name: (fc, arrays[name]) for name in ("coef", "se", "t", "df", "p")}
    data["padj"] = (fc, p_adjust(arrays["p"], method, axis=0))
    data["niter"] = ("feature", arrays["niter"])
    data["converged"] = ("feature", arrays["converged"])
    # the fit's own status (from the fitting core: constant and boundary features
    # included); derived from its arrays only for a fit made without one
    status = fit.status
    if status is None:
        status = status_codes(arrays["niter"], arrays["converged"], finite_features(arrays))
    data["status"] = ("feature", status)
    coords: dict[str, Any] = {
        "feature": list(fit.features),
        "covariate": list(fit.covariates),
    }
    info: dict[str, Any] = {
        "method": fit.method,
        "df_method": fit.df_method,
        "n_cells": int(fit.n),
        "epsilon": float(fit.epsilon),
        "alternative": alternative,
        "p_adjust": method,
    }
    if contrasts is not None:
        L = contrast_matrix(contrasts, fit.covariates)
        names = [str(c) for c in L.columns]
        tests = lmmtest(fit, contrast=L, alternative=alternative)
        assert fit.cov is not None  # lmmtest refuses a fit without covariances
        Lm = L.to_numpy()
        with np.errstate(invalid="ignore"):
            se = np.sqrt(np.einsum("pc,mpk,kc->mc", Lm, fit.cov, Lm))
        p = tests[[f"{c}_p" for c in names]].to_numpy()
        if fit.df_method == "satterthwaite":
            df = tests[[f"{c}_df" for c in names]].to_numpy()
        else:
            df = np.full(p.shape, float(fit.n - len(fit.covariates)))
        fn = ("feature", "contrast")
        coords["contrast"] = names
        data.update(
            contrast_coef=(fn, tests[[f"{c}_coef" for c in names]].to_numpy()),
            contrast_se=(fn, se),
            contrast_t=(fn, tests[[f"{c}_t" for c in names]].to_numpy()),
            contrast_df=(fn, df),
            contrast_p=(fn, p),
            contrast_padj=(fn, p_adjust(p, method, axis=0)),
        )
        if isinstance(contrasts, str):
            info["contrasts"] = {contrasts: contrasts}
        elif isinstance(contrasts, Mapping):
            info["contrasts"] = {str(k): str(v) for k, v in contrasts.items()}
        else:
            info["contrasts"] = {str(c): str(c) for c in contrasts}
    return xr.Dataset(data, coords=coords, attrs={**info, **dict(attrs or {})})


# -- anything -> (stratum, Dataset) pairs ------------------------------------------------


def _as_dataset(value: Any, contrasts: Any, where: str) -> xr.Dataset:
    if isinstance(value, LmmFit):
        return fit_dataset(value, contrasts)
    if hasattr(value, "data_vars") and hasattr(value, "sizes"):
        if contrasts is not None:
            raise InputError(
                f"contrasts= applies to fits; {where} is a Dataset of results, which keeps "
                "its own contrasts (test new ones with flashmm-dask test)"
            )
        return value
    raise InputError(f"{where} must be an LmmFit or a results Dataset; got {type(value).__name__}")


def result_sets(
    results: Results,
    *,
    contrasts: Mapping[str, str] | Sequence[str] | str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ResultSets:
    """``(stratum, Dataset)`` pairs of results in any of the forms of the module docstring.

    Parameters
    ----------
    results : LmmFit, mapping level -> LmmFit, xarray.Dataset, mapping level -> Dataset,
        or the path (or URL) of a results store
    contrasts : contrasts to test on fits (see :func:`fit_dataset`)
    storage_options : fsspec options for a store URL

    Returns
    -------
    list of (str or None, xarray.Dataset)
        One pair with stratum None for unstratified results, else one per stratum in order.
    """
    if isinstance(results, (str, os.PathLike)):
        from flashmm_dask.io.strata_results import iter_strata

        if contrasts is not None:
            raise InputError(
                "contrasts= applies to fits; a results store keeps its own contrasts "
                "(test new ones with flashmm-dask test)"
            )
        return list(iter_strata(results, storage_options=storage_options))
    if isinstance(results, Mapping):
        if not results:
            raise InputError("no results: the mapping of strata is empty")
        tested = _per_stratum(results, contrasts)
        return [
            (str(level), _as_dataset(value, tested[level], f"stratum {level!r}"))
            for level, value in results.items()
        ]
    return [(None, _as_dataset(results, contrasts, "results"))]


def _per_stratum(results: Mapping[Any, Any], contrasts: Any) -> dict[Any, Any]:
    """The contrasts each stratum's fit is tested for: as a run tests them, those whose
    coefficients the stratum has (its cells may lack a level of a factor), the others
    named in a warning; a contrast that no stratum has raises the ContrastError of the
    first."""
    from flashmm_dask.errors import ContrastError
    from flashmm_dask.io.strata_results import applicable_contrasts

    fits = {level: v for level, v in results.items() if isinstance(v, LmmFit)}
    named = None if contrasts is None else _named(contrasts)
    if named is None or not fits or len(named) < len(contrasts):
        # nothing to split; or a repeated expression, which contrast_matrix refuses
        return {level: contrasts for level in results}
    out: dict[Any, Any] = {level: contrasts for level in results}
    reasons: dict[str, str] = {}  # the first stratum's, of each contrast it lacks
    for level, fit in fits.items():
        ok, missing = applicable_contrasts(named, list(fit.covariates))
        for name, reason in missing.items():
            reasons.setdefault(name, reason)
            logger.warning(
                "stratum %s lacks the coefficients of contrast %r: %s", level, name, reason
            )
        out[level] = ok or None
    lost = [name for name in named if not any(out[lv] and name in out[lv] for lv in fits)]
    if lost:
        raise ContrastError(reasons[lost[0]])
    return out


def _named(contrasts: Mapping[str, str] | Sequence[str] | str) -> dict[str, str]:
    """Contrasts as name -> expression (an expression alone names itself)."""
    if isinstance(contrasts, Mapping):
        return {str(k): str(v) for k, v in contrasts.items()}
    if isinstance(contrasts, str):
        return {contrasts: contrasts}
    return {str(c): str(c) for c in contrasts}


#: The variables the tables and the report read (not ``cov``).
TABLE_VARIABLES = frozenset(
    {*_STATS, *(f"contrast_{s}" for s in _STATS), "status", "niter", "converged"}
)


def loaded(sets: ResultSets) -> ResultSets:
    """The sets with the variables the tables read (:data:`TABLE_VARIABLES`) loaded into
    memory, so that the tables of many terms read the store once."""
    # read here, in threads: a round trip through a cluster per stratum costs more
    return [
        (level, ds[[v for v in ds.data_vars if v in TABLE_VARIABLES]].load(scheduler="threads"))
        for level, ds in sets
    ]


# -- the parameters of a run -------------------------------------------------------------


def _config(attrs: Mapping[str, Any], section: str) -> dict[str, Any]:
    config = attrs.get("config")
    value = config.get(section) if isinstance(config, Mapping) else None
    return dict(value) if isinstance(value, Mapping) else {}


def run_parameters(ds: xr.Dataset) -> dict[str, Any]:
    """The parameters of the run (or fit) behind a results Dataset, from its attributes.

    Returns
    -------
    dict
        Those known of: method, fixed, random, df (residual or satterthwaite), transform,
        target_sum, alternative, p_adjust, epsilon, n_cells, n_features, contrasts (name ->
        expression), data (path, layer), by (the strata column), versions, created. Values
        that are unknown are left out.
    """
    attrs = dict(ds.attrs)
    model, data = _config(attrs, "model"), _config(attrs, "data")
    test = _config(attrs, "test")
    out: dict[str, Any] = {
        "method": attrs.get("method", model.get("method")),
        "fixed": attrs.get("fixed", model.get("fixed")),
        "random": attrs.get("random", model.get("random")),
        "df": attrs.get("df_method", model.get("df")),
        "transform": attrs.get("transform", model.get("transform")),
        "target_sum": attrs.get("target_sum", model.get("target_sum")),
        "alternative": attrs.get("alternative", test.get("alternative")),
        "p_adjust": attrs.get("p_adjust", test.get("p_adjust")),
        "epsilon": attrs.get("epsilon", model.get("epsilon")),
        "by": attrs.get("by", model.get("by")),
        "n_cells": attrs.get("n_cells"),
        "n_features": int(ds.sizes["feature"]),
        "created": attrs.get("created"),
    }
    contrasts = attrs.get("contrasts", _config(attrs, "contrasts"))
    if contrasts:
        out["contrasts"] = {str(k): str(v) for k, v in dict(contrasts).items()}
    if data:
        out["data"] = {k: data[k] for k in ("path", "layer") if data.get(k) is not None}
    versions = attrs.get("versions")
    if not isinstance(versions, Mapping):
        versions = package_versions(("flashmm-dask", "numpy", "scipy"))
    out["versions"] = {str(k): str(v) for k, v in versions.items()}
    if isinstance(out["random"], str):
        out["random"] = [out["random"]]
    return {k: v for k, v in out.items() if v is not None and v != {}}


def effect_unit(transform: str | None, target_sum: float | None = None) -> str | None:
    """What an effect (a difference of the modelled values) is measured in, or None."""
    if transform == "log2p1":
        return "log2(1 + x)"
    if transform == "log1p_scaled":
        return f"ln(1 + {target_sum or 1e4:g} x / cell total)"
    if transform == "none":
        return "the data's units"
    return None


def effect_label(kind: str, attrs: Mapping[str, Any]) -> str:
    """The x-axis label of a term's effect: "contrast estimate: log2(1 + x) difference", ..."""
    model = _config(attrs, "model")
    unit = effect_unit(
        attrs.get("transform", model.get("transform")),
        attrs.get("target_sum", model.get("target_sum")),
    )
    what = "contrast estimate" if kind == "contrast" else "coefficient"
    if unit is None:
        return what
    if unit == "the data's units":
        return f"{what}: {'difference' if kind == 'contrast' else 'effect'} in the data's units"
    return f"{what}: {unit} difference" if kind == "contrast" else f"{what}: effect on {unit}"


# -- terms and top tables ----------------------------------------------------------------


def _names(ds: xr.Dataset, dim: str) -> list[str]:
    if dim not in ds.dims or dim not in ds.coords:
        return []
    values = np.asarray(ds[dim].values)
    if values.dtype.kind in "TU":  # NumPy strings (as the stores hold them): str already
        return list(values.tolist())
    return [x.decode() if isinstance(x, bytes) else str(x) for x in values]


def term_names(ds: xr.Dataset) -> tuple[list[str], list[str]]:
    """(coefficients, contrasts) of a results Dataset."""
    contrasts = _names(ds, "contrast") if "contrast_p" in ds else []
    return _names(ds, "covariate"), contrasts


def default_terms(ds: xr.Dataset) -> list[str]:
    """The contrasts, or every coefficient when there are none (as the plots choose)."""
    covariates, contrasts = term_names(ds)
    return contrasts or covariates


def has_term(ds: xr.Dataset, term: str) -> bool:
    covariates, contrasts = term_names(ds)
    return term in contrasts or term in covariates


def term_columns(ds: xr.Dataset, term: str) -> dict[str, np.ndarray]:
    """coef, se, t, df, p, padj of one term over all features (padj computed by BH when
    the Dataset has none)."""
    covariates, contrasts = term_names(ds)
    if term in contrasts:
        prefix, dim, index = "contrast_", "contrast", contrasts.index(term)
    elif term in covariates:
        prefix, dim, index = "", "covariate", covariates.index(term)
    else:
        raise InputError(
            f"unknown term {term!r}; contrasts: {', '.join(contrasts) or '(none)'}; "
            f"coefficients: {', '.join(covariates)}"
        )
    out = {}
    for name in _STATS:
        if prefix + name in ds:
            out[name] = np.asarray(ds[prefix + name].isel({dim: index}).values, dtype=np.float64)
    if "padj" not in out:
        out["padj"] = p_adjust(out["p"])
    if "df" not in out:
        out["df"] = np.full(out["p"].shape, np.nan)
    return out


def _status_labels(ds: xr.Dataset) -> np.ndarray | None:
    from flashmm_dask.model.status import status_names

    return status_names(ds["status"].values) if "status" in ds else None


def term_table(ds: xr.Dataset, term: str, n: int | None = None) -> pd.DataFrame:
    """One term's rows of a results Dataset, sorted by p (see :func:`top_table`)."""
    import pandas as pd

    columns = term_columns(ds, term)
    frame = pd.DataFrame(
        {
            "feature": np.asarray(_names(ds, "feature"), dtype=object),
            **{k: columns[k] for k in _STATS},
        }
    )
    status = _status_labels(ds)
    if status is not None:
        frame["status"] = status
    # by p, ties (p = 0 after underflow) by |t| largest first; NaN sort last
    order = np.lexsort((-np.abs(columns["t"]), columns["p"]))
    frame = frame.iloc[order].reset_index(drop=True)
    return frame if n is None else frame.head(n)


def _check_n(n: Any) -> int | None:
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"n must be a positive integer or None (all features); got {n!r}")
    return int(n)


def top_table(
    results: Results,
    term: str,
    n: int | None = None,
    *,
    stratum: str | None = None,
    contrasts: Mapping[str, str] | Sequence[str] | str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """A term's features sorted by p, like scanpy's ``rank_genes_groups_df``.

    Parameters
    ----------
    results : an LmmFit, a mapping level -> LmmFit, a results Dataset (or mapping), or a
        results store path (see :func:`result_sets`)
    term : a contrast or coefficient name
    n : keep the first n rows (per stratum); None keeps all features
    stratum : one stratum of stratified results; by default all strata, each sorted,
        one after another with a ``stratum`` column first (the strata lacking the term are
        left out)
    contrasts : contrasts to test on fits, so that ``term`` may name one
    storage_options : fsspec options for a store URL

    Returns
    -------
    pandas.DataFrame
        Columns feature, coef, se, t, df, p, padj and status (the store's status names;
        when the results have them), sorted by p (ties by |t|, largest first; NaN last).

    Raises
    ------
    InputError
        An unknown term or stratum (the error lists the valid ones).
    """
    import pandas as pd

    n = _check_n(n)
    sets = result_sets(results, contrasts=contrasts, storage_options=storage_options)
    stratified = sets[0][0] is not None
    if stratum is not None:
        levels = [s for s, _ in sets]
        if stratum not in levels:
            shown = ", ".join(map(str, levels)) if stratified else "(none: unstratified)"
            raise InputError(f"unknown stratum {stratum!r}; the strata are {shown}")
        sets = [pair for pair in sets if pair[0] == stratum]
    if not stratified or stratum is not None:
        return term_table(sets[0][1], term, n)
    frames = []
    lacking = []
    for level, ds in sets:
        if has_term(ds, term):
            frames.append(term_table(ds, term, n).assign(stratum=level))
        else:
            lacking.append(level)
    if not frames:
        term_table(sets[0][1], term, n)  # raises the unknown-term error with the valid names
    if lacking:
        logger.info("term %r is not in strata %s", term, ", ".join(map(str, lacking)))
    out = pd.concat(frames, ignore_index=True)
    return out[["stratum", *[c for c in out.columns if c != "stratum"]]]


def top_paths(sets: ResultSets, terms: Sequence[str] | None = None) -> list[tuple[Any, str, Path]]:
    """``(stratum, term, relative path)`` of the top tables of :func:`write_top_tables`.

    ``top/<term>.csv`` without strata, ``top/<stratum>/<term>.csv`` with them; both
    names as made file-safe by :func:`flashmm_dask.report.values.file_stems`.
    """
    from flashmm_dask.report.values import file_stems

    strata = file_stems([str(s) for s, _ in sets if s is not None])
    out = []
    for level, ds in sets:
        chosen = [t for t in terms if has_term(ds, t)] if terms is not None else default_terms(ds)
        stems = file_stems(chosen)
        folder = Path(TOP_DIR) if level is None else Path(TOP_DIR) / strata[str(level)]
        out += [(level, t, folder / f"{stems[t]}.csv") for t in chosen]
    return out


def write_top_tables(
    sets: ResultSets, outdir: str | os.PathLike[str], terms: Sequence[str] | None = None
) -> list[Path]:
    """Write the full top table (all features, sorted by p) of each term and stratum.

    Files are under ``outdir`` at :func:`top_paths`; each is written to a temporary name
    and renamed. Default terms: the contrasts, or the coefficients when there are none.

    Returns
    -------
    list of Path
        The files written.
    """
    by_level = dict(sets)
    return [
        path
        for level, items in top_items(sets, terms).items()
        for path in write_stratum_top(by_level[level], items, outdir)
    ]


def top_items(
    sets: ResultSets, terms: Sequence[str] | None = None
) -> dict[Any, list[tuple[str, Path]]]:
    """:func:`top_paths` by stratum: level -> its ``(term, relative path)``, in order."""
    out: dict[Any, list[tuple[str, Path]]] = {}
    for level, term, relative in top_paths(sets, terms):
        out.setdefault(level, []).append((term, relative))
    return out


def write_stratum_top(
    ds: xr.Dataset, items: Sequence[tuple[str, Path]], outdir: str | os.PathLike[str]
) -> list[Path]:
    """The top tables of one stratum's results ``ds`` (those of :func:`write_top_tables`):
    ``items`` are its ``(term, relative path)`` (:func:`top_items`). A run writes each
    stratum's on a worker (:func:`flashmm_dask.run.output.write_outputs`)."""
    return [
        write_file(Path(outdir) / relative, partial(write_frame_csv, term_table(ds, term)))
        for term, relative in items
    ]


__all__ = [
    "TABLE_VARIABLES",
    "TOP_COLUMNS",
    "TOP_DIR",
    "default_terms",
    "effect_label",
    "effect_unit",
    "fit_dataset",
    "loaded",
    "result_sets",
    "run_parameters",
    "term_columns",
    "term_names",
    "term_table",
    "top_items",
    "top_paths",
    "top_table",
    "write_stratum_top",
    "write_top_tables",
]
