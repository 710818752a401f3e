"""Satterthwaite degrees of freedom of fixed-effect t-tests, from the summary statistics.

Notation as in :mod:`flashmm_dask.numerics.fisher`: theta = (s_1..s_K, s_0), V = s_0 I_n +
sum_k s_k Z_k Z_k', so dV/ds_k = Z_k Z_k' and dV/ds_0 = I. For a contrast L'b with
variance c(theta) = L' cov(theta) L, Satterthwaite's approximation is

    df = 2 c^2 / (g' A g),   g = dc/dtheta,

with A the inverse of the *observed* information (minus the Hessian of the REML or ML
log-likelihood in theta at the estimate), as lmerTest computes it. The df do not depend on
how theta is parameterised (lmerTest uses relative covariance factors and sigma), because
at a stationary point the Hessian and the gradient transform with the same Jacobian.

Observed information
--------------------
For y ~ N(0, V(theta)) with V linear in theta and H = V^-1, the log-likelihood has

    -d2 l / dtheta_i dtheta_j = Q_ij - T_ij / 2,
    Q_ij = y'H V_i H V_j H y,   T_ij = tr(H V_i H V_j).

The REML log-likelihood of (y, X, Z) is the log-likelihood of K'y ~ N(0, K'VK), K an
orthonormal basis of the orthogonal complement of col(X), whose statistics are
(zrz, zry, yry) on N = n - p "cells". The ML log-likelihood profiled over beta has the same
quadratic term and the trace term of the full model (ZZ, n)::

    REML: I = Q(zrz, zry, yry) - T(zrz, n - p) / 2
    ML:   I = Q(zrz, zry, yry) - T(ZZ, n) / 2

For a Gram matrix G (zrz or ZZ) of N rows, D = diag(s_k / s_0 repeated d_k times) and
M = (D G + I)^-1, the Woodbury identity gives Z'H = M'Z' / s_0, hence::

    Z'HZ = G M / s_0        Z'H^2 Z = M'G M / s_0^2        tr H^2 = (N - q + tr M M) / s_0^2

and with a = H y, z = Z'y, yy = y'y and w = M D z::

    u = Z'a = M'z / s_0     v = Z'Ha = M'u / s_0
    a'a = (yy - 2 z'w + w'G w) / s_0^2            a'Ha = (a'a - u' M D u) / s_0

    random i, j:  Q_ij = u_i' (Z'HZ)_ij u_j      T_ij = |(Z'HZ)_ij|^2 (sum of squares)
    random i, 0:  Q_i0 = u_i' v_i                T_i0 = tr (Z'H^2 Z)_ii
    0, 0:         Q_00 = a'Ha                    T_00 = tr H^2

Gradient of the covariance
--------------------------
cov = (X'HX)^-1 (the full model, G = ZZ): d cov / ds_k = cov B_k'B_k cov with
B = Z'HX = M'ZX / s_0 (rows of component k), and d cov / ds_0 = cov X'H^2 X cov with
X'H^2 X = (XX - 2 ZX' MD ZX + ZX' MD ZZ MD ZX) / s_0^2, MD = M D.

With one random component (K = 1), M is diagonal in the eigenvectors of G, and every term
above is a sum over eigenvalues, as in the K = 1 path of the fit.
Where the fit takes the structured path (K >= 2 with a diagonal Z_k'Z_k,
:mod:`.structured`), every term is taken through that structure instead, without any
(q, q) matrix (:mod:`.satterthwaite_structured`: structured solves with D ZZ + I and the
Woodbury correction of zrz; for nested factors sums over the count classes and the
pairs of a group and a count in compiled kernels, :mod:`.compiled_satterthwaite`).

V is linear in theta, so cov is homogeneous of degree 1 in theta and Euler's identity
sum_i theta_i d cov / d theta_i = cov gives the residual's derivative from the others:
d cov / ds_0 = (cov - sum_k s_k d cov / ds_k) / s_0, without forming X'H^2 X.

Components held at zero (``nonnegative=True``)
----------------------------------------------
A non-negative fit can end with a component s_k = 0 (lme4's singular fit). Two rules for
the df there (``boundary_df``):

- "lmertest": the zero component leaves the model, as in lmerTest, where it is no parameter
  of a singular fit: g and A are those of the free components only. The df jump there:
  with the donor variance at zero an effect between donors gets about n - p df.
- "retain": the zero component stays a parameter: g is the gradient in every component and
  A the inverse observed information of every component, both at the constrained optimum
  (s_k = 0, the others re-estimated). Every formula above holds at s_k = 0 (D has zeros,
  M = (D G + I)^-1 stays defined), and g and the information are continuous in theta, so
  these df are the limit of the interior df as an estimate approaches zero from above: the
  df are continuous in the data across the boundary. Where the data lie well beyond the
  boundary (the unconstrained optimum far below zero) the observed information there need
  not be positive definite, and is no variance of anything; there the expected (Fisher)
  information T / 2 (REML: T(zrz, n - p); ML: T(ZZ, n)) takes its place, so that every
  feature gets finite df.
"""

