"""Fixtures that start real servers (and always stop them); helpers live in tests/support."""

from __future__ import annotations

import secrets
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from imgworker.config import Config, Credentials, load_config
from imgworker.services.algo_server import AlgoService, SyntheticParams
from imgworker.services.store_server import EmbeddedStore
from imgworker.store import Store


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C reaches the processes the tests start, as from a terminal, even when the suite itself was started
    in the background: a shell starts a background job with SIGINT ignored, and an ignored signal is inherited
    through exec (a Python child would then never see its KeyboardInterrupt)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def creds() -> Credentials:
    return Credentials(access_key="test-" + secrets.token_hex(4), secret_key="S3cr3t-" + secrets.token_hex(12))


@pytest.fixture(scope="session")
def store_server(tmp_path_factory: pytest.TempPathFactory, creds: Credentials) -> Iterator[EmbeddedStore]:
    server = EmbeddedStore(str(tmp_path_factory.mktemp("weed")), creds, bucket="test-images")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def algo_server() -> Iterator[AlgoService]:
    """A fast synthetic service: fixed 20 ms, every third image with detections."""
    with AlgoService("synthetic", SyntheticParams(latency_ms=20.0, sigma=0.0, detection_rate=0.5)) as service:
        yield service


@pytest.fixture()
def prefix() -> str:
    """Each test writes under its own prefix in the shared bucket."""
    return f"t-{uuid.uuid4().hex[:10]}/"


@pytest.fixture()
def make_config(tmp_path: Any, store_server: EmbeddedStore, algo_server: AlgoService, creds: Credentials, prefix: str):
    def build(**sections: dict[str, Any]) -> Config:
        overrides: dict[str, dict[str, Any]] = {
            "store": {"endpoint": store_server.endpoint, "bucket": store_server.bucket, "prefix": prefix},
            "algo": {"endpoint": algo_server.endpoint, "timeout_s": 10.0, "backoff_base_s": 0.01},
            "scan": {"interval_s": 0.2},
            # one lane per process: these tests count a worker's death or restart as one image each
            # (lanes, and what a process of several takes with it, are tests/faults/test_lanes.py's)
            "worker": {"count": 3, "threads": 1},
            "run": {"state_dir": str(tmp_path / "state"), "until_idle": True, "checkpoint_interval_s": 1.0,
                    "grace_s": 10.0},
        }
        for name, values in sections.items():
            overrides.setdefault(name, {}).update(values)
        cfg = load_config(env={}, overrides=overrides)
        return msgspec.structs.replace(cfg, credentials=creds)

    return build


@pytest.fixture()
def store(store_server: EmbeddedStore, creds: Credentials, make_config) -> Store:
    return Store(make_config().store, creds)
