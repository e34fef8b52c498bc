"""A failing algorithm service, for real: 5xx, hangs, malformed bodies, refused, oversized answers."""

from __future__ import annotations


import pytest

from imgworker.services.algo_server import AlgoService, SyntheticParams
from imgworker.services.netutil import free_port
from imgworker.supervisor import Supervisor
from tests.support.store import upload

pytestmark = pytest.mark.timeout(120)


def results_of(cfg):
    from imgworker.results import read_results

    return list(read_results(cfg.results_path))


def run_against(make_config, store, prefix, algo: dict, n: int = 4, **worker):
    # ejection of a failing endpoint is tested on its own; here each image's retries are the subject
    cfg = make_config(algo={"retries": 2, "backoff_base_s": 0.01, "eject_after_failures": 1000, **algo},
                      worker={"count": 2, **worker})
    upload(store, [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(n)])
    report = Supervisor(cfg, show_progress=False).run()
    return report, results_of(cfg)


@pytest.mark.parametrize(
    ("params", "cause"),
    [
        (SyntheticParams(latency_ms=5, sigma=0, error_rate=1.0), "http_500"),
        (SyntheticParams(latency_ms=5, sigma=0, malformed_rate=1.0), "malformed"),
    ],
)
def test_persistent_failures_retry_then_fail_algo(make_config, store, prefix, params, cause):
    with AlgoService("synthetic", params) as service:
        report, results = run_against(make_config, store, prefix, {"endpoint": service.endpoint})
    assert report.outcomes["failed_algo"] == 4 and report.conserved
    assert {(r.cause, r.algo_calls) for r in results} == {(cause, 3)}


def test_hanging_service_never_holds_a_worker_beyond_the_timeout(make_config, store, prefix):
    with AlgoService("synthetic", SyntheticParams(latency_ms=5, sigma=0, timeout_rate=1.0)) as service:
        report, results = run_against(make_config, store, prefix, {"endpoint": service.endpoint, "timeout_s": 0.5,
                                                                   "retries": 1}, n=2)
    assert {(r.cause, r.algo_calls) for r in results} == {("timeout", 2)}
    assert report.outcomes["failed_algo"] == 2 and report.deadline_kills == 0


def test_refused_connection_is_failed_algo(make_config, store, prefix):
    report, results = run_against(make_config, store, prefix, {"endpoint": f"http://127.0.0.1:{free_port()}/infer"})
    assert {r.cause for r in results} == {"connection_error"}
    assert report.outcomes["failed_algo"] == 4 and report.conserved


def test_oversized_answer_is_refused(make_config, store, prefix, algo_server):
    report, results = run_against(make_config, store, prefix, {"endpoint": algo_server.endpoint,
                                                               "max_body_bytes": 10}, n=2)
    assert {(r.cause, r.algo_calls) for r in results} == {("body_too_large", 1)}


def test_intermittent_failures_are_absorbed_by_retries(make_config, store, prefix):
    params = SyntheticParams(latency_ms=5, sigma=0, error_rate=0.3, malformed_rate=0.1, seed=3)
    with AlgoService("synthetic", params) as service:
        report, results = run_against(make_config, store, prefix, {"endpoint": service.endpoint, "retries": 6}, n=30)
    assert report.conserved and report.scanned == 30
    assert report.outcomes["failed_algo"] <= 1
    assert sum(r.algo_calls for r in results) > 30


def test_a_ca_bundle_gone_after_start_ejects_the_endpoint_and_images_wait(make_config, store, prefix, tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    endpoint = f"https://127.0.0.1:{free_port()}/infer"
    cfg = make_config(algo={"endpoint": endpoint, "ca_bundle": str(bundle), "retries": 1, "eject_after_failures": 2,
                            "eject_cooldown_s": 0.1, "no_endpoint_budget_s": 2.0}, worker={"count": 2})
    bundle.unlink()  # checked at start; gone afterwards, every call fails alike
    upload(store, [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(4)])
    report = Supervisor(cfg, show_progress=False).run()
    results = results_of(cfg)
    assert sorted(r.key for r in results) == sorted({r.key for r in results}) and len(results) == 4
    assert {(r.outcome.value, r.cause) for r in results} == {("failed_algo", "no_healthy_endpoint")}
    assert report.endpoints[endpoint]["ejections"] >= 1 and report.endpoints[endpoint]["healthy"] == 0
