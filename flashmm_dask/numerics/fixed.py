"""Fixed effects, their covariance and information, and the BLUPs at the fitted theta.

At theta = (s_1..s_K, s_0), with D = diag(s_k / s_0 repeated d_k times)::

    MD  = (D ZZ + I)^-1 D                 (pseudo-inverse if singular)
    C   = XX - ZX' MD ZX                  (= s_0 X'V^-1 X)
    FIM_beta = (C + C')/2 / s_0
    b   = pinv(C) (XY_j - ZX' MD ZY_j)    -> coef
    cov = (pinv(C) + pinv(C)')/2 * s_0
    RE  = MD (ZY_j - ZX b)
    logLik = -(n - r)(1 + log(2 pi s_0))/2 + log|det M0|/2

With K = 1, MD = V diag(rho / (1 + rho mu)) V' from ZZ = V diag(mu) V', so C and the
right-hand sides are weighted sums over the eigenvectors: O(q p^2) per feature.

Every path solves with C in one compiled pass per feature (:func:`_solve`: coef, cov, se
and t, cov in place of C); the features whose C is singular or ill-conditioned take the
pseudo-inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from flashmm_dask.numerics.compiled_dense import solve_batch
from flashmm_dask.numerics.fisher import GINV_LIMIT, FixedTerms, SharedTerms
from flashmm_dask.numerics.linalg import Array, inv_shifted, pinv_sym
from flashmm_dask.numerics.paired import fixed_effects as fixed_paired
from flashmm_dask.numerics.spectral_terms import shifted_reciprocal
from flashmm_dask.numerics.structured import Factor, md_solve, one_blas_thread


@dataclass(frozen=True)
class FixedFit:
    """Fixed-effect results of a block of features.

    Attributes
    ----------
    coef : (m, p)
    cov : (m, p, p)
    FIM_beta : (m, p, p), or None when not asked for
    RE : (m, q), or None when not asked for
    logLik : (m,)
    se, t : (m, p) sqrt(diag cov) and coef / se
    """

    coef: Array
    cov: Array
    FIM_beta: Array | None
    RE: Array | None
    logLik: Array
    se: Array
    t: Array


def _solve(C: Array, rhs: Array, s0: Array) -> tuple[Array, Array, Array, Array]:
    """coef = pinv(C) rhs, cov = pinv(C) s0, se = sqrt(diag cov) and t = coef / se.

    C (m, p, p) symmetric, C-contiguous and overwritten by cov; rhs (m, p), s0 (m,). The
    compiled kernel (:func:`.compiled_dense.solve_batch`) inverts C where its condition is
    provably small (the pseudo-inverse is then the inverse); the others take
    :func:`.linalg.pinv_sym`.
    """
    coef, se, t, ok = solve_batch(C, rhs, s0, GINV_LIMIT)
    if not ok.all():
        Ci = pinv_sym(C[~ok])
        b = (Ci @ rhs[~ok][:, :, None])[:, :, 0]
        Ci *= s0[~ok][:, None, None]
        coef[~ok], C[~ok] = b, Ci
        with np.errstate(invalid="ignore", divide="ignore"):
            se[~ok] = np.sqrt(np.diagonal(Ci, axis1=1, axis2=2))
            t[~ok] = b / se[~ok]
    return coef, se, t, C


def _loglik(sh: SharedTerms, s0: Array, logdetM0: Array) -> Array:
    """The (restricted) log-likelihood at the profiled residual variance s0 (m,)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return -(sh.n - sh.r) * (1.0 + np.log(2.0 * np.pi * s0)) / 2.0 + logdetM0 / 2.0


