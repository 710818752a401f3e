"""A safeguarded search over variance components >= 0, for the fits scoring could not end.

Fisher scoring takes full steps without checking that the likelihood rises, as R FLASHMM
does, and on some designs it runs away: with a few donors and a second component (donor +
donor:state, donor + batch) the unconstrained fit ends at max_iter or at non-finite
values, and the constrained fit built on it (:func:`.boundary.constrain`) may stop with a
held component whose score points into the interior. lme4's optimiser reaches the
optimum over theta >= 0 there. :func:`ascend` gives such features (``nonnegative=True``
only: the unconstrained fit stays R's) a projected Newton (or Fisher scoring) search with
backtracking on the residual-variance-profiled log-likelihood

    l_p(rho) = -(n - r)(1 + log(2 pi s0(rho))) / 2 + log|det M0(rho)| / 2,
    rho = theta_k / s0,  s0(rho) = (yry - zry' M D zry) / (n - r),

which equals the (restricted) log-likelihood maximised over s0 at those ratios, so every
accepted step raises the likelihood:

1. start from the constrained fit (where finite and >= 0) and from a start on every face
   of theta >= 0 (each set of components at zero, the others at a tenth of the residual
   variance's estimate; with K > 3 every variance at zero, each component alone and all
   of them): the likelihood may have several maxima, and the highest end is kept;
2. at theta (residual at s0(rho)): the score g and information F of the full model (the
   observed information, Newton's, where it is positive definite: Fisher scoring converges
   linearly, and slowly near a variance of zero; the expected one elsewhere); the
   free components are those above zero or with g_k > 0, less those at zero whose step
   would leave the boundary downwards (so that a small step is an ascent direction);
   step = pinv(F_free) g_free (F the information chosen), scaled to unit diagonal first
   (a slope's variance and an intercept's may differ by ten orders of magnitude in
   information, where a pseudo-inverse of F itself drops a direction and the search
   would never move along it);
3. theta + a step, components below zero set to zero, the residual set to the profiled
   s0 of the new ratios; a = 1, 1/2, 1/4, ... until l_p rises;
4. stop when R's rule holds on the projected score and one more step promises a gain
   below :data:`GAP` (stricter than the fit's rule, whose 1e-6 leaves relative errors of
   about 1e-3 se(theta) in theta), or when no step raises l_p. At the optimum l_p
   changes by rounding only while the score may still exceed epsilon (R's rule is not
   scale-free): a full step that lowers l_p by no more than rounding (:data:`ROUNDING`)
   is still taken, at most :data:`FLAT_STEPS` times, and the score says whether the fit
   converged.

Features are processed together (a block at a time), each with its own step length.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np

from flashmm_dask.numerics.boundary import RESTART_SHARE, full_score
from flashmm_dask.numerics.fisher import FixedTerms, SharedTerms, ThetaFit
from flashmm_dask.numerics.linalg import Array, pinv_free

__all__ = ["HALVINGS", "ascend", "ascended"]

#: Up to this many components, the search starts on every face of theta >= 0 (2^K starts).
MAX_FACES_K = 3
#: Step halvings tried before a feature's search stops (a step of 2^-40 changes nothing).
HALVINGS = 40
#: The search goes on until one more step promises at most this gain in l_p (the fit's rule
#: asks for 1e-6, which leaves relative errors of ~1e-3 se(theta) in theta; this search is
#: not R's, so it goes to the optimum), or until no step raises l_p.
GAP = 1e-12
#: Smallest eigenvalue of the observed information scaled to unit diagonal for a Newton step
#: (Fisher's expected information below it).
POSITIVE = 1e-8
#: Relative change of l_p that counts as rounding: at the optimum a full step may lower l_p
#: by this much and is still taken (the score, not l_p, then says whether it converged),
#: at most FLAT_STEPS times a feature.
ROUNDING = 1e-12
FLAT_STEPS = 50


def _profiled(sh: SharedTerms, theta: Array, zry: Array, yry: Array, z: Array | None):
    """l_p at the ratios of theta, and theta with its residual set to s0(rho) there. Rows
    whose theta has a residual <= 0, a variance below zero or a non-finite entry get
    l_p = -inf."""
    from flashmm_dask.numerics.fixed import _loglik

    K = sh.K
    lp = np.full(theta.shape[0], -np.inf)
    ok = np.isfinite(theta).all(axis=1) & (theta[:, K] > 0) & (theta[:, :K] >= 0).all(axis=1)
    at = theta.copy()
    rows = np.flatnonzero(ok)
    if rows.size:
        zr = None if z is None else z[rows]
        first = full_score(sh, theta[rows], zry[rows], yry[rows], final=True, z=zr)
        s0 = first.s0_profiled
        good = np.isfinite(s0) & (s0 > 0)
        scaled = theta[rows] * (s0 / theta[rows, K])[:, None]
        scaled[:, K] = s0
        at[rows] = np.where(good[:, None], scaled, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            value = _loglik(sh, s0, first.logdetM0)
        lp[rows] = np.where(good & np.isfinite(value), value, -np.inf)
    return lp, at


def _score(sh: SharedTerms, theta: Array, zry: Array, yry: Array, z: Array | None):
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return full_score(sh, theta, zry, yry, final=True, z=z)


def _curvature(
    sh: SharedTerms,
    theta: Array,
    zry: Array,
    yry: Array,
    z: Array | None,
    F: Array,
    dl: Array,
) -> Array:
    """The observed information (minus the Hessian: Newton's steps, which converge fast
    where Fisher's crawl, near a variance of zero) where it is positive definite over the
    components not held at zero (those at zero whose score points out), the expected
    information F elsewhere."""
    from flashmm_dask.numerics.satterthwaite import observed_information

    K = sh.K
    held = np.zeros(theta.shape, dtype=bool)
    held[:, :K] = (theta[:, :K] <= 0) & ~(dl[:, :K] > 0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        H = observed_information(sh, theta, zry, yry, z=z, fim=F)
        d = np.sqrt(np.abs(np.diagonal(H, axis1=1, axis2=2)))
        d = np.where(np.isfinite(d) & (d > 0), d, 1.0)
        unit = H / (d[:, :, None] * d[:, None, :])
        free = ~held
        unit = np.where(free[:, :, None] & free[:, None, :], unit, 0.0)
        unit = unit + np.eye(K + 1) * held[:, None, :]
        ok = np.isfinite(unit).all(axis=(1, 2))
        lowest = np.full(len(H), -np.inf)
        lowest[ok] = np.linalg.eigvalsh(unit[ok])[:, 0]
    return np.where((lowest > POSITIVE)[:, None, None], H, F)


def _step(dl: Array, F: Array, theta: Array, K: int) -> tuple[Array, np.ndarray]:
    """The projected step of the score ``dl`` with the information ``F`` (observed or
    expected), and the components held at zero ((m, K+1) bool)."""
    at_zero = np.zeros(theta.shape, dtype=bool)
    at_zero[:, :K] = theta[:, :K] <= 0
    held = at_zero & ~(dl > 0)
    # pinv_free scales the information to unit diagonal: its entries may span ten orders of
    # magnitude (a slope's variance against an intercept's), where a pseudo-inverse of F
    # itself drops the small directions and the search would never move along them
    for _ in range(K + 1):  # hold those at zero whose step points out of the space
        with np.errstate(invalid="ignore", divide="ignore"):
            step = np.einsum("mij,mj->mi", pinv_free(F, ~held), np.where(held, 0.0, dl))
        leaving = at_zero & ~held & (step < 0)
        if not leaving.any():
            break
        held |= leaving
    return np.where(held, 0.0, step), held


def ascend(
    sh: SharedTerms,
    zry: Array,
    yry: Array,
    fit: ThetaFit,
    rows: np.ndarray,
    *,
    epsilon: float = 1e-5,
    max_steps: int = 50,
    z: Array | None = None,
) -> tuple[ThetaFit, np.ndarray]:
    """The safeguarded search for the features ``rows`` of ``fit`` (see the module).

    Parameters
    ----------
    sh : SharedTerms
    zry : (m, q)   yry : (m,)   the statistics of ``fit``'s features
    fit : ThetaFit over variance components >= 0 (:func:`.boundary.constrain`)
    rows : indices of the features to search again (e.g. those that did not converge)
    epsilon : R's rule on the score, as the fit's
    max_steps : steps of the search at most (a run's max_iter: the search gets as many
        steps as the scoring had iterations)
    z : (m, q), optional; K = 1: zry @ sh.U

    Returns
    -------
    fit : ThetaFit with those rows replaced where the search ends higher in likelihood
        than ``fit`` (theta, se_theta, dlogL, FIM_theta, niter (+ its steps), logdetM0; the
        nested path's terms of the fixed effects dropped there)
    improved : (len(rows),) bool, which of them were replaced: higher in likelihood, or as
        high to rounding where the search met its stopping rule
    """
    from flashmm_dask.model.status import converged as converged_rule
    from flashmm_dask.model.status import loglik_gap

    K = sh.K
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return fit, np.zeros(0, dtype=bool)
    zr0, y0 = zry[rows], yry[rows]
    zu0 = None if z is None else z[rows]
    before, at_fit = _profiled(sh, fit.theta[rows], zr0, y0, zu0)
    # the likelihood may have several maxima over theta >= 0, one on each face: the search
    # runs from the fit and from starts on every face (each set of components at zero, the
    # others at RESTART_SHARE of the residual's estimate; with K > 3 every variance at zero
    # and each component alone), and the highest end is kept
    s0 = y0 / (sh.n - sh.r)
    if K <= MAX_FACES_K:
        masks = [np.array(m, dtype=float) for m in itertools.product((0.0, 1.0), repeat=K)]
    else:
        masks = [np.ones(K), np.zeros(K), *np.eye(K)]
    starts = [at_fit] + [np.column_stack([np.outer(s0, RESTART_SHARE * m), s0]) for m in masks]
    C = len(starts)
    zr, y = np.tile(zr0, (C, 1)), np.tile(y0, C)
    zu = None if zu0 is None else np.tile(zu0, (C, 1))
    lp, theta = _profiled(sh, np.concatenate(starts), zr, y, zu)
    steps = np.zeros(lp.size, dtype=np.int64)
    flats = np.zeros(lp.size, dtype=np.int64)
    settled = np.zeros(lp.size, dtype=bool)  # the search's own stopping rule met
    active = np.flatnonzero(np.isfinite(lp))
    for _ in range(max_steps):
        if active.size == 0:
            break
        sub = None if zu is None else zu[active]
        sc = _score(sh, theta[active], zr[active], y[active], sub)
        curvature = _curvature(sh, theta[active], zr[active], y[active], sub, sc.F, sc.dl)
        step, held = _step(sc.dl, curvature, theta[active], K)
        with np.errstate(invalid="ignore"):
            done = converged_rule(sc.dl, sc.F, epsilon, held) & (
                loglik_gap(sc.dl, sc.F, held) <= GAP
            )
        settled[active[done]] = True
        go = active[~done]
        step = step[~done]
        active = go
        if go.size == 0:
            break
        accepted = np.zeros(go.size, dtype=bool)
        a = 1.0
        for _ in range(HALVINGS):
            todo = np.flatnonzero(~accepted)
            if todo.size == 0:
                break
            trial = theta[go[todo]] + a * step[todo]
            trial[:, :K] = np.maximum(trial[:, :K], 0.0)
            sub = None if zu is None else zu[go[todo]]
            value, at = _profiled(sh, trial, zr[go[todo]], y[go[todo]], sub)
            up = value > lp[go[todo]]
            if a == 1.0:  # at the optimum l_p changes by rounding only: full steps go on
                level = lp[go[todo]]
                flat = (value >= level - ROUNDING * np.maximum(1.0, np.abs(level))) & (
                    flats[go[todo]] < FLAT_STEPS
                )
                flats[go[todo[flat & ~up]]] += 1
                up |= flat
            pick = go[todo[up]]
            theta[pick], lp[pick] = at[up], value[up]
            steps[pick] += 1
            accepted[todo[up]] = True
            a *= 0.5
        active = go[accepted]  # a feature no step raises is as high as this search goes
    # each feature's highest end over its starts
    ends = np.where(np.isfinite(lp), lp, -np.inf).reshape(C, rows.size)
    best = np.argmax(ends, axis=0) * rows.size + np.arange(rows.size)
    theta, lp, steps, settled = theta[best], lp[best], steps[best], settled[best]
    zr, y, zu = zr0, y0, zu0
    # higher; or as high to rounding and converged, where the fit was not
    tied = settled & (lp >= before - ROUNDING * np.maximum(1.0, np.abs(before)))
    improved = np.isfinite(lp) & (~(lp <= before) | tied)
    if not improved.any():
        return fit, improved
    pick = rows[improved]
    th = theta[improved]
    sub = None if zu is None else zu[improved]
    final = _score(sh, th, zr[improved], y[improved], sub)
    held = np.zeros(th.shape, dtype=bool)
    held[:, :K] = th[:, :K] <= 0
    with np.errstate(invalid="ignore"):
        se = np.sqrt(np.diagonal(pinv_free(final.F, ~held), axis1=1, axis2=2))
    out = {}
    for name, value in (
        ("theta", th),
        ("se_theta", np.where(held, np.nan, se)),
        ("dlogL", final.dl),
        ("FIM_theta", final.F),
        ("logdetM0", final.logdetM0),
    ):
        values = getattr(fit, name).copy()
        values[pick] = value
        out[name] = values
    niter = fit.niter.copy()
    niter[pick] += steps[improved]
    out["niter"] = niter
    gram = fit.gram
    if gram is not None:  # the nested path's terms were of the old theta
        gram = FixedTerms(gram.C.copy(), gram.a.copy(), gram.ok.copy())
        gram.ok[pick] = False
    return replace(fit, **out, gram=gram), improved


def ascended(
    sh: SharedTerms,
    zry: Array,
    yry: Array,
    fit: ThetaFit,
    held: np.ndarray,
    eligible: np.ndarray,
    *,
    epsilon: float = 1e-5,
    max_iter: int = 50,
    z: Array | None = None,
) -> tuple[ThetaFit, np.ndarray]:
    """:func:`ascend` (``max_iter`` steps at most) for the ``eligible`` features ((m,)
    bool: e.g. with residual variation) of a constrained ``fit`` whose score does not meet
    the convergence rule; ``held`` ((m, K+1) bool, :func:`.boundary.constrain`'s) follows
    the new theta."""
    from flashmm_dask.model.status import converged as converged_rule

    with np.errstate(invalid="ignore"):
        unsettled = ~converged_rule(fit.dlogL, fit.FIM_theta, epsilon, held)
    rows = np.flatnonzero(unsettled & eligible & np.isfinite(yry) & (yry > 0))
    if rows.size == 0:
        return fit, held
    fit, improved = ascend(sh, zry, yry, fit, rows, epsilon=epsilon, max_steps=max_iter, z=z)
    if improved.any():
        held = held.copy()
        pick = rows[improved]
        held[pick, : sh.K] = fit.theta[pick, : sh.K] <= 0
    return fit, held