from __future__ import annotations

import numpy as np

from flashmm_dask.numerics import satterthwaite_structured as structured
from flashmm_dask.numerics.fisher import SharedTerms
from flashmm_dask.numerics.linalg import Array, inv_or_pinv, pinv_free, pinv_scaled, reciprocal
from flashmm_dask.numerics.spectral_terms import observed_information_batch, shifted_reciprocal

#: The df methods of the t-tests: the R package's n - p, or Satterthwaite's.
DF_METHODS = ("residual", "satterthwaite")
#: Satterthwaite's df at components held at zero: dropped (lmerTest) or kept (the limit of
#: the interior df); see the module docstring.
BOUNDARY_DF = ("lmertest", "retain")


def observed_information(
    sh: SharedTerms,
    theta: Array,
    zry: Array,
    yry: Array,
    *,
    spectral: bool | None = None,
    z: Array | None = None,
    structure: bool = True,
    fim: Array | None = None,
) -> Array:
    """Minus the Hessian of the REML (or ML) log-likelihood in theta, per feature.

    Parameters
    ----------
    sh : SharedTerms
    theta : (m, K+1) array
    zry : (m, q) array
    yry : (m,) array
    spectral : bool, optional
        Use the K = 1 eigenvalue path (compiled, :func:`.spectral_terms.
        observed_information_batch`); default whenever K == 1.
    z : (m, q) array, optional
        The K = 1 path's projections zry @ sh.U, where the caller has them.
    structure : bool
        With K >= 2, go through the block structure of ZZ where ``sh.structure`` found one
        (:mod:`.satterthwaite_structured`); False: the dense path.
    fim : (m, K+1, K+1) array, optional
        The expected information T / 2 at theta (a fit's ``FIM_theta`` at this theta),
        where the caller has it: the structured path then does not compute it again
        (the other paths do not use it).

    Returns
    -------
    (m, K+1, K+1) array
    """
    if spectral is None:
        spectral = sh.K == 1
    if spectral:
        return observed_information_batch(sh, zry @ sh.U if z is None else z, yry, theta)
    if _structured(sh, structure):
        info, ok = structured.observed_information(sh, theta, zry, yry, fim)
        if not ok.all():  # P or C singular: the dense algebra with its pseudo-inverses
            info[~ok] = observed_information(sh, theta[~ok], zry[~ok], yry[~ok], structure=False)
        return info
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return _information_general(sh, theta, zry, yry)


def _structured(sh: SharedTerms, structure: bool) -> bool:
    """Whether the structured path is taken (K >= 2 and a structure found in ZZ)."""
    return structure and sh.K >= 2 and sh.structure is not None


def _ratios(sh: SharedTerms, theta: Array) -> Array:
    return np.repeat(theta[:, :-1] / theta[:, -1:], sh.d, axis=1)  # (m, q): diagonal of D


