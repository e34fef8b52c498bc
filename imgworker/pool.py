"""The worker pool: spawns worker processes, hands items to their lanes, notices answers, deaths and overdue items.

A *lane* takes one item at a time; a worker *process* runs ``worker.threads`` lanes. The pool
knows processes only: which lanes each runs, which lanes are idle, pipes, sentinels, readiness and
restart backoff. Which item a lane holds, since when, and which lanes are past their deadline is
the in-flight table's (``inflight.InFlight``); the pool is told (``kill_overdue``, ``stop``).
A lane is idle from when its process says it is ready (``READY``, its clients built) until it is
handed an item (``take_idle_lane``), and again once its item is done (``return_lane``), unless
its process is leaving; so a process that dies while starting holds nothing and costs no image an
attempt. Each process has its own duplex pipe. A process that dies before it answered anything is
replaced after a backoff (capped, jittered, per process; reset once one answers), so a cause that
kills every new process (a bad setting, a missing file) does not spawn them in a loop.
``wait`` blocks on every process's pipe and sentinel together (``multiprocessing.connection.wait``),
plus any extra waitables the caller passes, so an answer or a death is seen at once without
polling. A process with a lane past its deadline is killed; its exit names every lane it had,
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
from collections.abc import Callable, Collection, Sequence
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

    lane: int
    reply: Reply


class Exit(msgspec.Struct, frozen=True):
    """A worker process exited, with every item its lanes held.

    ``lanes`` are its lanes; ``overdue`` those whose item passed its deadline, for which the pool
    killed it; ``retiring`` if it left because it asked to be recycled; ``early`` if it died on its
    own before it answered anything (its replacement waits a backoff).
    """

    process: int
    lanes: tuple[int, ...]
    code: int | None
    retiring: bool
    overdue: tuple[int, ...] = ()
    early: bool = False


Event = Answer | Exit


class Pool(Protocol):
    """Worker processes and their lanes, as the supervisor drives them (``ProcessPool``, ``InlinePool``).

    The pool owns processes: which lanes each runs, which lanes are idle, pipes, sentinels, start-up
    and deaths. It does not own items: ``inflight.InFlight`` knows what each lane holds; the pool
    only carries items to lanes and answers back, and names the lanes of a process that exited.
    """

    def start(self) -> None:
        """Start every worker process (its lanes become idle once it says it is ready)."""

    def idle_lanes(self) -> int:
        """How many lanes can take an item now."""

    def take_idle_lane(self) -> int:
        """An idle lane, now busy (call only when ``idle_lanes()`` is not 0)."""

    def return_lane(self, lane: int) -> None:
        """The lane's item is done: idle again, unless its process is leaving or gone."""

    def send(self, lane: int, item: WorkItem) -> None:
        """Hand ``item`` to ``lane`` (taken with ``take_idle_lane``); a dead process shows as an ``Exit``."""

    def wait(self, timeout: float, extra: Sequence[Any]) -> tuple[list[Event], list[Any]]:
        """Block until an answer, a death or one of ``extra`` is ready; the events and the ready extras."""

    def kill_overdue(self, lanes: Collection[int]) -> bool:
        """Kill the processes running ``lanes`` (items past their deadline); True if an answer waits first."""

    def respawn(self, process: int) -> float:
        """Replace an exited process; the seconds its replacement waits (a backoff after early deaths)."""

    def alive(self) -> int:
        """Worker processes alive."""

    def stop(self, deadline: float, held: Collection[int]) -> list[Event]:
        """Tell every process to leave; the answers for ``held`` lanes that arrive before ``deadline``."""


def lanes_of(process: int, threads: int) -> tuple[int, ...]:
    """The lanes of worker process ``process``: ``threads`` consecutive numbers."""
    return tuple(range(process * threads, (process + 1) * threads))


