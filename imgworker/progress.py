"""Live progress: one rewritten line on a terminal, a periodic log line otherwise."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import IO

from .logs import Console, console
from .recorder import Snapshot

log = logging.getLogger(__name__)


def progress_line(snapshot: Snapshot) -> str:
    """rate, queue depth, in flight, outcome counts and failure rate in one line."""
    report, gauges = snapshot.report, snapshot.gauges
    done = sum(report.outcomes.values())
    counts = " ".join(f"{name}={n}" for name, n in report.outcomes.items() if n)
    return (
        f"{report.wall_s:6.1f}s {done} done {report.throughput_per_s:.1f}/s | queue {gauges.queue_depth} "
        f"in flight {gauges.in_flight} lanes {report.lanes} | {counts or 'no outcomes yet'} "
        f"| failure rate {report.failure_rate:.2%}"
    )


class Progress:
    """The status line every ``interval_s`` on a terminal; off one, a ``progress:`` log line every ``log_interval_s``.

    On a terminal the line goes through the console that log records use (one lock: clear, emit,
    redraw), so a record never lands in the middle of it. Off a terminal nothing is rewritten: each
    progress line is a plain log record, like any other one line.
    """

    def __init__(self, interval_s: float, *, log_interval_s: float | None = None, enabled: bool = True,
                 stream: IO[str] | None = None) -> None:
        self.console = Console(stream) if stream is not None else console()
        self.tty = self.console.tty
        self.interval_s = interval_s if self.tty else (log_interval_s or interval_s * 10)
        self.enabled = enabled
        self._start = time.monotonic()
        self._next = self._start + self.interval_s

    def maybe_show(self, snapshot: Callable[[], Snapshot]) -> None:
        """Show a line if one is due; ``snapshot`` is only taken then."""
        now = time.monotonic()
        if not self.enabled or now < self._next:
            return
        self._next = now + self.interval_s
        line = progress_line(snapshot())
        if self.tty:
            self.console.status(line)
        else:
            log.info("progress: %s", line)

    def close(self) -> None:
        self.console.end_status()
