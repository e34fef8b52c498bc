"""Operating imgworker: metrics over HTTP, failover between services, progress, result actions."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from imgworker.actions import alerts_key, results_key
from imgworker.cleaner import CleanerStats
from imgworker.metrics import serve_metrics
from imgworker.outcomes import Outcome
from imgworker.progress import Progress
from imgworker.recorder import Gauges, Snapshot
from imgworker.results import read_results
from imgworker.services.algo_server import AlgoService, SyntheticParams
from imgworker.services.netutil import free_port
from imgworker.stats import Stats
from imgworker.supervisor import Supervisor
from tests.support.cli import cli_env
from tests.support.driving import reach
from tests.support.results import read_outcomes
from tests.support.store import upload

pytestmark = pytest.mark.timeout(180)


def scrape(port: int) -> dict[str, float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def test_metrics_match_the_final_report(make_config, store, prefix):
    params = SyntheticParams(latency_ms=20.0, sigma=0.0, detection_rate=0.5, seed=11)
    keys = [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(12)]
    upload(store, keys)
    with AlgoService("synthetic", params) as algo:  # its own service: its call counts are this test's alone
        cfg = make_config(worker={"count": 2}, algo={"endpoint": algo.endpoint})
        sup = Supervisor(cfg, show_progress=False)
        port = free_port()
        server = serve_metrics(sup.snapshot, port)
        scraped: list[dict[str, float]] = []  # once, while images are in flight

        def finished_after_a_scrape_at_work() -> bool:
            if not scraped and sup.in_flight:
                scraped.append(scrape(port))
            return sup.finished()

        try:
            with sup.running():
                reach(sup, finished_after_a_scrape_at_work, "the run's end", 120)
                after = scrape(port)
        finally:
            server.shutdown()
            server.server_close()
        calls = algo.calls()
    report = sup.report()
    assert scraped and scraped[0]["imgworker_workers_alive"] == 2
    for outcome, count in report.outcomes.items():
        assert after[f"imgworker_images_total{{outcome={outcome}}}"] == count
    assert after["imgworker_images_scanned_total"] == report.scanned == 12
    assert after["imgworker_algorithm_latency_seconds_count"] == report.inferences
    assert after["imgworker_algorithm_latency_seconds_sum"] / report.inferences == pytest.approx(
        report.avg_inference_ms / 1000, rel=0.01)
    assert after["imgworker_stat_latency_seconds_count"] == 12
    assert after["imgworker_queue_depth"] == 0 and after["imgworker_in_flight"] == 0
    assert after["imgworker_scans_total"] >= 1
    assert after[f"imgworker_algorithm_requests_total{{endpoint={cfg.algo.endpoint}}}"] == 12

    # independent counts: the results file, line by line, and the far end's own call counts
    results = list(read_results(cfg.results_path))
    assert sorted(r.key for r in results) == sorted(keys)
    per_outcome = {o.value: 0 for o in Outcome}
    for r in results:
        per_outcome[r.outcome.value] += 1
    for outcome, count in per_outcome.items():
        assert after[f"imgworker_images_total{{outcome={outcome}}}"] == count, outcome
    assert per_outcome["inferred"] > 0 and per_outcome["no_detection"] > 0  # detection_rate 0.5 over 12 images
    analysed = [r for r in results if r.outcome.is_success]
    assert after["imgworker_algorithm_latency_seconds_count"] == len(analysed)
    assert after["imgworker_algorithm_latency_seconds_sum"] == pytest.approx(
        sum(r.algo_ms for r in analysed) / 1000, rel=1e-6)
    assert after["imgworker_algorithm_latency_seconds_sum"] >= len(analysed) * 0.020  # the service sleeps 20 ms
    assert after["imgworker_stat_latency_seconds_count"] == sum(1 for r in results if r.stat_ms is not None)
    assert after["imgworker_end_to_end_latency_seconds_count"] == sum(
        1 for r in results if r.e2e_ms is not None and r.outcome.reached_algo)
    assert after["imgworker_images_scanned_total"] == len(results)
    assert calls == {k: 1 for k in keys}, calls
    assert after[f"imgworker_algorithm_requests_total{{endpoint={algo.endpoint}}}"] == sum(calls.values())
    assert sum(r.algo_calls for r in results) == sum(calls.values())


def test_metrics_flag_on_run_serves_on_loopback(tmp_path, store_server, creds, store, prefix, algo_server):
    upload(store, [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(3)])
    port = free_port()
    env = cli_env(store_server, creds, IMGWORKER_STORE_PREFIX=prefix, IMGWORKER_ALGO_ENDPOINT=algo_server.endpoint,
                  IMGWORKER_RUN_STATE_DIR=str(tmp_path / "s"))
    proc = subprocess.Popen([sys.executable, "-m", "imgworker", "run", "--metrics-port", str(port), "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, figures = time.monotonic() + 30, {}
        while time.monotonic() < deadline:
            try:
                figures = scrape(port)
                if figures.get("imgworker_images_total{outcome=inferred}", 0) + figures.get(
                        "imgworker_images_total{outcome=no_detection}", 0) == 3:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        assert figures["imgworker_images_scanned_total"] == 3
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.2:{port}/metrics", timeout=2)  # bound to 127.0.0.1 only
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "imgworker report" in out


def test_failover_when_one_of_two_services_stops(make_config, store, prefix):
    params = SyntheticParams(latency_ms=30.0, sigma=0.0)
    with AlgoService("synthetic", params) as one, AlgoService("synthetic", params) as two:
        cfg = make_config(worker={"count": 4}, algo={"endpoints": [one.endpoint, two.endpoint], "retries": 2,
                                                     "eject_after_failures": 2, "eject_cooldown_s": 30.0})
        keys = [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(120)]
        upload(store, keys)
        sup = Supervisor(cfg, show_progress=False)
        with sup.running():
            reach(sup, lambda: sup.stats.finished >= 20, "twenty images finished", 120)
            one.stop()
            reach(sup, sup.finished, "the run's end", 120)
    report = sup.report()
    assert report.conserved and report.scanned == 120
    assert report.failures == 0 and report.inferences == 120
    figures = report.endpoints
    assert figures[one.endpoint]["healthy"] == 0 and figures[one.endpoint]["ejections"] >= 1
    assert figures[two.endpoint]["healthy"] == 1
    assert figures[two.endpoint]["requests"] > figures[one.endpoint]["requests"]
    assert len(read_outcomes(cfg)) == 120


def test_no_healthy_service_means_waiting_then_failing_after_the_budget(make_config, store, prefix):
    cfg = make_config(worker={"count": 1}, algo={"endpoints": [f"http://127.0.0.1:{free_port()}/infer"],
                                                 "retries": 0, "eject_after_failures": 1, "eject_cooldown_s": 60.0,
                                                 "no_endpoint_budget_s": 1.0})
    upload(store, [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(4)])
    sup = Supervisor(cfg, show_progress=False)
    with sup.running():
        reach(sup, lambda: sup.endpoints.figures()[cfg.algo.endpoints[0]]["ejections"] > 0, "an ejection", 120)
        waited_since = time.monotonic()
        sup.step()
        # they wait, they are not failed: the one whose call ejected the endpoint too
        assert sup.pending + sup.in_flight == 4 and sup.stats.finished == 0
        reach(sup, sup.finished, "the run's end", 120)
    report = sup.report()
    assert time.monotonic() - waited_since >= 1.0
    assert report.outcomes["failed_algo"] == 4 and report.conserved
    causes = {r[0] for r in read_outcomes(cfg).values()}
    assert causes == {"failed_algo"}


def idle_snapshot() -> Snapshot:
    """A run with two lanes and nothing done yet."""
    return Snapshot(report=Stats(2).report(pending=0, in_flight=0, wall_s=1.0), gauges=Gauges(),
                    cleaner=CleanerStats(), latency={})


def test_progress_is_log_lines_when_not_a_tty(caplog):
    stream = io.StringIO()
    progress = Progress(0.001, stream=stream)
    time.sleep(0.02)
    with caplog.at_level(logging.INFO, logger="imgworker.progress"):
        progress.maybe_show(idle_snapshot)
    progress.close()
    assert stream.getvalue() == ""
    assert any("progress:" in r.message and "queue 0" in r.message and "failure rate" in r.message
               for r in caplog.records)


def test_progress_rewrites_one_line_on_a_tty():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    progress = Progress(0.001, stream=stream)
    time.sleep(0.01)
    progress.maybe_show(idle_snapshot)
    progress.close()
    assert stream.getvalue().startswith("\r\033[K") and stream.getvalue().endswith("\n")


def test_result_actions_against_the_real_store(make_config, store, prefix):
    params = SyntheticParams(latency_ms=5.0, sigma=0.0, detection_rate=0.5, seed=4)
    with AlgoService("synthetic", params) as algo:
        cfg = make_config(algo={"endpoint": algo.endpoint},
                          actions={"delete_no_detection": True, "copy_alerts": True, "write_results": True})
        keys = [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(10)]
        upload(store, keys)
        report = Supervisor(cfg, show_progress=False).run()
        again = Supervisor(cfg, show_progress=False).run()  # alerts/ and results/ are never scanned
    outcomes = {k: v[0] for k, v in read_outcomes(cfg).items()}
    listed = {r.key for page in store.list_pages(prefix, 1000) for r in page}
    inferred = [k for k in keys if outcomes[k] == "inferred"]
    empty = [k for k in keys if outcomes[k] == "no_detection"]
    assert inferred and empty
    assert all(alerts_key(cfg, k) in listed and k in listed for k in inferred)
    assert all(k not in listed for k in empty)
    assert all(results_key(cfg, k) in listed for k in keys)
    body = json.loads(requests.get(store.presign(results_key(cfg, inferred[0]), 60), timeout=5).content)
    assert body["outcome"] == "inferred" and body["detections"] > 0
    assert report.action_errors == {} and again.scanned == 0