class _Process:
    """One worker process: its pipe, its lanes, and whether its lanes may take items."""

    def __init__(self, index: int, lanes: tuple[int, ...], cfg: Config, log_settings: LogSettings) -> None:
        self.index = index
        self.lanes = lanes
        ours, theirs = CTX.Pipe(duplex=True)
        self.conn: Connection = ours
        self.process = spawn(worker_main, (index, lanes, cfg, theirs, log_settings), f"imgworker-worker-{index}")
        theirs.close()  # only the worker holds that end: its death closes ours
        self.retiring = False  # asked to be recycled: told to stop, gets nothing more
        self.overdue: set[int] = set()  # lanes whose item passed its deadline: the process is being killed
        self.eof = False  # its end of the pipe closed: only its sentinel is watched now
        self.ready = False  # it said READY: only then do its lanes get items
        self.answered = False  # it answered an item: it got past its start

    @property
    def takes_items(self) -> bool:
        """Its lanes may be handed items: it is ready and not leaving."""
        return self.ready and not self.retiring and not self.overdue and not self.eof

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
        self.processes: dict[int, _Process] = {}
        self._idle: list[int] = []  # idle lanes; pop() hands out the lowest of a process first
        self._of_lane: dict[int, _Process] = {}
        self._by_conn: dict[Any, _Process] = {}  # rebuilt only when a process starts or exits: wait() is per step
        self._by_sentinel: dict[int, _Process] = {}
        self._make_backoff = make_backoff
        self._restarts: dict[int, Backoff] = {}  # process -> its early deaths in a row
        self._early: set[int] = set()  # processes whose last run died before it answered anything
        self._waiting: set[int] = set()  # processes whose replacement starts once their backoff is over

    def start(self) -> None:
        for index in range(self.cfg.worker.count):
            self._spawn(index)

    def respawn(self, process: int) -> float:
        """Replace worker process ``process``: at once, or after a backoff if its last run died early.

        Return the wait (0: started now). A waiting replacement is started by ``wait``.
        """
        backoff = self._restarts.setdefault(process, self._make_backoff())
        if process not in self._early:
            backoff.reset()
            self._spawn(process)
            return 0.0
        self._early.discard(process)
        self._waiting.add(process)
        return backoff.fail()

    def _spawn(self, process: int) -> None:
        lanes = lanes_of(process, self.cfg.worker.threads)
        self.processes[process] = _Process(process, lanes, self.cfg, self.log_settings)
        self._index()  # its lanes get items once it says it is ready

    def _start_due(self) -> float | None:
        """Start the replacements whose backoff is over; return how soon the next one is due (None: none waits)."""
        soonest: float | None = None
        for process in sorted(self._waiting):
            backoff = self._restarts[process]
            if backoff.ready():
                self._waiting.discard(process)
                self._spawn(process)
                continue
            left = max(0.0, backoff.until - backoff.clock())
            soonest = left if soonest is None else min(soonest, left)
        return soonest

    def _index(self) -> None:
        self._of_lane = {lane: p for p in self.processes.values() for lane in p.lanes}
        self._by_conn = {p.conn: p for p in self.processes.values() if not p.eof}  # an EOF pipe is always ready
        self._by_sentinel = {p.process.sentinel: p for p in self.processes.values()}

    def alive(self) -> int:
        return sum(1 for p in list(self.processes.values()) if p.process.is_alive())

    # ----- lanes -----------------------------------------------------------------------

    def idle_lanes(self) -> int:
        """How many lanes can take an item now."""
        return len(self._idle)

    def take_idle_lane(self) -> int:
        """An idle lane, now no longer idle (the caller sends it an item); IndexError if none is."""
        return self._idle.pop()

    def return_lane(self, lane: int) -> None:
        """The lane's item is done: it takes items again, unless its process is leaving or gone."""
        proc = self._of_lane.get(lane)
        if proc is not None and proc.takes_items and lane not in self._idle:
            self._idle.append(lane)

    def send(self, lane: int, item: WorkItem) -> None:
        """Hand an item to a lane taken with ``take_idle_lane``; a dead process is reported by its sentinel."""
        try:
            self._of_lane[lane].conn.send_bytes(encode_item(lane, item))
        except OSError:
            pass

    # ----- events ----------------------------------------------------------------------

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
            proc = by_conn.get(obj)
            if proc is not None and proc.process.sentinel not in ready:
                events += self._read_one(proc)
        for obj in ready:
            if obj in by_sentinel:
                proc = by_sentinel[obj]
                events += self._answers(proc)
                events.append(self._exited(proc))
        return events, [obj for obj in ready if obj in extra]

    def _read_one(self, proc: _Process) -> list[Event]:
        """One message from a pipe that ``wait`` reported ready."""
        try:
            answer = self._answer(proc, proc.conn.recv_bytes())
        except (EOFError, OSError):
            self._at_eof(proc)  # the sentinel reports the death
            return []
        return [answer] if answer is not None else []

    def _at_eof(self, proc: _Process) -> None:
        """The process closed its pipe (it is exiting): watch only its sentinel, give its lanes nothing."""
        if not proc.eof:
            proc.eof = True
            self._withdraw_lanes(proc)
            self._index()

    def _withdraw_lanes(self, proc: _Process) -> None:
        """The process's idle lanes get nothing more (it is stopping, exiting or being killed)."""
        self._idle[:] = [lane for lane in self._idle if lane not in proc.lanes]

    def _answers(self, proc: _Process) -> list[Event]:
        """Everything the process sent that is still in its pipe."""
        out: list[Event] = []
        try:
            while not proc.conn.closed and proc.conn.poll():
                answer = self._answer(proc, proc.conn.recv_bytes())
                if answer is not None:
                    out.append(answer)
        except (EOFError, OSError):
            self._at_eof(proc)  # the sentinel reports the death
        return out

    def _answer(self, proc: _Process, data: bytes) -> Answer | None:
        """An answer for one of the process's lanes; the supervisor checks that the lane holds an item."""
        if data == READY:
            self._on_ready(proc)
            return None
        try:
            lane, payload = unframe(data)
        except ValueError as exc:  # no lane to charge it to: that item's deadline ends it
            log.error("worker process %d sent a reply that names no lane (%s); ignored", proc.index, exc)
            return None
        if lane not in proc.lanes:
            log.error("worker process %d answered for lane %d, which it does not run; ignored", proc.index, lane)
            return None
        proc.answered = True  # past its start: its death is not an early one (respawn resets the backoff)
        try:
            reply = decode_reply(payload)
        except msgspec.DecodeError as exc:
            reply = undecodable_reply(lane, exc)
        if reply.retiring and not proc.retiring:
            proc.retiring = True
            proc.tell_stop()  # it answers what it holds, then leaves; its lanes get nothing more
            self._withdraw_lanes(proc)
        return Answer(lane=lane, reply=reply)

    def _on_ready(self, proc: _Process) -> None:
        """The process built its clients: its lanes can take items now."""
        if proc.ready:
            log.error("worker process %d said it is ready twice; ignored", proc.index)
            return
        proc.ready = True
        if proc.takes_items:
            self._idle.extend(reversed(proc.lanes))  # take_idle_lane() hands out the lowest lane first

    def _exited(self, proc: _Process) -> Exit:
        proc.process.join()
        proc.conn.close()
        self.processes.pop(proc.index, None)
        self._index()
        self._withdraw_lanes(proc)
        early = not proc.answered and not proc.retiring and not proc.overdue
        if early:
            self._early.add(proc.index)
        return Exit(process=proc.index, lanes=proc.lanes, code=proc.process.exitcode, retiring=proc.retiring,
                    overdue=tuple(sorted(proc.overdue)), early=early)

    def kill_overdue(self, lanes: Collection[int]) -> bool:
        """Kill the processes running ``lanes`` (their items passed their deadline).

        A process with an answer waiting in its pipe (maybe the overdue one's) is spared for now:
        return True then, so the caller looks at the deadlines again once it is read.
        """
        look_again = False
        for proc in sorted({self._of_lane[lane] for lane in lanes if lane in self._of_lane}, key=lambda p: p.index):
            if proc.overdue:
                continue  # being killed already
            if not proc.eof and proc.conn.poll():
                look_again = True
                continue
            proc.overdue = set(lanes) & set(proc.lanes)
            proc.process.kill()
            self._withdraw_lanes(proc)  # nothing more for it
        return look_again

    def stop(self, deadline: float, held: Collection[int]) -> list[Event]:
        """Tell every process to leave at once; return the answers that arrive before the deadline.

        ``held`` are the lanes holding an item: processes running one of them are waited for.
        """
        for proc in self.processes.values():
            if not proc.retiring:
                proc.tell_stop()
        events: list[Event] = []
        awaited = set(held)  # lanes whose answer has not come yet
        exited: set[int] = set()  # read to the end: nothing more can come from them
        while time.monotonic() < deadline:
            busy = [p for p in self.processes.values() if awaited.intersection(p.lanes) and p.index not in exited]
            if not busy:
                break
            ready = wait([p.conn for p in busy if not p.eof] + [p.process.sentinel for p in busy],
                         deadline - time.monotonic())
            for proc in busy:
                if proc.process.sentinel in ready:
                    exited.add(proc.index)
                if proc.conn in ready or proc.index in exited:
                    answers = self._answers(proc)
                    awaited.difference_update(e.lane for e in answers if isinstance(e, Answer))
                    events += answers
        stop_processes([p.process for p in self.processes.values()], deadline)
        for proc in self.processes.values():
            events += self._answers(proc)  # what arrived after the last wait, before the process ended
            proc.conn.close()
        self.processes.clear()
        self._idle.clear()
        self._waiting.clear()  # replacements still waiting are never started
        self._index()
        return events


