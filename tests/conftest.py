"""Fixtures that start real servers (and always stop them)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
import psutil
import pytest

from imgworker.config import Config, Credentials, load_config
from imgworker.services.algo_server import AlgoService, SyntheticParams
from imgworker.services.store_server import EmbeddedStore
from imgworker.store import Store


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
            "worker": {"count": 3},
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


def cli_env(store_server: EmbeddedStore, creds: Credentials, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGWORKER_", "AWS_"))}
    env.update(IMGWORKER_ACCESS_KEY=creds.access_key, IMGWORKER_SECRET_KEY=creds.secret_key,
               IMGWORKER_STORE_ENDPOINT=store_server.endpoint, IMGWORKER_STORE_BUCKET=store_server.bucket)
    env.update(extra)
    return env


def upload(store: Store, keys: list[str], data: bytes = b"\xff\xd8\xff\xe0fake-jpeg") -> None:
    for key in keys:
        store.put(key, data)


def read_outcomes(cfg: Config) -> dict[str, list[str]]:
    """key -> outcomes recorded for it in the results file."""
    from imgworker.results import read_results

    out: dict[str, list[str]] = {}
    for result in read_results(cfg.results_path):
        out.setdefault(result.key, []).append(result.outcome.value)
    return out


def start_run(env: dict[str, str], *args: str, log_path: str | None = None) -> subprocess.Popen[str]:
    """``imgworker run`` as a child process (the caller reaps it with ``reap``)."""
    out = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "imgworker", *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                            text=True)


def reap(proc: subprocess.Popen[str], timeout: float = 30) -> int:
    """Wait for a child; kill it (and its children) if it does not finish."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()
        raise


def workers_of(pid: int) -> list[psutil.Process]:
    """Worker processes of a supervisor, recognised by their process title."""
    out = []
    for child in psutil.Process(pid).children():
        try:
            if "imgworker: worker" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out
