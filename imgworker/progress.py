"""Live progress: one rewritten line on a terminal, a periodic log line otherwise."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import IO

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
    """Shows progress every ``interval_s`` on a TTY, every ten intervals as a log line otherwise."""

    def __init__(self, interval_s: float, *, enabled: bool = True, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval_s = interval_s if self.tty else interval_s * 10
        self.enabled = enabled
        self._start = time.monotonic()
        self._next = self._start + self.interval_s
        self._shown = False

    def maybe_show(self, snapshot: Callable[[], Snapshot]) -> None:
        """Show a line if one is due; ``snapshot`` is only taken then."""
        now = time.monotonic()
        if not self.enabled or now < self._next:
            return
        self._next = now + self.interval_s
        line = progress_line(snapshot())
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
            self._shown = True
        else:
            log.info("progress: %s", line)

    def close(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False
