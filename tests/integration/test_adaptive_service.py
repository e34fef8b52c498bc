"""Adaptive concurrency for real: ``imgworker run --adaptive`` with lanes against a loopback service of few slots.

The service serves 4 calls at once and queues the rest; 2 processes x 8 lanes could send 16. The
limit must settle just above the service's 4 slots, well under the 16 lanes, and every image must
still get exactly one call, and the service must never hold more calls at once than the limit
allowed. The bounds are coarse on purpose: this is real time on a shared machine.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from imgworker.services.algo_server import AlgoService, SyntheticParams
from tests.support.cli import cli_env, reap, start_run
from tests.support.results import calls_under
from tests.support.store import upload

pytestmark = pytest.mark.timeout(180)


def test_adaptive_lanes_settle_near_the_slots_of_the_service(tmp_path, store_server, creds, store, prefix):
    keys = [f"{prefix}p/cam-{i % 4}/20240101-1200{i // 100:02d}.{i % 100:03d}.jpg" for i in range(800)]
    upload(store, keys)
    params = SyntheticParams(latency_ms=40.0, sigma=0.1, detection_rate=0.5, slots=4)
    with AlgoService("synthetic", params) as service:
        env = cli_env(store_server, creds, IMGWORKER_STORE_PREFIX=prefix, IMGWORKER_ALGO_ENDPOINT=service.endpoint,
                      IMGWORKER_RUN_STATE_DIR=str(tmp_path / "s"))
        report = tmp_path / "r.json"
        proc = start_run(env, "run", "--workers", "2", "--threads", "8", "--adaptive", "--until-idle", "--no-progress",
                         "--report-json", str(report), log_path=str(tmp_path / "log"))
        try:
            assert reap(proc, 150) == 0, (tmp_path / "log").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                reap(proc, 1)
        calls = calls_under(service, prefix)
        peak = service.counts().peak
    data = json.loads(report.read_text())
    assert data["conserved"] and Counter(calls) == Counter(keys)
    (limits,) = data["limits"].values()
    assert 2 <= limits["mean"] <= 12, limits  # the service's 4 slots plus a small queue, not the 16 lanes
    assert 4 <= limits["now"] <= 12, limits
    assert limits["max"] < 16, limits
    assert peak <= limits["max"] < 16  # counted at the service: no more calls at once than the limit allowed
