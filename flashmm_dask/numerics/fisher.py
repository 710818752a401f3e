"""Batched Fisher scoring of the variance components (REML or ML).

Notation (ALGORITHM.md): p covariates, q random-effect columns in K components of sizes
d_1..d_K, m features, n cells. theta = (s_1, ..., s_K, s_0), the last entry the residual
variance. Per-feature arrays carry the feature axis first:

    XY (m, p)   ZY (m, q)   Ynorm (m,)   theta (m, K+1)

Shared terms, computed once per design (:func:`prepare`)::

    XXinv = XX^-1 (Cholesky)            zrz = ZZ - ZX XXinv ZX'
    zry_j = ZY_j - ZX XXinv XY_j         yry_j = Ynorm_j - XY_j' XXinv XY_j

With D = diag(s_k / s_0 repeated d_k times), M = (D zrz + I)^-1, M0 = M (REML) or
(D ZZ + I)^-1 (ML), A = zrz (REML) or ZZ (ML), r = p (REML) or 0 (ML), one scoring step is

    u = M' zry,   W = A M0,   W2 = W M0
    dl_i   = (|u_i|^2 / s0^2 - tr W_ii / s0) / 2
    F_ij   = sum(W_ji^2) / s0^2 / 2,         F_i,0 = tr W2_ii / s0^2 / 2
    F_00   = (n - r - q + tr M0 M0) / s0^2 / 2
    dl_0   = ((yry - ((M' + I) zry)'(M D zry)) / s0^2 - (n - r - q + tr M0) / s0) / 2
    theta <- theta + pinv(F) dl

until max |dl| <= epsilon or max_iter steps. Afterwards s0 is profiled,
s0 = (yry - zry' M D zry) / (n - r), and the score and information are evaluated once more
at the final theta.

With one random component (K = 1) D = rho I (rho = s_1/s0). With zrz = U diag(lam) U' and
ZZ = V diag(mu) V', every trace and quadratic form above is a sum over eigenvalues of a
scalar function of rho, after projecting zry once onto U (z = U' zry): O(q) per feature and
iteration instead of O(q^3). :func:`fit_theta` takes that path automatically.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from flashmm_dask.numerics import compiled, compiled_dense, compiled_k, paired, structured
from flashmm_dask.numerics.linalg import GINV_LIMIT, Array, aliased_columns, pinv_sym
from flashmm_dask.numerics.scores import _Score, _score_general, _score_spectral
from flashmm_dask.numerics.spectral import fit_spectral_batch
from flashmm_dask.numerics.spectral_terms import eigh_one_thread as _eigh
from flashmm_dask.numerics.spectral_terms import signed_permutation, times_basis
from flashmm_dask.numerics.structured import Structure, detect, one_blas_thread
from flashmm_dask.numerics.structured import worth_it as structure_worth_it
from flashmm_dask.numerics.structured_nested import NestedTerms

METHODS = ("REML", "ML")


class NotPositiveDefiniteError(np.linalg.LinAlgError):
    """XX is not positive definite; ``aliased`` lists the offending column indices."""

    def __init__(self, aliased: list[int]):
        super().__init__(f"X'X is not positive definite (aliased columns {aliased})")
        self.aliased = aliased


@dataclass(frozen=True)
class SharedTerms:
    """Everything of the fit that depends only on (XX, ZX, ZZ, n, d, method).

    Attributes
    ----------
    XX, XXinv : (p, p)
    ZX : (q, p)
    ZZ : (q, q)
    n : float
    d : (K,) int
    method : "REML" or "ML"
    structure : Structure or None
        The block structure of ZZ the structured path uses (K >= 2 with a diagonal
        component; :func:`.structured.detect`), None for the dense path.
    zrz : (q, q), computed on first use
    lam, U : eigenvalues (q,) and vectors (q, q) of zrz, computed on first use
    mu, V : eigenvalues (q,) and vectors (q, q) of ZZ, computed on first use
    """

    XX: Array
    XXinv: Array
    ZX: Array
    ZZ: Array
    n: float
    d: np.ndarray
    method: str
    chol: Array
    structure: Structure | None = None

    @functools.cached_property
    def zrz(self) -> Array:
        zrz = self.ZZ - self.ZX @ self.XXinv @ self.ZX.T
        return 0.5 * (zrz + zrz.T)

    @functools.cached_property
    def _eig_zrz(self) -> tuple[Array, Array]:
        return _eigh(self.zrz)

    @functools.cached_property
    def _eig_zz(self) -> tuple[Array, Array]:
        return _eigh(0.5 * (self.ZZ + self.ZZ.T))

    # the spectra the scoring works on: lam, U of zrz (REML), mu, V of ZZ (ML)
    lam = property(lambda self: self._eig_zrz[0])
    U = property(lambda self: self._eig_zrz[1])
    mu = property(lambda self: self._eig_zz[0])
    V = property(lambda self: self._eig_zz[1])

    @functools.cached_property
    def _V_signed_permutation(self) -> tuple[np.ndarray, np.ndarray] | None:
        return signed_permutation(self.V)

    def times_V(self, x: Array) -> Array:
        """x @ V for x (m, q); a column gather where V is a signed permutation (ZZ
        diagonal), the same values (:func:`.spectral_terms.times_basis`)."""
        return times_basis(x, self.V, self._V_signed_permutation)

    @functools.cached_property
    def VZX(self) -> Array:
        """(q, p) V' ZX, ZX in the eigenvectors of ZZ (the K = 1 fixed effects)."""
        return self.V.T @ self.ZX

    @functools.cached_property
    def VZX_outer(self) -> Array:
        """(q, p^2) the outer products of the rows of :attr:`VZX`, one row per eigenvalue:
        sum_k w_k G_k G_k' of weights w (m, q) is one (m, q) x (q, p^2) product."""
        G = self.VZX
        return (G[:, :, None] * G[:, None, :]).reshape(self.q, -1)

    @functools.cached_property
    def k2(self) -> compiled_k.K2Terms:
        """The rotated blocks the compiled K = 2 kernel works on."""
        return compiled_k.K2Terms(self.zrz, self.A, self.method == "REML", self.d)

    @functools.cached_property
    def pairs(self) -> paired.Pairs | None:
        """The paired structure of ZZ (K = 2, :func:`.paired.detect`), or None."""
        return paired.detect(self.ZZ, self.d, self.ZX)

    @functools.cached_property
    def G(self) -> Array:
        """(q, p) with G G' = ZX XXinv ZX' (G = ZX L^-T, XX = L L')."""
        return scipy.linalg.solve_triangular(self.chol, self.ZX.T, lower=True).T

    @functools.cached_property
    def nested(self) -> NestedTerms | None:
        """The structured REML terms of a diagonal Schur complement (None without one)."""
        st = self.structure
        return None if st is None or not st.diagonal else NestedTerms(st, self.G)

    @property
    def path(self) -> str:
        """The path fit_theta takes by default: "spectral", "structured" or "dense"."""
        if self.K == 1:
            return "spectral"
        return "dense" if self.structure is None else "structured"

    @property
    def work_values(self) -> int:
        """float64 values of the work arrays per feature of the default path (block sizes)."""
        if self.structure is not None:
            extra = 0 if self.structure.diagonal else 8 * self.q * self.p * self.K
            return self.structure.work_values + extra
        return self.q * self.q

    @property
    def p(self) -> int:
        return int(self.XX.shape[0])

    @property
    def q(self) -> int:
        return int(self.ZZ.shape[0])

    @property
    def K(self) -> int:
        return len(self.d)

    @property
    def r(self) -> int:
        """Degrees of freedom used by the fixed effects: p for REML, 0 for ML."""
        return self.p if self.method == "REML" else 0

    @property
    def A(self) -> Array:
        return self.zrz if self.method == "REML" else self.ZZ

    @property
    def slices(self) -> list[slice]:
        edges = np.concatenate([[0], np.cumsum(self.d)])
        return [slice(int(a), int(b)) for a, b in itertools.pairwise(edges)]

    def residualise(self, XY: Array, ZY: Array, Ynorm: Array) -> tuple[Array, Array]:
        """zry (m, q) and yry (m,) of a block of features."""
        if self.K == 2 and self.structure is None:  # rows independent of the block
            return compiled_dense.residualise_rows(self.XXinv, self.ZX, XY, ZY, Ynorm)
        B = XY @ self.XXinv  # (m, p)
        zry = ZY - B @ self.ZX.T
        yry = Ynorm - np.einsum("mp,mp->m", B, XY)
        return zry, yry


