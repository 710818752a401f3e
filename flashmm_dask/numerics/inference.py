"""t-tests of coefficients and contrasts, and multiple-testing adjustment.

For a p x c contrast matrix L and a feature's coefficients b (p) with covariance cov
(p x p): effect = L' b, se = sqrt(diag(L' cov L)), t = effect / se, and p-values from
Student's t with ``df`` degrees of freedom: two-sided 2 P(T > |t|), "less" P(T <= t),
"greater" P(T >= t).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.special

from flashmm_dask.numerics.linalg import Array

ALTERNATIVES = ("two.sided", "less", "greater")
#: Multiple-testing adjustments of :func:`p_adjust`.
P_ADJUST_METHODS = ("BH", "BY")


def t_pvalues(t: Array, df: Array | float, alternative: str = "two.sided") -> Array:
    """p-values of t statistics (any shape; df broadcasts); NaN stays NaN.

    Student's t distribution function ``scipy.special.stdtr``, which ``scipy.stats.t``
    evaluates too (the same values, also for NaN, infinite t and df <= 0), without its
    argument handling: a fit computes p values per coefficient and feature, ~0.2 us each.
    """
    if alternative == "two.sided":
        return 2.0 * scipy.special.stdtr(df, -np.abs(t))
    if alternative == "less":
        return scipy.special.stdtr(df, t)
    if alternative == "greater":
        return scipy.special.stdtr(df, -np.asarray(t))
    raise ValueError(f"unknown alternative {alternative!r}")


class ContrastTest(NamedTuple):
    """Tests of c contrasts for m features: effect, se, t, df and p, each (m, c)."""

    effect: Array
    se: Array
    t: Array
    df: Array
    p: Array


def contrast_test(
    coef: Array, cov: Array, L: Array, df: Array | float, alternative: str = "two.sided"
) -> ContrastTest:
    """The t-tests of contrasts L'b for a block of features: the one inference function of
    :func:`flashmm_dask.lmmtest`, the workers of a run and ``flashmm-dask test``.

    Parameters
    ----------
    coef : (m, p) array
    cov : (m, p, p) array
    L : (p, c) array
    df : float or array broadcastable to (m, c)
    alternative : "two.sided", "less" or "greater"

    Returns
    -------
    ContrastTest of (m, c) arrays; se = sqrt(diag(L' cov L)), t = effect / se.
    """
    effect = coef @ L
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(np.einsum("pc,mpk,kc->mc", L, cov, L))
        t = effect / se
    return ContrastTest(
        effect=effect,
        se=se,
        t=t,
        df=np.broadcast_to(np.asarray(df, dtype=np.float64), effect.shape),
        p=t_pvalues(t, df, alternative),
    )


def contrast_tests(
    coef: Array, cov: Array, L: Array, df: Array | float, alternative: str = "two.sided"
) -> tuple[Array, Array, Array]:
    """(effect, t, p) of :func:`contrast_test`, for callers that need neither se nor df."""
    test = contrast_test(coef, cov, L, df, alternative)
    return test.effect, test.t, test.p


def p_adjust(p: Array, method: str = "BH", axis: int = 0) -> Array:
    """Benjamini-Hochberg ("BH") or Benjamini-Yekutieli ("BY") adjusted p-values.

    NaN p-values are left NaN and do not count towards the number of tests, as in R's
    ``p.adjust``.
    """
    if method not in P_ADJUST_METHODS:
        raise ValueError(f"unknown p-value adjustment {method!r}; use 'BH' or 'BY'")
    p = np.asarray(p, dtype=np.float64)
    moved = np.moveaxis(p, axis, -1)
    out = np.full(moved.shape, np.nan)
    flat_in = moved.reshape(-1, moved.shape[-1])
    flat_out = out.reshape(-1, moved.shape[-1])
    for row_in, row_out in zip(flat_in, flat_out, strict=True):
        ok = np.flatnonzero(~np.isnan(row_in))
        n = ok.size
        if n == 0:
            continue
        factor = 1.0 if method == "BH" else float(np.sum(1.0 / np.arange(1, n + 1)))
        order = np.argsort(row_in[ok])[::-1]
        ranked = row_in[ok][order] * n * factor / np.arange(n, 0, -1)
        adjusted = np.minimum(1.0, np.minimum.accumulate(ranked))
        row_out[ok[order]] = adjusted
    return np.moveaxis(out, -1, axis)
