"""Small dense kernels of the compiled K = 2 path (:mod:`.compiled_k`): dot products of
rows two at a time, Gauss-Jordan inversion with two pivots per sweep (of S, or of S
beside a block B: [S | B] -> [S^-1 | S^-1 B]), a 3 x 3
pseudo-inverse by pinv_sym's rule, and the residualisation of a block one feature at a
time; and the checked inverse every path shares (:func:`_inverse_checked_into`: the
information of the compiled fits, :func:`solve_batch`: the fixed effects' C, 21 x 21 at
bench_fit's p, 4.0 -> 3.2 us a feature), by the same two-pivot Gauss-Jordan (the bits of
one pivot at a time).

At 25 x 25 these kernels are bound by the loads and stores of their rows, not by the
multiply-adds: each shares every row it loads between two rows of the result (measured:
products 2.4x, the inverse 1.4x faster than one row at a time; the inverse four rows a
pass where four are left and rows have at most 50 columns, 2.9 -> 2.65 us at 25 x 25),
with the operations of each entry in the same order.
"""

from __future__ import annotations

import functools

import numpy as np

from flashmm_dask.numerics.compiled import _compile, _pivot_row, _unswap_columns


@functools.partial(_compile, reassoc=True)
def _dots_into(A: np.ndarray, B: np.ndarray, out: np.ndarray, upper: bool) -> None:
    """out[r, s] = A[r] . B[s], dot products of contiguous rows, two rows of A per pass
    over B (each row of B is loaded once for both: at 25 x 25 2.4x faster than a
    row-by-row axpy, out[i] += A[i, c] B[c], measured); with ``upper`` only s >= r (the
    rest of ``out`` left as it is: then four rows of A a pass, 0.98 -> 0.78 us at 25 x 25,
    measured; the full product gains nothing from four). Each entry is summed in the same
    order either way (the same bits, checked)."""
    n, k = A.shape
    ns = B.shape[0]
    r = 0
    while upper and r + 3 < n:
        for s in range(r, ns):
            t0 = 0.0
            t1 = 0.0
            t2 = 0.0
            t3 = 0.0
            for c in range(k):
                x = B[s, c]
                t0 += A[r, c] * x
                t1 += A[r + 1, c] * x
                t2 += A[r + 2, c] * x
                t3 += A[r + 3, c] * x
            out[r, s] = t0
            if s > r:
                out[r + 1, s] = t1
            if s > r + 1:
                out[r + 2, s] = t2
            if s > r + 2:
                out[r + 3, s] = t3
        r += 4
    while r + 1 < n:
        for s in range(r if upper else 0, ns):
            t0 = 0.0
            t1 = 0.0
            for c in range(k):
                x = B[s, c]
                t0 += A[r, c] * x
                t1 += A[r + 1, c] * x
            out[r, s] = t0
            if not upper or s > r:
                out[r + 1, s] = t1
        r += 2
    if r < n:
        for s in range(r if upper else 0, ns):
            t = 0.0
            for c in range(k):
                t += A[r, c] * B[s, c]
            out[r, s] = t


@functools.partial(_compile, inline=True)
def _scale_pivot_row(a: np.ndarray, k: int, out: np.ndarray, with_log: bool) -> float:
    """out = row k of ``a`` (all its columns) divided by its pivot a[k, k] (with a[k, k]
    set to 1 first, as Gauss-Jordan's inverse takes it); log |pivot| with ``with_log``,
    else 0.0."""
    p = a[k, k]
    a[k, k] = 1.0
    r = 1.0 / p
    for j in range(a.shape[1]):
        out[j] = a[k, j] * r
    return np.log(abs(p)) if with_log else 0.0


@functools.partial(_compile, inline=True)
def _positive_pivot(
    a: np.ndarray, k: int, prev: int, shift: float, shifted: bool, perm: np.ndarray
) -> bool:
    """:func:`.compiled._pivot_row` without the search: row k stays the pivot row
    (perm[k] = k); False unless its pivot (with ``shifted``, a[k, k] - a[k, prev] shift:
    as the step before leaves it) is positive and finite."""
    perm[k] = k
    v = a[k, k] - a[k, prev] * shift if shifted else a[k, k]
    return v > 0.0 and v < np.inf


