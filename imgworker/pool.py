"""The worker pool: spawns worker processes, hands them items, notices answers, deaths and overdue items.

Items are handed to lanes (slots): each worker process has ``worker.threads`` of them, and a
lane holds at most one item. Each process has its own duplex pipe. A new process's lanes become
idle only once it says it is ready (``READY``, its clients built), so a process that dies while
starting holds nothing and costs no image an attempt. A process that dies before it answered
anything is replaced after a backoff (capped, jittered, per worker; reset once one answers), so a
cause that kills every new process (a bad setting, a missing file) does not spawn them in a loop.
``wait`` blocks on every process's pipe and sentinel together (``multiprocessing.connection.wait``),
plus any extra waitables the caller passes, so an answer or a death is seen at once without
polling. A process holding an item past its deadline is killed; its exit names every lane it had,
and the overdue ones. A process that asks to be recycled is told to stop at once and gets nothing more; it
answers what it holds first. Stopping sends every process its stop message at once and waits
against one deadline.

``InlinePool`` has the same interface and runs items in the calling process; with an
in-memory store it drives the supervisor in tests without processes or servers.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

import msgspec

from .backoff import Backoff, restart_backoff
from .children import CTX, spawn, stop_processes
from .config import Config
from .logs import LogSettings
from .outcomes import Outcome, Result, WorkItem
from .worker import READY, STOP, Reply, decode_reply, encode_item, unframe, worker_main

log = logging.getLogger(__name__)


class Answer(msgspec.Struct, frozen=True):
    """A lane answered for its item."""

    slot: int
    reply: Reply
    dispatched_at: float


class Exit(msgspec.Struct, frozen=True):
    """A worker process exited, with every item its lanes held.

    ``lanes`` are its lanes (the slots items are handed to); ``overdue`` those whose item passed its
    deadline, for which the pool killed it; ``retiring`` if it left because it asked to be recycled;
    ``early`` if it died on its own before it answered anything (its replacement waits a backoff).
    """

    worker: int
    lanes: tuple[int, ...]
    code: int | None
    retiring: bool
    overdue: tuple[int, ...] = ()
    early: bool = False


Event = Answer | Exit


class Pool(Protocol):
    idle: list[int]

    def start(self) -> None: ...
    def send(self, slot: int, item: WorkItem) -> None: ...
    def wait(self, timeout: float, extra: Sequence[Any]) -> tuple[list[Event], list[Any]]: ...
    def kill_overdue(self, now: float) -> float: ...
    def respawn(self, worker: int) -> float: ...
    def alive(self) -> int: ...
    def stop(self, deadline: float) -> list[Event]: ...


def lanes_of(worker: int, threads: int) -> tuple[int, ...]:
    """The lanes (slots) of worker process ``worker``: ``threads`` consecutive numbers."""
    return tuple(range(worker * threads, (worker + 1) * threads))


class _Worker:
    """One worker process: its pipe, its lanes, and what the pool knows of the items they hold."""

    def __init__(self, index: int, lanes: tuple[int, ...], cfg: Config, log_settings: LogSettings) -> None:
        self.index = index
        self.lanes = lanes
        ours, theirs = CTX.Pipe(duplex=True)
        self.conn: Connection = ours
        self.process = spawn(worker_main, (index, lanes, cfg, theirs, log_settings), f"imgworker-worker-{index}")
        theirs.close()  # only the worker holds that end: its death closes ours
        self.busy: dict[int, float] = {}  # lane -> when its item was sent
        self.retiring = False  # asked to be recycled: told to stop, gets nothing more
        self.overdue: set[int] = set()  # lanes whose item passed its deadline: the process is being killed
        self.eof = False  # its end of the pipe closed: only its sentinel is watched now
        self.ready = False  # it said READY: only then do its lanes get items
        self.answered = False  # it answered an item: it got past its start

    def tell_stop(self) -> None:
        try:
            self.conn.send_bytes(STOP)
        except OSError:
            pass


class ProcessPool:
    """``worker.count`` processes of ``worker.threads`` lanes each, one pipe per process."""

    def __init__(self, cfg: Config, log_settings: LogSettings,
                 make_backoff: Callable[[], Backoff] = restart_backoff) -> None:
        self.cfg = cfg
        self.log_settings = log_settings
        self.deadline_s = cfg.item_deadline_s
        self.workers: dict[int, _Worker] = {}
        self.idle: list[int] = []
        self._of_lane: dict[int, _Worker] = {}
        self._by_conn: dict[Any, _Worker] = {}  # rebuilt only when a worker starts or exits: wait() is per step
        self._by_sentinel: dict[int, _Worker] = {}
        self._next_due = 0.0  # earliest item deadline among busy lanes (0: none known)
        self._make_backoff = make_backoff
        self._restarts: dict[int, Backoff] = {}  # worker -> its early deaths in a row
        self._early: set[int] = set()  # workers whose last process died before it answered anything
        self._waiting: set[int] = set()  # workers whose replacement starts once their backoff is over

    def start(self) -> None:
        for index in range(self.cfg.worker.count):
            self._spawn(index)

    def respawn(self, worker: int) -> float:
        """Replace worker process ``worker``: at once, or after a backoff if its last process died early.

        Return the wait (0: started now). A waiting replacement is started by ``wait``.
        """
        backoff = self._restarts.setdefault(worker, self._make_backoff())
        if worker not in self._early:
            backoff.reset()
            self._spawn(worker)
            return 0.0
        self._early.discard(worker)
        self._waiting.add(worker)
        return backoff.fail()

    def _spawn(self, worker: int) -> None:
        lanes = lanes_of(worker, self.cfg.worker.threads)
        self.workers[worker] = _Worker(worker, lanes, self.cfg, self.log_settings)
        self._index()  # its lanes get items once it says it is ready

    def _start_due(self) -> float | None:
        """Start the replacements whose backoff is over; return how soon the next one is due (None: none waits)."""
        soonest: float | None = None
        for worker in sorted(self._waiting):
            backoff = self._restarts[worker]
            if backoff.ready():
                self._waiting.discard(worker)
                self._spawn(worker)
                continue
            left = max(0.0, backoff.until - backoff.clock())
            soonest = left if soonest is None else min(soonest, left)
        return soonest

    def _index(self) -> None:
        self._of_lane = {lane: w for w in self.workers.values() for lane in w.lanes}
        self._by_conn = {w.conn: w for w in self.workers.values() if not w.eof}  # an EOF pipe is always ready
        self._by_sentinel = {w.process.sentinel: w for w in self.workers.values()}

    def alive(self) -> int:
        return sum(1 for w in list(self.workers.values()) if w.process.is_alive())

    def send(self, slot: int, item: WorkItem) -> None:
        """Hand an item to an idle lane; a dead process is reported by its sentinel."""
        worker = self._of_lane[slot]
        now = time.monotonic()
        worker.busy[slot] = now
        due = now + self.deadline_s
        self._next_due = min(self._next_due, due) if self._next_due else due
        try:
            worker.conn.send_bytes(encode_item(slot, item))
        except OSError:
            pass

    def wait(self, timeout: float, extra: Sequence[Any]) -> tuple[list[Event], list[Any]]:
        """Block until an answer, a death or an extra waitable is ready; return events and ready extras.

        One message is read from each ready pipe (a pipe with more stays ready for the next call);
        a process that exited has everything it sent read first, so its answers come before its exit.
        """
        soonest = self._start_due()
        if soonest is not None:
            timeout = min(timeout, soonest)
        by_conn, by_sentinel = self._by_conn, self._by_sentinel
        ready = wait([*by_conn, *by_sentinel, *extra], timeout)
        events: list[Event] = []
        for obj in ready:
            worker = by_conn.get(obj)
            if worker is not None and worker.process.sentinel not in ready:
                events += self._read_one(worker)
        for obj in ready:
            if obj in by_sentinel:
                worker = by_sentinel[obj]
                events += self._answers(worker)
                events.append(self._exited(worker))
        return events, [obj for obj in ready if obj in extra]

    def _read_one(self, worker: _Worker) -> list[Event]:
        """One message from a pipe that ``wait`` reported ready."""
        try:
            answer = self._answer(worker, worker.conn.recv_bytes())
        except (EOFError, OSError):
            self._at_eof(worker)  # the sentinel reports the death
            return []
        return [answer] if answer is not None else []

    def _at_eof(self, worker: _Worker) -> None:
        """The process closed its pipe (it is exiting): watch only its sentinel, give its lanes nothing."""
        if not worker.eof:
            worker.eof = True
            self._withdraw_lanes(worker)
            self._index()

    def _withdraw_lanes(self, worker: _Worker) -> None:
        """The worker's idle lanes get nothing more (it is stopping, exiting or being killed)."""
        self.idle[:] = [lane for lane in self.idle if lane not in worker.lanes]

    def _answers(self, worker: _Worker) -> list[Event]:
        """Everything the worker sent that is still in its pipe."""
        out: list[Event] = []
        try:
            while not worker.conn.closed and worker.conn.poll():
                answer = self._answer(worker, worker.conn.recv_bytes())
                if answer is not None:
                    out.append(answer)
        except (EOFError, OSError):
            self._at_eof(worker)  # the sentinel reports the death
        return out

    def _answer(self, worker: _Worker, data: bytes) -> Answer | None:
        if data == READY:
            self._on_ready(worker)
            return None
        try:
            slot, payload = unframe(data)
        except ValueError as exc:  # no lane to charge it to: that item's deadline ends it
            log.error("worker %d sent a reply that names no lane (%s); ignored", worker.index, exc)
            return None
        if slot not in worker.busy:  # a worker bug: nothing to release, and the lane must not be idle twice
            log.error("worker %d answered for lane %d, which holds nothing; ignored", worker.index, slot)
            return None
        dispatched_at = worker.busy.pop(slot)
        worker.answered = True  # past its start: its death is not an early one (respawn resets the backoff)
        try:
            reply = decode_reply(payload)
        except msgspec.DecodeError as exc:
            reply = undecodable_reply(slot, exc)
        if reply.retiring and not worker.retiring:
            worker.retiring = True
            worker.tell_stop()  # it answers what it holds, then leaves; its lanes get nothing more
            self._withdraw_lanes(worker)
        if not worker.retiring and not worker.overdue and not worker.eof:
            self.idle.append(slot)
        return Answer(slot=slot, reply=reply, dispatched_at=dispatched_at)

    def _on_ready(self, worker: _Worker) -> None:
        """The process built its clients: its lanes can take items now."""
        if worker.ready:
            log.error("worker %d said it is ready twice; ignored", worker.index)
            return
        worker.ready = True
        if not worker.retiring and not worker.overdue and not worker.eof:
            self.idle.extend(reversed(worker.lanes))  # idle.pop() hands out the lowest lane first

    def _exited(self, worker: _Worker) -> Exit:
        worker.process.join()
        worker.conn.close()
        self.workers.pop(worker.index, None)
        self._index()
        self._withdraw_lanes(worker)
        early = not worker.answered and not worker.retiring and not worker.overdue
        if early:
            self._early.add(worker.index)
        return Exit(worker=worker.index, lanes=worker.lanes, code=worker.process.exitcode, retiring=worker.retiring,
                    overdue=tuple(sorted(worker.overdue)), early=early)

    def kill_overdue(self, now: float) -> float:
        """Kill processes holding an item past its deadline; return the next deadline (0 if none).

        Cheap on most steps: the lanes are only looked at once the earliest deadline has come.
        """
        if not self._next_due or now < self._next_due:
            return self._next_due
        upcoming = 0.0
        for worker in self.workers.values():
            if worker.overdue:
                continue
            for slot, sent_at in worker.busy.items():
                due = sent_at + self.deadline_s
                if now >= due:
                    worker.overdue.add(slot)
                elif not upcoming or due < upcoming:
                    upcoming = due
            if worker.overdue and not worker.eof and worker.conn.poll():
                worker.overdue.clear()  # an answer is waiting, maybe the overdue one's: read it first
                upcoming = now
            elif worker.overdue:
                worker.process.kill()
                self._withdraw_lanes(worker)  # nothing more for it
        self._next_due = upcoming
        return upcoming

    def stop(self, deadline: float) -> list[Event]:
        """Tell every worker to leave at once; answers that arrive before the deadline are returned."""
        for worker in self.workers.values():
            if not worker.retiring:
                worker.tell_stop()
        events: list[Event] = []
        exited: set[int] = set()  # read to the end: nothing more can come from them
        while time.monotonic() < deadline:
            busy = [w for w in self.workers.values() if w.busy and w.index not in exited]
            if not busy:
                break
            ready = wait([w.conn for w in busy if not w.eof] + [w.process.sentinel for w in busy],
                         deadline - time.monotonic())
            for worker in busy:
                if worker.process.sentinel in ready:
                    exited.add(worker.index)
                if worker.conn in ready or worker.index in exited:
                    events += self._answers(worker)
        stop_processes([w.process for w in self.workers.values()], deadline)
        for worker in self.workers.values():
            events += self._answers(worker)  # what arrived after the last wait, before the process ended
            worker.conn.close()
        self.workers.clear()
        self.idle.clear()
        self._waiting.clear()  # replacements still waiting are never started
        self._index()
        return events


