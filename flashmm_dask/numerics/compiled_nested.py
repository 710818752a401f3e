"""The compiled kernels of the nested structured path (:mod:`.structured_nested`, whose
docstring gives the algebra): one evaluation's pieces before and after C^-1, E'x, and
Fisher scoring of a block of features one feature at a time.

The loop of :func:`_fit_py` is ``fisher._scoring``'s (steps F^-1 dl until max |dl| <=
epsilon or max_iter steps, then s0 profiled and the score and information evaluated there
once more) with the assembly of ``fisher._score_structured``, without a return to Python
per evaluation; the profiling evaluation needs only zry' M D zry, so it skips the traces
(the Gram matrices, the products with C^-1). What an evaluation shares by all features
(everything but the feature's quadratic forms) is computed once per design where every
ratio is zero (:func:`_start_py`), and taken from there for each feature's first evaluation. A
feature whose evaluation fails (P or C singular, a result not finite) or whose information
matrix is not provably well conditioned (its inverse is then not the pseudo-inverse) is
reported (``ok`` False): the caller refits it by ``fisher._scoring`` from the same start.

Every kernel of the path is in this module but :func:`pre` (:mod:`.compiled_nested_pre`,
re-exported here): numba's disk cache of a kernel is invalidated by changes to its own
file only, not to the kernels it calls, so a change to ``compiled_nested_pre.py`` (or to
the two kernels taken from :mod:`.compiled` and :mod:`.compiled_dense`, as
:mod:`.compiled_k` takes them) must also touch this file.
"""

from __future__ import annotations

import numpy as np

from flashmm_dask.numerics.compiled import _gauss_jordan
from flashmm_dask.numerics.compiled_dense import _inverse_checked_into
from flashmm_dask.numerics.compiled_nested_pre import pre
from flashmm_dask.numerics.jit import jit


def _et_py(Gb, parent, nval, pbi, Si, kap, Eps, x):
    """E' x = G' P^-1 x (p,) for x (q,): sum_a E_a x_a + sum_c E_c x_c with
    E_a = pbi_a g_a - kap_c pbi_a n_a eps_c and E_c = eps_c / S_c."""
    qb = Gb.shape[0]
    qs = Eps.shape[0]
    px = np.empty(qb)
    coef = np.empty(qs)
    for c in range(qs):
        coef[c] = x[qb + c] * Si[c]
    for a in range(qb):
        px[a] = pbi[a] * x[a]
        c = parent[a]
        if c >= 0:
            coef[c] -= kap[c] * nval[a] * px[a]
    return Gb.T @ px + Eps.T @ coef


def _traces_py(big, comps, U, Si, kap, sig, hs, Eps, grams, Hw2, B, t, Q):
    """t -= tr(B Gram_k) and Q_kl += tr(Gram_k B Gram_l B) - 2 tr(R_kl B) (+ tr(R_lk B)),
    in place: W = W0 - E B E'."""
    qs, p = Eps.shape
    K = t.shape[0]
    # traces tr(R_kl B) of R_kl = E_k' W0_kl E_l, from eB = B eps_c and tB = B tau_c with
    # tau_c = E_b' t_c = h2_c - kap sig2 eps_c
    tr = np.zeros((K, K))
    for i in range(p):
        for j in range(p):
            tr[big, big] += Hw2[i, j] * B[i, j]
    # [eps; h2] B in one product
    qs2 = 2 * qs
    EH = np.empty((qs2, p))
    EH[:qs] = Eps
    EH[qs:] = hs[1, :, :p]  # (hs is padded to whole SIMD vectors)
    EHB = EH @ B
    EB = EHB[:qs]
    HB = EHB[qs:]
    for c in range(qs):
        k = comps[c]
        ks = kap[c] * sig[c, 1]
        eB = EB[c]
        hB = HB[c]
        eBe = 0.0
        h3Be = 0.0
        tBt = 0.0
        tBe = 0.0
        for i in range(p):
            tau = hs[1, c, i] - ks * Eps[c, i]
            tauB = hB[i] - ks * eB[i]
            eBe += Eps[c, i] * eB[i]
            h3Be += hs[2, c, i] * eB[i]
            tBt += tau * tauB
            tBe += tau * eB[i]
        tr[big, big] += -2.0 * kap[c] * h3Be + kap[c] * kap[c] * sig[c, 2] * eBe - kap[c] * tBt
        tr[big, k] += Si[c] * Si[c] * tBe
        tr[k, k] += U[c] * Si[c] ** 3 * eBe
    GB = np.empty((K, p, p))
    for k in range(K):
        GB[k] = grams[k] @ B
        tB = 0.0
        for i in range(p):
            for j in range(p):
                tB += B[i, j] * grams[k, i, j]
        t[k] -= tB
    for k in range(K):
        for l in range(k, K):
            r = tr[k, l] + tr[l, k] if k != l else tr[k, k]
            gg = 0.0
            for i in range(p):
                for j in range(p):
                    gg += GB[k, i, j] * GB[l, j, i]
            Q[k, l] += -2.0 * r + gg
            Q[l, k] = Q[k, l]


