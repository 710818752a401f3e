"""The summary statistics of several strata: a mapping level -> SummaryStats, saved as one
store.

On disk (format ``flashmm_dask.summary_stats``, version 2) the root group's attributes
hold ``strata``: ``by``, the fitted ``levels`` in level order, the ``groups`` (the path of
each level's group), the ``skipped`` levels with their reasons and the cell counts, and
each stratum is a complete SummaryStats group at ``strata/<group>``
(:meth:`SummaryStats.load` reads one alone). The root is marked complete last. Local
stores are written under a temporary sibling and renamed into place.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flashmm_dask.errors import StoreError
from flashmm_dask.io.writing import package_version
from flashmm_dask.stats.store import save_local
from flashmm_dask.stats.summary import FORMAT, FORMAT_VERSION, SummaryStats

__all__ = ["StratifiedStats", "load_stats", "save_strata"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class StratifiedStats(Mapping[str, SummaryStats]):
    """Summary statistics per stratum, in level order (a read-only mapping).

    Attributes
    ----------
    stats : level -> SummaryStats
    by : the obs column of the strata, or None (one stratum of selected cells)
    groups : level -> the group name in stores (``strata/<group>``)
    info : JSON-able description (skipped levels and reasons, cell counts, selection)
    """

    stats: dict[str, SummaryStats]
    by: str | None
    groups: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, level: str) -> SummaryStats:
        return self.stats[level]

    def __iter__(self) -> Iterator[str]:
        return iter(self.stats)

    def __len__(self) -> int:
        return len(self.stats)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k!r}: n={v.n}" for k, v in self.stats.items())
        return f"StratifiedStats(by={self.by!r}, {{{inner}}})"

    def subset(self, features: Any) -> StratifiedStats:
        """The same strata restricted to a feature selection (see SummaryStats.subset)."""
        return StratifiedStats(
            {k: v.subset(features) for k, v in self.stats.items()}, self.by, self.groups, self.info
        )

    def with_provenance(self, extra: Mapping[str, Any]) -> StratifiedStats:
        """A copy whose strata's provenance also holds ``extra``."""
        out = {
            level: dataclasses.replace(stats, provenance={**stats.provenance, **extra})
            for level, stats in self.stats.items()
        }
        return StratifiedStats(out, self.by, self.groups, self.info)

    @property
    def provenance(self) -> dict[str, Any]:
        """The provenance of the first stratum (shared by all)."""
        return dict(next(iter(self.stats.values())).provenance)

    def attrs(self) -> dict[str, Any]:
        """The ``strata`` attribute of the store."""
        return {
            "by": self.by,
            "levels": list(self.stats),
            "groups": {k: f"strata/{self.groups[k]}" for k in self.stats},
            **{k: v for k, v in self.info.items() if k not in ("by", "levels")},
        }

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write every stratum into one store at the local path ``path``.

        Raises
        ------
        StoreError
            ``path`` exists and ``overwrite`` is False, or is not a statistics store, or
            the write fails.
        """

        def write_groups(tmp: Path) -> None:
            for level, stats in self.stats.items():
                stats._write_group(str(tmp / "strata" / self.groups[level]), stats._attrs(), {})

        save_strata(path, self.attrs(), write_groups, overwrite=overwrite)
        logger.info("wrote the summary statistics of %d strata to %s", len(self), path)


def save_strata(
    path: str | os.PathLike[str],
    strata: dict[str, Any],
    write_groups: Callable[[Path], object],
    *,
    overwrite: bool = False,
) -> None:
    """Write a store of strata at the local path ``path``: the root's attributes
    (``strata``: :meth:`StratifiedStats.attrs`), then ``write_groups(tmp)`` writes each
    stratum's SummaryStats group under ``tmp/strata/``, then the root is marked complete
    (the whole staged into place, see :func:`~flashmm_dask.stats.store.save_local`)."""
    import zarr

    def write(tmp: Path) -> None:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        root.attrs.update(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "package_version": package_version(),
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "complete": False,
                "strata": strata,
            }
        )
        root.create_group("strata")  # explicit, so that Zarr readers list the strata
        write_groups(tmp)
        root.attrs["complete"] = True

    save_local(path, overwrite, write)


def load_stats(path: str | os.PathLike[str]) -> SummaryStats | StratifiedStats:
    """Read a statistics store: a SummaryStats, or a StratifiedStats for a store of strata.

    Raises
    ------
    StoreError
        Nothing readable there, another format, a newer version, or an incomplete write.
    """
    import zarr

    try:
        root = zarr.open_group(str(path), mode="r")
        attrs = dict(root.attrs)
    except (FileNotFoundError, OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(
            f"no summary-statistics store at {path}: {exc}; write one with flashmm-dask stats"
        ) from exc
    strata: Any = attrs.get("strata")
    if not isinstance(strata, Mapping):
        return SummaryStats.load(path)
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{path} is not a summary-statistics store")
    version = attrs.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StoreError(
            f"{path} was written in format version {version!r}; this version reads up to "
            f"{FORMAT_VERSION}: upgrade flashmm_dask"
        )
    if attrs.get("complete") is not True:
        raise StoreError(
            f"{path} is incomplete (its write was interrupted); compute and save the "
            "statistics again"
        )
    stats: dict[str, SummaryStats] = {}
    groups: dict[str, str] = {}
    for level in strata["levels"]:
        group = str(strata["groups"][level])
        stats[str(level)] = SummaryStats.load(str(Path(path) / group))
        groups[str(level)] = group.split("/", 1)[1]
    info = {k: v for k, v in strata.items() if k not in ("by", "levels", "groups")}
    return StratifiedStats(stats, strata.get("by"), groups, info)
