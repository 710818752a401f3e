"""The task a Dask worker runs on one block of features: fit, test contrasts, write.

The shared part of the model (XX, ZX, ZZ, n, d, the method and the contrast matrix) is a
:class:`SharedModel`, scattered to the workers once; each task receives only its block's
per-feature statistics (XY, ZY, Ynorm), fits them with :func:`flashmm_dask.model.lmm.lmm` on one
thread, tests the contrasts, and writes block b of the results store itself, so nothing
but a small :class:`BlockReport` travels back to the driver.

Each feature's ``converged`` and ``status`` are :func:`~flashmm_dask.model.lmm.lmm`'s, computed by
:mod:`flashmm_dask.model.status` (one rule for in-process fits, runs and resumed runs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flashmm_dask.io.results import write_block
from flashmm_dask.model.lmm import lmm
from flashmm_dask.numerics.inference import contrast_tests


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
    nonnegative : constrain the variance components to be >= 0 (lme4's fit)
    boundary_df : Satterthwaite's df at a component held at zero: "lmertest" or "retain"
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
    nonnegative: bool = False
    boundary_df: str = "lmertest"


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
        nonnegative=model.nonnegative,
        boundary_df=model.boundary_df,
        max_iter=model.max_iter,
        epsilon=model.epsilon,
        output_cov=True,
        output_fim=False,
        output_jac=False,
        satterthwaite_contrasts=model.L if model.L.shape[1] else None,
        n_threads=1,
        warn_zero=False,
    )
    assert fit.status is not None
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
        "converged": fit.converged,
        "status": fit.status,
    }
    assert fit.cov is not None
    if model.store_cov:
        arrays["cov"] = fit.cov
    if model.L.shape[1]:
        if fit.df_method == "satterthwaite":
            assert fit.contrast_df is not None
            df = fit.contrast_df.T
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
