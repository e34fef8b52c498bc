"""Adaptive concurrency: a drop during a probe window cuts the limit the probe returns to (exact limits)."""

from __future__ import annotations

import math

from imgworker.adaptive import CUT, PROBE_EVERY, Controller
from tests.unit.test_adaptive import Clock, live, ready


def test_a_drop_in_the_first_probe_cuts_the_limit_it_returns_to():
    clock = Clock()
    c = Controller(floor=2, ceiling=64, initial=20, clock=clock)
    assert c.probing and c.limit == 10
    clock.now = 1.0
    c.record(sent_at=0.5, drop=True)
    c.tick()
    assert not c.probing and c.limit == math.floor(20 * CUT) and c.baseline_s == 0.0, "no baseline from a drop"


def test_a_drop_in_a_scheduled_probe_cuts_the_limit_it_returns_to():
    c, clock = ready(initial=20)
    c.update(live(0.2 * 24 / 20, 24))  # queue 4: in the band, the limit stays 20
    for _ in range(PROBE_EVERY - 1):
        clock.now += 1.0
        for _ in range(10):
            c.record(sent_at=clock.now - 0.5, latency_s=0.2 * 24 / 20)
        c.in_flight(24)
        c.tick()
    assert c.probing and c.limit < 20
    clock.now += 0.5
    c.record(sent_at=clock.now - 0.1, drop=True)  # sent since the probe began: the server refuses even fewer calls
    c.tick()
    assert not c.probing and c.limit == math.floor(20 * CUT) and c.baseline_s == 0.2
