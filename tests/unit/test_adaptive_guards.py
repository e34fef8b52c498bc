"""Adaptive concurrency: the knee floor of a p95 cut, the cap of the doubling hold, the warning given once, the log of
a move of two calls, the time-weighted figures and each figure as metrics and the report show it (exact limits, and
a virtual-time simulation with fixed seeds)."""

from __future__ import annotations

import logging

import pytest

from imgworker.adaptive import (FIRST_PROBE_SAMPLES, OVER_HOLD, OVER_HOLD_MAX, PROBE_SAMPLES, Controller, LimitFigures,
                                Window)
from imgworker.memstore import MemoryAlgo, MemoryStore
from tests.support.memory import config, fill
from tests.support.slots_sim import Phase, simulate
from tests.unit.test_adaptive import Clock, live, ready
from tests.unit.test_adaptive_dispatch import run_counting_batches, scrape


def test_a_p95_cut_with_calls_queued_stops_at_the_knee():
    c, _ = ready(budget_s=0.25, baseline=0.2)  # no-load p95 0.2: feasible
    # 1 call queued at a knee of 19, well over the window's noise (100 calls), and 6 slow calls put the p95 over
    mean = 0.2 * 20 / 19
    slow = 0.3
    rest = (mean * 100 - slow * 6) / 94
    window = Window(latencies=(rest,) * 94 + (slow,) * 6, in_flight=20)
    assert window.p95 > 0.25
    assert c.update(window) == 19, "x0.9 would be 18, under the knee: only a drop cuts under it"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_doubling_hold_after_tries_past_the_knee_stops_at_its_cap(seed):
    # where the budget allows less than one queued call every try at 7 calls over 6 slots goes over it, and the
    # hold after each doubles: 60, 120, then no longer than OVER_HOLD_MAX x OVER_HOLD windows (~1 s each)
    run = simulate([Phase(2400, 6, 0.4)], make=lambda clock: Controller(floor=1, ceiling=64, budget_s=0.6,
                                                                         clock=clock), seed=seed, sigma=0.1)
    tries = [s.start for s in run.seconds if s.limit_area > 6.01]  # seconds with the limit past the knee
    starts = [t for i, t in enumerate(tries) if i == 0 or t - tries[i - 1] > 5.0]
    late = [t for t in starts if t >= 600.0]
    assert len(late) >= 4, starts
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert max(gaps) <= OVER_HOLD * OVER_HOLD_MAX * 1.25, gaps


def test_an_infeasible_budget_warns_once_even_when_it_becomes_infeasible_again(caplog):
    with caplog.at_level(logging.WARNING, logger="imgworker.adaptive"):
        c, clock = ready(budget_s=0.3, baseline=0.4, spread=0.1, initial=24)
        assert c.infeasible
        # a much faster live window: the baseline (and its p95) falls under the budget, and a probe starts
        clock.now = 2.0
        for _ in range(10):
            c.record(sent_at=1.5, latency_s=0.2)
        c.in_flight(24)
        c.tick()
        assert not c.infeasible and c.probing
        # the probes find the server slow again (measured twice: once at a second depth)
        for _ in range(2):
            if not c.probing:
                break
            start = clock.now
            clock.now += 1.0
            for n in range(PROBE_SAMPLES):
                c.record(sent_at=start, latency_s=0.5 if n == PROBE_SAMPLES - 1 else 0.4)
            c.tick()
        assert c.infeasible and not c.probing
    assert sum("over the latency budget" in r.message for r in caplog.records) == 1


def test_a_move_of_two_calls_is_logged(caplog):
    c, _ = ready()
    with caplog.at_level(logging.INFO, logger="imgworker.adaptive"):
        assert c.update(live(0.2, 20, drops=1)) == 18
    moves = [r.message for r in caplog.records if "concurrency limit" in r.message]
    assert len(moves) == 1 and "20 -> 18" in moves[0]


def test_figures_weigh_each_limit_by_the_time_it_was_in_force():
    clock = Clock()
    c = Controller(floor=2, ceiling=64, initial=20, clock=clock)
    assert c.probing and c.limit == 10
    clock.now = 1.0
    for _ in range(FIRST_PROBE_SAMPLES):
        c.record(sent_at=0.5, latency_s=0.2)
    c.tick()  # 1 s at 10 (the first probe), then back to 20
    assert c.limit == 20
    clock.now = 4.0
    c.tick()  # 3 s at 20: no window is due
    f = c.figures()
    assert f.mean_limit == pytest.approx((10 * 1 + 20 * 3) / 4)
    assert (f.min_limit, f.max_limit, f.limit) == (10, 20, 20)


def test_metrics_and_report_show_each_figure_of_the_controller(tmp_path):
    cfg = config(tmp_path, worker={"count": 6}, algo={"adaptive": True, "adaptive_min": 2})
    store = MemoryStore()
    fill(store, ["p/a"], 3)
    sup, _ = run_counting_batches(cfg, store, MemoryAlgo(store, elapsed_ms=5.0))
    url = "http://127.0.0.1:8000/infer"
    figures = LimitFigures(limit=5, baseline_s=0.25, queue_estimate=1.5, budget_infeasible=True, probes=3,
                           mean_limit=4.5, min_limit=2, max_limit=7)
    sup.endpoints.limit_figures = lambda: {url: figures}  # type: ignore[method-assign]
    text = scrape(sup)
    label = f'endpoint="{url}"'
    for name, value in (("limit", 5.0), ("baseline_seconds", 0.25), ("queue_estimate", 1.5),
                        ("budget_infeasible", 1.0), ("probes_total", 3.0)):
        assert f"imgworker_algorithm_{name}{{{label}}} {value}" in text, name
    assert sup.report().limits == {url: {"mean": 4.5, "min": 2, "max": 7, "now": 5}}
