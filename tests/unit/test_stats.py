from __future__ import annotations

import random

import pytest

from imgworker.outcomes import Outcome, Result
from imgworker.stats import LogHistogram, Stats, format_report, stats_from_results


def results(**counts: int) -> list[Result]:
    out = []
    for name, n in counts.items():
        out += [Result(key=f"{name}-{i}", outcome=Outcome(name), algo_ms=100.0, e2e_ms=101.0) for i in range(n)]
    return out


def test_report_arithmetic_and_denominators():
    stats = stats_from_results(results(inferred=30, no_detection=60, failed_algo=4, failed_missing=6,
                                       skipped_missing=50, dropped_backlog=10))
    stats.scanned += 5  # five still queued
    report = stats.report(pending=3, in_flight=2, wall_s=10.0)
    assert report.inferences == 90
    assert report.failures == 10
    assert report.attempted == 100
    assert report.failure_rate == pytest.approx(0.10)
    assert report.failure_rate_per_success == pytest.approx(10 / 90, rel=1e-5)
    assert report.success_rate == pytest.approx(0.90)
    assert report.conserved is True
    assert report.outcomes["skipped_missing"] == 50
    assert set(report.outcomes) == {o.value for o in Outcome}
    assert report.throughput_per_s == pytest.approx(16.0)
    assert report.analysed_per_s == pytest.approx(9.0)  # only what the service answered


def test_conservation_detects_a_lost_image():
    stats = stats_from_results(results(inferred=3))
    stats.scanned += 1
    assert stats.report(pending=0, in_flight=0, wall_s=1.0).conserved is False


def test_empty_report_has_no_division_by_zero():
    report = Stats(2).report(pending=0, in_flight=0, wall_s=0.0)
    assert (report.failure_rate, report.success_rate, report.throughput_per_s) == (0.0, 0.0, 0.0)
    assert report.conserved


def test_only_successful_calls_enter_inference_latency():
    stats = Stats(1)
    stats.record(Result(key="a", outcome=Outcome.INFERRED, algo_ms=100.0))
    stats.record(Result(key="b", outcome=Outcome.FAILED_ALGO, algo_ms=9000.0))
    assert stats.algo_ms.count == 1


def test_histogram_percentiles_within_bucket_width():
    rng = random.Random(3)
    values = sorted(rng.lognormvariate(5, 0.5) for _ in range(20000))
    hist = LogHistogram()
    for v in values:
        hist.add(v)
    for q in (50, 95, 99):
        exact = values[int(len(values) * q / 100) - 1]
        assert hist.percentile(q) == pytest.approx(exact, rel=0.015)
    assert hist.mean == pytest.approx(sum(values) / len(values))
    assert LogHistogram().percentile(50) == 0.0


def test_human_report_lists_every_outcome():
    report = stats_from_results(results(inferred=1, failed_store=2)).report(pending=0, in_flight=0, wall_s=1.0)
    text = format_report(report)
    assert "| failure rate | 66.67% of 3 attempted |" in text
    for outcome in Outcome:
        assert f"| {outcome.value} |" in text
    assert "conserved: True" in text


def test_histogram_handles_sub_millisecond_and_zero_values():
    hist = LogHistogram()
    for v in (0.0, 0.05, 0.6, 0.6, 0.6, 2.0):
        hist.add(v)
    assert hist.percentile(50) == pytest.approx(0.6, rel=0.01)
    assert hist.percentile(1) == 0.0
    assert hist.percentile(30) == pytest.approx(0.05, rel=0.01)
    counts, total = hist.cumulative([0.0, 0.1, 1.0, 5.0])
    assert counts == [1, 2, 5, 6] and total == pytest.approx(3.85)


def test_results_with_a_key_twice_are_not_conserved():
    lines = results(inferred=2) + [Result(key="inferred-0", outcome=Outcome.FAILED_ALGO)]
    report = stats_from_results(lines).report(pending=0, in_flight=0, wall_s=1.0)
    assert (report.scanned, report.duplicates, report.conserved) == (2, 1, False)
    assert sum(report.outcomes.values()) == 2  # each image once, by its latest line
    assert report.outcomes["failed_algo"] == 1
    text = format_report(report)
    assert "conserved: False" in text
    assert "keys with more than one outcome: 1" in text


def test_results_with_each_key_once_are_conserved_without_a_duplicates_line():
    report = stats_from_results(results(inferred=2, no_detection=1)).report(pending=0, in_flight=0, wall_s=1.0)
    assert (report.scanned, report.duplicates, report.conserved) == (3, 0, True)
    assert "more than one outcome" not in format_report(report)


def test_the_busy_rate_runs_from_the_first_start_to_the_last_outcome_not_over_the_wall_time():
    lines = [Result(key=f"k{i}", outcome=Outcome.INFERRED, started_at=1000.0 + i, finished_at=1000.5 + i)
             for i in range(10)]
    lines.append(Result(key="dropped", outcome=Outcome.DROPPED_BACKLOG, finished_at=1004.0))  # never started
    report = stats_from_results(lines).report(pending=0, in_flight=0, wall_s=60.0)
    assert report.busy_s == pytest.approx(9.5)
    assert report.analysed_per_busy_s == pytest.approx(10 / 9.5, rel=1e-3)
    assert report.analysed_per_s == pytest.approx(10 / 60.0, abs=1e-3)
    text = format_report(report)
    assert "over 9.5 s from the first image started to the last outcome" in text
    assert "over 60.0 s of wall time" in text
