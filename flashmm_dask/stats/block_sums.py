"""The running sums a reduction task adds its blocks' products into."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from flashmm_dask.stats.subject_columns import SubjectColumns

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

    It also leaves out the columns of X that are set by the subject (age, sex, condition:
    x_ck = u_k[subject of c]) while every cell added has one entry of Z, equal to 1:
    their X'E is u_k' Z'E, formed when the sums are read (:meth:`subject_columns`).
    """

    __slots__ = (
        "Ynorm",
        "_G",
        "_G_rows",
        "_group_X",
        "_group_of",
        "_subjects",
        "group_capacity",
        "p",
        "q",
        "rows",
    )

    def __init__(self, p: int, q: int, m: int) -> None:
        self.p, self.q = p, q
        self.rows = np.zeros((p + q + 1, m))
        self.Ynorm = np.zeros(m)
        # at most as many group rows (of m float64) as this: a few times the rows of X'E
        self.group_capacity = 4 * p + 64
        self._group_of: dict[bytes, int] = {}
        self._group_X: list[np.ndarray] = []
        self._G: np.ndarray | None = None
        self._G_rows = 0  # the rows of G ever written
        # the columns of X left out, and their values by subject
        self._subjects = SubjectColumns(p, q)

    @property
    def nbytes(self) -> int:
        """The bytes of the sums (the group sums' rows in use included: the others are
        allocated but never written, so take no memory)."""
        groups = 0 if self._G is None else self._G[: self._G_rows].nbytes
        return int(self.rows.nbytes + self.Ynorm.nbytes + groups)

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
        self.direct()
        self.XY[...] += XY
        self.ZY[...] += ZY
        self.Ynorm += Ynorm
        return self.partials()

    def partials(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(XY, ZY, Ynorm): views of the running sums (the group sums and the columns
        left out added first)."""
        self._add_groups()
        self.direct()
        return self.XY, self.ZY, self.Ynorm

    @property
    def _by_subject(self) -> np.ndarray:
        """(p,) bool: the columns of X left out so far (a copy)."""
        return self._subjects.left_out

    def direct(self) -> None:
        """Add the products of the columns left out (:meth:`subject_columns`) to X'E and
        leave none out from now on: before a block's products are added any other way."""
        self._add_by_subject(self._subjects.stop())

    def subject_columns(self, X: np.ndarray, Z: sp.csr_matrix) -> np.ndarray:
        """The columns of X (bool, p) whose products with the block of these rows are not
        to be added: those set by the subject in every cell added so far and in these
        (:meth:`SubjectColumns.update`; the products of a column that loses its place,
        u_k' Z'E of the cells so far, are added here)."""
        keep, lost = self._subjects.update(X, Z)
        self._add_by_subject(lost)
        return keep

    def _add_by_subject(self, columns: np.ndarray) -> None:
        """X'E of ``columns`` (left out so far) += u' Z'E."""
        if columns.any():
            self.XY[columns] += self._subjects.products(columns, self.ZY)

    def group_rows(self, X_g: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The row of the group sums G of each row of X_g (n_g x p: distinct rows of X,
        the columns not grouped zeroed), and G; None when there are more than
        ``group_capacity`` of them (the groups held are added to X'E first when the new
        ones do not fit beside them)."""
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
        self._G_rows = max(self._G_rows, len(self._group_X))
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