def fixed_effects(
    sh: SharedTerms,
    XY: Array,
    ZY: Array,
    theta: Array,
    logdetM0: Array,
    *,
    spectral: bool | None = None,
    fim: bool = True,
    re: bool = True,
    structure: bool = True,
    cov_out: Array | None = None,
    gram: FixedTerms | None = None,
) -> FixedFit:
    """Coefficients, covariance, FIM and BLUPs at the fitted variance components.

    Parameters
    ----------
    sh : SharedTerms
    XY : (m, p) array
    ZY : (m, q) array
    theta : (m, K+1) array
    logdetM0 : (m,) array, from the theta fit
    spectral : bool, optional
        Use the K = 1 eigenvalue path; default: whenever K == 1.
    fim, re : bool
        Compute FIM_beta and the BLUPs (else they are None).
    structure : bool
        With K >= 2, go through the block structure of ZZ where ``sh.structure`` found one
        (MD x by structured solves, :func:`.structured.md_solve`); False: the dense path.
    cov_out : (m, p, p) C-contiguous float64 array, optional
        The K = 1 path builds C in it and leaves cov there (``FixedFit.cov`` is then
        ``cov_out``): the fitting core passes its output, which saves a block-sized
        temporary and its copy. The other paths return a new array.
    gram : FixedTerms, optional
        The nested path's terms at ``theta`` from its fit (``ThetaFit.gram``): the
        features where they are valid take C and the right-hand sides from them, in one
        batch (without ``re``).
    """
    if spectral is None:
        spectral = sh.K == 1
    s0 = theta[:, -1]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if spectral:
            w = shifted_reciprocal(theta[:, 0] / s0, sh.mu, "times_rho")  # eigenvalues of MD
            G, GG = sh.VZX, sh.VZX_outer  # (q, p), (q, p^2)
            C = cov_out
            if C is None or not C.flags.c_contiguous:
                C = np.empty((w.shape[0], sh.p, sh.p))
            np.matmul(w, GG, out=C.reshape(-1, sh.p * sh.p))  # a view (C-contiguous)
            np.subtract(sh.XX, C, out=C)  # in place: one (m, p, p) array, see _solve
            h = sh.times_V(ZY)  # (m, q): V' ZY_j
            rhs = XY - (w * h) @ G
        elif structure and sh.structure is not None:
            if gram is not None and sh.nested is not None and not re and gram.ok.any():
                return _fixed_from_gram(sh, XY, ZY, theta, logdetM0, gram, fim=fim)
            return _fixed_structured(sh, XY, ZY, theta, logdetM0, fim=fim, re=re)
        elif structure and sh.pairs is not None:
            return fixed_paired(sh, sh.pairs, XY, ZY, theta, logdetM0, fim=fim, re=re)
        else:
            D = np.repeat(theta[:, :-1] / s0[:, None], sh.d, axis=1)
            MD = inv_shifted(sh.ZZ, D) * D[:, None, :]
            C = sh.XX - sh.ZX.T @ (MD @ sh.ZX)
            rhs = XY - (MD @ ZY[:, :, None])[:, :, 0] @ sh.ZX
        FIM_beta = 0.5 * (C + np.swapaxes(C, 1, 2)) / s0[:, None, None] if fim else None
        coef, se, t, cov = _solve(C, rhs, s0)
        RE = None
        if re:
            resid = ZY - coef @ sh.ZX.T  # (m, q): ZY_j - ZX b
            if spectral:
                RE = (w * sh.times_V(resid)) @ sh.V.T
            else:
                RE = (MD @ resid[:, :, None])[:, :, 0]
    logLik = _loglik(sh, s0, logdetM0)
    return FixedFit(coef=coef, cov=cov, FIM_beta=FIM_beta, RE=RE, logLik=logLik, se=se, t=t)


def _fixed_from_gram(
    sh: SharedTerms,
    XY: Array,
    ZY: Array,
    theta: Array,
    logdetM0: Array,
    gram: FixedTerms,
    *,
    fim: bool,
) -> FixedFit:
    """:func:`fixed_effects` from the nested fit's C_G = I - G' P^-1 D G and a = G' P^-1 D
    zry at theta (:class:`~flashmm_dask.numerics.fisher.FixedTerms`), for the whole block
    at once: with XX = L L', G = ZX L^-T and zry = ZY - G w, w = L^-1 XY,

        C = XX - ZX' MD ZX = L C_G L',   XY - ZX' MD ZY = L (C_G w - a),

    so no solve with P is left per feature. The features without valid terms take
    :func:`_fixed_structured`."""
    s0 = theta[:, -1]
    ok = gram.ok
    m, p = XY.shape
    L = sh.chol
    Cg, a = gram.C[ok], gram.a[ok]  # (the others are not read: the kernel left them unset)
    w = scipy.linalg.solve_triangular(L, XY[ok].T, lower=True).T  # (r, p)
    with one_blas_thread():
        C = L @ Cg @ L.T
        rhs = (np.einsum("mij,mj->mi", Cg, w) - a) @ L.T
    coef, se, t = np.empty((m, p)), np.empty((m, p)), np.empty((m, p))
    cov = np.empty((m, p, p))
    FIM_beta = np.empty((m, p, p)) if fim else None
    if fim:
        assert FIM_beta is not None
        FIM_beta[ok] = 0.5 * (C + np.swapaxes(C, 1, 2)) / s0[ok][:, None, None]
    coef[ok], se[ok], t[ok], cov[ok] = _solve(np.ascontiguousarray(C), rhs, s0[ok])
    logLik = _loglik(sh, s0, logdetM0)
    if not ok.all():
        bad = ~ok
        rest = _fixed_structured(sh, XY[bad], ZY[bad], theta[bad], logdetM0[bad], fim=fim, re=False)
        coef[bad], cov[bad], logLik[bad], se[bad], t[bad] = (
            rest.coef, rest.cov, rest.logLik, rest.se, rest.t,
        )  # fmt: skip
        if fim:
            assert FIM_beta is not None
            FIM_beta[bad] = rest.FIM_beta
    return FixedFit(coef=coef, cov=cov, FIM_beta=FIM_beta, RE=None, logLik=logLik, se=se, t=t)


