"""The benchmark harness's arithmetic: efficiency, stability, knee choice, break-even."""

from __future__ import annotations

import re

import pytest

from benchmarks.check_vs_waste import break_even
from imgworker.outcomes import Outcome, Result
from imgworker.tune import (
    Point,
    Recommendation,
    TuneParams,
    _point,
    build_grid,
    efficiency,
    ideal_throughput,
    is_stable,
    recommend,
    window_rates,
)


def point(n: int, tput: float, p95: float = 100.0, *, lanes: int = 1, cpu: float = 1.0, ran_out: bool = False) -> Point:
    """A measured configuration of n processes x lanes."""
    return Point(workers=n, lanes=lanes, in_flight=n * lanes, throughput_per_s=tput, ideal_per_s=n * lanes * 5.0,
                 efficiency=tput / (n * lanes * 5.0), efficiency_nominal=tput / (n * lanes * 5.0), p50_ms=1,
                 p95_ms=p95, p99_ms=1, algo_p50_ms=1, algo_p95_ms=1, algo_p99_ms=1, overhead_p50_ms=0.1,
                 overhead_p99_ms=0.5, stat_p50_ms=0.5, overhead_excl_check_p50_ms=0.1,
                 overhead_excl_check_p99_ms=0.2, cpu_s_per_1000=cpu, rss_worker_mb=1, rss_supervisor_mb=1,
                 rss_manager_mb=1, rss_total_peak_mb=1, windows=3, stable=True, images=10, ran_out=ran_out)


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
    p = _point((10, 1), params, measured, [40.0, 40.0, 40.0], 3.0, 1.0, [], 120)
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


# measured rows -> (processes, lanes, initial limit, knee reached)
RECOMMEND_TABLE = [
    pytest.param(  # throughput flat from N = 4 on; lanes cost less CPU at every N
        [point(4, 19.5, cpu=4.0), point(1, 19.6, lanes=4, cpu=2.5), point(8, 20.0, cpu=3.5),
         point(1, 20.0, lanes=8, cpu=2.4), point(2, 19.9, lanes=4, cpu=2.45), point(2, 10.0, cpu=5.0)],
        (1, 4, 4, True), id="ties-within-5-percent-go-to-the-fewest-in-flight"),
    pytest.param(  # the cheapest configuration is too slow to count
        [point(16, 100.0, cpu=3.0), point(1, 90.0, lanes=16, cpu=1.0), point(2, 99.0, lanes=8, cpu=2.0)],
        (2, 8, 16, False), id="cheapest-outside-95-percent-is-not-chosen"),
    pytest.param(  # same N, same CPU: the fewest processes (less memory)
        [point(8, 40.0, cpu=2.0), point(2, 40.0, lanes=4, cpu=2.0), point(1, 40.0, lanes=8, cpu=2.0)],
        (1, 8, 8, False), id="equal-cpu-at-one-n-goes-to-the-fewest-processes"),
    pytest.param(  # throughput grows all the way: the knee is the largest N, marked not reached
        [point(2, 10.0, lanes=4, cpu=3.0), point(4, 20.0, lanes=4, cpu=2.0), point(8, 40.0, lanes=4, cpu=1.5)],
        (8, 4, 32, False), id="still-growing-knee-not-reached"),
    pytest.param(  # knee at 32; 64 in flight is a little cheaper per image and is chosen, starting at 32
        [point(2, 80.0, lanes=8, cpu=3.0), point(4, 150.0, lanes=8, cpu=2.2), point(32, 148.0, cpu=3.5),
         point(8, 152.0, lanes=8, cpu=2.0), point(64, 151.0, cpu=3.4)],
        (8, 8, 32, True), id="initial-limit-is-the-knee-below-the-chosen-n"),
]


@pytest.mark.parametrize(("points", "expected"), RECOMMEND_TABLE)
def test_recommendation_rule(points, expected):
    rec = recommend(points)
    assert (rec.processes, rec.lanes, rec.initial_limit, rec.knee_reached) == expected
    assert rec.initial_limit <= rec.processes * rec.lanes  # a start for --adaptive under its ceiling
    assert rec.reason


