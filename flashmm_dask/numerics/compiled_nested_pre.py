"""The first kernel of one evaluation of the nested structured path
(:mod:`.compiled_nested`, whose docstring and :mod:`.structured_nested`'s give the algebra):
everything before C^-1, for the shared start of a block and for each feature's evaluation.

It has a module of its own only to keep :mod:`.compiled_nested` under the package's 600
lines. numba's disk cache of a kernel checks its own file only, not those of the kernels
it calls: a change here must also touch ``compiled_nested.py`` (whose kernels call
:func:`pre`), or the caches be deleted (``find flashmm_dask -name "*.nb[ic]" -delete``).
"""

from __future__ import annotations

import numpy as np

from flashmm_dask.numerics.jit import jit

__all__ = ["pre"]


def _pre_py(
    Gb, Gs, pstart, pcls, pn2, pA, zb, cls, ucount, zs, comps, big, zu, H, K, pAp, rb, ds, full
):
    """Everything of one evaluation before C^-1: ok, log |det P|, pu (U,) = 1 / (1 +
    rho_b zu) (pbi = pu[cls]), U, S^-1, kappa, the group sums sig (qs, 3) and hs (3, qs,
    p), eps (qs, p), t and Q of W0, the Gram matrices (K, p, p), Hw (3, p, p) = sum_u
    (rho_b pbi, pbi^2, zb pbi^3) H_u and C. The big columns in the order of their parent
    and count (:class:`NestedTerms`); pAp: pA with zero columns up to a multiple of 8, and
    hs (3, qs, pp) as wide (the sums over the pairs in whole SIMD vectors: with p = 30 a
    quarter of the columns went to a scalar remainder loop). ``full=False``: only what C
    and the quadratic forms need (ok, logdet, pu, U, S^-1, kappa, sig[:, 0], hs[0] (hs then
    (1, qs, pp)), eps, Hw[0], C; the profiling evaluation), the rest zero."""
    qb, p = Gb.shape
    qs = Gs.shape[0]
    nu = zu.shape[0]
    ok = True
    logdet = 0.0
    t = np.zeros(K)
    Q = np.zeros((K, K))
    pu = np.empty(nu)
    for u in range(nu):  # what depends on a big column only through its count
        pb = 1.0 + rb * zu[u]
        pu[u] = 1.0 / pb
        ok = ok and np.isfinite(pu[u])
        logdet += ucount[u] * np.log(abs(pb))
        zp = zu[u] * pu[u]
        t[big] += ucount[u] * zp
        Q[big, big] += ucount[u] * zp * zp
    # group sums over the children, pair by pair: sig[c] = sum w n^2, hs[:, c] = sum w n g,
    # w = pbi, pbi^2, zb pbi^3 (hs only hs[0] without ``full``: the rest is read where
    # ``full`` only). Two pairs per sweep over p, each sum in the order of the pairs: half
    # the loads and stores of hs, the same numbers
    sig = np.zeros((qs, 3))
    nh = 3 if full else 1
    pp = pAp.shape[1]
    hs = np.empty((nh, qs, pp))
    for c in range(qs):
        for i in range(nh):
            for j in range(pp):
                hs[i, c, j] = 0.0
        k, k1 = pstart[c], pstart[c + 1]
        while k < k1:
            two = k + 1 < k1
            u = pcls[k]
            v = pcls[k + 1] if two else u
            a1, b1 = pu[u], pu[v] if two else 0.0
            sig[c, 0] += a1 * pn2[k]
            if two:
                sig[c, 0] += b1 * pn2[k + 1]
            if not full and two:
                for j in range(pp):
                    hs[0, c, j] = (hs[0, c, j] + a1 * pAp[k, j]) + b1 * pAp[k + 1, j]
            elif not full:
                for j in range(pp):
                    hs[0, c, j] += a1 * pAp[k, j]
            else:
                a2 = a1 * a1
                a3 = zu[u] * a1 * a2
                sig[c, 1] += a2 * pn2[k]
                sig[c, 2] += a3 * pn2[k]
                if two:
                    b2 = b1 * b1
                    b3 = zu[v] * b1 * b2
                    sig[c, 1] += b2 * pn2[k + 1]
                    sig[c, 2] += b3 * pn2[k + 1]
                    for j in range(pp):
                        g, e = pAp[k, j], pAp[k + 1, j]
                        hs[0, c, j] = (hs[0, c, j] + a1 * g) + b1 * e
                        hs[1, c, j] = (hs[1, c, j] + a2 * g) + b2 * e
                        hs[2, c, j] = (hs[2, c, j] + a3 * g) + b3 * e
                else:
                    for j in range(pp):
                        g = pAp[k, j]
                        hs[0, c, j] += a1 * g
                        hs[1, c, j] += a2 * g
                        hs[2, c, j] += a3 * g
            k += 2
    U = np.empty(qs)
    Si = np.empty(qs)
    kap = np.empty(qs)
    for c in range(qs):
        U[c] = zs[c] - rb * sig[c, 0]
        S = 1.0 + ds[c] * U[c]
        Si[c] = 1.0 / S
        ok = ok and S != 0.0 and np.isfinite(Si[c])
        kap[c] = ds[c] * Si[c]
        logdet += np.log(abs(S))
    # t_k = tr W0_kk and Q_kl = |W0_kl|^2 (the diagonal part above)
    for c in range(qs):
        k = comps[c]
        t[big] -= kap[c] * sig[c, 1]
        Q[big, big] += -2.0 * kap[c] * sig[c, 2] + (kap[c] * sig[c, 1]) ** 2
        us = U[c] * Si[c]
        t[k] += us
        Q[k, k] += us * us
        Q[big, k] += Si[c] * Si[c] * sig[c, 1]
    for k in range(K):
        if k != big:
            Q[k, big] = Q[big, k]
    # sums over the counts: rho_b pbi, pbi^2 and zb pbi^3 times H_u (without H, too large
    # where few columns share a count: over the columns, O(qb p^2))
    Hw = np.zeros((3, p, p))
    if H.shape[0] == 0:
        for u in range(qb):
            z = zb[u]
            pz = 1.0 / (1.0 + rb * z)
            w0, w1 = rb * pz, pz * pz
            w2 = z * pz * w1
            for i in range(p):
                for j in range(p):
                    h = Gb[u, i] * Gb[u, j]
                    Hw[0, i, j] += w0 * h
                    if full:
                        Hw[1, i, j] += w1 * h
                        Hw[2, i, j] += w2 * h
    else:  # the weights (nw, U) times the H_u (U, p^2) in one product by BLAS
        nw = 3 if full else 1
        Wu = np.empty((nw, nu))
        for u in range(nu):
            z = zu[u]
            pz = 1.0 / (1.0 + rb * z)
            Wu[0, u] = rb * pz
            if full:
                Wu[1, u] = pz * pz
                Wu[2, u] = z * pz * (pz * pz)
        Hw[:nw] = (Wu @ H.reshape((nu, p * p))).reshape((nw, p, p))
    # C = I - Hw0 - sum_c kap eps eps'; Gram_big = Hw1 + sum_c (kap^2 sig2 eps eps' -
    # kap (h2 eps' + eps h2')) = Hw1 + M + M' with M = sum_c kap (kap sig2 eps / 2 - h2)
    # eps'; Gram_k = sum_{c in k} S^-2 eps eps'. The three in one product by BLAS: L' Eps
    # with L = [kap eps, kap (kap sig2 eps / 2 - h2), S^-2 eps] (qs, 3p) (C alone: the
    # first p columns)
    nl = 3 if full else 1
    Eps = np.empty((qs, p))
    L = np.empty((qs, nl * p))  # every entry set below
    for c in range(qs):
        wb = kap[c] * sig[c, 1]
        s2 = Si[c] * Si[c]
        for j in range(p):
            e = Gs[c, j] - rb * hs[0, c, j]
            Eps[c, j] = e
            L[c, j] = kap[c] * e
            if full:
                L[c, p + j] = kap[c] * (0.5 * wb * e - hs[1, c, j])
                L[c, 2 * p + j] = s2 * e
    LE = L.T @ Eps
    C = np.eye(p) - Hw[0] - LE[:p]
    grams = np.zeros((K, p, p))
    if full:
        KbK = LE[p : 2 * p]
        for k in range(K):
            if k == big:
                grams[k] = Hw[1] + KbK + KbK.T
            elif K == 2:  # the one small component: all rows of L
                grams[k] = LE[2 * p :]
            else:
                Ws = np.zeros((qs, p))
                for c in range(qs):
                    if comps[c] == k:
                        for j in range(p):
                            Ws[c, j] = L[c, 2 * p + j]
                grams[k] = Ws.T @ Eps
    C = 0.5 * (C + C.T)
    return ok, logdet, pu, U, Si, kap, sig, hs, t, Q, Eps, grams, Hw, C


#: compiled_nested's options: IEEE semantics, no GIL, fused multiply-adds.
pre = jit(_pre_py, nogil=True, error_model="numpy", fastmath={"contract"})