def _post_py(
    Gb,
    parent,
    nval,
    comps,
    big,
    pbi,
    U,
    Si,
    kap,
    sig,
    hs,
    t,
    Q,
    Eps,
    grams,
    Hw,
    B,
    rb,
    ds,
    zry,
    yry,
    full,
):
    """The score's pieces after C^-1 = B: t, Q of W = W0 - E B E', u2, yR2y and zMDz
    (``full=False``: t and Q as they are), column by column (O(qb p)): the reference of
    :func:`_post_sums_py`."""
    qb = Gb.shape[0]
    qs = Eps.shape[0]
    K = t.shape[0]
    t = t.copy()
    Q = Q.copy()
    if full:
        _traces(big, comps, U, Si, kap, sig, hs, Eps, grams, Hw[2], B, t, Q)
    # u = P^-T zry + E beta, M D zry = P^-1 D zry + D E beta, beta = B E' D zry
    x = np.empty(qb + qs)
    for a in range(qb):
        x[a] = rb * zry[a]
    for c in range(qs):
        x[qb + c] = ds[c] * zry[qb + c]
    beta = B @ et(Gb, parent, nval, pbi, Si, kap, Eps, x)
    eb = Eps @ beta
    # the small rows: P^-T zry and P^-1 x through the group sums
    sz = np.zeros(qs)
    sx = np.zeros(qs)
    for a in range(qb):
        c = parent[a]
        if c >= 0:
            sz[c] += nval[a] * pbi[a] * zry[a]
            sx[c] += nval[a] * pbi[a] * x[a]
    u2 = np.zeros(K)
    yR2y = yry
    zMDz = 0.0
    ys = np.empty(qs)
    yx = np.empty(qs)
    for c in range(qs):
        ys[c] = Si[c] * (zry[qb + c] - rb * sz[c])  # (P^-T zry)_c
        yx[c] = Si[c] * (x[qb + c] - ds[c] * sx[c])  # (P^-1 x)_c
        Eb = eb[c] * Si[c]
        u = ys[c] + Eb
        md = yx[c] + ds[c] * Eb
        u2[comps[c]] += u * u
        yR2y -= (u + zry[qb + c]) * md
        zMDz += zry[qb + c] * md
    gbeta = Gb @ beta
    for a in range(qb):
        c = parent[a]
        pt, px, eba = zry[a], x[a], gbeta[a]
        if c >= 0:
            pt -= nval[a] * ds[c] * ys[c]
            px -= rb * nval[a] * yx[c]
            eba -= nval[a] * kap[c] * eb[c]
        Eb = pbi[a] * eba
        u = pbi[a] * pt + Eb
        md = pbi[a] * px + rb * Eb
        u2[big] += u * u
        yR2y -= (u + zry[a]) * md
        zMDz += zry[a] * md
    return t, Q, u2, yR2y, zMDz