def prepare(
    XX: Array,
    ZX: Array,
    ZZ: Array,
    n: float,
    d,
    method: str,
    *,
    structured: bool | None = None,
    diagonal: Sequence[bool] | None = None,
) -> SharedTerms:
    """Compute the shared terms of a design; raise NotPositiveDefiniteError if XX is not PD.

    ``structured``: None (default) takes the structured path where ZZ has the structure
    and the path is estimated to cost less than the dense one
    (:func:`.structured.worth_it`); True wherever ZZ has the structure; False never.
    ``diagonal`` (K,): which diagonal blocks of this ZZ are diagonal, where the caller's
    pass over ZZ found that (:func:`.zz_scan.scan`; :func:`.structured.detect`).
    """
    # XX (p x p) and G (q x p) with one BLAS thread: a LAPACK call with OpenBLAS's two
    # threads (even on a 1 x 1 XX) left the structured fit that followed 50 ms slower
    # (InstEval alone: 120 vs 65 ms, benchmarks/bench_structured.py [3])
    with one_blas_thread():
        try:
            cho = scipy.linalg.cho_factor(XX, lower=True)
        except np.linalg.LinAlgError:
            raise NotPositiveDefiniteError([int(j) for j in aliased_columns(XX)]) from None
        # rounding can leave a numerically singular X'X a tiny positive pivot: the rule of
        # the design check (1 - R^2 of a column on the earlier ones <= ALIAS_RTOL) decides
        aliased = aliased_columns(XX)
        if aliased.size:
            raise NotPositiveDefiniteError([int(j) for j in aliased])
        XXinv = scipy.linalg.cho_solve(cho, np.eye(XX.shape[0]))
    d = np.asarray(d, dtype=np.int64)
    sh = SharedTerms(
        XX=XX,
        XXinv=XXinv,
        ZX=ZX,
        ZZ=ZZ,
        n=float(n),
        d=d,
        method=method,
        chol=np.tril(cho[0]),
        structure=_structure(ZZ, d, XX.shape[0], structured, diagonal),
    )
    # computed here, once, rather than by the first threads that need them
    if sh.K == 1:
        sh.lam, sh.mu  # noqa: B018
    elif sh.structure is None:
        sh.zrz  # noqa: B018
        if sh.K == 2:
            sh.k2  # noqa: B018
    else:
        with one_blas_thread():
            sh.G  # noqa: B018
            if method == "REML":
                sh.nested  # noqa: B018
    return sh


