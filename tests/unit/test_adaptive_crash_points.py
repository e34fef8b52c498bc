"""The adaptive limit at the crash points of an image's path: worker deaths and a drain while items wait for a slot.

The supervisor's clock stands still, so no window closes on time and each endpoint's limit stays
low (its floor, or one slot on one endpoint of two). Counted at the far end: the calls
the algorithm received per image, and the result lines per key.
"""

from __future__ import annotations

from collections import Counter

import pytest

from imgworker.endpoints import Call, EndpointPool
from imgworker.memstore import MemoryAlgo, MemoryStore
from imgworker.outcomes import WorkItem
from tests.support.memory import config, fill, supervisor
from tests.support.results import lines, results_of

pytestmark = pytest.mark.timeout(60)

A = "http://127.0.0.1:8000/infer"
B = "http://127.0.0.1:8001/infer"


class FrozenClock:
    def __call__(self) -> float:
        return 100.0


@pytest.mark.parametrize("endpoints", [[A], [A, B]])
def test_lanes_dying_at_the_floor_give_their_slots_back_and_every_image_ends_once(tmp_path, endpoints):
    cfg = config(tmp_path, worker={"count": 6, "max_attempts": 3},
                 algo={"adaptive": True, "adaptive_min": 2, "endpoints": endpoints})
    store = MemoryStore()
    keys = fill(store, ["p/a", "p/b"], 15)
    doomed = set(keys[::2])  # the lane holding one of these dies on its first two attempts

    def dies(item: WorkItem) -> bool:
        return item.ref.key in doomed and item.attempt <= 2

    algo = MemoryAlgo(store, elapsed_ms=5.0)
    sup = supervisor(cfg, store, algo, die_on=dies, clock=FrozenClock())
    with sup.running():
        if len(endpoints) > 1:
            sup.endpoints.controllers[B].limit = 1  # several endpoints, different limits (under the floor: one slot)
        assert sup.step_until(lambda: sup.pending == 0 and sup.in_flight == 0 and len(lines(cfg)) == len(keys),
                              max_steps=2000), (sup.pending, sup.in_flight, sup.endpoints.figures())
        assert {url: s.in_flight for url, s in sup.endpoints.states.items()} == dict.fromkeys(endpoints, 0)
    assert lines(cfg) == Counter(keys)
    assert algo.calls == Counter(keys)  # a lane that died made no call: each image analysed once
    assert {r.outcome.value for r in results_of(cfg)} == {"no_detection"}


def test_a_drain_while_images_wait_under_the_limit_saves_them_and_the_next_run_ends_each_once(tmp_path):
    cfg = config(tmp_path, worker={"count": 6}, algo={"adaptive": True, "adaptive_min": 1})
    store = MemoryStore()
    keys = fill(store, ["p/a"], 12)
    algo = MemoryAlgo(store, elapsed_ms=5.0)
    sup = supervisor(cfg, store, algo, clock=FrozenClock())
    with sup.running():
        (controller,) = sup.endpoints.controllers.values()
        controller.limit = 1
        assert sup.step_until(lambda: len(lines(cfg)) >= 3 and sup.pending > 0, max_steps=2000)
    first = lines(cfg)
    assert first and all(n == 1 for n in first.values()) and len(first) < len(keys)
    again = supervisor(cfg, store, algo)
    again.run()
    assert lines(cfg) == Counter(keys)
    assert algo.calls == Counter(keys)


def test_an_item_sent_before_an_ejection_ending_without_calls_does_not_let_a_second_probe_through(tmp_path):
    clock = {"now": 100.0}
    cfg = config(tmp_path, worker={"count": 8}, algo={"adaptive": True, "adaptive_min": 4, "eject_after_failures": 2, "eject_cooldown_s": 5.0})
    pool = EndpointPool(cfg.algo, clock=lambda: clock["now"])
    hung = pool.choose("")  # its call hangs; later its lane's process is killed (no calls on its reply)
    assert hung == (A,)
    pool.dispatched(hung)
    for _ in range(2):
        sent = pool.choose("")
        assert sent is not None
        pool.dispatched(sent)
        pool.finished(sent, [Call(A, False, "connection_error")], sent_at=clock["now"])
    assert pool.choose("") is None  # ejected
    clock["now"] += 6.0
    probe = pool.choose("")
    assert probe == (A,) and pool.is_probe(probe)
    pool.dispatched(probe)
    pool.finished(hung, [], sent_at=100.0)  # not the probe: the half-open endpoint still has its one probe out
    assert pool.choose("") is None
    pool.finished(probe, [], sent_at=clock["now"], probe=True)  # the probe's lane died: another may go
    assert pool.choose("") == (A,)
