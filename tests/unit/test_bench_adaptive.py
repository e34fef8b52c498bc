"""The adaptive benchmark's arithmetic: the mean limit per phase, and which fixed N is marked best."""

from __future__ import annotations

import pytest

from benchmarks.adaptive import PHASES, PhaseRow, Sample, _time_weighted, mark_best


def test_the_mean_limit_weights_each_limit_by_how_long_it_held_within_the_phase():
    changes = [Sample(t=0.0, limit=8), Sample(t=12.0, limit=16), Sample(t=18.0, limit=4), Sample(t=40.0, limit=2)]
    # phase [15, 30): 16 for 3 s, then 4 for 12 s
    assert _time_weighted(changes, 15.0, 30.0) == pytest.approx((16 * 3 + 4 * 12) / 15)
    assert _time_weighted(changes, 0.0, 12.0) == pytest.approx(8.0)
    assert _time_weighted([], 0.0, 15.0) == 0.0


def row(phase: int, way: str, throughput: float, p95: float) -> PhaseRow:
    slots, ms = PHASES[phase]
    return PhaseRow(phase=phase, slots=slots, service_ms=ms, way=way, throughput_per_s=throughput, p50_ms=p95 / 2,
                    p95_ms=p95, p95_settled_ms=p95, failed_calls=0)


def test_the_best_fixed_n_is_the_fastest_and_within_2_percent_of_it_the_lower_p95():
    rows = []
    for phase in range(len(PHASES)):
        rows += [row(phase, "adaptive", 100.0, 100.0), row(phase, "fixed 64", 40.0, 900.0),
                 row(phase, "fixed 24", 39.5, 300.0), row(phase, "fixed 8", 30.0, 200.0)]
    best = {(r.phase, r.way) for r in mark_best(rows) if r.best_fixed}
    assert best == {(phase, "fixed 24") for phase in range(len(PHASES))}, "adaptive is never the best fixed N"
