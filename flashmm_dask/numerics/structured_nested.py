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
O(q p + (q_s + U) p^2) instead of O(q p^2).
"""

from __future__ import annotations

import functools

import numpy as np

from flashmm_dask.numerics.jit import jit
from flashmm_dask.numerics.linalg import Array
from flashmm_dask.numerics.structured import Factor, Structure


class NestedTerms:
    """What the nested REML correction needs of a design, computed once.

    Parameters
    ----------
    st : Structure
        With ``st.diagonal``.
    G : (q, p) rows of ZX L^-T in the permuted order.
    """

    def __init__(self, st: Structure, G: Array):
        assert st.diagonal
        self.st = st
        qb = st.qb
        self.Gb = np.ascontiguousarray(G[:qb])
        self.Gs = np.ascontiguousarray(G[qb:])
        self.p = int(G.shape[1])
        self.small = [(int(k), np.flatnonzero(st.comp[qb:] == k)) for k in np.unique(st.comp[qb:])]
        self.sel = [np.flatnonzero(st.comp == k) for k in range(int(st.comp.max()) + 1)]
        self.nval = np.asarray(st.N @ np.ones(st.qs))  # n_a (0 without a parent)
        lens = np.diff(st.N.indptr)
        self.parent = np.full(qb, -1, dtype=np.int64)  # c of a, -1 without a parent
        self.parent[lens == 1] = st.N.indices[st.N.indptr[:-1][lens == 1]]

    @functools.cached_property
    def counts(self) -> tuple[Array, Array]:
        """The distinct counts zb (U,) and H (U, p*p), H_u = sum_{zb_a = u} g_a g_a'."""
        zu, cls = np.unique(self.st.zb, return_inverse=True)
        order = np.argsort(cls, kind="stable")
        starts = np.searchsorted(cls[order], np.arange(zu.size + 1))
        H = np.empty((zu.size, self.p * self.p))
        for u in range(zu.size):
            g = self.Gb[order[starts[u] : starts[u + 1]]]
            H[u] = (g.T @ g).ravel()
        return zu, H

    def score(
        self, K: int, s: Array, zry: Array, yry: Array, final: bool
    ) -> tuple[Array, Array, Array, Array, Array, Array, Array]:
        """:func:`.structured.score_terms` (REML) of one feature: s (1, K+1), zry (1, q)
        in the permuted order, yry (1,); the same outputs."""
        return _score_one(self, K, s[:, self.st.comp] / s[:, -1:], zry, yry, final)

    def md_gram(self, D: Array, x: Array) -> tuple[Array, Array, Factor]:
        """C = I - G' P^-1 D G (p, p) and a = G' P^-1 D x (p,) of one feature (D (1, q),
        x (q,) in the permuted order) and the factored P (:class:`.structured.Factor`)."""
        pt = _Parts(self, D, 1)
        return pt.C, pt.et(D[0] * x), pt.fac


class _Parts:
    """The pieces of one feature's evaluation shared by the score and the fixed effects."""

    def __init__(self, T: NestedTerms, D: Array, weights: int):
        st, p = T.st, T.p
        self.T, self.D = T, D
        self.fac = fac = Factor(st, D)
        self.rb = rb = D[0, 0]
        self.Si = fac.Si[0]
        self.pbi = fac.pbi[0]
        self.kap = fac.ds[0] * self.Si  # rho_c / S_c
        self.hs, self.sig = _group_sums(T.Gb, T.parent, T.nval, st.zb, self.pbi, st.qs)
        zu, H = T.counts
        pu = 1.0 / (1.0 + rb * zu)
        w = np.stack([rb * pu, pu * pu, zu * pu**3][:weights])
        self.Hw = (w @ H).reshape(weights, p, p)  # sum_u w_u H_u
        self.Eps = T.Gs - rb * self.hs[:, 0]
        self.K1 = self.kap[:, None] * self.Eps
        C = np.eye(p) - self.Hw[0] - self.Eps.T @ self.K1
        self.C = 0.5 * (C + C.T)

    def et(self, x: Array) -> Array:
        """E' x = G' P^-1 x for x (q,): sum_a E_a x_a + sum_c E_c x_c."""
        T, qb = self.T, self.T.st.qb
        px = self.pbi * x[:qb]
        return T.Gb.T @ px + self.Eps.T @ (x[qb:] * self.Si - self.kap * (T.st.NT @ px))

    def e_times(self, beta: Array) -> Array:
        """E beta (q,) for beta (p,)."""
        T = self.T
        eb = self.Eps @ beta
        return np.concatenate([self.pbi * (T.Gb @ beta - T.st.N @ (self.kap * eb)), eb * self.Si])