def _post_sums_py(
    pstart, pcls, zu, comps, big, U, Si, kap, sig, hs, t, Q, Eps, grams, Hw, B, rb, ds, zry_s,
    yry, sums, full, ex_out,
):  # fmt: skip
    """:func:`_post_py` from a feature's sums over the count classes and the pairs, O(P +
    (U + qs) p + p^2) instead of O(qb p), with E' D zry = G' P^-1 D zry into ``ex_out``
    (p,), and t, Q as they are given (those of W, :func:`_traced`, where ``full``):
    ``sums`` = (R (U, p) = sum_{zb_a = u} zry_a g_a,
    Z2 (U,) = sum_{zb_a = u} zry_a^2, nz (P,) = sum n_a zry_a over a pair's columns),
    zry_s (qs,) the small columns of zry. With y_a = zry_a + g_a' beta, alpha_c = ds_c
    (P^-T zry)_c + kap_c eps_c' beta and gamma_c = (P^-1 D zry)_c / ds_c + kap_c eps_c'
    beta (0 without a parent), a big column has u_a = pbi_a (y_a - n_a alpha_c) and
    (M D zry)_a = rho_b pbi_a (y_a - n_a gamma_c), so that their sums over the columns are
    sums over the classes and the groups of

        sum pbi^2 y^2 = sum_u pbi_u^2 (Z2_u + 2 beta'R_u) + beta' Hw_1 beta,
        sum_{a in c} pbi^2 n y = sum_{pairs} pbi^2 nz + beta' h2_c,
        sum pbi zry y = sum_u pbi_u (Z2_u + beta'R_u),  sum_{a in c} pbi n zry."""
    R, Z2, nz = sums
    qs, p = Eps.shape
    K = t.shape[0]
    t = t.copy()
    Q = Q.copy()
    nu = zu.shape[0]
    pu = np.empty(nu)
    for u in range(nu):
        pu[u] = 1.0 / (1.0 + rb * zu[u])
    # V_c = sum_{a in c} pbi n zry, T0_c = sum_{a in c} pbi^2 n zry
    V = np.zeros(qs)
    T = np.zeros(qs)
    for c in range(qs):
        for k in range(pstart[c], pstart[c + 1]):
            w = pu[pcls[k]]
            V[c] += w * nz[k]
            T[c] += w * w * nz[k]
    # beta = B E' D zry: E'x = sum_u rho_b pbi_u R_u + Eps' coef, coef_c = S^-1 (ds zry_c -
    # kap rho_b V_c)
    coef = np.empty(qs)
    for c in range(qs):
        coef[c] = ds[c] * zry_s[c] * Si[c] - kap[c] * rb * V[c]
    ex = Eps.T @ coef
    PR1 = np.zeros(p)  # sum_u pbi_u R_u
    PR2 = np.zeros(p)  # sum_u pbi_u^2 R_u
    S_zz1 = 0.0
    S_zz2 = 0.0
    for u in range(nu):
        w = pu[u]
        S_zz1 += w * Z2[u]
        S_zz2 += w * w * Z2[u]
        for j in range(p):
            PR1[j] += w * R[u, j]
            PR2[j] += w * w * R[u, j]
    for j in range(p):
        ex[j] += rb * PR1[j]
        ex_out[j] = ex[j]
    beta = B @ ex
    eb = Eps @ beta
    u2 = np.zeros(K)
    yR2y = yry
    zMDz = 0.0
    alpha = np.empty(qs)
    gamma = np.empty(qs)
    for c in range(qs):
        ys = Si[c] * (zry_s[c] - rb * V[c])  # (P^-T zry)_c
        yx = Si[c] * (ds[c] * zry_s[c] - ds[c] * rb * V[c])  # (P^-1 D zry)_c
        Eb = eb[c] * Si[c]
        u = ys + Eb
        md = yx + ds[c] * Eb
        u2[comps[c]] += u * u
        yR2y -= (u + zry_s[c]) * md
        zMDz += zry_s[c] * md
        alpha[c] = ds[c] * ys + kap[c] * eb[c]
        gamma[c] = yx + kap[c] * eb[c]
    # the big columns
    bz = 0.0
    for j in range(p):
        bz += beta[j] * PR1[j]
    zmd = S_zz1 + bz
    for c in range(qs):
        zmd -= gamma[c] * V[c]
    zmd *= rb
    zMDz += zmd
    if full:
        bHb = 0.0
        bP2 = 0.0
        for i in range(p):
            bP2 += beta[i] * PR2[i]
            hb = 0.0
            for j in range(p):
                hb += Hw[1, i, j] * beta[j]
            bHb += beta[i] * hb
        Syy = S_zz2 + 2.0 * bP2 + bHb
        uu = Syy
        um = Syy
        for c in range(qs):
            Tc = T[c]
            for j in range(p):
                Tc += beta[j] * hs[1, c, j]
            s1 = sig[c, 1]
            uu += alpha[c] * (alpha[c] * s1 - 2.0 * Tc)
            um += alpha[c] * gamma[c] * s1 - (alpha[c] + gamma[c]) * Tc
        u2[big] += uu
        yR2y -= rb * um + zmd
    return t, Q, u2, yR2y, zMDz


