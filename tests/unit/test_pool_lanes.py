"""The pool's lane bookkeeping, with stand-in processes over real pipes (no worker is started).

The pool knows processes and idle lanes; what a lane holds is the in-flight table's, so these
tests tell the pool which lanes are held (``stop``) or overdue (``kill_overdue``).
"""

from __future__ import annotations

import os
import time
from multiprocessing import Pipe
from typing import Any

import pytest

from imgworker.config import load_config
from imgworker.outcomes import Outcome, Result
from imgworker.backoff import Backoff
from imgworker.inflight import InFlight
from imgworker.outcomes import ImageRef, WorkItem
from imgworker.pool import Answer, Exit, ProcessPool, _Process
from imgworker.worker import READY, Reply, _result_encoder, frame

pytestmark = pytest.mark.timeout(30)


class StandIn:
    """Stands for a worker process: ``alive`` is what is_alive answers; a dead one's sentinel is ready."""

    def __init__(self, alive: bool) -> None:
        self.alive = alive
        self.killed = False
        self._read, self._write = os.pipe()
        if not alive:
            os.close(self._write)
        self.sentinel = self._read
        self.exitcode = None if alive else 0

    def is_alive(self) -> bool:
        return self.alive

    def kill(self) -> None:
        self.killed = True

    def join(self, timeout: float | None = None) -> None:
        pass


def stand_in(pool: ProcessPool, lanes: tuple[int, ...], *, alive: bool, ready: bool = True):
    worker = object.__new__(_Process)
    ours, theirs = Pipe(duplex=True)
    worker.index, worker.lanes, worker.conn = 0, lanes, ours
    worker.process = StandIn(alive)
    worker.retiring, worker.overdue, worker.eof = False, set(), False
    worker.ready, worker.answered = ready, False
    pool.processes[0] = worker
    pool._index()
    return worker, theirs


def pool_of(threads: int, **kwargs: Any) -> ProcessPool:
    cfg = load_config(env={}, overrides={"worker": {"count": 1, "threads": threads, "item_deadline_s": 5.0}})
    return ProcessPool(cfg, None, **kwargs)  # type: ignore[arg-type]


def item(key: str) -> WorkItem:
    return WorkItem(ref=ImageRef(key=key, task_type="p", task_id="t"))


def reply(key: str) -> bytes:
    return _result_encoder.encode(Reply(result=Result(key=key, outcome=Outcome.NO_DETECTION)))


def test_stop_reads_the_answers_of_a_process_that_already_exited():
    pool = pool_of(2)
    worker, theirs = stand_in(pool, (0, 1), alive=False)
    theirs.send_bytes(frame(0, reply("a.jpg")))
    theirs.send_bytes(frame(1, reply("b.jpg")))
    theirs.close()
    events = pool.stop(time.monotonic() + 0.5, held=[0, 1])
    assert sorted(e.reply.result.key for e in events if isinstance(e, Answer)) == ["a.jpg", "b.jpg"]


def test_a_process_killed_past_a_deadline_gets_nothing_more_on_its_idle_lanes():
    pool = pool_of(3)
    worker, _ = stand_in(pool, (0, 1, 2), alive=True)
    pool._idle[:] = [1]
    assert not pool.kill_overdue([0])
    assert worker.process.killed and worker.overdue == {0}
    assert pool.idle_lanes() == 0
    pool.return_lane(2)  # its item is done, but its process is being killed
    assert pool.idle_lanes() == 0


def test_a_reply_for_a_lane_the_process_does_not_run_is_ignored():
    pool = pool_of(2)
    _, theirs = stand_in(pool, (0, 1), alive=True)
    pool._idle[:] = [1, 0]
    theirs.send_bytes(frame(5, reply("x.jpg")))
    events, _ = pool.wait(0.5, [])
    assert events == [] and sorted(pool._idle) == [0, 1]


def test_a_reply_is_an_answer_and_its_lane_is_idle_once_returned_once():
    pool = pool_of(2)
    worker, theirs = stand_in(pool, (0, 1), alive=True)
    pool._idle[:] = [0]
    theirs.send_bytes(frame(1, reply("y.jpg")))
    events, _ = pool.wait(0.5, [])
    assert [(e.lane, e.reply.result.key) for e in events if isinstance(e, Answer)] == [(1, "y.jpg")]
    assert pool.idle_lanes() == 1, "a lane was idle before its answer was dealt with"
    pool.return_lane(1)
    pool.return_lane(1)
    assert sorted(pool._idle) == [0, 1]


def test_stop_reads_an_answer_that_arrives_after_its_last_wait():
    pool = pool_of(1)
    worker, theirs = stand_in(pool, (0,), alive=True)
    worker.process.is_alive = lambda: False  # type: ignore[method-assign]  # joined by the time it is read
    theirs.send_bytes(frame(0, reply("late.jpg")))
    events = pool.stop(time.monotonic(), held=[0])  # the deadline has passed: no wait at all
    assert [e.reply.result.key for e in events if isinstance(e, Answer)] == ["late.jpg"]


def test_a_closed_pipe_is_not_waited_on_again_and_its_lanes_get_nothing():
    pool = pool_of(2)
    worker, theirs = stand_in(pool, (0, 1), alive=True)  # its sentinel is not ready yet
    pool._idle[:] = [0, 1]
    theirs.close()
    events, _ = pool.wait(0.5, [])
    assert events == [] and worker.eof and pool.idle_lanes() == 0
    started = time.monotonic()
    events, _ = pool.wait(0.2, [])
    assert events == [] and time.monotonic() - started >= 0.15, "an EOF pipe made wait return at once"


