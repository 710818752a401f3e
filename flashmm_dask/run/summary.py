"""What a run did: :class:`RunSummary` (and :class:`StrataRunSummary`), its one-line
summary, and the warnings about features that need a look (not converged, constant, ...).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flashmm_dask.io.results import STATUS
from flashmm_dask.io.results_finalize import converged_counts, count_status

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSummary:
    """What a run did.

    Attributes
    ----------
    output : the output folder;  store : the results store inside it
    n_features, n_blocks : the size of the job
    blocks_fitted : blocks fitted by this invocation (a resumed run skips the others)
    n_converged, n_not_converged, n_zero : over all features of the store
    timings : seconds per phase;  files : tables and plots written
    status_counts : features per status code (ok, not_converged, all_zero, constant,
        non_finite, boundary, negative_variance; see :data:`flashmm_dask.model.status.STATUS`)
    """

    output: Path
    store: Path
    n_features: int
    n_blocks: int
    blocks_fitted: tuple[int, ...]
    n_converged: int
    n_not_converged: int
    n_zero: int
    timings: dict[str, float]
    files: tuple[Path, ...] = field(default=())
    status_counts: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        """The one-line summary printed at the end of a run."""
        if self.status_counts:
            counts = ", ".join(
                f"{self.status_counts.get(name, 0)} {_STATUS_LABELS[name]}" for name in STATUS
            )
        else:  # a store written before the status codes
            counts = (
                f"{self.n_converged} converged, {self.n_not_converged} not converged, "
                f"{self.n_zero} all-zero (not fitted)"
            )
        return (
            f"{self.n_features} features in {self.n_blocks} blocks "
            f"({len(self.blocks_fitted)} fitted now): {counts}; results in {self.store}"
        )


_STATUS_LABELS = {
    "ok": "ok",
    "not_converged": "not converged",
    "all_zero": "all-zero (not fitted)",
    "constant": "constant (no residual variation)",
    "non_finite": "with non-finite results",
    "boundary": "with a variance component at zero",
    "negative_variance": "with a negative variance component",
    "filtered": "filtered (too few non-zero cells)",
}
_STATUS_ADVICE = {
    "not_converged": (
        "converged = false; raise model.max_iter where niter reached it; where it stopped "
        "earlier the values are large (R's rule max |dlogL| <= model.epsilon holds at once, "
        "the score shrinking with the square of their scale): lower model.epsilon (e.g. "
        "1e-12) or rescale the values"
    ),
    "all_zero": "not fitted, their results are NaN",
    "constant": "the fixed effects explain them exactly: no test is possible (se, p NaN)",
    "non_finite": "some of their results are NaN or infinite",
    "filtered": "not fitted: non-zero in fewer cells than model.min_cells",
    "negative_variance": (
        "unconstrained fit (model.nonnegative: false); their standard errors of effects "
        "between subjects are too small: use model.nonnegative: true"
    ),
}


@dataclass(frozen=True)
class StrataRunSummary(RunSummary):
    """A :class:`RunSummary` of a stratified run; counts are summed over the strata.

    Attributes (besides RunSummary's)
    ---------------------------------
    by : the obs column;  strata : the fitted levels;  skipped : level -> reason
    """

    by: str | None = None
    strata: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        counts = ", ".join(
            f"{self.status_counts.get(name, 0)} {_STATUS_LABELS[name]}" for name in STATUS
        )
        skipped = (
            f", {len(self.skipped)} skipped ({', '.join(self.skipped)})" if self.skipped else ""
        )
        return (
            f"{len(self.strata)} strata of {self.by}{skipped}: {self.n_features} features in "
            f"{self.n_blocks} blocks ({len(self.blocks_fitted)} fitted now); over all strata "
            f"{counts}; results in {self.store}"
        )


def advise(status_counts: dict[str, int]) -> None:
    """Log a warning, with what to do, for each status that needs a look."""
    for name, advice in _STATUS_ADVICE.items():
        if status_counts.get(name):
            logger.warning(
                "%d features %s: %s (results column status = %s)",
                status_counts[name],
                _STATUS_LABELS[name].replace("with ", "have "),
                advice,
                name,
            )


def counts_of(ds: Any) -> dict[str, Any]:
    """Features converged, not converged, not fitted and per status code in ``ds``."""
    if "status" in ds:  # the numbers of the status counts, as every store records them
        status_counts = count_status(np.asarray(ds["status"].values))
        return {**converged_counts(status_counts), "status_counts": status_counts}
    # a store written before the status codes
    fitted = ~np.isnan(ds["niter"].values)
    converged = ds["converged"].values.astype(bool)
    return {
        "n_converged": int(converged.sum()),
        "n_not_converged": int((fitted & ~converged).sum()),
        "n_zero": int((~fitted).sum()),
    }