def test_p95_budget_keeps_only_configurations_meeting_it():
    points = [point(1, 5, 100, lanes=4, cpu=2.0), point(2, 10, 120, lanes=4, cpu=2.0),
              point(4, 19, 400, lanes=4, cpu=1.0), point(8, 20, 900, lanes=4, cpu=1.0)]
    assert recommend(points, 150.0) == Recommendation(
        processes=2, lanes=4, initial_limit=8, knee_reached=True,
        reason="the least CPU per image (2.00 CPU-s / 1000) within 95% of the best throughput (10.0 img/s) "
               "among those with p95 <= 150 ms")
    rec = recommend(points, 50.0)
    assert (rec.processes, rec.lanes, rec.initial_limit) == (1, 4, 4) and "no configuration meets" in rec.reason
    with pytest.raises(ValueError):
        recommend([])


GRID_TABLE = [
    pytest.param({"totals": (8, 32), "lanes": (1, 4, 16)}, ((8, 1), (2, 4), (32, 1), (8, 4), (2, 16)),
                 id="every-dividing-lane-count"),
    pytest.param({"processes": (1, 2), "lanes": (1, 8)}, ((1, 1), (1, 8), (2, 1), (2, 8)), id="processes-x-lanes"),
    pytest.param({"processes": (1, 2)}, ((1, 1), (2, 1)), id="processes-alone"),
]


@pytest.mark.parametrize(("kwargs", "expected"), GRID_TABLE)
def test_grid(kwargs, expected):
    assert build_grid(**kwargs) == expected


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"totals": (8,), "lanes": (0,)}, "--lanes: value 0 is not allowed"),
    ({"totals": (8,), "lanes": (300,)}, "--lanes: value 300 is not allowed"),
    ({"totals": (0,), "lanes": (1,)}, "--total: value 0 is not allowed"),
    ({"totals": (6,), "lanes": (4, 8)}, "--total 6: no --lanes value (4, 8) divides it"),
    ({"totals": (8,), "processes": (2,)}, "either --total or --workers"),
    ({"processes": (0,)}, "--workers: value 0 is not allowed"),
    ({"totals": ()}, "--total: give at least one value"),
])
def test_bad_grid_says_which_value(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_grid(**kwargs)


def test_break_even():
    assert break_even(1.0, 200.0) == pytest.approx(0.005)
    assert break_even(5.0, 2.0) == 1.0
    assert break_even(1.0, 0.0) == 1.0


def test_window_holds_enough_completions_at_small_n():
    from imgworker.tune import TuneParams, window_length

    params = TuneParams(latency_ms=200.0, window_s=2.0)
    assert window_length(params, 1) == pytest.approx(10.0)
    assert window_length(params, 64) == 2.0


def test_face_benchmark_totals_interleaved_rounds_per_way():
    from benchmarks.adaptive import FACE_WAYS, FaceRound, Params, face_totals

    params = Params(rounds=2, round_s=10.0)
    rounds = [FaceRound(way=w.name, answered=answered, ms=(100.0,) * answered, failed_calls=1, faces=2, mean_limit=3.0)
              for n, answered in ((0, 100), (1, 140)) for w in FACE_WAYS[n:] + FACE_WAYS[:n]]
    rows = {r.way: r for r in face_totals(rounds, params)}
    adaptive = rows["adaptive"]
    # totals over both rounds (240 images in 20 s), with each round's rate in round order
    assert (adaptive.throughput_per_s, adaptive.round_throughputs) == (12.0, (10.0, 14.0))
    assert (adaptive.failed_calls, adaptive.faces) == (2, 4)
    assert sum(r.best_fixed for r in rows.values()) == 1 and not adaptive.best_fixed


def test_recommendation_says_when_a_point_ran_out_of_images():
    # N = 8 ran out of images while measured, so it reads slower than N = 4: the knee it gives may be
    # too small, and the reason must say so and what to do.
    short = recommend([point(2, 10.0), point(4, 20.0), point(8, 12.0, ran_out=True)])
    assert short.initial_limit == 4
    assert "N = 8 ran out of images" in short.reason and "--images" in short.reason
    enough = recommend([point(2, 10.0), point(4, 20.0), point(8, 12.0)])
    assert "ran out" not in enough.reason
