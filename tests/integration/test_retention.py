"""The cleaner and expiry awareness inside a real run."""

from __future__ import annotations

import time

import msgspec
import pytest

from imgworker.services.algo_server import AlgoService, SyntheticParams
from imgworker.supervisor import Supervisor
from tests.support.driving import reach
from tests.support.results import read_outcomes
from tests.support.store import upload

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def slow_algo():
    with AlgoService("synthetic", SyntheticParams(latency_ms=300.0, sigma=0.0)) as service:
        yield service


def listed(store, prefix):
    return sorted(r.key for page in store.list_pages(prefix, 1000) for r in page)


@pytest.mark.parametrize("policy", ["lease", "queued", "inflight"])
def test_policies_against_a_real_queue(make_config, store, prefix, slow_algo, policy):
    cfg = make_config(worker={"count": 1}, algo={"endpoint": slow_algo.endpoint})
    retention = msgspec.structs.replace(cfg.retention, enabled=True, max_count=2, protect=policy)
    keys = [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(8)]
    upload(store, keys)
    sup = Supervisor(cfg, show_progress=False)
    with sup.running():
        reach(sup, lambda: sup.in_flight > 0, "an image in flight")  # one held, seven queued, nothing finished yet
        held = sup.inflight.held_keys()
        queued = set(sup.dispatch.pending_keys())
        from imgworker.cleaner import stored_image
        from imgworker.outcomes import ImageRef

        sup.cleaning.cfg = msgspec.structs.replace(cfg, retention=retention)  # one pass, at a moment of our choosing
        plan = sup.clean([stored_image(ImageRef(key=k), prefix) for k in keys])
        sup.cleaning.cfg = cfg
        assert sup.janitor is not None
        while sup.janitor.outstanding:  # the deletes run on the janitor's thread
            time.sleep(0.01)
        remaining = listed(store, prefix)
        reach(sup, sup.finished, "the run's end")
    report = sup.report()
    outcomes = read_outcomes(cfg)
    assert report.conserved and all(len(v) == 1 for v in outcomes.values())
    assert (sup.cleaner.deleted, sup.cleaner.delete_errors) == (len(plan.delete) + len(plan.give_up), 0)
    if policy == "lease":
        assert set(plan.give_up) == set(sorted(queued)[:-1]) and plan.delete == []
        assert remaining == sorted(held + sorted(queued)[-1:])  # storage limit held but for the held image
        assert all(outcomes[k] == ["dropped_expired"] for k in plan.give_up)
        assert report.outcomes["skipped_missing"] == report.outcomes["failed_missing"] == 0
        from imgworker.results import read_results

        assert all(r.worker == -1 for r in read_results(cfg.results_path) if r.outcome.value == "dropped_expired")
    elif policy == "queued":
        assert plan.delete == [] and plan.give_up == [] and plan.limit_exceeded
        assert remaining == sorted(keys)
        assert report.inferences == 8
    else:
        assert held[0] not in plan.delete and len(plan.delete) == 5  # the six oldest, less the held one
        assert report.outcomes["skipped_missing"] == 5  # deleted while queued: the report's phenomenon


def test_expiry_aware_dispatch_drops_before_a_worker_sees_them(make_config, store, prefix):
    cfg = make_config(worker={"count": 1}, retention={"external_max_age_s": 3600})
    stale = [f"{prefix}p/t/20200101-120000.{i:03d}.jpg" for i in range(3)]
    fresh_stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    fresh = [f"{prefix}p/t/{fresh_stamp}.{i:03d}.jpg" for i in range(2)]
    upload(store, stale + fresh)
    report = Supervisor(cfg, show_progress=False).run()
    outcomes = read_outcomes(cfg)
    assert {k: v[0] for k, v in outcomes.items() if k in stale} == dict.fromkeys(stale, "dropped_expired")
    assert report.outcomes["dropped_expired"] == 3 and report.inferences == 2 and report.conserved


def test_expiry_by_count_elsewhere_drops_those_newer_images_will_push_out(make_config, store, prefix):
    cfg = make_config(worker={"count": 1}, retention={"external_max_count": 2})
    base = time.time() - 3
    keys = [f"{prefix}p/cam/{time.strftime('%Y%m%d-%H%M%S', time.gmtime(base + i * 0.1))}."
            f"{int(((base + i * 0.1) % 1) * 1000):03d}.jpg" for i in range(6)]
    upload(store, keys)
    report = Supervisor(cfg, show_progress=False).run()
    outcomes = read_outcomes(cfg)
    assert [outcomes[k][0] for k in keys[:4]] == ["dropped_expired"] * 4
    assert all(outcomes[k][0] in ("inferred", "no_detection") for k in keys[4:])
    assert report.conserved and report.outcomes["dropped_expired"] == 4