def _structure(
    ZZ: Array,
    d: np.ndarray,
    p: int,
    structured: bool | None,
    diagonal: Sequence[bool] | None = None,
) -> Structure | None:
    if structured is False:
        return None
    st = detect(ZZ, d, diagonal)
    if st is None or structured or structure_worth_it(st, p, len(d)):
        return st
    return None


@dataclass(frozen=True)
class ThetaFit:
    """Variance components of a block of features.

    Attributes
    ----------
    theta, se_theta, dlogL : (m, K+1)
    FIM_theta : (m, K+1, K+1)
    niter : (m,) int
    logdetM0 : (m,) log |det M0| at the final theta
    gram : FixedTerms or None
        The nested path's terms of the fixed effects at theta (None on other paths).
    """

    theta: Array
    se_theta: Array
    dlogL: Array
    FIM_theta: Array
    niter: np.ndarray
    logdetM0: Array
    gram: FixedTerms | None = None


@dataclass(frozen=True)
class FixedTerms:
    """What the fixed effects need of the nested path (:mod:`.structured_nested`) at a fit's
    theta, from its last evaluation there: C (m, p, p) = I - G' P^-1 D G (X'V^-1 X = L C L'
    / s0), a (m, p) = G' P^-1 D zry, and ok (m,) where they are those of theta (False where
    the feature was fitted otherwise or its theta changed since, :mod:`.boundary`)."""

    C: Array
    a: Array
    ok: np.ndarray


