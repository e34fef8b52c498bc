"""The worker pool: spawns worker processes, hands them items, notices answers, deaths and overdue items.

Each worker has its own duplex pipe and holds at most one item. ``wait`` blocks on every
worker's pipe and process sentinel together (``multiprocessing.connection.wait``), plus any
extra waitables the caller passes, so an answer or a death is seen at once without polling.
A worker whose item is past its deadline is killed; its exit is reported with ``overdue`` set.
Stopping sends every worker its stop message at once and waits against one deadline.

``InlinePool`` has the same interface and runs items in the calling process; with an
in-memory store it drives the supervisor in tests without processes or servers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

import msgspec

from .children import CTX, spawn, stop_processes
from .config import Config
from .logs import LogSettings
from .outcomes import Outcome, Result, WorkItem
from .worker import STOP, Reply, decode_reply, encode_item, worker_main


class Answer(msgspec.Struct, frozen=True):
    """A worker answered for its item."""

    slot: int
    reply: Reply
    dispatched_at: float


class Exit(msgspec.Struct, frozen=True):
    """A worker process exited; ``overdue`` if the pool killed it for passing the item deadline."""

    slot: int
    code: int | None
    retiring: bool
    overdue: bool


Event = Answer | Exit


class Pool(Protocol):
    idle: list[int]

    def start(self) -> None: ...
    def send(self, slot: int, item: WorkItem) -> None: ...
    def wait(self, timeout: float, extra: Sequence[Any]) -> tuple[list[Event], list[Any]]: ...
    def kill_overdue(self, now: float) -> float: ...
    def respawn(self, slot: int) -> None: ...
    def alive(self) -> int: ...
    def stop(self, deadline: float) -> list[Event]: ...


class _Worker:
    """One worker slot: process, channel, and what the pool knows of its current item."""

    def __init__(self, slot: int, cfg: Config, log_settings: LogSettings) -> None:
        self.slot = slot
        ours, theirs = CTX.Pipe(duplex=True)
        self.conn: Connection = ours
        self.process = spawn(worker_main, (slot, cfg, theirs, log_settings), f"imgworker-worker-{slot}")
        theirs.close()  # only the worker holds that end: its death closes ours
        self.dispatched_at = 0.0
        self.busy = False
        self.retiring = False
        self.overdue = False


class ProcessPool:
    """N worker processes, each with its own pipe."""

    def __init__(self, cfg: Config, log_settings: LogSettings) -> None:
        self.cfg = cfg
        self.log_settings = log_settings
        self.deadline_s = cfg.item_deadline_s
        self.workers: dict[int, _Worker] = {}
        self.idle: list[int] = []
        self._by_conn: dict[Any, _Worker] = {}  # rebuilt only when a worker starts or exits: wait() is per step
        self._by_sentinel: dict[int, _Worker] = {}
        self._next_due = 0.0  # earliest item deadline among busy workers (0: none known)

    def start(self) -> None:
        for slot in range(self.cfg.worker.count):
            self.respawn(slot)

    def respawn(self, slot: int) -> None:
        self.workers[slot] = _Worker(slot, self.cfg, self.log_settings)
        self.idle.append(slot)
        self._index()

    def _index(self) -> None:
        self._by_conn = {w.conn: w for w in self.workers.values()}
        self._by_sentinel = {w.process.sentinel: w for w in self.workers.values()}

    def alive(self) -> int:
        return sum(1 for w in list(self.workers.values()) if w.process.is_alive())

    def send(self, slot: int, item: WorkItem) -> None:
        """Hand an item to an idle worker; a dead one is reported by its sentinel."""
        worker = self.workers[slot]
        worker.dispatched_at = time.monotonic()
        worker.busy = True
        due = worker.dispatched_at + self.deadline_s
        self._next_due = min(self._next_due, due) if self._next_due else due
        try:
            worker.conn.send_bytes(encode_item(item))
        except OSError:
            pass

    def wait(self, timeout: float, extra: Sequence[Any]) -> tuple[list[Event], list[Any]]:
        """Block until an answer, a death or an extra waitable is ready; return events and ready extras."""
        by_conn, by_sentinel = self._by_conn, self._by_sentinel
        ready = wait([*by_conn, *by_sentinel, *extra], timeout)
        events: list[Event] = []
        for obj in ready:
            if obj in by_conn:
                events += self._answers(by_conn[obj])
        for obj in ready:
            if obj in by_sentinel:
                events.append(self._exited(by_sentinel[obj]))
        return events, [obj for obj in ready if obj in extra]

    def _answers(self, worker: _Worker) -> list[Event]:
        out: list[Event] = []
        try:
            while not worker.conn.closed and worker.conn.poll():
                out.append(self._answer(worker, worker.conn.recv_bytes()))
        except (EOFError, OSError):
            pass  # the sentinel reports the death
        return out

    def _answer(self, worker: _Worker, data: bytes) -> Answer:
        worker.busy = False
        try:
            reply = decode_reply(data)
        except msgspec.DecodeError as exc:
            reply = undecodable_reply(worker.slot, exc)
        worker.retiring = reply.retiring
        if not reply.retiring and not worker.overdue:  # a worker being killed gets nothing more
            self.idle.append(worker.slot)
        return Answer(slot=worker.slot, reply=reply, dispatched_at=worker.dispatched_at)

    def _exited(self, worker: _Worker) -> Exit:
        worker.process.join()
        worker.conn.close()
        self.workers.pop(worker.slot, None)
        self._index()
        if worker.slot in self.idle:
            self.idle.remove(worker.slot)
        return Exit(slot=worker.slot, code=worker.process.exitcode, retiring=worker.retiring, overdue=worker.overdue)

    def kill_overdue(self, now: float) -> float:
        """Kill workers whose item passed its deadline; return the next deadline (0 if none).

        Cheap on most steps: the workers are only looked at once the earliest deadline has come.
        """
        if not self._next_due or now < self._next_due:
            return self._next_due
        upcoming = 0.0
        for worker in self.workers.values():
            if not worker.busy or worker.overdue:
                continue
            due = worker.dispatched_at + self.deadline_s
            if now >= due:
                worker.overdue = True
                worker.process.kill()
            elif not upcoming or due < upcoming:
                upcoming = due
        self._next_due = upcoming
        return upcoming

    def stop(self, deadline: float) -> list[Event]:
        """Tell every worker to leave at once; answers that arrive before the deadline are returned."""
        for worker in self.workers.values():
            try:
                worker.conn.send_bytes(STOP)
            except OSError:
                pass
        events: list[Event] = []
        while any(w.busy for w in self.workers.values()) and time.monotonic() < deadline:
            busy = [w for w in self.workers.values() if w.busy]
            ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy], deadline - time.monotonic())
            for worker in busy:
                if worker.conn in ready or worker.process.sentinel in ready:
                    answers = self._answers(worker)
                    events += answers
                    worker.busy = worker.busy and not answers and worker.process.is_alive()
        stop_processes([w.process for w in self.workers.values()], deadline)
        for worker in self.workers.values():
            worker.conn.close()
        self.workers.clear()
        self.idle.clear()
        self._index()
        return events


def undecodable_reply(slot: int, exc: Exception) -> Reply:
    """A reply the supervisor could not decode: the item still gets an outcome, never a second POST."""
    return Reply(result=Result(key="", outcome=Outcome.FAILED_ALGO, worker=slot, cause="internal_error",
                               finished_at=time.time()), undecodable=str(exc)[:200])


class InlinePool:
    """Runs each item in the calling process when ``wait`` is called; for tests without processes.

    ``die_on(item)`` returning True makes that item's worker "die" holding it (an ``Exit``
    event, as if it had been SIGKILLed), so crash interleavings can be driven deterministically.
    """

    def __init__(self, count: int, process: Callable[[int, WorkItem], Reply],
                 die_on: Callable[[WorkItem], bool] = lambda item: False) -> None:
        self.count = count
        self.process = process
        self.die_on = die_on
        self.idle: list[int] = []
        self.held: dict[int, WorkItem] = {}
        self.sent: list[WorkItem] = []
        self.spawned = 0

    def start(self) -> None:
        for slot in range(self.count):
            self.respawn(slot)

    def respawn(self, slot: int) -> None:
        self.spawned += 1
        self.idle.append(slot)

    def alive(self) -> int:
        return self.count

    def send(self, slot: int, item: WorkItem) -> None:
        self.held[slot] = item
        self.sent.append(item)

    def wait(self, timeout: float, extra: Sequence[Any]) -> tuple[list[Event], list[Any]]:
        events = [self._run(slot, item) for slot, item in sorted(self.held.items())]
        self.held.clear()
        ready = wait(list(extra), 0 if events else min(timeout, 0.05)) if extra else []
        return events, list(ready)

    def _run(self, slot: int, item: WorkItem) -> Event:
        if self.die_on(item):
            return Exit(slot=slot, code=-9, retiring=False, overdue=False)
        self.idle.append(slot)
        return Answer(slot=slot, reply=self.process(slot, item), dispatched_at=time.monotonic())

    def kill_overdue(self, now: float) -> float:
        return 0.0

    def stop(self, deadline: float) -> list[Event]:
        self.idle.clear()
        return []
