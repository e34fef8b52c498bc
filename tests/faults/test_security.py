"""Secrets and presigned-URL signatures never leak; TLS to the store works with a private CA."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest
import requests

from imgworker.config import load_config
from imgworker.errors import ExitCode, StoreFatal
from imgworker.services.algo_server import AlgoService, SyntheticParams
from imgworker.services.store_server import EmbeddedStore
from imgworker.store import Store
from tests.support.cli import cli_env
from tests.support.store import upload

pytestmark = pytest.mark.timeout(180)


def test_no_secret_or_signature_in_logs_results_state_or_report(tmp_path, store_server, creds, store, prefix):
    keys = [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(6)]
    upload(store, keys)
    params = SyntheticParams(latency_ms=5, sigma=0, error_rate=0.3, malformed_rate=0.2, seed=1)
    with AlgoService("synthetic", params) as algo:
        env = cli_env(store_server, creds, IMGWORKER_STORE_PREFIX=prefix, IMGWORKER_ALGO_ENDPOINT=algo.endpoint,
                      IMGWORKER_RUN_STATE_DIR=str(tmp_path / "s"), IMGWORKER_ALGO_BACKOFF_BASE_S="0.01")
        proc = subprocess.run(
            [sys.executable, "-m", "imgworker", "--log-level", "DEBUG", "run", "--until-idle", "--no-progress",
             "--report-json", str(tmp_path / "r.json")],
            env=env, capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    texts = {"stdout": proc.stdout, "stderr": proc.stderr}
    for path in (tmp_path / "s").iterdir():
        texts[path.name] = path.read_text()
    texts["report"] = (tmp_path / "r.json").read_text()
    assert re.search(r"DEBUG imgworker\.worker \[worker \d+\]: lane", proc.stderr)  # worker DEBUG logging was on
    assert "attempt 1: " in proc.stderr  # and the failure paths logged
    for name, text in texts.items():
        assert creds.secret_key not in text, name
        assert "X-Amz-Signature=" not in text, name
        assert "X-Amz-Credential" not in text, name


@pytest.fixture(scope="module")
def tls_store(tmp_path_factory, creds):
    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    directory = tmp_path_factory.mktemp("tls")
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    server = EmbeddedStore(str(directory / "weed"), creds, bucket="secure",
                           tls=(str(directory / "cert.pem"), str(directory / "key.pem")))
    server.start()
    try:
        yield server, str(directory / "ca.pem")
    finally:
        server.stop()


def test_tls_with_custom_ca_bundle(tls_store, creds):
    server, ca = tls_store
    cfg = load_config(env={}, overrides={"store": {"endpoint": server.tls_endpoint, "bucket": "secure",
                                                   "secure": True, "ca_bundle": ca}})
    store = Store(cfg.store, creds)
    store.check()
    store.put("a b/中文 %+#.jpg", b"jpeg-bytes")
    assert store.stat("a b/中文 %+#.jpg") == 10
    url = store.presign("a b/中文 %+#.jpg", 60)
    assert url.startswith("https://")
    assert requests.get(url, verify=ca, timeout=5).content == b"jpeg-bytes"


def test_tls_without_the_ca_is_a_clear_fatal_error(tls_store, creds):
    server, _ = tls_store
    cfg = load_config(env={}, overrides={"store": {"endpoint": server.tls_endpoint, "bucket": "secure",
                                                   "secure": True}})
    with pytest.raises(StoreFatal) as err:
        Store(cfg.store, creds).check()
    assert err.value.exit_code == ExitCode.STORE_TLS
    assert "TLS error" in str(err.value) and "CERTIFICATE_VERIFY_FAILED" in str(err.value)


def test_tls_error_exit_code_through_the_cli(tls_store, creds, tmp_path):
    server, _ = tls_store
    env = cli_env(server, creds, IMGWORKER_STORE_ENDPOINT=server.tls_endpoint, IMGWORKER_STORE_BUCKET="secure",
                  IMGWORKER_STORE_SECURE="true", IMGWORKER_RUN_STATE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "imgworker", "run", "--until-idle"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == int(ExitCode.STORE_TLS)
    assert "Traceback" not in proc.stderr and "TLS error" in proc.stderr
    assert pathlib.Path(tmp_path).exists()