def _trace_terms(
    sh: SharedTerms, G: Array, N: float, D: Array, s0: Array, M: Array | None = None
) -> Array:
    """T of the model with Gram matrix G of N rows; M = (D G + I)^-1 if already known."""
    m, q, K = D.shape[0], sh.q, sh.K
    if M is None:
        M = inv_or_pinv(D[:, :, None] * G + np.eye(q))
    Mt = np.swapaxes(M, 1, 2)
    ZHZ = (G @ M) / s0[:, None, None]
    ZH2Z = (Mt @ G @ M) / (s0**2)[:, None, None]
    T = np.empty((m, K + 1, K + 1))
    for i, Ii in enumerate(sh.slices):
        for j, Ij in enumerate(sh.slices[: i + 1]):
            T[:, i, j] = T[:, j, i] = np.sum(ZHZ[:, Ii, Ij] ** 2, axis=(1, 2))
        T[:, i, K] = T[:, K, i] = np.trace(ZH2Z[:, Ii, Ii], axis1=1, axis2=2)
    T[:, K, K] = (N - q + np.sum(M * Mt, axis=(1, 2))) / s0**2
    return T


def _information_general(sh: SharedTerms, theta: Array, zry: Array, yry: Array) -> Array:
    K = sh.K
    s0 = theta[:, -1]
    D = _ratios(sh, theta)
    M = inv_or_pinv(D[:, :, None] * sh.zrz + np.eye(sh.q))
    if sh.method == "REML":
        T = _trace_terms(sh, sh.zrz, sh.n - sh.p, D, s0, M)
    else:
        T = _trace_terms(sh, sh.ZZ, sh.n, D, s0)
    Mt = np.swapaxes(M, 1, 2)
    ZHZ = (sh.zrz @ M) / s0[:, None, None]
    u = (Mt @ zry[:, :, None])[:, :, 0] / s0[:, None]
    v = (Mt @ u[:, :, None])[:, :, 0] / s0[:, None]
    w = (M @ (D * zry)[:, :, None])[:, :, 0]
    # one (1, q) x (q, q) product per feature: (m, q) @ zrz takes gemv for m = 1 and gemm
    # otherwise, which round differently (a feature's values then depend on its batch)
    wA = (w[:, None, :] @ sh.zrz)[:, 0, :]
    aa = (yry - 2.0 * np.sum(zry * w, axis=1) + np.sum(w * wA, axis=1)) / s0**2
    MDu = (M @ (D * u)[:, :, None])[:, :, 0]
    aHa = (aa - np.sum(u * MDu, axis=1)) / s0
    Q = np.empty_like(T)
    for i, Ii in enumerate(sh.slices):
        for j, Ij in enumerate(sh.slices[: i + 1]):
            Q[:, i, j] = Q[:, j, i] = np.einsum("ma,mab,mb->m", u[:, Ii], ZHZ[:, Ii, Ij], u[:, Ij])
        Q[:, i, K] = Q[:, K, i] = np.sum(u[:, Ii] * v[:, Ii], axis=1)
    Q[:, K, K] = aHa
    return Q - T / 2.0


def _information_spectral(sh: SharedTerms, theta: Array, zry: Array, yry: Array) -> Array:
    """K = 1: sums over the eigenvalues lam of zrz (and mu of ZZ for ML); the NumPy
    reference of the compiled :func:`.spectral_terms.observed_information_batch`."""
    s0 = theta[:, 1]
    rho = (theta[:, 0] / s0)[:, None]
    z2 = (zry @ sh.U) ** 2  # squared projections of zry on the eigenvectors of zrz
    mv = reciprocal(1.0 + rho * sh.lam)  # eigenvalues of M

    def trace_terms(g: Array, mvals: Array, N: float) -> Array:
        T = np.empty((theta.shape[0], 2, 2))
        T[:, 0, 0] = np.sum((g * mvals) ** 2, axis=1) / s0**2
        T[:, 0, 1] = T[:, 1, 0] = np.sum(g * mvals**2, axis=1) / s0**2
        T[:, 1, 1] = (N - sh.q + np.sum(mvals**2, axis=1)) / s0**2
        return T

    if sh.method == "REML":
        T = trace_terms(sh.lam, mv, sh.n - sh.p)
    else:
        T = trace_terms(sh.mu, reciprocal(1.0 + rho * sh.mu), sh.n)
    aa = (yry - np.sum(z2 * (2.0 * rho * mv - (rho * mv) ** 2 * sh.lam), axis=1)) / s0**2
    mv3 = mv**3  # once: a power of every (feature, eigenvalue) costs more than the sums
    aHa = (aa - np.sum(z2 * rho * mv3, axis=1) / s0**2) / s0
    Q = np.empty_like(T)
    Q[:, 0, 0] = np.sum(z2 * sh.lam * mv3, axis=1) / s0**3
    Q[:, 0, 1] = Q[:, 1, 0] = np.sum(z2 * mv3, axis=1) / s0**3
    Q[:, 1, 1] = aHa
    return Q - T / 2.0


