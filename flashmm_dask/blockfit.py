"""The task a Dask worker runs on one block of features: fit, test contrasts, write.

The shared part of the model (XX, ZX, ZZ, n, d, the method and the contrast matrix) is a
:class:`SharedModel`, scattered to the workers once; each task receives only its block's
per-feature statistics (XY, ZY, Ynorm), fits them with :func:`flashmm_dask.lmm.lmm` on one
thread, tests the contrasts, and writes block b of the results store itself, so nothing
but a small :class:`BlockReport` travels back to the driver.

Each feature also gets a ``status`` code (:data:`flashmm_dask.io.results.STATUS`):
all_zero (Ynorm = 0, not fitted), constant (no residual variation after the fixed
effects: yry = Ynorm - XY' XX^-1 XY <= CONSTANT_RTOL * Ynorm), non_finite, not_converged
or ok. A feature counts as converged only when max |dlogL| <= epsilon (R's rule) *and*
one more Fisher step would raise its log-likelihood by at most LOGLIK_GAP (half the
Newton decrement dlogL' FIM^-1 dlogL). The second test does not depend on the scale of
the values: for a feature measured in units 1e8 times larger the score is 1e16 times
smaller, and R's absolute rule alone stops after one step, far from the optimum.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flashmm_dask.io.results import finite_features, status_codes, write_block
from flashmm_dask.lmm import lmm
from flashmm_dask.numerics.inference import contrast_tests
from flashmm_dask.numerics.satterthwaite import satterthwaite_df

#: Largest log-likelihood gain one more Fisher step may promise at a converged fit.
LOGLIK_GAP = 1e-6
#: Relative residual sum of squares at or below which a feature has no residual variation.
CONSTANT_RTOL = 1e-9


@dataclass(frozen=True, eq=False)
class SharedModel:
    """What every block of a run shares.

    Attributes
    ----------
    XX : (p, p)   ZX : (q, p)   ZZ : (q, q)
    n : cells;  d : component sizes
    method, max_iter, epsilon : the fit settings
    L : (p, c) contrast matrix (c may be 0)
    alternative : of the contrast tests
    store_cov : write the coefficient covariances
    store : results store path or URL;  storage_options : for fsspec URLs
    df : "residual" (n - p) or "satterthwaite": the degrees of freedom of the t-tests
    """

    XX: np.ndarray
    ZX: np.ndarray
    ZZ: np.ndarray
    n: int
    d: tuple[int, ...]
    method: str
    max_iter: int
    epsilon: float
    L: np.ndarray
    alternative: str
    store_cov: bool
    store: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    df: str = "residual"


@dataclass(frozen=True)
class BlockReport:
    """What a block task returns to the driver."""

    block: int
    n_features: int
    n_converged: int
    n_zero: int
    seconds: float


def block_arrays(model: SharedModel, XY: np.ndarray, ZY: np.ndarray, Ynorm: np.ndarray) -> dict:
    """Fit one block and return the per-block arrays of the results store.

    Parameters
    ----------
    XY : (p, b)   ZY : (q, b)   Ynorm : (b,)   -- R orientation, b features

    Returns
    -------
    dict of arrays with the feature axis first, keyed by results-store variable names.
    """
    fit = lmm(
        model.XX,
        XY,
        model.ZX,
        ZY,
        model.ZZ,
        Ynorm,
        model.n,
        list(model.d),
        method=model.method,
        df=model.df,
        max_iter=model.max_iter,
        epsilon=model.epsilon,
        output_cov=True,
        output_fim=True,
        n_threads=1,
        warn_zero=False,
    )
    assert fit.FIM_theta is not None
    converged = fit.converged & (loglik_gap(fit.dlogL.T, fit.FIM_theta) <= LOGLIK_GAP)
    arrays: dict[str, np.ndarray] = {
        "coef": fit.coef.T,
        "se": fit.se.T,
        "t": fit.t.T,
        "p": fit.p.T,
        "df": fit.df_array().T.copy(),
        "theta": fit.theta.T,
        "se_theta": fit.se_theta.T,
        "dlogL": fit.dlogL.T,
        "logLik": fit.logLik,
        "niter": fit.niter,
        "converged": converged,
    }
    constant = (Ynorm > 0) & no_residual_variation(model.XX, XY, Ynorm)
    arrays["status"] = status_codes(fit.niter, converged, finite_features(arrays), constant)
    assert fit.cov is not None
    if model.store_cov:
        arrays["cov"] = fit.cov
    if model.L.shape[1]:
        if fit.df_method == "satterthwaite":
            assert fit.jac_cov is not None and fit.vcov_theta is not None
            df = satterthwaite_df(fit.cov, fit.jac_cov, fit.vcov_theta, model.L)
        else:
            df = np.full((Ynorm.shape[0], model.L.shape[1]), float(fit.df))
        coef, t, p = contrast_tests(fit.coef.T, fit.cov, model.L, df, model.alternative)
        with np.errstate(invalid="ignore"):
            se = np.sqrt(np.einsum("pc,mpk,kc->mc", model.L, fit.cov, model.L))
        arrays.update(
            contrast_coef=coef,
            contrast_se=se,
            contrast_t=t,
            contrast_p=p,
            contrast_df=df,
        )
    return arrays


def loglik_gap(dlogL: np.ndarray, FIM: np.ndarray) -> np.ndarray:
    """Half the Newton decrement, dlogL' FIM^-1 dlogL / 2, of each feature.

    Parameters
    ----------
    dlogL : (m, K+1) score at theta;  FIM : (m, K+1, K+1) Fisher information at theta

    Returns
    -------
    (m,) the log-likelihood gain one more Fisher step promises; NaN where the score or
    the information is not finite, or the information has a diagonal entry <= 0 (it
    underflowed, e.g. for values near 1e150).
    """
    gap = np.full(dlogL.shape[0], np.nan)
    ok = np.isfinite(dlogL).all(axis=1) & np.isfinite(FIM).all(axis=(1, 2))
    ok &= (np.diagonal(FIM, axis1=1, axis2=2) > 0).all(axis=1)
    if ok.any():
        step = np.linalg.pinv(FIM[ok], hermitian=True) @ dlogL[ok][:, :, None]
        gap[ok] = 0.5 * np.einsum("mk,mk->m", dlogL[ok], step[:, :, 0])
    return gap


def no_residual_variation(XX: np.ndarray, XY: np.ndarray, Ynorm: np.ndarray) -> np.ndarray:
    """Features that the fixed effects explain exactly (a constant, a covariate...).

    Parameters
    ----------
    XX : (p, p)   XY : (p, b)   Ynorm : (b,)

    Returns
    -------
    (b,) bool: yry = Ynorm - XY' XX^-1 XY <= CONSTANT_RTOL * Ynorm (and Ynorm > 0).
    """
    yry = Ynorm - np.einsum("pm,pm->m", XY, np.linalg.solve(XX, XY))
    return (Ynorm > 0) & (yry <= CONSTANT_RTOL * Ynorm)


def fit_block(
    model: SharedModel, block: int, XY: np.ndarray, ZY: np.ndarray, Ynorm: np.ndarray
) -> BlockReport:
    """Fit block ``block`` and write it into the results store (run on a worker)."""
    start = time.perf_counter()
    arrays = block_arrays(model, XY, ZY, Ynorm)
    write_block(model.store, block, arrays, storage_options=model.storage_options or None)
    fitted = ~np.isnan(arrays["niter"])
    return BlockReport(
        block=block,
        n_features=int(Ynorm.shape[0]),
        n_converged=int(arrays["converged"].sum()),
        n_zero=int((~fitted).sum()),
        seconds=time.perf_counter() - start,
    )
