"""Progress of long phases: a live bar on a terminal, log lines otherwise, and timings."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)

_interrupted = threading.Event()  # set by stop_on_signals' handler


def stop_on_signals() -> None:
    """SIGINT (Ctrl-C) and SIGTERM (scancel, kill, a pod's termination) raise
    KeyboardInterrupt in the main thread, and are remembered: a library that catches the
    exception where it lands (a finalizer, a callback) cannot make the run go on, since
    every phase of :class:`Timings` stops at its start and end once one was received."""

    def handler(signum: int, frame: object) -> None:
        _interrupted.set()
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


def _stop_if_interrupted() -> None:
    if _interrupted.is_set():
        raise KeyboardInterrupt


def interactive() -> bool:
    """Whether progress bars should be drawn (standard error is a terminal)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def wait(futures: Sequence[Any], what: str, *, show: bool) -> None:
    """Wait for Dask futures and every task they depend on, reporting the progress.

    With ``show`` and standard error a terminal: a bar labelled with the phase
    (``reduction [#####     ]  50% | 12/24 tasks | 3.1s``), redrawn in place. Otherwise
    (a batch job's log, a pipe): a log line at every tenth of the tasks, so a log shows how
    far a long run got. The tasks are counted over the whole graph (for the reduction,
    every chunk read and summed), from the scheduler.
    """
    if not futures:
        return
    bar = PhaseProgress(list(futures), what, live=show and interactive())
    try:
        bar.run()
    except Exception as exc:  # the scheduler's feed: fall back to the futures themselves
        logger.debug("progress feed failed (%s); waiting on the futures", exc)
    # imported when used: distributed sets up its loggers on import, after the CLI's config
    from distributed import wait as wait_all

    wait_all(list(futures))


_INTERVAL = 0.1  # seconds between two reports of the scheduler's progress feed


def _bar_class() -> Any:
    from distributed.diagnostics.progressbar import TextProgressBar

    return TextProgressBar


class PhaseProgress:
    """Progress of the tasks behind some futures, from the scheduler's progress feed.

    Parameters
    ----------
    futures : the futures to follow (their dependencies are counted too)
    what : the phase's name, the label of the bar and of the log lines
    live : draw a bar on standard error (a terminal) instead of log lines
    """

    def __init__(self, futures: Sequence[Any], what: str, *, live: bool) -> None:
        self.what = what
        self.live = live
        self.logged = 0  # the last tenth logged (none before the first tenth is done)
        outer = self

        class _Feed(_bar_class()):  # type: ignore[misc]
            def _draw_bar(self, remaining: int, all: int, **kwargs: Any) -> None:
                outer.update(all - remaining, all, self.elapsed)

            def _draw_stop(self, **kwargs: Any) -> None:
                outer.stop(kwargs.get("status") == "finished")

        interval = f"{int(1000 * _INTERVAL)}ms"
        client = getattr(futures[0], "client", None)
        scheduler = client.scheduler.address if client is not None else None
        self._feed = _Feed(list(futures), scheduler, interval=interval, start=False)

    def run(self) -> None:
        """Follow the tasks until they are all finished (or one fails)."""
        self._feed._loop_runner.run_sync(self._feed.listen)
        # the scheduler's feed notices the closed comm at its next write; a scheduler
        # closed before that would log the feed's cancellation as an error
        time.sleep(2.5 * _INTERVAL)

    def update(self, done: int, total: int, elapsed: float) -> None:
        """Draw the bar, or log when the work crossed another tenth."""
        frac = done / total if total else 1.0
        if self.live:
            bar = "#" * int(30 * frac)
            sys.stderr.write(
                f"\r{self.what} [{bar:<30}] {int(100 * frac):3d}% | {done}/{total} tasks | "
                f"{elapsed:.1f}s"
            )
            sys.stderr.flush()
            return
        tenth = int(10 * frac)
        if tenth > self.logged:
            self.logged = tenth
            logger.info(
                "%s: %d%% (%d/%d tasks, %.1f s)", self.what, 10 * tenth, done, total, elapsed
            )

    def stop(self, finished: bool) -> None:
        """End the bar's line."""
        if self.live:
            sys.stderr.write("\n" if finished else "\r\33[2K")
            sys.stderr.flush()


class Timings(dict):
    """Seconds per phase, filled by :meth:`phase`."""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        _stop_if_interrupted()
        start = time.perf_counter()
        logger.info("%s ...", name)
        try:
            yield
        finally:
            self[name] = round(time.perf_counter() - start, 3)
        _stop_if_interrupted()  # an interrupt swallowed during the phase
        logger.info("%s: %.2f s", name, self[name])  # a phase that completed
