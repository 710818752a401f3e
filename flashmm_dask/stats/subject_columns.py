"""Columns of X set by the subject, left out of a per-cell pass.

When every cell added has one entry of Z, equal to 1 (a subject indicator), a column k of
X whose value is the same in every cell of a subject (the intercept, age, sex, a
condition of the donor: x_ck = u_k[subject of c]) has X'E row k = u_k' Z'E. A per-cell
pass can then leave it out and form it from Z'E when the sums are read: one multiply-add
per value fewer for each such column. :class:`SubjectColumns` decides block by block
which columns may be left out, and keeps u; the owner of the running sums adds
u' Z'E for the columns it is told were left out (used by
:class:`~flashmm_dask.stats.block_sums.BlockSums` and the stratified running sums of
:mod:`flashmm_dask.stats.reduce_strata`, one per stratum).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["SubjectColumns"]


class SubjectColumns:
    """The columns of X (p of them) left out of a pass whose cells have one entry of Z
    (q columns) each, and the subjects' values u of those columns (p x q)."""

    __slots__ = ("_by_subject", "_levels", "p", "q")

    def __init__(self, p: int, q: int) -> None:
        self.p, self.q = p, q
        # the columns left out (None: nothing added yet), and their values by subject
        # (p x q, NaN for a subject with no cell added yet)
        self._by_subject: np.ndarray | None = None
        self._levels = np.zeros((0, q))

    @property
    def left_out(self) -> np.ndarray:
        """(p,) bool: the columns left out so far."""
        if self._by_subject is None:
            return np.zeros(self.p, dtype=bool)
        return self._by_subject.copy()

    def products(self, columns: np.ndarray, ZY: np.ndarray) -> np.ndarray:
        """u' Z'E of ``columns`` (bool, p; left out so far): the rows of X'E they lack,
        (columns.sum(), m), from the running Z'E (q x m) of the cells added."""
        return np.nan_to_num(self._levels[columns]) @ ZY

    def stop(self) -> np.ndarray:
        """Leave no column out from now on (before a block is added any other way):
        return the columns left out so far, whose products the owner adds now."""
        lost = self.left_out
        self._by_subject = np.zeros(self.p, dtype=bool)
        return lost

    def update(self, X: np.ndarray, Z: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
        """The columns of a block's X (n x p) to leave out of its pass, and those left out
        so far that may not be any more (the owner adds their products, u' Z'E, before
        this block's): (keep, lost), both (p,) bool.

        Z (n x q, CSR) has one entry per row (its column, the subject). The columns are
        chosen on the first block (none when anything was added before, see
        :meth:`stop`); a column whose value differs from its subject's in a later block,
        or a block whose Z is not 1 (a slope), loses its place and is added from then on.
        """
        none = np.zeros(self.p, dtype=bool)
        if self._by_subject is not None and not self._by_subject.any():
            return none, none
        if not np.all(Z.data == 1.0):
            return none, self.stop()
        present, first, inverse = np.unique(Z.indices, return_index=True, return_inverse=True)
        values = X[first]  # (subjects, p): the first cell's
        alike = (X == values[inverse]).all(axis=0)
        lost = none
        if self._by_subject is None:
            self._by_subject = alike
            self._levels = np.full((self.p, self.q), np.nan)
        else:
            known = self._levels[:, present]
            alike &= (np.isnan(known) | (known == values.T)).all(axis=1)
            lost = self._by_subject & ~alike
            self._by_subject = self._by_subject & alike
        keep = self._by_subject
        self._levels[np.ix_(keep, present)] = values[:, keep].T
        return keep.copy(), lost