@functools.partial(_compile, inline=True)
def _swap_tail(a: np.ndarray, k: int, perm: np.ndarray) -> None:
    """The columns of ``a`` right of its square part (q, q) swapped between rows k and
    perm[k], as :func:`.compiled._pivot_row` swaps the square part."""
    q = a.shape[0]
    c = perm[k]
    if c != k:
        for j in range(q, a.shape[1]):
            t = a[k, j]
            a[k, j] = a[c, j]
            a[c, j] = t


@functools.partial(_compile, inline=True)
def _next_other(i: int, k: int, k1: int) -> int:
    """The row after i that is neither k nor k1 (the pivot rows of a sweep)."""
    i += 1
    while i == k or i == k1:
        i += 1
    return i


@_compile
def _gauss_jordan_pairs(
    a: np.ndarray,
    r0: np.ndarray,
    r1: np.ndarray,
    perm: np.ndarray,
    with_log: bool,
    pivoting: bool = True,
) -> float:
    """:func:`.compiled._gauss_jordan` (in place, partial pivoting; log |det a| or NaN if
    singular) with two pivots per sweep over the other rows: step k's pivot row, then
    step k + 1's pivot chosen on column k + 1 as step k leaves it, and each other row
    updated by both at once, a[i] -= f_i r0 + g_i r1 (the same operations in the same
    order as one pivot per sweep, with half the loads and stores of the rows: at 25 x 25
    the elimination is bound by them). ``r0``, ``r1`` (nc,) and ``perm`` (q,) are scratch.
    Without ``with_log`` the result is 0.0 where a is not singular (no logarithms).

    ``a`` may be (q, nc) with nc > q, [S | B]: its square part S becomes S^-1 and the
    columns right of it S^-1 B, by the same row operations (the square part's values are
    those of the square inversion, bit for bit). At q = 25, [S | F'] (nc = 50) takes
    ~0.6 us less than the inverse and the product S^-1 F' apart (rows twice as long
    share the loop overhead; measured).

    Without ``pivoting`` (for a symmetric ``a``) the rows keep their order and the result
    is NaN as soon as a pivot is not positive: a symmetric matrix is positive definite
    exactly when all its pivots without interchanges are, and elimination without them
    is then stable (as Cholesky's). The search for the pivots is ~20% of the inverse at
    25 x 25 (measured); the caller inverts with ``pivoting`` where this fails (``a`` is
    then overwritten: it keeps a copy)."""
    q = a.shape[0]
    nc = a.shape[1]
    logdet = 0.0
    k = 0
    while k < q:
        # step k: pivot, swap, scale row k into r0
        if pivoting:
            if not _pivot_row(a, k, k, 0.0, False, perm):
                return np.nan
            _swap_tail(a, k, perm)
        elif not _positive_pivot(a, k, k, 0.0, False, perm):
            return np.nan
        logdet += _scale_pivot_row(a, k, r0, with_log)
        if k + 1 == q:  # the last pivot alone
            for j in range(nc):
                a[k, j] = r0[j]
            for i in range(k):
                f = a[i, k]
                a[i, k] = 0.0
                for j in range(nc):
                    a[i, j] -= f * r0[j]
            break
        k1 = k + 1
        # step k + 1: its column after step k, pivot, swap (rows below k are untouched)
        if pivoting:
            if not _pivot_row(a, k1, k, r0[k1], True, perm):
                return np.nan
            _swap_tail(a, k1, perm)
        elif not _positive_pivot(a, k1, k, r0[k1], True, perm):
            return np.nan
        # row k + 1 after step k, then scaled into r1
        f = a[k1, k]
        a[k1, k] = 0.0
        for j in range(nc):
            a[k1, j] -= f * r0[j]
        if not pivoting and not a[k1, k1] > 0.0:  # as computed (the check above rounds apart)
            return np.nan
        logdet += _scale_pivot_row(a, k1, r1, with_log)
        # row k: r0 less its step k + 1 part
        g = r0[k1]
        for j in range(nc):
            a[k, j] = r0[j]
        a[k, k1] = 0.0
        for j in range(nc):
            a[k, j] -= g * r1[j]
        for j in range(nc):
            a[k1, j] = r1[j]
        r0k1 = r0[k1]
        r0[k1] = 0.0  # column k + 1 of the other rows takes -g r1 only
        # the other rows, both steps in one sweep: a_i -= f_i r0 + g_i r1
        # (four rows per pass over r0 and r1 where four are left and rows are short, else
        # two, else one: four were 6% slower at 60 x 60, faster at 21 to 50 columns)
        four = nc <= 50
        i = _next_other(-1, k, k1)
        while i < q:
            i2 = _next_other(i, k, k1)
            i3 = _next_other(i2, k, k1)
            i4 = _next_other(i3, k, k1)
            f = a[i, k]
            g = a[i, k1] - f * r0k1
            a[i, k] = 0.0
            a[i, k1] = 0.0
            if four and i4 < q:
                f2 = a[i2, k]
                g2 = a[i2, k1] - f2 * r0k1
                a[i2, k] = 0.0
                a[i2, k1] = 0.0
                f3 = a[i3, k]
                g3 = a[i3, k1] - f3 * r0k1
                a[i3, k] = 0.0
                a[i3, k1] = 0.0
                f4 = a[i4, k]
                g4 = a[i4, k1] - f4 * r0k1
                a[i4, k] = 0.0
                a[i4, k1] = 0.0
                for j in range(nc):
                    x = r0[j]
                    y = r1[j]
                    a[i, j] = a[i, j] - f * x - g * y
                    a[i2, j] = a[i2, j] - f2 * x - g2 * y
                    a[i3, j] = a[i3, j] - f3 * x - g3 * y
                    a[i4, j] = a[i4, j] - f4 * x - g4 * y
                i = _next_other(i4, k, k1)
            elif i2 < q:
                f2 = a[i2, k]
                g2 = a[i2, k1] - f2 * r0k1
                a[i2, k] = 0.0
                a[i2, k1] = 0.0
                for j in range(nc):
                    x = r0[j]
                    y = r1[j]
                    a[i, j] = a[i, j] - f * x - g * y
                    a[i2, j] = a[i2, j] - f2 * x - g2 * y
                i = i3
            else:
                for j in range(nc):
                    a[i, j] = a[i, j] - f * r0[j] - g * r1[j]
                i = i2
        k += 2
    if pivoting:
        _unswap_columns(a, perm)
    return logdet