def _score_compiled(
    sh: SharedTerms, s: Array, zry: Array, yry: Array, *, final: bool = False
) -> _Score:
    """:func:`_score_general` by the compiled per-feature kernel; the NumPy algebra (with
    its pseudo-inverses) takes the features whose matrices the kernel could not invert."""
    reml = sh.method == "REML"
    if sh.K == 2:
        dl, F, s0p, logdet, ok = compiled_k.score_k2_batch(
            sh.k2, s, zry, yry, sh.n, sh.r, final, compiled.DIVISION_MIN
        )
    else:
        dl, F, s0p, logdet, ok = compiled.score_batch(
            sh.zrz, sh.A, reml, sh.d, s, zry, yry, sh.n, sh.r, final
        )
    if not ok.all():
        rest = _score_general(sh, s[~ok], zry[~ok], yry[~ok], final=final)
        dl[~ok], F[~ok], s0p[~ok], logdet[~ok] = rest.dl, rest.F, rest.s0_profiled, rest.logdetM0
    return _Score(dl, F, s0p, logdet)


def _score_structured(
    sh: SharedTerms, s: Array, zry: Array, yry: Array, *, final: bool = False
) -> _Score:
    """:func:`_score_general` through the block structure of ZZ (:mod:`.structured`); zry
    in the permuted column order. Features whose Schur complement is singular take the
    compiled dense kernel (with the pseudo-inverses where that fails)."""
    st = sh.structure
    assert st is not None
    m, q, K = s.shape[0], sh.q, sh.K
    s0 = s[:, -1]
    reml = sh.method == "REML"
    nested = sh.nested if reml else None
    G = sh.G[st.perm] if nested is None else sh.G
    # one feature at a time: the result of a feature does not depend on which features
    # share its block (batched BLAS and NumPy reductions round differently for different
    # batch shapes); the structured path is taken where the work per feature dwarfs the
    # per-call overhead (structure_worth_it)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        parts = [
            structured.score_terms(
                st, G, reml, K, s[j : j + 1], zry[j : j + 1], yry[j : j + 1], final
            )
            if nested is None
            else nested.score(K, s[j : j + 1], zry[j : j + 1], yry[j : j + 1], final)
            for j in range(m)
        ]
    t, Q, u2, yR2y, zMDz, logdet, ok = (np.concatenate(part) for part in zip(*parts, strict=True))
    Dk = s[:, :-1] / s0[:, None]  # (m, K)
    s02 = s0**2
    dl = np.empty((m, K + 1))
    F = np.empty((m, K + 1, K + 1))
    dl[:, :K] = (u2 / s02[:, None] - t / s0[:, None]) / 2
    F[:, :K, :K] = Q / s02[:, None, None] / 2
    trW2 = t - np.einsum("mkl,ml->mk", Q, Dk)
    F[:, :K, K] = F[:, K, :K] = trW2 / s02[:, None] / 2
    Dt = np.sum(Dk * t, axis=1)
    trM0 = q - Dt
    trM0M0 = q - 2.0 * Dt + np.einsum("mk,mkl,ml->m", Dk, Q, Dk)
    nrq = sh.n - sh.r - q
    F[:, K, K] = (nrq + trM0M0) / s02 / 2
    dl[:, K] = (yR2y / s02 - (nrq + trM0) / s0) / 2
    s0_prof = (yry - zMDz) / (sh.n - sh.r)
    if not ok.all():
        inv = np.argsort(st.perm)
        rest = _score_compiled(sh, s[~ok], zry[~ok][:, inv], yry[~ok], final=final)
        dl[~ok], F[~ok], s0_prof[~ok], logdet[~ok] = (
            rest.dl,
            rest.F,
            rest.s0_profiled,
            rest.logdetM0,
        )
    return _Score(dl, F, s0_prof, logdet)


