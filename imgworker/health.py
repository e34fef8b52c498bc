"""Whether a run is alive and making progress: the rule ``/healthz`` answers by.

    the loop has not looked yet (the run is starting)                      -> 503 "starting"
    stopping (a stop was requested, the run drains)                       -> 503 "stopping"
    the supervisor's loop has not looked for ``stall_after_s`` (10 s at least)  -> 503 "stalled" (loop)
    images wait (queue or backlog) and a lane is free (fewer images held
    than lanes), and no image got an outcome, all for ``stall_after_s``   -> 503 "stalled"
    nothing waits                                                          -> 200 "idle"
    otherwise                                                              -> 200 "ok"

Images that wait while every lane holds one are not a stall: a slow service is held to account by
the item deadline, not here. The supervisor's loop calls ``observe`` (about once a second); the
HTTP thread only calls ``verdict``, which reads what ``observe`` left and the clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .recorder import Snapshot

#: How often the supervisor's loop looks at its figures for the health verdict.
OBSERVE_EVERY_S = 1.0
#: The least time without a look from the loop that counts as a stalled loop (a step may block a while).
LOOP_PATIENCE_S = 10.0


class Health:
    """The stall watch of one run: since when has work waited, with a lane free and no outcome."""

    def __init__(self, stall_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_after_s = stall_after_s
        self.clock = clock
        self._seen_at = clock()
        self._done = -1
        self._progress_at = self._seen_at  # the last time the count of outcomes was seen to move
        self._stuck_since: float | None = None
        self._stopping = False
        self._figures: dict[str, Any] = {}

    def due(self) -> bool:
        return self.clock() - self._seen_at >= OBSERVE_EVERY_S

    def observe(self, snapshot: Snapshot, *, stopping: bool) -> None:
        """Look at the run's figures now."""
        now = self.clock()
        report, gauges = snapshot.report, snapshot.gauges
        done = sum(report.outcomes.values())
        waiting = gauges.queue_depth + gauges.backlog
        moved = done != self._done
        if moved:
            self._done, self._progress_at = done, now
        stuck = waiting > 0 and gauges.in_flight < report.lanes and not moved
        if not stuck:
            self._stuck_since = None
        elif self._stuck_since is None:
            self._stuck_since = now
        self._seen_at, self._stopping = now, stopping
        self._figures = {"done": done, "waiting": waiting, "in_flight": gauges.in_flight, "lanes": report.lanes}

    def verdict(self) -> tuple[int, dict[str, Any]]:
        """The HTTP status and a short JSON body."""
        now = self.clock()
        body: dict[str, Any] = {**self._figures, "since_last_outcome_s": round(now - self._progress_at, 1),
                                "stall_after_s": self.stall_after_s}
        if not self._figures:
            return 503, {"status": "starting", **body}
        if self._stopping:
            return 503, {"status": "stopping", **body}
        if now - self._seen_at >= max(self.stall_after_s, LOOP_PATIENCE_S):
            return 503, {"status": "stalled", "reason": "the supervisor's loop stopped looking", **body}
        if self._stuck_since is not None and now - self._stuck_since >= self.stall_after_s:
            return 503, {"status": "stalled", "reason": "images wait, lanes are free, and none got an outcome", **body}
        return 200, {"status": "idle" if not self._figures.get("waiting") else "ok", **body}
