"""Fisher scoring through the structure of Z'Z: K >= 2 components, one of them diagonal.

A random component coded by the indicators of one factor has a diagonal block Z_k'Z_k. With
such a component b ("big") and the others s ("small"), in the order [b, s]::

    ZZ = [[diag(zb), N], [N', Zs]],   D = diag(db, ds)   (the ratios s_k / s0 per column)
    P  = D ZZ + I = [[Pb, Db N], [Ds N', I + Ds Zs]],     Pb = diag(1 + db zb)

The Schur complement over the diagonal block is S = I + Ds U with U = Zs - N' (Db Pb^-1) N
(q_s x q_s; diagonal when Zs is diagonal and no row of N has two non-zeros, as for nested
factors such as donor:state within donor). Every solve with P or P' is a diagonal scaling,
products with the sparse N and a solve with S. The ML quantities follow from

    W0 = ZZ P^-1 = [[diag(zb/pb) - T (S^-1 Ds) T', T S^-1], [S^-T T', U S^-1]],  T = Pb^-1 N

and the REML ones from zrz = ZZ - G G' (G = ZX L^-T, XX = L L', p columns) by Woodbury::

    Y = P^-1 D G,  E = P^-T G,  C = I_p - G' Y,  B = C^-1
    M = (D zrz + I)^-1 = P^-1 + Y B E',     W = zrz M = W0 - E B E'

so the work per feature and iteration is O(q p^2 + nnz(N) q_s + q_s^3) instead of
O(q^3) (the products with N in compiled kernels, :mod:`.structured_crossed`). When S is
diagonal (nested factors), REML's terms are taken group by group in
:mod:`.structured_nested` instead: O(P p + (q_s + U) p^2), U distinct counts, P
pairs of a group and a count.

With t_k = tr W_kk, Q_kl = sum of squares of W[I_k, I_l] and M0 = I - D W, the score and
information of ALGORITHM.md are

    tr W2_kk = t_k - sum_l D_l Q_kl,   tr M0 = q - sum_k D_k t_k,
    tr M0 M0 = q - 2 sum_k D_k t_k + sum_kl D_k D_l Q_kl.

:func:`detect` finds the structure from ZZ alone (exact zeros), never from names.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import scipy.linalg.lapack
import scipy.sparse
from threadpoolctl import ThreadpoolController

from flashmm_dask.numerics import structured_crossed as crossed
from flashmm_dask.numerics.compiled import DIVISION_MIN, rowsums
from flashmm_dask.numerics.jit import jit
from flashmm_dask.numerics.linalg import Array


@dataclass(frozen=True)
class Structure:
    """The block structure of ZZ that the structured path uses.

    Attributes
    ----------
    big : int
        Index of the diagonal component that is eliminated.
    perm : (q,) int
        Columns in the order [big component, the others in their order].
    comp : (q,) int
        Component of each permuted column.
    qb : int
        Columns of the big component.
    zb : (qb,) diagonal of its block.
    N : (qb, qs) sparse CSR, the coupling block; NT its transpose (CSR).
    Zs : (qs, qs) dense block of the other components.
    diagonal : bool
        S is diagonal: Zs is diagonal and no row of N has two non-zeros.
    pairs : int
        Pairs of non-zeros in a row of N, sum_a nnz(N[a])^2 (the terms of N' diag(w) N).
    nsq, nsqT : N * N elementwise and its transpose, CSR (diagonal S only).
    """

    big: int
    perm: np.ndarray
    comp: np.ndarray
    qb: int
    zb: Array
    N: scipy.sparse.csr_array
    NT: scipy.sparse.csr_array
    Zs: Array
    diagonal: bool
    pairs: int
    nsq: scipy.sparse.csr_array | None = None
    nsqT: scipy.sparse.csr_array | None = None

    @property
    def qs(self) -> int:
        return int(self.Zs.shape[0])

    @cached_property
    def zs_diagonal(self) -> Array | None:
        """The diagonal of Zs where Zs is diagonal (crossed indicator factors), else None."""
        return np.ascontiguousarray(np.diag(self.Zs)) if _is_diagonal(self.Zs) else None

    @cached_property
    def small_edges(self) -> np.ndarray:
        """(n_s + 1,) the small columns of the n_s small components, in order, are
        ``small_edges[k]:small_edges[k + 1]`` (the permutation keeps them contiguous)."""
        cs = self.comp[self.qb :]
        return np.concatenate([[0], np.flatnonzero(np.diff(cs)) + 1, [cs.size]])

    @property
    def work_values(self) -> int:
        """float64 values of work arrays per feature (for block sizes): with a diagonal S
        the block holds only the features' own q-vectors (their work arrays are taken one
        feature at a time, :mod:`.structured_nested`)."""
        q = self.qb + self.qs
        return 4 * q if self.diagonal else 16 * q + 6 * self.qs * self.qs


def worth_it(st: Structure, p: int, K: int) -> bool:
    """Whether the structured path is estimated to cost less than the dense one (flops per
    feature and iteration, with a factor 2 for the structured path's per-call overhead).

    With a diagonal S, REML's correction costs O(q p + (q_s + U) p^2) (U distinct counts
    of the big block, :mod:`.structured_nested`); otherwise O(q p^2) and the dense S."""
    q = st.qb + st.qs
    if st.diagonal:
        u = np.unique(st.zb).size
        cost = 8 * q * p + (4 * st.qs + 3 * u) * p * p + K * K * p**3
    else:
        cost = (3 + K) * q * p * p + K * K * p**3 + 4 * st.qs**3 + 2 * st.pairs
    return q**3 >= MIN_DENSE_FLOPS and 2 * cost < 2 * q**3


#: q^3 below which the dense compiled kernel is kept (the structured path runs in NumPy,
#: one feature at a time, with a per-call overhead of the order of a q = 100 dense step).
MIN_DENSE_FLOPS = 10**6


def _is_diagonal(block: Array) -> bool:
    """No non-zero (or NaN) off the diagonal of a square block (exactly; one compiled pass
    over the bits without copying the block, stopping at the first row with such an
    entry)."""
    return bool(_offdiagonal_zero(block.view(np.uint64)))


def _offdiagonal_zero_py(a: np.ndarray) -> bool:
    # the bits of each row but the diagonal OR-ed, less the sign bit (-0.0 is zero; NaN,
    # inf and subnormals are not): exact, and vectorised where a float comparison with an
    # early exit per entry was not (451 MB of the nested atlas's Z'Z: 56 -> 25 ms)
    one = np.uint64(1)
    zero = np.uint64(0)
    for i in range(a.shape[0]):
        r = a[i]
        acc = zero
        for j in range(r.size):
            acc |= r[j] if j != i else zero
        if acc << one != zero:
            return False
    return True


_offdiagonal_zero = jit(_offdiagonal_zero_py, nogil=True)


def _csr_py(
    a: Array, c0: int, c1: int, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray
) -> int:
    # each row's columns c0:c1 a contiguous slice of a C-contiguous row (a two-dimensional
    # view was read entry by entry); the non-zeros past the capacity of indices are counted
    nnz = 0
    for i in range(a.shape[0]):
        v = a[i][c0:c1]
        for j in range(v.shape[0]):
            if v[j] != 0.0:
                if nnz < indices.size:
                    indices[nnz] = j
                    data[nnz] = v[j]
                nnz += 1
        indptr[i + 1] = nnz
    return nnz


_csr_fill = jit(_csr_py, nogil=True)


def _csr(a: Array, c0: int = 0, c1: int | None = None) -> scipy.sparse.csr_array:
    """The columns c0:c1 of a C-contiguous (r, c) array (default all) as a canonical CSR
    array, compiled (scipy's conversion from dense took twice as long as building the rest
    of the structure): one pass where the block has at most two non-zeros per row (a
    nested factor's N: one), else a second one with the count of the first."""
    c1 = a.shape[1] if c1 is None else c1
    if not a.flags.c_contiguous:  # (a Fortran-ordered ZZ) the columns copied
        a, c0, c1 = np.ascontiguousarray(a[:, c0:c1]), 0, c1 - c0
    indptr = np.zeros(a.shape[0] + 1, dtype=np.int32)
    indices, data = np.empty(2 * a.shape[0], dtype=np.int32), np.empty(2 * a.shape[0])
    nnz = _csr_fill(a, c0, c1, indptr, indices, data)
    if nnz > indices.size:
        indices, data = np.empty(nnz, dtype=np.int32), np.empty(nnz)
        _csr_fill(a, c0, c1, indptr, indices, data)
    return scipy.sparse.csr_array((data[:nnz], indices[:nnz], indptr), shape=(a.shape[0], c1 - c0))


def detect(ZZ: Array, d: np.ndarray, diagonal: Sequence[bool] | None = None) -> Structure | None:
    """The structure of ZZ for the structured path, or None (the dense path).

    Needs K >= 2 components and one with an exactly diagonal block Z_k'Z_k (the largest such
    one is eliminated). ``diagonal`` (K,): which blocks of this ZZ are diagonal, where a
    pass over it has found that already (:func:`.zz_scan.scan`); read here otherwise.
    """
    d = np.asarray(d, dtype=np.int64)
    if len(d) < 2:
        return None
    edges = np.concatenate([[0], np.cumsum(d)])
    if diagonal is not None and len(diagonal) != len(d):
        raise ValueError(f"diagonal has {len(diagonal)} entries for {len(d)} components")
    diag = (
        [bool(x) for x in diagonal]
        if diagonal is not None
        else [
            _is_diagonal(ZZ[edges[k] : edges[k + 1], edges[k] : edges[k + 1]])
            for k in range(len(d))
        ]
    )
    if not any(diag):
        return None
    big = max((k for k in range(len(d)) if diag[k]), key=lambda k: (d[k], -k))
    ib = np.arange(edges[big], edges[big + 1])
    is_ = np.concatenate([np.arange(edges[k], edges[k + 1]) for k in range(len(d)) if k != big])
    perm = np.concatenate([ib, is_])
    comp = np.repeat(np.arange(len(d)), d)[perm]
    zb = np.ascontiguousarray(np.diag(ZZ)[ib])
    # the rows of the big component are a range: a view, then the small columns
    rows = ZZ[edges[big] : edges[big + 1]]
    N = _csr(rows[:, is_]) if big not in (0, len(d) - 1) else _csr(rows, is_[0], is_[-1] + 1)
    Zs = ZZ[np.ix_(is_, is_)]  # one gather (ZZ[is_] first copied qs whole rows)
    lens = np.diff(N.indptr)
    schur_diagonal = _is_diagonal(Zs) and bool(np.all(lens <= 1))
    nsq = N.multiply(N).tocsr() if schur_diagonal else None
    return Structure(
        big=big,
        perm=perm,
        comp=comp,
        qb=ib.size,
        zb=zb,
        N=N,
        NT=N.T.tocsr(),
        Zs=Zs,
        diagonal=schur_diagonal,
        pairs=int(np.sum(lens * lens)),
        nsq=nsq,
        nsqT=None if nsq is None else nsq.T.tocsr(),
    )


_CONTROLLER: list[ThreadpoolController] = []
#: The one_blas_thread contexts open now (in any thread: the BLAS setting is the
#: process's) and the limiter of the first, which the last to close restores.
_HELD: list[Any] = [0, None]
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Context manager holding BLAS to one thread (results independent of the thread
    layout), from one ThreadpoolController per process: building a controller scans the
    loaded libraries, which cost milliseconds per call, more than a small fit. Nested and
    concurrent uses share one limit, set by the first to open and restored by the last to
    close (a limit of its own costs each ~60 us, a fifth of a nested block's overhead;
    and one closed early no longer lets BLAS threads back in under another)."""
    with _HELD_LOCK:
        if _HELD[0] == 0:
            if not _CONTROLLER:
                _CONTROLLER.append(ThreadpoolController())
            _HELD[1] = _CONTROLLER[0].limit(limits=1, user_api="blas")
        _HELD[0] += 1
    try:
        yield
    finally:
        with _HELD_LOCK:
            _HELD[0] -= 1
            if _HELD[0] == 0:
                _HELD[1].restore_original_limits()
                _HELD[1] = None


def _lastsums(a: Array) -> Array:
    """Sums over the last axis of (m, r, c) -> (m, r), in a fixed order."""
    m, r, c = a.shape
    return rowsums(np.reshape(a, (m * r, c))).reshape(m, r)


def _inverse(S: Array, symmetric: np.ndarray) -> tuple[Array, Array]:
    """Inverses of (m, k, k) matrices and log |det|: by Cholesky where ``symmetric`` and
    positive definite, else by LU; NaN where singular."""
    out = []
    logdet = np.empty(S.shape[0])
    for j in range(S.shape[0]):
        if symmetric[j] and _is_diagonal(S[j]) and np.all(np.diagonal(S[j]) == 1.0):
            out.append(np.eye(S.shape[1]))  # S = I (all ratios of the small block 0)
            logdet[j] = 0.0
            continue
        chol = crossed.cholesky_inverse(S[j]) if symmetric[j] else None
        if chol is not None:
            out.append(chol[0])
            logdet[j] = chol[1]
            continue
        logdet[j] = np.linalg.slogdet(S[j])[1]
        try:
            out.append(np.linalg.inv(S[j]))
        except np.linalg.LinAlgError:
            out.append(np.full_like(S[j], np.nan))
    return (out[0][None] if len(out) == 1 else np.stack(out)), logdet


def _nmul(N: scipy.sparse.csr_array, x: Array) -> Array:
    """N x for a stack x (m, cols, ...) -> (m, rows, ...)."""
    m, c = x.shape[0], x.shape[1]
    rest = x.shape[2:]
    if m == 1:  # one feature at a time (the usual call): no transposes
        return np.asarray(N @ x[0])[None]
    xt = np.moveaxis(x, 1, 0).reshape(c, -1)
    y = np.asarray(N @ xt).reshape(N.shape[0], m, *rest)
    return np.moveaxis(y, 0, 1)


class Factor:
    """P = D ZZ + I of a block of features, factored through the structure.

    Parameters
    ----------
    st : Structure
    D : (m, q) ratios s_k / s0 per permuted column.
    inverse : bool
        Form S^-1 (the traces need it); False: solves with a dense S go through its
        Cholesky factor where S is symmetric positive definite (:func:`md_solve`).
    """

    def __init__(self, st: Structure, D: Array, inverse: bool = True):
        self.st = st
        self.R: list[Array] | None = None
        qb = st.qb
        self.db, self.ds = D[:, :qb], D[:, qb:]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            self.pb = 1.0 + self.db * st.zb
            self.pbi = 1.0 / self.pb
            self.w1 = self.db * self.pbi
            m, qs = D.shape[0], st.qs
            if st.diagonal:
                assert st.nsq is not None and st.nsqT is not None
                self.nsq, self.nsqT = st.nsq, st.nsqT
                self.U = np.diag(st.Zs)[None, :] - np.asarray(st.nsqT @ self.w1.T).T
                self.S = 1.0 + self.ds * self.U
                self.Si = 1.0 / self.S
                self.ok = np.all(np.isfinite(self.Si), axis=1) & np.all(self.S != 0, axis=1)
            else:
                self.U = np.empty((m, qs, qs))
                self.S = np.empty((m, qs, qs))
                self.umax = np.empty(m)  # max |U|
                for j in range(m):
                    self.umax[j] = crossed.schur_into(
                        st.N, self.w1[j], st.Zs, self.ds[j], self.U[j], self.S[j]
                    )
                symmetric = np.all(self.ds == self.ds[:, :1], axis=1)
                if not inverse and symmetric.all():
                    R = [crossed.cholesky(self.S[j]) for j in range(m)]
                    if all(r is not None for r in R):
                        self.R = R  # type: ignore[assignment]
                        self.ok = np.ones(m, dtype=bool)
                if self.R is None:
                    self.Si, self.logdet_s = _inverse(self.S, symmetric)
                    self.ok = np.all(np.isfinite(self.Si), axis=(1, 2))
            self.ok &= np.all(np.isfinite(self.pbi), axis=1)

    def _si(self, x: Array, transpose: bool = False) -> Array:
        """S^-1 x (or S^-T x) for x (m, qs, ...)."""
        if self.st.diagonal:
            return self.Si.reshape(self.Si.shape + (1,) * (x.ndim - 2)) * x
        if self.R is not None:  # S symmetric: S^-T = S^-1
            return np.stack(
                [crossed.cholesky_solve(R, xj) for R, xj in zip(self.R, x, strict=True)]
            )
        Si = np.swapaxes(self.Si, 1, 2) if transpose else self.Si
        if x.ndim == 2:
            return (Si @ x[:, :, None])[:, :, 0]
        return Si @ x

    def _col(self, v: Array, x: Array) -> Array:
        return v.reshape(v.shape + (1,) * (x.ndim - 2)) * x

    def solve(self, x: Array) -> Array:
        """P^-1 x for x (m, q) or (m, q, k), permuted order."""
        st, qb = self.st, self.st.qb
        xb, xs = x[:, :qb], x[:, qb:]
        t = _nmul(st.NT, self._col(self.pbi, xb))
        ys = self._si(xs - self._col(self.ds, t))
        yb = self._col(self.pbi, xb - self._col(self.db, _nmul(st.N, ys)))
        return np.concatenate([yb, ys], axis=1)

    def solve_t(self, x: Array) -> Array:
        """P^-T x for x (m, q) or (m, q, k), permuted order."""
        st, qb = self.st, self.st.qb
        xb, xs = x[:, :qb], x[:, qb:]
        ys = self._si(xs - _nmul(st.NT, self._col(self.w1, xb)), transpose=True)
        yb = self._col(self.pbi, xb - _nmul(st.N, self._col(self.ds, ys)))
        return np.concatenate([yb, ys], axis=1)

    def zz(self, x: Array) -> Array:
        """ZZ x (permuted order)."""
        st, qb = self.st, self.st.qb
        xb, xs = x[:, :qb], x[:, qb:]
        zs = st.zs_diagonal
        if zs is not None:
            ys_own = self._col(np.broadcast_to(zs, (x.shape[0], zs.size)), xs)
        else:
            ys_own = np.moveaxis(np.tensordot(st.Zs, xs, axes=([1], [1])), 0, 1)
        yb = self._col(np.broadcast_to(st.zb, (x.shape[0], qb)), xb) + _nmul(st.N, xs)
        ys = _nmul(st.NT, xb) + ys_own
        return np.concatenate([yb, ys], axis=1)

    def logdet(self) -> Array:
        """log |det P| (m,)."""
        with np.errstate(divide="ignore"):
            ld = rowsums(np.log(np.abs(self.pb)))
            if self.st.diagonal:
                return ld + rowsums(np.log(np.abs(self.S)))
            return ld + self.logdet_s

    def w0_blocks(self, K: int) -> tuple[Array, Array]:
        """t (m, K) traces of the diagonal blocks of W0 = ZZ P^-1 and Q (m, K, K) the sums of
        squares of its blocks, by component."""
        st = self.st
        m = self.pb.shape[0]
        big = st.big
        cs = st.comp[st.qb :]
        t = np.zeros((m, K))
        Q = np.zeros((m, K, K))
        zp = st.zb * self.pbi  # diag(zb / pb)
        p2 = self.pbi**2
        if st.diagonal:
            SiDs = self.Si * self.ds
            diagNSN = np.asarray(self.nsq @ SiDs.T).T  # diag(N (S^-1 Ds) N')
            V = np.asarray(self.nsqT @ p2.T).T  # diag of N' Pb^-2 N
            US = self.U * self.Si
            X = V * self.Si  # V S^-1
            t[:, big] = rowsums(zp) - rowsums(p2 * diagNSN)
            Q[:, big, big] = (
                rowsums(zp**2) - 2.0 * rowsums(zp * p2 * diagNSN) + rowsums((X * self.ds) ** 2)
            )
            for k in np.unique(cs):
                sel = cs == k
                t[:, k] = rowsums(US[:, sel])
                Q[:, big, k] = Q[:, k, big] = rowsums(self.Si[:, sel] * X[:, sel])
                Q[:, k, k] = rowsums(US[:, sel] ** 2)
            return t, Q
        # U S^-1 = Ds^-1 (I - S^-1) where no ratio is too small for the division
        division = np.all(np.abs(self.ds) * self.umax[:, None] >= DIVISION_MIN, axis=1)
        small = cs[st.small_edges[:-1]]
        diagNSN = np.empty_like(p2)  # diag(N S^-1 Ds N')
        for j in range(m):
            US = None
            if not division[j]:  # with Ds = 0, S = I and U S^-1 = U
                US = self.U[j] if not self.ds[j].any() else self.U[j] @ self.Si[j]
            diagNSN[j], xdx, qb, tk, Qk = crossed.w0_sums(
                st.N, p2[j], self.Si[j], US, self.ds[j], st.small_edges, division[j]
            )
            Q[j, big, big] = xdx
            t[j, small] = tk
            Q[j, big, small] = Q[j, small, big] = qb
            Q[j, small[:, None], small] = Qk
        t[:, big] = rowsums(zp) - rowsums(p2 * diagNSN)
        Q[:, big, big] += rowsums(zp**2) - 2.0 * rowsums(zp * p2 * diagNSN)
        return t, Q


def score_terms(
    st: Structure,
    G: Array,
    reml: bool,
    K: int,
    s: Array,
    zry: Array,
    yry: Array,
    final: bool,
) -> tuple[Array, Array, Array, Array, Array, Array, Array]:
    """The pieces of one scoring step of a block of features.

    Parameters
    ----------
    st : Structure
    G : (q, p) permuted, G G' = ZX XXinv ZX'
    reml : bool
    K : int
    s : (m, K+1)
    zry : (m, q) permuted
    yry : (m,)
    final : bool
        Also compute log |det M0|.

    Returns
    -------
    t (m, K), Q (m, K, K) of W; u2 (m, K) = |u_k|^2; yR2y (m,); zMDz (m,) = zry' M D zry;
    logdetM0 (m,) (NaN unless final); ok (m,).
    """
    m = s.shape[0]
    s0 = s[:, -1]
    D = s[:, st.comp] / s0[:, None]
    fac = Factor(st, D)
    t, Q = fac.w0_blocks(K)
    p = G.shape[1]
    Dz = D * zry
    # P^-1 [D G, D zry] and P^-T [G, zry], each by one solve
    Gz = np.empty((m, G.shape[0], p + 1))
    Gz[:, :, :p] = G
    Gz[:, :, p] = zry
    Et = fac.solve_t(Gz)
    Gz *= D[:, :, None]
    Yt = fac.solve(Gz)
    Y, E = Yt[:, :, :p], Et[:, :, :p]  # P^-1 D G, P^-T G
    C = np.eye(p) - G.T @ Y  # I - G' Y
    C = 0.5 * (C + np.swapaxes(C, 1, 2))
    with np.errstate(invalid="ignore"):
        try:
            B = np.linalg.inv(C)
        except np.linalg.LinAlgError:
            B = np.full_like(C, np.nan)
            for j in range(m):
                try:
                    B[j] = np.linalg.inv(C[j])
                except np.linalg.LinAlgError:
                    pass
    ok = fac.ok & np.all(np.isfinite(B), axis=(1, 2))
    # quadratic forms with M = P^-1 + Y B E'
    u = Et[:, :, p] + (E @ (B @ (np.swapaxes(Y, 1, 2) @ zry[:, :, None])))[:, :, 0]
    MDz = Yt[:, :, p] + (Y @ (B @ (np.swapaxes(E, 1, 2) @ Dz[:, :, None])))[:, :, 0]
    yR2y = yry - rowsums((u + zry) * MDz)
    zMDz = rowsums(zry * MDz)
    u2 = np.zeros((m, K))
    for k in range(K):
        sel = st.comp == k
        u2[:, k] = rowsums(u[:, sel] ** 2)
    logdet = np.full(m, np.nan)
    if reml:
        # W = W0 - E B E'
        EB = E @ B
        dEBE = _lastsums(EB * E)  # (m, q)
        grams = []
        for k in range(K):
            sel = st.comp == k
            t[:, k] -= rowsums(dEBE[:, sel])
            Ek = E[:, sel]
            grams.append(np.swapaxes(Ek, 1, 2) @ Ek)  # (m, p, p)
        # R_kl = E_k' W0_kl E_l from W0 E^(l), all l at once
        Ecols = np.zeros((m, E.shape[1], K * p))
        for k in range(K):
            sel = st.comp == k
            Ecols[:, sel, k * p : (k + 1) * p] = E[:, sel]
        WE = fac.zz(fac.solve(Ecols))  # W0 = ZZ P^-1
        for k in range(K):
            sk = st.comp == k
            Ekt = np.swapaxes(E[:, sk], 1, 2)
            for l in range(k, K):
                R = Ekt @ WE[:, sk, l * p : (l + 1) * p]  # (m, p, p)
                corr = -2.0 * rowsums(R * np.swapaxes(B, 1, 2))
                GB = grams[k] @ B
                corr += rowsums(GB * np.swapaxes(grams[l] @ B, 1, 2))
                Q[:, k, l] += corr
                if l != k:
                    Q[:, l, k] = Q[:, k, l]
        if final:
            logdet = -(fac.logdet() + np.linalg.slogdet(C)[1])
    elif final:
        logdet = -fac.logdet()
    return t, Q, u2, yR2y, zMDz, logdet, ok


def md_solve(
    st: Structure, D: Array, x: Array, factor: Factor | None = None
) -> tuple[Array, Array]:
    """(D ZZ + I)^-1 D x for x (m, q) or (m, q, k) in permuted order, and ok (m,);
    ``factor``: ``Factor(st, D, inverse=False)`` where the caller has it already."""
    fac = Factor(st, D, inverse=False) if factor is None else factor
    Dx = D.reshape(D.shape + (1,) * (x.ndim - 2)) * x
    return fac.solve(Dx), fac.ok
