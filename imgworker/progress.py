"""Live progress: one rewritten line on a terminal, a periodic log line otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

log = logging.getLogger(__name__)


def progress_line(stats: Any, *, pending: int, in_flight: int, lanes: int, elapsed: float) -> str:
    """rate, queue depth, in flight, outcome counts and failure rate in one line."""
    done = stats.finished
    report = stats.report(pending=pending, in_flight=in_flight, wall_s=max(elapsed, 1e-9))
    counts = " ".join(f"{name}={n}" for name, n in report.outcomes.items() if n)
    return (
        f"{elapsed:6.1f}s {done} done {report.throughput_per_s:.1f}/s | queue {pending} "
        f"in flight {in_flight} lanes {lanes} | {counts or 'no outcomes yet'} "
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

    def maybe_show(self, stats: Any, *, pending: int, in_flight: int, lanes: int) -> None:
        now = time.monotonic()
        if not self.enabled or now < self._next:
            return
        self._next = now + self.interval_s
        line = progress_line(stats, pending=pending, in_flight=in_flight, lanes=lanes, elapsed=now - self._start)
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
