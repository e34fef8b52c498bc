"""The outcome sink: the one place an image gets its terminal outcome, and the one owner of the run's figures.

    finish(result) ─▶ results journal (written through) ─▶ Stats ─▶ OutcomeLedger ─▶ Janitor (actions) ─▶ on_result
    drop(ref, outcome, cause) ─▶ finish ─▶ the image leaves where it waited (queue or backlog)
    accepted(ref), retried(), process_exited(...), dispatched(ref), janitor_done(...) ─▶ Stats, CleanerStats

Every owner that ends an image (the supervisor for answers and deaths, ``retention`` for what
storage gives up, intake's overflow) calls this object; none writes a results line or bumps a
counter of its own. ``snapshot()`` is the typed view that ``/metrics``, the progress line and the
report read, so nothing reads the supervisor's insides.

In cluster mode (``claims``) the shared ledger's create-if-absent comes before the line: an
outcome another host recorded first is not counted here, and no action follows from it.

Durable before destructive: ``finish`` writes the line before it submits the result's actions, so
the janitor's fsync-before-delete covers every delete. ``drop`` writes the line before the image
leaves the queue: if the write fails, the image is still waiting (or waits again) and the next
checkpoint saves it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal, Protocol

import msgspec

from . import actions
from .adaptive import LimitFigures
from .cleaner import CleanerStats
from .config import Config
from .janitor import Done, Janitor
from .journal import ResultsJournal
from .outcomes import ImageRef, Outcome, Result
from .ports import OutcomeClaims, OutcomeLedger
from .stats import HistogramFigures, Report, Stats

Exited = Literal["deadline_kill", "recycled", "restarted"]

#: What a run's own report covers (``imgworker report FILE`` covers the whole file instead).
LIVE_SCOPE = ("this run: images it took in, each by the outcome it gave them; rates over the run's wall time "
              "(start-up, waiting for images and the stop included)")


class WaitingImages(Protocol):
    """Where images wait before a lane takes them: the queue and the backlog."""

    def leave(self, key: str) -> None:
        """The image has its outcome: it leaves the queue and the backlog."""

    def keep(self, ref: ImageRef) -> None:
        """Its line could not be written: it must still wait somewhere a checkpoint saves."""


class Gauges(msgspec.Struct, frozen=True):
    """The figures of a run that are not counts of outcomes: what waits, what runs, what intake did."""

    queue_depth: int = 0
    in_flight: int = 0
    backlog: int = 0
    processes_alive: int = 0
    events_received: int = 0
    scans_completed: int = 0
    last_scan_s: float = 0.0


class Snapshot(msgspec.Struct, frozen=True):
    """What ``/metrics``, the progress line and the report read: one consistent, typed view."""

    report: Report
    gauges: Gauges
    cleaner: CleanerStats
    latency: dict[str, HistogramFigures]
    limits: dict[str, LimitFigures] = {}
    """Each algorithm endpoint's limit of calls in flight (``adaptive``; the fixed ceiling when it is off)."""


