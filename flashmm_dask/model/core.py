"""The fitting core: fit blocks of features on shared terms prepared once.

glum's pattern: :func:`flashmm_dask.model.lmm.lmm` checks its inputs, handles the pandas
names and prepares the shared terms (:func:`prepare_terms`), then calls
:func:`fit_features`; a run's workers call :func:`fit_features` directly with the terms
prepared once on the driver (:class:`flashmm_dask.run.worker.SharedModel`), so that an
in-process fit and a run compute every number the same way.

The steps, per block of features:

1. residualise the block (zry, yry) and fit theta by Fisher scoring
   (:func:`~flashmm_dask.numerics.fisher.fit_theta`); with ``nonnegative`` hold the
   components driven below zero at zero (:func:`~flashmm_dask.numerics.boundary.constrain`);
2. judge convergence and residual variation (:mod:`flashmm_dask.model.status`);
3. the fixed effects, their covariance and t statistics
   (:func:`~flashmm_dask.numerics.fixed.fixed_effects`);
4. with Satterthwaite's df: the df of the coefficients and of the contrasts;
5. the p-values (in the block's thread: at p = 21, q = 25 they cost as much as the fit).

Then each feature's ``converged`` and ``status``, by the one rule of
:func:`flashmm_dask.model.status.feature_status`. Blocks run in ``n_threads`` threads,
the calling one included.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np

from flashmm_dask.errors import DesignError
from flashmm_dask.model.status import STATUS, feature_status, no_residual_variation
from flashmm_dask.model.status import converged as converged_rule
from flashmm_dask.numerics.ascent import ascended
from flashmm_dask.numerics.boundary import constrain, restarted
from flashmm_dask.numerics.fisher import NotPositiveDefiniteError, SharedTerms, fit_theta, prepare
from flashmm_dask.numerics.fixed import fixed_effects
from flashmm_dask.numerics.inference import t_pvalues
from flashmm_dask.numerics.linalg import Array
from flashmm_dask.numerics.satterthwaite import (
    contrast_gradient,
    cov_jacobian,
    df_from_gradient,
    theta_vcov,
)
from flashmm_dask.numerics.structured import one_blas_thread

#: The features of a block: a slice, or their indices.
Rows: TypeAlias = slice | np.ndarray
#: Approximate number of float64 values one (m, q, q) work array of the general path may hold.
_GENERAL_BLOCK_VALUES = 2**19
_SPECTRAL_BLOCK = 4096
#: Blocks per thread when several threads fit (fewer: less overhead; more: better balance).
_BLOCKS_PER_THREAD = 2


@dataclass(frozen=True)
class Keep:
    """Which optional per-feature outputs :func:`fit_features` keeps."""

    cov: bool = True
    fim: bool = False
    re: bool = False
    jac: bool = True


@dataclass(frozen=True)
class FitOptions:
    """The checked settings of a fit (``lmm``'s keywords after the statistics).

    Attributes
    ----------
    df : "residual" (n - p) or "satterthwaite"
    nonnegative : hold variance components driven below zero at zero (lme4's fit)
    boundary_df : Satterthwaite's df at a component held at zero: "lmertest" drops it,
        "retain" keeps it (:mod:`flashmm_dask.numerics.satterthwaite`)
    max_iter, epsilon : Fisher scoring's limit and tolerance on max |dlogL|
    n_threads : threads fitting blocks in parallel (the workers of a run use 1)
    keep : the optional outputs to keep
    contrasts : (p, c) contrasts whose Satterthwaite df are computed during the fit
    """

    df: str = "residual"
    nonnegative: bool = False
    boundary_df: str = "lmertest"
    max_iter: int = 50
    epsilon: float = 1e-5
    n_threads: int = 1
    keep: Keep = field(default_factory=Keep)
    contrasts: np.ndarray | None = None


def _in_threads(fn: Callable[[Rows], None], blocks: list[Rows], n: int) -> None:
    """``fn`` of every block in n threads, this one and n - 1 new ones, each taking the next
    block left (this thread starts on the first block while the others start)."""
    lock = threading.Lock()
    left = iter(blocks)

    def work() -> None:
        while True:
            with lock:
                rows = next(left, None)
            if rows is None:
                return
            fn(rows)

    with ThreadPoolExecutor(n - 1) as pool:
        others = [pool.submit(work) for _ in range(n - 1)]
        work()
        for f in others:
            f.result()


def _starts(size: int, block: int, workers: int) -> list[int]:
    """The first row of each block and the end (blocks of at most ``block`` rows); with
    several threads, as many blocks as a multiple of the threads, of sizes within one of
    each other, so that the threads end together where a feature's fit costs the same
    (the nested path: 100 features in blocks of 16 left 52 to one thread and 48 to the
    other, the last block 4)."""
    count = -(-size // block) if size else 0
    if workers > 1 and count > 1:
        count = min(size, -(-count // workers) * workers)
        return [(i * size) // count for i in range(count + 1)]
    return [*range(0, size, block), size] if size else [0]


def default_threads() -> int:
    """The threads of a fit with ``n_threads=None``: the CPUs, at most 8."""
    return max(1, min(os.cpu_count() or 1, 8))


def prepare_terms(
    XX: np.ndarray,
    ZX: np.ndarray,
    ZZ: np.ndarray,
    n: int,
    d: Sequence[int],
    method: str,
    covariates: Sequence[str] | None = None,
    diagonal: Sequence[bool] | None = None,
) -> SharedTerms:
    """The shared terms of checked inputs (:func:`~flashmm_dask.numerics.fisher.prepare`);
    ``diagonal``: which diagonal blocks of ZZ are diagonal, where the caller's pass over ZZ
    found that (:func:`~flashmm_dask.numerics.zz_scan.scan`).

    Raises
    ------
    DesignError
        X'X is not positive definite; the message names the aliased ``covariates``.
    """
    try:
        return prepare(XX, ZX, ZZ, n, d, method, diagonal=diagonal)
    except NotPositiveDefiniteError as exc:
        names = covariates or [f"x{j + 1}" for j in range(XX.shape[0])]
        shown = ", ".join(repr(names[j]) for j in exc.aliased) or "(could not tell which)"
        raise DesignError(
            f"X is not full column rank (X'X is not positive definite): aliased columns "
            f"{shown}; remove them from the fixed-effects design"
        ) from None


def _shapes(shared: SharedTerms, options: FitOptions) -> dict[str, tuple[int, ...]]:
    """The per-feature shape of every array the fit of ``options`` fills."""
    p, q, K, keep = shared.p, shared.q, shared.K, options.keep
    shapes: dict[str, tuple[int, ...]] = {
        "theta": (K + 1,),
        "se_theta": (K + 1,),
        "dlogL": (K + 1,),
        "niter": (),
        "logLik": (),
        "converged": (),
        "constant": (),
        "coef": (p,),
        "se": (p,),
        "t": (p,),
        "p": (p,),
    }
    if keep.cov:
        shapes["cov"] = (p, p)
    if keep.fim:
        shapes.update(FIM_theta=(K + 1, K + 1), FIM_beta=(p, p))
    if keep.re:
        shapes["RE"] = (q,)
    if options.df == "satterthwaite":
        shapes["df"] = (p,)
        if keep.cov:
            shapes["vcov_theta"] = (K + 1, K + 1)
            if keep.jac:
                shapes["jac_cov"] = (K + 1, p, p)
        if options.contrasts is not None:
            shapes["contrast_df"] = (options.contrasts.shape[1],)
    return shapes


def fit_features(
    shared: SharedTerms,
    XY: np.ndarray,
    ZY: np.ndarray,
    Ynorm: np.ndarray,
    options: FitOptions,
    theta0: np.ndarray | None = None,
) -> dict[str, Array]:
    """Fit the features in blocks on prepared shared terms; features with Ynorm <= 0 get NaN.

    Parameters
    ----------
    shared : the prepared terms of (XX, ZX, ZZ, n, d, method), from :func:`prepare_terms`
    XY : (p, m)   ZY : (q, m)   Ynorm : (m,)   -- the R orientation, checked
    options : the checked settings
    theta0 : (m, K+1), optional starting values

    Returns
    -------
    dict of arrays with the feature axis first: theta, se_theta, dlogL, niter, logLik,
    coef, se, t, p, df ((m, p), n - p everywhere with residual df), ``converged`` (bool)
    and ``status`` (int8, :mod:`flashmm_dask.model.status`), ``constant`` (1.0 / 0.0) and
    the mask ``fitted``; cov, FIM_beta with FIM_theta, and RE as ``options.keep`` says.
    With Satterthwaite's df and ``keep.cov`` also ``vcov_theta`` and (``keep.jac``)
    ``jac_cov``, and with ``options.contrasts`` their df ("contrast_df", (m, c)).
    """
    p, K = shared.p, shared.K
    m = Ynorm.shape[0]
    XY = np.ascontiguousarray(XY.T)
    ZY = np.ascontiguousarray(ZY.T)
    fitted = Ynorm > 0
    satterthwaite = options.df == "satterthwaite"
    keep, L = options.keep, options.contrasts
    max_iter, epsilon = options.max_iter, options.epsilon
    out = {k: np.empty((m, *s)) for k, s in _shapes(shared, options).items()}
    for v in out.values():
        v[~fitted] = np.nan
    idx = np.flatnonzero(fitted)
    df_residual = float(shared.n - p)
    block = _SPECTRAL_BLOCK if K == 1 else max(1, _GENERAL_BLOCK_VALUES // shared.work_values)
    workers = options.n_threads
    if workers > 1:  # several blocks per thread keep all busy while the slowest iterate on
        block = max(1, min(block, -(-idx.size // (_BLOCKS_PER_THREAD * workers))))

    def fit_block(rows: Rows) -> None:
        xy, zy, ynorm = XY[rows], ZY[rows], Ynorm[rows]
        zry, yry = shared.residualise(xy, zy, ynorm)
        # K = 1: zry on the eigenvectors of zrz, once for the scoring, the boundary and the df
        z = zry @ shared.U if K == 1 else None
        th = fit_theta(
            shared,
            zry,
            yry,
            theta0=None if theta0 is None else theta0[rows],
            max_iter=max_iter,
            epsilon=epsilon,
            z=z,
        )
        held = None
        if options.nonnegative:
            first = th
            th, held = constrain(shared, zry, yry, th, max_iter=max_iter, epsilon=epsilon, z=z)
            th, held = restarted(
                shared, zry, yry, first, th, held, max_iter=max_iter, epsilon=epsilon, z=z
            )
            # where scoring could not end, a search that raises the likelihood every step
            eligible = ~no_residual_variation(yry, ynorm)
            th, held = ascended(
                shared, zry, yry, th, held, eligible, epsilon=epsilon, max_iter=max_iter, z=z
            )
        out["converged"][rows] = converged_rule(th.dlogL, th.FIM_theta, epsilon, held)
        out["constant"][rows] = no_residual_variation(yry, ynorm)
        # with all features fitted, the K = 1 path leaves cov in the output itself
        cov_out = out["cov"][rows] if keep.cov and isinstance(rows, slice) else None
        fx = fixed_effects(
            shared,
            xy,
            zy,
            th.theta,
            th.logdetM0,
            fim=keep.fim,
            re=keep.re,
            cov_out=cov_out,
            gram=th.gram,
        )
        for name in ("theta", "se_theta", "dlogL", "niter"):
            out[name][rows] = getattr(th, name)
        out["coef"][rows] = fx.coef
        out["logLik"][rows] = fx.logLik
        out["se"][rows] = fx.se
        out["t"][rows] = fx.t
        if keep.cov and fx.cov is not cov_out:
            out["cov"][rows] = fx.cov
        if keep.fim:
            out["FIM_theta"][rows] = th.FIM_theta
            out["FIM_beta"][rows] = fx.FIM_beta
        if keep.re:
            out["RE"][rows] = fx.RE
        if not satterthwaite:
            out["p"][rows] = t_pvalues(fx.t, df_residual)
        else:
            vcov_theta = theta_vcov(
                shared,
                th.theta,
                zry,
                yry,
                held=held,
                boundary_df=options.boundary_df,
                z=z,
                fim=th.FIM_theta,  # the expected information at th.theta
            )
            # the coefficients and the contrasts in one pass (one G' diag G product)
            Lall = np.eye(p) if L is None else np.hstack([np.eye(p), L])
            c, g = contrast_gradient(shared, th.theta, fx.cov, Lall)
            df_all = df_from_gradient(c, g, vcov_theta)
            out["df"][rows] = df_all[:, :p]
            out["p"][rows] = t_pvalues(fx.t, df_all[:, :p])
            if L is not None:
                out["contrast_df"][rows] = df_all[:, p:]
            if keep.cov:
                out["vcov_theta"][rows] = vcov_theta
                if keep.jac:
                    out["jac_cov"][rows] = cov_jacobian(shared, th.theta, fx.cov)

    starts = _starts(idx.size, block, workers)
    blocks: list[Rows] = (
        [slice(a, b) for a, b in itertools.pairwise(starts)]  # all fitted: views, not copies
        if idx.size == m
        else [idx[a:b] for a, b in itertools.pairwise(starts)]
    )
    # BLAS keeps to one thread per call: a block's products are small, and BLAS threads
    # only add their synchronisation (lmm with n_threads=1 spent 2-3x the CPU time with
    # OpenBLAS's two; a run's in-process workers fit with n_threads=1); with several
    # threads, concurrent calls would also queue.
    with one_blas_thread():
        if workers > 1 and len(blocks) > 1:
            # The compiled kernels and NumPy's batched algebra release the GIL, so blocks
            # run in parallel threads
            _in_threads(fit_block, blocks, min(workers, len(blocks)))
        else:
            for rows in blocks:
                fit_block(rows)
    if not satterthwaite:
        out["df"] = np.full((m, p), df_residual)
    out["converged"], out["status"] = feature_status(out, fitted)
    untestable(out)
    out["fitted"] = fitted
    return out


def untestable(out: dict[str, Array]) -> None:
    """No test for a feature of status ``constant`` (explained exactly by the fixed
    effects: no residual variation, so no variance to test against), in place: its se, t,
    p and coefficient covariance are NaN, so that its contrasts are not tested either and
    Benjamini-Hochberg does not count it, whatever the fit's settings (the residual
    variance is then zero or a rounding error: se 0/0 = NaN unconstrained, a spurious
    t ~ 1e9 and p = 0 where a boundary refit left a variance of 1e-16). The coefficients
    are kept."""
    constant = out["status"] == STATUS.index("constant")
    if constant.any():
        for name in ("se", "t", "p", "cov"):
            if name in out:
                out[name][constant] = np.nan
