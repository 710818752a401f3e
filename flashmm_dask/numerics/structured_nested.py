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
computed once per design (U distinct counts). The group sums weigh a child only through
its count too, so they are sums over the P <= qb pairs of a group and a count of sum n g
and sum n^2, also computed once per design. In the Fisher scoring of
:meth:`NestedTerms.fit` the quadratic forms in zry are likewise taken from the feature's
sums over the counts and pairs (:func:`.compiled_nested._post_sums_py`, computed once per
feature in O(q p)): the work per evaluation is O(P p + (q_s + U) p^2) instead of O(q p^2).
Each feature is evaluated on its own in compiled loops (:mod:`.compiled_nested`), so
that its result does not depend on the features sharing its block.
"""

from __future__ import annotations

import numpy as np

from flashmm_dask.numerics import compiled_nested as kernels
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
        self.pedges = np.append(heads, qb).astype(np.int64)  # a pair's columns
        # H_u = sum_{zb_a = u} g_a g_a' over the U distinct counts
        by = np.argsort(self.cls, kind="stable")
        edges = np.concatenate([[0], np.cumsum(self.ucount.astype(np.int64))])
        # the big columns by count class (within one in this order) for each feature's sums
        # over the classes: zry's columns (corder), rows of G (Gc, padded as pAp), edges
        self.corder = np.ascontiguousarray(self.order[by])
        self.Gc = np.zeros((qb, -(-self.p // 8) * 8))
        self.Gc[:, : self.p] = self.Gb[by]
        self.cedges = edges.astype(np.int64)
        direct = self.zu.size * self.p * self.p > H_VALUES
        self.H = np.empty((0 if direct else self.zu.size, self.p, self.p))
        for u in range(self.H.shape[0]):
            g = self.Gb[by[edges[u] : edges[u + 1]]]
            self.H[u] = g.T @ g
        # pA with zero columns up to a multiple of 8: the compiled sums over the pairs then
        # run in whole SIMD vectors (the same sums)
        pp = -(-self.p // 8) * 8
        self.pAp = np.zeros((self.pA.shape[0], pp))
        self.pAp[:, : self.p] = self.pA
        # every feature's first evaluation (all ratios zero) shares its pieces: once here
        self.first = kernels.start(self.packed, self.comps, st.big)

    def _z(self, x: Array) -> Array:
        """x (q,) in the permuted order with its big part in this order."""
        qb = self.st.qb
        return np.concatenate([x[:qb][self.order], x[qb:]])

    @property
    def packed(self) -> tuple:
        """What the compiled kernels take of the design (:func:`_pre_py`'s first entries)."""
        return (
            self.Gb, self.Gs, self.pstart, self.pcls, self.pn2, self.pA, self.zb, self.cls,
            self.ucount, self.zs, self.comps, self.st.big, self.zu, self.H, self.K, self.pAp,
        )  # fmt: skip

    def _pre(self, D: Array, full: bool = True) -> tuple:
        """The compiled pieces of one feature at the ratios D (q,), permuted order
        (``full=False``: only what C and the solves need, :func:`_pre_py`), pbi (qb,) in
        the place of pu."""
        pre = kernels.pre(*self.packed, D[0], np.ascontiguousarray(D[self.st.qb :]), full)
        return (*pre[:2], pre[2][self.cls], *pre[3:])  # pbi = pu[cls]

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
        t, Q, u2, yR2y, zMDz = kernels.post(
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
        pre = self._pre(D, full=False)
        ok, pbi, Si, kap, Eps = pre[0], pre[2], pre[4], pre[5], pre[10]
        a = kernels.et(self.Gb, self.parent, self.nval, pbi, Si, kap, Eps, self._z(D * x))
        return pre[-1], a, bool(ok)

    def fit(
        self,
        zry: Array,
        yry: Array,
        s_init: Array,
        n: float,
        r: int,
        max_iter: int,
        epsilon: float,
        limit: float,
        free: Array | None = None,
    ) -> tuple[Array, ...]:
        """theta, se_theta, dlogL, FIM_theta, niter, logdetM0, C = I - G' P^-1 D G (m, p,
        p) and G' P^-1 D zry (m, p) at theta (where ok), and ok, of a block of features
        (REML) from ``s_init`` (m, K+1), left as it is; zry (m, q) in the permuted column
        order. ``limit``: the condition bound of the information matrices' inverses
        (``fisher.GINV_LIMIT``); ``free`` (K+1,) bool: the components updated (default all;
        the others stay at their start, ``fisher.fit_theta``'s ``fixed``). Where ``ok`` is
        False the caller refits the feature by ``fisher._scoring``
        (:func:`.compiled_nested.fit`)."""
        st = self.st
        q = st.qb + st.qs
        nt = (
            self.Gb, self.parent, self.nval, self.comps, st.big, self.pedges, self.Gc,
            self.corder, self.cedges,
        )  # fmt: skip
        counts = (float(n - r - q), float(n - r), float(q))
        stop = (int(max_iter), float(epsilon), float(limit))
        return kernels.fit(
            self.packed,
            nt,
            self.order,
            np.ascontiguousarray(zry),
            np.ascontiguousarray(yry, dtype=np.float64),
            np.ascontiguousarray(s_init, dtype=np.float64),
            stop,
            counts,
            np.ones(s_init.shape[1], dtype=bool) if free is None else np.asarray(free, dtype=bool),
            self.first,
        )
