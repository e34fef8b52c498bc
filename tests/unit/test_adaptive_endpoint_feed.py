"""Adaptive concurrency where the pool feeds it: calls in flight, drops and the latency budget reach each endpoint's
controller (an ``EndpointPool`` on a virtual clock, exact limits)."""

from __future__ import annotations

import math

from imgworker.adaptive import CUT, FIRST_PROBE_SAMPLES
from imgworker.config import AlgoConfig
from imgworker.endpoints import Call, EndpointPool

URL = "http://127.0.0.1:8000/infer"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def send(pool: EndpointPool, clock: Clock, count: int, *, ms: float = 200.0, cause: str = "") -> None:
    """``count`` items sent at once, all answered (or dropped, with ``cause``) one second later."""
    sent = clock.now
    for _ in range(count):
        assert pool.choose("") is not None
        pool.dispatched((URL,))
    clock.now += 1.0
    call = Call(URL, healthy=not cause, cause=cause, ms=0.0 if cause else ms)
    for _ in range(count):
        pool.finished((URL,), [call], sent_at=sent)


def started(**algo: object) -> tuple[EndpointPool, Clock]:
    """A pool whose endpoint's first probe (at the floor of 1) measured 200 ms."""
    clock = Clock()
    pool = EndpointPool(AlgoConfig(adaptive=True, adaptive_min=1, **algo), clock, lanes=64)  # type: ignore[arg-type]
    for _ in range(FIRST_PROBE_SAMPLES + 1):  # a window closes as calls are dispatched or finish: one more
        send(pool, clock, 1)
    assert pool.limit_figures()[URL].baseline_s == 0.2
    return pool, clock


def grown_to(limit: int) -> tuple[EndpointPool, Clock]:
    """A pool whose endpoint used its limit in full, at the baseline (nothing queued), until it reached ``limit``."""
    pool, clock = started()
    for _ in range(10 * limit):
        if pool.limit(URL) >= limit:
            break
        send(pool, clock, pool.limit(URL))
    return pool, clock


def test_a_limit_used_in_full_with_nothing_queued_grows():
    pool, _ = grown_to(8)
    assert pool.limit(URL) >= 8, "the calls in flight are the pool's: 1, 2, 4 used in full, nothing queued"


def test_an_endpoint_that_answers_503_has_its_limit_cut():
    pool, clock = grown_to(8)
    limit = pool.limit(URL)
    send(pool, clock, limit, cause="http_503")
    pool.dispatched((URL,))  # closes the window (the endpoint is ejected now: a probe)
    assert pool.limit(URL) == math.floor(limit * CUT)


def test_the_latency_budget_reaches_the_controller():
    pool, _ = started(latency_budget_ms=100.0)  # 200 ms with no queueing: the budget cannot be met
    assert pool.limit_figures()[URL].budget_infeasible
