"""The results store: one Zarr group that feature blocks are written into independently.

Layout (Zarr format 3; ``xarray.open_zarr`` opens it as a Dataset)::

    dims      feature (m), covariate (p), covariate2 (p), component (K+1), contrast (c >= 0),
              block (n_blocks)
    coords    feature, covariate, covariate2, component, contrast        (strings)
    (feature, covariate)              coef, se, t, p, df, padj
    (feature, component)              theta, se_theta, dlogL
    (feature,)                        logLik, niter, converged (bool), status (int8)
    (feature, covariate, covariate2)  cov                               (if store_cov)
    (feature, contrast)               contrast_coef, contrast_se, contrast_t, contrast_p,
                                      contrast_df, contrast_padj
    (block,)                          block_done (bool): the resume record

Every per-feature array is chunked along ``feature`` by ``block_size`` and whole along its
other dimensions, so block b of the fit is chunk b of each array: workers writing different
blocks never touch the same chunk, and rewriting a block is idempotent. A block is marked
in ``block_done`` only after all of its arrays are written, and the group attribute
``complete`` becomes True only after the Benjamini-Hochberg adjusted p-values (``padj``,
``contrast_padj``, within each covariate / contrast) have been written by
:func:`finalize_results`.

``status`` says why a feature's results may not be usable, one code per feature (the
code table is in the array's ``flag_values`` / ``flag_meanings`` attributes, CF style;
:data:`STATUS` lists the meanings in code order): 0 ``ok``; 1 ``not_converged``; 2
``all_zero`` (not fitted: NaN results); 3 ``constant`` (no residual variation once the
fixed effects are fitted: the feature is constant, or a combination of the covariates);
4 ``non_finite`` (a coefficient, standard error, variance component or log-likelihood is
NaN or infinite); 5 ``boundary`` (a variance component held at zero, ``nonnegative``
fits); 6 ``negative_variance`` (a variance component below zero, unconstrained fits);
7 ``filtered`` (not fitted: non-zero in fewer cells than ``model.min_cells``).
:mod:`flashmm_dask.model.status` computes them. -1 marks a feature not yet written.

Metadata is consolidated into the root ``zarr.json`` when the store is created (array
metadata never changes afterwards; root attributes live in that same document), so that a
plain ``xarray.open_zarr(path)`` opens it without probing every array.

A *path* is a local path or an fsspec URL (``memory://``, ``s3://``, ``gs://``, ...). Local
stores are created under a temporary sibling and renamed into place, so an interrupted
creation leaves nothing that looks like a store.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import zarr

from flashmm_dask.errors import StoreError
from flashmm_dask.io.paths import Location, locate
from flashmm_dask.io.results_attrs import _default_versions, _user_attrs, redact
from flashmm_dask.io.results_finalize import Finalizing, finalize_groups
from flashmm_dask.io.results_layout import _COORDS, _VARS, ResultsLayout
from flashmm_dask.io.tables import results_table, write_tables
from flashmm_dask.io.writing import staged
from flashmm_dask.io.zarr_batch import create_arrays, write_arrays
from flashmm_dask.model.status import STATUS, finite_features, status_codes

if TYPE_CHECKING:
    import xarray as xr

    from flashmm_dask.model.fit import LmmFit

logger = logging.getLogger(__name__)

FORMAT = "flashmm_dask.results"
FORMAT_VERSION = 1


def _check_format(attrs: Mapping[str, Any], shown: str) -> None:
    fmt, version = attrs.get("format"), attrs.get("format_version")
    if fmt != FORMAT:
        raise StoreError(
            f"{shown!r} is not a flashmm_dask results store: its format attribute is {fmt!r}, "
            f"expected {FORMAT!r}"
        )
    if not isinstance(version, int) or version < 1:
        raise StoreError(
            f"{shown!r} has an invalid format_version {version!r}; the store is corrupt"
        )
    if version > FORMAT_VERSION:
        raise StoreError(
            f"{shown!r} has results store format version {version}, newer than this "
            f"flashmm_dask reads ({FORMAT_VERSION}); upgrade flashmm_dask to read it"
        )
    if version != FORMAT_VERSION:
        raise StoreError(
            f"{shown!r} has results store format version {version}, which this flashmm_dask "
            f"(format version {FORMAT_VERSION}) cannot read; refit to write a current store"
        )


def _array(group: zarr.Group, name: str) -> zarr.Array:
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{name!r} in the results store is a group, not an array; it is corrupt")
    return node


def _int_attr(group: zarr.Group, name: str) -> int:
    value: Any = group.attrs[name]
    return int(value)


def _locate(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None) -> Location:
    return locate(path, storage_options, error=StoreError)


def open_group(loc: Location, mode: Literal["r", "r+", "w-"]) -> zarr.Group:
    """Open the root group of a results store; a missing store raises StoreError."""
    try:
        return zarr.open_group(
            store=loc.url, mode=mode, zarr_format=3, storage_options=loc.options or None
        )
    except FileNotFoundError as exc:
        if loc.local and os.path.exists(loc.url):
            why = (
                "something is there, but not a Zarr format 3 group: not a results "
                "store; give the results.zarr in a run's output folder"
            )
        else:
            why = "nothing there, or not a Zarr group; check the path (and "
            why += "storage_options for URLs)"
        raise StoreError(f"no results store at {loc.shown!r}: {why}") from exc


def _open_checked(target: Location, mode: Literal["r", "r+"]) -> zarr.Group:
    group = open_group(target, mode)
    _check_format(dict(group.attrs), target.shown)
    return group


# -- creating -------------------------------------------------------------------------


def _removable(target: Location) -> bool:
    """Whether an existing location may be replaced: a results store, an empty folder, or
    a group of results arrays without attributes (an interrupted creation at a URL)."""
    if target.local and os.path.isdir(target.url) and not os.listdir(target.url):
        return True
    try:
        group = open_group(target, "r")
    except (StoreError, ValueError, OSError, TypeError):
        return False
    if group.attrs.get("format") == FORMAT:
        return True
    ours = {*_VARS, *_COORDS, "block_done"}
    return not dict(group.attrs) and set(group.keys()) <= ours


def _write_group(group: zarr.Group, layout: ResultsLayout, attrs: dict[str, Any]) -> None:
    """Create every array of ``layout`` in the empty ``group``, then its attributes (in one
    call of Zarr's event loop: :func:`~flashmm_dask.io.zarr_batch.create_arrays`)."""
    create_arrays(group, layout, attrs)


def full_attrs(
    layout: ResultsLayout, attrs: Mapping[str, Any], versions: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The attributes :func:`create_results` gives a store of ``layout``: ``attrs`` (checked)
    with the managed ones, the versions (default: the installed ones, ``versions``) and
    the time of creation."""
    managed = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "block_size": layout.block_size,
        "n_blocks": layout.n_blocks,
    }
    user = _user_attrs(attrs, "attrs", managed)
    given = user.get("versions", {})
    installed = _default_versions() if versions is None else dict(versions)
    return {
        **managed,
        **user,
        "versions": {**installed, **(given if isinstance(given, dict) else {})},
        "created": user.get("created", datetime.now(UTC).isoformat(timespec="seconds")),
    }


def create_results(
    path: str | os.PathLike[str],
    layout: ResultsLayout,
    attrs: Mapping[str, Any],
    *,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Create an empty results store: every array filled with NaN (False for booleans).

    Parameters
    ----------
    path : local path or fsspec URL
    layout : ResultsLayout
    attrs : mapping
        JSON-serialisable group attributes (method, fixed, random, n_cells, epsilon,
        alternative, config, config_hash, versions, timings, ...). Entries named
        ``storage_options`` anywhere in it are redacted. ``created`` defaults to now and
        ``versions`` to the installed versions of flashmm_dask, numpy, scipy and zarr.
        format, format_version, complete, block_size and n_blocks are set here (given,
        they must agree).
    overwrite : bool
        Replace an existing results store at ``path``. Anything else there (a folder with
        other files, another Zarr store) is never removed.
    storage_options : mapping, optional
        fsspec options for URLs (ignored for local paths).

    Raises
    ------
    StoreError
        Something exists at ``path`` (and ``overwrite`` is False or it is not a results
        store), or the store cannot be written.
    InputError
        ``attrs`` is not JSON-serialisable or sets an attribute this module manages.
    """
    target = _locate(path, storage_options)
    full = full_attrs(layout, attrs)
    if target.exists():
        if not overwrite:
            raise StoreError(
                f"{target.shown!r} already exists; choose another output path, or overwrite it "
                "(overwrite=True / --overwrite) to replace it"
            )
        if not _removable(target):
            raise StoreError(
                f"{target.shown!r} exists and is not a flashmm_dask results store; refusing to "
                "overwrite it. Remove it yourself or choose another output path"
            )
    if target.local:
        _create_local(target, layout, full)
    else:
        fs, fs_path = target.fs()
        if fs.exists(fs_path):
            fs.rm(fs_path, recursive=True)
        group = open_group(target, "w-")
        _write_group(group, layout, full)
    logger.info(
        "created results store %s: %d features in %d blocks of %d",
        target.shown,
        layout.n_features,
        layout.n_blocks,
        layout.block_size,
    )


def _create_local(target: Location, layout: ResultsLayout, attrs: dict[str, Any]) -> None:
    try:
        with staged(Path(target.url)) as tmp:
            _write_group(zarr.open_group(store=str(tmp), mode="w-", zarr_format=3), layout, attrs)
    except OSError as exc:
        raise StoreError(f"cannot create the results store {target.shown!r}: {exc}") from exc


# -- writing blocks -------------------------------------------------------------------


def read_layout(
    path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> ResultsLayout:
    """The :class:`ResultsLayout` of an existing results store (to check a resume)."""
    target = _locate(path, storage_options)
    return _layout(_open_checked(target, "r"), target.shown)


def _layout(group: zarr.Group, shown: str) -> ResultsLayout:
    try:
        names = {dim: tuple(str(x) for x in np.asarray(_array(group, dim)[:])) for dim in _COORDS}
        block_size = _int_attr(group, "block_size")
    except KeyError as exc:
        raise StoreError(
            f"the results store {shown!r} is corrupt: {exc} is missing; recreate it "
            "(rerun with overwrite)"
        ) from exc
    return ResultsLayout(
        features=names["feature"],
        covariates=names["covariate"],
        components=names["component"],
        contrasts=names["contrast"],
        block_size=block_size,
        store_cov="cov" in group,
    )


def _block_array(name: str, value: Any, shape: tuple[int, ...], b: int) -> np.ndarray:
    dtype = _VARS[name].dtype
    a = np.asarray(value)
    if dtype == "bool":
        if a.dtype != np.bool_:
            raise StoreError(f"block {b}: {name} must be a boolean array; got dtype {a.dtype}")
    elif dtype == "int8":
        codes = np.issubdtype(a.dtype, np.integer) and (
            a.size == 0 or (0 <= a.min() and a.max() < len(STATUS))
        )
        if not codes:
            raise StoreError(
                f"block {b}: {name} must hold integer codes 0..{len(STATUS) - 1}; got dtype "
                f"{a.dtype}" + (f", values {a.min()}..{a.max()}" if a.size else "")
            )
    elif not any(np.issubdtype(a.dtype, kind) for kind in (np.integer, np.floating, np.bool_)):
        raise StoreError(f"block {b}: {name} must be numeric; got dtype {a.dtype}")
    if a.shape != shape:
        raise StoreError(f"block {b}: {name} has shape {a.shape}; expected {shape}")
    return np.ascontiguousarray(a, dtype=dtype)


def write_block(
    path: str | os.PathLike[str],
    b: int,
    arrays: Mapping[str, Any],
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Write the results of feature block ``b`` and mark the block done.

    Parameters
    ----------
    path : local path or fsspec URL of a store made by :func:`create_results`
    b : int
        Block number; its features are ``layout.block_slice(b)`` (nb of them).
    arrays : mapping name -> array
        coef, se, t, p, df : (nb, p); theta, se_theta, dlogL : (nb, K+1);
        logLik, niter : (nb,); converged : (nb,) bool; cov : (nb, p, p) when the store
        keeps covariances; contrast_coef, contrast_se, contrast_t, contrast_p,
        contrast_df : (nb, c) when the store has contrasts (c > 0). Not padj or
        contrast_padj: :func:`finalize_results` computes those. status : (nb,) int
        codes (see :data:`STATUS`), optional: by default derived from niter, converged
        and the finiteness of the results (never ``constant``).

    Raises
    ------
    StoreError
        Missing, unknown or misshaped arrays (nothing is written then), a block out of
        range, or a store already finalized.
    """
    target = _locate(path, storage_options)
    group = _open_checked(target, "r+")
    if group.attrs.get("complete"):
        raise StoreError(
            f"the results store {target.shown!r} is complete (finalized); it takes no more "
            "blocks. Write a new store (overwrite) to refit"
        )
    n_blocks, block_size = _int_attr(group, "n_blocks"), _int_attr(group, "block_size")
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 0 <= b < n_blocks:
        raise StoreError(
            f"block {b!r} is out of range: {target.shown!r} has blocks 0..{n_blocks - 1}"
        )

    def check(shapes: dict[str, tuple[int, ...]], m: int) -> dict[str, np.ndarray]:
        start = int(b) * block_size
        rows = slice(start, min(start + block_size, m))
        present = {name for name in _VARS if name in shapes}
        required = {
            name for name in present if _VARS[name].per_block and int(np.prod(shapes[name][1:])) > 0
        }
        required.discard("status")  # derived below when not given
        optional = {name for name in present if _VARS[name].per_block} - required
        given = set(arrays)
        problems = []
        if missing := sorted(required - given):
            problems.append(f"missing {', '.join(missing)}")
        if unknown := sorted(given - required - optional):
            why = {
                name: (
                    "computed by finalize_results"
                    if name in _VARS and not _VARS[name].per_block
                    else "not in this store"
                    if name in _VARS
                    else "unknown"
                )
                for name in unknown
            }
            problems.append("unexpected " + ", ".join(f"{k} ({v})" for k, v in why.items()))
        if problems:
            raise StoreError(
                f"block {b} for {target.shown!r}: {'; '.join(problems)}. Expected arrays: "
                f"{', '.join(sorted(required))}"
            )
        nb = rows.stop - rows.start
        checked = {
            name: _block_array(name, value, (nb, *shapes[name][1:]), int(b))
            for name, value in arrays.items()
        }
        if "status" in present and "status" not in checked:
            checked["status"] = status_codes(
                checked["niter"],
                checked["converged"],
                finite_features(checked),
                None,
                checked["theta"],
            )
        return checked

    # the arrays looked up in one call of Zarr's event loop, then checked and written
    write_arrays(group, int(b), block_size, check)
    logger.debug("wrote block %d to %s", b, target.shown)


def blocks_done(
    path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> np.ndarray:
    """Which blocks have been written: an (n_blocks,) bool array."""
    target = _locate(path, storage_options)
    group = _open_checked(target, "r")
    return np.asarray(_array(group, "block_done")[:], dtype=bool)


def read_store_attrs(
    path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The group attributes of a results store, after checking its format and version."""
    target = _locate(path, storage_options)
    return dict(_open_checked(target, "r").attrs)


def finalize_results(
    path: str | os.PathLike[str],
    *,
    extra_attrs: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    method: str = "BH",
) -> None:
    """Write the adjusted p-values and mark the store complete.

    ``padj`` and ``contrast_padj`` are Benjamini-Hochberg (``method="BH"``) or
    Benjamini-Yekutieli (``"BY"``) adjusted within each covariate and each contrast, over
    the features whose p-value is not NaN. ``extra_attrs`` (e.g.
    timings) are merged into the group attributes together with ``complete=True``, the
    last write.

    Raises
    ------
    StoreError
        Some blocks have not been written; rerun the fit to write them.
    """
    finalize_groups([finalizing(path, extra_attrs, storage_options=storage_options)], method)


def finalizing(
    path: str | os.PathLike[str],
    extra_attrs: Mapping[str, Any] | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    filtered: np.ndarray | None = None,
    counted: bool = False,
) -> Finalizing:
    """The results store at ``path`` opened and checked for :func:`finalize_groups`
    (``extra_attrs`` checked as :func:`finalize_results` takes them)."""
    target = _locate(path, storage_options)
    group = _open_checked(target, "r+")
    extra = _user_attrs(extra_attrs, "extra_attrs", {**group.attrs, "complete": True})
    return Finalizing(group, target.shown, extra, filtered=filtered, counted=counted)


# -- reading --------------------------------------------------------------------------


def open_results(
    path: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    allow_incomplete: bool = False,
) -> xr.Dataset:
    """Open a results store as a lazy ``xarray.Dataset`` (see the module docstring).

    Raises
    ------
    StoreError
        No store there, the wrong format or version, or a store whose run did not
        finish (unless ``allow_incomplete``: unwritten features then read as NaN).
    """
    import xarray as xr

    target = _locate(path, storage_options)
    group = _open_checked(target, "r")
    if "strata" in group.attrs:
        strata: Any = group.attrs["strata"]
        groups = dict(strata.get("groups", {}))
        raise StoreError(
            f"{target.shown!r} holds the results of {len(groups)} strata, one group each "
            f"({', '.join(list(groups.values())[:3])}...): open one of them, e.g. "
            f"open_results('{target.shown}/{next(iter(groups.values()), '')}'), or all with "
            "flashmm_dask.io.strata_results.open_strata"
        )
    if not group.attrs.get("complete") and not allow_incomplete:
        done = np.asarray(_array(group, "block_done")[:], dtype=bool)
        raise StoreError(
            f"the results store {target.shown!r} is incomplete: the run that writes it did not "
            f"finish ({int(done.sum())} of {done.size} blocks written). Rerun the same command "
            "to resume it (finished blocks are kept), or pass allow_incomplete=True to read "
            "what is there"
        )
    consolidated = group.metadata.consolidated_metadata is not None
    if target.local:
        return xr.open_zarr(target.url, consolidated=consolidated, zarr_format=3)
    return xr.open_zarr(
        target.url,
        consolidated=consolidated,
        zarr_format=3,
        storage_options=dict(target.storage_options),
    )


def fit_arrays(fit: LmmFit) -> dict[str, np.ndarray]:
    """The per-feature arrays of an :class:`~flashmm_dask.LmmFit` for :func:`write_block`.

    Transposes the (p, m) and (K+1, m) outputs to feature-first; ``cov`` is included
    when the fit has it. Contrast arrays are not included.
    """
    out = {
        "coef": fit.coef.T,
        "se": fit.se.T,
        "t": fit.t.T,
        "p": fit.p.T,
        "df": fit.df_array().T,
        "theta": fit.theta.T,
        "se_theta": fit.se_theta.T,
        "dlogL": fit.dlogL.T,
        "logLik": fit.logLik,
        "niter": np.asarray(fit.niter, dtype=np.float64),
        "converged": np.asarray(fit.converged, dtype=bool),
    }
    if fit.cov is not None:
        out["cov"] = fit.cov
    return out


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "STATUS",
    "ResultsLayout",
    "blocks_done",
    "create_results",
    "finalize_results",
    "finalizing",
    "finite_features",
    "fit_arrays",
    "full_attrs",
    "open_results",
    "read_layout",
    "read_store_attrs",
    "redact",
    "results_table",
    "status_codes",
    "write_block",
    "write_tables",
]
