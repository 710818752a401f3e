"""REML's rank-p correction of the structured path for a diagonal Schur complement (nested
factors such as donor + donor:state), without any O(q p^2) work per evaluation.

With S diagonal (:attr:`.structured.Structure.diagonal`), ZZ is block diagonal over groups:
a column c of the small components with its children, the columns a of the big component
with N[a, c] = n_a != 0 (at most one per a; a column without a parent is a group of its own).
With rho_b the ratio of the big component, rho_c that of c, pbi_a = 1 / (1 + rho_b zb_a),
S_c = 1 + rho_c U_c and kappa_c = rho_c / S_c, per group::

    P^-1 = diag(pbi, 0) + l r' / S_c,   l = e_c - rho_b t,  r = e_c - rho_c t,  t = pbi n
    W0   = diag(zb pbi, 0) + (t e_c' + e_c t' - rho_c t t' + U_c e_c e_c') / S_c

so that, with G the (q, p) rows of ZX L^-T, eps_c = g_c - rho_b h_c and the group sums
h_c = sum_a pbi n g_a, h2_c = sum_a pbi^2 n g_a, h3_c = sum_a zb pbi^3 n g_a::

    E_a = pbi_a g_a - kappa_c pbi_a n_a eps_c,   E_c = eps_c / S_c       (E = P^-T G)
    C   = I - G' P^-1 D G = I - rho_b sum_a pbi_a g_a g_a' - sum_c kappa_c eps_c eps_c'

and every p x p matrix the score needs (C, the Gram matrices E_k'E_k and the traces of
E_k' W0_kl E_l against C^-1) is a sum over the big columns of f(zb_a) g_a g_a' plus one
over the groups of products of eps_c, h2_c and h3_c. The weights of the first depend on a
only through its count zb_a, so it is sum_u f(u) H_u with H_u = sum_{zb_a = u} g_a g_a'
computed once per design (U distinct counts): the work per feature and evaluation is
O(q p + (q_s + U) p^2) instead of O(q p^2). Each feature is evaluated on its own in
compiled loops, so that its result does not depend on the features sharing its block.
"""

from __future__ import annotations

import numpy as np

from flashmm_dask.numerics.jit import jit
from flashmm_dask.numerics.linalg import Array
from flashmm_dask.numerics.structured import Structure

#: float64 values above which the sums H_u over the counts are not stored (each evaluation
#: then sums over the big columns instead: random slopes, whose "counts" are all distinct).
H_VALUES = 2**22


