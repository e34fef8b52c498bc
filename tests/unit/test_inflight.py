"""The in-flight table, alone and as the supervisor's one owner of what each lane holds.

The supervisor tests drive it through in-memory parts and an injected clock; what is counted is
at the far end: the calls the in-memory algorithm received and the lines in the results file.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from imgworker.config import Config, load_config
from imgworker.inflight import InFlight
from imgworker.memstore import MemoryAlgo, MemoryStore
from imgworker.outcomes import ImageRef, Outcome, Result, WorkItem
from imgworker.pool import Answer, Event, Exit, InlinePool
from imgworker.results import read_results
from imgworker.supervisor import Supervisor, memory_parts
from imgworker.worker import Reply
from tests.support.driving import steps

pytestmark = pytest.mark.timeout(60)


def config(tmp_path: Any, **sections: dict[str, Any]) -> Config:
    overrides: dict[str, dict[str, Any]] = {
        "run": {"state_dir": str(tmp_path / "state"), "until_idle": True, "checkpoint_interval_s": 3600.0},
        "scan": {"interval_s": 0.01},
    }
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return load_config(env={}, overrides=overrides)


def fill(store: MemoryStore, n: int) -> list[str]:
    keys = [f"p/a/20240101-000000.{i:03d}.jpg" for i in range(n)]
    for key in keys:
        store.put(key, b"\xff\xd8jpeg")
    return keys


def lines(cfg: Config) -> Counter[str]:
    return Counter(r.key for r in read_results(cfg.results_path))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def item(key: str) -> WorkItem:
    return WorkItem(ref=ImageRef(key=key, task_type="p", task_id="t"))


def test_a_lane_holds_one_item_and_a_key_is_held_by_one_lane():
    clock = Clock()
    table = InFlight(deadline_s=10.0, clock=clock)
    sent = table.take(3, item("a.jpg"), queued_at=990.0, endpoints=("http://e1/infer",), probe=True)
    assert sent.endpoints == ("http://e1/infer",)
    with pytest.raises(ValueError):
        table.take(3, item("b.jpg"), queued_at=clock.now)  # lane 3 is busy
    with pytest.raises(ValueError):
        table.take(4, item("a.jpg"), queued_at=clock.now)  # a.jpg is held already
    held = table.of_lane(3)
    assert held is not None and (held.sent_at, held.queued_at, held.probe) == (1000.0, 990.0, True)
    assert table.holder("a.jpg") == 3 and table.is_held("a.jpg") and table.held_keys() == ["a.jpg"]
    assert list(table) == [3] and len(table) == 1
    assert table.done(3) == held and table.done(3) is None
    assert table.holder("a.jpg") is None and not table.is_held("a.jpg") and len(table) == 0


def test_deadlines_on_the_table_s_clock_reported_once_unless_looked_at_again():
    clock = Clock()
    table = InFlight(deadline_s=10.0, clock=clock)
    table.take(0, item("a.jpg"), queued_at=clock.now)
    clock.now += 4.0
    table.take(1, item("b.jpg"), queued_at=clock.now)
    assert table.next_deadline == 1010.0
    assert table.overdue(1009.9) == []
    assert table.overdue(1010.0) == [0] and table.next_deadline == 1014.0
    assert table.overdue(1011.0) == [], "an overdue lane was reported twice"
    table.look_again(1011.0)
    assert table.overdue(1011.0) == [0]
    table.done(0)
    assert table.overdue(1014.0) == [1]


class Stuck(InlinePool):
    """A pool whose processes never answer; ``kill_overdue`` kills, and the kill comes back as an Exit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.killed: list[int] = []

    def wait(self, timeout: float, extra: Sequence[Any]) -> tuple[list[Event], list[Any]]:
        if not self.killed:
            return [], []
        events: list[Event] = [Exit(process=lane, lanes=(lane,), code=-9, retiring=False, overdue=(lane,))
                               for lane in self.killed]
        self._alive.difference_update(self.killed)
        self.killed = []
        return events, []

    def kill_overdue(self, lanes: Any) -> bool:
        self.killed += [lane for lane in lanes if lane in self._alive]
        return False


def test_an_item_past_its_deadline_on_the_supervisor_s_clock_ends_once(tmp_path):
    cfg = config(tmp_path, worker={"count": 1, "item_deadline_s": 30.0, "max_attempts": 1},
                 run={"until_idle": False})
    store = MemoryStore()
    keys = fill(store, 1)
    algo = MemoryAlgo(store)
    parts = memory_parts(cfg, store, algo)
    assert isinstance(parts.pool, InlinePool)
    pool = Stuck(1, parts.pool.process)
    clock = Clock()
    sup = Supervisor(cfg, show_progress=False, parts=dataclasses.replace(parts, pool=pool), clock=clock)
    with sup.running(drain=False):
        assert sup.step_until(lambda: sup.in_flight == 1, max_steps=200)
        steps(sup, 5)  # real time passes; the supervisor's clock does not
        assert not pool.killed and sup.in_flight == 1 and not lines(cfg)
        clock.now += 30.0
        sup.step()  # the deadline came on its clock: the process is killed, its exit ends the image
        sup.step()
        assert sup.in_flight == 0
    results = list(read_results(cfg.results_path))
    assert [(r.key, r.outcome, r.cause) for r in results] == [(keys[0], Outcome.FAILED_WORKER, "deadline")]


def test_an_answer_from_a_lane_that_holds_nothing_is_ignored_and_frees_no_lane(tmp_path):
    cfg = config(tmp_path, worker={"count": 2})
    store = MemoryStore()
    keys = fill(store, 6)
    algo = MemoryAlgo(store)
    sup = Supervisor(cfg, show_progress=False, parts=memory_parts(cfg, store, algo))
    with sup.running():
        idle = sup.pool.idle_lanes()
        stray = Answer(lane=0, reply=Reply(result=Result(key=keys[0], outcome=Outcome.NO_DETECTION)))
        sup._on_event(stray)  # a worker bug: lane 0 holds nothing
        assert sup.pool.idle_lanes() == idle, "a lane that holds nothing was made idle again"
        assert not lines(cfg)
        assert sup.step_until(lambda: sum(lines(cfg).values()) == len(keys), max_steps=500)
    assert lines(cfg) == Counter(keys) and algo.calls == Counter(keys)