@_compile
def _symmetrize_upper(a: np.ndarray) -> None:
    """Copy the upper triangle of the square ``a`` onto its lower triangle, in place."""
    q = a.shape[0]
    for r in range(q):
        for c in range(r + 1, q):
            a[c, r] = a[r, c]


def symmetrize_upper(a: np.ndarray) -> None:
    """The upper triangle of a (LAPACK's dpotri output) mirrored onto the lower, in place."""
    _symmetrize_upper(a)


@_compile
def _pinv_into(A: np.ndarray, out: np.ndarray, tol: float) -> bool:
    """out = the pseudo-inverse of the symmetrised (k, k) ``A`` by its eigendecomposition,
    eigenvalues at most ``tol`` times the largest in absolute value dropped
    (:func:`.linalg.pinv_sym`'s rule for the matrices it cannot invert); False where A is
    not finite."""
    k = A.shape[0]
    S = np.empty((k, k))
    for a in range(k):
        for b in range(k):
            S[a, b] = 0.5 * (A[a, b] + A[b, a])
            if not np.isfinite(S[a, b]):
                return False
    evals, evecs = np.linalg.eigh(S)
    big = 0.0
    for c in range(k):
        big = max(big, abs(evals[c]))
    inv_vals = np.zeros(k)
    for c in range(k):
        v = abs(evals[c])
        if v > tol * big and v > 0.0:
            inv_vals[c] = 1.0 / evals[c]
    for a in range(k):
        for b in range(k):
            t = 0.0
            for c in range(k):
                t += evecs[a, c] * inv_vals[c] * evecs[b, c]
            out[a, b] = t
    return True