def _score_one(
    T: NestedTerms, K: int, D: Array, zry: Array, yry: Array, final: bool
) -> tuple[Array, Array, Array, Array, Array, Array, Array]:
    st = T.st
    pt = _Parts(T, D, 3)
    fac, C, Eps, K1, Hw, Si, kap = pt.fac, pt.C, pt.Eps, pt.K1, pt.Hw, pt.Si, pt.kap
    t, Q = fac.w0_blocks(K)
    U = fac.U[0]
    h2, h3 = pt.hs[:, 1], pt.hs[:, 2]
    sig2, sig3 = pt.sig[:, 1], pt.sig[:, 2]
    h2K = h2.T @ K1
    grams = {st.big: Hw[1] + Eps.T @ ((kap * sig2)[:, None] * K1) - (h2K + h2K.T)}
    for k, sel in T.small:
        Ek = Eps[sel]
        grams[k] = Ek.T @ (Ek * (Si[sel] ** 2)[:, None])
    try:
        B = np.linalg.inv(C)
    except np.linalg.LinAlgError:
        B = np.full_like(C, np.nan)
    ok = fac.ok & np.all(np.isfinite(B))
    # traces tr(R_kl B) of R_kl = E_k' W0_kl E_l (B symmetric)
    EpsB = Eps @ B
    Tau = h2 - (kap * sig2)[:, None] * Eps  # E_b' t_c
    TauB = Tau @ B
    eBe = np.sum(Eps * EpsB, axis=1)
    tR = {
        (st.big, st.big): np.sum(Hw[2] * B)
        - 2.0 * kap @ np.sum(h3 * EpsB, axis=1)
        + (kap * kap * sig3) @ eBe
        - kap @ np.sum(Tau * TauB, axis=1)
    }
    tauBe = np.sum(Tau * EpsB, axis=1)
    for k, sel in T.small:
        tR[st.big, k] = Si[sel] ** 2 @ tauBe[sel]
        tR[k, k] = (U[sel] * Si[sel] ** 3) @ eBe[sel]
    GB = {k: g @ B for k, g in grams.items()}
    for k in range(K):
        t[0, k] -= np.sum(B * grams[k])
        for l in range(k, K):
            key = (k, l) if (k, l) in tR else (l, k)
            corr = -2.0 * tR.get(key, 0.0) + np.sum(GB[k] * GB[l].T)
            Q[0, k, l] += corr
            if l != k:
                Q[0, l, k] = Q[0, k, l]
    # u = P^-T zry + E B E' D zry, M D zry = P^-1 D zry + D E B E' D zry
    x = D[0] * zry[0]
    Eb = pt.e_times(B @ pt.et(x))
    u = fac.solve_t(zry)[0] + Eb
    MDz = fac.solve(x[None])[0] + D[0] * Eb
    yR2y = yry - np.sum((u + zry[0]) * MDz)
    zMDz = np.sum(zry[0] * MDz)
    u2 = np.array([[np.sum(u[sel] ** 2) for sel in T.sel]])
    logdet = -(fac.logdet() + np.linalg.slogdet(C)[1]) if final else np.full(1, np.nan)
    return t, Q, u2, np.atleast_1d(yR2y), np.atleast_1d(zMDz), logdet, ok


def _group_sums_py(
    Gb: Array, parent: np.ndarray, nval: Array, zb: Array, pbi: Array, qs: int
) -> tuple[Array, Array]:
    """Group sums over the big columns a with parent c, for the weights w = pbi, pbi^2 and
    zb pbi^3: hs[c, j] = sum_a w_j n_a g_a (qs, 3, p) and sig[c, j] = sum_a w_j n_a^2
    (qs, 3), in one pass over G's big rows (in a fixed order)."""
    p = Gb.shape[1]
    hs = np.zeros((qs, 3, p))
    sig = np.zeros((qs, 3))
    for a in range(Gb.shape[0]):
        c = parent[a]
        if c < 0:
            continue
        w1 = pbi[a] * nval[a]
        w2 = pbi[a] * w1
        w3 = zb[a] * pbi[a] * w2
        sig[c, 0] += w1 * nval[a]
        sig[c, 1] += w2 * nval[a]
        sig[c, 2] += w3 * nval[a]
        for j in range(p):
            g = Gb[a, j]
            hs[c, 0, j] += w1 * g
            hs[c, 1, j] += w2 * g
            hs[c, 2, j] += w3 * g
    return hs, sig


_group_sums = jit(_group_sums_py, nogil=True, error_model="numpy")