def _spectral_middle(sh: SharedTerms, theta: Array) -> Array:
    """G' diag(mf^2) G per feature, (m, p, p), for K = 1: G = V'ZX and mf the eigenvalues
    of (D ZZ + I)^-1, so that X'H Z Z'H X = this / s0^2 (the one (m, q) x (q, p^2)
    product of :func:`cov_jacobian` and :func:`contrast_gradient`)."""
    mf2 = shifted_reciprocal(theta[:, 0] / theta[:, -1], sh.mu, "squared")
    return (mf2 @ sh.VZX_outer).reshape(theta.shape[0], sh.p, sh.p)


def _middle_dense(sh: SharedTerms, theta: Array) -> Array:
    """s0^2 X'H V_k H X = B_k'B_k (m, K, p, p), B = M'ZX, by the dense algebra."""
    D = _ratios(sh, theta)
    M = inv_or_pinv(D[:, :, None] * sh.ZZ + np.eye(sh.q))
    B = np.swapaxes(M, 1, 2) @ sh.ZX  # s0 Z'HX, (m, q, p)
    return np.stack([np.swapaxes(B[:, Ik, :], 1, 2) @ B[:, Ik, :] for Ik in sh.slices], axis=1)


def _middle_structured(sh: SharedTerms, theta: Array) -> Array:
    """:func:`_middle_dense` through the structure of ZZ (the dense algebra for the
    features whose P or C is singular)."""
    mid, ok = structured.middle(sh, theta)
    if not ok.all():
        mid[~ok] = _middle_dense(sh, theta[~ok])
    return mid


def _gradient_dense(sh: SharedTerms, theta: Array, W: Array) -> Array:
    """s0^2 g_k = |B_k W|^2 (m, K, c) of the random components, by the dense algebra."""
    D = _ratios(sh, theta)
    M = inv_or_pinv(D[:, :, None] * sh.ZZ + np.eye(sh.q))
    BW = np.swapaxes(M, 1, 2) @ (sh.ZX @ W)  # s0 Z'HX W, (m, q, c)
    return np.stack([np.sum(BW[:, Ik, :] ** 2, axis=1) for Ik in sh.slices], axis=1)


def cov_jacobian(
    sh: SharedTerms,
    theta: Array,
    cov: Array,
    *,
    spectral: bool | None = None,
    structure: bool = True,
) -> Array:
    """Derivatives of the coefficient covariance in each variance component.

    Parameters
    ----------
    sh : SharedTerms
    theta : (m, K+1) array
    cov : (m, p, p) array, the covariance of the coefficients at theta
    spectral : bool, optional
        Use the K = 1 eigenvalue path; default whenever K == 1.
    structure : bool
        With K >= 2, go through the block structure of ZZ where ``sh.structure`` found one
        (:mod:`.satterthwaite_structured`); False: the dense path.

    Returns
    -------
    (m, K+1, p, p) array: d cov / d theta_i in entry [:, i]
    """
    if spectral is None:
        spectral = sh.K == 1
    m, K, p = theta.shape[0], sh.K, sh.p
    s0 = theta[:, -1]
    s02 = (s0**2)[:, None, None]
    inner = np.empty((m, K, p, p))  # X'H V_k H X of the random components
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if spectral:
            inner[:, 0] = _spectral_middle(sh, theta) / s02
        elif _structured(sh, structure):
            inner[:] = _middle_structured(sh, theta) / s02[:, None]
        else:
            inner[:] = _middle_dense(sh, theta) / s02[:, None]
        jac = np.empty((m, K + 1, p, p))
        for k in range(K):  # plain stacked products: broadcasting ones are ~4x slower
            jac[:, k] = cov @ inner[:, k] @ cov
        # Euler: sum_i theta_i d cov / d theta_i = cov
        rest = cov - np.einsum("mk,mkab->mab", theta[:, :K], jac[:, :K])
        jac[:, K] = rest / s0[:, None, None]
    return 0.5 * (jac + np.swapaxes(jac, -1, -2))


