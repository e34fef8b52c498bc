"""An algorithm service that is down, for real: loud, no image charged, the run's exit code says so."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

import pytest

from imgworker.errors import ExitCode
from imgworker.results import read_results
from imgworker.services.algo_server import AlgoService, SyntheticParams
from imgworker.services.netutil import free_port
from imgworker.supervisor import Supervisor
from tests.support.cli import cli_env
from tests.support.driving import reach
from tests.support.store import upload

pytestmark = pytest.mark.timeout(150)


def test_a_service_that_never_answers_is_loud_charges_no_image_and_exits_9(tmp_path, store_server, creds, store,
                                                                           prefix):
    port = free_port()
    dead = f"http://127.0.0.1:{port}/infer"
    keys = [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(12)]
    upload(store, keys)
    state, report_path = tmp_path / "state", tmp_path / "report.json"
    env = cli_env(store_server, creds, IMGWORKER_STORE_PREFIX=prefix, IMGWORKER_ALGO_ENDPOINT=dead,
                  IMGWORKER_ALGO_RETRIES="1", IMGWORKER_ALGO_BACKOFF_BASE_S="0.01",
                  IMGWORKER_ALGO_EJECT_AFTER_FAILURES="2", IMGWORKER_ALGO_EJECT_COOLDOWN_S="0.1",
                  IMGWORKER_ALGO_NO_ENDPOINT_BUDGET_S="4", IMGWORKER_SCAN_INTERVAL_S="0.2",
                  IMGWORKER_RUN_STATE_DIR=str(state))
    proc = subprocess.run([sys.executable, "-m", "imgworker", "run", "--until-idle", "--no-progress", "--workers", "2",
                           "--report-json", str(report_path)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == ExitCode.ALGO_UNAVAILABLE == 9, proc.stderr[-3000:]
    results = list(read_results(str(state / "results.jsonl")))
    assert Counter(r.key for r in results) == Counter(keys)  # exactly one line each
    assert {(r.outcome.value, r.cause) for r in results} == {("failed_algo", "no_healthy_endpoint")}
    ejected = [line for line in proc.stderr.splitlines() if f"algorithm endpoint {dead} ejected" in line]
    assert len(ejected) == 1 and " WARNING " in ejected[0] and "connection_error" in ejected[0], proc.stderr[-3000:]
    assert "images failed for want of a healthy endpoint" in proc.stderr
    figures = json.loads(report_path.read_text())["endpoints"][dead]
    assert figures["healthy"] == 0 and figures["requests"] == figures["failures"]
    assert sum(r.algo_calls for r in results) == figures["requests"]  # calls made before waiting are on the lines
    assert json.loads(report_path.read_text())["http_retries"] == sum(max(0, r.algo_calls - 1) for r in results)
    # The calls: the 2 images in flight when it went down (2 attempts each), then 2 per probe; an
    # image that carried a failed probe went back to wait, uncharged.
    assert figures["ejections"] >= 2, figures  # probes were made, and each failed one ejected it again
    assert figures["requests"] <= (2 + figures["ejections"] - 1) * 2, figures
    assert f"| {dead} | {figures['requests']:,} | {figures['requests']:,} | {figures['ejections']} | no |" in proc.stdout


def test_images_that_waited_out_an_outage_are_analysed_once_it_ends(make_config, store, prefix):
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}/infer"
    keys = [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(8)]
    cfg = make_config(worker={"count": 2}, algo={"endpoint": endpoint, "retries": 1, "eject_after_failures": 2,
                                                 "eject_cooldown_s": 0.1, "no_endpoint_budget_s": 120.0})
    upload(store, keys)
    sup = Supervisor(cfg, show_progress=False)
    with sup.running():
        deadline = time.monotonic() + 60
        # down, and a probe failed too
        reach(sup, lambda: sup.endpoints.figures()[endpoint]["ejections"] >= 2, "two ejections", 60)
        assert sup.stats.finished == 0, sup.stats.counts  # they wait, not failed
        with AlgoService("synthetic", SyntheticParams(latency_ms=5.0, sigma=0.0, detection_rate=0.5),
                         port=port) as service:
            reach(sup, sup.finished, "the run's end", deadline - time.monotonic())
            calls = {k: n for k, n in service.calls().items() if k.startswith(prefix)}
    results = list(read_results(cfg.results_path))
    assert Counter(r.key for r in results) == Counter(keys)
    assert {r.outcome.value for r in results} <= {"inferred", "no_detection"}, results
    assert calls == {k: 1 for k in keys}
    assert sup.report().endpoints[endpoint]["healthy"] == 1
