"""The supervisor's bounded pending queue and its in-flight table (plain data, no processes)."""

from __future__ import annotations

from collections import OrderedDict

from .config import DispatchConfig
from .outcomes import ImageRef, WorkItem


class Dispatch:
    """Pending items (de-duplicated, FIFO) and which worker holds which item."""

    def __init__(self, cfg: DispatchConfig) -> None:
        self.cfg = cfg
        self._pending: OrderedDict[str, WorkItem] = OrderedDict()
        self._held: dict[int, WorkItem] = {}
        self._holder: dict[str, int] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._pending or key in self._holder

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        return len(self._held)

    @property
    def room(self) -> int:
        return max(0, self.cfg.queue_capacity - len(self._pending))

    def offer(self, ref: ImageRef) -> list[ImageRef]:
        """Queue a new image; return what overflow dropped (maybe ref itself). Caller checks room for 'block'."""
        if ref.key in self:
            return []
        if self.room == 0:
            if self.cfg.overflow == "drop_newest" or (self.cfg.overflow == "block"):
                return [ref]
            _, oldest = self._pending.popitem(last=False)
            self._pending[ref.key] = WorkItem(ref=ref)
            return [oldest.ref]
        self._pending[ref.key] = WorkItem(ref=ref)
        return []

    def requeue_front(self, item: WorkItem) -> None:
        """Put an item back at the head of the queue (its holder died); capacity is not enforced."""
        self._pending[item.ref.key] = item
        self._pending.move_to_end(item.ref.key, last=False)

    def append(self, item: WorkItem) -> None:
        """Queue a resumed item at the tail; capacity is not enforced (it was accepted before)."""
        self._pending[item.ref.key] = item

    def take(self, worker: int) -> WorkItem | None:
        """Hand the oldest pending item to ``worker``."""
        if not self._pending or worker in self._held:
            return None
        _, item = self._pending.popitem(last=self.cfg.order == "newest_first")
        self._held[worker] = item
        self._holder[item.ref.key] = worker
        return item

    def release(self, worker: int) -> WorkItem | None:
        """The worker finished (or died holding) its item; return that item."""
        item = self._held.pop(worker, None)
        if item is not None:
            self._holder.pop(item.ref.key, None)
        return item

    def held_by(self, worker: int) -> WorkItem | None:
        return self._held.get(worker)

    def peek(self) -> WorkItem | None:
        """The item ``take`` would hand out next."""
        if not self._pending:
            return None
        key = next(reversed(self._pending)) if self.cfg.order == "newest_first" else next(iter(self._pending))
        return self._pending[key]

    def in_take_order(self) -> list[WorkItem]:
        """Pending items in the order ``take`` hands them out."""
        items = list(self._pending.values())
        return items[::-1] if self.cfg.order == "newest_first" else items

    def withdraw(self, key: str) -> WorkItem | None:
        """Remove a queued (not held) item; None if it is not queued."""
        return self._pending.pop(key, None)

    def is_held(self, key: str) -> bool:
        return key in self._holder

    def is_queued(self, key: str) -> bool:
        return key in self._pending

    def held_keys(self) -> list[str]:
        return list(self._holder)

    def pending_keys(self) -> list[str]:
        return list(self._pending)

    def protected(self) -> set[str]:
        """Keys queued or held, at this instant."""
        return set(self._pending) | set(self._holder)
