"""Likelihood-ratio tests from the summary statistics: log-likelihoods and p-values.

The log-likelihood of a fit is the R package's (ALGORITHM.md),

    logLik = -(n - r)(1 + log(2 pi s_0)) / 2 + log|det M0| / 2,     r = p (REML) or 0 (ML),

at the profiled residual variance. For REML it differs from the restricted
log-likelihood of lme4 only by a term in X alone (-log|X'X| / 2), so differences between
fits with the same X are lme4's; for ML it is the ML log-likelihood itself.

Without random effects (q = 0) the model is ordinary least squares: M0 is empty and
s_0 = yry / (n - r), with yry = Ynorm - XY' XX^-1 XY the residual sum of squares.

Tests of a variance component s_k = 0 lie on the boundary of the parameter space; the
likelihood-ratio statistic T then follows the 50:50 mixture of chi2_0 (a point mass at
0) and chi2_1 (Self and Liang 1987), so P(T >= t) = chi2_1.sf(t) / 2 for t > 0 and 1 for
t = 0.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.stats

from flashmm_dask.numerics.linalg import Array


def ols_loglik(XX: Array, XY: Array, Ynorm: Array, n: float, method: str) -> Array:
    """Log-likelihood of the model without random effects, per feature.

    Parameters
    ----------
    XX : (p, p) array
    XY : (m, p) array
    Ynorm : (m,) array
    n : number of cells
    method : "REML" or "ML"

    Returns
    -------
    (m,) array; NaN where Ynorm <= 0 (features that are not fitted).
    """
    p = XX.shape[0]
    r = p if method == "REML" else 0
    B = scipy.linalg.cho_solve(scipy.linalg.cho_factor(XX, lower=True), XY.T).T
    yry = Ynorm - np.einsum("mp,mp->m", B, XY)
    with np.errstate(invalid="ignore", divide="ignore"):
        ll = -(n - r) * (1.0 + np.log(2.0 * np.pi * yry / (n - r))) / 2.0
    return np.where(Ynorm > 0, ll, np.nan)


def lr_statistic(logLik_full: Array, logLik_reduced: Array) -> Array:
    """2 (logLik_full - logLik_reduced), with rounding below zero set to 0; NaN stays NaN."""
    stat = 2.0 * (np.asarray(logLik_full) - np.asarray(logLik_reduced))
    with np.errstate(invalid="ignore"):
        return np.where(stat < 0, 0.0, stat)


def chi2_pvalue(stat: Array, df: Array | float) -> Array:
    """P(chi2_df >= stat); NaN stays NaN."""
    return scipy.stats.chi2.sf(stat, df)


def boundary_chi2_pvalue(stat: Array) -> Array:
    """P(T >= stat) under the 50:50 mixture of chi2_0 and chi2_1; NaN stays NaN."""
    stat = np.asarray(stat, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(
            stat > 0, 0.5 * scipy.stats.chi2.sf(stat, 1), np.where(stat == 0, 1.0, np.nan)
        )


def z_pvalue(theta: Array, se: Array) -> tuple[Array, Array]:
    """One-sided p-value of H0: theta = 0 against theta > 0 from z = theta / se.

    Returns
    -------
    z, p : arrays of the broadcast shape; NaN where se is 0 or NaN.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.asarray(theta) / np.where(np.asarray(se) > 0, se, np.nan)
    return z, scipy.stats.norm.sf(z)