def _shared_py(design, comps, big, rb, ds, full, Cw, buf, perm):
    """What an evaluation at the ratios (rb, ds) shares by all features: the pieces of
    :func:`.compiled_nested_pre._pre_py`, C^-1 into ``Cw`` and log |det C|, and t, Q of W
    (of W0 unless ``full``)."""
    parts = pre(*design, rb, ds, full)
    Cw[:] = parts[-1]
    logdet_c = _gauss_jordan(Cw, buf, perm)
    t, Q = parts[8].copy(), parts[9].copy()
    if full and np.isfinite(logdet_c) and np.all(np.isfinite(Cw)):
        _traces(big, comps, *parts[3:8], *parts[10:12], parts[12][2], Cw, t, Q)
    return parts, logdet_c, t, Q


def _evaluate_py(design, nt, s, zry_s, yry, sums, counts, full, final, dl, F, work, fixed):
    """One evaluation at s (K+1,) of a feature (zry_s (qs,) the small columns of its zry,
    ``sums`` its sums over the count classes and pairs, :func:`_post_sums_py`): dl (K+1,)
    and F (K+1, K+1) into ``dl`` and ``F`` where ``full``, C = I - G' P^-1 D G (p, p) and
    G' P^-1 D zry (p,) into the two arrays of ``fixed``; returns (ok, s0 profiled, log |det M0| (NaN
    unless ``final``)). ``work`` ends with the shared pieces at ratios all zero (the start
    of every feature: :func:`_start_py`, once per design), taken where s has those ratios:
    the same numbers."""
    comps, big = nt[3], nt[4]
    nrq, nr, q = counts
    Cw, buf, perm, zero, zero_inverse = work
    K = s.shape[0] - 1
    s0 = s[K]
    rb = s[big] / s0
    ds = np.empty(comps.shape[0])
    at_zero = rb == 0.0
    for c in range(ds.shape[0]):
        ds[c] = s[comps[c]] / s0
        at_zero = at_zero and ds[c] == 0.0
    if at_zero and full:
        parts, logdet_c, t, Q = zero
        Cw[:] = zero_inverse
    else:
        parts, logdet_c, t, Q = _shared(design, comps, big, rb, ds, full, Cw, buf, perm)
    gram, ex = fixed
    gram[:] = parts[-1]
    ok = parts[0] and np.isfinite(logdet_c) and np.all(np.isfinite(Cw))
    if not ok:
        return False, np.nan, np.nan
    t, Q, u2, yR2y, zMDz = _post_sums(
        design[2], design[3], design[12], comps, big, *parts[3:8], t, Q, *parts[10:13], Cw,
        rb, ds, zry_s, yry, sums, full, ex,
    )  # fmt: skip
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
    logdet = -(parts[1] + logdet_c) if final else np.nan
    return ok, s0p, logdet


