"""The compiled kernel of Satterthwaite's observed information on the nested structured path
(:mod:`.satterthwaite_structured`; the algebra of :mod:`.structured_nested`).

The quadratic part Q of the observed information Q - T/2 (REML, :mod:`.satterthwaite`) of
a feature is taken from its sums over the count classes and the pairs of a group and a
count, as :func:`.compiled_nested._post_sums_py` takes its score: no q-vector is formed
beyond the one pass over the big columns for the sums R_u = sum_{zb_a = u} zry_a g_a,
Z2_u = sum zry_a^2 and nz = sum n_a zry_a over a pair's columns. With ũ = M' zry (so
u = ũ / s0), beta = B E' D zry, y_a = zry_a + g_a' beta and alpha_c as there, a big column
has ũ_a = pbi_a (y_a - n_a alpha_c), whose sums over the columns are sums over the classes
(Y2_u = Z2_u + 2 beta'R_u + beta'H_u beta) and the pairs (NY = nz + pA beta). Per
component k, with E = P^-T G (E_a = pbi_a (g_a - kap_c n_a eps_c), E_c = eps_c / S_c),
tau_c = sum_{a in c} pbi_a n_a ũ_a and lam_c = ũ_c - rho_b tau_c (= (l'ũ)_c)::

    e_k  = E_k' ũ_k                      (p,)
    pi_k = ũ_k' (P^-T ũ)_k:   big  sum pbi ũ_a^2 - sum_c kap_c tau_c lam_c
                              small sum_{c in k} ũ_c lam_c / S_c
    w_kl = ũ_k' W0_kl ũ_l:    big, big   sum zb pbi ũ_a^2 - sum_c kap_c tau_c^2
                              big, k     sum_{c in k} tau_c ũ_c / S_c
                              k, k       sum_{c in k} U_c ũ_c^2 / S_c

and with eps = sum_k rho_k e_k, gamma = B eps (M' ũ = P^-T ũ + E gamma, W = W0 - E B E')::

    s0^3 Q_kl = w_kl - e_k' B e_l,   s0^3 Q_k0 = pi_k + e_k' gamma,
    s0^3 Q_00 = yR2y - (sum_k rho_k pi_k + eps' gamma)

(the module docstring of :mod:`.satterthwaite`: Q_kl = u_k' (Z'HZ)_kl u_l, Q_k0 = u_k' v_k,
Q_00 = a'Ha = (a'a - u' M D u) / s0, a'a = yR2y / s0^2). The work per feature is one pass
over the big columns (O(qb p)), O(P p + (U + qs) p^2 + p^3) besides; each feature is taken
on its own, so its values do not depend on the features sharing its block.

Only :func:`.compiled._gauss_jordan` is taken from another module (numba's disk cache of
a kernel is invalidated by changes to its own file only).
"""

from __future__ import annotations

import numpy as np

from flashmm_dask.numerics.compiled import _gauss_jordan
from flashmm_dask.numerics.jit import jit


