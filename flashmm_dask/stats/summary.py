"""SummaryStats: the seven FLASH-MM summary statistics, with save, load and merge.

Notation (as in R FLASHMM's ``sslmm``): X is the n x p fixed-effects design, Z = [Z_1 ..
Z_K] the n x q random-effects design with q = d_1 + ... + d_K, and Y the m x n expression
matrix (features x cells). The statistics are

    XX = X'X (p x p)    ZX = Z'X (q x p)    ZZ = Z'Z (q x q)          shared by all features
    XY = X'Y' (p x m)   ZY = Z'Y' (q x m)   Ynorm_j = y_j'y_j (m)    one column per feature
    n  = number of cells

Each is a sum over cells, so the statistics of cell-disjoint datasets with the same design
and features add (``a + b``), and the statistics of a subset of features are the matching
columns (``stats.subset(...)``). Nothing here touches n-length data except
:meth:`SummaryStats.from_arrays`, which takes in-memory cell-level matrices.

On disk a SummaryStats is a Zarr group: one array per statistic and the names, ``n``,
``d``, the format name and version, the package version and a free-form ``provenance``
dictionary (formulas, source, transform) in the group attributes.

Optionally, ``nnz`` counts the cells in which each feature is non-zero (accumulated by
the stratified reduction, :mod:`flashmm_dask.stats.reduce_strata`, for ``min_cells``); format
version 2 stores it as an array ``nnz`` (statistics without it are written as version 1,
as before). Version-1 stores load with ``nnz=None``. A store of several strata (version 2,
attribute ``strata``) is read with :func:`flashmm_dask.stats.strata.load_stats`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeAlias

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike

from flashmm_dask.errors import InputError
from flashmm_dask.io.writing import package_version
from flashmm_dask.stats.store import (
    _ARRAYS,
    ARRAY_CONFIG,
    FORMAT,
    FORMAT_VERSION,
    chunk_shape,
    compressors,
    load_summary,
    save_stats,
)

__all__ = ["FORMAT", "FORMAT_VERSION", "SummaryStats"]


def summary_shapes(p: int, q: int, m: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the statistics of m features, p covariates and q random effects, in the
    R orientation (features along the last axis)."""
    return {"XX": (p, p), "XY": (p, m), "ZX": (q, p), "ZY": (q, m), "ZZ": (q, q), "Ynorm": (m,)}


_NAMES = ("covariates", "random", "components", "features")
#: Features by name, by integer position (negative counts from the end) or by a boolean mask.
FeatureSelection: TypeAlias = str | Sequence[str] | Sequence[int] | np.ndarray


def _names(values: str | Iterable[object], what: str) -> tuple[str, ...]:
    if isinstance(values, str):
        raise InputError(f"{what} must be a sequence of names, not the single string {values!r}")
    return tuple(str(v) for v in values)


def _frozen_array(values: Any, what: str, ndim: int) -> np.ndarray:
    if sp.issparse(values):
        values = values.toarray()  # only ever a shared (p/q-sized) statistic
    try:
        arr = np.array(values, dtype=np.float64)  # always a private copy
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must be a numeric array: {exc}") from None
    if arr.ndim != ndim:
        raise InputError(f"{what} must be {ndim}-dimensional, got shape {arr.shape}")
    arr.setflags(write=False)
    return arr


def _dense(matrix: Any) -> np.ndarray:
    """A small (p/q-sized) product as a dense array."""
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def _describe_difference(what: str, left: tuple[object, ...], right: tuple[object, ...]) -> str:
    if len(left) != len(right):
        return f"{what}: {len(left)} on the left, {len(right)} on the right"
    i = next(k for k, (a, b) in enumerate(zip(left, right, strict=True)) if a != b)
    return f"{what}: position {i} is {left[i]!r} on the left, {right[i]!r} on the right"