def contrast_gradient(
    sh: SharedTerms,
    theta: Array,
    cov: Array,
    L: Array,
    *,
    spectral: bool | None = None,
    structure: bool = True,
) -> tuple[Array, Array]:
    """Variances c = L' cov L of contrasts and their gradients g = dc / dtheta, without
    forming d cov / d theta (m p^2 values per component).

    With W = cov L: g_k = |B_k W|^2 / s_0^2 (B = M'ZX, the rows of component k; K = 1:
    W' (G' diag(mf^2) G) W / s_0^2 with G = V'ZX, the middle factor one (m, q) x (q, p^2)
    product), and the residual's from Euler's identity.

    Parameters
    ----------
    sh : SharedTerms
    theta : (m, K+1) array
    cov : (m, p, p) array, the covariance of the coefficients at theta
    L : (p, c) array
    spectral : bool, optional
        Use the K = 1 eigenvalue path; default whenever K == 1.
    structure : bool
        With K >= 2, go through the block structure of ZZ where ``sh.structure`` found one
        (g_k = W' (B_k'B_k) W with the (p, p) B_k'B_k of :mod:`.satterthwaite_structured`);
        False: the dense path.

    Returns
    -------
    c : (m, c) array
    g : (m, K+1, c) array
    """
    if spectral is None:
        spectral = sh.K == 1
    m, K, p = theta.shape[0], sh.K, sh.p
    nc = L.shape[1]
    identity = L.shape == (p, p) and np.array_equal(L, np.eye(p))
    W = cov if identity else cov @ L  # (m, p, c)
    c = np.diagonal(cov, axis1=1, axis2=2).copy() if identity else np.sum(L * W, axis=1)
    s0 = theta[:, -1]
    g = np.empty((m, K + 1, nc))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if spectral:
            g[:, 0] = np.sum(W * (_spectral_middle(sh, theta) @ W), axis=1)
        elif _structured(sh, structure):
            mid = _middle_structured(sh, theta)
            for k in range(K):
                g[:, k] = np.sum(W * (mid[:, k] @ W), axis=1)
        else:
            g[:, :K] = _gradient_dense(sh, theta, W)
        g[:, :K] /= (s0**2)[:, None, None]
        # Euler: sum_i theta_i dc / dtheta_i = c
        g[:, K] = (c - np.einsum("mk,mkc->mc", theta[:, :K], g[:, :K])) / s0[:, None]
    return c, g