class NestedTerms:
    """What the nested REML correction needs of a design, computed once.

    Parameters
    ----------
    st : Structure
        With ``st.diagonal``.
    G : (q, p) rows of ZX L^-T in the original column order.
    """

    def __init__(self, st: Structure, G: Array):
        assert st.diagonal
        self.st = st
        qb = st.qb
        Gp = G[st.perm]
        self.Gs = np.ascontiguousarray(Gp[qb:])
        self.p = int(G.shape[1])
        self.K = int(st.comp.max()) + 1
        self.comps = np.ascontiguousarray(st.comp[qb:], dtype=np.int64)
        self.zs = np.ascontiguousarray(np.diag(st.Zs))
        nval = np.asarray(st.N @ np.ones(st.qs))  # n_a (0 without a parent)
        lens = np.diff(st.N.indptr)
        parent = np.full(qb, -1, dtype=np.int64)  # c of a, -1 without a parent
        parent[lens == 1] = st.N.indices[st.N.indptr[:-1][lens == 1]]
        # the big columns in the order of their parent (those without one first) and, within
        # a group, of their count class, so that each group's children are contiguous
        # (starts[c]:starts[c + 1]) and so are those of one count (a "pair" of the group c
        # and the count class u)
        self.zu, cls = np.unique(st.zb, return_inverse=True)
        self.order = np.lexsort((cls, parent))
        self.parent = np.ascontiguousarray(parent[self.order])
        self.starts = np.searchsorted(self.parent, np.arange(st.qs + 1))
        self.nval = np.ascontiguousarray(nval[self.order])
        self.zb = np.ascontiguousarray(st.zb[self.order])
        self.Gb = np.ascontiguousarray(Gp[:qb][self.order])
        self.cls = np.ascontiguousarray(cls[self.order], dtype=np.int64)
        self.ucount = np.bincount(self.cls, minlength=self.zu.size).astype(np.float64)
        # the pairs: their count class, sum n^2 and sum n g over their children, and the
        # pairs of group c at pstart[c]:pstart[c + 1] (the group sums of an evaluation
        # weigh a child by its count only: O(pairs p), not O(qb p))
        first = self.starts[0]
        change = np.flatnonzero(
            (np.diff(self.parent[first:]) != 0) | (np.diff(self.cls[first:]) != 0)
        )
        heads = first + np.concatenate([[0], change + 1]) if qb > first else np.zeros(0, int)
        self.pcls = np.ascontiguousarray(self.cls[heads])
        nn = self.nval * self.nval
        self.pn2 = np.add.reduceat(nn, heads) if heads.size else np.zeros(0)
        ng = self.nval[:, None] * self.Gb
        self.pA = np.add.reduceat(ng, heads, axis=0) if heads.size else np.zeros((0, self.p))
        self.pstart = np.searchsorted(self.parent[heads], np.arange(st.qs + 1))
        # H_u = sum_{zb_a = u} g_a g_a' over the U distinct counts
        by = np.argsort(self.cls, kind="stable")
        edges = np.concatenate([[0], np.cumsum(self.ucount.astype(np.int64))])
        direct = self.zu.size * self.p * self.p > H_VALUES
        self.H = np.empty((0 if direct else self.zu.size, self.p, self.p))
        for u in range(self.H.shape[0]):
            g = self.Gb[by[edges[u] : edges[u + 1]]]
            self.H[u] = g.T @ g

    def _z(self, x: Array) -> Array:
        """x (q,) in the permuted order with its big part in this order."""
        qb = self.st.qb
        return np.concatenate([x[:qb][self.order], x[qb:]])

    @property
    def packed(self) -> tuple:
        """What the compiled kernels take of the design (:func:`_pre_py`'s first entries)."""
        return (
            self.Gb, self.Gs, self.pstart, self.pcls, self.pn2, self.pA, self.zb, self.cls,
            self.ucount, self.zs, self.comps, self.st.big, self.zu, self.H, self.K,
        )  # fmt: skip

    def _pre(self, D: Array) -> tuple:
        """The compiled pieces of one feature at the ratios D (q,), permuted order."""
        return _pre(*self.packed, D[0], np.ascontiguousarray(D[self.st.qb :]), True)

    def score(
        self, K: int, s: Array, zry: Array, yry: Array, final: bool
    ) -> tuple[Array, Array, Array, Array, Array, Array, Array]:
        """:func:`.structured.score_terms` (REML) of one feature: s (1, K+1), zry (1, q)
        in the permuted order, yry (1,); the same outputs."""
        D = s[0, self.st.comp] / s[0, -1]
        pre = self._pre(D)
        C = pre[-1]
        try:
            B = np.linalg.inv(C)
        except np.linalg.LinAlgError:
            B = np.full_like(C, np.nan)
        ok = bool(pre[0]) and bool(np.all(np.isfinite(B)))
        t, Q, u2, yR2y, zMDz = _post(
            self.Gb, self.parent, self.nval, self.comps, self.st.big, *pre[2:-1], B,
            D[0], np.ascontiguousarray(D[self.st.qb :]), self._z(zry[0]), yry[0], True,
        )  # fmt: skip
        logdet = np.full(1, np.nan)
        if final:
            logdet[0] = -(pre[1] + np.linalg.slogdet(C)[1])
        return (
            t[None],
            Q[None],
            u2[None],
            np.array([yR2y]),
            np.array([zMDz]),
            logdet,
            np.array([ok]),
        )

    def md_gram(self, D: Array, x: Array) -> tuple[Array, Array, bool]:
        """C = I - G' P^-1 D G (p, p) and a = G' P^-1 D x (p,) of one feature (D (1, q),
        x (q,) in the permuted order), and whether P is invertible."""
        D = D[0]
        pre = self._pre(D)
        ok, pbi, Si, kap, Eps = pre[0], pre[2], pre[4], pre[5], pre[10]
        a = _et(self.Gb, self.parent, self.nval, pbi, Si, kap, Eps, self._z(D * x))
        return pre[-1], a, bool(ok)

    def gram_terms(self, D: Array) -> tuple[Array, Array, bool]:
        """C = I - G' P^-1 D G (p, p), the Gram matrices E_k'E_k (K, p, p) of E = P^-T G
        and whether P is invertible, of one feature at the ratios D (q,) in the permuted
        order (Satterthwaite's df, :mod:`.satterthwaite_structured`)."""
        pre = self._pre(D)
        return pre[-1], pre[11], bool(pre[0])