class Recorder:
    """Ends images and keeps the run's figures; ``open`` gives it the results journal and the janitor."""

    def __init__(self, cfg: Config, *, ledger: OutcomeLedger, waiting: WaitingImages,
                 on_result: Callable[[Result], None] | None = None, wall: Callable[[], float] = time.time,
                 claims: OutcomeClaims | None = None) -> None:
        self.cfg = cfg
        self.claims = claims  # cluster mode: the shared ledger decides whose outcome counts
        self.ledger = ledger
        self.waiting = waiting
        self.on_result = on_result
        self.wall = wall
        self.stats = Stats(cfg.concurrency, processes=cfg.worker.count)
        self.cleaner = CleanerStats(enabled=cfg.retention.enabled)
        self.journal: ResultsJournal | None = None
        self.janitor: Janitor | None = None

    def open(self, journal: ResultsJournal, janitor: Janitor) -> None:
        self.journal, self.janitor = journal, janitor

    # ----- outcomes ----------------------------------------------------------------------

    def finish(self, result: Result) -> None:
        """The image's terminal outcome: its line written first, then the figures, the ledger, its actions.

        In cluster mode the shared ledger is written before all of them; an outcome another host
        recorded first is not counted here.
        """
        assert self.journal is not None and self.janitor is not None
        if self.claims is not None and not self.claims.claim(result):
            self.handed_back(1)  # another host's outcome counts (or none yet: the image comes again)
            return
        self._count(result)
        if self.claims is not None:
            self.claims.settled(result)
        if self.on_result is not None:
            self.on_result(result)

    def recovered(self, result: Result) -> None:
        """Cluster mode, at start: an outcome this host's earlier run wrote to the shared ledger and not to its
        results file. The ledger counts it here, so its line, figures and actions follow now (no claim)."""
        self.stats.scanned += 1
        self._count(result)

    def _count(self, result: Result) -> None:
        assert self.journal is not None and self.janitor is not None
        line = self.journal.write(result)
        self.stats.record(result)
        self.ledger.add(result.key)
        jobs = actions.plan(self.cfg, result, line=line)
        if jobs:
            self.janitor.submit(jobs)

    def drop(self, ref: ImageRef, outcome: Outcome, cause: str, *, algo_calls: int = 0) -> None:
        """End an image no lane will see: its line first, then it leaves the queue and the backlog.

        ``algo_calls``: calls made for it before it was put back in the queue (its line counts them).
        """
        try:
            self.finish(Result(key=ref.key, outcome=outcome, task_type=ref.task_type, task_id=ref.task_id,
                               cause=cause, algo_calls=algo_calls, finished_at=self.wall()))
        except BaseException:
            self.waiting.keep(ref)
            raise
        self.waiting.leave(ref.key)

    def accepted(self, ref: ImageRef) -> None:
        """An image was taken in (queued, resumed, or given up before it was queued): it owes an outcome."""
        self.stats.scanned += 1

    def handed_back(self, count: int) -> None:
        """Cluster mode: images taken in here left without an outcome here; they owe it elsewhere."""
        self.stats.scanned -= count

    # ----- what happened on the way ---------------------------------------------------------

    def dispatched(self, ref: ImageRef) -> None:
        """A lane took an image: upload (object mtime or event time) to dispatch is the discovery latency."""
        if ref.mtime > 0:
            self.stats.discovery_ms.add(max(0.0, self.wall() - ref.mtime) * 1000.0)

    def retried(self) -> None:
        """An image goes back to the queue after its process died (or it waits for an endpoint)."""
        self.stats.retries += 1

    def readmitted(self, images: int) -> None:
        """Images ``imgworker retry`` re-admitted are queued again (their earlier outcome is superseded)."""
        self.stats.readmitted += images

    def sampled(self, elapsed_s: float, *, starved: bool) -> None:
        """``elapsed_s`` of the run passed with lanes idle for want of images (``starved``) or not."""
        self.stats.observed_s += elapsed_s
        if starved:
            self.stats.starved_s += elapsed_s

    def process_exited(self, how: Exited, *, backed_off: bool = False) -> None:
        if how == "deadline_kill":
            self.stats.deadline_kills += 1
        elif how == "recycled":
            self.stats.worker_recycles += 1
        else:
            self.stats.worker_restarts += 1
            self.stats.respawn_backoffs += backed_off

    def listed(self, objects: int) -> None:
        self.cleaner.peak_objects_listed = max(self.cleaner.peak_objects_listed, objects)

    def janitor_done(self, done: list[Done]) -> None:
        """Count what the janitor did: cleaner deletes, and failed result actions."""
        for report in done:
            job = report.job
            if job.line < 0:
                self.cleaner.deleted += report.deleted
                self.cleaner.delete_errors += report.refused
            elif report.failed:
                self.stats.action_errors[job.action] = self.stats.action_errors.get(job.action, 0) + 1

    # ----- the view --------------------------------------------------------------------------

    def snapshot(self, gauges: Gauges, *, wall_s: float, endpoints: dict[str, dict[str, int]],
                 limits: dict[str, LimitFigures] | None = None) -> Snapshot:
        report = self.stats.report(pending=gauges.queue_depth, in_flight=gauges.in_flight, wall_s=wall_s)
        extra: dict[str, object] = {"endpoints": endpoints, "scope": LIVE_SCOPE}
        if self.cfg.retention.enabled:
            extra["cleaner"] = msgspec.structs.asdict(self.cleaner)
        if self.cfg.algo.adaptive and limits:
            extra["limits"] = {url: {"mean": f.mean_limit, "min": f.min_limit, "max": f.max_limit, "now": f.limit}
                               for url, f in limits.items()}
        return Snapshot(report=msgspec.structs.replace(report, **extra), gauges=gauges,
                        cleaner=msgspec.structs.replace(self.cleaner), latency=self.stats.latency_figures(),
                        limits=limits or {})
