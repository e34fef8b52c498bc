"""The benchmark harness's arithmetic: efficiency, stability, knee choice, break-even."""

from __future__ import annotations

import pytest

from benchmarks.check_vs_waste import break_even
from imgworker.outcomes import Outcome, Result
from imgworker.tune import Point, TuneParams, _point, efficiency, ideal_throughput, is_stable, recommend, window_rates


def point(n: int, tput: float, p95: float = 100.0) -> Point:
    return Point(workers=n, throughput_per_s=tput, ideal_per_s=n * 5.0, efficiency=tput / (n * 5.0),
                 efficiency_nominal=tput / (n * 5.0), p50_ms=1,
                 p95_ms=p95, p99_ms=1, algo_p50_ms=1, algo_p95_ms=1, algo_p99_ms=1, overhead_p50_ms=0.1,
                 overhead_p99_ms=0.5, stat_p50_ms=0.5, overhead_excl_check_p50_ms=0.1,
                 overhead_excl_check_p99_ms=0.2, cpu_s_per_1000=1, rss_worker_mb=1, rss_supervisor_mb=1, rss_manager_mb=1,
                 windows=3, stable=True, images=10)


def test_ideal_and_efficiency():
    assert ideal_throughput(32, 200.0) == pytest.approx(160.0)
    assert ideal_throughput(32, 200.0, capacity_per_s=100.0) == 100.0
    assert efficiency(152.0, 160.0) == pytest.approx(0.95)
    assert efficiency(1.0, 0.0) == 0.0


def test_efficiency_against_nominal_latency_shows_a_slowed_service():
    """The service slowed from 200 to 250 ms: efficiency against it is 1.0, against the nominal L 0.8."""
    params = TuneParams(latency_ms=200.0)
    measured = [Result(key=f"k{i}", outcome=Outcome.NO_DETECTION, algo_ms=250.0, e2e_ms=251.0, stat_ms=0.5)
                for i in range(40)]
    p = _point(10, params, measured, [40.0, 40.0, 40.0], 3.0, 1.0, [], 120)
    assert p.ideal_per_s == pytest.approx(40.0, rel=0.02)  # N / measured mean (log histogram, within a bucket)
    assert p.efficiency == pytest.approx(1.0, rel=0.02)
    assert p.efficiency_nominal == pytest.approx(40.0 / (10 / 0.2))  # 0.8
    assert p.efficiency_nominal < p.efficiency


def test_stability_needs_agreeing_windows():
    assert not is_stable([10, 10], windows=3, tolerance=0.05)
    assert is_stable([3, 10, 10.2, 9.9], windows=3, tolerance=0.05)
    assert not is_stable([10, 12, 10], windows=3, tolerance=0.05)
    assert not is_stable([0, 0, 0], windows=3, tolerance=0.05)


def test_window_rates():
    times = [0.1, 0.2, 1.1, 1.5, 1.9, 2.5]
    assert window_rates(times, 0.0, 1.0, 3) == [2.0, 3.0, 1.0]


def test_knee_is_smallest_n_within_95_percent_of_best():
    points = [point(1, 5), point(2, 10), point(4, 19.5), point(8, 20), point(16, 19)]
    assert recommend(points)[0] == 4


def test_p95_budget_picks_largest_n_meeting_it():
    points = [point(1, 5, 100), point(2, 10, 120), point(4, 19, 400), point(8, 20, 900)]
    assert recommend(points, 150.0)[0] == 2
    n, reason = recommend(points, 50.0)
    assert n == 1 and "no N meets" in reason
    with pytest.raises(ValueError):
        recommend([])


def test_break_even():
    assert break_even(1.0, 200.0) == pytest.approx(0.005)
    assert break_even(5.0, 2.0) == 1.0
    assert break_even(1.0, 0.0) == 1.0


def test_window_holds_enough_completions_at_small_n():
    from imgworker.tune import TuneParams, window_length

    params = TuneParams(latency_ms=200.0, window_s=2.0)
    assert window_length(params, 1) == pytest.approx(10.0)
    assert window_length(params, 64) == 2.0
