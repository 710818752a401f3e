"""Fisher scoring of the nested structured path (REML, diagonal Schur complement) in one
compiled loop per feature.

The loop of ``fisher._scoring`` (steps F^-1 dl until max |dl| <= epsilon or max_iter
steps, then s0 profiled and the score and information evaluated there once more) with the
scores of :class:`.structured_nested.NestedTerms` and the assembly of
``fisher._score_structured``, without a return to Python per evaluation; the profiling
evaluation needs only zry' M D zry, so it skips the traces (the Gram matrices, the
products with C^-1). Each feature is fitted on its own, so that its result does not
depend on the features sharing its block. A feature whose evaluation fails (P or C
singular, a result not finite) or whose information matrix is not provably well
conditioned (its inverse is then not the pseudo-inverse) is reported (``ok`` False) and
refitted by ``fisher._scoring`` from the same start.
"""

from __future__ import annotations

import numpy as np

from flashmm_dask.numerics.compiled import _compile, _gauss_jordan, _inverse_checked_into
from flashmm_dask.numerics.linalg import Array
from flashmm_dask.numerics.structured_nested import NestedTerms, _post, _pre


def _evaluate_py(design, nt, s, zry, yry, counts, full, final, dl, F, work):
    """One evaluation at s (K+1,) of a feature (zry (q,) in the kernels' order): dl
    (K+1,) and F (K+1, K+1) into ``dl`` and ``F`` where ``full``; returns (ok, s0
    profiled, log |det M0| (NaN unless ``final``))."""
    Gb, parent, nval, comps, big = nt
    nrq, nr, q = counts
    Cw, buf, perm = work
    K = s.shape[0] - 1
    s0 = s[K]
    rb = s[big] / s0
    ds = np.empty(comps.shape[0])
    for c in range(ds.shape[0]):
        ds[c] = s[comps[c]] / s0
    pre = _pre(*design, rb, ds, full)
    Cw[:] = pre[-1]
    logdet_c = _gauss_jordan(Cw, buf, perm)
    ok = pre[0] and np.isfinite(logdet_c) and np.all(np.isfinite(Cw))
    if not ok:
        return False, np.nan, np.nan
    t, Q, u2, yR2y, zMDz = _post(
        Gb, parent, nval, comps, big, *pre[2:-1], Cw, rb, ds, zry, yry, full
    )
    s0p = (yry - zMDz) / nr
    if not full:
        return True, s0p, np.nan
    s02 = s0**2
    Dt = 0.0
    DQD = 0.0
    for k in range(K):
        Dk = s[k] / s0
        dl[k] = (u2[k] / s02 - t[k] / s0) / 2
        trW2 = t[k]
        for l in range(K):
            F[k, l] = Q[k, l] / s02 / 2
            trW2 -= Q[k, l] * (s[l] / s0)
            DQD += Dk * Q[k, l] * (s[l] / s0)
        F[k, K] = F[K, k] = trW2 / s02 / 2
        Dt += Dk * t[k]
    trM0 = q - Dt
    trM0M0 = q - 2.0 * Dt + DQD
    F[K, K] = (nrq + trM0M0) / s02 / 2
    dl[K] = (yR2y / s02 - (nrq + trM0) / s0) / 2
    ok = np.all(np.isfinite(dl)) and np.all(np.isfinite(F))
    logdet = -(pre[1] + logdet_c) if final else np.nan
    return ok, s0p, logdet


_evaluate = _compile(_evaluate_py)


def _fit_py(design, nt, order, zry, yry, s_init, stop, counts):
    """theta, se_theta, dlogL (m, K+1), FIM_theta (m, K+1, K+1), niter (m,), logdetM0
    (m,) and ok (m,) of a block of features (zry (m, q) in the permuted order)."""
    max_iter, epsilon, limit = stop
    Gb = nt[0]
    qb, p = Gb.shape
    m, k1 = s_init.shape
    q = zry.shape[1]
    theta, se, dl = np.empty((m, k1)), np.empty((m, k1)), np.empty((m, k1))
    fim, logdet = np.empty((m, k1, k1)), np.empty(m)
    niter, ok = np.zeros(m, dtype=np.int64), np.ones(m, dtype=np.bool_)
    sj, g, Fj = np.empty(k1), np.empty(k1), np.empty((k1, k1))
    inv, wk, bk, pk = np.empty((k1, k1)), np.empty((k1, k1)), np.empty(k1), np.empty(k1, np.int64)
    work = (np.empty((p, p)), np.empty(p), np.empty(p, dtype=np.int64))
    z = np.empty(q)
    for j in range(m):
        for a in range(qb):  # the big columns in the order of NestedTerms
            z[a] = zry[j, order[a]]
        for a in range(qb, q):
            z[a] = zry[j, a]
        for k in range(k1):
            sj[k] = s_init[j, k]
        it = 0
        good = True
        while max_iter > 0:
            it += 1
            good, _, _ = _evaluate(design, nt, sj, z, yry[j], counts, True, False, g, Fj, work)
            if not good or not _inverse_checked_into(Fj, inv, wk, bk, pk, limit):
                good = False
                break
            more = False
            for k in range(k1):
                step = 0.0
                for c in range(k1):
                    step += inv[k, c] * g[c]
                sj[k] += step
                more = more or abs(g[k]) > epsilon
            if not more or it >= max_iter:
                break
        niter[j] = it
        if good:
            good, s0, _ = _evaluate(design, nt, sj, z, yry[j], counts, False, False, g, Fj, work)
            sj[k1 - 1] = s0
        ld = np.nan
        if good:
            good, _, ld = _evaluate(
                design, nt, sj, z, yry[j], counts, True, True, dl[j], fim[j], work
            )
        logdet[j] = ld
        if not good or not _inverse_checked_into(fim[j], inv, wk, bk, pk, limit):
            ok[j] = False
            continue
        for k in range(k1):
            theta[j, k] = sj[k]
            se[j, k] = np.sqrt(inv[k, k])
    return theta, se, dl, fim, niter, logdet, ok


_fit = _compile(_fit_py)


def fit_nested_batch(
    terms: NestedTerms,
    zry: Array,
    yry: Array,
    s_init: Array,
    n: float,
    r: int,
    max_iter: int,
    epsilon: float,
    limit: float,
) -> tuple[Array, ...]:
    """theta, se_theta, dlogL, FIM_theta, niter, logdetM0 and ok of a block of features
    from ``s_init`` (m, K+1), left as it is; zry (m, q) in the permuted column order of
    ``terms.st``. ``limit``: the condition bound of the information matrices' inverses
    (``fisher.GINV_LIMIT``)."""
    st = terms.st
    q = st.qb + st.qs
    nt = (terms.Gb, terms.parent, terms.nval, terms.comps, st.big)
    counts = (float(n - r - q), float(n - r), float(q))
    stop = (int(max_iter), float(epsilon), float(limit))
    return _fit(
        terms.packed,
        nt,
        terms.order,
        np.ascontiguousarray(zry),
        np.ascontiguousarray(yry, dtype=np.float64),
        np.ascontiguousarray(s_init, dtype=np.float64),
        stop,
        counts,
    )
