"""The supervisor's bounded pending queue and its in-flight table (plain data, no processes).

Pending items are kept in one queue per task type, each in arrival order, with a global
sequence number: ``take`` hands out the oldest (or newest) item among the task types the
caller can serve right now, so an algorithm route that is down or busy never holds up the
others (no head-of-line blocking), in O(task types) per item.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

import msgspec

from .config import DispatchConfig
from .outcomes import ImageRef, WorkItem


class _Entry:
    __slots__ = ("item", "seq", "queued_at")

    def __init__(self, item: WorkItem, seq: int, queued_at: float) -> None:
        self.item = item
        self.seq = seq
        self.queued_at = queued_at


class Dispatch:
    """Pending items (de-duplicated, per task type, FIFO) and which worker holds which item."""

    def __init__(self, cfg: DispatchConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self._queues: dict[str, OrderedDict[str, _Entry]] = {}
        self._type_of: dict[str, str] = {}
        self._held: dict[int, WorkItem] = {}
        self._held_queued_at: dict[int, float] = {}
        self._holder: dict[str, int] = {}
        self._next_seq = 0
        self._front_seq = 0

    def __contains__(self, key: str) -> bool:
        return key in self._type_of or key in self._holder

    @property
    def pending(self) -> int:
        return len(self._type_of)

    @property
    def in_flight(self) -> int:
        return len(self._held)

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
        """Put an item back where ``take`` looks first (its holder died); capacity is not enforced.

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
        """The item ``take`` would hand out next, among task types for which ``usable`` is true."""
        entry = self._next(usable)
        return entry.item if entry is not None else None

    def take(self, worker: int, usable: Callable[[str], bool] = lambda kind: True,
             endpoints: tuple[str, ...] = ()) -> WorkItem | None:
        """Hand the next item (oldest first, unless newest_first) of a usable task type to ``worker``.

        ``endpoints`` are recorded on the held item: the algorithm services it was sent to.
        """
        if worker in self._held:
            return None
        entry = self._next(usable)
        if entry is None:
            return None
        self.withdraw(entry.item.ref.key)
        item = msgspec.structs.replace(entry.item, endpoints=endpoints) if endpoints else entry.item
        self._held[worker] = item
        self._held_queued_at[worker] = entry.queued_at
        self._holder[item.ref.key] = worker
        return item

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

    def release(self, worker: int) -> WorkItem | None:
        """The worker finished (or died holding) its item; return that item."""
        item = self._held.pop(worker, None)
        self._held_queued_at.pop(worker, None)
        if item is not None:
            self._holder.pop(item.ref.key, None)
        return item

    def held_queued_at(self, worker: int) -> float | None:
        """When the item ``worker`` holds first entered the queue."""
        return self._held_queued_at.get(worker)

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

    def held_by(self, worker: int) -> WorkItem | None:
        return self._held.get(worker)

    def in_take_order(self) -> list[WorkItem]:
        """Pending items in the order ``take`` hands them out (all task types usable)."""
        entries = sorted((e for q in self._queues.values() for e in q.values()), key=lambda e: e.seq,
                         reverse=self.newest_first)
        return [e.item for e in entries]

    def is_held(self, key: str) -> bool:
        return key in self._holder

    def is_queued(self, key: str) -> bool:
        return key in self._type_of

    def held_keys(self) -> list[str]:
        return list(self._holder)

    def pending_keys(self) -> list[str]:
        return [item.ref.key for item in self.in_take_order()]

    def protected(self) -> set[str]:
        """Keys queued or held, at this instant."""
        return set(self._type_of) | set(self._holder)
