"""Tests of the variance components and likelihood-ratio tests of nested fixed effects.

Everything is computed from the summary statistics (XX, XY, ZX, ZY, ZZ, Ynorm, n): a
reduced model is fitted on the same statistics with some columns removed, and the fits
compare through the R package's log-likelihood (see :mod:`flashmm_dask.numerics.loglik`).

:func:`vctest`, for each random component k of a fit:

- the z-test of the FLASH-MM paper: z = theta_k / se_theta_k (se from the expected
  information, as the R package reports it), one-sided p = P(N(0, 1) >= z) for a
  variance > 0;
- the likelihood-ratio test against the model without component k: the columns of k are
  removed from ZX, ZY and ZZ and the reduced model is fitted by the same method (REML by
  default, as lme4's ``anova(full, reduced, refit = FALSE)``; with no random component
  left it is ordinary least squares). T = 2 (logLik_full - logLik_reduced) and the p-value
  comes from the 50:50 mixture of chi2_0 and chi2_1 (the null value lies on the boundary).
  FLASH-MM does not constrain variances to be >= 0; a component estimated <= 0 has T = 0
  and p = 1, the value under the constraint theta_k >= 0.

:func:`lrt_fixed`: ML fits of the full model and of the model without some fixed-effect
columns (e.g. every treatment term, "is there a treatment effect in any cell type"),
T = 2 (logLik_full - logLik_reduced) ~ chi2 with df = the number of columns dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from flashmm_dask.errors import InputError
from flashmm_dask.model.fit import LmmFit
from flashmm_dask.model.lmm import lmm_summary
from flashmm_dask.numerics import inference
from flashmm_dask.numerics.inference import P_ADJUST_METHODS
from flashmm_dask.numerics.loglik import (
    boundary_chi2_pvalue,
    chi2_pvalue,
    lr_statistic,
    ols_loglik,
    z_pvalue,
)
from flashmm_dask.stats.summary import SummaryStats

logger = logging.getLogger(__name__)


def _fit(stats: SummaryStats, method: str, **kwargs: Any) -> LmmFit:
    """:func:`~flashmm_dask.model.lmm.lmm` of statistics, keeping their names (no covariances)."""
    kwargs.setdefault("warn_zero", False)
    return lmm_summary(stats, method=method, output_cov=False, **kwargs)


def _without_component(stats: SummaryStats, k: int) -> SummaryStats | None:
    """The statistics without random component k; None when no component is left (the
    reduced model is then ordinary least squares)."""
    if len(stats.d) == 1:
        return None
    edges = np.concatenate([[0], np.cumsum(stats.d)])
    keep = np.r_[0 : edges[k], edges[k + 1] : edges[-1]]
    return replace(
        stats,
        ZX=stats.ZX[keep],
        ZY=stats.ZY[keep],
        ZZ=stats.ZZ[np.ix_(keep, keep)],
        random=tuple(stats.random[j] for j in keep),
        d=stats.d[:k] + stats.d[k + 1 :],
        components=stats.components[:k] + stats.components[k + 1 :],
    )


def _without_covariates(stats: SummaryStats, drop: Sequence[str]) -> SummaryStats:
    keep = [j for j, c in enumerate(stats.covariates) if c not in set(drop)]
    return replace(
        stats,
        XX=stats.XX[np.ix_(keep, keep)],
        XY=stats.XY[keep],
        ZX=stats.ZX[:, keep],
        covariates=tuple(stats.covariates[j] for j in keep),
    )


def _as_stats(data: LmmFit | SummaryStats, what: str) -> SummaryStats:
    if isinstance(data, SummaryStats):
        return data
    if isinstance(data, LmmFit):
        ss = data.summary_data
        if ss is None:
            raise InputError(
                f"{what} refits reduced models from the summary statistics, and this fit "
                "did not keep them: refit with lmm(..., output_ss=True), or pass the "
                "SummaryStats"
            )
        return SummaryStats(
            **{name: ss[name] for name in ("XX", "XY", "ZX", "ZY", "ZZ", "Ynorm", "n", "d")},
            covariates=data.covariates,
            random=data.random,
            components=data.components[:-1],
            features=data.features,
        )
    raise InputError(f"{what} needs an LmmFit or a SummaryStats; got {type(data).__name__}")


def _check_p_adjust(method: str | None) -> None:
    if method is not None and method not in P_ADJUST_METHODS:
        raise InputError(
            f"unknown p_adjust {method!r}; use {' or '.join(map(repr, P_ADJUST_METHODS))} "
            "(or None for no adjustment)"
        )


def _component_positions(
    components: str | Sequence[str] | None, names: tuple[str, ...]
) -> list[int]:
    if components is None:
        return list(range(len(names)))
    items = [components] if isinstance(components, str) else list(components)
    unknown = [c for c in items if c not in names]
    if unknown or not items:
        raise InputError(
            f"unknown random components {unknown or items}; the fit has {', '.join(names)}"
        )
    return [names.index(c) for c in items]


def vctest(
    data: LmmFit | SummaryStats,
    components: str | Sequence[str] | None = None,
    *,
    lrt: bool = True,
    p_adjust: str | None = "BH",
    **fit_kwargs: Any,
) -> pd.DataFrame:
    """Test whether each random-effect variance is zero, per feature.

    Parameters
    ----------
    data : LmmFit or SummaryStats
        A fit (with ``output_ss=True`` for the likelihood-ratio test), or the statistics,
        which are then fitted (REML unless ``method="ML"`` is given).
    components : name or names of random components, optional
        Default all (the fit's ``components`` without "residual").
    lrt : bool
        Also run the likelihood-ratio tests (one reduced fit per component).
    p_adjust : {"BH", "BY"} or None
        Add Benjamini-Hochberg (or -Yekutieli) adjusted p-values over the features.
    **fit_kwargs
        Passed to :func:`flashmm_dask.model.lmm` for the fits made here (method, max_iter,
        epsilon, n_threads). The reduced fits use the full fit's method and epsilon.

    Returns
    -------
    DataFrame, one row per feature: ``logLik`` of the full fit, ``converged`` (the full
    and every reduced fit), and for each component c: ``c_theta``, ``c_se``, ``c_z``,
    ``c_z_p`` (one-sided), and with ``lrt``: ``c_logLik_reduced``, ``c_lrt`` (the
    statistic), ``c_lrt_p`` (50:50 mixture of chi2_0 and chi2_1); ``c_z_padj`` and
    ``c_lrt_padj`` with ``p_adjust``.
    """
    _check_p_adjust(p_adjust)
    stats: SummaryStats | None = None
    if isinstance(data, LmmFit):
        full = data
        if lrt:
            stats = _as_stats(data, "vctest")
        fit_kwargs.setdefault("epsilon", full.epsilon)
        if fit_kwargs.pop("method", full.method).upper() != full.method:
            raise InputError(f"the fit is {full.method}; the reduced fits must use the same method")
    else:
        stats = _as_stats(data, "vctest")
        full = _fit(stats, fit_kwargs.pop("method", "REML"), **fit_kwargs)
        fit_kwargs.setdefault("epsilon", full.epsilon)
    names = full.components[:-1]
    positions = _component_positions(components, names)
    out: dict[str, np.ndarray] = {"logLik": full.logLik}
    converged = np.asarray(full.converged, dtype=bool).copy()
    for k in positions:
        c = names[k]
        z, zp = z_pvalue(full.theta[k], full.se_theta[k])
        out |= {f"{c}_theta": full.theta[k], f"{c}_se": full.se_theta[k], f"{c}_z": z}
        out[f"{c}_z_p"] = zp
        if p_adjust is not None:
            out[f"{c}_z_padj"] = inference.p_adjust(zp, p_adjust)
        if stats is None:
            continue
        reduced = _without_component(stats, k)
        if reduced is not None:
            red = _fit(reduced, full.method, **fit_kwargs)
            ll0 = red.logLik
            converged &= red.converged | np.isnan(red.niter)
        else:
            ll0 = ols_loglik(stats.XX, stats.XY.T, stats.Ynorm, stats.n, full.method)
        stat = lr_statistic(full.logLik, ll0)
        with np.errstate(invalid="ignore"):
            stat = np.where(full.theta[k] <= 0, 0.0, stat)
        lp = boundary_chi2_pvalue(stat)
        out |= {f"{c}_logLik_reduced": ll0, f"{c}_lrt": stat, f"{c}_lrt_p": lp}
        if p_adjust is not None:
            out[f"{c}_lrt_padj"] = inference.p_adjust(lp, p_adjust)
    frame = pd.DataFrame(out, index=list(full.features))
    frame.insert(1, "converged", converged)
    return frame


def lrt_fixed(
    full: LmmFit | SummaryStats,
    reduced: LmmFit | None = None,
    *,
    drop: str | Sequence[str] | None = None,
    p_adjust: str | None = "BH",
    **fit_kwargs: Any,
) -> pd.DataFrame:
    """Likelihood-ratio test of nested fixed-effects models (ML), per feature.

    Either give two ML fits of the same data, ``full`` and ``reduced`` (the reduced X's
    columns a subset of the full X's), or the statistics (or a fit with
    ``output_ss=True``) and the covariates to ``drop``: both models are then fitted by
    ML here (a given ML fit is used as the full fit).

    Parameters
    ----------
    full : LmmFit or SummaryStats
    reduced : LmmFit, optional
    drop : covariate name or names, optional
        Columns of X removed in the reduced model, e.g. every ``cls*:trtB`` term.
    p_adjust : {"BH", "BY"} or None
        Add Benjamini-Hochberg (or -Yekutieli) adjusted p-values over the features.
    **fit_kwargs
        Passed to :func:`flashmm_dask.model.lmm` (max_iter, epsilon, n_threads); the method is
        always ML.

    Returns
    -------
    DataFrame, one row per feature: logLik_full, logLik_reduced, chisq, df, p, [padj],
    converged (both fits).
    """
    _check_p_adjust(p_adjust)
    if "method" in fit_kwargs and str(fit_kwargs.pop("method")).upper() != "ML":
        raise InputError("lrt_fixed compares ML fits; REML likelihoods of different X differ")
    if (reduced is None) == (drop is None):
        raise InputError(
            "give either reduced (a second ML fit) or drop (the covariates to remove), not "
            "both or neither"
        )
    if reduced is not None:
        if not isinstance(full, LmmFit) or not isinstance(reduced, LmmFit):
            raise InputError("full and reduced must both be LmmFit objects")
        _check_nested(full, reduced)
        fit_full, fit_red = full, reduced
    else:
        stats = _as_stats(full, "lrt_fixed")
        dropped = [drop] if isinstance(drop, str) else list(drop or [])
        unknown = [c for c in dropped if c not in stats.covariates]
        if unknown or not dropped:
            raise InputError(
                f"drop names unknown covariates {unknown or dropped}; the covariates are "
                f"{', '.join(stats.covariates)}"
            )
        if len(set(dropped)) == len(stats.covariates):
            raise InputError("drop removes every covariate; keep at least one column of X")
        if isinstance(full, LmmFit) and full.method == "ML":
            fit_full = full
        else:
            if isinstance(full, LmmFit):
                logger.info("lrt_fixed: refitting the %s fit by ML", full.method)
            fit_full = _fit(stats, "ML", **fit_kwargs)
        fit_red = _fit(_without_covariates(stats, dropped), "ML", **fit_kwargs)
    df = len(fit_full.covariates) - len(fit_red.covariates)
    stat = lr_statistic(fit_full.logLik, fit_red.logLik)
    p = chi2_pvalue(stat, df)
    out: dict[str, np.ndarray] = {
        "logLik_full": fit_full.logLik,
        "logLik_reduced": fit_red.logLik,
        "chisq": stat,
        "df": np.full(stat.shape, float(df)),
        "p": p,
    }
    if p_adjust is not None:
        out["padj"] = inference.p_adjust(p, p_adjust)
    out["converged"] = np.asarray(fit_full.converged) & np.asarray(fit_red.converged)
    return pd.DataFrame(out, index=list(fit_full.features))


def _check_nested(full: LmmFit, reduced: LmmFit) -> None:
    if full.method != "ML" or reduced.method != "ML":
        raise InputError(
            f"the fits are {full.method} and {reduced.method}; likelihood-ratio tests of "
            "fixed effects need ML fits (refit with method='ML')"
        )
    if full.n != reduced.n or len(full.features) != len(reduced.features):
        raise InputError(
            f"the fits are of different data ({len(full.features)} features of {full.n} "
            f"cells vs {len(reduced.features)} of {reduced.n})"
        )
    if full.d != reduced.d:
        raise InputError(
            f"the fits have different random effects (d = {full.d} vs {reduced.d}); "
            "only the fixed effects may differ"
        )
    extra = [c for c in reduced.covariates if c not in full.covariates]
    if len(reduced.covariates) >= len(full.covariates) or extra:
        raise InputError(
            f"the reduced fit's covariates must be a proper subset of the full fit's; "
            f"full: {', '.join(full.covariates)}; reduced: {', '.join(reduced.covariates)}"
        )
