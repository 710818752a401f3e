"""One pass over a dense Z'Z: whether it is finite, and which diagonal blocks are diagonal.

``lmm`` checks that its inputs are finite, and the structured path
(:func:`.structured.detect`) needs to know which components have an exactly diagonal block
Z_k'Z_k. On the nested atlas design Z'Z is 7,770 x 7,770 (483 MB), and each of the two
questions was a memory-bound pass of its own (15 + 22 ms, more than the whole donor-only
fit). :func:`scan` answers both in one: each row's entries outside its own component's
block are summed (a finite sum has no NaN or Inf among its terms), the entries of the
block off the diagonal OR-ed bit by bit (all zero, less the sign bit, exactly when the
block is diagonal there: -0.0 counts as zero; NaN, Inf and subnormals do not) and added
to the sum only where they are not all zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from flashmm_dask.numerics.jit import jit
from flashmm_dask.numerics.linalg import Array


@dataclass(frozen=True)
class Scan:
    """What one pass over Z'Z found.

    Attributes
    ----------
    finite : bool
        No NaN or Inf anywhere.
    diagonal : (K,) bool
        Block k (rows and columns of component k) has no non-zero off its diagonal.
    """

    finite: bool
    diagonal: tuple[bool, ...]


def _or_all_py(w: np.ndarray) -> np.uint64:
    acc = np.uint64(0)
    for j in range(w.shape[0]):
        acc |= w[j]
    return acc


def _sum_py(v: np.ndarray) -> float:
    s = 0.0
    for j in range(v.shape[0]):
        s += v[j]
    return s


# reassociated sums (vectorised): only whether the sum is finite is used
_or_all = jit(_or_all_py, nogil=True, inline="always")
_sum = jit(_sum_py, nogil=True, fastmath={"reassoc"}, inline="always")


def _scan_py(
    values: Array, bits: np.ndarray, edges: np.ndarray, r0: int, r1: int, offdiag: np.ndarray
) -> float:
    """The sum of the rows r0:r1 of ``values`` (q, q) (their off-diagonal block entries
    left out where they are all zero) and, into ``offdiag`` (K,), the OR of their
    off-diagonal bits of each block. The slices keep every loop a plain one over a
    contiguous row (loops over index ranges with a moving start were not vectorised: 4x
    slower)."""
    q = values.shape[1]
    total = 0.0
    k = 0
    for i in range(r0, r1):
        while edges[k + 1] <= i:
            k += 1
        a, b = edges[k], edges[k + 1]
        v, w = values[i], bits[i]
        acc = _or_all(w[a:i]) | _or_all(w[i + 1 : b])
        total += _sum(v[:a]) + _sum(v[b:q])
        if acc << np.uint64(1) != np.uint64(0):
            total += _sum(v[a:b])
        else:
            total += v[i]
        offdiag[k] |= acc
    return total


_scan = jit(_scan_py, nogil=True, fastmath={"reassoc"})


def _rows_first(ZZ: Array) -> Array:
    """ZZ as a C-ordered float64 array whose blocks are ZZ's or their transposes (a
    Fortran-ordered ZZ through its transpose; any other layout copied)."""
    if ZZ.flags.f_contiguous and not ZZ.flags.c_contiguous:
        ZZ = ZZ.T
    return np.ascontiguousarray(ZZ, dtype=np.float64)


def scan(ZZ: Array, d: Sequence[int] | np.ndarray, threads: int = 1) -> Scan:
    """Whether ZZ (q, q) float64 is finite and which of its K diagonal blocks (sizes ``d``)
    are diagonal, in one pass (a Fortran-ordered ZZ through its transpose, whose blocks are
    the transposes of its own; any other layout is copied first), its rows split among
    ``threads`` threads (one core alone does not reach the memory's bandwidth: the atlas's
    483 MB in 18 ms on one thread, 11 ms on two)."""
    ZZ = _rows_first(ZZ)
    edges = np.concatenate([[0], np.cumsum(np.asarray(d, dtype=np.int64))])
    q = ZZ.shape[0]
    parts = max(1, min(threads, q // 1024))  # (a small ZZ in the calling thread)
    bounds = [(i * q) // parts for i in range(parts + 1)]
    offdiag = np.zeros((parts, len(d)), dtype=np.uint64)
    bits = ZZ.view(np.uint64)

    def rows(i: int) -> float:
        return float(_scan(ZZ, bits, edges, bounds[i], bounds[i + 1], offdiag[i]))

    if parts == 1:
        total = rows(0)
    else:
        with ThreadPoolExecutor(parts - 1) as pool:
            others = [pool.submit(rows, i) for i in range(1, parts)]
            total = rows(0) + sum(f.result() for f in others)
    finite = bool(np.isfinite(total)) or bool(np.isfinite(ZZ).all())  # a sum may overflow
    diagonal = tuple(bool(x << np.uint64(1) == 0) for x in np.bitwise_or.reduce(offdiag))
    return Scan(finite=finite, diagonal=diagonal)


#: Rows of each diagonal block that :func:`guess` reads.
GUESS_ROWS = 64


def guess(ZZ: Array, d: Sequence[int] | np.ndarray, rows: int = GUESS_ROWS) -> tuple[bool, ...]:
    """Which of the K diagonal blocks of ZZ look diagonal from their first ``rows`` rows: a
    guess, never a result (:class:`Ahead`). A block found not diagonal there is not
    diagonal; one found diagonal may still have an entry further down."""
    ZZ = _rows_first(ZZ)
    edges = np.concatenate([[0], np.cumsum(np.asarray(d, dtype=np.int64))])
    offdiag = np.zeros(len(d), dtype=np.uint64)
    bits = ZZ.view(np.uint64)
    for k in range(len(d)):
        _scan(ZZ, bits, edges, edges[k], min(edges[k + 1], edges[k] + rows), offdiag)
    return tuple(bool(x << np.uint64(1) == 0) for x in offdiag)


class Ahead:
    """:func:`scan` of ZZ in a thread of its own, started at once, and :func:`guess`'s
    answer meanwhile: the caller prepares and fits with the guessed structure while the
    scan reads the whole of ZZ (the atlas's 483 MB: ~18 ms of one core, which otherwise
    precede the fit), and keeps that work only where :meth:`result` is finite and finds the
    same diagonal blocks (:func:`flashmm_dask.model.lmm.lmm`).

    Only for a C- or Fortran-ordered ZZ (:meth:`possible`): another layout would be copied
    twice.
    """

    def __init__(self, ZZ: Array, d: Sequence[int] | np.ndarray):
        self.guess = guess(ZZ, d)
        pool = ThreadPoolExecutor(1)
        self._future = pool.submit(scan, ZZ, d, 1)
        pool.shutdown(wait=False)

    @staticmethod
    def possible(ZZ: Array) -> bool:
        """Whether ZZ can be scanned ahead (float64, C- or Fortran-ordered)."""
        return ZZ.dtype == np.float64 and (ZZ.flags.c_contiguous or ZZ.flags.f_contiguous)

    def result(self) -> Scan:
        """The scan's answer (waits for it)."""
        return self._future.result()

    def confirms(self) -> bool:
        """Whether the scan found ZZ finite and the guessed diagonal blocks (waits)."""
        found = self.result()
        return found.finite and found.diagonal == self.guess
