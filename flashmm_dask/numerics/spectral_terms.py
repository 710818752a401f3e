"""Compiled K = 1 terms around the scoring, on the eigenvalues of the design.

After :mod:`.spectral` has fitted theta, the K = 1 path still needs, per feature, sums
and weights over the q eigenvalues: the score and information of the full model at a
boundary fit (:func:`score_batch`, ``boundary.full_score``), the observed information of
Satterthwaite's df (:func:`observed_information_batch`) and the eigenvalue weights of the
fixed effects (:func:`shifted_reciprocal`). In NumPy each is a dozen passes over (m, q)
temporaries, which at small p cost more than the whole scoring loop; here each is one
compiled pass per feature, on the projections z = U' zry the scoring already made.

The NumPy functions they replace stay the reference (``fisher._score_spectral``,
``satterthwaite._information_spectral``), and tests hold the kernels to them.

Also here, the eigendecompositions of the shared terms (:func:`eigh_one_thread`) and the
products with the eigenvectors of ZZ where ZZ is diagonal (:func:`signed_permutation`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from flashmm_dask.numerics.compiled import _compile
from flashmm_dask.numerics.spectral import _spectral_score, eigen_terms
from flashmm_dask.numerics.structured import one_blas_thread

if TYPE_CHECKING:
    from flashmm_dask.numerics.fisher import SharedTerms

#: The weights of :func:`shifted_reciprocal`: 1 / (1 + rho v), times rho, or squared.
WEIGHTS = ("plain", "times_rho", "squared")


#: Order up to which an eigendecomposition of the shared terms holds BLAS to one thread.
EIGH_ONE_THREAD_MAX = 1024


def _small_on_one_thread(decompose: Callable[[np.ndarray], Any], A: np.ndarray) -> Any:
    if A.shape[0] > EIGH_ONE_THREAD_MAX:
        return decompose(A)
    with one_blas_thread():
        return decompose(A)


def eigh_one_thread(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.linalg.eigh of a symmetric (q, q) matrix, with BLAS held to one thread up to
    order :data:`EIGH_ONE_THREAD_MAX`: at q = 259 the threaded decomposition took 9-20x
    the wall time of one thread on a machine whose cores were busy (the driver of a run
    prepares each stratum's terms while the workers fit); at these orders a second
    thread gains little even on an idle machine."""
    return _small_on_one_thread(np.linalg.eigh, A)


def eigvalsh_one_thread(A: np.ndarray) -> np.ndarray:
    """np.linalg.eigvalsh of a symmetric (q, q) matrix, on one BLAS thread up to order
    :data:`EIGH_ONE_THREAD_MAX`, as :func:`eigh_one_thread`."""
    return _small_on_one_thread(np.linalg.eigvalsh, A)


def signed_permutation(V: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows, signs) where the (q, q) V is a signed permutation matrix, so that
    (x V)[:, k] = signs[k] x[:, rows[k]]; None otherwise. The eigenvectors of a diagonal
    ZZ (the indicators of one factor) are so: LAPACK returns them as exact unit vectors."""
    nonzero = V != 0
    if not (nonzero.sum(axis=0) == 1).all():
        return None
    rows = np.argmax(nonzero, axis=0)
    signs = V[rows, np.arange(V.shape[1])]
    return (rows, signs) if np.all(np.abs(signs) == 1.0) else None


def times_basis(
    x: np.ndarray, V: np.ndarray, perm: tuple[np.ndarray, np.ndarray] | None
) -> np.ndarray:
    """x @ V for x (m, q), by a column gather where ``perm`` (:func:`signed_permutation`
    of V) is given: the same values as the product, whose other terms are exact zeros."""
    if perm is None:
        return x @ V
    rows, signs = perm
    out = np.take(x, rows, axis=1)
    if not np.all(signs == 1.0):
        out *= signs
    return out


#: Compiled without fused multiply-adds: each product and sum rounds as in the NumPy
#: expression it replaces (only the order of the sums over eigenvalues differs).
_exact = functools.partial(_compile, contract=False)


@_exact
def _shifted_reciprocal(rho: np.ndarray, v: np.ndarray, kind: int) -> np.ndarray:
    m, q = rho.shape[0], v.shape[0]
    out = np.empty((m, q))
    for j in range(m):
        r = rho[j]
        for k in range(q):
            x = 1.0 + r * v[k]
            y = 1.0 / x if x != 0.0 else 0.0
            if kind == 1:
                y = r * y
            elif kind == 2:
                y = y * y
            out[j, k] = y
    return out


def shifted_reciprocal(rho: np.ndarray, v: np.ndarray, kind: str = "plain") -> np.ndarray:
    """(m, q) weights of the eigenvalues v (q,) at rho (m,): ``linalg.reciprocal(1 + rho v)``
    ("plain"), that times rho ("times_rho", the eigenvalues of M D) or squared ("squared"),
    in one pass and to the last bit NumPy's values."""
    return _shifted_reciprocal(
        np.ascontiguousarray(rho, dtype=np.float64),
        np.ascontiguousarray(v, dtype=np.float64),
        WEIGHTS.index(kind),
    )


