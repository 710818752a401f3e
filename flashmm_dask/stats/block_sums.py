"""The running sums a reduction task adds its blocks' products into."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = ["BlockSums"]


class BlockSums:
    """Running sums of blocks' X'E (p x m), Z'E (q x m) and colsums(E^2) (m).

    X'E and Z'E are rows of one buffer, ``rows`` ((p + q + 1) x m; the last row takes
    the zero-weight terms of rows of A with fewer entries), so that the compiled pass adds
    a value to any of them by its row index, straight into the running sums: nothing of
    their size is allocated or added per block.

    The grouped per-cell pass (:mod:`flashmm_dask.stats.cell_pass`) adds the values of
    cells whose rows of X are alike (in the columns that are mostly zero) into one row of
    group sums G (:meth:`group_rows`), up to ``group_capacity`` groups; X'E gets X_g' G
    when the sums are read (:meth:`partials`) or the groups are full.
    """

    __slots__ = ("Ynorm", "_G", "_group_X", "_group_of", "group_capacity", "p", "q", "rows")

    def __init__(self, p: int, q: int, m: int) -> None:
        self.p, self.q = p, q
        self.rows = np.zeros((p + q + 1, m))
        self.Ynorm = np.zeros(m)
        # at most as many group rows (of m float64) as this: a few times the rows of X'E
        self.group_capacity = 4 * p + 64
        self._group_of: dict[bytes, int] = {}
        self._group_X: list[np.ndarray] = []
        self._G: np.ndarray | None = None

    @property
    def XY(self) -> np.ndarray:
        return self.rows[: self.p]

    @property
    def ZY(self) -> np.ndarray:
        return self.rows[self.p : self.p + self.q]

    def add(
        self, XY: np.ndarray, ZY: Any, Ynorm: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Add one block's products; return the sums (XY, ZY, Ynorm)."""
        self.XY[...] += XY
        self.ZY[...] += ZY
        self.Ynorm += Ynorm
        return self.partials()

    def partials(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(XY, ZY, Ynorm): views of the running sums (the group sums added first)."""
        self._add_groups()
        return self.XY, self.ZY, self.Ynorm

    def group_rows(self, X_g: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The row of the group sums G of each row of X_g (n_g x p, distinct rows of X
        with its mostly-dense columns zeroed), and G; None when there are more than
        ``group_capacity`` of them."""
        if len(X_g) > self.group_capacity:
            return None
        keys = [row.tobytes() for row in X_g]
        if len(self._group_of) + sum(k not in self._group_of for k in keys) > self.group_capacity:
            self._add_groups()
        if self._G is None:
            self._G = np.zeros((self.group_capacity, self.rows.shape[1]))
        where = np.empty(len(keys), dtype=np.int64)
        for g, key in enumerate(keys):
            if key not in self._group_of:
                self._group_of[key] = len(self._group_X)
                self._group_X.append(X_g[g])
            where[g] = self._group_of[key]
        return where, self._G

    def _add_groups(self) -> None:
        """X'E += X_g' G, and the groups emptied."""
        n_g = len(self._group_X)
        if not n_g:
            return
        assert self._G is not None
        X_g = sp.csr_matrix(np.array(self._group_X))
        self.XY[...] += np.asarray(X_g.T @ self._G[:n_g])
        self._G[:n_g] = 0.0
        self._group_of.clear()
        self._group_X.clear()
