"""Progress lines for long runs: done / total, files per second and the time left.

One reporter serves the ingest and the upload. It is told how many files are done whenever
the caller knows, and writes a line only when ``interval`` seconds have passed since the
last one, so a caller may tell it after every file or every batch. The clock and the log
function are passed in: a test drives it with a fake clock, the Dagster layer hands it
``context.log.info``. The lines hold counts only, never a path or a patient.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: Seconds between two progress lines (the issue asks for at least one every 10 s).
PROGRESS_INTERVAL_SECONDS = 10.0


def _duration(seconds: float) -> str:
    """'45 s', '12 min', '3 h 20 min': rounded as an estimate should be."""
    if seconds < 90:
        return f"{max(0, round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


class ProgressReporter:
    """Writes ``<what>: <done> / <total> files (<pct>%), <rate> files/s, about <eta> left``."""

    def __init__(
        self,
        what: str,
        total: int,
        log: Callable[[str], None],
        *,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.total, self.log, self.clock = what, total, log, clock
        # Read when the run starts, not when the module is imported (a test shortens it).
        self.interval = PROGRESS_INTERVAL_SECONDS if interval is None else interval
        self.started = self.last_line = clock()

    def update(self, done: int, note: str = "") -> None:
        """Note ``done`` files; a line (with ``note`` at its end) if ``interval`` has passed
        since the last one."""
        now = self.clock()
        if now - self.last_line >= self.interval:
            self.last_line = now
            self.log(self.line(done, now) + (f"; {note}" if note else ""))

    def line(self, done: int, now: float) -> str:
        # The total is counted before the run: files added meanwhile can make done exceed it.
        total = max(self.total, done)
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        share = f" ({100 * done / total:.0f}%)" if total else ""
        if done >= total:
            left = "finishing"
        elif rate > 0:
            left = f"about {_duration((total - done) / rate)} left"
        else:
            left = "time left not known yet"
        return f"{self.what}: {done} / {total} files{share}, {rate:.1f} files/s, {left}"
