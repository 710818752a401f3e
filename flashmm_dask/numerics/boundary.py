"""Variance components constrained to be non-negative: the optimum on the boundary.

R FLASHMM's Fisher scoring (:func:`~flashmm_dask.numerics.fisher.fit_theta`) is
unconstrained: a random component without support in the data ends at a negative
variance. lme4 optimises over variances >= 0 instead and reports the optimum on the
boundary (a "singular" fit). :func:`constrain` turns an unconstrained fit into that one,
from the same summary statistics:

1. features whose components are all >= 0 are left exactly as they are (an interior
   optimum is the constrained optimum too);
2. every component below zero is held at zero and the model is refitted without it: its
   columns of Z leave ZX, ZZ and zry, the other components are re-estimated by the same
   Fisher scoring on the reduced statistics (R's default start). With no component left
   the model is the linear model, s0 = yry / (n - r). The log-likelihood of the full
   model with theta_k = 0 is the reduced model's, so this is the optimum on that face.
   On the structured path (K >= 2 through the block structure of ZZ) the refit keeps the
   full model's terms and pins the held components at exactly zero instead
   (``fit_theta(..., fixed=)``): V is the reduced model's, so are the log-likelihood,
   the score and information of the free components, the steps and the stopping rule,
   at the cost of a structured fit. Reduced terms would cost far more there: without
   the small component of nested factors (donor + donor:state) the reduced model is
   K = 1 with the large one, whose spectral terms eigendecompose a dense q x q matrix;
3. Karush-Kuhn-Tucker check: a held component whose score at the boundary points into
   the interior (dlogL_k > epsilon) is freed again (restarted at the coordinate Newton
   step dlogL_k / F_kk > 0), and a free component that the refit drives below zero is
   held; repeat until nothing changes. Freeing stops after K + 1 rounds, so the loop ends
   (holding only adds components) with every component >= 0.

Features are refitted in batches, one batch per set of held components.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from flashmm_dask.numerics import structured
from flashmm_dask.numerics.fisher import (
    FixedTerms,
    SharedTerms,
    ThetaFit,
    _score_compiled,
    _score_structured,
    fit_theta,
    prepare,
)
from flashmm_dask.numerics.linalg import Array, pinv_free
from flashmm_dask.numerics.scores import _Score, _score_general
from flashmm_dask.numerics.spectral_terms import score_batch


def reduced_terms(sh: SharedTerms, held: np.ndarray) -> tuple[SharedTerms, np.ndarray]:
    """The shared terms of the model without the components ``held`` ((K,) bool).

    Returns the reduced terms and the indices of the random-effect columns kept.
    """
    cols = np.concatenate(
        [np.arange(s.start, s.stop) for s, h in zip(sh.slices, held, strict=True) if not h]
    ).astype(np.int64)
    sub = prepare(sh.XX, sh.ZX[cols], sh.ZZ[np.ix_(cols, cols)], sh.n, sh.d[~held], sh.method)
    return sub, cols


def _refit(
    sh: SharedTerms,
    zry: Array,
    yry: Array,
    held: np.ndarray,
    theta0: Array | None,
    max_iter: int,
    epsilon: float,
    cache: dict[bytes, tuple[SharedTerms, np.ndarray]],
    pinned: bool,
    gram: FixedTerms | None = None,
) -> tuple[Array, np.ndarray, _Score | None]:
    """Fit the features with their components ``held`` (m, K) at zero: theta (m, K+1),
    niter, and where ``pinned`` the full model's score and information at theta from the
    refits' final evaluation (None otherwise; NaN for the features with every component
    held). ``gram`` (m rows): where given and ``pinned``, the nested fit's terms of the
    fixed effects at the refitted theta (:class:`.fisher.FixedTerms`) go into it, ok False
    where a refit has none (the linear model, another path)."""
    m, K = held.shape
    theta = np.zeros((m, K + 1))
    niter = np.zeros(m, dtype=np.int64)
    score = _Score(
        np.full((m, K + 1), np.nan), np.full((m, K + 1, K + 1), np.nan), np.zeros(m), np.zeros(m)
    )
    if gram is not None:
        gram.ok[:] = False
    patterns, which = np.unique(held, axis=0, return_inverse=True)
    for g, pattern in enumerate(patterns):
        rows = np.flatnonzero(which.ravel() == g)
        if pattern.all():  # no random component left: the linear model
            theta[rows, K] = yry[rows] / (sh.n - sh.r)
            continue
        free = np.append(~pattern, True)
        if pinned:
            # the components held at exactly zero in the full model's terms: the same V,
            # log-likelihood, steps and stopping rule as the reduced model, at the cost of
            # one structured fit (the reduced model of nested factors is K = 1 with the
            # large component: its spectral terms are a dense q x q eigendecomposition)
            th = fit_theta(
                sh,
                zry[rows],
                yry[rows],
                theta0=None if theta0 is None else theta0[rows],
                max_iter=max_iter,
                epsilon=epsilon,
                fixed=pattern,
            )
            theta[rows], niter[rows] = th.theta, th.niter
            score.dl[rows], score.F[rows], score.logdetM0[rows] = (
                th.dlogL,
                th.FIM_theta,
                th.logdetM0,
            )
            if gram is not None and th.gram is not None:
                gram.C[rows], gram.a[rows], gram.ok[rows] = th.gram.C, th.gram.a, th.gram.ok
            continue
        if pattern.any():
            key = pattern.tobytes()
            if key not in cache:
                cache[key] = reduced_terms(sh, pattern)
            sub, cols = cache[key]
            sub_zry = zry[rows][:, cols]
        else:
            sub, sub_zry = sh, zry[rows]
        start = None if theta0 is None else theta0[rows][:, free]
        th = fit_theta(sub, sub_zry, yry[rows], theta0=start, max_iter=max_iter, epsilon=epsilon)
        theta[np.ix_(rows, np.flatnonzero(free))] = th.theta
        niter[rows] = th.niter
    return theta, niter, score if pinned else None


def full_score(
    sh: SharedTerms,
    theta: Array,
    zry: Array,
    yry: Array,
    *,
    final: bool = False,
    z: Array | None = None,
):
    """Score, information, profiled s0 and log|det M0| of the full model at theta.

    K = 1: by the compiled sums of :func:`.spectral_terms.score_batch` on z = zry U (given,
    or computed here); log|det M0| is NaN unless ``final``. The structured path: the
    scorer of its fit (:func:`.fisher._score_structured`, O(q) per nested feature).
    """
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if sh.K == 1:
            zu = zry @ sh.U if z is None else z
            return _Score(*score_batch(sh, zu, theta, yry, final))
        if sh.path == "structured":
            assert sh.structure is not None
            with structured.one_blas_thread():
                return _score_structured(sh, theta, zry[:, sh.structure.perm], yry, final=final)
        try:
            return _score_compiled(sh, theta, zry, yry, final=final)
        except Exception:  # pragma: no cover - the NumPy algebra is the reference
            return _score_general(sh, theta, zry, yry, final=final)


def _score_at(
    sh: SharedTerms,
    theta: Array,
    zry: Array,
    yry: Array,
    z: Array | None,
    pick: np.ndarray,
    hold: np.ndarray,
    last: _Score | None,
    final: bool = False,
) -> _Score:
    """The full model's score at theta of the features ``pick``: from ``last`` (the
    pinned refits' own final evaluation at that theta, the same numbers) where given,
    by :func:`full_score` for the rest (every component held: no refit evaluated it)."""
    if last is None:
        zp = None if z is None else z[pick]
        return full_score(sh, theta[pick], zry[pick], yry[pick], final=final, z=zp)
    out = _Score(last.dl[pick], last.F[pick], last.s0_profiled[pick], last.logdetM0[pick])
    linear = np.flatnonzero(hold[pick].all(axis=1))
    if linear.size:
        rest = full_score(
            sh, theta[pick[linear]], zry[pick[linear]], yry[pick[linear]], final=final
        )
        out.dl[linear], out.F[linear], out.logdetM0[linear] = rest.dl, rest.F, rest.logdetM0
    return out


def constrain(
    sh: SharedTerms,
    zry: Array,
    yry: Array,
    fit: ThetaFit,
    *,
    max_iter: int = 50,
    epsilon: float = 1e-5,
    z: Array | None = None,
    pinned: bool | None = None,
    theta0: Array | None = None,
) -> tuple[ThetaFit, np.ndarray]:
    """The fit over variance components >= 0, from an unconstrained one.

    Parameters
    ----------
    sh : SharedTerms
    zry : (m, q)   yry : (m,)   the statistics the fit came from
    fit : ThetaFit, unconstrained (:func:`~flashmm_dask.numerics.fisher.fit_theta`)
    max_iter, epsilon : of the refits
    z : (m, q) array, optional
        K = 1: the projections zry @ sh.U where the caller has them (the full model's
        score is computed from them).
    pinned : bool, optional
        Refit with the held components pinned at zero in the full model's terms (True)
        or on the reduced model's terms (False); default: pinned on the structured path
        (``sh.path == "structured"``), reduced elsewhere. The two give the same fit.
    theta0 : (m, K+1) array, optional
        Where the first refits start (the held components' entries are not read);
        default R's start, as ``fit_theta``'s.

    Returns
    -------
    fit : ThetaFit
        Rows of features with a negative component replaced by the boundary optimum:
        theta with those components exactly 0, dlogL and FIM_theta of the full model there
        (the held components' score is <= epsilon), se_theta NaN for held components,
        niter the unconstrained iterations plus the refits', logdetM0 of the reduced model,
        and the nested path's terms of the fixed effects (``gram``) at the refitted theta
        from the pinned refits (never those of the unconstrained theta: ok False where a
        refit has none). The other rows are the input's, unchanged.
    held : (m, K+1) bool
        Components held at zero (the residual column is always False).
    """
    m, K = fit.theta.shape[0], sh.K
    held = np.zeros((m, K + 1), dtype=bool)
    with np.errstate(invalid="ignore"):
        rows = np.flatnonzero((fit.theta[:, :K] < 0).any(axis=1))
    if rows.size == 0:
        return fit, held
    if pinned is None:
        pinned = sh.path == "structured"
    zu = None if z is None or sh.K != 1 else z[rows]  # their projections on U
    zr, y = zry[rows], yry[rows]
    hold = fit.theta[rows, :K] < 0  # (r, K)
    theta = np.zeros((rows.size, K + 1))
    extra = np.zeros(rows.size, dtype=np.int64)
    todo = np.arange(rows.size)  # features whose held set changed
    start: Array | None = None
    if theta0 is not None:  # the held components from zero
        start = np.column_stack([np.where(hold, 0.0, theta0[rows, :K]), theta0[rows, K]])
    cache: dict[bytes, tuple[SharedTerms, np.ndarray]] = {}
    # the structured path's refits end with the full model's score at their theta (final):
    # kept per feature for the KKT check and the result, which need no evaluation of their own
    last = _Score(
        np.zeros((rows.size, K + 1)),
        np.zeros((rows.size, K + 1, K + 1)),
        np.zeros(rows.size),
        np.zeros(rows.size),
    )
    # the pinned refits' terms of the fixed effects at their theta (the nested path): the
    # last refit of a feature is at its final theta, so its terms are that theta's
    terms = None
    if fit.gram is not None and pinned:
        p = fit.gram.C.shape[1]
        terms = FixedTerms(
            np.empty((rows.size, p, p)), np.empty((rows.size, p)), np.zeros(rows.size, bool)
        )
    for rounds in range(3 * K + 3):
        now = None
        if terms is not None:
            now = FixedTerms(terms.C[todo], terms.a[todo], terms.ok[todo])
        th, nit, sc_fit = _refit(
            sh, zr[todo], y[todo], hold[todo], start, max_iter, epsilon, cache, pinned, now
        )
        theta[todo], extra[todo] = th, extra[todo] + nit
        if terms is not None and now is not None:
            terms.C[todo], terms.a[todo], terms.ok[todo] = now.C, now.a, now.ok
        if sc_fit is not None:
            last.dl[todo], last.F[todo], last.logdetM0[todo] = sc_fit.dl, sc_fit.F, sc_fit.logdetM0
        with np.errstate(invalid="ignore"):
            negative = (th[:, :K] < 0) & ~hold[todo]
        # KKT at the boundary, for the features whose free components stayed >= 0
        dl = np.zeros((todo.size, K))
        F_diag = np.ones((todo.size, K))
        at_bound = np.flatnonzero(~negative.any(axis=1) & hold[todo].any(axis=1))
        if at_bound.size and rounds <= K:
            pick = todo[at_bound]
            sc = _score_at(sh, theta, zr, y, zu, pick, hold, last if sc_fit is not None else None)
            dl[at_bound] = sc.dl[:, :K]
            F_diag[at_bound] = np.diagonal(sc.F, axis1=1, axis2=2)[:, :K]
        freed = hold[todo] & (dl > epsilon)
        changed = (negative | freed).any(axis=1)
        if not changed.any():
            break
        hold[todo] = (hold[todo] | negative) & ~freed
        next_start = th.copy()
        next_start[:, :K][negative] = 0.0
        with np.errstate(invalid="ignore", divide="ignore"):
            step = dl / F_diag
        next_start[:, :K] = np.where(freed, step, next_start[:, :K])
        todo, start = todo[changed], next_start[changed]
    every = np.arange(rows.size)
    final = _score_at(sh, theta, zr, y, zu, every, hold, last if pinned else None, True)
    held[rows, :K] = hold
    F = final.F
    # se of the free components from their own information; NaN for the held ones
    with np.errstate(invalid="ignore"):
        se = np.sqrt(np.diagonal(pinv_free(F, ~held[rows]), axis1=1, axis2=2))
    se = np.where(held[rows], np.nan, se)
    out = {
        "theta": fit.theta.copy(),
        "se_theta": fit.se_theta.copy(),
        "dlogL": fit.dlogL.copy(),
        "FIM_theta": fit.FIM_theta.copy(),
        "niter": fit.niter.copy(),
        "logdetM0": fit.logdetM0.copy(),
    }
    out["theta"][rows] = theta
    out["se_theta"][rows] = se
    out["dlogL"][rows] = final.dl
    out["FIM_theta"][rows] = F
    out["niter"][rows] += extra
    out["logdetM0"][rows] = final.logdetM0
    gram = fit.gram
    if gram is not None:  # those of the unconstrained theta: never for the rows refitted
        gram = FixedTerms(gram.C.copy(), gram.a.copy(), gram.ok.copy())
        gram.ok[rows] = False
        if terms is not None:  # those of the refitted theta instead
            ok = terms.ok
            gram.C[rows[ok]], gram.a[rows[ok]], gram.ok[rows[ok]] = terms.C[ok], terms.a[ok], True
    return replace(fit, **out, gram=gram), held


#: A variance component's start, as a share of the residual variance's estimate, in the
#: second search of :func:`restarted` (a start inside the parameter space).
RESTART_SHARE = 0.1
#: Log-likelihood by which the second search must beat the first to be kept.
RESTART_GAIN = 1e-6


def restarted(
    sh: SharedTerms,
    zry: Array,
    yry: Array,
    first: ThetaFit,
    fit: ThetaFit,
    held: np.ndarray,
    *,
    max_iter: int = 50,
    epsilon: float = 1e-5,
    z: Array | None = None,
) -> tuple[ThetaFit, np.ndarray]:
    """A second search for the features whose unconstrained fit ``first`` did not converge
    (a component not finite, or max_iter iterations) and whose constrained ``fit``
    (:func:`constrain`) holds a component at zero: the signs that fit ended with then say
    little about which components the optimum holds, and the restricted likelihood may
    have several maxima over theta >= 0 (three components and a few donors: every
    variance held at zero is a Karush-Kuhn-Tucker point 0.5 below the optimum, which R's
    start at zero does not reach). The features are fitted again from a start inside
    (every variance at :data:`RESTART_SHARE` of the residual variance's estimate),
    constrained, and that fit is kept where its log-likelihood is higher; ``held`` with
    it. The other features are ``fit``'s, unchanged."""
    from flashmm_dask.numerics.fixed import _loglik

    K = sh.K
    with np.errstate(invalid="ignore"):
        unsettled = ~np.isfinite(first.theta).all(axis=1) | (first.niter >= max_iter)
    rows = np.flatnonzero(unsettled & held[:, :K].any(axis=1))
    if rows.size == 0:
        return fit, held
    s0 = yry[rows] / (sh.n - sh.r)
    start = np.column_stack([np.outer(s0, np.full(K, RESTART_SHARE)), s0])
    zr = None if z is None else z[rows]
    again = fit_theta(
        sh, zry[rows], yry[rows], theta0=start, max_iter=max_iter, epsilon=epsilon, z=zr
    )
    # held components leave from there, the others from where that fit ended
    again, held_again = constrain(
        sh, zry[rows], yry[rows], again, max_iter=max_iter, epsilon=epsilon, z=zr,
        theta0=again.theta,
    )  # fmt: skip
    with np.errstate(invalid="ignore", divide="ignore"):
        before = _loglik(sh, fit.theta[rows, K], fit.logdetM0[rows])
        after = _loglik(sh, again.theta[:, K], again.logdetM0)
        # higher by more than rounding (the same optimum found twice is not a change),
        # or where the first fit's is not finite
        higher = ~np.isfinite(before) | (after > before + RESTART_GAIN)
        better = np.isfinite(after) & higher & (again.theta[:, :K] >= 0).all(axis=1)
    if not better.any():
        return fit, held
    pick = rows[better]
    out = {}
    for name in ("theta", "se_theta", "dlogL", "FIM_theta", "niter", "logdetM0"):
        values = getattr(fit, name).copy()
        values[pick] = getattr(again, name)[better]
        out[name] = values
    out["niter"][pick] += fit.niter[pick]  # every iteration spent
    gram = fit.gram
    if gram is not None:
        gram = FixedTerms(gram.C.copy(), gram.a.copy(), gram.ok.copy())
        gram.ok[pick] = False
        if again.gram is not None:
            ok = np.flatnonzero(better & again.gram.ok)
            gram.C[rows[ok]], gram.a[rows[ok]] = again.gram.C[ok], again.gram.a[ok]
            gram.ok[rows[ok]] = True
    held = held.copy()
    held[pick] = held_again[better]
    return replace(fit, **out, gram=gram), held