@_compile
def _inverse_checked_into(
    A: np.ndarray,
    out: np.ndarray,
    work: np.ndarray,
    buf: np.ndarray,
    perm: np.ndarray,
    limit: float,
    buf2: np.ndarray,
) -> bool:
    """out = the symmetrised inverse of the symmetric (k, k) ``A`` if its condition is
    provably small: False when A is singular or when the bound b(A) * b(A^-1), b = the
    smaller of the 1-norm and the Frobenius norm, is not below ``limit`` (the caller then
    takes the pseudo-inverse). Both norms bound the 2-norm (the largest |eigenvalue| of a
    symmetric matrix), so the product bounds its condition number; the Frobenius norm is
    the tight one where one eigenvalue dominates (a covariate on a large scale, such as
    log library size: the 1-norm overstates those matrices' condition by ~1.3x).

    ``work`` (k, k), ``buf``, ``buf2`` (k,) and ``perm`` (k,) int64 are scratch. The
    inverse is :func:`_gauss_jordan_pairs` (the bits of ``.compiled._gauss_jordan``,
    ~1.3x faster at k = 21).
    """
    k = A.shape[0]
    norm_a = 0.0
    frob_a = 0.0
    for a in range(k):
        s = 0.0
        for b in range(k):
            v = 0.5 * (A[a, b] + A[b, a])
            work[a, b] = v
            s += abs(v)
            frob_a += v * v
        norm_a = max(norm_a, s)
    if np.isnan(_gauss_jordan_pairs(work, buf, buf2, perm, False)):
        return False
    norm_i = 0.0
    frob_i = 0.0
    for a in range(k):
        s = 0.0
        for b in range(k):
            v = 0.5 * (work[a, b] + work[b, a])
            out[a, b] = v
            s += abs(v)
            frob_i += v * v
        norm_i = max(norm_i, s)
    bound = min(norm_a, np.sqrt(frob_a)) * min(norm_i, np.sqrt(frob_i))
    return np.isfinite(norm_i) and bound < limit


