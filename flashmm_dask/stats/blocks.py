"""One expression block of the reduction: its conversion, checks and transform, and its
partials X'E, Z'E and Ynorm (run on workers, by :mod:`flashmm_dask.stats.reduce` and
:mod:`flashmm_dask.stats.reduce_strata`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from flashmm_dask.errors import DataError
from flashmm_dask.stats.products import BlockSums, dense_as_csr, lookup_table, sparse_products

__all__ = ["TRANSFORMS", "add_block", "transform_block"]

TRANSFORMS = ("none", "log2p1", "log1p_scaled", "log1p_cpm")
_COUNT_TRANSFORMS = frozenset({"log2p1", "log1p_scaled", "log1p_cpm"})
_SCALED_TRANSFORMS = frozenset({"log1p_scaled", "log1p_cpm"})
# dense expression blocks with at most this fraction of non-zeros are reduced as CSR
_SPARSIFY = 0.25


def _block_partial(
    block: Any,
    XZ: tuple[np.ndarray, sp.spmatrix | np.ndarray],
    features: tuple[str, ...],
    start: int,
    col0: int,
    transform: str,
    target_sum: float,
    check: bool,
    source: str = "",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(XY_ij, ZY_ij, Ynorm_ij) of one expression block E_ij (n_i cells x m_j features)."""
    X, Z = XZ
    sums = BlockSums(X.shape[1], Z.shape[1], block.shape[1])
    add_block(block, XZ, features, start, col0, transform, target_sum, check, source, sums)
    return sums.partials()


def add_block(
    block: Any,
    XZ: tuple[np.ndarray, sp.spmatrix | np.ndarray],
    features: tuple[str, ...],
    start: int,
    col0: int,
    transform: str,
    target_sum: float,
    check: bool,
    source: str,
    into: BlockSums,
) -> None:
    """Add the products of one expression block E_ij (n_i cells x m_j features) to the
    running sums ``into`` (read them with :meth:`BlockSums.partials`)."""
    X, Z = XZ
    E = _as_block(block, sparsify=True)
    if E.shape[0] != X.shape[0]:
        raise DataError(
            f"the expression block of cells {start}.. has {E.shape[0]} rows but the obs "
            f"chunk has {X.shape[0]}; expression and obs must have the same cells"
        )
    table = lookup_table(transform)
    if isinstance(E, sp.csr_matrix) and table is not None:
        # counts as stored, transformed inside the pass; None when a value is not a small
        # non-negative integer (so no check can fail) or entries are duplicated
        if sparse_products(E, X, Z, table, into) is not None:
            return
    E = _canonical(E)
    if check:
        _check_block(E, features, start, col0, transform, source)
    E = _transform(E, transform, target_sum)
    if isinstance(E, sp.csr_matrix):
        added = sparse_products(E, X, Z, into=into)
        assert added is not None  # only a table can fail
        return
    into.add(X.T @ E, np.asarray(Z.T @ E), np.einsum("ij,ij->j", E, E))


def transform_block(
    block: Any, transform: str, target_sum: float = 1e4
) -> np.ndarray | sp.csr_matrix:
    """One expression block (cells x features) as float64 CSR or ndarray, transformed."""
    return _transform(_canonical(_as_block(block)), transform, target_sum)


def _dense(matrix: Any) -> np.ndarray:
    """A small (q x q, q x m_j) product as a dense array."""
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def _as_block(block: Any, sparsify: bool = False) -> np.ndarray | sp.csr_matrix:
    """The block as CSR (sparse input, stored dtype and entries as they are) or a
    float64 ndarray.

    With ``sparsify``, a dense block that is mostly zeros (at most _SPARSIFY of its
    values non-zero, as counts usually are) becomes CSR: its products and transform then
    cost per non-zero rather than per value.
    """
    if not sp.issparse(block) and hasattr(block, "to_scipy_sparse"):  # pydata sparse
        block = block.to_scipy_sparse()
    if sp.issparse(block):
        return sp.csr_matrix(block)
    values = np.asarray(block)
    if sparsify:
        E = dense_as_csr(values, _SPARSIFY)
        if E is not None:
            return E
    return np.asarray(values, dtype=np.float64)


