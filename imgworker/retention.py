"""Retention decided against the queue: imgworker's own cleaner passes, and expiry elsewhere.

``CleanerPass`` runs after each complete listing: it asks ``cleaner.plan_cleanup`` what to delete,
given each image's status at that instant (held by a lane or with actions pending, queued, new,
done), ends given-up images explicitly (``dropped_expired``, cause ``retention``) and submits the
deletes to the janitor, whose thread runs them (the loop never waits on the store; the figures
``deleted`` and ``delete_errors`` are counted when the janitor reports). That leaves a window
between decision and delete, harmless for what is deleted: an image with its outcome, or one
given up (its outcome is written and it left the queue first), never comes back to a worker.
One exception: under ``inflight`` a queued or not yet accepted image may be deleted, and a worker
could take it before the janitor gets to it, so those deletes run at once on the loop thread.
Images whose delete is still waiting in the janitor are left out of the next pass.
``ExpiryGuard`` drops queued images an external cleaner would delete before a worker is done
(cause ``would_expire``).

Neither writes an outcome itself: both end images through the ``OutcomeSink`` (the recorder's
``drop``, the one place that writes a result line); it takes the image out of the queue (and the
backlog) only once the line is written, so an image whose line could not be written is still saved
by the checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .cleaner import CleanerStats, Plan, Status, StoredImage, plan_cleanup
from .config import Config
from .dispatch import Dispatch
from .expiry import ExpiryEstimator
from .inflight import InFlight
from .janitor import Done, Janitor, Job
from .outcomes import ImageRef, Outcome, WorkItem
from .ports import OutcomeLedger, OutcomeSink
from .scanner import parse_task
from .stats import Stats

log = logging.getLogger(__name__)


class CleanerPass:
    """One cleaning pass over a complete listing; its figures go to ``cleaner``."""

    def __init__(self, cfg: Config, *, dispatch: Dispatch, inflight: InFlight, ledger: OutcomeLedger,
                 sink: OutcomeSink, cleaner: CleanerStats) -> None:
        self.cfg = cfg
        self.dispatch = dispatch
        self.inflight = inflight
        self.ledger = ledger
        self.sink = sink
        self.cleaner = cleaner

    def status_of(self, new: set[str], janitor: Janitor) -> Callable[[str], Status]:
        """An image's status for the cleaner; one with unfinished actions is protected like a held one."""
        def status(key: str) -> Status:
            if self.inflight.is_held(key) or janitor.has_open_actions(key):
                return Status.HELD
            if self.dispatch.is_queued(key):
                return Status.QUEUED
            return Status.NEW if key in new else Status.DONE

        return status

    def run(self, inventory: list[StoredImage], janitor: Janitor) -> tuple[Plan, list[Done]]:
        """Decide, end the given-up images, submit the deletes: return the plan and what ran at once."""
        deleting = janitor.deleting()
        if deleting:
            inventory = [img for img in inventory if img.key not in deleting]
        new = self.ledger.filter_new([img.key for img in inventory if img.key not in self.dispatch])  # queued or held
        status = self.status_of(new, janitor)
        plan = plan_cleanup(inventory, self.cfg.retention, now=time.time(), status=status)
        self._count(plan, status, inventory)
        by_key = {img.key: img for img in inventory}
        for key in plan.give_up:
            self._give_up(by_key[key], status(key))
        at_once = self._at_once(plan, status)
        skip = set(at_once)
        janitor.submit(self._jobs([key for key in plan.delete if key not in skip] + plan.give_up))
        return plan, janitor.run_now(self._jobs(at_once))

    def _at_once(self, plan: Plan, status: Callable[[str], Status]) -> list[str]:
        """Under ``inflight``, the queued and not yet accepted images: no worker may take one before it is gone."""
        if self.cfg.retention.protect != "inflight":
            return []
        return [key for key in plan.delete if status(key) is not Status.DONE]

    def _jobs(self, keys: list[str]) -> list[Job]:
        size = self.cfg.retention.batch_size
        return [Job(kind="delete", keys=tuple(keys[i : i + size])) for i in range(0, len(keys), size)]

    def _count(self, plan: Plan, status: Callable[[str], Status], inventory: list[StoredImage]) -> None:
        c = self.cleaner
        c.passes += 1
        c.skipped_protected += plan.skipped_protected
        c.passes_over_limit += int(plan.limit_exceeded)
        c.given_up += len(plan.give_up)
        for key in plan.delete:
            st = status(key)
            c.deleted_unaccepted += st is Status.NEW
            c.deleted_queued += st is Status.QUEUED
            c.deleted_held += st is Status.HELD
        gone = set(plan.delete) | set(plan.give_up)
        left = [img for img in inventory if img.key not in gone]
        c.peak_objects = max(c.peak_objects, len(left))
        c.peak_bytes = max(c.peak_bytes, sum(img.size for img in left))

    def _give_up(self, img: StoredImage, status: Status) -> None:
        """Storage wins: end a queued (or not yet accepted) image explicitly before it is deleted."""
        task_type, task_id = parse_task(img.key, self.cfg.store.prefix)
        ref = ImageRef(key=img.key, task_type=task_type, task_id=task_id)
        if status is Status.NEW:
            self.sink.accepted(ref)
        self.sink.drop(ref, Outcome.DROPPED_EXPIRED, "retention")


class ExpiryGuard:
    """With a cleaner elsewhere, drop queued images that would expire before a worker is done."""

    def __init__(self, cfg: Config, *, dispatch: Dispatch, sink: OutcomeSink, stats: Stats,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.expiry = ExpiryEstimator(cfg.retention, cfg.store.prefix)
        self.clock = clock
        self.dispatch = dispatch
        self.sink = sink
        self.stats = stats  # read only: the finished count and the mean end-to-end time
        self._rate_samples: list[tuple[float, int]] = []

    def observe(self, ref: ImageRef) -> None:
        """An image entered the queue (it counts as newer than those before it in its directory)."""
        self.expiry.observe(ref)

    def sample_rate(self) -> None:
        now = self.clock()
        self._rate_samples.append((now, self.stats.finished))
        while len(self._rate_samples) > 2 and now - self._rate_samples[1][0] > 5.0:
            self._rate_samples.pop(0)

    def throughput_estimate(self) -> float:
        """Images finished per second over the last ~5 s (0 until a second of it is measured)."""
        if len(self._rate_samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._rate_samples[0], self._rate_samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 - t0 >= 1.0 else 0.0

    def drop_doomed(self) -> int:
        """Go over the whole queue, after a listing: the later in line, the longer the wait."""
        if not self.expiry.enabled or not self.dispatch.pending:
            return 0
        now, rate = time.time(), self.throughput_estimate()
        margin = self.stats.e2e_ms.mean / 1000.0
        doomed = []
        for position, item in enumerate(self.dispatch.in_take_order()):
            wait = position / rate if rate > 0 else 0.0
            if self.expiry.would_expire(item.ref, within_s=wait + margin, now=now):
                doomed.append(item)
        for item in doomed:
            self.sink.drop(item.ref, Outcome.DROPPED_EXPIRED, "would_expire")
        if doomed:
            log.info("dropped %d queued images that would expire before a worker reaches them", len(doomed))
        return len(doomed)

    def drops(self, item: WorkItem) -> bool:
        """Drop an item instead of dispatching it if it would expire before a worker is done."""
        margin = self.stats.e2e_ms.mean / 1000.0
        if not self.expiry.enabled or not self.expiry.would_expire(item.ref, within_s=margin, now=time.time()):
            return False
        self.sink.drop(item.ref, Outcome.DROPPED_EXPIRED, "would_expire")
        return True