def _info_py(design, nt, order, theta, zry, yry):
    """Q (m, K+1, K+1), the observed information's quadratic part, and ok (m,) (P
    and C invertible; NaN where not ok) of a block of features: theta (m, K+1), zry (m, q)
    in the permuted column order, yry (m,). ``design`` and ``nt`` as
    :meth:`.structured_nested.NestedTerms.fit` passes them."""
    Gb, Gs, pstart, pcls, pn2, pA, zb, cls, _, zs, comps, big, zu, H, _ = design[:15]
    nval, pedges = nt[2], nt[5]
    qb, p = Gb.shape
    qs = Gs.shape[0]
    q = qb + qs
    m, k1 = theta.shape
    K = k1 - 1
    nu = zu.shape[0]
    npair = pcls.shape[0]
    direct = H.shape[0] == 0
    out = np.full((m, k1, k1), np.nan)
    ok = np.zeros(m, dtype=np.bool_)
    pu = np.empty(nu)
    ds = np.empty(qs)
    sig = np.empty((qs, 4))
    hs0 = np.empty((qs, p))
    Si = np.empty(qs)
    kap = np.empty(qs)
    Uc = np.empty(qs)
    Eps = np.empty((qs, p))
    KE = np.empty((qs, p))
    B = np.empty((p, p))
    buf = np.empty(p)
    perm = np.empty(p, dtype=np.int64)
    z = np.empty(q)
    R = np.empty((nu, p))
    Z2 = np.empty(nu)
    nz = np.empty(npair)
    Hb = np.empty((nu, p))
    wu = np.empty(nu)
    fa = np.zeros(npair)
    Hf = np.ascontiguousarray(H.reshape(H.shape[0], p * p))  # (U, p^2)
    Hr = np.ascontiguousarray(H.reshape(H.shape[0] * p, p))  # (U p, p)
    e = np.empty((K, p))
    pi = np.empty(K)
    w = np.empty((K, K))
    ut = np.empty(qs)
    alpha = np.empty(qs)
    gam = np.empty(qs)
    V = np.empty(qs)
    for j in range(m):
        s0 = theta[j, K]
        rb = theta[j, big] / s0
        good = np.isfinite(rb)
        for c in range(qs):
            ds[c] = theta[j, comps[c]] / s0
        for u in range(nu):
            pu[u] = 1.0 / (1.0 + rb * zu[u])
            good = good and np.isfinite(pu[u])
        # group sums of the pairs: sig = sum (pbi, pbi^2, zb pbi^3, pbi^3) n^2, hs0 = sum
        # pbi n g (the weights as compiled_nested's pre takes them)
        sig[:] = 0.0
        hs0[:] = 0.0
        for c in range(qs):
            for k in range(pstart[c], pstart[c + 1]):
                u = pcls[k]
                w1 = pu[u]
                w2 = w1 * w1
                sig[c, 0] += w1 * pn2[k]
                sig[c, 1] += w2 * pn2[k]
                sig[c, 2] += zu[u] * w1 * w2 * pn2[k]
                sig[c, 3] += w1 * w2 * pn2[k]
                for i in range(p):
                    hs0[c, i] += w1 * pA[k, i]
        for c in range(qs):
            Uc[c] = zs[c] - rb * sig[c, 0]
            S = 1.0 + ds[c] * Uc[c]
            Si[c] = 1.0 / S
            good = good and S != 0.0 and np.isfinite(Si[c])
            kap[c] = ds[c] * Si[c]
            for i in range(p):
                Eps[c, i] = Gs[c, i] - rb * hs0[c, i]
                KE[c, i] = kap[c] * Eps[c, i]
        if not good:
            continue
        # C = I - sum_u rho_b pbi_u H_u - sum_c kap eps eps', B = C^-1
        C = -(Eps.T @ KE)
        if direct:
            for a in range(qb):
                w0 = rb / (1.0 + rb * zb[a])
                for i in range(p):
                    for k in range(p):
                        C[i, k] -= w0 * Gb[a, i] * Gb[a, k]
        else:  # sum_u rho_b pbi_u H_u as one product
            for u in range(nu):
                wu[u] = rb / (1.0 + rb * zu[u])
            C -= (wu @ Hf).reshape(p, p)
        for a in range(p):
            C[a, a] += 1.0
        for a in range(p):
            for b in range(p):
                B[a, b] = 0.5 * (C[a, b] + C[b, a])
        if not np.isfinite(_gauss_jordan(B, buf, perm)) or not np.all(np.isfinite(B)):
            continue
        # the feature's sums over the classes and the pairs (compiled_nested's fit)
        for a in range(qb):
            z[a] = zry[j, order[a]]
        for a in range(qb, q):
            z[a] = zry[j, a]
        R[:] = 0.0
        Z2[:] = 0.0
        for a in range(qb):
            u = cls[a]
            Z2[u] += z[a] * z[a]
            for i in range(p):
                R[u, i] += z[a] * Gb[a, i]
        for k in range(npair):
            acc = 0.0
            for a in range(pedges[k], pedges[k + 1]):
                acc += nval[a] * z[a]
            nz[k] = acc
        # beta = B E' D zry (compiled_nested's _post_sums)
        for c in range(qs):
            acc = 0.0
            for k in range(pstart[c], pstart[c + 1]):
                acc += pu[pcls[k]] * nz[k]
            V[c] = acc
        ex = np.zeros(p)
        for c in range(qs):
            coef = ds[c] * z[qb + c] * Si[c] - kap[c] * rb * V[c]
            for i in range(p):
                ex[i] += Eps[c, i] * coef
        for u in range(nu):
            for i in range(p):
                ex[i] += rb * pu[u] * R[u, i]
        beta = B @ ex
        eb = Eps @ beta
        # H_u beta by class
        if direct:
            gbeta = Gb @ beta
            Hb[:] = 0.0
            for a in range(qb):
                for i in range(p):
                    Hb[cls[a], i] += Gb[a, i] * gbeta[a]
        else:
            Hb = (Hr @ beta).reshape(nu, p)
        ny = nz + pA @ beta  # sum n y over the pairs' columns
        # sums over the classes: Y2_u = sum y_a^2 weighted by pbi^2, pbi^3, zb pbi^3, and
        # sum pbi zry y; e_big starts at sum pbi^2 g y = sum_u pbi^2 (R_u + H_u beta)
        syy2 = 0.0
        syy3 = 0.0
        szy3 = 0.0
        szy = 0.0
        e[:] = 0.0
        for u in range(nu):
            bR = 0.0
            bH = 0.0
            for i in range(p):
                bR += beta[i] * R[u, i]
                bH += beta[i] * Hb[u, i]
            y2 = Z2[u] + 2.0 * bR + bH
            w1 = pu[u]
            w2 = w1 * w1
            syy2 += w2 * y2
            syy3 += w1 * w2 * y2
            szy3 += zu[u] * w1 * w2 * y2
            szy += w1 * (Z2[u] + bR)
            for i in range(p):
                e[big, i] += w2 * (R[u, i] + Hb[u, i])
        # the small columns and the groups
        yR2y = yry[j]
        pi[:] = 0.0
        w[:] = 0.0
        um = syy2
        sa3 = 0.0
        sza3 = 0.0
        for c in range(qs):
            ys = Si[c] * (z[qb + c] - rb * V[c])  # (P^-T zry)_c
            yx = Si[c] * (ds[c] * z[qb + c] - ds[c] * rb * V[c])  # (P^-1 D zry)_c
            Ebc = eb[c] * Si[c]
            ut[c] = ys + Ebc
            md = yx + ds[c] * Ebc
            yR2y -= (ut[c] + z[qb + c]) * md
            alpha[c] = ds[c] * ys + kap[c] * eb[c]
            gam[c] = yx + kap[c] * eb[c]
            # the pairs: sum pbi^k n y over the group (NY = nz + pA beta)
            t2 = 0.0
            t3 = 0.0
            tz3 = 0.0
            for k in range(pstart[c], pstart[c + 1]):
                u = pcls[k]
                w1 = pu[u]
                w2 = w1 * w1
                t2 += w2 * ny[k]
                t3 += w1 * w2 * ny[k]
                tz3 += zu[u] * w1 * w2 * ny[k]
                fa[k] = w2 * alpha[c]
            a = alpha[c]
            um += a * gam[c] * sig[c, 1] - (a + gam[c]) * t2
            sa3 += a * (a * sig[c, 3] - 2.0 * t3)
            sza3 += a * (a * sig[c, 2] - 2.0 * tz3)
            tau = t2 - a * sig[c, 1]
            lam = ut[c] - rb * tau
            kc = comps[c]
            for i in range(p):
                e[big, i] -= kap[c] * tau * Eps[c, i]
                e[kc, i] += Eps[c, i] * ut[c] * Si[c]
            pi[big] -= kap[c] * tau * lam
            pi[kc] += ut[c] * lam * Si[c]
            w[big, big] -= kap[c] * tau * tau
            w[big, kc] += tau * ut[c] * Si[c]
            w[kc, kc] += Uc[c] * ut[c] * ut[c] * Si[c]
        eb_pairs = pA.T @ fa  # sum_pairs pbi^2 alpha_c pA
        for i in range(p):
            e[big, i] -= eb_pairs[i]
        zmd = szy
        for c in range(qs):
            zmd -= gam[c] * V[c]
        zmd *= rb
        yR2y -= rb * um + zmd
        pi[big] += syy3 + sa3
        w[big, big] += szy3 + sza3
        # assembly: W = W0 - E B E', M' ũ = P^-T ũ + E B eps
        Be = np.empty((K, p))
        for k in range(K):
            Be[k] = B @ e[k]
        epsv = np.zeros(p)
        rho = np.empty(K)
        for k in range(K):
            rho[k] = theta[j, k] / s0
            for i in range(p):
                epsv[i] += rho[k] * e[k, i]
        gamma = B @ epsv
        s03 = s0 * s0 * s0
        mdu = 0.0
        for k in range(K):
            for l in range(k + 1):
                wkl = w[k, l] + w[l, k] if k != l else w[k, k]
                out[j, k, l] = out[j, l, k] = (wkl - np.dot(e[k], Be[l])) / s03
            out[j, k, K] = out[j, K, k] = (pi[k] + np.dot(e[k], gamma)) / s03
            mdu += rho[k] * pi[k]
        mdu += np.dot(epsv, gamma)
        out[j, K, K] = (yR2y - mdu) / s03
        ok[j] = True
    return out, ok