def _canonical(E: np.ndarray | sp.csr_matrix) -> np.ndarray | sp.csr_matrix:
    """A CSR block with each (cell, feature) stored once and a numeric dtype.

    A transform of stored values and a sum of their squares both need each entry stored
    once; the copy leaves the caller's block unmodified.
    """
    if isinstance(E, sp.csr_matrix) and (E.dtype.kind not in "iuf" or not E.has_canonical_format):
        E = E.astype(np.float64)
        E.sum_duplicates()
    return E


def _check_block(
    E: np.ndarray | sp.csr_matrix,
    features: tuple[str, ...],
    start: int,
    col0: int,
    transform: str,
    source: str = "",
) -> None:
    n_i = E.shape[0]
    cells = f"cells {start}..{start + n_i - 1}"
    values = E.data if isinstance(E, sp.csr_matrix) else E
    bad = ~np.isfinite(values) if values.dtype.kind == "f" else np.zeros(0, dtype=bool)
    if bad.any():
        col = _first_column(E, bad)
        raise DataError(
            f"the expression of {cells} has NaN or Inf values, the first in feature "
            f"{features[col0 + col]!r}; remove or impute them before computing statistics"
        )
    if transform in _COUNT_TRANSFORMS:
        negative = values < 0
        if negative.any():
            col = _first_column(E, negative)
            raise DataError(
                f"feature {features[col0 + col]!r} has negative values ({cells}), which "
                f"are not counts, but transform={transform!r} expects raw counts; if the "
                "data are already normalised use transform='none' (R FLASHMM: "
                "is_counts=FALSE, flashmm-dask: is_counts=False)"
            )
        if transform == "log2p1" and values.dtype.kind == "f":
            # counts are whole numbers: log-normalised values analysed as counts would be
            # transformed twice. One vectorised comparison over the stored values
            fraction = values != np.floor(values)
            if fraction.any():
                col = _first_column(E, fraction)
                example = float(values[fraction].flat[0])
                where = f" of {source}" if source else ""
                raise DataError(
                    f"the values{where} are not counts: feature {features[col0 + col]!r} has "
                    f"non-integer values ({cells}, e.g. {example:.6g}), but "
                    f"transform={transform!r} expects raw counts; read the layer that holds "
                    "the counts (config: data.layer: counts; Python: layer='counts'), or, if "
                    "the values are already normalised, use transform: none (is_counts=False)"
                )


def _first_column(E: np.ndarray | sp.csr_matrix, mask: np.ndarray) -> int:
    """The lowest feature (column) index of a True entry of ``mask`` over the values."""
    if isinstance(E, sp.csr_matrix):
        return int(E.indices[mask].min())
    return int(np.argmax(mask.any(axis=0)))


def _log2p1(values: np.ndarray) -> np.ndarray:
    """log2(1 + values) in float64; non-negative integer counts within the table of the
    compiled pass (:func:`~flashmm_dask.stats.products.lookup_table`) by look-up in it
    (the same values as log2)."""
    if values.dtype.kind in "iu" and values.size:
        table = lookup_table("log2p1")
        if table is not None and values.min() >= 0 and values.max() < len(table):
            return table[values]
    return np.log2(1.0 + values.astype(np.float64, copy=False))


def _transform(
    E: np.ndarray | sp.csr_matrix, transform: str, target_sum: float
) -> np.ndarray | sp.csr_matrix:
    """The transformed block in float64 (stored values only for CSR)."""
    if transform == "none":
        return E.astype(np.float64, copy=False)
    if transform == "log2p1":
        if isinstance(E, sp.csr_matrix):
            return sp.csr_matrix((_log2p1(E.data), E.indices, E.indptr), shape=E.shape)
        return np.log2(1.0 + E)
    # log1p_scaled: cells with no counts keep all zeros rather than 0/0
    E = E.astype(np.float64, copy=False)
    totals = np.asarray(E.sum(axis=1), dtype=np.float64).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    if isinstance(E, sp.csr_matrix):
        data = np.log1p(E.data * np.repeat(scale, np.diff(E.indptr)))
        return sp.csr_matrix((data, E.indices, E.indptr), shape=E.shape)
    return np.log1p(E * scale[:, None])