# 1 + rho lam rounded as NumPy's (a fused one differs where it is near 0); the sums over
# the eigenvalues reassociated (vectorised: 2x faster)
@functools.partial(_compile, contract=False, reassoc=True)
def _observed_information(
    lam: np.ndarray,
    mu: np.ndarray,
    reml: bool,
    z: np.ndarray,
    yry: np.ndarray,
    theta: np.ndarray,
    n_trace: float,
) -> np.ndarray:
    m, q = z.shape
    info = np.empty((m, 2, 2))
    for j in range(m):
        s0 = theta[j, 1]
        rho = theta[j, 0] / s0
        t00 = 0.0  # trace terms T of the Gram matrix of the model (zrz or ZZ)
        t01 = 0.0
        t11 = 0.0
        lin = 0.0  # sum z2 (2 rho mv - (rho mv)^2 lam), of a'a
        c3 = 0.0  # sum z2 mv^3
        l3 = 0.0  # sum z2 lam mv^3
        for k in range(q):
            mv, g, mg = eigen_terms(rho, lam[k], mu[k], reml)
            gm = g * mg
            t00 += gm * gm
            t01 += g * mg * mg
            t11 += mg * mg
            z2 = z[j, k] * z[j, k]
            rm = rho * mv
            lin += z2 * (2.0 * rm - rm * rm * lam[k])
            mv3 = mv * mv * mv
            c3 += z2 * mv3
            l3 += z2 * lam[k] * mv3
        s02 = s0 * s0
        s03 = s02 * s0
        aa = (yry[j] - lin) / s02
        aHa = (aa - rho * c3 / s02) / s0
        info[j, 0, 0] = l3 / s03 - t00 / s02 / 2.0
        info[j, 0, 1] = info[j, 1, 0] = c3 / s03 - t01 / s02 / 2.0
        info[j, 1, 1] = aHa - (n_trace - q + t11) / s02 / 2.0
    return info


def observed_information_batch(
    sh: SharedTerms, z: np.ndarray, yry: np.ndarray, theta: np.ndarray
) -> np.ndarray:
    """K = 1 observed information of theta (m, 2), (m, 2, 2), from the projections z (m, q)
    of zry on the eigenvectors of zrz: the sums of ``satterthwaite._information_spectral``
    in one pass per feature."""
    reml = sh.method == "REML"
    return _observed_information(
        np.ascontiguousarray(sh.lam),
        np.ascontiguousarray(sh.mu),
        reml,
        np.ascontiguousarray(z, dtype=np.float64),
        np.ascontiguousarray(yry, dtype=np.float64),
        np.ascontiguousarray(theta, dtype=np.float64),
        float(sh.n - sh.p if reml else sh.n),  # the rows of the trace terms' model
    )


@_compile
def _score_batch(
    lam: np.ndarray,
    mu: np.ndarray,
    reml: bool,
    z: np.ndarray,
    s: np.ndarray,
    yry: np.ndarray,
    nrq: float,
    nr: float,
    final: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    m, q = z.shape
    dl = np.empty((m, 2))
    F = np.empty((m, 2, 2))
    s0p = np.empty(m)
    logdet = np.empty(m)
    z2 = np.empty(q)
    sc = np.empty(7)
    for j in range(m):
        for k in range(q):
            z2[k] = z[j, k] * z[j, k]
        s0 = s[j, 1]
        _spectral_score(s[j, 0] / s0, s0, lam, mu, reml, z2, yry[j], nrq, nr, sc, final)
        dl[j, 0] = sc[0]
        dl[j, 1] = sc[1]
        F[j, 0, 0] = sc[2]
        F[j, 0, 1] = F[j, 1, 0] = sc[3]
        F[j, 1, 1] = sc[4]
        s0p[j] = sc[5]
        logdet[j] = sc[6] if final else np.nan
    return dl, F, s0p, logdet


def score_batch(
    sh: SharedTerms, z: np.ndarray, s: np.ndarray, yry: np.ndarray, final: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """dl (m, 2), F (m, 2, 2), the profiled s0 (m,) and log |det M0| (m,; NaN unless
    ``final``) of the K = 1 model at s (m, 2), from z = zry U (m, q):
    ``fisher._score_spectral`` by the scoring kernel's own sums."""
    return _score_batch(
        np.ascontiguousarray(sh.lam),
        np.ascontiguousarray(sh.mu),
        sh.method == "REML",
        np.ascontiguousarray(z, dtype=np.float64),
        np.ascontiguousarray(s, dtype=np.float64),
        np.ascontiguousarray(yry, dtype=np.float64),
        float(sh.n - sh.r - sh.q),
        float(sh.n - sh.r),
        bool(final),
    )