def undecodable_reply(lane: int, exc: Exception) -> Reply:
    """A reply the supervisor could not decode: the item still gets an outcome, never a second POST."""
    return Reply(result=Result(key="", outcome=Outcome.FAILED_ALGO, worker=lane, cause="internal_error",
                               finished_at=time.time()), undecodable=str(exc)[:200])


class InlinePool:
    """Runs each item in the calling process when ``wait`` is called; for tests without processes.

    Each lane stands for a worker process with one lane (process ``n`` runs lane ``n``).

    ``die_on(item)`` returning True makes that item's process "die" holding it (an ``Exit``
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
        self._idle: list[int] = []
        self._alive: set[int] = set()  # lanes whose stand-in process has not died
        self.inbox: dict[int, WorkItem] = {}  # lane -> the item sent to it, run at the next wait
        self.sent: list[WorkItem] = []
        self.spawned = 0
        self._answered: list[tuple[int, Event]] = []  # (waits still to hold it, event) for ``late``

    def start(self) -> None:
        for lane in range(self.count):
            self.respawn(lane)

    def respawn(self, process: int) -> float:
        """A new "process", ready at once (nothing to build): no backoff."""
        self.spawned += 1
        self._alive.add(process)
        self._idle.append(process)
        return 0.0

    def alive(self) -> int:
        return self.count

    def idle_lanes(self) -> int:
        return len(self._idle)

    def take_idle_lane(self) -> int:
        return self._idle.pop()

    def return_lane(self, lane: int) -> None:
        """Called once the lane's answer was read (not before, with ``late``); a dead lane waits for respawn."""
        if lane in self._alive and lane not in self._idle:
            self._idle.append(lane)

    def send(self, lane: int, item: WorkItem) -> None:
        self.inbox[lane] = item
        self.sent.append(item)

    def wait(self, timeout: float, extra: Sequence[Any]) -> tuple[list[Event], list[Any]]:
        events = [self._run(lane, item) for lane, item in sorted(self.inbox.items())]
        self.inbox.clear()
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
        return due

    def _run(self, lane: int, item: WorkItem) -> Event:
        if self.die_on(item):
            self._alive.discard(lane)
            return Exit(process=lane, lanes=(lane,), code=-9, retiring=False)
        return Answer(lane=lane, reply=self.process(lane, item))

    def kill_overdue(self, lanes: Collection[int]) -> bool:
        return False

    def stop(self, deadline: float, held: Collection[int]) -> list[Event]:
        """Answers still held are delivered (a stopping process answers what it holds)."""
        events = [event for _, event in self._answered]
        self._answered.clear()
        self._idle.clear()
        return events