def _start_py(design, comps, big):
    """What every feature's first evaluation shares (all ratios zero): :func:`_shared_py`'s
    four results and C^-1 there (:func:`_fit_py`'s ``zero``, computed once per design)."""
    p = design[0].shape[1]
    Cw, buf, perm = np.empty((p, p)), np.empty(p), np.empty(p, dtype=np.int64)
    zero = _shared(design, comps, big, 0.0, np.zeros(comps.shape[0]), True, Cw, buf, perm)
    return zero, Cw


def _class_sums_py(zc, Gc, cedges, R, Z2):
    """R (U, pp) = sum_{zb_a = u} zry_a g_a and Z2 (U,) = sum_{zb_a = u} zry_a^2 of one
    feature, from its big columns sorted by count class (zc (qb,), stably: within a class
    in the order of NestedTerms) and Gc (qb, pp) their rows of G with zero columns to a
    multiple of 8; class u at cedges[u]:cedges[u + 1]. Four columns per sweep over the
    row of R, each sum in the order of its columns (the sums of a sweep per column in that
    order, 55 -> 35 us per feature at the atlas's q = 7,770)."""
    pp = Gc.shape[1]
    for u in range(cedges.shape[0] - 1):
        r = R[u]
        for i in range(pp):
            r[i] = 0.0
        s2 = 0.0
        a, a1 = cedges[u], cedges[u + 1]
        while a + 3 < a1:
            z0, z1, z2, z3 = zc[a], zc[a + 1], zc[a + 2], zc[a + 3]
            s2 = (((s2 + z0 * z0) + z1 * z1) + z2 * z2) + z3 * z3
            g0, g1, g2, g3 = Gc[a], Gc[a + 1], Gc[a + 2], Gc[a + 3]
            for i in range(pp):
                r[i] = (((r[i] + z0 * g0[i]) + z1 * g1[i]) + z2 * g2[i]) + z3 * g3[i]
            a += 4
        while a < a1:
            z0 = zc[a]
            s2 += z0 * z0
            g0 = Gc[a]
            for i in range(pp):
                r[i] += z0 * g0[i]
            a += 1
        Z2[u] = s2


