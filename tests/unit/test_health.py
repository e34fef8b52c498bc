"""The /healthz rule on figures alone: idle, progress, a stall, a busy service, a stop, a silent loop."""

from __future__ import annotations

from imgworker.cleaner import CleanerStats
from imgworker.health import LOOP_PATIENCE_S, Health
from imgworker.outcomes import ImageRef, Outcome, Result
from imgworker.recorder import Gauges, Snapshot
from imgworker.stats import Stats


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def snapshot(*, done: int, queue: int, in_flight: int, lanes: int = 2) -> Snapshot:
    stats = Stats(lanes)
    for n in range(done):
        ref = ImageRef(key=f"p/t/{n}.jpg")
        stats.scanned += 1
        stats.record(Result(key=ref.key, outcome=Outcome.INFERRED, finished_at=1.0))
    report = stats.report(pending=queue, in_flight=in_flight, wall_s=1.0)
    return Snapshot(report=report, gauges=Gauges(queue_depth=queue, in_flight=in_flight), cleaner=CleanerStats(),
                    latency={})


def watch(health: Health, clock: Clock, seconds: int, **figures: int) -> tuple[int, dict]:
    for _ in range(seconds):
        health.observe(snapshot(**figures), stopping=False)
        clock.now += 1.0
    return health.verdict()


def test_nothing_waiting_is_idle_and_healthy():
    clock = Clock()
    code, body = watch(Health(5.0, clock), clock, 20, done=3, queue=0, in_flight=0)
    assert (code, body["status"]) == (200, "idle")


def test_waiting_with_a_lane_free_and_no_outcome_is_a_stall_once_the_window_has_passed():
    clock = Clock()
    health = Health(5.0, clock)
    code, body = watch(health, clock, 3, done=0, queue=4, in_flight=0)
    assert (code, body["status"]) == (200, "ok")  # not yet: within the window
    code, body = watch(health, clock, 5, done=0, queue=4, in_flight=0)
    assert (code, body["status"], body["waiting"]) == (503, "stalled", 4)
    code, body = watch(health, clock, 1, done=1, queue=3, in_flight=0)  # one outcome: progress again
    assert (code, body["status"]) == (200, "ok")


def test_a_slow_service_with_every_lane_busy_is_not_a_stall():
    clock = Clock()
    code, body = watch(Health(5.0, clock), clock, 30, done=0, queue=4, in_flight=2, lanes=2)
    assert (code, body["status"]) == (200, "ok")


def test_starting_and_stopping_answer_503():
    clock = Clock()
    health = Health(5.0, clock)
    assert health.verdict()[1]["status"] == "starting" and health.verdict()[0] == 503
    health.observe(snapshot(done=0, queue=0, in_flight=0), stopping=True)
    assert health.verdict()[0] == 503 and health.verdict()[1]["status"] == "stopping"


def test_a_loop_that_stops_looking_is_a_stall():
    clock = Clock()
    health = Health(5.0, clock)
    health.observe(snapshot(done=0, queue=0, in_flight=0), stopping=False)
    clock.now += LOOP_PATIENCE_S + 1
    code, body = health.verdict()
    assert (code, body["status"]) == (503, "stalled") and "loop" in body["reason"]


def test_images_waiting_in_the_backlog_with_a_lane_free_and_no_outcome_are_a_stall():
    clock = Clock()
    health = Health(5.0, clock)
    for _ in range(8):
        stats = Stats(2)
        report = stats.report(pending=0, in_flight=0, wall_s=1.0)
        health.observe(Snapshot(report=report, gauges=Gauges(queue_depth=0, backlog=4, in_flight=0),
                                cleaner=CleanerStats(), latency={}), stopping=False)
        clock.now += 1.0
    code, body = health.verdict()
    assert (code, body["status"], body["waiting"]) == (503, "stalled", 4)
