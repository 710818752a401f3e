"""New contrasts on a finished results store, without rereading the data.

The store keeps every feature's coefficients and their covariance matrices (``cov``), so
any contrast L of the coefficients is tested from them alone: effect = L'b,
se = sqrt(diag(L' cov L)), t = effect / se
(:func:`~flashmm_dask.numerics.inference.contrast_test`, as the workers of a run test theirs).

Degrees of freedom: a store fitted with the residual df (n - p) gives them to every
contrast. Satterthwaite's df of a new contrast need, per feature, the inverse observed
information of theta and the derivatives of ``cov`` in theta, which the store does not
keep; they are recomputed by fitting the features again from the run's summary statistics
(``OUTPUT/stats.zarr``, saved by default: ``stats.save``; or ``stats.load``), with the
run's model settings, in blocks of features. That refit repeats the run's fit exactly: it
must reproduce the stored coefficients and their df, or the statistics are refused as not
the run's. The result equals a run with the contrasts in its config.
"""

from __future__ import annotations

import inspect
import logging
import os
import posixpath
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from flashmm_dask.design.contrasts import contrast_matrix
from flashmm_dask.errors import InputError, StoreError
from flashmm_dask.io.results import open_results, read_store_attrs
from flashmm_dask.io.strata_results import applicable_contrasts, strata_attrs, stratum_paths
from flashmm_dask.model.fit import LmmFit
from flashmm_dask.model.lmm import lmm, lmm_summary
from flashmm_dask.model.lmmtest import check_alternative, satterthwaite_inputs
from flashmm_dask.model.status import status_names
from flashmm_dask.numerics.inference import contrast_test, p_adjust
from flashmm_dask.numerics.satterthwaite import satterthwaite_df
from flashmm_dask.stats.summary import SummaryStats

#: Values per block of the Satterthwaite refit's per-feature arrays (jac_cov, cov...).
REFIT_BLOCK_VALUES = 2**24
#: Relative agreement the refit must reach with the stored coefficients and df.
REPRODUCE_RTOL = 1e-6
STATS = "stats.zarr"

logger = logging.getLogger(__name__)


