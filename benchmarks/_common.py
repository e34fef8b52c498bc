"""Shared helpers for the benchmark scripts: where results go, and the embedded servers."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Iterator
from typing import Any

import msgspec

from imgworker.config import Config, Credentials, load_config
from imgworker.services.algo_server import AlgoService, SyntheticParams
from imgworker.services.store_server import EmbeddedStore

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_results(name: str, payload: Any, table: str) -> None:
    """benchmarks/results/<name>.json and .md"""
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.json"), "wb") as f:
        f.write(msgspec.json.format(msgspec.json.encode(payload)) + b"\n")
    with open(os.path.join(RESULTS, f"{name}.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")


@contextlib.contextmanager
def embedded(latency_ms: float = 50.0, sigma: float = 0.0, bucket: str = "bench",
             backend: str = "synthetic") -> Iterator[Config]:
    """The embedded store and an algorithm service (synthetic unless ``backend``); yields a Config pointing at both."""
    creds = Credentials(access_key="bench-" + secrets.token_hex(4), secret_key=secrets.token_urlsafe(24))
    with tempfile.TemporaryDirectory(prefix="imgworker-bench-") as workdir:
        with EmbeddedStore(os.path.join(workdir, "store"), creds, bucket=bucket) as server, \
                AlgoService(backend, SyntheticParams(latency_ms=latency_ms, sigma=sigma)) as algo:
            cfg = load_config(env={}, overrides={
                "store": {"endpoint": server.endpoint, "bucket": bucket},
                "algo": {"endpoint": algo.endpoint, "timeout_s": 30.0},
                "run": {"state_dir": os.path.join(workdir, "state"), "until_idle": True},
                "scan": {"interval_s": 0.2, "events": {"filer": server.filer_address}},
            })
            yield msgspec.structs.replace(cfg, credentials=creds)
