"""``--until-idle`` does not end a cluster host: the intake leader must not stop once it has published.

The leader's own queue is empty right after it published the bucket's images to the work stream,
so with ``run.until_idle`` it used to stop as "idle" before any lane took them. A single host,
alone in its cluster, then left every image unanalysed. Counted at the far end: the outcome
ledger and the algorithm service's calls.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.cli import cli_env
from tests.support.cluster import Host, NatsServer, cluster_env, per_key, wait_for_ledger
from tests.support.results import calls_under
from tests.support.store import upload


@pytest.mark.timeout(180)
def test_a_lone_leader_with_until_idle_analyses_what_it_published_and_runs_until_stopped(
        tmp_path, nats, store_server, creds, store, algo_server, prefix):
    keys = [f"{prefix}person/cam{i % 2}/{i:04d}.jpg" for i in range(4)]
    upload(store, keys)
    env = cluster_env(cli_env(store_server, creds, IMGWORKER_STORE_PREFIX=prefix,
                              IMGWORKER_ALGO_ENDPOINT=algo_server.endpoint), nats.url)
    host = Host("h0", env, str(tmp_path / "h0"), workers=1, args=("--until-idle",))
    try:
        entries = wait_for_ledger(nats.url, len(keys), hosts=[host], timeout=120)
        assert host.proc.poll() is None, "a cluster host runs until it is stopped"
        host.proc.send_signal(signal.SIGTERM)
        assert host.proc.wait(60) == 0, host.log()[-3000:]
    finally:
        host.reap()
    assert per_key(entries) == {key: 1 for key in keys}
    assert calls_under(algo_server, prefix) == {key: 1 for key in keys}
    assert "--until-idle (run.until_idle) does not end a cluster host" in host.log()
    assert "stopping (idle)" not in host.log()
