"""A small scenario in the suite: the ordering of the policies must hold."""

from __future__ import annotations

import msgspec
import pytest

from imgworker.scenario import Phase, RowSpec, ScenarioParams, run_scenario

pytestmark = pytest.mark.timeout(240)


def test_lease_has_no_cleanup_loss_and_inflight_without_check_has_some():
    params = ScenarioParams(phases=(Phase(30.0, 8.0), Phase(10.0, 6.0)), max_count=15, compression=2.0)
    rows = run_scenario(params, rows=(RowSpec("inflight", False), RowSpec("lease", True)), progress=lambda _: None)
    inflight, lease = rows
    for row in rows:
        assert row.conserved
        assert row.scanned == row.produced > 100
        assert sum(row.outcomes.values()) == row.scanned
    assert inflight.outcomes["failed_missing"] > 0
    assert inflight.failure_rate > 0
    assert lease.cleanup_losses == 0
    assert lease.outcomes["failed_missing"] == lease.outcomes["skipped_missing"] == 0
    assert lease.outcomes["dropped_expired"] > 0  # storage won, explicitly
    assert lease.storage_limit_held and lease.peak_objects <= params.max_count * params.task_dirs
    data = msgspec.to_builtins(lease)
    for field in ("policy", "check", "outcomes", "produced", "failure_rate_per_success", "failure_rate", "coverage",
                  "peak_objects", "storage_limit", "storage_limit_held"):
        assert field in data
