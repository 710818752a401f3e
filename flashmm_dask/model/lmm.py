"""``lmm``: fit the FLASH-MM linear mixed model of many features from summary statistics.

The inputs follow the R package's orientation (ALGORITHM.md)::

    XX (p, p)   XY (p, m)   ZX (q, p)   ZY (q, m)   ZZ (q, q)   Ynorm (m,)   n

They are checked and converted once, here, with the names of their pandas labels, and the
shared terms of (XX, ZX, ZZ) are prepared; the fitting core
(:func:`flashmm_dask.model.core.fit_features`, which a run's workers call directly) then
fits blocks of features (feature axis first).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from flashmm_dask.errors import ConvergenceWarning, InputError, ZeroFeatureWarning
from flashmm_dask.model.core import FitOptions, Keep, default_threads, fit_features, prepare_terms
from flashmm_dask.model.fit import LmmFit
from flashmm_dask.model.status import STATUS
from flashmm_dask.numerics.fisher import METHODS
from flashmm_dask.numerics.linalg import Array
from flashmm_dask.numerics.satterthwaite import BOUNDARY_DF, DF_METHODS
from flashmm_dask.numerics.zz_scan import Ahead, scan
from flashmm_dask.stats.summary import SummaryStats, summary_shapes

logger = logging.getLogger(__name__)

#: The sizes of the random components: a sequence, a mapping name -> size, or a Series.
Components: TypeAlias = Sequence[int] | Mapping[str, int] | pd.Series


def _labels(obj: object, axis: int) -> list[str] | None:
    if isinstance(obj, pd.DataFrame):
        return [str(x) for x in (obj.index if axis == 0 else obj.columns)]
    if isinstance(obj, pd.Series) and axis == 0:
        return [str(x) for x in obj.index]
    return None


def _as_matrix(name: str, obj: ArrayLike, ndim: int) -> np.ndarray:
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
    return _default_names(prefix, size)


@functools.lru_cache(maxsize=16)
def _default_names(prefix: str, size: int) -> tuple[str, ...]:
    """prefix1 .. prefix<size>, kept: the 7,770 random-effect names of the nested atlas
    design took ~1-3 ms per call, 10% of a whole donor-only fit."""
    return tuple(f"{prefix}{i + 1}" for i in range(size))


def _check_finite(name: str, a: np.ndarray, features: tuple[str, ...] | None = None) -> None:
    # a finite sum has no NaN or Inf among its terms: one pass without temporaries (the
    # nested atlas's 483 MB Z'Z: 31 -> 15 ms); the entries are looked at only otherwise
    if np.isfinite(np.sum(a)):
        return
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


def _components(d: Components | None, q: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
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


def _zz_not_finite() -> InputError:
    return InputError("ZZ contains NaN or Inf; the shared statistics must be finite")


def _cells(n: int, p: int) -> int:
    """The checked number of cells."""
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
    return n_cells


def _theta0(theta0: ArrayLike | None, K: int, m: int) -> np.ndarray | None:
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
    XX: ArrayLike,
    XY: ArrayLike,
    ZX: ArrayLike,
    ZY: ArrayLike,
    ZZ: ArrayLike,
    Ynorm: ArrayLike,
    n: int,
    d: Components | None = None,
    *,
    method: str = "REML",
    df: str = "residual",
    nonnegative: bool = False,
    boundary_df: str = "lmertest",
    theta0: ArrayLike | None = None,
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
    satterthwaite_contrasts: ArrayLike | None = None,
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
    method = _method(method)
    jac = output_cov if output_jac is None else bool(output_jac)
    keep = Keep(cov=output_cov, fim=output_fim, re=output_re, jac=jac)
    options = _options(
        df, nonnegative, max_iter, epsilon, n_threads, keep, satterthwaite_contrasts, boundary_df
    )
    df_method = options.df

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
    sizes, component_names = _components(d, q)
    for name in ("XX", "ZX"):
        _check_finite(name, arrays[name])
    # with K >= 2, one pass over ZZ also finds which of its diagonal blocks are diagonal
    # (the structured path's question; the atlas's nested ZZ is 483 MB). With threads, the
    # pass runs in one of its own while the fit starts with the structure its first rows
    # suggest, kept only where the pass confirms it (zz_scan.Ahead)
    zz, ahead = None, None
    if len(sizes) > 1 and options.n_threads > 1 and Ahead.possible(arrays["ZZ"]):
        ahead = Ahead(arrays["ZZ"], sizes)
    elif len(sizes) > 1:
        zz = scan(arrays["ZZ"], sizes, options.n_threads)
        if not zz.finite:
            raise _zz_not_finite()
    else:
        _check_finite("ZZ", arrays["ZZ"])
    try:
        for name in ("XY", "ZY", "Ynorm"):
            _check_finite(name, arrays[name], features)
        n_cells = _cells(n, p)
        t0 = _theta0(theta0, len(sizes), m)
    except InputError:
        if ahead is not None and not ahead.result().finite:
            raise _zz_not_finite() from None
        raise

    def prepare_and_fit(diagonal: tuple[bool, ...] | None) -> dict[str, Array]:
        shared = prepare_terms(
            arrays["XX"],
            arrays["ZX"],
            arrays["ZZ"],
            n_cells,
            sizes,
            method,
            covariates,
            diagonal=diagonal,
        )
        return fit_features(shared, arrays["XY"], arrays["ZY"], arrays["Ynorm"], options, t0)

    if ahead is None:
        fit = prepare_and_fit(None if zz is None else zz.diagonal)
    else:
        try:
            guessed: dict[str, Array] | None = prepare_and_fit(ahead.guess)
        except Exception:
            if ahead.confirms():  # the fit's own error
                raise
            guessed = None
        if not ahead.result().finite:
            raise _zz_not_finite()
        if guessed is not None and ahead.confirms():
            fit = guessed
        else:  # an entry the guess did not see: the structure the scan found
            fit = prepare_and_fit(ahead.result().diagonal)
    fitted = fit["fitted"]
    n_zero = int(m - fitted.sum())
    if n_zero and warn_zero:
        warnings.warn(
            f"{n_zero} of {m} features have Ynorm <= 0 (all zero) and were not fitted; "
            "their results are NaN",
            ZeroFeatureWarning,
            stacklevel=2,
        )
    converged = fit["converged"]
    n_bad = int(fitted.sum() - converged.sum())
    if n_bad:
        text = _not_converged_text(fit, m, max_iter)
        (logger.warning if verbose else logger.debug)(text)
        if verbose:
            warnings.warn(text, ConvergenceWarning, stacklevel=2)

    df_t: float | Array = float(n_cells - p)
    if df_method == "satterthwaite":
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
        status=fit["status"],
        nonnegative=bool(nonnegative),
        boundary_df=boundary_df,
    )


def lmm_summary(stats: SummaryStats, **kwargs: Any) -> LmmFit:
    """:func:`lmm` of a :class:`~flashmm_dask.stats.summary.SummaryStats`, keeping its names
    (covariates, random effects, components, features); keyword arguments go to :func:`lmm`.

    :func:`flashmm_dask.lmm_stats` adds the design check; the tests of
    :mod:`flashmm_dask.model.lrt` fit reduced statistics with this.
    """
    cov, ran, feat = list(stats.covariates), list(stats.random), list(stats.features)
    return lmm(
        pd.DataFrame(np.asarray(stats.XX), index=cov, columns=cov),
        pd.DataFrame(np.asarray(stats.XY), index=cov, columns=feat),
        pd.DataFrame(np.asarray(stats.ZX), index=ran, columns=cov),
        pd.DataFrame(np.asarray(stats.ZY), index=ran, columns=feat),
        pd.DataFrame(np.asarray(stats.ZZ), index=ran, columns=ran),
        pd.Series(np.asarray(stats.Ynorm), index=feat),
        stats.n,
        dict(zip(stats.components, stats.d, strict=True)),
        **kwargs,
    )


def _method(method: str) -> str:
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise InputError(f"unknown method {method!r}; use 'REML' or 'ML'")
    return method.upper()


def _options(
    df: str,
    nonnegative: bool,
    max_iter: int,
    epsilon: float,
    n_threads: int | None,
    keep: Keep,
    contrasts: ArrayLike | None,
    boundary_df: str = "lmertest",
) -> FitOptions:
    """:func:`lmm`'s keywords, checked, as the settings of the fitting core (a new keyword
    of ``lmm``: one parameter here and one field of :class:`FitOptions`)."""
    if not isinstance(df, str) or df.lower() not in DF_METHODS:
        raise InputError(f"unknown df {df!r}; use 'residual' (n - p) or 'satterthwaite'")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 0:
        raise InputError(f"max_iter must be a non-negative integer; got {max_iter!r}")
    if not np.isfinite(epsilon) or epsilon <= 0:
        raise InputError(f"epsilon must be a positive number; got {epsilon!r}")
    if not isinstance(nonnegative, (bool, np.bool_)):
        raise InputError(f"nonnegative must be True or False; got {nonnegative!r}")
    if boundary_df not in BOUNDARY_DF:
        raise InputError(f"unknown boundary_df {boundary_df!r}; use one of {BOUNDARY_DF}")
    return FitOptions(
        df=df.lower(),
        nonnegative=bool(nonnegative),
        boundary_df=boundary_df,
        max_iter=int(max_iter),
        epsilon=float(epsilon),
        n_threads=_threads(n_threads),
        keep=keep,
        contrasts=None if contrasts is None else np.asarray(contrasts, float),
    )


def _not_converged_text(fit: dict[str, Array], m: int, max_iter: int) -> str:
    """What the features not converged of a fit are, and what to do: those that reached
    max_iter, and those stopped earlier by R's rule (max |dlogL| <= epsilon) short of the
    optimum, as the values of a large scale are (the score shrinks with the square of
    their scale; epsilon, not max_iter, is then the remedy)."""
    status = fit["status"]
    bad = status == STATUS.index("not_converged")
    at_max = int((bad & (fit["niter"] >= max_iter)).sum())
    early = int(bad.sum()) - at_max
    other = int((fit["fitted"] & ~fit["converged"]).sum()) - at_max - early
    parts = []
    if at_max:
        parts.append(f"{at_max} reached max_iter = {max_iter} (raise max_iter)")
    if early:
        parts.append(
            f"{early} stopped earlier by R's rule max |dlogL| <= epsilon short of the "
            "optimum, as happens for values of a large scale (the score shrinks with the "
            "square of their scale): lower epsilon (e.g. epsilon=1e-12) or rescale the values"
        )
    if other:
        parts.append(f"{other} constant or with non-finite results (see status)")
    n_bad = at_max + early + other
    return f"{n_bad} of {m} features did not converge: " + "; ".join(parts)


def _threads(n_threads: int | None) -> int:
    if n_threads is None:
        return default_threads()
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1:
        raise InputError(f"n_threads must be a positive integer or None; got {n_threads!r}")
    return n_threads
