"""``imgworker top``'s figures from two scrapes, without a server: rates and quantiles as Prometheus computes them."""

from __future__ import annotations

import pytest

from imgworker.top import figures, quantile


def test_a_quantile_is_interpolated_within_its_bucket_as_histogram_quantile_does():
    buckets = [(0.1, 0.0), (0.2, 10.0), (0.4, 20.0), (float("inf"), 20.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.2)
    assert quantile(0.25, buckets) == pytest.approx(0.15)
    assert quantile(0.75, buckets) == pytest.approx(0.3)
    assert quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None


def scrape(inferred: float, failed: float, le_01: float, le_02: float) -> dict:
    return {
        "imgworker_images_total": [({"outcome": "inferred"}, inferred), ({"outcome": "failed_algo"}, failed)],
        "imgworker_end_to_end_latency_seconds_bucket": [({"le": "0.1"}, le_01), ({"le": "0.2"}, le_02),
                                                        ({"le": "+Inf"}, le_02)],
    }


def test_the_rate_is_the_outcomes_since_the_last_scrape_over_the_time_between():
    before, now = scrape(100, 0, 100, 100), scrape(130, 10, 100, 140)  # the last 40 all slower than 0.1 s
    row = figures("http://h:9100/metrics", now, before, 4.0)
    assert row.done == 140 and row.per_s == pytest.approx(10.0)
    assert row.failure_rate == pytest.approx(10 / 140)
    assert row.p50_s == pytest.approx(0.15)  # of the 40 outcomes since the last scrape
    assert figures("http://h:9100/metrics", now, None, 0.0).per_s is None
