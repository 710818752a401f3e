"""The last writes of a results store: adjusted p-values, the status of the features not
fitted by choice, the status counts, and completion, for one group or for many in one
call of zarr's event loop.

A stratified run finalizes one results group per stratum (29 on the TB-shaped atlas);
each is a dozen small reads and writes, which one at a time cost ~25 ms a group on the
driver. :func:`finalize_groups` does them for all groups concurrently: the reads of a
group together, then its writes, then its attributes with ``complete`` (last, so that a
group marked complete is whole).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from flashmm_dask.errors import StoreError
from flashmm_dask.io.zarr_batch import arrays_of, run, settled
from flashmm_dask.model.status import STATUS
from flashmm_dask.numerics.inference import p_adjust

__all__ = ["Finalizing", "count_status", "finalize_groups"]

logger = logging.getLogger(__name__)

#: The status code of a feature not fitted by choice (``model.min_cells``).
FILTERED = STATUS.index("filtered")


def count_status(codes: np.ndarray) -> dict[str, int]:
    """Features per status name, from the ``status`` codes of a results group."""
    codes = np.asarray(codes)
    return {name: int((codes == k).sum()) for k, name in enumerate(STATUS)}


#: Statuses of converged features (``converged`` True): ok, and the fits with a variance
#: component at or below zero, otherwise whole.
CONVERGED = ("ok", "boundary", "negative_variance")
#: Statuses of features not fitted (NaN results).
UNFITTED = ("all_zero", "filtered")


def converged_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """n_converged, n_not_converged (fitted, not converged: not_converged, constant and
    non_finite) and n_zero (not fitted) from the counts per status: those of every
    summary and store (``converged`` is True exactly for the statuses of
    :data:`CONVERGED`)."""
    converged = sum(counts.get(name, 0) for name in CONVERGED)
    unfitted = sum(counts.get(name, 0) for name in UNFITTED)
    return {
        "n_converged": converged,
        "n_not_converged": sum(counts.values()) - converged - unfitted,
        "n_zero": unfitted,
    }


def counted_attrs(counts: Mapping[str, int]) -> dict[str, Any]:
    """The attributes a finalized group records of its status counts."""
    return {**converged_counts(counts), "status_counts": dict(counts)}


@dataclass
class Finalizing:
    """One results group to finalize.

    Attributes
    ----------
    group : the group, opened for writing and its format checked
    shown : its path as messages show it
    extra : attributes to record (checked: :func:`flashmm_dask.io.results_attrs._user_attrs`)
    filtered : the features to mark ``filtered`` (None: none)
    counted : record the status counts (:func:`counted_attrs`) with ``extra``
    """

    group: zarr.Group
    shown: str
    extra: dict[str, Any]
    filtered: np.ndarray | None = None
    counted: bool = False


async def _finalize(item: Finalizing, method: str) -> dict[str, int] | None:
    group = item.group._async_group
    found = await arrays_of(
        group, ["block_done", "p", "padj", "contrast_p", "contrast_padj", "status"]
    )
    if found.get("block_done") is None:
        raise StoreError(f"{item.shown!r} has no 'block_done' array: it is not a results store")
    done = np.asarray(await found["block_done"].getitem(...), dtype=bool)
    if not done.all():
        missing = np.flatnonzero(~done)
        shown = ", ".join(str(x) for x in missing[:10]) + (" ..." if missing.size > 10 else "")
        raise StoreError(
            f"{missing.size} of {done.size} blocks of {item.shown!r} are not written "
            f"(blocks {shown}); rerun the same command to fit them, then finalize"
        )
    pairs = [
        (found[p], found[padj])
        for p, padj in (("p", "padj"), ("contrast_p", "contrast_padj"))
        if found.get(p) is not None and int(np.prod(found[p].shape)) > 0
    ]
    status = found.get("status") if (item.counted or item.filtered is not None) else None
    reads = [p.getitem(...) for p, _ in pairs]
    if status is not None:
        reads.append(status.getitem(...))
    values = await settled(reads)
    writes = [
        padj.setitem(..., p_adjust(np.asarray(p_values), method, axis=0))
        for (_, padj), p_values in zip(pairs, values, strict=False)
    ]
    counts = None
    if status is not None:
        codes = np.array(values[-1])
        if item.filtered is not None and np.any(item.filtered):
            codes[np.asarray(item.filtered, dtype=bool)] = FILTERED
            writes.append(status.setitem(..., codes))
        counts = count_status(codes)
    await settled(writes)
    attrs = dict(item.extra)
    if item.counted and counts is not None:
        attrs.update(counted_attrs(counts))
    # one metadata write, the last: a group marked complete is whole
    await group.update_attributes({**attrs, "p_adjust": method, "complete": True})
    logger.info("finalized results store %s", item.shown)
    return counts


def finalize_groups(items: Sequence[Finalizing], method: str = "BH") -> list[dict[str, int] | None]:
    """Finalize the results groups ``items`` in one call of zarr's event loop: within
    each covariate and contrast, ``padj``/``contrast_padj`` adjusted by ``method`` (BH or
    BY) over the features whose p-value is not NaN; the ``filtered`` features' status;
    the ``extra`` attributes with ``complete=True``, written last.

    Returns
    -------
    list
        Each group's status counts (:func:`count_status`), or None where neither counts
        nor filtered features were asked for.

    Raises
    ------
    StoreError
        A group with blocks not written (every other group is finalized).
    """

    async def every() -> list[dict[str, int] | None]:
        return await settled(_finalize(item, method) for item in items)

    return run(every())