@_compile
def _inverse_checked_batch(A: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_inverse_checked_into` of each matrix of A (m, k, k), and which succeeded."""
    m, k, _ = A.shape
    out = np.empty((m, k, k))
    ok = np.empty(m, dtype=np.bool_)
    work = np.empty((k, k))
    buf, buf2 = np.empty(k), np.empty(k)
    perm = np.empty(k, dtype=np.int64)
    for j in range(m):
        ok[j] = _inverse_checked_into(A[j], out[j], work, buf, perm, limit, buf2)
    return out, ok


@_compile
def _solve_batch(
    C: np.ndarray, rhs: np.ndarray, s0: np.ndarray, limit: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed effects of a block of features from C = s0 X'V^-1 X (m, p, p) and the
    right-hand sides rhs (m, p): coef = C^-1 rhs, cov = C^-1 s0, se = sqrt(diag cov) and
    t = coef / se, one feature at a time. cov overwrites C (no (m, p, p) temporary: at a
    few hundred features a block, temporaries that size cost more in page faults than the
    inverses cost in arithmetic).

    Returns coef, se, t (m, p) and ok (m,): False where C is singular or its condition
    bound is not below ``limit`` (:func:`_inverse_checked_into`); C is left as it was
    there, the other outputs of that feature are undefined, and the caller takes the
    pseudo-inverse.
    """
    m, p, _ = C.shape
    coef = np.empty((m, p))
    se = np.empty((m, p))
    t = np.empty((m, p))
    ok = np.ones(m, dtype=np.bool_)
    inv = np.empty((p, p))
    work = np.empty((p, p))
    buf, buf2 = np.empty(p), np.empty(p)
    perm = np.empty(p, dtype=np.int64)
    for j in range(m):
        if not _inverse_checked_into(C[j], inv, work, buf, perm, limit, buf2):
            ok[j] = False
            continue
        for a in range(p):
            c = 0.0
            for b in range(p):
                c += inv[a, b] * rhs[j, b]
            coef[j, a] = c
        for a in range(p):
            for b in range(p):
                C[j, a, b] = inv[a, b] * s0[j]
            se[j, a] = np.sqrt(C[j, a, a])
            t[j, a] = coef[j, a] / se[j, a]
    return coef, se, t, ok


@_compile
def _newton_gap_batch(g: np.ndarray, F: np.ndarray, rows: np.ndarray, rcond: float) -> np.ndarray:
    """g' pinv(F) g / 2 of the features ``rows`` of g (m, k) and F (m, k, k) symmetric, NaN
    for the others; pinv by NumPy's rule (eigenvalues at most ``rcond`` times the largest
    in absolute value dropped): the inverse where its condition bound is below 1 /
    ``rcond`` (no eigenvalue is dropped there), else by the eigendecomposition."""
    m, k = g.shape
    gap = np.full(m, np.nan)
    inv, work = np.empty((k, k)), np.empty((k, k))
    buf, buf2, perm = np.empty(k), np.empty(k), np.empty(k, dtype=np.int64)
    for j in rows:
        if not _inverse_checked_into(F[j], inv, work, buf, perm, 1.0 / rcond, buf2):
            if not _pinv_into(F[j], inv, rcond):
                continue
        s = 0.0
        for a in range(k):
            t = 0.0
            for b in range(k):
                t += inv[a, b] * g[j, b]
            s += g[j, a] * t
        gap[j] = 0.5 * s
    return gap


def newton_gap_batch(g: np.ndarray, F: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Half the Newton decrement g' pinv(F) g / 2 (m,) of the features ``rows``, with
    ``np.linalg.pinv``'s default cut-off (1e-15), NaN elsewhere; see
    :func:`_newton_gap_batch` (at K = 2 ~15x faster than the batched pinv)."""
    f = np.float64
    return _newton_gap_batch(
        np.ascontiguousarray(g, dtype=f),
        np.ascontiguousarray(F, dtype=f),
        np.ascontiguousarray(rows, dtype=np.int64),
        1e-15,
    )


@functools.partial(_compile, reassoc=True)
def _residualise_rows(
    XXinv: np.ndarray, ZX: np.ndarray, XY: np.ndarray, ZY: np.ndarray, Ynorm: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """zry = ZY - ZX XXinv XY and yry = Ynorm - XY' XXinv XY of each feature (rows), one
    feature at a time in a fixed order."""
    m, p = XY.shape
    q = ZX.shape[0]
    zry = np.empty((m, q))
    yry = np.empty(m)
    B = np.empty(p)
    for j in range(m):
        for r in range(p):
            B[r] = 0.0
        for c in range(p):
            x = XY[j, c]
            for r in range(p):
                B[r] += x * XXinv[c, r]
        t = 0.0
        for r in range(p):
            t += B[r] * XY[j, r]
        yry[j] = Ynorm[j] - t
        for k in range(q):
            t = 0.0
            for r in range(p):
                t += ZX[k, r] * B[r]
            zry[j, k] = ZY[j, k] - t
    return zry, yry


def residualise_rows(
    XXinv: np.ndarray, ZX: np.ndarray, XY: np.ndarray, ZY: np.ndarray, Ynorm: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """zry (m, q) and yry (m,) of a block of features (XY (m, p), ZY (m, q)), each row from
    its own feature's values alone: a feature's result does not depend on its block (a
    BLAS product of the block rounds a single row differently from a stack of them,
    which Fisher scoring and the fixed effects can amplify to ~1e-12)."""
    f = np.float64
    return _residualise_rows(
        np.ascontiguousarray(XXinv, dtype=f),
        np.ascontiguousarray(ZX, dtype=f),
        np.ascontiguousarray(XY, dtype=f),
        np.ascontiguousarray(ZY, dtype=f),
        np.ascontiguousarray(Ynorm, dtype=f),
    )


def inverse_checked_batch(A: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """Symmetrised inverses of (m, k, k) symmetric matrices with condition bound < limit."""
    return _inverse_checked_batch(np.ascontiguousarray(A), float(limit))


def solve_batch(
    C: np.ndarray, rhs: np.ndarray, s0: np.ndarray, limit: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """coef, se, t and ok of C (m, p, p) float64 C-contiguous, overwritten by cov where
    ok, rhs (m, p) and s0 (m,); see :func:`_solve_batch`."""
    if C.dtype != np.float64 or not C.flags.c_contiguous:
        raise ValueError("C must be a C-contiguous float64 array (it is overwritten)")
    return _solve_batch(
        C,
        np.ascontiguousarray(rhs, dtype=np.float64),
        np.ascontiguousarray(s0, dtype=np.float64),
        float(limit),
    )