def _middle_py(design, theta, L):
    """L (E_k'E_k) L' (m, K, p, p) and ok (m,) (P invertible; NaN where not ok) of a
    block of features at theta (m, K+1), E = P^-T G; the Gram matrices as
    :func:`.compiled_nested_pre._pre_py` takes them: E_b'E_b = Hw1 + Kb + Kb' with Hw1 =
    sum_u pbi_u^2 H_u and Kb = sum_c kap_c (kap_c sig1_c eps_c / 2 - h1_c) eps_c', and
    E_k'E_k = sum_{c in k} eps_c eps_c' / S_c^2 for a small component k."""
    Gb, Gs, pstart, pcls, pn2, pA, zb, _, _, zs, comps, big, zu, H, _ = design[:15]
    qb, p = Gb.shape
    qs = Gs.shape[0]
    m, k1 = theta.shape
    K = k1 - 1
    nu = zu.shape[0]
    direct = H.shape[0] == 0
    out = np.full((m, K, p, p), np.nan)
    ok = np.zeros(m, dtype=np.bool_)
    pu = np.empty(nu)
    hs = np.empty((2, qs, p))
    sig = np.empty((qs, 2))
    Eps = np.empty((qs, p))
    Lb = np.empty((qs, p))
    Ls = np.zeros((qs, p))
    s2 = np.empty(qs)
    Hw1 = np.empty((p, p))
    wu = np.empty(nu)
    Hf = np.ascontiguousarray(H.reshape(H.shape[0], p * p))  # (U, p^2)
    LT = np.ascontiguousarray(L.T)
    for j in range(m):
        s0 = theta[j, K]
        rb = theta[j, big] / s0
        good = np.isfinite(rb)
        for u in range(nu):
            pu[u] = 1.0 / (1.0 + rb * zu[u])
            good = good and np.isfinite(pu[u])
        sig[:] = 0.0
        hs[:] = 0.0
        for c in range(qs):
            for k in range(pstart[c], pstart[c + 1]):
                w1 = pu[pcls[k]]
                w2 = w1 * w1
                sig[c, 0] += w1 * pn2[k]
                sig[c, 1] += w2 * pn2[k]
                for i in range(p):
                    hs[0, c, i] += w1 * pA[k, i]
                    hs[1, c, i] += w2 * pA[k, i]
        for c in range(qs):
            ds = theta[j, comps[c]] / s0
            S = 1.0 + ds * (zs[c] - rb * sig[c, 0])
            Si = 1.0 / S
            good = good and S != 0.0 and np.isfinite(Si)
            kap = ds * Si
            s2[c] = Si * Si
            wb = kap * sig[c, 1]
            for i in range(p):
                e = Gs[c, i] - rb * hs[0, c, i]
                Eps[c, i] = e
                Lb[c, i] = kap * (0.5 * wb * e - hs[1, c, i])
        if not good:
            continue
        if direct:
            Hw1[:] = 0.0
            for a in range(qb):
                pz = 1.0 / (1.0 + rb * zb[a])
                w1 = pz * pz
                for i in range(p):
                    for k in range(p):
                        Hw1[i, k] += w1 * Gb[a, i] * Gb[a, k]
        else:  # sum_u pbi_u^2 H_u as one product
            for u in range(nu):
                wu[u] = pu[u] * pu[u]
            Hw1 = (wu @ Hf).reshape(p, p)
        Kb = Lb.T @ Eps
        for k in range(K):
            if k == big:
                gram = Hw1 + Kb + Kb.T
            else:
                for c in range(qs):
                    for i in range(p):
                        Ls[c, i] = s2[c] * Eps[c, i] if comps[c] == k else 0.0
                gram = Ls.T @ Eps
            if not np.all(np.isfinite(gram)):
                good = False
            out[j, k] = L @ gram @ LT
        ok[j] = good
    return out, ok


#: IEEE semantics (1/0 = inf, as NumPy), no GIL, fused multiply-adds (as compiled.py's).
_OPTIONS = {"nogil": True, "error_model": "numpy", "fastmath": {"contract"}}
info = jit(_info_py, **_OPTIONS)
middle = jit(_middle_py, **_OPTIONS)
