"""Gauss-Jordan inversion of a positive definite matrix, four pivots per sweep
(:func:`_gauss_jordan_spd`): the K = 2 kernel's I + b T, beside F' (:mod:`.compiled_k`).

Without pivoting (a symmetric matrix is positive definite exactly when all its pivots
without interchanges are, and elimination without them is then stable) the pivot rows of
four steps are eliminated among themselves first, then every other row takes the four
steps in one pass, a[i] -= f0 r0 + f1 r1 + f2 r2 + f3 r3, four rows at a time: each pass
loads the four pivot rows once for four rows and stores each row once for four steps
(:func:`.compiled_dense._gauss_jordan_pairs`: two steps a pass, and five passes over the
pivot rows per pair of steps against two per step here). In the K = 2 kernel, with
[I + b T | F'] padded to 56 columns (no scalar tail in the row loops), the elimination
takes 2.9 instead of 3.5 us (measured, one thread, load 3); rows of 25 columns gain
nothing.

The operations of each entry are those of one pivot at a time in the same order, so the
result is bit for bit that of :func:`.compiled_dense._gauss_jordan_pairs` without
pivoting (checked in ``tests/test_compiled_spd.py``).
"""

from __future__ import annotations

import functools

import numpy as np

from flashmm_dask.numerics.compiled import _compile


@_compile
def _pivot_rows(
    a: np.ndarray, k: int, nb: int, R: np.ndarray, c: np.ndarray, with_log: bool, logdet: float
) -> float:
    """Steps k .. k + nb - 1 (nb <= 4) on the pivot rows k .. k + nb - 1 alone, one pass
    over a row per step and one per row left: R[t] = row k + t as step k + t scales it,
    less its columns k + u, u > t (each reset by its own step: zero in R, c[t, u] keeps
    them), and the rows of ``a`` as all nb steps leave them (c[4] is scratch). Returns
    ``logdet`` plus log |pivot| of each step (unchanged without ``with_log``), NaN where a
    pivot is not positive and finite."""
    nc = a.shape[1]
    f = c[4]  # the multipliers of the row at hand
    for t in range(nb):
        kt = k + t
        # the row's columns k .. k + nb - 1 as the steps before t leave them, in order
        for u in range(nb):
            x = a[kt, k + u]
            for s in range(min(u, t)):
                x -= f[s] * c[s, u]
            if u < t:
                f[u] = x
            else:
                c[t, u] = x
        p = c[t, t]
        if not (p > 0.0 and p < np.inf):
            return np.nan
        if with_log:
            logdet += np.log(abs(p))
        r = 1.0 / p
        for u in range(t):  # reset by its step: only that step and the later ones add
            a[kt, k + u] = 0.0
        if t == 0:
            for j in range(nc):
                R[0, j] = a[kt, j] * r
        elif t == 1:
            f0 = f[0]
            for j in range(nc):
                R[1, j] = (a[kt, j] - f0 * R[0, j]) * r
        elif t == 2:
            f0, f1 = f[0], f[1]
            for j in range(nc):
                R[2, j] = (a[kt, j] - f0 * R[0, j] - f1 * R[1, j]) * r
        else:
            f0, f1, f2 = f[0], f[1], f[2]
            for j in range(nc):
                R[3, j] = (a[kt, j] - f0 * R[0, j] - f1 * R[1, j] - f2 * R[2, j]) * r
        R[t, kt] = r  # the pivot set to 1, then scaled
        c[t, t] = r
        for u in range(t + 1, nb):
            c[t, u] = c[t, u] * r
            R[t, k + u] = 0.0
    # row k + t after the steps t + 1 .. nb - 1 (its columns k + u, u > t, reset by them)
    for t in range(nb):
        kt = k + t
        for u in range(t + 1, nb):
            x = c[t, u]
            for s in range(t + 1, u):
                x -= f[s] * c[s, u]
            f[u] = x
        g1 = f[1] if t < 1 else 0.0
        g2 = f[2] if t < 2 else 0.0
        g3 = f[3] if t < 3 else 0.0
        if t + 1 >= nb:
            for j in range(nc):
                a[kt, j] = R[t, j]
        elif nb - t == 2:
            g = f[t + 1]
            for j in range(nc):
                a[kt, j] = R[t, j] - g * R[t + 1, j]
        elif nb - t == 3:
            g, h = f[t + 1], f[t + 2]
            for j in range(nc):
                a[kt, j] = R[t, j] - g * R[t + 1, j] - h * R[t + 2, j]
        else:
            for j in range(nc):
                a[kt, j] = R[0, j] - g1 * R[1, j] - g2 * R[2, j] - g3 * R[3, j]
    return logdet


