"""Per-feature kernels of the fitter, compiled with numba (those of K = 1 in :mod:`.spectral`).

The batched NumPy algebra of :mod:`~flashmm_dask.numerics.fisher` makes several passes over
(m, q, q) stacks and calls LAPACK once per small matrix; for q = 50 that is dominated by
call overhead and memory traffic. These kernels do the same algebra one feature at a time
in compiled loops that stay in cache, and release the GIL so that blocks of features run in
parallel threads.

Every kernel reports, per feature, whether it succeeded (``ok``). A matrix with a zero
pivot, or a result that is not finite, is left to the NumPy path, which takes the
pseudo-inverse there exactly as before: the compiled kernels never change what is computed,
only how fast.

Inverses are by Gauss-Jordan elimination with partial pivoting, in place. For
``(diag(D) A + I)^-1`` with every D > 0 the symmetric form ``R (R A R + I)^-1 R^-1``
(R = diag(sqrt D)) is inverted, whose eigenvalues are all >= 1.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from flashmm_dask.numerics.jit import jit

#: |D[r]| * max|A| above which W = A M0 is taken from (I - M0) / D (see fisher._times_A).
DIVISION_MIN = 1e-3


#: IEEE semantics (1/0 = inf, as NumPy), no GIL, fused multiply-adds.
_OPTIONS: dict[str, Any] = {"nogil": True, "error_model": "numpy", "fastmath": {"contract"}}


def _compile(
    fn: Callable[..., Any], reassoc: bool = False, inline: bool = False, contract: bool = True
) -> Any:
    """``fn`` compiled by :func:`.jit.jit` with :data:`_OPTIONS`; ``reassoc`` also lets
    sums be reassociated (vectorised reductions); ``inline``: a helper inlined into the
    kernels that call it (no call in their inner loops); ``contract=False``: no fused
    multiply-adds (each product rounds as NumPy's; with ``reassoc`` still reassociated)."""
    options = dict(_OPTIONS)
    fastmath = {"contract"} if contract else set()
    if reassoc:
        fastmath.add("reassoc")
    if fastmath:
        options["fastmath"] = fastmath
    else:
        options.pop("fastmath")
    if inline:
        options["inline"] = "always"
    return jit(fn, **options)


@functools.partial(_compile, inline=True)
def w_row_divided(M: np.ndarray, a: int, d: float, out: np.ndarray) -> None:
    """Row ``a`` of W = A M = (I - M) / D into ``out``: (e_a - M[a]) / d, d = D[a]
    (M = (D A + I)^-1, taken so where |D[a]| max|A| >= DIVISION_MIN)."""
    r = 1.0 / d
    for b in range(M.shape[1]):
        out[b] = -M[a, b] * r
    out[a] = (1.0 - M[a, a]) * r


@_compile
def _gauss_jordan(a: np.ndarray, buf: np.ndarray, perm: np.ndarray) -> float:
    """Invert the square matrix ``a`` in place; return log |det a|, or NaN if singular.

    Gauss-Jordan elimination with partial (row) pivoting; the row interchanges are undone
    on the columns at the end. ``buf`` (q,) float64 and ``perm`` (q,) int64 are scratch.
    """
    q = a.shape[0]
    logdet = 0.0
    for k in range(q):
        if not _pivot_row(a, k, k, 0.0, False, perm):
            return np.nan
        p = a[k, k]
        logdet += np.log(abs(p))
        a[k, k] = 1.0
        r = 1.0 / p
        for j in range(q):
            buf[j] = a[k, j] * r
        for j in range(q):
            a[k, j] = buf[j]
        # eliminate column k from the other rows, two rows per sweep over buf
        i = 0 if k != 0 else 1
        while i < q:
            i2 = i + 1 if i + 1 != k else i + 2
            f = a[i, k]
            a[i, k] = 0.0
            if i2 < q:
                f2 = a[i2, k]
                a[i2, k] = 0.0
                for j in range(q):
                    b = buf[j]
                    a[i, j] -= f * b
                    a[i2, j] -= f2 * b
            else:
                for j in range(q):
                    a[i, j] -= f * buf[j]
            i = i2 + 1 if i2 + 1 != k else i2 + 2
    _unswap_columns(a, perm)
    return logdet


@functools.partial(_compile, inline=True)
def _pivot_row(
    a: np.ndarray, k: int, prev: int, shift: float, shifted: bool, perm: np.ndarray
) -> bool:
    """Partial pivoting at step k: the first row i >= k of the largest |a[i, k]| (with
    ``shifted``, |a[i, k] - a[i, prev] shift|: column k as the step before leaves it)
    swapped into row k and recorded in perm[k]; False where that value is zero or not
    finite."""
    q = a.shape[0]
    piv = k
    best = abs(a[k, k] - a[k, prev] * shift) if shifted else abs(a[k, k])
    for i in range(k + 1, q):
        v = abs(a[i, k] - a[i, prev] * shift) if shifted else abs(a[i, k])
        if v > best:
            best = v
            piv = i
    if not (best > 0.0 and best < np.inf):
        return False
    perm[k] = piv
    if piv != k:
        for j in range(q):
            t = a[k, j]
            a[k, j] = a[piv, j]
            a[piv, j] = t
    return True


@functools.partial(_compile, inline=True)
def _unswap_columns(a: np.ndarray, perm: np.ndarray) -> None:
    """Undo on the columns of an inverse the row interchanges ``perm`` of its elimination
    (perm[k]: the row swapped into row k at step k), last step first."""
    q = a.shape[0]
    for k in range(q - 1, -1, -1):
        c = perm[k]
        if c != k:
            for i in range(q):
                t = a[i, k]
                a[i, k] = a[i, c]
                a[i, c] = t


@_compile
def _inv_shifted_into(
    A: np.ndarray,
    D: np.ndarray,
    out: np.ndarray,
    buf: np.ndarray,
    buf2: np.ndarray,
    perm: np.ndarray,
) -> float:
    """out = (diag(D) A + I)^-1 for a symmetric A; return log |det(diag(D) A + I)| or NaN.

    ``buf``, ``buf2`` (q,) and ``perm`` (q,) int64 are scratch.
    """
    q = A.shape[0]
    positive = True
    zero = True
    for a in range(q):
        if not D[a] > 0.0:
            positive = False
        if D[a] != 0.0:
            zero = False
    if zero:
        for a in range(q):
            for b in range(q):
                out[a, b] = 0.0
            out[a, a] = 1.0
        return 0.0
    if positive:
        for a in range(q):
            buf[a] = np.sqrt(D[a])
        for a in range(q):
            for b in range(q):
                out[a, b] = buf[a] * A[a, b] * buf[b]
            out[a, a] += 1.0
        logdet = _gauss_jordan(out, buf2, perm)
        for a in range(q):
            for b in range(q):
                out[a, b] = buf[a] * out[a, b] / buf[b]
    else:
        for a in range(q):
            for b in range(q):
                out[a, b] = D[a] * A[a, b]
            out[a, a] += 1.0
        logdet = _gauss_jordan(out, buf, perm)
    if np.isnan(logdet):
        return np.nan
    for a in range(q):
        for b in range(q):
            if not np.isfinite(out[a, b]):
                return np.nan
    return logdet


@_compile
def _inv_shifted_batch(A: np.ndarray, D: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(diag(D_j) A + I)^-1 for each row D_j of D (m, q), and which rows succeeded."""
    m, q = D.shape
    out = np.empty((m, q, q))
    ok = np.empty(m, dtype=np.bool_)
    buf = np.empty(q)
    buf2 = np.empty(q)
    perm = np.empty(q, dtype=np.int64)
    for j in range(m):
        ok[j] = not np.isnan(_inv_shifted_into(A, D[j], out[j], buf, buf2, perm))
    return out, ok


@functools.partial(_compile, reassoc=True)
def _score_batch(
    A: np.ndarray,
    A0: np.ndarray,
    reml: bool,
    comp: np.ndarray,
    n_comp: int,
    s: np.ndarray,
    zry: np.ndarray,
    yry: np.ndarray,
    nrq: float,
    nr: float,
    final: bool,
    division_min: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Score, information, profiled s0 and log |det M0| of a block of features (general K).

    The algebra of ``fisher._score_general`` for each feature: A = zrz, A0 = zrz (REML) or
    ZZ (ML), ``comp[a]`` the component of random-effect column a, ``nrq`` = n - r - q and
    ``nr`` = n - r. Returns dl (m, K+1), F (m, K+1, K+1), s0_profiled (m,), logdetM0 (m,)
    (NaN unless ``final``) and ok (m,).
    """
    m, q = zry.shape
    K = n_comp
    dl = np.empty((m, K + 1))
    F = np.empty((m, K + 1, K + 1))
    s0p = np.empty(m)
    logdet = np.full(m, np.nan)
    ok = np.ones(m, dtype=np.bool_)
    M = np.empty((q, q))
    M0 = np.empty((q, q)) if not reml else M
    M0t = np.empty((q, q))
    edges = np.zeros(K + 1, dtype=np.int64)
    for a in range(q):
        edges[comp[a] + 1] = a + 1
    W = np.empty(q)
    D = np.empty(q)
    u = np.empty(q)
    buf = np.empty(q)
    buf2 = np.empty(q)
    perm = np.empty(q, dtype=np.int64)
    dl_u = np.empty(K)
    trW = np.empty(K)
    blocks = np.empty((K, K))
    trw = np.empty(K)
    scale = 0.0
    for a in range(q):
        for b in range(q):
            scale = max(scale, abs(A0[a, b]))
    for j in range(m):
        s0 = s[j, K]
        division = True
        for a in range(q):
            D[a] = s[j, comp[a]] / s0
            if not abs(D[a]) * scale >= division_min:
                division = False
        ld = _inv_shifted_into(A, D, M, buf, buf2, perm)
        if np.isnan(ld):
            ok[j] = False
            continue
        if not reml:
            ld = _inv_shifted_into(A0, D, M0, buf, buf2, perm)
            if np.isnan(ld):
                ok[j] = False
                continue
        if final:
            logdet[j] = -ld
        # u = M' zry; M D zry
        for b in range(q):
            u[b] = 0.0
        zMDz = 0.0
        yR2y = yry[j]
        for a in range(q):
            za = zry[j, a]
            mdz = 0.0
            for b in range(q):
                u[b] += za * M[a, b]
                mdz += M[a, b] * D[b] * zry[j, b]
            buf[a] = mdz
            zMDz += za * mdz
        for a in range(q):
            yR2y -= (u[a] + zry[j, a]) * buf[a]
        # W = A0 M0, one row at a time; block sums of W^2, tr (W M0)_ii, tr W_ii
        for a in range(q):
            for b in range(q):
                M0t[a, b] = M0[b, a]
        for i in range(K):
            trw[i] = 0.0
            dl_u[i] = 0.0
            trW[i] = 0.0
            for k in range(K):
                blocks[i, k] = 0.0
        trM0 = 0.0
        trM0M0 = 0.0
        for a in range(q):
            ca = comp[a]
            if division:
                w_row_divided(M0, a, D[a], W)
            else:
                for b in range(q):
                    W[b] = 0.0
                for c in range(q):
                    f = A0[a, c]
                    for b in range(q):
                        W[b] += f * M0[c, b]
            trW[ca] += W[a]
            dl_u[ca] += u[a] * u[a]
            trM0 += M0[a, a]
            tw = 0.0
            tm = 0.0
            for b in range(q):
                tw += W[b] * M0t[a, b]
                tm += M0[a, b] * M0t[a, b]
            trw[ca] += tw
            trM0M0 += tm
            for k in range(K):
                sq = 0.0
                for b in range(edges[k], edges[k + 1]):
                    sq += W[b] * W[b]
                blocks[ca, k] += sq
        s02 = s0 * s0
        for i in range(K):
            dl[j, i] = (dl_u[i] / s02 - trW[i] / s0) / 2.0
            for k in range(i + 1):
                F[j, i, k] = F[j, k, i] = blocks[k, i] / s02 / 2.0
            F[j, i, K] = F[j, K, i] = trw[i] / s02 / 2.0
        F[j, K, K] = (nrq + trM0M0) / s02 / 2.0
        dl[j, K] = (yR2y / s02 - (nrq + trM0) / s0) / 2.0
        s0p[j] = (yry[j] - zMDz) / nr
    return dl, F, s0p, logdet, ok


@_compile
def _rowsums(a: np.ndarray) -> np.ndarray:
    m, n = a.shape
    out = np.empty(m)
    for j in range(m):
        t = 0.0
        for i in range(n):
            t += a[j, i]
        out[j] = t
    return out


def rowsums(a: np.ndarray) -> np.ndarray:
    """Sums over all but the leading axis, in the same order for every row whatever the
    number of rows (NumPy's reductions round differently for different batch shapes, and
    the fit of a feature must not depend on its block)."""
    a = np.asarray(a, dtype=np.float64)
    return _rowsums(np.ascontiguousarray(a.reshape(a.shape[0], -1)))


def inv_shifted_batch(A: np.ndarray, D: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(diag(D_j) A + I)^-1 (m, q, q) for a shared symmetric A, and ok (m,) per row D_j."""
    return _inv_shifted_batch(np.ascontiguousarray(A), np.ascontiguousarray(D))


def score_batch(
    A: np.ndarray,
    A0: np.ndarray,
    reml: bool,
    d: np.ndarray,
    s: np.ndarray,
    zry: np.ndarray,
    yry: np.ndarray,
    n: float,
    r: int,
    final: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """dl, F, s0_profiled, logdetM0 and ok of a block of features; see :func:`_score_batch`."""
    q = A.shape[0]
    comp = np.repeat(np.arange(len(d)), d).astype(np.int64)
    return _score_batch(
        np.ascontiguousarray(A),
        np.ascontiguousarray(A0),
        bool(reml),
        comp,
        len(d),
        np.ascontiguousarray(s),
        np.ascontiguousarray(zry),
        np.ascontiguousarray(yry),
        float(n - r - q),
        float(n - r),
        bool(final),
        DIVISION_MIN,
    )