def undecodable_reply(slot: int, exc: Exception) -> Reply:
    """A reply the supervisor could not decode: the item still gets an outcome, never a second POST."""
    return Reply(result=Result(key="", outcome=Outcome.FAILED_ALGO, worker=slot, cause="internal_error",
                               finished_at=time.time()), undecodable=str(exc)[:200])


class InlinePool:
    """Runs each item in the calling process when ``wait`` is called; for tests without processes.

    Each slot stands for a worker process with one lane.

    ``die_on(item)`` returning True makes that item's worker "die" holding it (an ``Exit``
    event, as if it had been SIGKILLed), so crash interleavings can be driven deterministically.

    ``late`` (a seeded ``random.Random``) makes answers late, as a pipe does: an item is still run
    at the first ``wait`` after it was sent, but its answer (or exit) is held for 0 to ``hold``
    further calls and answers due together come in shuffled order. ``stop`` delivers what is held.
    """

    def __init__(self, count: int, process: Callable[[int, WorkItem], Reply],
                 die_on: Callable[[WorkItem], bool] = lambda item: False, *, late: random.Random | None = None,
                 hold: int = 3) -> None:
        self.count = count
        self.process = process
        self.die_on = die_on
        self.late = late
        self.hold = hold
        self.idle: list[int] = []
        self.held: dict[int, WorkItem] = {}
        self.sent: list[WorkItem] = []
        self.spawned = 0
        self._answered: list[tuple[int, Event]] = []  # (waits still to hold it, event) for ``late``

    def start(self) -> None:
        for slot in range(self.count):
            self.respawn(slot)

    def respawn(self, worker: int) -> float:
        """A new "process", ready at once (nothing to build): no backoff."""
        self.spawned += 1
        self.idle.append(worker)
        return 0.0

    def alive(self) -> int:
        return self.count

    def send(self, slot: int, item: WorkItem) -> None:
        self.held[slot] = item
        self.sent.append(item)

    def wait(self, timeout: float, extra: Sequence[Any]) -> tuple[list[Event], list[Any]]:
        events = [self._run(slot, item) for slot, item in sorted(self.held.items())]
        self.held.clear()
        if self.late is not None:
            events = self._due(events)
        ready = wait(list(extra), 0 if events or self._answered else min(timeout, 0.05)) if extra else []
        return events, list(ready)

    def _due(self, answered: list[Event]) -> list[Event]:
        """Hold each new answer for a random number of waits; return those due now, shuffled."""
        assert self.late is not None
        self._answered += [(self.late.randint(0, self.hold), event) for event in answered]
        due = [event for waits, event in self._answered if waits == 0]
        self._answered = [(waits - 1, event) for waits, event in self._answered if waits > 0]
        self.late.shuffle(due)
        return [self._deliver(event) for event in due]

    def _run(self, slot: int, item: WorkItem) -> Event:
        if self.die_on(item):
            return Exit(worker=slot, lanes=(slot,), code=-9, retiring=False)
        event = Answer(slot=slot, reply=self.process(slot, item), dispatched_at=time.monotonic())
        return event if self.late is not None else self._deliver(event)

    def _deliver(self, event: Event) -> Event:
        if isinstance(event, Answer):
            self.idle.append(event.slot)  # the lane is free once its answer is read, not before
        return event

    def kill_overdue(self, now: float) -> float:
        return 0.0

    def stop(self, deadline: float) -> list[Event]:
        """Answers still held are delivered (a stopping worker answers what it holds)."""
        events = [event for _, event in self._answered]
        self._answered.clear()
        self.idle.clear()
        return events