@functools.partial(_compile, inline=True)
def _factors(a: np.ndarray, i: int, k: int, c: np.ndarray) -> tuple[float, float, float, float]:
    """Row i's multipliers of the steps k .. k + 3 (its columns k .. k + 3 as each step
    finds them; c from :func:`_pivot_rows`), those columns set to zero."""
    f0 = a[i, k]
    f1 = a[i, k + 1] - f0 * c[0, 1]
    f2 = a[i, k + 2] - f0 * c[0, 2] - f1 * c[1, 2]
    f3 = a[i, k + 3] - f0 * c[0, 3] - f1 * c[1, 3] - f2 * c[2, 3]
    a[i, k] = 0.0
    a[i, k + 1] = 0.0
    a[i, k + 2] = 0.0
    a[i, k + 3] = 0.0
    return f0, f1, f2, f3


@functools.partial(_compile, inline=True)
def _other(t: int, k: int, nb: int) -> int:
    """The t-th row outside the pivot rows k .. k + nb - 1."""
    return t if t < k else t + nb


@_compile
def _sweep4(a: np.ndarray, k: int, R: np.ndarray, c: np.ndarray) -> None:
    """The four steps k .. k + 3 on every row outside them, four rows a pass (then one at
    a time), from :func:`_pivot_rows`'s R and c."""
    nc = a.shape[1]
    n = a.shape[0] - 4
    t = 0
    while t + 3 < n:
        r0, r1 = _other(t, k, 4), _other(t + 1, k, 4)
        r2, r3 = _other(t + 2, k, 4), _other(t + 3, k, 4)
        f0, f1, f2, f3 = _factors(a, r0, k, c)
        g0, g1, g2, g3 = _factors(a, r1, k, c)
        h0, h1, h2, h3 = _factors(a, r2, k, c)
        e0, e1, e2, e3 = _factors(a, r3, k, c)
        for j in range(nc):
            x0 = R[0, j]
            x1 = R[1, j]
            x2 = R[2, j]
            x3 = R[3, j]
            a[r0, j] = a[r0, j] - f0 * x0 - f1 * x1 - f2 * x2 - f3 * x3
            a[r1, j] = a[r1, j] - g0 * x0 - g1 * x1 - g2 * x2 - g3 * x3
            a[r2, j] = a[r2, j] - h0 * x0 - h1 * x1 - h2 * x2 - h3 * x3
            a[r3, j] = a[r3, j] - e0 * x0 - e1 * x1 - e2 * x2 - e3 * x3
        t += 4
    while t < n:
        r0 = _other(t, k, 4)
        f0, f1, f2, f3 = _factors(a, r0, k, c)
        for j in range(nc):
            a[r0, j] = a[r0, j] - f0 * R[0, j] - f1 * R[1, j] - f2 * R[2, j] - f3 * R[3, j]
        t += 1


@_compile
def _sweep1(a: np.ndarray, k: int, R: np.ndarray) -> None:
    """Step k on every row but k, from its pivot row R[0], four rows a pass."""
    nc = a.shape[1]
    n = a.shape[0] - 1
    t = 0
    while t + 3 < n:
        r0, r1 = _other(t, k, 1), _other(t + 1, k, 1)
        r2, r3 = _other(t + 2, k, 1), _other(t + 3, k, 1)
        f0, f1, f2, f3 = a[r0, k], a[r1, k], a[r2, k], a[r3, k]
        a[r0, k] = 0.0
        a[r1, k] = 0.0
        a[r2, k] = 0.0
        a[r3, k] = 0.0
        for j in range(nc):
            x = R[0, j]
            a[r0, j] -= f0 * x
            a[r1, j] -= f1 * x
            a[r2, j] -= f2 * x
            a[r3, j] -= f3 * x
        t += 4
    while t < n:
        r0 = _other(t, k, 1)
        f0 = a[r0, k]
        a[r0, k] = 0.0
        for j in range(nc):
            a[r0, j] -= f0 * R[0, j]
        t += 1


@_compile
def _gauss_jordan_spd(a: np.ndarray, R: np.ndarray, c: np.ndarray, with_log: bool) -> float:
    """``a`` (q, nc), nc >= q, = [S | B] -> [S^-1 | S^-1 B] in place by Gauss-Jordan without
    pivoting, four steps a sweep (one at a time for the last q mod 4); returns log |det S|
    (0.0 without ``with_log``), or NaN as soon as a pivot is not positive and finite
    (``a`` is then left part-way: the caller inverts a copy with pivoting). ``R`` (4, nc)
    and ``c`` (5, 4) are scratch."""
    q = a.shape[0]
    logdet = 0.0
    k = 0
    while k < q:
        nb = 4 if k + 4 <= q else 1
        logdet = _pivot_rows(a, k, nb, R, c, with_log, logdet)
        if np.isnan(logdet):
            return np.nan
        if nb == 4:
            _sweep4(a, k, R, c)
        else:
            _sweep1(a, k, R)
        k += nb
    return logdet
