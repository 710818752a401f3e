"""Satterthwaite's ingredients through the block structure of Z'Z (:mod:`.structured`).

The terms of :mod:`.satterthwaite` without any (q, q) matrix: every product with
M = (D zrz + I)^-1 or M0 = (D ZZ + I)^-1 = P^-1 is a few structured solves with
P = D ZZ + I (:class:`.structured.Factor`) and products with G = ZX L^-T (q, p),
XX = L L'. With E = P^-T G, C = I - G' P^-1 D G and B = C^-1 (Woodbury, as in
:func:`.structured.score_terms`)::

    M x  = P^-1 (x + D G B G' P^-1 x)        M' x = P^-T (x + G B G' D P^-T x)
    zrz x = ZZ x - G G' x

Observed information, Q - T/2 (:mod:`.satterthwaite`): T/2 is the Fisher information
of the structured scoring (the fit's ``FIM_theta`` where the caller passes it, else
:func:`.fisher._score_structured` at theta), and Q takes
u = M' zry / s0, v = M' u / s0 and M of the K + 2 vectors D zry, D u and u restricted to
each component (u^(k))::

    Q_kl = u^(k)' zrz M u^(l) / s0,   Q_k0 = u_k' v_k,   Q_00 = a'Ha
    a'a  = (yry - 2 zry' w + w' zrz w) / s0^2,  w = M D zry,  a'Ha = (a'a - u' M D u) / s0

Gradient of the covariance: with ZX = G L', B_k = (P^-T ZX)_k = E_k L', so that
s0^2 X'H V_k H X = B_k'B_k = L (E_k'E_k) L' (p, p), E and C = I - G' P^-1 D G by
structured solves of p columns.

With a diagonal Schur complement (nested factors) neither takes a q-vector: Q
comes from the feature's sums over the count classes and the pairs of a group and a
count, and the Gram matrices E_k'E_k from the group sums of :mod:`.structured_nested`,
both in compiled kernels over the block's features (:mod:`.compiled_satterthwaite`;
one pass over the big columns per feature, O(P p + (q_s + U) p^2) besides). Q is that
of zrz for ML too (:mod:`.satterthwaite`), so ML takes the same kernel.

Each feature is taken on its own (its result does not depend on the features sharing
its block, as in the scoring); features whose P or C cannot be inverted are flagged (the
caller takes the dense algebra for them).
"""

from __future__ import annotations

import numpy as np

from flashmm_dask.numerics import compiled_satterthwaite as kernels
from flashmm_dask.numerics.fisher import SharedTerms, _score_structured
from flashmm_dask.numerics.linalg import Array
from flashmm_dask.numerics.structured import Factor, one_blas_thread


class _Feature:
    """The structured pieces of one feature at theta (K+1,) (designs without nested
    factors, whose kernels take :mod:`.compiled_satterthwaite`).

    Attributes
    ----------
    s0 : float
    D : (q,) ratios per permuted column
    fac : Factor
    C, B : (p, p) I - G' P^-1 D G and its inverse
    grams : (K, p, p) E_k'E_k, E = P^-T G
    ok : bool
    """

    def __init__(self, sh: SharedTerms, Gp: Array, theta: Array):
        st = sh.structure
        assert st is not None
        self.sh, self.Gp = sh, Gp
        self.s0 = float(theta[-1])
        self.D = theta[st.comp] / self.s0
        self.fac = Factor(st, self.D[None], inverse=False)
        Y = self.fac.solve((self.D[:, None] * Gp)[None])[0]  # P^-1 D G
        E = self.fac.solve_t(Gp[None])[0]  # P^-T G
        C = np.eye(sh.p) - Gp.T @ Y
        C = 0.5 * (C + C.T)
        self.grams = np.stack([E[st.comp == k].T @ E[st.comp == k] for k in range(sh.K)])
        ok = bool(self.fac.ok[0])
        try:
            self.B = np.linalg.inv(C)
        except np.linalg.LinAlgError:
            self.B = np.full_like(C, np.nan)
        self.ok = ok and bool(np.all(np.isfinite(self.B)) and np.all(np.isfinite(self.grams)))

    def m(self, x: Array) -> Array:
        """M x for x (q, k), permuted order."""
        Gp = self.Gp
        y = self.fac.solve(x[None])[0]
        return self.fac.solve((x + self.D[:, None] * (Gp @ (self.B @ (Gp.T @ y))))[None])[0]

    def mt(self, x: Array) -> Array:
        """M' x for x (q, k), permuted order."""
        Gp = self.Gp
        y = self.fac.solve_t(x[None])[0]
        return self.fac.solve_t((x + Gp @ (self.B @ (Gp.T @ (self.D[:, None] * y))))[None])[0]

    def zrz(self, x: Array) -> Array:
        """zrz x for x (q, k), permuted order."""
        return self.fac.zz(x[None])[0] - self.Gp @ (self.Gp.T @ x)

    def quadratic(self, z: Array, yry: float) -> Array:
        """Q (K+1, K+1) of the observed information for zry z (q,), permuted order."""
        st, K, s0 = self.sh.structure, self.sh.K, self.s0
        assert st is not None
        masks = [st.comp == k for k in range(K)]
        u = self.mt(z[:, None])[:, 0] / s0
        v = self.mt(u[:, None])[:, 0] / s0
        X = np.column_stack([self.D * z, self.D * u] + [u * mk for mk in masks])
        MX = self.m(X)
        w, MDu = MX[:, 0], MX[:, 1]
        R = self.zrz(np.column_stack([w, MX[:, 2:]]))  # zrz w, zrz M u^(l)
        aa = (yry - 2.0 * (z @ w) + w @ R[:, 0]) / s0**2
        Q = np.empty((K + 1, K + 1))
        for k, mk in enumerate(masks):
            uk = u * mk
            for l in range(k + 1):
                Q[k, l] = Q[l, k] = (uk @ R[:, 1 + l]) / s0
            Q[k, K] = Q[K, k] = uk @ v
        Q[K, K] = (aa - u @ MDu) / s0
        return Q