def _fixed_structured(
    sh: SharedTerms, XY: Array, ZY: Array, theta: Array, logdetM0: Array, *, fim: bool, re: bool
) -> FixedFit:
    """:func:`fixed_effects` with MD x = (D ZZ + I)^-1 D x by structured solves; features
    whose Schur complement is singular take the dense algebra."""
    st = sh.structure
    assert st is not None
    m, p = XY.shape
    if (
        m > 1
    ):  # one feature at a time: results independent of the block (as fisher._score_structured)
        parts = [
            _fixed_structured(
                sh,
                XY[j : j + 1],
                ZY[j : j + 1],
                theta[j : j + 1],
                logdetM0[j : j + 1],
                fim=fim,
                re=re,
            )
            for j in range(m)
        ]
        return FixedFit(
            coef=np.concatenate([f.coef for f in parts]),
            cov=np.concatenate([f.cov for f in parts]),
            FIM_beta=np.concatenate([f.FIM_beta for f in parts]) if fim else None,
            RE=np.concatenate([f.RE for f in parts]) if re else None,
            logLik=np.concatenate([f.logLik for f in parts]),
            se=np.concatenate([f.se for f in parts]),
            t=np.concatenate([f.t for f in parts]),
        )
    s0 = theta[:, -1]
    perm = st.perm
    D = theta[:, st.comp] / s0[:, None]  # permuted order
    ZYp = ZY[:, perm]  # ZX[perm] (q x p) only where it is used: a copy per feature
    factor = None  # P = D ZZ + I factored once for MD ZX, MD ZY and the RE
    if sh.nested is not None:  # C = L (I - G' MD G) L' and ZX' MD ZY = L G' MD ZY
        with one_blas_thread():
            Cg, a, invertible = sh.nested.md_gram(D, ZYp[0])
        C = (sh.chol @ Cg @ sh.chol.T)[None]
        rhs = XY - (sh.chol @ a)[None]
        ok = np.array([invertible])
    else:
        ZXp = sh.ZX[perm]
        x = np.concatenate([np.broadcast_to(ZXp, (m, *ZXp.shape)), ZYp[:, :, None]], axis=2)
        with one_blas_thread():
            factor = Factor(st, D, inverse=False)
            MDx, ok = md_solve(st, D, x, factor)
        C = sh.XX - ZXp.T @ MDx[:, :, :p]
        rhs = XY - np.einsum("mq,qp->mp", MDx[:, :, p], ZXp)
    FIM_beta = 0.5 * (C + np.swapaxes(C, 1, 2)) / s0[:, None, None] if fim else None
    coef, se, t, cov = _solve(C, rhs, s0)
    RE = None
    if re:
        resid = ZYp - coef @ sh.ZX[perm].T
        with one_blas_thread():
            REp, _ = md_solve(st, D, resid, factor)
        RE = np.empty_like(REp)
        RE[:, perm] = REp
    logLik = _loglik(sh, s0, logdetM0)
    out = FixedFit(coef=coef, cov=cov, FIM_beta=FIM_beta, RE=RE, logLik=logLik, se=se, t=t)
    if not ok.all():
        rest = fixed_effects(
            sh, XY[~ok], ZY[~ok], theta[~ok], logdetM0[~ok], fim=fim, re=re, structure=False
        )
        out.coef[~ok], out.cov[~ok], out.logLik[~ok] = rest.coef, rest.cov, rest.logLik
        out.se[~ok], out.t[~ok] = rest.se, rest.t
        if fim:
            assert out.FIM_beta is not None
            out.FIM_beta[~ok] = rest.FIM_beta
        if re:
            assert out.RE is not None
            out.RE[~ok] = rest.RE
    return out
