"""Intake: change events and sweeps of the bucket, the backlog of images found but not yet queued, fairness.

With ``scan.mode = "events"`` a watcher process reports new objects as the store records them;
they go to the backlog at once, and a sweep (a reconciliation listing) runs every
``scan.reconcile_interval_s`` to find whatever the events missed: the listing stays the source of
truth, the events make it rare. The position in the event stream is checkpointed (the oldest
event-found image still in the backlog, else the last event handled), so after a restart the
watcher resumes without a gap; a watcher that dies is restarted from that position. What a watcher
sent (it acknowledged it to the store) is never dropped: it is read while draining too, and a dead
or stopped watcher's pipe is read to its end into the backlog, which the final checkpoint saves
(see the events package). When intake
is declared done (the demo's cameras stopped), one reconciliation listing runs at once.

With ``scan.reconcile = "incremental"`` (keys time-ordered within each ``<task_type>/<task_id>/``),
each directory is listed from a checkpoint: the last key below which every image has an outcome.
A pass then reads only what is new; processed keys below a checkpoint are never listed again and
leave the processed set at the next prune.

A sweep always runs to its end, whatever room the queue has: a full queue never holds up the
listing, so the cleaner, the pruning of the processed set and the expiry checks that follow
every complete listing keep working during a backlog. New images that do not fit in the queue
wait in the backlog, one list per task directory, and are taken round-robin across
directories (oldest first within each), so no directory starves because its keys sort late.
A complete sweep forgets backlog entries it no longer listed (their objects are gone).
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from .backoff import Backoff, restart_backoff
from .cleaner import StoredImage, stored_image
from .config import Config
from .dispatch import Dispatch
from .lister import ListingEnd, ListingMessage
from .outcomes import ImageRef, IntakePosition, WorkItem
from .ports import OutcomeLedger
from .scanner import parse_task, relative_key, select_images

log = logging.getLogger(__name__)

_PAGES_PER_STEP = 16  # bounded work per loop step: replies and dispatch are never held up for long


class EventSource(Protocol):
    def waitables(self) -> list[Any]: ...
    def alive(self) -> bool: ...
    def exitcode(self) -> int | None: ...
    def poll(self) -> Any: ...
    def stop(self, timeout: float = ..., on_message: Callable[[Any], None] | None = ...) -> None: ...


class ListingSource(Protocol):
    def waitables(self) -> list[Any]: ...
    def alive(self) -> bool: ...
    def exitcode(self) -> int | None: ...
    def request_sweep(self, checkpoints: dict[str, str] | None = ...) -> None: ...
    def poll(self) -> ListingMessage | None: ...
    def stop(self, timeout: float = ...) -> None: ...


def task_directory(key: str, prefix: str) -> str:
    """The directory an image belongs to below the prefix (``<task_type>/<task_id>``): the fairness unit."""
    return relative_key(key, prefix).rpartition("/")[0]


class SweepEnd(msgspec.Struct):
    """A sweep ended; ``inventory`` is every image it listed (only kept when the cleaner needs it)."""

    complete: bool
    listed: int
    inventory: list[StoredImage]
    full: bool = True  # listed everything: only then may the processed set be pruned


class Backlog:
    """Images found but not queued: one ordered list per task directory, taken round-robin."""

    def __init__(self) -> None:
        self._groups: dict[str, collections.OrderedDict[str, ImageRef]] = {}
        self._group_of: dict[str, str] = {}
        self._turns: collections.deque[str] = collections.deque()

    def __len__(self) -> int:
        return len(self._group_of)

    def __contains__(self, key: str) -> bool:
        return key in self._group_of

    def add(self, ref: ImageRef, group: str) -> None:
        if ref.key in self._group_of:
            return
        if group not in self._groups:
            self._groups[group] = collections.OrderedDict()
            self._turns.append(group)
        self._groups[group][ref.key] = ref
        self._group_of[ref.key] = group

    def discard(self, key: str) -> None:
        group = self._group_of.pop(key, None)
        if group is None:
            return
        members = self._groups[group]
        members.pop(key, None)
        if not members:
            del self._groups[group]
            self._turns.remove(group)

    def take(self, limit: int) -> list[ImageRef]:
        """Up to ``limit`` images, one directory at a time in turn, oldest first within each."""
        out: list[ImageRef] = []
        while self._turns and len(out) < limit:
            group = self._turns[0]
            self._turns.rotate(-1)
            _, ref = self._groups[group].popitem(last=False)
            out.append(ref)
            self.discard(ref.key)
        return out

    def keys(self) -> set[str]:
        return set(self._group_of)

    def in_take_order(self) -> list[ImageRef]:
        """Every image, in the order ``take`` would hand them out (directories in turn, oldest first in each)."""
        groups = [list(self._groups[group].values()) for group in self._turns]
        return [ref for turn in itertools.zip_longest(*groups) for ref in turn if ref is not None]

    def forget_unlisted(self, listed: set[str], among: set[str]) -> list[str]:
        """Forget the entries of ``among`` (those present when a listing began) it did not list."""
        gone = [key for key in among if key in self._group_of and key not in listed]
        for key in gone:
            self.discard(key)
        return gone


class Sweep:
    """One listing in progress: how it was begun, and what it has listed and found so far."""

    def __init__(self, *, full: bool, started: float, backlog_at_start: set[str], after_intake_done: bool) -> None:
        self.full = full  # lists the whole prefix: only then may the processed set be pruned
        self.started = started
        self.backlog_at_start = backlog_at_start  # entries added during the sweep may sort before it
        self.after_intake_done = after_intake_done  # began once intake was done: may prove idleness
        self.listed = 0
        self.found = 0
        self.seen_new: set[str] = set()
        self.inventory: list[StoredImage] = []
        self.advance: dict[str, str] = {}  # directory -> last key of its unbroken run of done keys
        self.blocked: set[str] = set()  # directories whose run of done keys has ended

    def track_checkpoints(self, refs: list[ImageRef], undone: Callable[[str], bool], prefix: str) -> None:
        """Per directory, how far the listed keys (in key order) all have an outcome."""
        for ref in refs:
            directory = task_directory(ref.key, prefix)
            if directory in self.blocked:
                continue
            if undone(ref.key):
                self.blocked.add(directory)
            else:
                self.advance[directory] = ref.key

    def end(self, complete: bool) -> SweepEnd:
        return SweepEnd(complete=complete, listed=self.listed, inventory=self.inventory if complete else [],
                        full=self.full)


class Intake:
    """Finds new images: sweeps through a listing source, feeds the backlog, hands out fair batches."""

    def __init__(self, cfg: Config, *, ledger: OutcomeLedger, dispatch: Dispatch, make_lister: Callable[[], ListingSource],
                 make_watcher: Callable[[int], EventSource] | None = None,
                 intake_done: Callable[[], bool] = lambda: True, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.make_watcher = make_watcher if cfg.scan.mode == "events" else None
        # events mode sweeps only to reconcile (in cluster mode the leader's link reads the events, no watcher here)
        self.interval_s = cfg.scan.reconcile_interval_s if cfg.scan.mode == "events" else cfg.scan.interval_s
        self.watcher: EventSource | None = None
        self.events_received = 0
        self._events_ts = 0
        self._watcher_failures = 0
        self._watcher_restart_at = 0.0
        self._intake_was_done = False
        self.incremental = cfg.scan.reconcile == "incremental"
        self.checkpoints: dict[str, str] = {}
        self.ledger = ledger
        self.dispatch = dispatch
        self.make_lister = make_lister
        self.intake_done = intake_done
        self.clock = clock
        self.backlog = Backlog()
        self.lister: ListingSource | None = None
        self.sweep: Sweep | None = None  # the listing in progress
        self.next_sweep = 0.0
        self.scans_completed = 0
        self.last_scan_s = 0.0
        self.peak_listed = 0
        self._failures = 0
        self._last_idle = False
        interval = cfg.scan.interval_s  # scan failures: half fixed, half random, from twice the interval
        self._scan_backoff = Backoff(2 * interval, min(30.0, 64 * interval), jitter=0.5)
        self._watcher_backoff = Backoff(0.5, 30.0)
        self._lister_backoff = restart_backoff(clock=clock)  # a lister that keeps dying waits to be replaced

    @property
    def sweeping(self) -> bool:
        return self.sweep is not None

    def start(self, position: IntakePosition = IntakePosition()) -> None:
        self.lister = self.make_lister()
        self._events_ts = position.events_ts_ns
        self.checkpoints = dict(position.checkpoints)
        self._restore_backlog(position.backlog)
        if self.make_watcher is not None:
            self.watcher = self.make_watcher(position.events_ts_ns)

    def _restore_backlog(self, keys: list[str]) -> None:
        """Images found before the restart but never queued (an event stream is not replayed for them)."""
        new = self.ledger.filter_new([k for k in keys if k not in self.dispatch]) if keys else set()
        for key in keys:
            if key in new:
                task_type, task_id = parse_task(key, self.cfg.store.prefix)
                self.backlog.add(ImageRef(key=key, task_type=task_type, task_id=task_id),
                                 task_directory(key, self.cfg.store.prefix))

    @property
    def events_position(self) -> int:
        """The event position a checkpoint saves (ns; 0 before any event was handled)."""
        return self._events_ts

    def position(self) -> IntakePosition:
        """What a checkpoint saves so intake resumes without a gap: the backlog is saved, not replayed."""
        return IntakePosition(events_ts_ns=self._events_ts, checkpoints=dict(self.checkpoints),
                              backlog=sorted(self.backlog.keys()))

    def waitables(self) -> list[Any]:
        out = self.lister.waitables() if self.lister is not None else []
        return out + (self.watcher.waitables() if self.watcher is not None else [])

    # ----- one step ------------------------------------------------------------------

    def step(self, *, draining: bool) -> SweepEnd | None:
        """Read the watcher, check the lister, start a sweep when due, read a bounded number of pages."""
        self._restart_watcher(draining=draining)
        if self.watcher is not None:  # also while draining and after a lister death: what it sent is acknowledged
            self._watch(draining=draining)
        if self.lister is not None and not self.lister.alive():
            return self._lister_died(draining=draining)
        self._restart_lister(draining=draining)
        if self.lister is None:
            return None  # closed, or a new lister starts once its backoff is over
        if not self._intake_was_done and self.make_watcher is not None and self.intake_done():
            self._intake_was_done = True
            self.next_sweep = 0.0  # intake ended: reconcile now rather than at the next interval
        if not self.sweeping and not draining and self.clock() >= self.next_sweep:
            self._begin()
        sweep = self.sweep
        for _ in range(_PAGES_PER_STEP if sweep is not None else 0):
            assert sweep is not None
            try:
                message = self.lister.poll()
            except (EOFError, OSError):
                return None  # the lister is gone: the next step sees it dead
            if message is None:
                return None
            self._lister_backoff.reset()  # it answered: a later death is a new failure
            if isinstance(message, ListingEnd):
                return self._end(sweep, message)
            self._on_page(sweep, message.refs)
        return None

    def _begin(self) -> None:
        assert self.lister is not None
        full = self._next_is_full()
        if full:  # only a full listing marks what exists: generations count full listings
            self.ledger.begin_sweep()
        self.sweep = Sweep(full=full, started=self.clock(), backlog_at_start=self.backlog.keys(),
                           after_intake_done=self.intake_done())
        try:
            self.lister.request_sweep(None if full else self.checkpoints)
        except OSError:
            self.sweep = None  # the lister died; the next step replaces it

    def _next_is_full(self) -> bool:
        """Full unless incremental; the first listing after a start and every ``full_every``-th are full.

        The first one is full so that the start-up reconciliation finds every object that still
        exists, whatever its key layout: an event acknowledged to the store but not yet checkpointed
        when the supervisor died is found again by it.
        """
        every = self.cfg.scan.full_every
        return not self.incremental or self.scans_completed == 0 or self.scans_completed % every == every - 1

    def _on_page(self, sweep: Sweep, refs: list[ImageRef]) -> None:
        self._failures = 0
        sweep.listed += len(refs)
        if self.cfg.retention.enabled:
            sweep.inventory.extend(stored_image(r, self.cfg.store.prefix) for r in refs)
        outside = [r for r in refs if r.key not in self.dispatch]
        new = self.ledger.filter_new([r.key for r in outside])
        for ref in outside:
            if ref.key in new:
                sweep.seen_new.add(ref.key)
                sweep.found += 1
                self.backlog.add(ref, task_directory(ref.key, self.cfg.store.prefix))
        if self.incremental:
            sweep.track_checkpoints(refs, lambda key: key in new or key in self.dispatch, self.cfg.store.prefix)

    def _end(self, sweep: Sweep, end: ListingEnd) -> SweepEnd:
        self.sweep = None
        if not end.ok:
            return self._failed(sweep, end.error)
        self.scans_completed += 1
        self.last_scan_s = self.clock() - sweep.started
        for directory, key in sweep.advance.items():
            self.checkpoints[directory] = max(key, self.checkpoints.get(directory, ""))
        self.peak_listed = max(self.peak_listed, sweep.listed)
        # Only a full listing can tell that an entry is gone: an incremental one skips what sorts low.
        forgotten = self.backlog.forget_unlisted(sweep.seen_new, sweep.backlog_at_start) if sweep.full else []
        if forgotten:
            log.info("backlog: %d images found earlier are no longer listed (deleted elsewhere)", len(forgotten))
        self._last_idle = sweep.after_intake_done and sweep.found == 0
        late_end = self._intake_was_done and not sweep.after_intake_done  # intake ended during this sweep
        self.next_sweep = self.clock() + (0.0 if late_end else self.interval_s)
        return sweep.end(complete=True)

    def _failed(self, sweep: Sweep, error: str) -> SweepEnd:
        """Capped exponential backoff with jitter (half fixed, half random) before the next sweep."""
        self._failures += 1
        delay = self._scan_backoff.delay(self._failures)
        log.warning("scan failed (%s); retrying in %.1f s", error, delay)
        self.next_sweep = self.clock() + delay
        return sweep.end(complete=False)

    def _lister_died(self, *, draining: bool) -> SweepEnd | None:
        """The lister exited: the sweep it was doing is incomplete; a new one starts after a backoff unless stopping.

        The backoff grows while listers die before sending anything, so one that cannot start is not
        replaced at every step.
        """
        assert self.lister is not None
        wait_s = 0.0 if draining else self._lister_backoff.fail()
        log.warning("the scanner process exited (exit code %s)%s", self.lister.exitcode(),
                    "" if draining else f"; starting a new one in {wait_s:.1f} s")
        self.lister.stop(0.0)
        self.lister = None  # a dead process's sentinel stays ready: never wait on it
        sweep, self.sweep = self.sweep, None
        return sweep.end(complete=False) if sweep is not None else None

    def _restart_lister(self, *, draining: bool) -> None:
        if self.lister is None and self._lister_backoff.until and not draining and self._lister_backoff.ready():
            self.lister = self.make_lister()

    # ----- handing out ---------------------------------------------------------------

    def take(self, limit: int) -> list[ImageRef]:
        """New images for the queue, fair across task directories."""
        return self.backlog.take(limit)

    def put_back(self, refs: list[ImageRef]) -> None:
        """Images taken but not queued (the run is failing) go back to the backlog, which is saved."""
        for ref in refs:
            self.backlog.add(ref, task_directory(ref.key, self.cfg.store.prefix))

    def leave(self, key: str) -> None:
        """An image got its outcome without a lane: it leaves the queue and the backlog."""
        self.dispatch.withdraw(key)
        self.backlog.discard(key)

    def keep(self, ref: ImageRef) -> None:
        """An image's line could not be written: it waits in the queue (unless it still waits already)."""
        if ref.key not in self.dispatch and ref.key not in self.backlog:
            self.dispatch.append(WorkItem(ref=ref))

    # ----- change events -------------------------------------------------------------

    def _watch(self, *, draining: bool) -> None:
        """Read what the watcher sent (bounded); restart it from the checkpointed position if it died."""
        assert self.watcher is not None
        if not self.watcher.alive():
            self._watcher_died(draining=draining)
            return
        for _ in range(_PAGES_PER_STEP):
            try:
                message = self.watcher.poll()
            except (EOFError, OSError):
                return
            if message is None:
                return
            self._on_message(message)

    def _on_message(self, message: Any) -> None:
        if hasattr(message, "events"):  # an EventBatch (WatcherReady says only that it started)
            self._on_events(message.events, message.ts_ns)

    def _on_events(self, events: list[Any], ts_ns: int) -> None:
        """New objects from the store's change stream go to the backlog, as a listing page would."""
        self.events_received += len(events)
        refs = {e.key: ImageRef(key=e.key, size=e.size, mtime=e.mtime, etag=e.etag) for e in events}
        outside = [key for key in refs if key not in self.dispatch and key not in self.backlog]
        new = self.ledger.filter_new(outside) if outside else set()
        for key in outside:
            if key in new:
                ref = select_images([refs[key]], prefix=self.cfg.store.prefix, cfg=self.cfg.scan)
                if ref:
                    self.backlog.add(ref[0], task_directory(key, self.cfg.store.prefix))
        self._events_ts = max(self._events_ts, ts_ns)
        self._watcher_failures = 0

    def _watcher_died(self, *, draining: bool) -> None:
        """Take what it sent, then restart it from the last event handled (the backlog is in memory), with backoff."""
        assert self.watcher is not None
        self._watcher_failures += 1
        delay = self._watcher_backoff.delay(self._watcher_failures)
        self._watcher_restart_at = self.clock() + delay
        log.warning("the event watcher exited (exit code %s)%s", self.watcher.exitcode(),
                    "" if draining else f"; starting a new one in {delay:.1f} s from the last position")
        self.watcher.stop(0.0, on_message=self._on_message)  # its pipe read to the end: it acknowledged those
        self.watcher = None  # a dead process's sentinel stays ready: never wait on it

    def _restart_watcher(self, *, draining: bool) -> None:
        if (self.watcher is None and self.make_watcher is not None and self._watcher_restart_at and not draining
                and self.clock() >= self._watcher_restart_at):
            self._watcher_restart_at = 0.0
            self.watcher = self.make_watcher(self._events_ts)

    def reconcile_when_drained(self) -> None:
        """The queue ran empty in a run that ends when idle: the listing that can tell idleness runs now.

        Only once intake is done, and only after a listing that found something: otherwise an
        events-mode run would wait out ``reconcile_interval_s`` after its last image before ending.
        """
        if self.intake_done() and not self.sweeping and not self.backlog and not self._last_idle:
            self.next_sweep = min(self.next_sweep, self.clock())

    def idle(self) -> bool:
        """The last complete sweep began after intake was done and found nothing; nothing waits."""
        return self._last_idle and not self.backlog and not (self.sweep is not None and self.sweep.found)

    def wake_at(self) -> float:
        """When the loop must wake for intake, as a clock value (0: no time of its own to wake at).

        While a sweep runs, the lister's pipe is among ``waitables()``: a page arriving wakes the
        loop, so no timeout is needed. Only a listing source with nothing to wait on (the inline
        lister of the in-memory tests) has its pages polled at once. A lister that died is replaced
        once its backoff is over.
        """
        if self.lister is None:
            wake = self._lister_backoff.until
        elif self.sweeping:
            polled = not self.lister.waitables()
            wake = self.clock() if polled else 0.0
        else:
            wake = self.next_sweep
        if self._watcher_restart_at:
            wake = min(wake, self._watcher_restart_at) if wake else self._watcher_restart_at
        return wake

    def close(self) -> None:
        """Stop the watcher (what it sent goes to the backlog, for the final checkpoint), then the lister."""
        try:
            if self.watcher is not None:
                watcher, self.watcher = self.watcher, None
                watcher.stop(on_message=self._on_message)
        finally:
            if self.lister is not None:
                self.lister.stop()
                self.lister = None