@dataclass(frozen=True, eq=False)
class SummaryStats:
    """The FLASH-MM summary statistics of one dataset, with the names of their axes.

    Parameters
    ----------
    XX : ndarray, shape (p, p)
        X'X.
    XY : ndarray, shape (p, m)
        X'Y' (one column per feature).
    ZX : ndarray, shape (q, p)
        Z'X.
    ZY : ndarray, shape (q, m)
        Z'Y'.
    ZZ : ndarray, shape (q, q)
        Z'Z.
    Ynorm : ndarray, shape (m,)
        Sum of squares of each feature over the cells.
    n : int
        Number of cells.
    d : tuple of int, length K
        Sizes of the random-effect components; ``sum(d) == q``.
    covariates : tuple of str, length p
        Names of the columns of X (the fixed-effect coefficients).
    random : tuple of str, length q
        Names of the columns of Z.
    components : tuple of str, length K
        Names of the random-effect components (e.g. ``("sam", "sam:time")``).
    features : tuple of str, length m
        Names of the features (genes).
    provenance : dict
        Free-form, JSON-serialisable description of where the statistics came from
        (formulas, source, transform); saved with the statistics.
    nnz : ndarray of int64, shape (m,), optional
        The number of cells in which each feature is non-zero (None when not counted).

    Notes
    -----
    All arrays are stored as read-only float64 copies. Instances compare by identity;
    compare the arrays to compare two instances.
    """

    XX: np.ndarray
    XY: np.ndarray
    ZX: np.ndarray
    ZY: np.ndarray
    ZZ: np.ndarray
    Ynorm: np.ndarray
    n: int
    d: tuple[int, ...]
    covariates: tuple[str, ...]
    random: tuple[str, ...]
    components: tuple[str, ...]
    features: tuple[str, ...]
    provenance: Mapping[str, Any] = field(default_factory=dict)
    nnz: np.ndarray | None = None

    def __post_init__(self) -> None:
        ndims = {"XX": 2, "XY": 2, "ZX": 2, "ZY": 2, "ZZ": 2, "Ynorm": 1}
        for name in _ARRAYS:
            object.__setattr__(self, name, _frozen_array(getattr(self, name), name, ndims[name]))
        for name in _NAMES:
            object.__setattr__(self, name, _names(getattr(self, name), name))
        object.__setattr__(self, "n", self._check_n(self.n))
        object.__setattr__(self, "d", self._check_d(self.d))
        object.__setattr__(self, "provenance", dict(self.provenance or {}))
        self._check_shapes()
        if self.nnz is not None:
            nnz = np.array(self.nnz, dtype=np.int64)
            if nnz.shape != (self.m,):
                raise InputError(
                    f"nnz has shape {nnz.shape}; expected ({self.m},), one per feature"
                )
            nnz.setflags(write=False)
            object.__setattr__(self, "nnz", nnz)

    @staticmethod
    def _check_n(n: object) -> int:
        if isinstance(n, bool) or not isinstance(n, int | np.integer | float | np.floating):
            raise InputError(f"n must be a non-negative integer number of cells, got {n!r}")
        if n != int(n) or n < 0:
            raise InputError(f"n must be a non-negative integer number of cells, got {n!r}")
        return int(n)

    @staticmethod
    def _check_d(d: ArrayLike) -> tuple[int, ...]:
        try:
            sizes = tuple(int(k) for k in np.atleast_1d(np.asarray(d)))
        except (TypeError, ValueError):
            raise InputError(f"d must be a sequence of component sizes, got {d!r}") from None
        if not sizes or any(k <= 0 for k in sizes) or np.any(np.asarray(d) != np.asarray(sizes)):
            raise InputError(f"d must be a non-empty sequence of positive integers, got {d!r}")
        return sizes

    def _check_shapes(self) -> None:
        p, q, m = len(self.covariates), len(self.random), len(self.features)
        for name, shape in summary_shapes(p, q, m).items():
            actual = getattr(self, name).shape
            if actual != shape:
                raise InputError(
                    f"{name} has shape {actual} but p={p} covariates, "
                    f"q={q} random-effect columns and m={m} features imply {shape}; "
                    "check that the names match the matrices"
                )
        if sum(self.d) != q:
            raise InputError(
                f"the component sizes d={self.d} add up to {sum(self.d)} but there are "
                f"q={q} random-effect columns; sum(d) must equal q"
            )
        if len(self.components) != len(self.d):
            raise InputError(
                f"{len(self.components)} component names {self.components} for "
                f"{len(self.d)} component sizes d={self.d}; give one name per component"
            )

    # -- sizes -------------------------------------------------------------------------

    @property
    def p(self) -> int:
        """Number of fixed-effect covariates (columns of X)."""
        return len(self.covariates)

    @property
    def q(self) -> int:
        """Number of random-effect columns (columns of Z)."""
        return len(self.random)

    @property
    def m(self) -> int:
        """Number of features."""
        return len(self.features)

    def __repr__(self) -> str:
        return (
            f"SummaryStats(n={self.n}, p={self.p}, q={self.q}, m={self.m}, d={self.d}, "
            f"components={self.components})"
        )

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_arrays(
        cls,
        X: ArrayLike,
        Y: Any,
        Z: Any,
        d: Sequence[int] | None = None,
        *,
        covariates: Sequence[str] | None = None,
        random: Sequence[str] | None = None,
        components: Sequence[str] | None = None,
        features: Sequence[str] | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> SummaryStats:
        """The statistics of in-memory cell-level matrices; R FLASHMM's ``sslmm(X, Y, Z)``.

        Parameters
        ----------
        X : array_like, shape (n, p)
            Fixed-effects design. A pandas DataFrame gives the covariate names.
        Y : ndarray or scipy.sparse matrix, shape (m, n)
            Expression, features x cells (the R orientation). Sparse input stays sparse.
        Z : array_like or scipy.sparse matrix, shape (n, q)
            Random-effects design. A pandas DataFrame gives the random-effect names.
        d : sequence of int, optional
            Component sizes, summing to q. Default: one component, ``(q,)``.
        covariates, random, components, features : sequence of str, optional
            Names; defaults ``X1..Xp``, ``Z1..Zq``, ``var1..varK``, ``F1..Fm``.
        provenance : mapping, optional
            Free-form description saved with the statistics.

        Returns
        -------
        SummaryStats
        """
        if covariates is None and hasattr(X, "columns"):
            covariates = [str(c) for c in X.columns]
        if random is None and hasattr(Z, "columns"):
            random = [str(c) for c in Z.columns]
        X = np.asarray(X, dtype=np.float64)
        Z = Z.tocsr().astype(np.float64) if sp.issparse(Z) else np.asarray(Z, dtype=np.float64)
        if sp.issparse(Y):
            Y = sp.csr_matrix(Y, dtype=np.float64)
        else:
            Y = np.asarray(Y, dtype=np.float64)
        if X.ndim != 2 or Z.ndim != 2 or Y.ndim != 2:
            raise InputError(
                f"X, Y and Z must be 2-dimensional, got shapes {X.shape}, {Y.shape}, {Z.shape}"
            )
        n = X.shape[0]
        if Y.shape[1] != n or Z.shape[0] != n:
            raise InputError(
                f"X has {n} rows (cells) but Y has {Y.shape[1]} columns and Z has "
                f"{Z.shape[0]} rows; Y must be features x cells (transpose an AnnData-style "
                "cells x features matrix) and X, Z cells x columns"
            )
        m, p, q = Y.shape[0], X.shape[1], Z.shape[1]
        # Y @ X is (sparse or dense) @ dense: never densifies Y
        XY = np.asarray(Y @ X).T
        ZY = _dense(Z.T @ Y.T) if sp.issparse(Z) else np.asarray(Y @ Z).T
        if sp.issparse(Y):
            Ynorm = np.asarray(Y.multiply(Y).sum(axis=1)).ravel()
        else:
            Ynorm = np.einsum("ji,ji->j", Y, Y)
        ZX = np.asarray(Z.T @ X)
        ZZ = _dense(Z.T @ Z)
        d = (q,) if d is None else tuple(d)
        return cls(
            XX=X.T @ X,
            XY=XY,
            ZX=ZX,
            ZY=ZY,
            ZZ=ZZ,
            Ynorm=Ynorm,
            n=n,
            d=d,
            covariates=_names(
                [f"X{i + 1}" for i in range(p)] if covariates is None else covariates, "covariates"
            ),
            random=_names([f"Z{i + 1}" for i in range(q)] if random is None else random, "random"),
            components=_names(
                [f"var{k + 1}" for k in range(len(d))] if components is None else components,
                "components",
            ),
            features=_names(
                [f"F{i + 1}" for i in range(m)] if features is None else features, "features"
            ),
            provenance=provenance or {},
        )

    def to_dict(self) -> dict[str, Any]:
        """The statistics as the dictionary the fitter takes.

        Returns
        -------
        dict
            Keys ``XX``, ``XY``, ``ZX``, ``ZY``, ``ZZ``, ``Ynorm`` (read-only float64 arrays),
            ``n`` (int) and ``d`` (tuple of int).
        """
        out: dict[str, Any] = {name: getattr(self, name) for name in _ARRAYS}
        out["n"] = self.n
        out["d"] = self.d
        return out

    # -- algebra -----------------------------------------------------------------------

    def __add__(self, other: object) -> SummaryStats:
        """The statistics of the union of two cell-disjoint datasets (same design/features)."""
        if not isinstance(other, SummaryStats):
            return NotImplemented
        differences = [
            _describe_difference(name, getattr(self, name), getattr(other, name))
            for name in ("covariates", "random", "components", "d", "features")
            if getattr(self, name) != getattr(other, name)
        ]
        if differences:
            raise InputError(
                "cannot add summary statistics computed with different designs or features; "
                + "; ".join(differences)
                + ". Reduce both datasets with the same formulas and features (use "
                "subset() to align features)"
            )
        if self.provenance == other.provenance:
            provenance: dict[str, Any] = dict(self.provenance)
        else:
            parts = [
                part
                for stats in (self, other)
                for part in stats.provenance.get("parts", [stats.provenance])
            ]
            provenance = {"parts": parts}
        sums = {name: getattr(self, name) + getattr(other, name) for name in _ARRAYS}
        return SummaryStats(
            **sums,
            n=self.n + other.n,
            d=self.d,
            covariates=self.covariates,
            random=self.random,
            components=self.components,
            features=self.features,
            provenance=provenance,
            nnz=None if self.nnz is None or other.nnz is None else self.nnz + other.nnz,
        )

    def __radd__(self, other: object) -> SummaryStats:
        # lets sum([a, b, c]) start from its default 0
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def subset(self, features: FeatureSelection) -> SummaryStats:
        """The statistics of a subset of the features, in the order given.

        Parameters
        ----------
        features : sequence of str, sequence of int, or boolean mask of length m
            Feature names, integer positions (negative counts from the end) or a mask.

        Returns
        -------
        SummaryStats
            Same shared statistics; XY, ZY and Ynorm restricted to the selection.
        """
        index = self._feature_positions(features)
        return SummaryStats(
            XX=self.XX,
            XY=self.XY[:, index],
            ZX=self.ZX,
            ZY=self.ZY[:, index],
            ZZ=self.ZZ,
            Ynorm=self.Ynorm[index],
            n=self.n,
            d=self.d,
            covariates=self.covariates,
            random=self.random,
            components=self.components,
            features=tuple(self.features[i] for i in index),
            provenance=self.provenance,
            nnz=None if self.nnz is None else self.nnz[index],
        )

    def _feature_positions(self, features: FeatureSelection) -> np.ndarray:
        if isinstance(features, str):
            features = [features]
        sel = np.asarray(features)
        if sel.size == 0:
            raise InputError("the feature selection is empty; select at least one feature")
        if sel.ndim != 1:
            raise InputError(f"select features with a 1-dimensional sequence, got {sel.shape}")
        m = self.m
        if sel.dtype == bool:
            if sel.shape[0] != m:
                raise InputError(f"the boolean mask has length {sel.shape[0]}, expected m={m}")
            index = np.flatnonzero(sel)
            if index.size == 0:
                raise InputError("the boolean mask selects no feature; select at least one")
            return index
        if np.issubdtype(sel.dtype, np.integer):
            bad = sel[(sel < -m) | (sel >= m)]
            if bad.size:
                raise InputError(
                    f"feature position {int(bad[0])} is out of range for m={m} features"
                )
            return np.where(sel < 0, sel + m, sel)
        if sel.dtype.kind not in "UO":
            raise InputError(
                f"select features by name, integer position or boolean mask, not {sel.dtype}"
            )
        positions: dict[str, int] = {}
        duplicated: set[str] = set()
        for i, name in enumerate(self.features):
            if name in positions:
                duplicated.add(name)
            positions[name] = i
        names = [str(s) for s in sel]
        missing = [s for s in names if s not in positions]
        if missing:
            raise InputError(
                f"{len(missing)} of the selected features are not in the statistics, e.g. "
                f"{missing[:5]}; the statistics have {m} features such as "
                f"{list(self.features[:5])}"
            )
        ambiguous = [s for s in names if s in duplicated]
        if ambiguous:
            raise InputError(
                f"feature names {ambiguous[:5]} occur more than once in the statistics; "
                "select these features by integer position"
            )
        return np.array([positions[s] for s in names], dtype=np.intp)

    # -- storage -----------------------------------------------------------------------

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        """Write the statistics to a Zarr group.

        Local paths are written to a temporary sibling and renamed into place, so a failed
        write leaves nothing at ``path``. Other fsspec URLs (``s3://``, ``gs://``, ...) are
        written in place with ``complete=False`` and marked complete last; :meth:`load`
        refuses an incomplete store.

        Parameters
        ----------
        path : str or path-like
            Local directory or fsspec URL of the Zarr group.
        overwrite : bool
            Replace an existing summary-statistics store at ``path``. Anything else at
            ``path`` is never replaced.
        storage_options : mapping, optional
            Passed to fsspec for URLs.

        Raises
        ------
        StoreError
            ``path`` exists and ``overwrite`` is False, or it is not a summary-statistics
            store, or the write fails.
        InputError
            The provenance is not JSON-serialisable.
        """
        save_stats(self, path, overwrite=overwrite, storage_options=storage_options)

    def _attrs(self) -> dict[str, Any]:
        attrs = {
            "format": FORMAT,
            # version 1 when there is nothing of version 2 (nnz): older readers load it
            "format_version": FORMAT_VERSION if self.nnz is not None else 1,
            "package_version": package_version(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "complete": False,
            "n": self.n,
            "d": list(self.d),
            "covariates": list(self.covariates),
            "random": list(self.random),
            "components": list(self.components),
            "features": list(self.features),
            "provenance": dict(self.provenance),
        }
        try:
            json.dumps(attrs["provenance"], allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"provenance must be JSON-serialisable (strings, numbers, lists, dicts): {exc}"
            ) from None
        return attrs

    def _write_group(self, store: Any, attrs: dict[str, Any], options: dict[str, Any]) -> None:
        import zarr.api.asynchronous as zarr_async
        from zarr.core.sync import sync

        from flashmm_dask.io.zarr_batch import settled

        # the attributes in two writes of the group's metadata, not one per key: first
        # all but the feature names (thousands of them), then the names with the mark
        head = dict(attrs, complete=False)
        last: dict[str, Any] = {"complete": True}
        if "features" in head:
            head["features"], last["features"] = [], head["features"]
        arrays = {name: np.ascontiguousarray(getattr(self, name)) for name in _ARRAYS}
        if self.nnz is not None:
            arrays["nnz"] = np.ascontiguousarray(self.nnz)
        codecs = compressors()

        async def write() -> None:
            # one call of zarr's event loop, not one per array: on a busy worker each call
            # waits for the GIL
            group = await zarr_async.open_group(
                store=store,
                mode="w",
                zarr_format=3,
                storage_options=options or None,
                attributes=head,
            )
            await settled(
                group.create_array(
                    name,
                    data=values,
                    chunks=chunk_shape(values.shape),
                    compressors=codecs,
                    config=ARRAY_CONFIG,
                )
                for name, values in arrays.items()
            )
            # marking completion last: a reader that sees complete=True sees every array
            await group.update_attributes(last)

        sync(write())

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
    ) -> SummaryStats:
        """Read statistics written by :meth:`save`.

        Parameters
        ----------
        path : str or path-like
            Local directory or fsspec URL of the Zarr group.
        storage_options : mapping, optional
            Passed to fsspec for URLs.

        Returns
        -------
        SummaryStats

        Raises
        ------
        StoreError
            Nothing readable at ``path``, a store of another format or a newer format
            version, an incomplete write, or inconsistent contents.
        """
        return load_summary(cls, path, storage_options=storage_options)
