"""One convergence rule and one status per feature, for every fit (lmm, workers, stores).

The fitting core (:func:`flashmm_dask.model.core.fit_features`, which :func:`lmm` and the
workers of a run both call) computes ``converged`` and ``status`` with these functions
(:func:`feature_status`), and the results store derives a missing ``status`` from the same
:func:`status_codes`, so that an in-process fit, a run and a resumed run agree.

Convergence (:func:`converged`): a fitted feature has converged when

1. max |dlogL| <= epsilon (R FLASHMM's rule), where a variance component held at zero by
   ``nonnegative=True`` contributes max(dlogL_k, 0) instead of |dlogL_k| (the projected
   score: at the boundary the score may point out of the parameter space, but not into
   it; the Karush-Kuhn-Tucker condition), and
2. one more Fisher step would raise its log-likelihood by at most :data:`LOGLIK_GAP`
   (half the Newton decrement g' F^-1 g / 2 over the free components). This second test
   does not depend on the scale of the values: for a feature measured in units 1e8 times
   larger the score is 1e16 times smaller, and rule 1 alone would stop after one step,
   far from the optimum. On R's reference cases every feature that R calls converged
   also passes it (tests/test_lmm_reference.py), so R parity is kept.

Status codes (:data:`STATUS`, append-only so that old stores keep their meaning): the
first that applies of all_zero (Ynorm = 0, not fitted), constant (no residual variation
after the fixed effects: yry <= :data:`CONSTANT_RTOL` * Ynorm), non_finite (coef, se,
theta or logLik not finite), not_converged, boundary (a variance component at exactly
zero: held there by ``nonnegative=True``), negative_variance (a variance component below
zero, possible only when unconstrained, as in R FLASHMM), ok.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from flashmm_dask.numerics.compiled_dense import newton_gap_batch

#: Meanings of the status codes 0, 1, 2, ... (codes 5 and 6 added with nonnegative fits, 7
#: for features that model.min_cells leaves unfitted, set by the strata's runs).
STATUS = (
    "ok",
    "not_converged",
    "all_zero",
    "constant",
    "non_finite",
    "boundary",
    "negative_variance",
    "filtered",
)
#: Largest log-likelihood gain one more Fisher step may promise at a converged fit.
LOGLIK_GAP = 1e-6
#: Relative residual sum of squares at or below which a feature has no residual variation.
CONSTANT_RTOL = 1e-9
#: A feature whose results are not all finite has status non_finite.
FINITE_VARS = ("coef", "se", "theta", "logLik")


def projected_score(dlogL: np.ndarray, at_zero: np.ndarray | None = None) -> np.ndarray:
    """The score with the components held at zero replaced by max(dlogL_k, 0).

    Parameters
    ----------
    dlogL : (m, K+1)
    at_zero : (m, K+1) bool, optional; components held at zero (never the residual)
    """
    if at_zero is None or not at_zero.any():
        return dlogL
    return np.where(at_zero, np.maximum(dlogL, 0.0), dlogL)


def loglik_gap(dlogL: np.ndarray, FIM: np.ndarray, at_zero: np.ndarray | None = None) -> np.ndarray:
    """Half the Newton decrement, g' F^-1 g / 2, of each feature over its free components.

    Parameters
    ----------
    dlogL : (m, K+1) score at theta;  FIM : (m, K+1, K+1) Fisher information at theta
    at_zero : (m, K+1) bool, optional; components held at zero, left out of g and F

    Returns
    -------
    (m,) the log-likelihood gain one more Fisher step promises; NaN where the score or
    the information is not finite, or the information has a diagonal entry <= 0 (it
    underflowed, e.g. for values near 1e150).
    """
    g = projected_score(dlogL, at_zero)
    F = FIM
    if at_zero is not None and at_zero.any():
        # a held component: its row and column of F become those of the identity times the
        # residual's information (so that a pseudo-inverse keeps the rest), its g entry 0
        free = ~at_zero
        scale = np.abs(FIM[:, -1, -1])[:, None, None]
        F = np.where(free[:, :, None] & free[:, None, :], FIM, 0.0)
        F = F + np.eye(FIM.shape[1]) * at_zero[:, None, :] * scale
        g = np.where(free, g, 0.0)
    ok = np.isfinite(g).all(axis=1) & np.isfinite(F).all(axis=(1, 2))
    ok &= (np.diagonal(F, axis1=1, axis2=2) > 0).all(axis=1)
    # g' pinv(F) g / 2 with np.linalg.pinv's cut-off, compiled (the batched pinv of 3 x 3
    # matrices was ~3 us a feature, 2.5% of a K = 2 fit)
    return newton_gap_batch(g, F, np.flatnonzero(ok))


def converged(
    dlogL: np.ndarray, FIM: np.ndarray, epsilon: float, at_zero: np.ndarray | None = None
) -> np.ndarray:
    """The convergence rule of every fit (see the module docstring).

    Parameters
    ----------
    dlogL : (m, K+1)   FIM : (m, K+1, K+1)   epsilon : tolerance on the score
    at_zero : (m, K+1) bool, optional; components held at zero by ``nonnegative=True``

    Returns
    -------
    (m,) bool; False for features with a non-finite score.
    """
    g = projected_score(dlogL, at_zero)
    with np.errstate(invalid="ignore"):
        by_score = np.max(np.abs(g), axis=1) <= epsilon
        return by_score & (loglik_gap(dlogL, FIM, at_zero) <= LOGLIK_GAP)


def no_residual_variation(yry: np.ndarray, Ynorm: np.ndarray) -> np.ndarray:
    """(m,) bool: yry <= CONSTANT_RTOL * Ynorm (and Ynorm > 0): the fixed effects explain
    the feature exactly (a constant, a covariate...)."""
    return (Ynorm > 0) & (yry <= CONSTANT_RTOL * Ynorm)


def finite_features(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """(m,) bool: whether coef, se, theta and logLik of each feature are all finite.

    ``arrays`` holds them with the feature axis first.
    """
    rows = [
        np.isfinite(np.asarray(arrays[name], dtype=np.float64).reshape(len(arrays[name]), -1))
        for name in FINITE_VARS
    ]
    return np.asarray(np.concatenate(rows, axis=1).all(axis=1))


def status_codes(
    niter: np.ndarray,
    converged: np.ndarray,
    finite: np.ndarray,
    constant: np.ndarray | None = None,
    theta: np.ndarray | None = None,
) -> np.ndarray:
    """The ``status`` code of each feature: an index into :data:`STATUS`.

    Parameters
    ----------
    niter : (m,) iterations of the fit; NaN for features not fitted (all zero)
    converged : (m,) bool, from :func:`converged`
    finite : (m,) bool, whether every result of the feature is finite
    constant : (m,) bool, optional; no residual variation after the fixed effects
    theta : (m, K+1), optional; the variance components, the residual last

    Returns
    -------
    (m,) int8 array: the first that applies of all_zero, constant, non_finite,
    not_converged, boundary, negative_variance, ok.
    """
    code = {name: np.int8(k) for k, name in enumerate(STATUS)}
    out = np.full(np.shape(niter), code["ok"], dtype=np.int8)
    if theta is not None:
        components = np.asarray(theta, dtype=np.float64)[:, :-1]
        out[(components < 0).any(axis=1)] = code["negative_variance"]
        out[(components == 0).any(axis=1)] = code["boundary"]
    out[~np.asarray(converged, dtype=bool)] = code["not_converged"]
    out[~np.asarray(finite, dtype=bool)] = code["non_finite"]
    if constant is not None:
        out[np.asarray(constant, dtype=bool)] = code["constant"]
    out[np.isnan(np.asarray(niter, dtype=np.float64))] = code["all_zero"]
    return out


def feature_status(
    arrays: Mapping[str, np.ndarray], fitted: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``converged`` and ``status`` of the features of a fit (lmm's and the workers').

    Parameters
    ----------
    arrays : the fit's arrays, feature axis first: coef, se, theta, logLik, niter, and
        ``converged`` (1.0 where :func:`converged` holds) and ``constant`` (1.0 where
        :func:`no_residual_variation` holds), NaN where not fitted
    fitted : (m,) bool, the features that were fitted (Ynorm > 0)

    Returns
    -------
    converged : (m,) bool;  status : (m,) int8 codes into :data:`STATUS`
    """
    finite, constant = finite_features(arrays), arrays["constant"] == 1.0
    # a constant or non-finite feature has no optimum to converge to
    done = fitted & (arrays["converged"] == 1.0) & finite & ~constant
    return done, status_codes(arrays["niter"], done, finite, constant, arrays["theta"])


def status_names(codes: np.ndarray) -> np.ndarray:
    """The names of status codes (an object array); "not_written" for code -1 (a feature
    of a results store whose block is not written yet), as in the run's tables."""
    codes = np.asarray(codes, dtype=np.int64)
    names = np.asarray([*STATUS, "not_written"], dtype=object)
    return names[np.where(codes < 0, len(STATUS), codes)]