def df_from_gradient(c: Array, g: Array, vcov_theta: Array) -> Array:
    """Satterthwaite's df 2 c^2 / (g' A g) of (m, c) variances with (m, K+1, c) gradients;
    NaN where not a positive finite number."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        df = 2.0 * c**2 / np.einsum("mic,mij,mjc->mc", g, vcov_theta, g)
    return np.where(np.isfinite(df) & (df > 0), df, np.nan)


def satterthwaite_df(cov: Array, jac_cov: Array, vcov_theta: Array, L: Array) -> Array:
    """Satterthwaite's df of contrasts L'b for a block of features.

    Parameters
    ----------
    cov : (m, p, p) array
    jac_cov : (m, K+1, p, p) array, from :func:`cov_jacobian`
    vcov_theta : (m, K+1, K+1) array, the inverse observed information
    L : (p, c) array

    Returns
    -------
    (m, c) array; NaN where the approximation is not a positive finite number (features
    not fitted, or an information matrix that is not positive definite there).
    """
    m, k1, p = jac_cov.shape[:3]
    if L.shape == (p, p) and np.array_equal(L, np.eye(p)):  # the coefficients themselves
        c = np.diagonal(cov, axis1=1, axis2=2)
        g = np.diagonal(jac_cov, axis1=2, axis2=3)
    else:  # through matrix products (BLAS), not a four-index einsum
        c = np.sum(L * (cov @ L), axis=1)
        g = np.sum(L * (jac_cov.reshape(-1, p) @ L).reshape(m, k1, p, -1), axis=2)
    return df_from_gradient(c, g, vcov_theta)


def expected_information(sh: SharedTerms, theta: Array, *, structure: bool = True) -> Array:
    """The expected (Fisher) information of theta, T / 2, per feature: (m, K+1, K+1);
    ``structure`` as in :func:`observed_information`."""
    if _structured(sh, structure):
        return structured.expected_information(sh, theta)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        D = _ratios(sh, theta)
        if sh.method == "REML":
            return _trace_terms(sh, sh.zrz, sh.n - sh.p, D, theta[:, -1]) / 2.0
        return _trace_terms(sh, sh.ZZ, sh.n, D, theta[:, -1]) / 2.0


def _retained_information(
    sh: SharedTerms, theta: Array, held: np.ndarray, info: Array, structure: bool
) -> Array:
    """The information of every component ("retain"): the observed one, but the expected
    one at fits with a held component where the observed is not positive definite."""
    rows = np.flatnonzero(held.any(axis=1) & np.isfinite(info).all(axis=(1, 2)))
    if rows.size == 0:
        return info
    indefinite = rows[~(np.linalg.eigvalsh(info[rows]).min(axis=1) > 0)]
    if indefinite.size == 0:
        return info
    out = info.copy()
    out[indefinite] = expected_information(sh, theta[indefinite], structure=structure)
    return out


def theta_vcov(
    sh: SharedTerms,
    theta: Array,
    zry: Array,
    yry: Array,
    *,
    spectral: bool | None = None,
    held: np.ndarray | None = None,
    boundary_df: str = "lmertest",
    z: Array | None = None,
    structure: bool = True,
    fim: Array | None = None,
) -> Array:
    """The inverse observed information of theta, vcov_theta: (m, K+1, K+1), the
    per-feature ingredient of Satterthwaite's df with :func:`cov_jacobian`.

    ``held`` ((m, K+1) bool, optional) marks variance components held at zero by a
    non-negative fit. With ``boundary_df="lmertest"`` such a component leaves the model
    (as in lmerTest, where it is not a parameter of a singular fit), so the information is
    that of the free components and vcov_theta is zero in the held rows and columns; with
    "retain" it stays in (the information of every component at theta, the limit of the
    interior df; the expected information where the observed is not positive definite).
    A pseudo-inverse is taken where the information is singular. ``z``: the K = 1 path's
    projections zry @ sh.U, where the caller has them. ``structure`` and ``fim`` (the
    expected information at theta, where the caller has it): as in
    :func:`observed_information`.
    """
    if boundary_df not in BOUNDARY_DF:
        raise ValueError(f"unknown boundary_df {boundary_df!r}; use one of {BOUNDARY_DF}")
    info = observed_information(
        sh, theta, zry, yry, spectral=spectral, z=z, structure=structure, fim=fim
    )
    # scaled to unit diagonal first: the information of a slope's variance and of an
    # intercept's may differ by ten orders of magnitude (pinv_scaled)
    if held is None or not held.any():
        return pinv_scaled(info)
    if boundary_df == "retain":
        return pinv_scaled(_retained_information(sh, theta, held, info, structure))
    return pinv_free(info, ~held)