def _fit_py(design, nt, order, zry, yry, s_init, stop, counts, free, first):
    """theta, se_theta, dlogL (m, K+1), FIM_theta (m, K+1, K+1), niter (m,), logdetM0
    (m,), the fixed effects' terms at theta: C = I - G' P^-1 D G (m, p, p) and G' P^-1 D
    zry (m, p) (valid where ok), and ok (m,), of a block of features (zry (m, q) in the
    permuted order); ``first``: :func:`_start_py`'s result for this design.

    ``free`` (K+1,) bool: the components updated, by their own score and the information
    among them (the others stay at their start, zero: ``fisher._scoring``'s ``free``);
    se_theta NaN for the others. All True: every component (the same operations as an
    update by the whole information)."""
    max_iter, epsilon, limit = stop
    Gb = nt[0]
    qb, p = Gb.shape
    m, k1 = s_init.shape
    q = zry.shape[1]
    theta, se, dl = np.empty((m, k1)), np.empty((m, k1)), np.empty((m, k1))
    fim, logdet = np.empty((m, k1, k1)), np.empty(m)
    niter, ok = np.zeros(m, dtype=np.int64), np.ones(m, dtype=np.bool_)
    sj, g, Fj = np.empty(k1), np.empty(k1), np.empty((k1, k1))
    idx = np.flatnonzero(free)  # the updated components
    kf = idx.shape[0]
    Fs = np.empty((kf, kf))
    inv, wk, bk, pk = np.empty((kf, kf)), np.empty((kf, kf)), np.empty(kf), np.empty(kf, np.int64)
    bk2 = np.empty(kf)
    Cw, buf, perm = np.empty((p, p)), np.empty(p), np.empty(p, dtype=np.int64)
    work = (Cw, buf, perm, first[0], first[1])
    gram, ex = np.empty((m, p, p)), np.empty((m, p))
    z = np.empty(q)
    nval, pedges, Gc, corder, cedges = nt[2], nt[5], nt[6], nt[7], nt[8]
    R = np.zeros((design[12].shape[0], Gc.shape[1]))
    Z2 = np.zeros(design[12].shape[0])
    nz = np.zeros(pedges.shape[0] - 1)
    zc = np.empty(qb)
    sums = (R, Z2, nz)
    # booleans known at run time only: constant ones are typed as literals, and numba
    # compiles _evaluate (with all it calls) once per combination
    yes = s_init.shape[0] >= 0
    no = not yes
    for j in range(m):
        for a in range(qb):  # the big columns in the order of NestedTerms
            z[a] = zry[j, order[a]]
        for a in range(qb, q):
            z[a] = zry[j, a]
        for a in range(qb):  # and by count class
            zc[a] = zry[j, corder[a]]
        _class_sums(zc, Gc, cedges, R, Z2)  # the feature's sums over the count classes, once
        for k in range(nz.shape[0]):
            acc = 0.0
            for a in range(pedges[k], pedges[k + 1]):
                acc += nval[a] * z[a]
            nz[k] = acc
        zs, y, fx = z[qb:], yry[j], (gram[j], ex[j])
        for k in range(k1):
            sj[k] = s_init[j, k]
        it = 0
        good = True
        while max_iter > 0:
            it += 1
            good, _, _ = _evaluate(design, nt, sj, zs, y, sums, counts, yes, no, g, Fj, work, fx)
            if good:
                Fs[:] = Fj[idx][:, idx]
            if not good or not _inverse_checked_into(Fs, inv, wk, bk, pk, limit, bk2):
                good = False
                break
            more = False
            for a in range(kf):
                step = 0.0
                for c in range(kf):
                    step += inv[a, c] * g[idx[c]]
                sj[idx[a]] += step
                more = more or abs(g[idx[a]]) > epsilon
            if not more or it >= max_iter:
                break
        niter[j] = it
        if good:
            good, s0, _ = _evaluate(design, nt, sj, zs, y, sums, counts, no, no, g, Fj, work, fx)
            sj[k1 - 1] = s0
        ld = np.nan
        if good:
            good, _, ld = _evaluate(
                design, nt, sj, zs, y, sums, counts, yes, yes, dl[j], fim[j], work, fx
            )
        logdet[j] = ld
        if good:
            Fs[:] = fim[j][idx][:, idx]
        if not good or not _inverse_checked_into(Fs, inv, wk, bk, pk, limit, bk2):
            ok[j] = False
            continue
        theta[j] = sj
        se[j] = np.nan
        for a in range(kf):
            se[j, idx[a]] = np.sqrt(inv[a, a])
    return theta, se, dl, fim, niter, logdet, gram, ex, ok


#: IEEE semantics (1/0 = inf, as NumPy), no GIL, fused multiply-adds (as compiled.py's).
_OPTIONS = {"nogil": True, "error_model": "numpy", "fastmath": {"contract"}}
_post_sums = jit(_post_sums_py, **_OPTIONS)
_traces = jit(_traces_py, **_OPTIONS)
_shared = jit(_shared_py, **_OPTIONS)
post = jit(_post_py, **_OPTIONS)
et = jit(_et_py, **_OPTIONS)
_evaluate = jit(_evaluate_py, **_OPTIONS)
_class_sums = jit(_class_sums_py, **_OPTIONS)
start = jit(_start_py, **_OPTIONS)
fit = jit(_fit_py, **_OPTIONS)