def fit_theta(
    sh: SharedTerms,
    zry: Array,
    yry: Array,
    *,
    theta0: Array | None = None,
    max_iter: int = 50,
    epsilon: float = 1e-5,
    spectral: bool | None = None,
    compiled_kernels: bool = True,
    structure: bool = True,
    z: Array | None = None,
    fixed: np.ndarray | None = None,
) -> ThetaFit:
    """Fisher scoring for a block of features.

    Parameters
    ----------
    sh : SharedTerms
    zry : (m, q) array
    yry : (m,) array
    theta0 : (m, K+1) array, optional
        Starting values; default (0, ..., 0, yry / (n - p)).
    max_iter, epsilon : stopping rule, max |dl| <= epsilon or max_iter steps.
    spectral : bool, optional
        Use the K = 1 eigenvalue path; default: whenever K == 1.
    compiled_kernels : bool
        Iterate in the compiled per-feature kernels (:mod:`.compiled`); False runs the
        same algebra batched in NumPy (the reference the kernels are tested against).
    structure : bool
        With K >= 2, go through the block structure of ZZ where ``sh.structure`` found one
        (:mod:`.structured`); False takes the dense path.
    z : (m, q) array, optional
        The spectral path's projections ``zry @ sh.U``, where the caller has them already
        (they are computed here otherwise).
    fixed : (K,) bool array, optional
        Components pinned at exactly zero (K >= 2, one free component at least): only the
        others are updated, by the steps and the stopping rule of their own score and
        information, so the fit is the one of the model without the pinned components
        (the same V) while its score and information stay the full model's
        (:mod:`.boundary`). The K = 2 dense fit then takes the per-evaluation kernel.

    Returns
    -------
    ThetaFit
        With ``fixed``: dlogL and FIM_theta of the full model, se_theta NaN for the pinned
        components and from the information of the others for the rest.
    """
    m, K = zry.shape[0], sh.K
    if spectral is None:
        spectral = K == 1
    if spectral and K != 1:
        raise ValueError("the spectral path needs exactly one random component")
    free = None
    if fixed is not None and np.any(fixed):
        if spectral or np.all(fixed):
            raise ValueError("pinning components needs K >= 2 and one component left free")
        free = np.append(~np.asarray(fixed, dtype=bool), True)
    if theta0 is None:
        s = np.zeros((m, K + 1))
        s[:, -1] = yry / (sh.n - sh.p)
    else:
        s = np.array(theta0, dtype=np.float64, copy=True)
    if free is not None:
        s[:, ~free] = 0.0
    if not spectral and sh.structure is not None and structure:
        zry_p = zry[:, sh.structure.perm]

        def score_st(s: Array, rows: np.ndarray, final: bool = False) -> _Score:
            return _score_structured(sh, s, zry_p[rows], yry[rows], final=final)

        # one BLAS thread: results independent of the thread layout, and no oversubscription
        with structured.one_blas_thread():
            if sh.method == "REML" and sh.nested is not None:
                return _fit_nested(sh, zry_p, yry, s, max_iter, epsilon, score_st, free)
            return _scoring(score_st, s, max_iter, epsilon, free)
    if not spectral and compiled_kernels and K == 2 and free is None:
        return _fit_k2(sh, zry, yry, s, max_iter, epsilon)
    if not spectral:

        def score(s: Array, rows: np.ndarray, final: bool = False) -> _Score:
            if compiled_kernels:
                return _score_compiled(sh, s, zry[rows], yry[rows], final=final)
            return _score_general(sh, s, zry[rows], yry[rows], final=final)

        return _scoring(score, s, max_iter, epsilon, free)
    if z is None:
        z = zry @ sh.U
    if not compiled_kernels:
        return _scoring(_spectral_scorer(sh, z, yry), s, max_iter, epsilon)
    theta, se, dl, F, niter, logdet, ok = fit_spectral_batch(
        sh, z, yry, s, max_iter, epsilon, GINV_LIMIT
    )
    if not ok.all():  # an ill-conditioned information matrix: the pseudo-inverse path
        rest = _scoring(_spectral_scorer(sh, z[~ok], yry[~ok]), s[~ok], max_iter, epsilon)
        theta[~ok], se[~ok], dl[~ok] = rest.theta, rest.se_theta, rest.dlogL
        F[~ok], niter[~ok], logdet[~ok] = rest.FIM_theta, rest.niter, rest.logdetM0
    return ThetaFit(theta=theta, se_theta=se, dlogL=dl, FIM_theta=F, niter=niter, logdetM0=logdet)


def _fit_k2(
    sh: SharedTerms, zry: Array, yry: Array, s: Array, max_iter: int, epsilon: float
) -> ThetaFit:
    """K = 2 on the dense path: the whole loop of :func:`_scoring` in the compiled kernel
    (:func:`.compiled_k.fit_k2_batch`); the features it could not fit take
    :func:`_scoring` with the per-evaluation kernel (the NumPy algebra where that fails)."""
    theta, se, dl, F, niter, logdet, ok = compiled_k.fit_k2_batch(
        sh.k2, zry, yry, s, sh.n, sh.r, max_iter, epsilon, compiled.DIVISION_MIN, GINV_LIMIT
    )
    if not ok.all():
        zr, yr = zry[~ok], yry[~ok]

        def score(s: Array, rows: np.ndarray, final: bool = False) -> _Score:
            return _score_compiled(sh, s, zr[rows], yr[rows], final=final)

        rest = _scoring(score, s[~ok], max_iter, epsilon)
        theta[~ok], se[~ok], dl[~ok] = rest.theta, rest.se_theta, rest.dlogL
        F[~ok], niter[~ok], logdet[~ok] = rest.FIM_theta, rest.niter, rest.logdetM0
    return ThetaFit(theta=theta, se_theta=se, dlogL=dl, FIM_theta=F, niter=niter, logdetM0=logdet)


