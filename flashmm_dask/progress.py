"""Progress of long phases: a live bar on a terminal, log lines otherwise, and timings."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)


def interactive() -> bool:
    """Whether progress bars should be drawn (standard error is a terminal)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def wait(futures: Sequence[Any], what: str, *, show: bool) -> None:
    """Wait for Dask futures: a distributed progress bar when ``show``, else log lines.

    Log lines come at every tenth of the work, so a batch job's log shows how far a long
    run got.
    """
    from distributed import as_completed

    total = len(futures)
    if not total:
        return
    if show and interactive():
        from distributed.diagnostics.progressbar import progress

        progress(list(futures), notebook=False)
        return
    step = max(1, total // 10)
    for done, _ in enumerate(as_completed(list(futures)), start=1):
        if done % step == 0 or done == total:
            logger.info("%s: %d/%d done", what, done, total)


class Timings(dict):
    """Seconds per phase, filled by :meth:`phase`."""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        logger.info("%s ...", name)
        try:
            yield
        finally:
            self[name] = round(time.perf_counter() - start, 3)
            logger.info("%s: %.2f s", name, self[name])
