"""The in-flight table: which lane holds which item, since when, and when it is due (plain data).

A *lane* takes one item at a time; a worker *process* runs several lanes (``worker.threads``).
This table is the one owner of an item between the queue and its outcome: ``take`` is the one
place that records "lane L took item I" and ``done`` the one place that records "lane L is done"
(it answered, its process died, or its item went back to the queue). The queue (``Dispatch``)
knows only what waits; the pool (``pool.py``) knows only processes and which lanes are idle, and
is told which lanes are past their deadline.

Times come from one injected clock (the supervisor's): ``sent_at`` and deadlines compare against
the same clock the supervisor's loop reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import msgspec

from .outcomes import WorkItem


class Held(msgspec.Struct, frozen=True):
    """What one lane holds: the item (with the endpoints it was sent to), and its times."""

    item: WorkItem
    sent_at: float
    """When the lane took it (the in-flight table's clock)."""
    queued_at: float
    """When it first entered the queue: a requeued item keeps its no-endpoint budget going."""
    probe: bool = False
    """It was sent as the half-open probe of an ejected algorithm endpoint."""

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self.item.endpoints


class InFlight:
    """Lane -> the item it holds; answers who holds a key, what a lane holds, and the deadlines."""

    def __init__(self, deadline_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.deadline_s = deadline_s
        self.clock = clock
        self._by_lane: dict[int, Held] = {}
        self._holder: dict[str, int] = {}
        self._next_due = 0.0  # no deadline before this one (0: none known); looked at again once it comes

    def __len__(self) -> int:
        return len(self._by_lane)

    def __iter__(self) -> Iterator[int]:
        """The lanes holding an item."""
        return iter(list(self._by_lane))

    # ----- the two changes -----------------------------------------------------------

    def take(self, lane: int, item: WorkItem, *, queued_at: float, endpoints: tuple[str, ...] = (),
             probe: bool = False) -> WorkItem:
        """Lane ``lane`` took ``item`` now; return the item as sent (``endpoints`` recorded on it)."""
        if lane in self._by_lane:
            raise ValueError(f"lane {lane} already holds {self._by_lane[lane].item.ref.key}")
        if item.ref.key in self._holder:
            raise ValueError(f"{item.ref.key} is already held by lane {self._holder[item.ref.key]}")
        if endpoints:
            item = msgspec.structs.replace(item, endpoints=endpoints)
        sent_at = self.clock()
        self._by_lane[lane] = Held(item=item, sent_at=sent_at, queued_at=queued_at, probe=probe)
        self._holder[item.ref.key] = lane
        due = sent_at + self.deadline_s
        self._next_due = min(self._next_due, due) if self._next_due else due
        return item

    def done(self, lane: int) -> Held | None:
        """Lane ``lane`` is done with what it held (None: it held nothing); return that."""
        held = self._by_lane.pop(lane, None)
        if held is not None:
            self._holder.pop(held.item.ref.key, None)
        return held

    # ----- looking -------------------------------------------------------------------

    def of_lane(self, lane: int) -> Held | None:
        """What lane ``lane`` holds, with its times (None: nothing)."""
        return self._by_lane.get(lane)

    def item_of(self, lane: int) -> WorkItem | None:
        held = self._by_lane.get(lane)
        return held.item if held is not None else None

    def holder(self, key: str) -> int | None:
        """The lane holding ``key`` (None: no lane)."""
        return self._holder.get(key)

    def is_held(self, key: str) -> bool:
        return key in self._holder

    def held_keys(self) -> list[str]:
        return list(self._holder)

    @property
    def next_deadline(self) -> float:
        """No item is due before this clock value (0: none held); it may be early, never late."""
        return self._next_due

    def overdue(self, now: float) -> list[int]:
        """The lanes whose item passed its deadline at ``now``.

        Cheap on most calls: the lanes are only looked at once the earliest deadline has come; a
        lane reported is not reported again unless ``look_again`` is called.
        """
        if not self._next_due or now < self._next_due:
            return []
        lanes: list[int] = []
        upcoming = 0.0
        for lane, held in self._by_lane.items():
            due = held.sent_at + self.deadline_s
            if now >= due:
                lanes.append(lane)
            elif not upcoming or due < upcoming:
                upcoming = due
        self._next_due = upcoming
        return lanes

    def look_again(self, at: float) -> None:
        """Look at the deadlines again at ``at`` (an overdue lane's answer may be waiting to be read)."""
        self._next_due = min(self._next_due, at) if self._next_due else at
