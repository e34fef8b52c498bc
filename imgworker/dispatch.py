"""The supervisor's bounded pending queue (plain data, no processes).

Pending items are kept in one queue per task type, each in arrival order, with a global
sequence number: ``pop_next`` hands out the oldest (or newest) item among the task types the
caller can serve right now, so an algorithm route that is down or busy never holds up the
others (no head-of-line blocking), in O(task types) per item.

What a lane holds is not here: ``pop_next`` hands an item out of the queue and the caller records
it in the in-flight table (``inflight.InFlight``). ``Dispatch`` is given that table's ``is_held``
query only so that ``key in dispatch`` keeps meaning "queued or held" (an image is offered once).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import NamedTuple

from .config import DispatchConfig
from .outcomes import ImageRef, WorkItem


class _Entry:
    __slots__ = ("item", "seq", "queued_at")

    def __init__(self, item: WorkItem, seq: int, queued_at: float) -> None:
        self.item = item
        self.seq = seq
        self.queued_at = queued_at


class Queued(NamedTuple):
    """An item handed out of the queue, with when it first entered it."""

    item: WorkItem
    queued_at: float


class Dispatch:
    """Pending items (de-duplicated against queued and held ones, per task type, FIFO)."""

    def __init__(self, cfg: DispatchConfig, clock: Callable[[], float] = time.monotonic, *,
                 is_held: Callable[[str], bool] = lambda key: False) -> None:
        self.cfg = cfg
        self.clock = clock
        self._is_held = is_held  # the in-flight table's query
        self._queues: dict[str, OrderedDict[str, _Entry]] = {}
        self._type_of: dict[str, str] = {}
        self._next_seq = 0
        self._front_seq = 0

    def __contains__(self, key: str) -> bool:
        """Queued here, or held by a lane."""
        return key in self._type_of or self._is_held(key)

    @property
    def pending(self) -> int:
        return len(self._type_of)

    @property
    def room(self) -> int:
        return max(0, self.cfg.queue_capacity - self.pending)

    @property
    def newest_first(self) -> bool:
        return self.cfg.order == "newest_first"

    # ----- entering ------------------------------------------------------------------

    def offer(self, ref: ImageRef) -> list[ImageRef]:
        """Queue a new image; return what overflow dropped (maybe ref itself). Caller checks room for 'block'."""
        if ref.key in self:
            return []
        if self.room == 0:
            if self.cfg.overflow in ("drop_newest", "block"):
                return [ref]
            oldest = self._oldest()
            assert oldest is not None
            self.withdraw(oldest.item.ref.key)
            self.append(WorkItem(ref=ref))
            return [oldest.item.ref]
        self.append(WorkItem(ref=ref))
        return []

    def append(self, item: WorkItem) -> None:
        """Queue an item at the tail; capacity is not enforced (callers check ``room``)."""
        self._next_seq += 1
        self._put(item, self._next_seq, at_end=True)

    def requeue_front(self, item: WorkItem, queued_at: float | None = None) -> None:
        """Put an item back where ``pop_next`` looks first (its lane gave it back); capacity is not enforced.

        ``queued_at`` keeps the time it first entered the queue (its no-endpoint budget goes on).
        """
        if self.newest_first:
            self._next_seq += 1
            self._put(item, self._next_seq, at_end=True, queued_at=queued_at)
        else:
            self._front_seq -= 1
            self._put(item, self._front_seq, at_end=False, queued_at=queued_at)

    def _put(self, item: WorkItem, seq: int, *, at_end: bool, queued_at: float | None = None) -> None:
        kind = item.ref.task_type
        queue = self._queues.setdefault(kind, OrderedDict())
        queue[item.ref.key] = _Entry(item, seq, self.clock() if queued_at is None else queued_at)
        if not at_end:
            queue.move_to_end(item.ref.key, last=False)
        self._type_of[item.ref.key] = kind

    # ----- leaving -------------------------------------------------------------------

    def peek(self, usable: Callable[[str], bool] = lambda kind: True) -> WorkItem | None:
        """The item ``pop_next`` would hand out next, among task types for which ``usable`` is true."""
        entry = self._next(usable)
        return entry.item if entry is not None else None

    def pop_next(self, usable: Callable[[str], bool] = lambda kind: True) -> Queued | None:
        """Take the next item (oldest first, unless newest_first) of a usable task type out of the queue."""
        entry = self._next(usable)
        if entry is None:
            return None
        self.withdraw(entry.item.ref.key)
        return Queued(entry.item, entry.queued_at)

    def _next(self, usable: Callable[[str], bool]) -> _Entry | None:
        best: _Entry | None = None
        for kind, queue in self._queues.items():
            if not queue or not usable(kind):
                continue
            entry = queue[next(reversed(queue))] if self.newest_first else queue[next(iter(queue))]
            if best is None or (entry.seq > best.seq if self.newest_first else entry.seq < best.seq):
                best = entry
        return best

    def _oldest(self) -> _Entry | None:
        heads = [q[next(iter(q))] for q in self._queues.values() if q]
        return min(heads, key=lambda e: e.seq) if heads else None

    def withdraw(self, key: str) -> WorkItem | None:
        """Remove a queued (not held) item; None if it is not queued."""
        kind = self._type_of.pop(key, None)
        if kind is None:
            return None
        queue = self._queues[kind]
        entry = queue.pop(key)
        if not queue:
            del self._queues[kind]
        return entry.item

    # ----- looking -------------------------------------------------------------------

    def task_types(self) -> list[str]:
        return list(self._queues)

    def waiting(self, task_type: str) -> Iterator[tuple[WorkItem, float]]:
        """Queued items of one task type, oldest first, with the time each was queued."""
        for entry in list(self._queues.get(task_type, {}).values()):
            yield entry.item, entry.queued_at

    def in_take_order(self) -> list[WorkItem]:
        """Pending items in the order ``pop_next`` hands them out (all task types usable)."""
        entries = sorted((e for q in self._queues.values() for e in q.values()), key=lambda e: e.seq,
                         reverse=self.newest_first)
        return [e.item for e in entries]

    def is_queued(self, key: str) -> bool:
        return key in self._type_of

    def pending_keys(self) -> list[str]:
        return [item.ref.key for item in self.in_take_order()]
