"""Two random components whose Z'Z pairs their columns (K = 2): intercept and slope of one
factor, such as bench_fit's subject + subject x time and R FLASHMM's K = 2 case.

When Z_1'Z_1 and Z_2'Z_2 are diagonal and Z_1'Z_2 has at most one non-zero per row and per
column, Z'Z is block-diagonal after a permutation, with a 2 x 2 block for each pair
(a, b) of coupled columns and a 1 x 1 block for each column left alone. Then so is

    MD = (D ZZ + I)^-1 D,   pair: [[x (1 + y z_b), -x y n], [-x y n, y (1 + x z_a)]] / det
                            det = (1 + x z_a)(1 + y z_b) - x y n^2,   alone: x / (1 + x z_a)

(x, y the ratios of the components of a and b, n the coupling), so the fixed effects take
O(q) per feature for MD and O(q p^2) for C = XX - ZX' MD ZX (:func:`_normal_equations`)
instead of a q x q inverse and O(q^2 p) products per feature (:func:`fixed_effects`).

:func:`detect` finds the structure from ZZ alone (exact zeros), never from names.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from flashmm_dask.numerics.compiled import _compile
from flashmm_dask.numerics.compiled_dense import _dots_into
from flashmm_dask.numerics.linalg import Array
from flashmm_dask.numerics.structured import _is_diagonal

if TYPE_CHECKING:
    from flashmm_dask.numerics.fisher import SharedTerms
    from flashmm_dask.numerics.fixed import FixedFit


@dataclass(frozen=True)
class Pairs:
    """The paired structure of ZZ (:func:`detect`).

    Attributes
    ----------
    first, second : (n_pairs,) int
        The coupled columns: ``first`` of component 0, ``second`` of component 1.
    coupling : (n_pairs,) ZZ[first, second]
    z : (q,) the diagonal of ZZ
    comp : (q,) int, the component of each column
    ZX : (q, p) the shared ZX
    """

    first: np.ndarray
    second: np.ndarray
    coupling: Array
    z: Array
    comp: np.ndarray
    ZX: Array

    @cached_property
    def ZXt(self) -> Array:
        """(p, q) ZX', C-contiguous (the rows the kernel takes dot products of)."""
        return np.ascontiguousarray(self.ZX.T)


@functools.partial(_compile, reassoc=True)
def _normal_equations(
    XX: Array,
    ZXt: Array,
    first: np.ndarray,
    second: np.ndarray,
    md: Array,
    off: Array,
    XY: Array,
    ZY: Array,
) -> tuple[Array, Array]:
    """C = XX - ZX' MD ZX (m, p, p) and rhs = XY - ZX' MD ZY (m, p), one feature at a time
    (its result does not depend on the others of the block): Y = MD ZX (q, p) by the
    pairs, then dot products of the rows of ZX' and Y', four rows of ZX' a pass over Y'
    (:func:`.compiled_dense._dots_into`: at p = 21, q = 50 3.2 -> 2.9 us a feature, the
    same bits on bench_fit's K = 2 case)."""
    p, q = ZXt.shape
    m = md.shape[0]
    C = np.empty((m, p, p))
    rhs = np.empty((m, p))
    Yt = np.empty((p, q))
    G = np.empty((p, p))
    y = np.empty(q)
    for j in range(m):
        for r in range(p):
            for k in range(q):
                Yt[r, k] = md[j, k] * ZXt[r, k]
            for e in range(first.shape[0]):
                a, b = first[e], second[e]
                Yt[r, a] += off[j, e] * ZXt[r, b]
                Yt[r, b] += off[j, e] * ZXt[r, a]
        for k in range(q):
            y[k] = md[j, k] * ZY[j, k]
        for e in range(first.shape[0]):
            a, b = first[e], second[e]
            y[a] += off[j, e] * ZY[j, b]
            y[b] += off[j, e] * ZY[j, a]
        _dots_into(ZXt, Yt, G, True)
        for r in range(p):
            t = 0.0
            for k in range(q):
                t += ZXt[r, k] * y[k]
            rhs[j, r] = XY[j, r] - t
            for c in range(r, p):
                t = G[r, c]
                C[j, r, c] = XX[r, c] - t
                C[j, c, r] = XX[c, r] - t
    return C, rhs


