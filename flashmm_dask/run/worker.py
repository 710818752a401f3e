"""The task a Dask worker runs on one block of features: fit, test contrasts, write.

The shared part of the model (XX, ZX, ZZ, n, d, the method and the contrast matrix) is a
:class:`SharedModel`, built on the driver, where its shared terms are checked and prepared
once (:func:`flashmm_dask.model.core.prepare_terms`; a stratified run's by the worker that
fits the stratum, ``SharedModel.defer``), and scattered to the workers once;
each task receives only its block's per-feature statistics (XY, ZY, Ynorm), fits them with
the fitting core (:func:`flashmm_dask.model.core.fit_features`, the one
:func:`~flashmm_dask.model.lmm.lmm` calls) on one thread, tests the contrasts
(:func:`~flashmm_dask.numerics.inference.contrast_test`), and writes block b of the results
store itself, so nothing but a small :class:`BlockReport` travels back to the driver.

Each feature's ``converged`` and ``status`` are those of
:func:`flashmm_dask.model.status.feature_status` (one rule for in-process fits, runs and
resumed runs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flashmm_dask.io.results import write_block
from flashmm_dask.model.core import FitOptions, Keep, fit_features, prepare_terms
from flashmm_dask.numerics.fisher import SharedTerms
from flashmm_dask.numerics.inference import contrast_test


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
    terms : the prepared shared terms of (XX, ZX, ZZ, n, d, method); prepared when the
        model is built unless given for these very inputs (as ``dataclasses.replace`` of a
        model's other settings gives them), or ``defer``
    defer : prepare the terms where the first block is fitted (:meth:`prepared`, on a
        worker), not when the model is built: a stratified run's driver builds a model
        per stratum while the workers are busy, and would start no fit until the last
        was prepared
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
    terms: SharedTerms | None = field(default=None, repr=False)
    defer: bool = False

    def __post_init__(self) -> None:
        for name in ("XX", "ZX", "ZZ", "L"):  # float64, as lmm's checks make them
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        if self.terms is not None and not self._prepared_here(self.terms):
            object.__setattr__(self, "terms", None)
        # prepared here, on the driver, once: the workers receive the terms with the model
        if not self.defer:
            self.prepared()

    def prepared(self) -> SharedTerms:
        """The shared terms, prepared on first use where the model was built without
        them (``defer``; each worker then prepares the models of the blocks it fits, once,
        and keeps them with the model it holds)."""
        if self.terms is None:
            terms = prepare_terms(self.XX, self.ZX, self.ZZ, self.n, self.d, self.method)
            object.__setattr__(self, "terms", terms)
        assert self.terms is not None
        return self.terms

    def _prepared_here(self, terms: SharedTerms) -> bool:
        """Whether ``terms`` were prepared from this model's shared statistics."""
        same = terms.XX is self.XX and terms.ZX is self.ZX and terms.ZZ is self.ZZ
        return same and (terms.n, tuple(terms.d), terms.method) == (
            float(self.n),
            tuple(self.d),
            self.method,
        )

    def fit_options(self) -> FitOptions:
        """The settings of the fit of every block: one thread, the covariances kept."""
        return FitOptions(
            df=self.df,
            nonnegative=bool(self.nonnegative),
            boundary_df=self.boundary_df,
            max_iter=int(self.max_iter),
            epsilon=float(self.epsilon),
            n_threads=1,
            keep=Keep(cov=True, fim=False, re=False, jac=False),
            contrasts=self.L if self.L.shape[1] else None,
        )


@dataclass(frozen=True)
class BlockReport:
    """What a block task returns to the driver."""

    block: int
    n_features: int
    n_converged: int
    n_zero: int
    seconds: float


def block_arrays(
    model: SharedModel, XY: np.ndarray, ZY: np.ndarray, Ynorm: np.ndarray
) -> dict[str, np.ndarray]:
    """Fit one block and return the per-block arrays of the results store.

    Parameters
    ----------
    XY : (p, b)   ZY : (q, b)   Ynorm : (b,)   -- R orientation, b features

    Returns
    -------
    dict of arrays with the feature axis first, keyed by results-store variable names.
    """
    options = model.fit_options()
    fit = fit_features(
        model.prepared(),
        np.asarray(XY, dtype=np.float64),
        np.asarray(ZY, dtype=np.float64),
        np.asarray(Ynorm, dtype=np.float64),
        options,
    )
    names = ("coef", "se", "t", "p", "df", "theta", "se_theta", "dlogL", "logLik", "niter")
    arrays = {name: fit[name] for name in (*names, "converged", "status")}
    if model.store_cov:
        arrays["cov"] = fit["cov"]
    if model.L.shape[1]:
        satterthwaite = options.df == "satterthwaite"
        df = fit["contrast_df"] if satterthwaite else fit["df"][:, :1]
        test = contrast_test(fit["coef"], fit["cov"], model.L, df, model.alternative)
        arrays.update(
            contrast_coef=test.effect,
            contrast_se=test.se,
            contrast_t=test.t,
            contrast_p=test.p,
            contrast_df=np.array(test.df),
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


def fit_rows_block(
    model: SharedModel,
    block: int,
    rows: np.ndarray,
    columns: slice | np.ndarray,
    Ynorm: np.ndarray,
    keep: np.ndarray | None,
) -> BlockReport:
    """:func:`fit_block` of the features ``columns`` of a stratum's statistics held on the
    worker: ``rows`` ((p + q) x M) is X'E over Z'E; ``keep`` (None: all) zeroes the
    features not to fit (fewer non-zero cells than ``model.min_cells``)."""
    p = model.XX.shape[0]
    picked = rows[:, columns]
    XY, ZY = np.ascontiguousarray(picked[:p]), np.ascontiguousarray(picked[p:])
    if keep is not None:
        XY, ZY = XY * keep, ZY * keep
    return fit_block(model, block, XY, ZY, Ynorm)