def retest(
    store: str,
    contrasts: Mapping[str, str],
    *,
    alternative: str = "two.sided",
    stats: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Test contrasts on a finished results store.

    Parameters
    ----------
    store : path or URL of a results store (``OUTPUT/results.zarr``)
    contrasts : name -> expression over the coefficient names
    alternative : "two.sided", "less" or "greater"
    stats : summary statistics of the run, needed for a store fitted with Satterthwaite's
        df; default the run's ``stats.load``, else ``stats.zarr`` next to the store
    storage_options : fsspec options for URLs

    Returns
    -------
    DataFrame, one row per feature and contrast: feature, term, coef, se, t, df, p, padj
    (within a contrast, by the run's ``test.p_adjust``, as the run's own tables),
    converged, niter and status (the columns of the run's ``results.csv``).
    """
    check_alternative(alternative)
    if not contrasts:
        raise InputError("no contrast given; pass name=expression, e.g. 'B-A=trtB - trtA'")
    ds = open_results(store, storage_options=storage_options)
    if "cov" not in ds:
        raise InputError(
            f"{store} holds no coefficient covariances (fit.store_cov was false); "
            "refit with fit.store_cov: true to test new contrasts"
        )
    covariates = [str(c) for c in ds["covariate"].values]
    L = contrast_matrix(dict(contrasts), covariates)
    Lm = L.to_numpy()
    coef = ds["coef"].values
    cov = ds["cov"].values
    config = ds.attrs.get("config", {})
    df_method = config.get("model", {}).get("df", "residual")
    if df_method == "residual":
        df = np.repeat(ds["df"].values[:, :1], Lm.shape[1], axis=1)
    elif df_method == "satterthwaite":
        path = stats if stats is not None else run_stats(store, config)
        df = satterthwaite_contrast_df(ds, Lm, path, storage_options=storage_options)
    else:
        raise InputError(f"{store} was fitted with unknown degrees of freedom {df_method!r}")
    test = contrast_test(coef, cov, Lm, df, alternative)
    padj = p_adjust(test.p, adjustment(ds), axis=0)
    features = [str(f) for f in ds["feature"].values]
    status = status_names(ds["status"].values) if "status" in ds else None
    frames = []
    for j, name in enumerate(L.columns):
        frames.append(
            pd.DataFrame(
                {
                    "feature": features,
                    "term": name,
                    "coef": test.effect[:, j],
                    "se": test.se[:, j],
                    "t": test.t[:, j],
                    "df": test.df[:, j],
                    "p": test.p[:, j],
                    "padj": padj[:, j],
                    "converged": ds["converged"].values,
                    "niter": ds["niter"].values,
                    **({} if status is None else {"status": status}),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def adjustment(ds: xr.Dataset) -> str:
    """The multiple-testing adjustment of a store's run: the one its ``padj`` were
    adjusted by (the ``p_adjust`` attribute finalize writes), else its config's
    ``test.p_adjust``, else Benjamini-Hochberg (stores from before either)."""
    method = ds.attrs.get("p_adjust") or ds.attrs.get("config", {}).get("test", {}).get("p_adjust")
    return str(method) if method else "BH"


def run_stats(store: str, config: Mapping[str, Any]) -> str:
    """Where the run's summary statistics are: its ``stats.load``, else next to the store."""
    loaded = config.get("stats", {}).get("load")
    if loaded:
        return str(loaded)
    text = str(store).rstrip("/")
    if "://" in text:
        return posixpath.join(posixpath.dirname(text), STATS)
    return str(Path(text).parent / STATS)


def _lmm_options(ds: xr.Dataset) -> dict[str, Any]:
    """The run's fit settings that :func:`flashmm_dask.model.lmm` takes (method, max_iter...)."""
    model = dict(ds.attrs.get("config", {}).get("model", {}))
    model.setdefault("method", ds.attrs.get("method", "REML"))
    accepted = set(inspect.signature(lmm).parameters) - {"df", "theta0"}
    return {k: v for k, v in model.items() if k in accepted}


def satterthwaite_contrast_df(
    ds: xr.Dataset, L: np.ndarray, stats: str, *, storage_options: Mapping[str, Any] | None = None
) -> np.ndarray:
    """Satterthwaite's df of contrasts L for every feature of an opened results store.

    The features are fitted again from the run's summary statistics with the run's
    settings, block by block, and the df of L'b computed at each fit
    (:func:`~flashmm_dask.numerics.satterthwaite.satterthwaite_df`).

    Parameters
    ----------
    ds : the opened results store (xarray.Dataset)
    L : (p, c) contrast matrix
    stats : path or URL of the run's summary statistics

    Returns
    -------
    (m, c) array

    Raises
    ------
    InputError
        No statistics at ``stats``.
    StoreError
        Statistics that are not the run's: other features or covariates, or a refit that
        does not reproduce the stored coefficients and df.
    """
    try:
        summary = SummaryStats.load(stats, storage_options=storage_options)
    except StoreError as exc:
        raise InputError(
            f"the store was fitted with Satterthwaite's df, and new contrasts need the run's "
            f"summary statistics to compute theirs, but none are readable at {stats} ({exc}); "
            "pass them with --stats PATH (flashmm-dask stats writes them; runs keep them in "
            "OUTPUT/stats.zarr with stats.save: true), or add the contrasts to the config "
            "and rerun"
        ) from None
    features = [str(f) for f in ds["feature"].values]
    covariates = [str(c) for c in ds["covariate"].values]
    if list(summary.covariates) != covariates or not set(features) <= set(summary.features):
        raise StoreError(
            f"the summary statistics in {stats} are not this run's: their covariates or "
            "features differ from the results store's; pass the run's statistics with --stats"
        )
    summary = summary.subset(features)
    options = _lmm_options(ds)
    p, K = summary.p, len(summary.d)
    block = max(16, REFIT_BLOCK_VALUES // ((K + 2) * p * p + K * K + summary.q))
    coef_stored, df_stored = ds["coef"].values, ds["df"].values
    out = np.empty((len(features), L.shape[1]))
    for start in range(0, len(features), block):
        rows = slice(start, start + block)
        fit = lmm_summary(
            summary.subset(np.arange(len(features))[rows]),
            df="satterthwaite",
            output_cov=True,
            warn_zero=False,
            **options,
        )
        _check_reproduced(fit, coef_stored[rows], df_stored[rows], stats)
        assert fit.cov is not None
        vcov_theta, jac_cov = satterthwaite_inputs(fit)
        out[rows] = satterthwaite_df(fit.cov, jac_cov, vcov_theta, L)
        out[rows][np.isnan(coef_stored[rows]).any(axis=1)] = np.nan
    return out


def _check_reproduced(fit: LmmFit, coef: np.ndarray, df: np.ndarray, stats: str) -> None:
    """Refuse statistics whose refit differs from the stored coefficients or df."""
    tol = REPRODUCE_RTOL * (np.abs(coef) + fit.se.T)
    # a feature the run left unfitted (NaN: all zero, or filtered by model.min_cells) or
    # untested (no se: constant, explained exactly by the fixed effects, whose
    # coefficients' rounding errors have no scale to compare at) is not compared; its
    # contrasts' df are NaN
    skip = np.isnan(coef) | np.isnan(fit.se.T)
    with np.errstate(invalid="ignore"):
        bad = ~((np.abs(fit.coef.T - coef) <= tol) | skip)
        bad |= ~((np.abs(fit.df_array().T - df) <= REPRODUCE_RTOL * np.abs(df)) | skip)
    if bad.any():
        j = int(np.flatnonzero(bad.any(axis=1))[0])
        raise StoreError(
            f"the summary statistics in {stats} do not reproduce the results store (feature "
            f"{fit.features[j]!r} differs): they are not this run's; pass the run's "
            "statistics with --stats"
        )


def retest_strata(
    path: str | os.PathLike[str], contrasts: Mapping[str, str], *, alternative: str = "two.sided"
) -> pd.DataFrame:
    """New contrasts on every stratum of a stratified store where their coefficients
    exist; a ``stratum`` column first. Strata lacking a contrast's coefficients are
    logged (warning) and have no rows for it.

    Raises
    ------
    InputError
        No stratum has the coefficients of any of the contrasts.
    """
    strata = strata_attrs(path) or {}
    stats_root = Path(run_stats(str(path), read_store_attrs(str(path)).get("config", {})))
    parts = []
    for level, p in stratum_paths(path).items():
        # the stratum's statistics (for Satterthwaite's df): the same group in stats.zarr
        stats = str(stats_root / str(strata["groups"][level]))
        covariates = [str(c) for c in open_results(str(p))["covariate"].values]
        ok, missing = applicable_contrasts(contrasts, covariates)
        for name in missing:
            logger.warning("stratum %s lacks the coefficients of contrast %r", level, name)
        if ok:
            table = retest(str(p), ok, alternative=alternative, stats=stats)
            table.insert(0, "stratum", level)
            parts.append(table)
    if not parts:
        raise InputError(
            f"no stratum of {path} has the coefficients of the contrasts "
            f"{', '.join(map(repr, contrasts))}; check the names (strata have the "
            "coefficients of the formula applied to their own cells)"
        )
    return pd.concat(parts, ignore_index=True)