def _features(sh: SharedTerms, theta: Array) -> tuple[list[_Feature | None], Array]:
    """The pieces of each feature with a finite theta, and ok (m,)."""
    st = sh.structure
    assert st is not None
    Gp = np.ascontiguousarray(sh.G[st.perm])
    out: list[_Feature | None] = []
    ok = np.zeros(theta.shape[0], dtype=bool)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for j in range(theta.shape[0]):
            if not np.all(np.isfinite(theta[j])):  # NaN on every path
                out.append(None)
                continue
            f = _Feature(sh, Gp, theta[j])
            out.append(f)
            ok[j] = f.ok
    return out, ok


def expected_information(sh: SharedTerms, theta: Array) -> Array:
    """T / 2 (m, K+1, K+1), the Fisher information of the structured scoring at theta."""
    m = theta.shape[0]
    with one_blas_thread(), np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        zero = np.zeros((m, sh.q))
        return _score_structured(sh, theta, zero, np.zeros(m)).F


def observed_information(
    sh: SharedTerms, theta: Array, zry: Array, yry: Array, fim: Array | None = None
) -> tuple[Array, np.ndarray]:
    """Q - T/2 (m, K+1, K+1) and ok (m,): where not ok the caller takes the dense
    algebra (NaN where theta is not finite, with ok True: NaN there too). ``fim``: T/2 at
    theta (the Fisher information of the structured scoring, a fit's ``FIM_theta``) where
    the caller has it; otherwise computed. Nested factors take Q (the same for REML and
    ML) from the compiled kernel (:func:`.compiled_satterthwaite.info`), the other
    designs from structured solves (:meth:`_Feature.quadratic`)."""
    st = sh.structure
    assert st is not None
    m, K = theta.shape[0], sh.K
    zp = zry[:, st.perm]
    if sh.nested is not None:
        return _observed_nested(sh, theta, zp, yry, fim)
    info = np.full((m, K + 1, K + 1), np.nan)
    with one_blas_thread():
        feats, ok = _features(sh, theta)
        rows = np.flatnonzero(ok)
        if rows.size:
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                T2 = _fisher(sh, theta[rows], zp[rows], yry[rows], fim, rows)
                for i, j in enumerate(rows):
                    f = feats[j]
                    assert f is not None
                    info[j] = f.quadratic(zp[j], float(yry[j])) - T2[i]
    done = ok | np.array([f is None for f in feats])
    return info, done


def _fisher(
    sh: SharedTerms, theta: Array, zp: Array, yry: Array, fim: Array | None, rows: np.ndarray
) -> Array:
    """T/2 of the features ``rows``: ``fim[rows]`` where given, else by the scoring."""
    if fim is not None:
        return fim[rows]
    return _score_structured(sh, theta, zp, yry).F


def _observed_nested(
    sh: SharedTerms, theta: Array, zp: Array, yry: Array, fim: Array | None
) -> tuple[Array, np.ndarray]:
    """:func:`observed_information` with nested factors (zp in the permuted order): Q
    from the compiled kernel, one feature at a time."""
    nested, st = sh.nested, sh.structure
    assert nested is not None and st is not None
    finite = np.all(np.isfinite(theta), axis=1)
    info = np.full((theta.shape[0], sh.K + 1, sh.K + 1), np.nan)
    with one_blas_thread(), np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        nt = (nested.Gb, nested.parent, nested.nval, nested.comps, st.big, nested.pedges)
        Q, ok = kernels.info(
            nested.packed,
            nt,
            nested.order,
            np.ascontiguousarray(theta, dtype=np.float64),
            np.ascontiguousarray(zp, dtype=np.float64),
            np.ascontiguousarray(yry, dtype=np.float64),
        )
        ok &= finite
        rows = np.flatnonzero(ok)
        if rows.size:
            info[rows] = Q[rows] - _fisher(sh, theta[rows], zp[rows], yry[rows], fim, rows)
    return info, ok | ~finite


def middle(sh: SharedTerms, theta: Array) -> tuple[Array, np.ndarray]:
    """s0^2 X'H V_k H X = L (E_k'E_k) L' (m, K, p, p) and ok (m,), as
    :func:`.observed_information`."""
    m, K, p = theta.shape[0], sh.K, sh.p
    if sh.nested is not None:  # the compiled kernel, one feature at a time
        finite = np.all(np.isfinite(theta), axis=1)
        with one_blas_thread(), np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            mid, ok = kernels.middle(
                sh.nested.packed,
                np.ascontiguousarray(theta, dtype=np.float64),
                np.ascontiguousarray(sh.chol, dtype=np.float64),
            )
        return mid, ok | ~finite
    out = np.full((m, K, p, p), np.nan)
    with one_blas_thread():
        feats, ok = _features(sh, theta)
        L = sh.chol
        for j in np.flatnonzero(ok):
            f = feats[j]
            assert f is not None
            out[j] = L @ f.grams @ L.T
    done = ok | np.array([f is None for f in feats])
    return out, done
