"""The reference algorithm service as tests use it: call counts at the far end, and its fault knobs."""

from __future__ import annotations

import json

import pytest
import requests

from imgworker.algo_client import AlgoClient, AlgoRequest
from imgworker.config import load_config
from imgworker.errors import AlgoPermanent, AlgoTransient
from imgworker.services.algo_server import AlgoService, SyntheticParams
from tests.support.store import upload

pytestmark = pytest.mark.timeout(120)


def post(service: AlgoService, url: str, path: str, timeout: float = 30) -> requests.Response:
    body = {"image_url": url, "task_id": "t", "task_type": "p", "image_path": path}
    return requests.post(service.endpoint, json=body, timeout=timeout)


def client(service: AlgoService, timeout_s: float = 30.0) -> AlgoClient:
    cfg = load_config(env={}, overrides={"algo": {"endpoint": service.endpoint, "timeout_s": timeout_s}})
    return AlgoClient(cfg.algo)


def test_calls_counts_every_decoded_post_per_image_path(store, prefix):
    key = f"{prefix}p/t/a.jpg"
    upload(store, [key])
    url = store.presign(key, 60)
    with AlgoService("synthetic", SyntheticParams(latency_ms=1.0, sigma=0.0)) as service:
        assert service.calls() == {}
        assert post(service, url, key).status_code == 200
        assert post(service, url, key).status_code == 200
        assert post(service, store.presign(f"{prefix}gone.jpg", 60), "gone.jpg").status_code == 404
        assert requests.post(service.endpoint, data=b"{not json", timeout=30).status_code == 400
        assert service.calls() == {key: 2, "gone.jpg": 1}
        answer = requests.get(service.endpoint.replace("/infer", "/calls"), timeout=5).json()
    assert answer == {"calls": {key: 2, "gone.jpg": 1}, "total": 3, "peak": 1}  # one call at a time


def test_count_override_answers_huge_paths_only(store, prefix):
    keys = [f"{prefix}p/t/huge.jpg", f"{prefix}p/t/small.jpg"]
    upload(store, keys)
    params = SyntheticParams(latency_ms=1.0, sigma=0.0, count_override=1e30, detection_rate=1.0)
    with AlgoService("synthetic", params) as service:
        assert post(service, store.presign(keys[0], 60), keys[0]).json()["result"] == {"count": 1e30}
        assert post(service, store.presign(keys[1], 60), keys[1]).json()["result"]["total_count"] >= 1
        algo = client(service)
        with pytest.raises(AlgoPermanent) as err:
            algo.infer(AlgoRequest(image_url=store.presign(keys[0], 60), task_id="t", task_type="p",
                                   image_path=keys[0]))
        algo.close()
    assert err.value.cause == "malformed_result"


def test_trickled_body_is_complete_json_after_hang_s_and_a_timeout_for_the_client(store, prefix):
    keys = [f"{prefix}p/t/trickle.jpg", f"{prefix}p/t/plain.jpg"]
    upload(store, keys)
    params = SyntheticParams(latency_ms=1.0, sigma=0.0, trickle_s=0.05, hang_s=1.0)
    with AlgoService("synthetic", params) as service:
        whole = post(service, store.presign(keys[0], 60), keys[0])
        assert whole.status_code == 200
        assert whole.content.startswith(b" ")
        assert json.loads(whole.content)["success"] is True
        assert "content-length" not in {k.lower() for k in whole.headers}
        algo = client(service, timeout_s=0.3)
        with pytest.raises(AlgoTransient) as err:
            algo.infer(AlgoRequest(image_url=store.presign(keys[0], 60), task_id="t", task_type="p",
                                   image_path=keys[0]))
        plain = algo.infer(AlgoRequest(image_url=store.presign(keys[1], 60), task_id="t", task_type="p",
                                       image_path=keys[1]))
        algo.close()
    assert err.value.cause == "timeout"
    assert plain.success is True


def test_proxy_settings_in_the_environment_are_ignored_unless_trust_env(store, prefix, monkeypatch):
    from imgworker.services.netutil import free_port

    key = f"{prefix}p/t/proxied.jpg"
    upload(store, [key])
    request = AlgoRequest(image_url=store.presign(key, 60), task_id="t", task_type="p", image_path=key)
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    with AlgoService("synthetic", SyntheticParams(latency_ms=1.0, sigma=0.0)) as service:
        trusting = load_config(env={}, overrides={"algo": {"endpoint": service.endpoint, "trust_env": True}})
        with monkeypatch.context() as env:
            for name in ("HTTP_PROXY", "http_proxy"):
                env.setenv(name, dead_proxy)
            for name in ("NO_PROXY", "no_proxy"):
                env.delenv(name, raising=False)
            assert client(service).infer(request).success  # the default: straight to the service
            with pytest.raises(AlgoTransient) as err:
                AlgoClient(trusting.algo).infer(request)  # through the proxy the environment names, which is down
        assert err.value.cause == "connection_error"
        assert service.calls() == {key: 1}


def test_ca_bundle_is_what_an_https_service_is_verified_with(tmp_path, monkeypatch):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent/env-ca.pem")
    plain = load_config(env={}, overrides={"algo": {"endpoint": "https://127.0.0.1:1/infer"}})
    assert AlgoClient(plain.algo).session.verify is True  # certifi's; the environment's is not read
    own = load_config(env={}, overrides={"algo": {"endpoint": "https://127.0.0.1:1/infer", "ca_bundle": str(bundle)}})
    assert AlgoClient(own.algo).session.verify == str(bundle)


def test_a_ca_bundle_gone_after_start_is_the_service_unavailable_not_an_image_fault(tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    cfg = load_config(env={}, overrides={"algo": {"endpoint": "https://127.0.0.1:1/infer", "ca_bundle": str(bundle)}})
    bundle.unlink()
    algo = AlgoClient(cfg.algo)
    with pytest.raises(AlgoTransient) as err:
        algo.infer(AlgoRequest(image_url="http://x/a.jpg", task_id="t", task_type="p", image_path="p/t/a.jpg"))
    algo.close()
    assert err.value.cause == "client_error" and str(bundle) in str(err.value)
