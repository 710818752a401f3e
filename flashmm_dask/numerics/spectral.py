"""Compiled Fisher scoring of one random component (K = 1), on the eigenvalues of the design.

With zrz = U diag(lam) U' and ZZ = V diag(mu) V' (ALGORITHM.md; :mod:`.fisher`), every
trace and quadratic form of a scoring step is a sum over the q eigenvalues of a scalar
function of rho = s_1 / s_0, so a feature's whole loop runs in a few microseconds
(:func:`fit_spectral_batch`). As in :mod:`.compiled`, the kernel reports per feature
whether it succeeded (``ok``), and the caller refits the others with the pseudo-inverse.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

# the compile options of every fitter kernel
from flashmm_dask.numerics.compiled import _compile

if TYPE_CHECKING:
    from flashmm_dask.numerics.fisher import SharedTerms


@functools.partial(_compile, inline=True)
def eigen_terms(rho: float, lam_k: float, mu_k: float, reml: bool) -> tuple[float, float, float]:
    """(mv, a, m0) at one eigenvalue: mv = 1 / (1 + rho lam_k), the eigenvalue of M (0
    where 1 + rho lam_k is: the pseudo-inverse), and those of A and M0: (lam_k, mv) for
    REML, (mu_k, 1 / (1 + rho mu_k)) for ML. Inlined into the kernels that sum them."""
    x = 1.0 + rho * lam_k
    mv = 1.0 / x if x != 0.0 else 0.0
    if reml:
        return mv, lam_k, mv
    x0 = 1.0 + rho * mu_k
    return mv, mu_k, 1.0 / x0 if x0 != 0.0 else 0.0


#: Eigenvalues whose |m0| are multiplied before one logarithm is taken of the product.
_LOG_BLOCK = 8


@_compile
def _log_abs_product(rho: float, lam: np.ndarray, mu: np.ndarray, reml: bool) -> float:
    """log |det M0| = sum_k log |m0_k| (:func:`eigen_terms`), as the logarithms of products
    of ``_LOG_BLOCK`` factors (a logarithm per eigenvalue was half a K = 1 fit's scoring);
    a block whose product is zero, subnormal or overflows takes a logarithm per factor."""
    q = lam.shape[0]
    total = 0.0
    for start in range(0, q, _LOG_BLOCK):
        stop = min(start + _LOG_BLOCK, q)
        product = 1.0
        for k in range(start, stop):
            product *= abs(eigen_terms(rho, lam[k], mu[k], reml)[2])
        if 1e-300 < product < 1e300:
            total += np.log(product)
        else:
            for k in range(start, stop):
                total += np.log(abs(eigen_terms(rho, lam[k], mu[k], reml)[2]))
    return total


@functools.partial(_compile, reassoc=True)
def _spectral_score(
    rho: float,
    s0: float,
    lam: np.ndarray,
    mu: np.ndarray,
    reml: bool,
    z2: np.ndarray,
    yry: float,
    nrq: float,
    nr: float,
    out: np.ndarray,
    final: bool,
) -> None:
    """K = 1 score and information at (rho s0, s0): out = (dl1, dl0, F11, F10, F00, s0_prof,
    log |det M0| (0 unless ``final``)), the eigenvalue sums of ``fisher._score_spectral``
    for one feature. The sums are reassociated (vectorised: a division per eigenvalue, in
    whole SIMD vectors, 1.8x faster), so they differ from the loop's order in rounding."""
    q = lam.shape[0]
    sw = 0.0
    sww = 0.0
    swm = 0.0
    sm0 = 0.0
    sm0m0 = 0.0
    zm2 = 0.0
    zm = 0.0
    logdet = 0.0
    for k in range(q):
        mv, av, m0 = eigen_terms(rho, lam[k], mu[k], reml)
        wv = av * m0
        sw += wv
        sww += wv * wv
        swm += wv * m0
        sm0 += m0
        sm0m0 += m0 * m0
        zm2 += z2[k] * mv * mv
        zm += z2[k] * mv
    if final:  # only where the caller keeps it
        logdet = _log_abs_product(rho, lam, mu, reml)
    s02 = s0 * s0
    out[0] = (zm2 / s02 - sw / s0) / 2.0
    yR2y = yry - rho * (zm2 + zm)
    out[1] = (yR2y / s02 - (nrq + sm0) / s0) / 2.0
    out[2] = sww / s02 / 2.0
    out[3] = swm / s02 / 2.0
    out[4] = (nrq + sm0m0) / s02 / 2.0
    out[5] = (yry - rho * zm) / nr
    out[6] = logdet


@_compile
def _inverse_2x2_into(F: np.ndarray, limit: float, inv: np.ndarray) -> bool:
    """inv = F^-1 for F = (F11, F10, F00) (symmetric 2 x 2) when 2 ||F||_1 ||F^-1||_1 < limit."""
    a = F[2]
    b = F[3]
    c = F[4]
    det = a * c - b * b
    inv[0] = c / det
    inv[1] = -b / det
    inv[2] = a / det
    norm_a = max(abs(a) + abs(b), abs(b) + abs(c))
    norm_i = max(abs(inv[0]) + abs(inv[1]), abs(inv[1]) + abs(inv[2]))
    return np.isfinite(norm_i) and 2.0 * norm_a * norm_i < limit


@_compile
def _fit_spectral_batch(
    lam: np.ndarray,
    mu: np.ndarray,
    reml: bool,
    z: np.ndarray,
    yry: np.ndarray,
    s_init: np.ndarray,
    nrq: float,
    nr: float,
    max_iter: int,
    epsilon: float,
    limit: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fisher scoring of one random component (K = 1) for a block of features.

    The loop of ``fisher.fit_theta`` on the spectral path, one feature at a time: z (m, q)
    is zry projected on the eigenvectors of zrz. Returns theta, se_theta, dlogL (m, 2),
    FIM_theta (m, 2, 2), niter (m,), logdetM0 (m,) and ok (m,): False where an information
    matrix was too ill-conditioned for the closed-form inverse (the caller refits those
    features with the pseudo-inverse).
    """
    m, q = z.shape
    theta = np.empty((m, 2))
    se = np.empty((m, 2))
    dl = np.empty((m, 2))
    fim = np.empty((m, 2, 2))
    niter = np.zeros(m, dtype=np.int64)
    logdet = np.empty(m)
    ok = np.ones(m, dtype=np.bool_)
    z2 = np.empty(q)
    sc = np.empty(7)
    inv = np.empty(3)
    for j in range(m):
        for k in range(q):
            z2[k] = z[j, k] * z[j, k]
        s1 = s_init[j, 0]
        s0 = s_init[j, 1]
        it = 0
        while max_iter > 0:
            it += 1
            _spectral_score(s1 / s0, s0, lam, mu, reml, z2, yry[j], nrq, nr, sc, False)
            if not _inverse_2x2_into(sc, limit, inv):
                ok[j] = False
                break
            step1 = inv[0] * sc[0] + inv[1] * sc[1]
            step0 = inv[1] * sc[0] + inv[2] * sc[1]
            s1 += step1
            s0 += step0
            big = abs(sc[0]) > epsilon or abs(sc[1]) > epsilon
            if np.isnan(sc[0]) or np.isnan(sc[1]) or not big or it >= max_iter:
                break
        niter[j] = it
        if not ok[j]:
            continue
        _spectral_score(s1 / s0, s0, lam, mu, reml, z2, yry[j], nrq, nr, sc, False)
        s0 = sc[5]
        _spectral_score(s1 / s0, s0, lam, mu, reml, z2, yry[j], nrq, nr, sc, True)
        if not _inverse_2x2_into(sc, limit, inv):
            ok[j] = False
            continue
        theta[j, 0] = s1
        theta[j, 1] = s0
        dl[j, 0] = sc[0]
        dl[j, 1] = sc[1]
        fim[j, 0, 0] = sc[2]
        fim[j, 0, 1] = fim[j, 1, 0] = sc[3]
        fim[j, 1, 1] = sc[4]
        se[j, 0] = np.sqrt(inv[0])
        se[j, 1] = np.sqrt(inv[2])
        logdet[j] = sc[6]
    return theta, se, dl, fim, niter, logdet, ok


def fit_spectral_batch(
    sh: SharedTerms,
    z: np.ndarray,
    yry: np.ndarray,
    s_init: np.ndarray,
    max_iter: int,
    epsilon: float,
    limit: float,
) -> tuple[np.ndarray, ...]:
    """K = 1 Fisher scoring of a block of features on the eigenvalues of ``sh`` (lam of
    zrz, mu of ZZ); see :func:`_fit_spectral_batch`."""
    return _fit_spectral_batch(
        np.ascontiguousarray(sh.lam),
        np.ascontiguousarray(sh.mu),
        sh.method == "REML",
        np.ascontiguousarray(z),
        np.ascontiguousarray(yry),
        np.ascontiguousarray(s_init, dtype=np.float64),
        float(sh.n - sh.r - sh.q),
        float(sh.n - sh.r),
        int(max_iter),
        float(epsilon),
        float(limit),
    )
