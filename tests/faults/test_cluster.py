"""Cluster mode with real processes: hosts are ``imgworker run`` supervisors sharing one nats-server.

Counted at the far end: the ledger bucket (one outcome per image, and which host), every host's
results file (one line per image cluster-wide), and the POSTs the algorithm service received.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from imgworker.results import read_results
from imgworker.services.algo_server import AlgoService, SyntheticParams
from tests.support.cli import cli_env
from tests.support.cluster import Host, NatsServer, cluster_env, ledger, per_key, wait_for_ledger
from tests.support.results import calls_under
from tests.support.store import upload

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def slow_service() -> Iterator[AlgoService]:
    """300 ms a call: a host always holds images when it is killed or paused."""
    with AlgoService("synthetic", SyntheticParams(latency_ms=300.0, sigma=0.0, detection_rate=0.5, seed=3)) as service:
        yield service


@pytest.fixture()
def nats(tmp_path: Any) -> Iterator[NatsServer]:
    server = NatsServer(str(tmp_path / "nats"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture()
def hosts() -> Iterator[list[Host]]:
    started: list[Host] = []
    try:
        yield started
    finally:
        for host in started:
            host.reap()


def images(store: Any, prefix: str, n: int) -> list[str]:
    keys = [f"{prefix}person/cam{i % 3}/{i:04d}.jpg" for i in range(n)]
    upload(store, keys)
    return keys


def env_for(store_server: Any, creds: Any, prefix: str, service: AlgoService, url: str, **extra: str) -> dict[str, str]:
    base = cli_env(store_server, creds, IMGWORKER_STORE_PREFIX=prefix, IMGWORKER_ALGO_ENDPOINT=service.endpoint)
    return cluster_env(base, url, **extra)


def lines_per_key(hosts: list[Host]) -> Counter[str]:
    """Result lines per image across every host's results file."""
    out: Counter[str] = Counter()
    for host in hosts:
        path = os.path.join(host.state_dir, "results.jsonl")
        if os.path.exists(path):
            out.update(r.key for r in read_results(path))
    return out


def keys_of(host: Host) -> set[str]:
    path = os.path.join(host.state_dir, "results.jsonl")
    return {r.key for r in read_results(path)} if os.path.exists(path) else set()


def assert_one_outcome_each(nats_url: str, keys: list[str], hosts: list[Host]) -> None:
    entries = ledger(nats_url)
    assert set(per_key(entries)) == set(keys), "every image has an outcome in the ledger"
    assert max(per_key(entries).values()) == 1
    lines = lines_per_key(hosts)
    assert set(lines) == set(keys) and set(lines.values()) == {1}, \
        f"one results line per image cluster-wide: {[k for k, n in lines.items() if n != 1]}"


def stop_all(hosts: list[Host]) -> list[int]:
    return [h.stop() for h in hosts if h.proc.poll() is None]


# ----- the work is shared --------------------------------------------------------------------


def test_two_hosts_share_the_work_once_each(store_server, creds, store, prefix, slow_service, nats, hosts, tmp_path):
    keys = images(store, prefix, 24)
    env = env_for(store_server, creds, prefix, slow_service, nats.url)
    hosts += [Host(f"h{i}", env, str(tmp_path / f"h{i}")) for i in range(2)]
    entries = wait_for_ledger(nats.url, len(keys), hosts=hosts)
    assert stop_all(hosts) == [0, 0]
    assert_one_outcome_each(nats.url, keys, hosts)
    assert {e.host for e in entries} == {"h0", "h1"}, "both hosts analysed images"
    assert set(calls_under(slow_service, prefix).values()) == {1}, "each image analysed once"