def test_no_kill_while_an_answer_is_waiting_to_be_read():
    clock = Clock()
    inflight = InFlight(deadline_s=5.0, clock=clock)
    pool = pool_of(2)
    worker, theirs = stand_in(pool, (0, 1), alive=True)
    inflight.take(0, item("late.jpg"), queued_at=clock.now)
    clock.now += 4.0
    inflight.take(1, item("other.jpg"), queued_at=clock.now)
    clock.now += 2.0
    theirs.send_bytes(frame(0, reply("late.jpg")))
    assert inflight.overdue(clock.now) == [0]
    assert pool.kill_overdue([0]), "an answer is waiting: the caller must look again"
    assert not worker.process.killed and worker.overdue == set()
    inflight.look_again(clock.now)
    events, _ = pool.wait(0.5, [])
    assert [e.lane for e in events if isinstance(e, Answer)] == [0]
    inflight.done(0)
    assert inflight.overdue(clock.now) == [] and not pool.kill_overdue([])
    assert not worker.process.killed, "the overdue lane answered: nothing left to kill for"


def test_a_dead_process_s_answers_come_before_its_exit_and_none_is_dropped():
    pool = pool_of(3)
    worker, theirs = stand_in(pool, (0, 1, 2), alive=False)  # exited: its sentinel is ready
    theirs.send_bytes(frame(0, reply("a.jpg")))
    theirs.send_bytes(frame(2, reply("c.jpg")))  # lane 1 died holding its image
    theirs.close()
    events, _ = pool.wait(0.5, [])
    assert [type(e).__name__ for e in events] == ["Answer", "Answer", "Exit"], events
    assert sorted(e.reply.result.key for e in events if isinstance(e, Answer)) == ["a.jpg", "c.jpg"]
    assert events[-1].lanes == (0, 1, 2) and pool.processes == {}


def test_late_inline_answers_are_held_across_waits_and_reordered():
    from random import Random

    from imgworker.pool import InlinePool

    def process(lane: int, item: WorkItem) -> Reply:
        return Reply(result=Result(key=item.ref.key, outcome=Outcome.NO_DETECTION))

    pool = InlinePool(8, process, late=Random(3))
    pool.start()
    for n in range(8):
        pool.send(pool.take_idle_lane(), item(f"{n}.jpg"))
    per_wait = []
    for _ in range(5):
        answers = [e for e in pool.wait(0, [])[0] if isinstance(e, Answer)]
        assert pool.idle_lanes() == sum(map(len, per_wait)), "a lane was idle before its answer was dealt with"
        for answer in answers:
            pool.return_lane(answer.lane)
        per_wait.append([e.reply.result.key for e in answers])
    delivered = [key for keys in per_wait for key in keys]
    assert sorted(delivered) == sorted(f"{n}.jpg" for n in range(8))  # all of them, once each
    assert len([keys for keys in per_wait if keys]) > 1, "every answer came in one wait"
    assert delivered != sorted(delivered), "answers came in lane order"
    assert pool.idle_lanes() == 8


def test_a_new_process_gets_items_only_once_it_says_it_is_ready():
    pool = pool_of(2)
    _, theirs = stand_in(pool, (0, 1), alive=True, ready=False)
    events, _ = pool.wait(0.05, [])
    assert events == [] and pool.idle_lanes() == 0, "lanes of a process still starting were handed out"
    theirs.send_bytes(READY)
    events, _ = pool.wait(0.5, [])
    assert events == [] and pool.idle_lanes() == 2
    assert [pool.take_idle_lane(), pool.take_idle_lane()] == [0, 1]  # the lowest lane first


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def die_early(pool: ProcessPool, *, answered: bool = False) -> Exit:
    """A stand-in process of worker 0 dies; return the pool's Exit event."""
    worker, theirs = stand_in(pool, (0,), alive=False)
    if answered:
        theirs.send_bytes(frame(0, reply("done.jpg")))
    theirs.close()
    events, _ = pool.wait(0.5, [])
    exits = [e for e in events if isinstance(e, Exit)]
    assert len(exits) == 1
    return exits[0]


def test_early_deaths_are_replaced_after_a_growing_capped_backoff_reset_by_an_answer():
    clock = Clock()
    pool = pool_of(1, make_backoff=lambda: Backoff(1.0, 4.0, clock=clock))  # no jitter: the waits are exact
    spawned: list[int] = []
    pool._spawn = spawned.append  # type: ignore[method-assign]
    waits = []
    for _ in range(4):
        assert die_early(pool).early
        waits.append(pool.respawn(0))
        pool.wait(0.0, [])
    assert waits == [1.0, 2.0, 4.0, 4.0] and spawned == [], "a process that died at start was replaced at once"
    clock.now += 4.0
    pool.wait(0.0, [])
    assert spawned == [0]
    exit = die_early(pool, answered=True)  # this one answered an item: past its start
    assert not exit.early and pool.respawn(0) == 0.0 and spawned == [0, 0]
    assert die_early(pool).early and pool.respawn(0) == 1.0, "an answer did not reset the backoff"


def test_a_replacement_still_waiting_is_never_started_after_stop():
    clock = Clock()
    pool = pool_of(1, make_backoff=lambda: Backoff(1.0, 1.0, clock=clock))
    spawned: list[int] = []
    pool._spawn = spawned.append  # type: ignore[method-assign]
    die_early(pool)
    pool.respawn(0)
    pool.stop(time.monotonic(), held=[])
    clock.now += 2.0
    pool.wait(0.0, [])
    assert spawned == []
