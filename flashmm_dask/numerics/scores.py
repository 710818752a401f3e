"""The score and information of the variance components in NumPy: the reference algebra.

:func:`_score_general` evaluates the step of :mod:`.fisher` (ALGORITHM.md) with dense
(m, q, q) matrices and pseudo-inverses; :func:`_score_spectral` the same for one random
component (K = 1) as sums over the eigenvalues of zrz and ZZ. The compiled kernels
(:mod:`.compiled`, :mod:`.spectral`, :mod:`.compiled_k`) and the structured path are tested
against them, and take them for the features they cannot handle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from flashmm_dask.numerics import compiled
from flashmm_dask.numerics.linalg import Array, inv_shifted, reciprocal, trace

if TYPE_CHECKING:
    from flashmm_dask.numerics.fisher import SharedTerms


@dataclass(frozen=True)
class _Score:
    dl: Array  # (m, K+1)
    F: Array  # (m, K+1, K+1)
    s0_profiled: Array  # (m,) (yry - zry' M D zry) / (n - r) at the current theta
    logdetM0: Array  # (m,)


def _times_A(sh: SharedTerms, M0: Array, D: Array) -> Array:
    """W = A M0 for M0 = (D A + I)^-1, in O(q^2) per feature where D allows.

    (D A + I) M0 = I gives D W = I - M0, so row r of W is (I - M0)[r] / D[r]. The division
    loses about log10(1 / (|D[r]| max|A|)) digits, so features with any small |D[r]| take
    the product instead.
    """
    scale = np.max(np.abs(sh.A))
    by_division = np.all(np.abs(D) * scale >= _DIVISION_MIN, axis=1)
    if by_division.all():
        return (np.eye(sh.q) - M0) / D[:, :, None]
    W = np.empty_like(M0)
    if by_division.any():
        Mi = M0[by_division]
        with np.errstate(divide="ignore"):
            W[by_division] = (np.eye(sh.q) - Mi) / D[by_division][:, :, None]
    if not by_division.all():
        W[~by_division] = sh.A @ M0[~by_division]
    return W


#: |D[r]| * max|A| above which W = A M0 is taken from I - M0 (relative error ~1e-13 or less).
_DIVISION_MIN = compiled.DIVISION_MIN


def _score_general(
    sh: SharedTerms, s: Array, zry: Array, yry: Array, *, final: bool = False
) -> _Score:
    m, q, K = s.shape[0], sh.q, sh.K
    s0 = s[:, -1]
    D = np.repeat(s[:, :-1] / s0[:, None], sh.d, axis=1)  # (m, q)
    M = inv_shifted(sh.zrz, D)
    M0 = M if sh.method == "REML" else inv_shifted(sh.ZZ, D)
    u = (zry[:, None, :] @ M)[:, 0, :]  # M' zry
    W = _times_A(sh, M0, D)
    M0t = np.swapaxes(M0, 1, 2)
    s02 = s0**2
    dl = np.empty((m, K + 1))
    F = np.empty((m, K + 1, K + 1))
    for i, Ii in enumerate(sh.slices):
        dl[:, i] = (np.sum(u[:, Ii] ** 2, axis=1) / s02 - trace(W[:, Ii, Ii]) / s0) / 2
        for j, Ij in enumerate(sh.slices[: i + 1]):
            F[:, i, j] = F[:, j, i] = np.sum(W[:, Ij, Ii] ** 2, axis=(1, 2)) / s02 / 2
        # tr (W M0)_ii without forming W M0: sum of W[Ii, :] * M0[:, Ii]'
        trW2 = np.sum(W[:, Ii, :] * M0t[:, Ii, :], axis=(1, 2))
        F[:, i, K] = F[:, K, i] = trW2 / s02 / 2
    nrq = sh.n - sh.r - q
    F[:, K, K] = (nrq + np.sum(M0 * M0t, axis=(1, 2))) / s02 / 2
    MDz = (M @ (D * zry)[:, :, None])[:, :, 0]
    yR2y = yry - np.sum((u + zry) * MDz, axis=1)
    dl[:, K] = (yR2y / s02 - (nrq + trace(M0)) / s0) / 2
    s0_prof = (yry - np.sum(zry * MDz, axis=1)) / (sh.n - sh.r)
    logdet = np.linalg.slogdet(M0)[1] if final else np.full(m, np.nan)
    return _Score(dl, F, s0_prof, logdet)


def _score_spectral(
    sh: SharedTerms, s: Array, z: Array, yry: Array, *, final: bool = False
) -> _Score:
    """K = 1: z = zry U (m, q), the projection of zry on the eigenvectors of zrz."""
    q = sh.q
    s0 = s[:, 1]
    rho = s[:, 0] / s0
    mvals = reciprocal(1.0 + rho[:, None] * sh.lam)  # eigenvalues of M
    if sh.method == "REML":
        avals, m0vals = sh.lam, mvals
    else:
        avals, m0vals = sh.mu, reciprocal(1.0 + rho[:, None] * sh.mu)
    wvals = avals * m0vals  # eigenvalues of W = A M0 (symmetric)
    z2 = z**2
    s02 = s0**2
    nrq = sh.n - sh.r - q
    dl = np.empty((s.shape[0], 2))
    F = np.empty((s.shape[0], 2, 2))
    dl[:, 0] = (np.sum(z2 * mvals**2, axis=1) / s02 - np.sum(wvals, axis=1) / s0) / 2
    F[:, 0, 0] = np.sum(wvals**2, axis=1) / s02 / 2
    F[:, 0, 1] = F[:, 1, 0] = np.sum(wvals * m0vals, axis=1) / s02 / 2
    F[:, 1, 1] = (nrq + np.sum(m0vals**2, axis=1)) / s02 / 2
    zMz = np.sum(z2 * mvals, axis=1)  # zry' M zry
    yR2y = yry - rho * (np.sum(z2 * mvals**2, axis=1) + zMz)
    dl[:, 1] = (yR2y / s02 - (nrq + np.sum(m0vals, axis=1)) / s0) / 2
    s0_prof = (yry - rho * zMz) / (sh.n - sh.r)
    with np.errstate(divide="ignore"):
        logdet = np.sum(np.log(np.abs(m0vals)), axis=1)
    return _Score(dl, F, s0_prof, logdet)