def detect(ZZ: Array, d: np.ndarray, ZX: Array) -> Pairs | None:
    """The paired structure of ZZ, or None: K = 2, both diagonal blocks exactly diagonal,
    the coupling block with at most one non-zero per row and per column, and the lower
    coupling block its transpose."""
    d = np.asarray(d, dtype=np.int64)
    if len(d) != 2:
        return None
    q0 = int(d[0])
    if not (_is_diagonal(ZZ[:q0, :q0]) and _is_diagonal(ZZ[q0:, q0:])):
        return None
    N = np.asarray(ZZ[:q0, q0:])
    if not np.array_equal(N.T, ZZ[q0:, :q0]):
        return None
    nz = N != 0
    if np.any(nz.sum(axis=1) > 1) or np.any(nz.sum(axis=0) > 1):
        return None
    first, second = np.nonzero(nz)
    return Pairs(
        first=first.astype(np.int64),
        second=(second + q0).astype(np.int64),
        coupling=np.ascontiguousarray(N[first, second]),
        z=np.ascontiguousarray(np.diag(ZZ)),
        comp=np.repeat(np.arange(2), d),
        ZX=np.ascontiguousarray(ZX),
    )


def md_parts(pairs: Pairs, theta: Array) -> tuple[Array, Array, np.ndarray]:
    """MD of each feature: its diagonal (m, q), the pairs' off-diagonal entries (m, n_pairs)
    and ok (m,): False where a block is singular or an entry not finite."""
    s0 = theta[:, -1]
    D = theta[:, pairs.comp] / s0[:, None]  # (m, q)
    den = 1.0 + D * pairs.z
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        md = D / den
        a, b = pairs.first, pairs.second
        x, y = D[:, a], D[:, b]
        det = den[:, a] * den[:, b] - x * y * pairs.coupling**2
        md[:, a] = x * den[:, b] / det
        md[:, b] = y * den[:, a] / det
        off = -x * y * pairs.coupling / det
        ok = np.all(np.isfinite(md), axis=1) & np.all(np.isfinite(off), axis=1)
        ok &= np.all(den != 0.0, axis=1) & np.all(det != 0.0, axis=1)
    return md, off, ok


def md_times(pairs: Pairs, md: Array, off: Array, x: Array) -> Array:
    """MD x for x (m, q) of each feature."""
    out = md * x
    a, b = pairs.first, pairs.second
    out[:, a] += off * x[:, b]
    out[:, b] += off * x[:, a]
    return out


def fixed_effects(
    sh: SharedTerms,
    pairs: Pairs,
    XY: Array,
    ZY: Array,
    theta: Array,
    logdetM0: Array,
    *,
    fim: bool,
    re: bool,
) -> FixedFit:
    """:func:`.fixed.fixed_effects` through the paired structure; features whose MD has a
    singular block take the dense algebra (with its pseudo-inverses)."""
    from flashmm_dask.numerics import fixed  # fixed dispatches here: imported on use

    s0 = theta[:, -1]
    md, off, ok = md_parts(pairs, theta)
    md[~ok], off[~ok] = 0.0, 0.0  # refitted below
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        C, rhs = _normal_equations(
            np.ascontiguousarray(sh.XX),
            pairs.ZXt,
            pairs.first,
            pairs.second,
            md,
            off,
            np.ascontiguousarray(XY, dtype=np.float64),
            np.ascontiguousarray(ZY, dtype=np.float64),
        )
        FIM_beta = 0.5 * (C + np.swapaxes(C, 1, 2)) / s0[:, None, None] if fim else None
        coef, se, t, cov = fixed._solve(C, rhs, s0)
        RE = md_times(pairs, md, off, ZY - coef @ sh.ZX.T) if re else None
    logLik = fixed._loglik(sh, s0, logdetM0)
    out = fixed.FixedFit(coef=coef, cov=cov, FIM_beta=FIM_beta, RE=RE, logLik=logLik, se=se, t=t)
    if not ok.all():
        rest = fixed.fixed_effects(
            sh, XY[~ok], ZY[~ok], theta[~ok], logdetM0[~ok], fim=fim, re=re, structure=False
        )
        for name in ("coef", "cov", "FIM_beta", "RE", "logLik", "se", "t"):
            arr = getattr(out, name)
            if arr is not None:
                arr[~ok] = getattr(rest, name)
    return out
