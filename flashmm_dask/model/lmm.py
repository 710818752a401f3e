"""``lmm``: fit the FLASH-MM linear mixed model of many features from summary statistics.

The inputs follow the R package's orientation (ALGORITHM.md)::

    XX (p, p)   XY (p, m)   ZX (q, p)   ZY (q, m)   ZZ (q, q)   Ynorm (m,)   n

They are checked and converted once, here; the batched numerics in
:mod:`flashmm_dask.numerics` then run on blocks of features (feature axis first).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from flashmm_dask.errors import ConvergenceWarning, DesignError, InputError, ZeroFeatureWarning
from flashmm_dask.model.fit import LmmFit
from flashmm_dask.model.status import converged as converged_rule
from flashmm_dask.model.status import finite_features, no_residual_variation, status_codes
from flashmm_dask.numerics.boundary import constrain
from flashmm_dask.numerics.fisher import (
    METHODS,
    NotPositiveDefiniteError,
    fit_theta,
    prepare,
)
from flashmm_dask.numerics.fixed import fixed_effects
from flashmm_dask.numerics.inference import t_pvalues
from flashmm_dask.numerics.linalg import Array
from flashmm_dask.numerics.satterthwaite import (
    BOUNDARY_DF,
    DF_METHODS,
    contrast_gradient,
    cov_jacobian,
    df_from_gradient,
    theta_vcov,
)
from flashmm_dask.stats.summary import summary_shapes

logger = logging.getLogger(__name__)

#: Approximate number of float64 values one (m, q, q) work array of the general path may hold.
_GENERAL_BLOCK_VALUES = 2**19
_SPECTRAL_BLOCK = 4096


def _labels(obj: Any, axis: int) -> list[str] | None:
    if isinstance(obj, pd.DataFrame):
        return [str(x) for x in (obj.index if axis == 0 else obj.columns)]
    if isinstance(obj, pd.Series) and axis == 0:
        return [str(x) for x in obj.index]
    return None


def _as_matrix(name: str, obj: Any, ndim: int) -> np.ndarray:
    try:
        a = np.asarray(obj, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"{name} must be a numeric array; got {type(obj).__name__}: {exc}"
        ) from None
    if ndim == 1:
        a = np.ravel(a) if a.ndim == 2 and 1 in a.shape else a
    if a.ndim != ndim:
        raise InputError(f"{name} must be {ndim}-dimensional; got shape {a.shape}")
    return a


def _pick_names(
    candidates: list[tuple[str, list[str] | None]], size: int, prefix: str
) -> tuple[str, ...]:
    for _, labels in candidates:
        if labels is not None and len(labels) == size:
            return tuple(labels)
    return tuple(f"{prefix}{i + 1}" for i in range(size))


def _check_finite(name: str, a: np.ndarray, features: tuple[str, ...] | None = None) -> None:
    bad = ~np.isfinite(a)
    if not bad.any():
        return
    if features is not None:
        cols = np.flatnonzero(bad.reshape(-1, len(features)).any(axis=0) if a.ndim == 2 else bad)
        shown = ", ".join(repr(features[j]) for j in cols[:5])
        more = f" and {cols.size - 5} more" if cols.size > 5 else ""
        raise InputError(
            f"{name} contains NaN or Inf for {cols.size} feature(s): {shown}{more}; "
            "remove those features or fix the data they came from"
        )
    raise InputError(f"{name} contains NaN or Inf; the shared statistics must be finite")


def _components(d: Any, q: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    if d is None:
        return (q,), ("var1",)
    if isinstance(d, Mapping):
        names, sizes = [str(k) for k in d], list(d.values())
    elif isinstance(d, pd.Series):
        names, sizes = [str(k) for k in d.index], list(d.to_numpy())
    else:
        sizes = list(np.atleast_1d(np.asarray(d)))
        names = [f"var{i + 1}" for i in range(len(sizes))]
    try:
        ints = tuple(int(s) for s in sizes)
    except (TypeError, ValueError):
        raise InputError(f"d must be component sizes (positive integers); got {d!r}") from None
    if not ints or any(s <= 0 or s != v for s, v in zip(ints, sizes, strict=True)):
        raise InputError(f"d must be component sizes (positive integers); got {list(sizes)}")
    if sum(ints) != q:
        raise InputError(
            f"sum(d) = {sum(ints)} but Z has q = {q} columns (ZZ is {q} x {q}); "
            "d must give the number of columns of each random component"
        )
    return ints, tuple(names)


def _theta0(theta0: Any, K: int, m: int) -> np.ndarray | None:
    if theta0 is None:
        return None
    t0 = np.asarray(theta0, dtype=np.float64)
    if t0.ndim == 1 and t0.size == K + 1:
        t0 = np.broadcast_to(t0[:, None], (K + 1, m))
    if t0.shape != (K + 1, m):
        raise InputError(
            f"theta0 must have K+1 = {K + 1} entries (the {K} random-component variances "
            f"then the residual variance), or shape ({K + 1}, {m}); got shape {np.shape(theta0)}"
        )
    if not np.isfinite(t0).all():
        raise InputError("theta0 contains NaN or Inf")
    return np.ascontiguousarray(t0.T)


def lmm(
    XX: Any,
    XY: Any,
    ZX: Any,
    ZY: Any,
    ZZ: Any,
    Ynorm: Any,
    n: int,
    d: Sequence[int] | Mapping[str, int] | None = None,
    *,
    method: str = "REML",
    df: str = "residual",
    nonnegative: bool = False,
    boundary_df: str = "lmertest",
    theta0: Any = None,
    max_iter: int = 50,
    epsilon: float = 1e-5,
    output_cov: bool = True,
    output_fim: bool = False,
    output_re: bool = False,
    output_ss: bool = False,
    verbose: bool = False,
    n_threads: int | None = None,
    warn_zero: bool = True,
    output_jac: bool | None = None,
    satterthwaite_contrasts: Any = None,
) -> LmmFit:
    """Fit linear mixed models of many features from summary statistics.

    Equivalent to R FLASHMM's ``lmm``. Features are fitted in batches; Fisher scoring
    stops for each feature once max |dlogL| <= epsilon.

    The defaults (``df="residual"``, ``nonnegative=False``) are R FLASHMM's, for exact
    parity. For inference use ``df="satterthwaite", nonnegative=True`` (the defaults of
    ``flashmm-dask run``): with subjects nested in the tested effect, the residual df
    n - p overstate the information (benchmarks/CALIBRATION.md: null false-positive rate
    0.075 and realised FDP 0.192 at BH 0.05 with 6 subjects per group, against 0.050 and
    0.050 with Satterthwaite df), and a variance estimated below zero shrinks the
    standard errors of the effects between subjects.

    Parameters
    ----------
    XX : (p, p) array or DataFrame
        X'X. DataFrame labels name the covariates.
    XY : (p, m) array or DataFrame
        X'Y'. DataFrame columns name the features.
    ZX : (q, p) array or DataFrame
    ZY : (q, m) array or DataFrame
    ZZ : (q, q) array or DataFrame
    Ynorm : (m,) array or Series
        Sum of squares of each feature over cells.
    n : int
        Number of cells.
    d : sequence of int or mapping name -> size, optional
        Sizes of the K random components (sum(d) == q); default one component of size q.
    method : {"REML", "ML"}
    df : {"residual", "satterthwaite"}
        Degrees of freedom of the t-tests: "residual", n - p for every test (the R
        package), or "satterthwaite", computed per feature and coefficient from the
        observed information of theta (as lmerTest does; see
        :mod:`flashmm_dask.numerics.satterthwaite`). With "satterthwaite" ``fit.df`` is a
        (p, m) array, and with ``output_cov`` the fit keeps ``vcov_theta`` and ``jac_cov``
        so that :func:`lmmtest` gives the df of any contrast.
    nonnegative : bool
        False (R FLASHMM): unconstrained Fisher scoring; a variance component may end
        below zero (status ``negative_variance``). True: the REML/ML optimum over
        variance components >= 0, as lme4 fits it: a component driven below zero is held
        at exactly zero and the others are re-estimated without it (status
        ``boundary``; see :mod:`flashmm_dask.numerics.boundary`); its Satterthwaite df
        are those of the model without it, as lmerTest's (see ``boundary_df``). Interior
        fits are unchanged.
    boundary_df : {"lmertest", "retain"}
        With ``nonnegative=True`` and Satterthwaite df, the df where a component is held
        at zero: "lmertest" (default) drops it, as lmerTest does for a singular fit (an
        effect between donors gets about n - p df; also the default of runs,
        ``model.boundary_df``); "retain" keeps it, the limit of the interior df as the
        estimate approaches zero: continuous df, but conservative where the true variance
        is zero (benchmarks/CALIBRATION.md; :mod:`flashmm_dask.numerics.satterthwaite`).
    theta0 : (K+1,) or (K+1, m) array, optional
        Starting variance components, the residual variance last.
    max_iter : int
    epsilon : float
        Convergence tolerance on max |dlogL|.
    output_cov, output_fim, output_re, output_ss : bool
        Keep the coefficient covariances, the Fisher information matrices, the BLUPs of
        the random effects, the summary statistics.
    verbose : bool
        Report how many features did not converge (a ConvergenceWarning and a log line).
    n_threads : int, optional
        Threads fitting blocks of features in parallel; default the number of CPUs (at
        most 8). Inside Dask workers the pipeline passes 1.
    warn_zero : bool
        Warn about all-zero features (the pipeline, fitting blocks, reports totals instead).
    output_jac : bool, optional
        With ``df="satterthwaite"``: keep ``jac_cov`` (m (K+1) p^2 values, for the df of
        any later contrast in :func:`lmmtest`); default ``output_cov``. The fit's own df
        do not need it.
    satterthwaite_contrasts : (p, c) array, optional
        With ``df="satterthwaite"``: compute the df of these contrasts during the fit
        (``fit.contrast_df``, (c, m)), as the workers of a run do.

    Returns
    -------
    LmmFit
    """
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise InputError(f"unknown method {method!r}; use 'REML' or 'ML'")
    method = method.upper()
    if not isinstance(df, str) or df.lower() not in DF_METHODS:
        raise InputError(f"unknown df {df!r}; use 'residual' (n - p) or 'satterthwaite'")
    df_method = df.lower()
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 0:
        raise InputError(f"max_iter must be a non-negative integer; got {max_iter!r}")
    if not np.isfinite(epsilon) or epsilon <= 0:
        raise InputError(f"epsilon must be a positive number; got {epsilon!r}")
    if not isinstance(nonnegative, (bool, np.bool_)):
        raise InputError(f"nonnegative must be True or False; got {nonnegative!r}")
    if boundary_df not in BOUNDARY_DF:
        raise InputError(f"unknown boundary_df {boundary_df!r}; use one of {BOUNDARY_DF}")
    _threads(n_threads)

    arrays = {
        "XX": _as_matrix("XX", XX, 2),
        "XY": _as_matrix("XY", XY, 2),
        "ZX": _as_matrix("ZX", ZX, 2),
        "ZY": _as_matrix("ZY", ZY, 2),
        "ZZ": _as_matrix("ZZ", ZZ, 2),
        "Ynorm": _as_matrix("Ynorm", Ynorm, 1),
    }
    p, m, q = arrays["XX"].shape[0], arrays["Ynorm"].shape[0], arrays["ZZ"].shape[0]
    for name, shape in summary_shapes(p, q, m).items():
        if arrays[name].shape != shape:
            raise InputError(
                f"{name} has shape {arrays[name].shape} but {shape} is expected from "
                f"XX ({p} x {p}: p = {p} covariates), ZZ ({q} x {q}: q = {q} random-effect "
                f"columns) and Ynorm ({m} features); inputs are in the R orientation "
                "(XY is p x m, ZY is q x m)"
            )
    covariates = _pick_names(
        [("XX", _labels(XX, 0)), ("XY", _labels(XY, 0)), ("ZX", _labels(ZX, 1))], p, "x"
    )
    features = _pick_names(
        [("XY", _labels(XY, 1)), ("ZY", _labels(ZY, 1)), ("Ynorm", _labels(Ynorm, 0))],
        m,
        "feature",
    )
    random = _pick_names(
        [("ZZ", _labels(ZZ, 0)), ("ZY", _labels(ZY, 0)), ("ZX", _labels(ZX, 0))], q, "z"
    )
    for name in ("XX", "ZX", "ZZ"):
        _check_finite(name, arrays[name])
    for name in ("XY", "ZY", "Ynorm"):
        _check_finite(name, arrays[name], features)

    try:
        n_cells = int(n)
    except (TypeError, ValueError):
        raise InputError(f"n must be the number of cells (an integer); got {n!r}") from None
    if n_cells != n:
        raise InputError(f"n must be the number of cells (an integer); got {n!r}")
    if n_cells <= p:
        raise InputError(
            f"n = {n_cells} cells but p = {p} covariates: n must exceed p for the residual "
            "degrees of freedom n - p to be positive"
        )
    sizes, component_names = _components(d, q)
    K = len(sizes)
    t0 = _theta0(theta0, K, m)

    try:
        shared = prepare(arrays["XX"], arrays["ZX"], arrays["ZZ"], n_cells, sizes, method)
    except NotPositiveDefiniteError as exc:
        names = ", ".join(repr(covariates[j]) for j in exc.aliased) or "(could not tell which)"
        raise DesignError(
            f"X is not full column rank (X'X is not positive definite): aliased columns "
            f"{names}; remove them from the fixed-effects design"
        ) from None

    satterthwaite = df_method == "satterthwaite"
    fit = _fit_blocks(
        shared,
        arrays,
        t0,
        max_iter,
        epsilon,
        n_threads,
        df_method,
        keep=_Keep(
            cov=output_cov,
            fim=output_fim,
            re=output_re,
            jac=output_cov if output_jac is None else bool(output_jac),
        ),
        nonnegative=bool(nonnegative),
        boundary_df=boundary_df,
        L=None if satterthwaite_contrasts is None else np.asarray(satterthwaite_contrasts, float),
    )
    fitted = fit.pop("fitted")
    n_zero = int(m - fitted.sum())
    if n_zero and warn_zero:
        warnings.warn(
            f"{n_zero} of {m} features have Ynorm <= 0 (all zero) and were not fitted; "
            "their results are NaN",
            ZeroFeatureWarning,
            stacklevel=2,
        )
    finite, constant = finite_features(fit), fit["constant"] == 1.0
    # a constant or non-finite feature has no optimum to converge to
    converged = fitted & (fit["converged"] == 1.0) & finite & ~constant
    status = status_codes(fit["niter"], converged, finite, constant, fit["theta"])
    n_bad = int(fitted.sum() - converged.sum())
    if n_bad:
        log = logger.warning if verbose else logger.debug
        log("%d of %d fitted features did not converge in %d iterations", n_bad, m, max_iter)
        if verbose:
            warnings.warn(
                f"{n_bad} of {m} features did not converge within max_iter = {max_iter}",
                ConvergenceWarning,
                stacklevel=2,
            )

    df_t: float | Array = float(n_cells - p)
    if satterthwaite:
        df_t = fit["df"].T
        n_nan = int(np.sum(np.isnan(df_t[:, fitted])))
        if n_nan:
            logger.warning(
                "Satterthwaite's df is undefined (NaN) for %d coefficient(s) of fitted "
                "features: the observed information of theta is not positive definite there",
                n_nan,
            )
    summary = None
    if output_ss:
        summary = {k: v.copy() for k, v in arrays.items()} | {"n": n_cells, "d": sizes}
    return LmmFit(
        method=method,
        epsilon=float(epsilon),
        df=df_t,
        coef=fit["coef"].T,
        se=fit["se"].T,
        t=fit["t"].T,
        p=fit["p"].T,
        theta=fit["theta"].T,
        se_theta=fit["se_theta"].T,
        dlogL=fit["dlogL"].T,
        logLik=fit["logLik"],
        niter=fit["niter"],
        converged=converged,
        cov=fit.get("cov"),
        FIM_beta=fit.get("FIM_beta"),
        FIM_theta=fit.get("FIM_theta"),
        RE=fit["RE"].T if output_re else None,
        summary_data=summary,
        covariates=covariates,
        features=features,
        components=(*component_names, "residual"),
        random=random,
        n=n_cells,
        d=sizes,
        df_method=df_method,
        vcov_theta=fit.get("vcov_theta"),
        jac_cov=fit.get("jac_cov"),
        contrast_df=fit["contrast_df"].T if "contrast_df" in fit else None,
        status=status,
        nonnegative=bool(nonnegative),
        boundary_df=boundary_df,
    )


def _threads(n_threads: int | None) -> int:
    if n_threads is None:
        return max(1, min(os.cpu_count() or 1, 8))
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1:
        raise InputError(f"n_threads must be a positive integer or None; got {n_threads!r}")
    return n_threads


@dataclass(frozen=True)
class _Keep:
    """Which optional per-feature outputs :func:`_fit_blocks` keeps."""

    cov: bool = True
    fim: bool = False
    re: bool = False
    jac: bool = True


def _fit_blocks(
    shared,
    arrays: dict[str, np.ndarray],
    theta0: np.ndarray | None,
    max_iter: int,
    epsilon: float,
    n_threads: int | None,
    df_method: str = "residual",
    keep: _Keep = _Keep(),
    nonnegative: bool = False,
    L: np.ndarray | None = None,
    boundary_df: str = "lmertest",
) -> dict[str, Array]:
    """Fit the features in blocks; features with Ynorm <= 0 get NaN.

    Always returns theta, se_theta, dlogL, niter, logLik (feature axis first), coef, se, t
    and p (m, p), ``converged`` and ``constant`` (1.0 / 0.0; NaN where not fitted, see
    :mod:`flashmm_dask.model.status`) and the mask ``fitted``; cov, FIM_beta with FIM_theta, and
    RE as ``keep`` says. With ``df_method="satterthwaite"`` also the df of each coefficient
    ("df"), and with ``keep.cov`` ``vcov_theta`` and (``keep.jac``) ``jac_cov`` (for contrasts), and
    with ``L`` the df of those contrasts ("contrast_df", (m, c)).
    """
    p, q, K = shared.p, shared.q, shared.K
    m = arrays["Ynorm"].shape[0]
    XY = np.ascontiguousarray(arrays["XY"].T)
    ZY = np.ascontiguousarray(arrays["ZY"].T)
    Ynorm = arrays["Ynorm"]
    fitted = Ynorm > 0
    satterthwaite = df_method == "satterthwaite"
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
    }
    if keep.cov:
        shapes["cov"] = (p, p)
    if keep.fim:
        shapes.update(FIM_theta=(K + 1, K + 1), FIM_beta=(p, p))
    if keep.re:
        shapes["RE"] = (q,)
    if satterthwaite:
        shapes["df"] = (p,)
        if keep.cov:
            shapes["vcov_theta"] = (K + 1, K + 1)
            if keep.jac:
                shapes["jac_cov"] = (K + 1, p, p)
        if L is not None:
            shapes["contrast_df"] = (L.shape[1],)
    out = {k: np.empty((m, *s)) for k, s in shapes.items()}
    for v in out.values():
        v[~fitted] = np.nan
    idx = np.flatnonzero(fitted)
    block = _SPECTRAL_BLOCK if K == 1 else max(1, _GENERAL_BLOCK_VALUES // shared.work_values)
    workers = _threads(n_threads)
    # several blocks per thread keep both busy while the slowest features iterate on
    block = max(1, min(block, -(-idx.size // (4 * workers)))) if workers > 1 else block
    df_residual = float(shared.n - p)

    def fit_block(rows: np.ndarray) -> None:
        zry, yry = shared.residualise(XY[rows], ZY[rows], Ynorm[rows])
        th = fit_theta(
            shared,
            zry,
            yry,
            theta0=None if theta0 is None else theta0[rows],
            max_iter=max_iter,
            epsilon=epsilon,
        )
        held = None
        if nonnegative:
            th, held = constrain(shared, zry, yry, th, max_iter=max_iter, epsilon=epsilon)
        out["converged"][rows] = converged_rule(th.dlogL, th.FIM_theta, epsilon, held)
        out["constant"][rows] = no_residual_variation(yry, Ynorm[rows])
        fx = fixed_effects(
            shared, XY[rows], ZY[rows], th.theta, th.logdetM0, fim=keep.fim, re=keep.re
        )
        for name in ("theta", "se_theta", "dlogL", "niter"):
            out[name][rows] = getattr(th, name)
        out["coef"][rows] = fx.coef
        out["logLik"][rows] = fx.logLik
        with np.errstate(invalid="ignore", divide="ignore"):
            se = np.sqrt(np.diagonal(fx.cov, axis1=1, axis2=2))
            t = fx.coef / se
        out["se"][rows] = se
        out["t"][rows] = t
        if keep.cov:
            out["cov"][rows] = fx.cov
        if keep.fim:
            out["FIM_theta"][rows] = th.FIM_theta
            out["FIM_beta"][rows] = fx.FIM_beta
        if keep.re:
            out["RE"][rows] = fx.RE
        if satterthwaite:
            vcov_theta = theta_vcov(shared, th.theta, zry, yry, held=held, boundary_df=boundary_df)
            # the coefficients and the contrasts in one pass (one G' diag G product)
            Lall = np.eye(p) if L is None else np.hstack([np.eye(p), L])
            c, g = contrast_gradient(shared, th.theta, fx.cov, Lall)
            df_all = df_from_gradient(c, g, vcov_theta)
            out["df"][rows] = df_all[:, :p]
            if L is not None:
                out["contrast_df"][rows] = df_all[:, p:]
            if keep.cov:
                out["vcov_theta"][rows] = vcov_theta
                if keep.jac:
                    out["jac_cov"][rows] = cov_jacobian(shared, th.theta, fx.cov)

    blocks = [idx[start : start + block] for start in range(0, idx.size, block)]
    if workers > 1 and len(blocks) > 1:
        # The compiled kernels and NumPy's batched algebra release the GIL, so blocks run in
        # parallel threads; BLAS keeps to one thread per call, else concurrent calls queue.
        with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
            list(pool.map(fit_block, blocks))
    else:
        for rows in blocks:
            fit_block(rows)
    out["p"] = t_pvalues(out["t"], out["df"] if satterthwaite else df_residual)
    out["fitted"] = fitted
    return out