def _fit_nested(
    sh: SharedTerms,
    zry_p: Array,
    yry: Array,
    s: Array,
    max_iter: int,
    epsilon: float,
    score: Callable[..., _Score],
    free: np.ndarray | None = None,
) -> ThetaFit:
    """The nested structured path: the whole loop of :func:`_scoring` in the compiled
    kernel (:meth:`.structured_nested.NestedTerms.fit`), ``free`` as there; the features
    it could not fit take :func:`_scoring` with ``score`` (:func:`_score_structured`)."""
    assert sh.nested is not None
    theta, se, dl, F, niter, logdet, C, a, ok = sh.nested.fit(
        zry_p, yry, s, sh.n, sh.r, max_iter, epsilon, GINV_LIMIT, free
    )
    if not ok.all():
        bad = np.flatnonzero(~ok)

        def rest_score(s: Array, rows: np.ndarray, final: bool = False) -> _Score:
            return score(s, bad[rows], final=final)

        rest = _scoring(rest_score, s[bad], max_iter, epsilon, free)
        theta[bad], se[bad], dl[bad] = rest.theta, rest.se_theta, rest.dlogL
        F[bad], niter[bad], logdet[bad] = rest.FIM_theta, rest.niter, rest.logdetM0
    return ThetaFit(
        theta=theta,
        se_theta=se,
        dlogL=dl,
        FIM_theta=F,
        niter=niter,
        logdetM0=logdet,
        gram=FixedTerms(C, a, ok),
    )


def _spectral_scorer(sh: SharedTerms, z: Array, yry: Array) -> Callable[..., _Score]:
    def score(s: Array, rows: np.ndarray, final: bool = False) -> _Score:
        return _score_spectral(sh, s, z[rows], yry[rows], final=final)

    return score


def _scoring(
    score: Callable[..., _Score],
    s: Array,
    max_iter: int,
    epsilon: float,
    free: np.ndarray | None = None,
) -> ThetaFit:
    """Fisher scoring from s (m, K+1), updated in place, with NumPy over the active features.

    ``free`` (K+1,) bool: only those components are updated, by their own score and the
    information among them (the others stay as they are, :func:`fit_theta`'s ``fixed``).
    """
    m = s.shape[0]
    niter = np.zeros(m, dtype=np.int64)
    active = np.arange(m)
    idx = np.arange(s.shape[1]) if free is None else np.flatnonzero(free)  # updated
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        while active.size and max_iter > 0:
            niter[active] += 1
            sc = score(s[active], active)
            if free is None:
                dl = sc.dl
                s[active] += (pinv_sym(sc.F) @ dl[:, :, None])[:, :, 0]
            else:
                dl, F = sc.dl[:, idx], sc.F[:, idx[:, None], idx]
                s[active[:, None], idx] += (pinv_sym(F) @ dl[:, :, None])[:, :, 0]
            still = (np.max(np.abs(dl), axis=1) > epsilon) & (niter[active] < max_iter)
            active = active[still]
        # profile the residual variance, then evaluate score and information there
        all_rows = np.arange(m)
        s[:, -1] = score(s, all_rows).s0_profiled
        final = score(s, all_rows, final=True)
        F = final.F if free is None else final.F[:, idx[:, None], idx]
        se_theta = np.full(s.shape, np.nan)  # NaN for the pinned components
        se_theta[:, idx] = np.sqrt(np.diagonal(pinv_sym(F), axis1=1, axis2=2))
    return ThetaFit(
        theta=s,
        se_theta=se_theta,
        dlogL=final.dl,
        FIM_theta=final.F,
        niter=niter,
        logdetM0=final.logdetM0,
    )
