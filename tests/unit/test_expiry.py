from __future__ import annotations

import datetime as dt

from imgworker.config import RetentionConfig
from imgworker.expiry import ExpiryEstimator
from imgworker.outcomes import ImageRef

T0 = 1_700_000_000.0


def ref(task: str, t: float) -> ImageRef:
    stamp = dt.datetime.fromtimestamp(t, tz=dt.timezone.utc).strftime("%Y%m%d-%H%M%S.%f")[:-3]
    return ImageRef(key=f"cam/person/{task}/{stamp}.jpg", task_type="person", task_id=task)


def test_age_rule():
    est = ExpiryEstimator(RetentionConfig(external_max_age_s=60), "cam/")
    assert est.enabled
    assert not est.would_expire(ref("a", T0), within_s=5, now=T0 + 50)
    assert est.would_expire(ref("a", T0), within_s=15, now=T0 + 50)


def test_count_rule_counts_newer_images_and_arrivals_per_directory():
    est = ExpiryEstimator(RetentionConfig(external_max_count=5), "cam/")
    refs = [ref("a", T0 + i) for i in range(5)]
    for r in refs + [ref("b", T0 + i) for i in range(20)]:
        est.observe(r)
    now = T0 + 5
    assert est.arrival_rate("person/a", now) == 0.5  # five in the last ten seconds
    assert not est.would_expire(refs[3], within_s=0, now=now)  # one newer
    assert est.would_expire(refs[3], within_s=8, now=now)  # 1 + 0.5 * 8 >= 5
    est.observe(ref("a", T0 + 5))
    assert est.would_expire(refs[0], within_s=0, now=now)  # five newer: the oldest is due now


def test_disabled_by_default():
    est = ExpiryEstimator(RetentionConfig(), "")
    assert not est.enabled
    assert not est.would_expire(ref("a", 0.0), within_s=1e9, now=T0)
