"""Intake: sweeps of the bucket, the backlog of images found but not yet queued, and fairness.

A sweep always runs to its end, whatever room the queue has: a full queue never holds up the
listing, so the cleaner, the pruning of the processed set and the expiry checks that follow
every complete listing keep working during a backlog. New images that do not fit in the queue
wait in the backlog, one list per task directory, and are taken round-robin across
directories (oldest first within each), so no directory starves because its keys sort late.
A complete sweep forgets backlog entries it no longer listed (their objects are gone).
"""

from __future__ import annotations

import collections
import logging
import random
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from .cleaner import StoredImage, stored_image
from .config import Config
from .dispatch import Dispatch
from .lister import ListingEnd, ListingMessage
from .outcomes import ImageRef
from .scanner import relative_key

log = logging.getLogger(__name__)

_PAGES_PER_STEP = 16  # bounded work per loop step: replies and dispatch are never held up for long


class ListingSource(Protocol):
    def waitables(self) -> list[Any]: ...
    def alive(self) -> bool: ...
    def exitcode(self) -> int | None: ...
    def request_sweep(self) -> None: ...
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

    def keep_only(self, keys: set[str]) -> int:
        """Forget entries not in ``keys``; return how many were forgotten."""
        gone = [key for key in self._group_of if key not in keys]
        for key in gone:
            self.discard(key)
        return len(gone)


class Intake:
    """Finds new images: sweeps through a listing source, feeds the backlog, hands out fair batches."""

    def __init__(self, cfg: Config, *, ledger: Any, dispatch: Dispatch, make_lister: Callable[[], ListingSource],
                 intake_done: Callable[[], bool] = lambda: True, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.dispatch = dispatch
        self.make_lister = make_lister
        self.intake_done = intake_done
        self.clock = clock
        self.backlog = Backlog()
        self.lister: ListingSource | None = None
        self.sweeping = False
        self.next_sweep = 0.0
        self.scans_completed = 0
        self.last_scan_s = 0.0
        self.peak_listed = 0
        self._failures = 0
        self._started = 0.0
        self._listed = 0
        self._found = 0
        self._seen_new: set[str] = set()
        self._inventory: list[StoredImage] = []
        self._after_intake_done = False
        self._last_idle = False

    def start(self) -> None:
        self.lister = self.make_lister()

    def waitables(self) -> list[Any]:
        return self.lister.waitables() if self.lister is not None else []

    # ----- one step ------------------------------------------------------------------

    def step(self, *, draining: bool) -> SweepEnd | None:
        """Check the lister, start a sweep when due, read a bounded number of pages."""
        if self.lister is None:
            return None
        if not self.lister.alive():
            return self._lister_died(draining=draining)
        if not self.sweeping and not draining and self.clock() >= self.next_sweep:
            self._begin()
        for _ in range(_PAGES_PER_STEP if self.sweeping else 0):
            try:
                message = self.lister.poll()
            except (EOFError, OSError):
                return None  # the lister is gone: the next step sees it dead
            if message is None:
                return None
            if isinstance(message, ListingEnd):
                return self._end(message)
            self._on_page(message.refs)
        return None

    def _begin(self) -> None:
        assert self.lister is not None
        self.ledger.begin_sweep()
        self.sweeping = True
        self._started = self.clock()
        self._listed = self._found = 0
        self._seen_new = set()
        self._inventory = []
        self._after_intake_done = self.intake_done()
        try:
            self.lister.request_sweep()
        except OSError:
            self.sweeping = False  # the lister died; the next step replaces it

    def _on_page(self, refs: list[ImageRef]) -> None:
        self._failures = 0
        self._listed += len(refs)
        if self.cfg.retention.enabled:
            self._inventory.extend(stored_image(r, self.cfg.store.prefix) for r in refs)
        outside = [r for r in refs if r.key not in self.dispatch]
        new = self.ledger.filter_new([r.key for r in outside])
        for ref in outside:
            if ref.key in new:
                self._seen_new.add(ref.key)
                self._found += 1
                self.backlog.add(ref, task_directory(ref.key, self.cfg.store.prefix))

    def _end(self, end: ListingEnd) -> SweepEnd:
        self.sweeping = False
        if not end.ok:
            return self._failed(end.error)
        self.scans_completed += 1
        self.last_scan_s = self.clock() - self._started
        self.peak_listed = max(self.peak_listed, self._listed)
        forgotten = self.backlog.keep_only(self._seen_new)
        if forgotten:
            log.info("backlog: %d images found earlier are no longer listed (deleted elsewhere)", forgotten)
        self._last_idle = self._after_intake_done and self._found == 0
        self.next_sweep = self.clock() + self.cfg.scan.interval_s
        inventory, self._inventory, self._seen_new = self._inventory, [], set()
        return SweepEnd(complete=True, listed=self._listed, inventory=inventory)

    def _failed(self, error: str) -> SweepEnd:
        """Capped exponential backoff with jitter (half fixed, half random) before the next sweep."""
        self._failures += 1
        cap = min(30.0, self.cfg.scan.interval_s * 2 ** min(self._failures, 6))
        delay = cap / 2 + random.uniform(0.0, cap / 2)
        log.warning("scan failed (%s); retrying in %.1f s", error, delay)
        self.next_sweep = self.clock() + delay
        self._inventory, self._seen_new = [], set()
        return SweepEnd(complete=False, listed=self._listed, inventory=[])

    def _lister_died(self, *, draining: bool) -> SweepEnd | None:
        """The lister exited: the sweep it was doing is incomplete; a new one starts unless stopping."""
        assert self.lister is not None
        log.warning("the scanner process exited (exit code %s)%s", self.lister.exitcode(),
                    "" if draining else "; starting a new one")
        self.lister.stop(0.0)
        self.lister = None if draining else self.make_lister()
        was_sweeping, self.sweeping = self.sweeping, False
        self._inventory, self._seen_new = [], set()
        return SweepEnd(complete=False, listed=self._listed, inventory=[]) if was_sweeping else None

    # ----- handing out ---------------------------------------------------------------

    def take(self, limit: int) -> list[ImageRef]:
        """New images for the queue, fair across task directories."""
        return self.backlog.take(limit)

    def forget(self, key: str) -> None:
        """An image in the backlog got an outcome without being queued (the cleaner gave it up)."""
        self.backlog.discard(key)

    def idle(self) -> bool:
        """The last complete sweep began after intake was done and found nothing; nothing waits."""
        return self._last_idle and not self.backlog and not (self.sweeping and self._found)

    def wake_at(self) -> float:
        """When the loop must wake for intake (a due sweep), as a clock value; 0 while sweeping."""
        return 0.0 if self.sweeping else self.next_sweep

    def close(self) -> None:
        if self.lister is not None:
            self.lister.stop()
            self.lister = None
