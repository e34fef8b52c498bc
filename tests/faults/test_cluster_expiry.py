"""Expiry elsewhere in cluster mode, with real processes: two ``imgworker run`` hosts share one nats-server, and the
intake leader, which sees every arrival, drops what another program would delete before a worker is done.

Counted at the far end: the ledger bucket (one outcome per image), every host's results file (one
line per image cluster-wide), the POSTs the algorithm service received, and the cluster report.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from imgworker.services.algo_server import AlgoService, SyntheticParams
from tests.faults.test_cluster_retention import assert_one_outcome_each, cluster_report
from tests.support.cli import cli_env
from tests.support.cluster import Host, NatsServer, cluster_env, wait_for_ledger
from tests.support.results import calls_under
from tests.support.store import upload

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def slow_service() -> Iterator[AlgoService]:
    """300 ms a call: images wait in the stream while the lanes are busy."""
    with AlgoService("synthetic", SyntheticParams(latency_ms=300.0, sigma=0.0, detection_rate=0.5, seed=7)) as service:
        yield service


def test_the_leader_drops_what_another_program_keeps_too_few_of_and_none_reaches_the_service(
        store_server, creds, store, prefix, slow_service, nats, hosts, tmp_path):
    base = cli_env(store_server, creds, IMGWORKER_STORE_PREFIX=prefix, IMGWORKER_ALGO_ENDPOINT=slow_service.endpoint,
                   IMGWORKER_RETENTION_EXTERNAL_MAX_COUNT="3", IMGWORKER_WORKER_THREADS="1")
    env = cluster_env(base, nats.url)
    hosts += [Host(f"h{i}", env, str(tmp_path / f"h{i}"), workers=1) for i in range(2)]
    keys: list[str] = []
    for wave in range(5):  # 6 a second into one directory that keeps 3, for 2 lanes of 300 ms
        keys += [f"{prefix}person/cam/w{wave}-{i:02d}.jpg" for i in range(6)]
        upload(store, keys[-6:])
        time.sleep(1.0)
    entries = wait_for_ledger(nats.url, len(keys), hosts=hosts)
    assert [h.stop() for h in hosts] == [0, 0]
    assert_one_outcome_each(nats.url, keys, hosts)
    dropped = {e.key for e in entries if e.outcome.value == "dropped_expired"}
    assert dropped and {e.cause for e in entries if e.key in dropped} == {"would_expire"}
    calls = calls_under(slow_service, prefix)
    assert calls, "the newest images were analysed"
    assert not dropped & set(calls), "no image dropped as expiring was ever sent to the service"
    assert set(calls) | dropped == set(keys) and set(calls.values()) == {1}
    assert {e.outcome.value for e in entries} <= {"inferred", "no_detection", "dropped_expired"}
    assert set(keys) <= {ref.key for page in store.list_pages(prefix, 1000) for ref in page}, \
        "expiry deletes nothing itself"
    report = cluster_report(env)
    assert report["conserved"] and report["scanned"] == len(keys)
    assert report["outcomes"].get("dropped_expired") == len(dropped)