def _pre_py(Gb, Gs, pstart, pcls, pn2, pA, zb, cls, ucount, zs, comps, big, zu, H, K, rb, ds, full):
    """Everything of one evaluation before C^-1: ok, log |det P|, pbi, U, S^-1, kappa, the
    group sums sig (qs, 3) and hs (3, qs, p), eps (qs, p), t and Q of W0, the Gram
    matrices (K, p, p), sum_u zb pbi^3 H_u and C. The big columns in the order of their
    parent and count (:class:`NestedTerms`). ``full=False``: only what C and the quadratic
    forms need (ok, logdet, pbi, U, S^-1, kappa, sig[:, 0], hs[0], eps, C; the profiling
    evaluation), the rest left zero."""
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
    pbi = np.empty(qb)
    for a in range(qb):
        pbi[a] = pu[cls[a]]
    # group sums over the children, pair by pair: sig[c] = sum w n^2, hs[:, c] = sum w n g,
    # w = pbi, pbi^2, zb pbi^3
    sig = np.zeros((qs, 3))
    hs = np.zeros((3, qs, p))
    for c in range(qs):
        for k in range(pstart[c], pstart[c + 1]):
            u = pcls[k]
            w1 = pu[u]
            sig[c, 0] += w1 * pn2[k]
            for j in range(p):
                hs[0, c, j] += w1 * pA[k, j]
            if full:
                w2 = w1 * w1
                w3 = zu[u] * w1 * w2
                sig[c, 1] += w2 * pn2[k]
                sig[c, 2] += w3 * pn2[k]
                for j in range(p):
                    g = pA[k, j]
                    hs[1, c, j] += w2 * g
                    hs[2, c, j] += w3 * g
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
    direct = H.shape[0] == 0
    for u in range(qb if direct else zu.shape[0]):
        z = zb[u] if direct else zu[u]
        pz = 1.0 / (1.0 + rb * z)
        w0, w1 = rb * pz, pz * pz
        w2 = z * pz * w1
        for i in range(p):
            for j in range(p):
                h = Gb[u, i] * Gb[u, j] if direct else H[u, i, j]
                Hw[0, i, j] += w0 * h
                if full:
                    Hw[1, i, j] += w1 * h
                    Hw[2, i, j] += w2 * h
    # C = I - Hw0 - sum_c kap eps eps'; Gram_big = Hw1 + sum_c (kap^2 sig2 eps eps' -
    # kap (h2 eps' + eps h2')) = Hw1 + M + M' with M = sum_c (kap sig2 eps / 2 - h2) (kap
    # eps)'; Gram_k = sum_{c in k} S^-2 eps eps' (the products by BLAS)
    Eps = np.empty((qs, p))
    K1 = np.empty((qs, p))
    Kb = np.empty((qs, p))
    for c in range(qs):
        wb = kap[c] * sig[c, 1]
        for j in range(p):
            e = Gs[c, j] - rb * hs[0, c, j]
            Eps[c, j] = e
            K1[c, j] = kap[c] * e
            Kb[c, j] = 0.5 * wb * e - hs[1, c, j]
    C = np.eye(p) - Hw[0] - Eps.T @ K1
    grams = np.zeros((K, p, p))
    if full:
        KbK = Kb.T @ K1
        for k in range(K):
            if k == big:
                grams[k] = Hw[1] + KbK + KbK.T
            else:
                Ws = np.zeros((qs, p))
                for c in range(qs):
                    if comps[c] == k:
                        for j in range(p):
                            Ws[c, j] = Si[c] * Si[c] * Eps[c, j]
                grams[k] = Eps.T @ Ws
    C = 0.5 * (C + C.T)
    return ok, logdet, pbi, U, Si, kap, sig, hs, t, Q, Eps, grams, Hw[2], C


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
    EB = Eps @ B
    HB = hs[1] @ B
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
    Hw2,
    B,
    rb,
    ds,
    zry,
    yry,
    full,
):
    """The score's pieces after C^-1 = B: t, Q of W = W0 - E B E', u2, yR2y and zMDz
    (``full=False``: t and Q as they are, the profiling evaluation)."""
    qb = Gb.shape[0]
    qs = Eps.shape[0]
    K = t.shape[0]
    t = t.copy()
    Q = Q.copy()
    if full:
        _traces(big, comps, U, Si, kap, sig, hs, Eps, grams, Hw2, B, t, Q)
    # u = P^-T zry + E beta, M D zry = P^-1 D zry + D E beta, beta = B E' D zry
    x = np.empty(qb + qs)
    for a in range(qb):
        x[a] = rb * zry[a]
    for c in range(qs):
        x[qb + c] = ds[c] * zry[qb + c]
    beta = B @ _et(Gb, parent, nval, pbi, Si, kap, Eps, x)
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


#: IEEE semantics (1/0 = inf, as NumPy), no GIL, fused multiply-adds (as compiled.py's).
_OPTIONS = {"nogil": True, "error_model": "numpy", "fastmath": {"contract"}}
_pre = jit(_pre_py, **_OPTIONS)
_traces = jit(_traces_py, **_OPTIONS)
_post = jit(_post_py, **_OPTIONS)
_et = jit(_et_py, **_OPTIONS)
