"""Cluster mode with MinIO's events on NATS: the intake leader republishes them; real hosts, a real nats-server.

The tests publish bucket notifications as MinIO's NATS target does with ``jetstream on``: into an
existing stream, on one subject, with no ``Nats-Msg-Id``, keys URL-escaped, the ETag unquoted (the
store here is SeaweedFS, whose ETag for a plain PUT is the MD5 of the bytes, as MinIO's is). Counted
at the far end: the ledger, every host's results file, the POSTs the algorithm service received.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import re
import threading
import time
import urllib.parse
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

DATA = b"\xff\xd8\xff\xe0fake-jpeg"  # what tests.support.store.upload writes
SUBJECT = "minio.events"


@pytest.fixture(scope="module")
def slow_service() -> Iterator[AlgoService]:
    """300 ms a call: the leader is killed while hosts hold images."""
    with AlgoService("synthetic", SyntheticParams(latency_ms=300.0, sigma=0.0, detection_rate=0.5, seed=5)) as service:
        yield service


def jetstream(url: str, action: Any) -> Any:
    import nats as nats_py

    async def main() -> Any:
        nc = await nats_py.connect(url)
        try:
            return await action(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(main())


def minio_stream(url: str) -> None:
    """The stream MinIO publishes into (an administrator creates it: MinIO does not)."""
    jetstream(url, lambda js: js.add_stream(name="MINIO", subjects=[SUBJECT]))


def notification(bucket: str, key: str, data: bytes = DATA) -> bytes:
    """One body as MinIO's NATS target sends it: the key through Go's url.QueryEscape, the event's own time."""
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    record = {"eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "", "eventTime": now,
              "eventName": "s3:ObjectCreated:Put", "userIdentity": {"principalId": "minioadmin"},
              "s3": {"s3SchemaVersion": "1.0", "configurationId": "Config",
                     "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
                     "object": {"key": urllib.parse.quote_plus(key, safe=""), "size": len(data),
                                "eTag": hashlib.md5(data).hexdigest(), "contentType": "image/jpeg",
                                "sequencer": "17CB0D5A1E2B7E10"}}}
    return json.dumps({"EventName": "s3:ObjectCreated:Put", "Key": f"{bucket}/{key}", "Records": [record]}).encode()


def publish(url: str, bucket: str, keys: list[str]) -> None:
    """As MinIO does: one JetStream publish per event, no Nats-Msg-Id."""
    async def each(js: Any) -> None:
        for key in keys:
            await js.publish(SUBJECT, notification(bucket, key))

    jetstream(url, each)


def odd_keys(prefix: str, tag: str, n: int) -> list[str]:
    """Keys that MinIO escapes: a space, a plus, non-ASCII letters."""
    names = ["cam 1/{i:04d}.jpg", "cam+2/a+b {i:04d}.jpg", "caf\u00e9/\u00fcber {i:04d}.jpg"]
    return [f"{prefix}{tag}/" + names[i % 3].format(i=i) for i in range(n)]


def events_env(store_server: Any, creds: Any, prefix: str, service: AlgoService, url: str, *,
               reconcile_s: float, **extra: Any) -> dict[str, str]:
    base = cli_env(store_server, creds, IMGWORKER_STORE_PREFIX=prefix, IMGWORKER_ALGO_ENDPOINT=service.endpoint)
    return cluster_env(base, url, IMGWORKER_SCAN_MODE="events", IMGWORKER_SCAN_EVENTS_SOURCE="minio_nats",
                       IMGWORKER_SCAN_RECONCILE_INTERVAL_S=str(reconcile_s), **extra)


def wait_for_log(hosts: list[Host], text: str, timeout: float = 60) -> Host:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for host in hosts:
            if text in host.log():
                return host
        assert any(h.proc.poll() is None for h in hosts), "every host ended"
        time.sleep(0.1)
    raise AssertionError(f"no host logged {text!r} within {timeout} s")


def republished(hosts: list[Host]) -> int:
    """Images the hosts published from MinIO's notifications (their closing figures)."""
    return sum(int(n) for h in hosts for n in re.findall(r"'republished': (\d+)", h.log()))


def stop_all(hosts: list[Host]) -> list[int]:
    return [h.stop() for h in hosts if h.proc.poll() is None]


def lines_per_key(hosts: list[Host]) -> Counter[str]:
    out: Counter[str] = Counter()
    for host in hosts:
        path = os.path.join(host.state_dir, "results.jsonl")
        if os.path.exists(path):
            out.update(r.key for r in read_results(path))
    return out


def assert_one_outcome_each(nats_url: str, keys: list[str], hosts: list[Host]) -> None:
    """One outcome per image in the ledger, one results line per image across the hosts."""
    entries = per_key(ledger(nats_url))
    assert set(entries) == set(keys) and set(entries.values()) == {1}
    lines = lines_per_key(hosts)
    assert set(lines) == set(keys) and set(lines.values()) == {1}, [k for k, n in lines.items() if n != 1]


def assert_clean(hosts: list[Host]) -> None:
    for host in hosts:
        assert "Traceback" not in host.log(), host.log()


CONSUMING = "consuming MinIO's notifications"


# ----- the events are republished, once each ---------------------------------------------------------


def test_two_hosts_analyse_each_upload_once_from_repeated_events_and_sweeps(store_server, creds, store, prefix,
                                                                           slow_service, nats, hosts, tmp_path):
    minio_stream(nats.url)
    before = odd_keys(prefix, "before", 6)  # found by the first sweep, and their events come too
    upload(store, before)
    env = events_env(store_server, creds, prefix, slow_service, nats.url, reconcile_s=1.0)
    hosts += [Host(f"h{i}", env, str(tmp_path / f"h{i}")) for i in range(2)]
    wait_for_log(hosts, CONSUMING)
    after = odd_keys(prefix, "after", 12)
    upload(store, after)
    listed = {r.key: r.etag for page in store.list_pages(prefix, 1000) for r in page}
    assert set(listed.values()) == {hashlib.md5(DATA).hexdigest()}, "the store's ETag is the events' eTag"
    publish(nats.url, store_server.bucket, before + after)
    publish(nats.url, store_server.bucket, after[::2])  # MinIO may send an event again
    wait_for_ledger(nats.url, len(before) + len(after), hosts=hosts)
    time.sleep(2.5)  # sweeps every second list the same uploads again
    publish(nats.url, store_server.bucket, after[1::2])  # late repeats
    time.sleep(1.5)
    assert stop_all(hosts) == [0, 0]
    keys = before + after
    assert_one_outcome_each(nats.url, keys, hosts)
    assert calls_under(slow_service, prefix) == {k: 1 for k in keys}, "each upload analysed once"
    assert republished(hosts) >= len(after), "the leader published the events' images"
    assert_clean(hosts)


def first_sweep_marker(store: Any, prefix: str) -> str:
    """One image uploaded before the hosts start: once it has its outcome, the leader's start-up sweep is over and
    the next is ``scan.reconcile_interval_s`` (600 s) away, so what comes later comes through MinIO's stream."""
    marker = f"{prefix}marker/cam/0000.jpg"
    upload(store, [marker])
    return marker


def test_events_alone_bring_new_uploads_in(store_server, creds, store, prefix, slow_service, nats, hosts, tmp_path):
    """No sweep within the test after the first one: what is analysed came through MinIO's stream."""
    minio_stream(nats.url)
    marker = first_sweep_marker(store, prefix)
    env = events_env(store_server, creds, prefix, slow_service, nats.url, reconcile_s=600)
    hosts += [Host(f"h{i}", env, str(tmp_path / f"h{i}")) for i in range(2)]
    wait_for_log(hosts, CONSUMING)
    wait_for_ledger(nats.url, 1, hosts=hosts)  # the marker: the start-up sweep is over
    keys = odd_keys(prefix, "new", 9)
    upload(store, keys)
    publish(nats.url, store_server.bucket, keys)
    entries = wait_for_ledger(nats.url, len(keys) + 1, hosts=hosts)
    assert stop_all(hosts) == [0, 0]
    assert_one_outcome_each(nats.url, [marker, *keys], hosts)
    assert calls_under(slow_service, prefix) == {k: 1 for k in [marker, *keys]}
    assert {e.host for e in entries} == {"h0", "h1"}, "both hosts analysed images"
    info = jetstream(nats.url, lambda js: js.consumer_info("MINIO", "imgworker"))
    assert info.num_ack_pending == 0 and info.num_pending == 0, "every notification was acked"
    assert_clean(hosts)


def test_no_host_reads_minio_s_stream_but_the_leader_s_link_even_with_nats_url_set(store_server, creds, store, prefix,
                                                                                 slow_service, nats, hosts, tmp_path):
    """``scan.events.nats_url`` naming the cluster's server (it is not used in cluster mode): no host runs a watcher
    of its own on MinIO's durable consumer, which would take notifications into a host that does not publish them."""
    minio_stream(nats.url)
    marker = first_sweep_marker(store, prefix)
    env = events_env(store_server, creds, prefix, slow_service, nats.url, reconcile_s=600,
                     IMGWORKER_SCAN_EVENTS_NATS_URL=nats.url)
    hosts += [Host(f"h{i}", env, str(tmp_path / f"h{i}")) for i in range(2)]
    wait_for_log(hosts, CONSUMING)
    wait_for_ledger(nats.url, 1, hosts=hosts)
    keys = odd_keys(prefix, "new", 9)
    upload(store, keys)
    publish(nats.url, store_server.bucket, keys)
    wait_for_ledger(nats.url, len(keys) + 1, hosts=hosts)
    assert stop_all(hosts) == [0, 0]
    assert_one_outcome_each(nats.url, [marker, *keys], hosts)
    assert calls_under(slow_service, prefix) == {k: 1 for k in [marker, *keys]}


# ----- the leader dies while events arrive -------------------------------------------------------------


def test_killing_the_leader_while_events_arrive_loses_nothing(store_server, creds, store, prefix, slow_service, nats,
                                                             hosts, tmp_path):
    minio_stream(nats.url)
    env = events_env(store_server, creds, prefix, slow_service, nats.url, reconcile_s=600)
    leader = Host("h0", env, str(tmp_path / "h0"))
    hosts.append(leader)
    wait_for_log([leader], CONSUMING)
    survivor = Host("h1", env, str(tmp_path / "h1"))
    hosts.append(survivor)
    wait_for_log([survivor], "cluster mode: host h1")
    keys = odd_keys(prefix, "stream", 30)
    sent: list[str] = []

    def uploads() -> None:
        for key in keys:
            upload(store, [key])
            publish(nats.url, store_server.bucket, [key])
            sent.append(key)
            time.sleep(0.15)

    feeder = threading.Thread(target=uploads)
    feeder.start()
    try:
        while len(sent) < 10:
            time.sleep(0.05)
        leader.kill()
        wait_for_log([survivor], CONSUMING, timeout=30)  # it took the lease over
    finally:
        feeder.join()
    wait_for_ledger(nats.url, len(keys), hosts=[survivor], timeout=90)
    # its service manager starts it again: an outcome it counted in the ledger but had not written when it was
    # killed is journaled before any new work (the line is written once, by the host whose claim counted)
    restarted = Host(leader.name, env, leader.state_dir)
    hosts.append(restarted)
    wait_for_log([restarted], "started:")
    assert stop_all([survivor, restarted]) == [0, 0]
    assert_one_outcome_each(nats.url, keys, [survivor, restarted])
    calls = calls_under(slow_service, prefix)
    assert set(calls) == set(keys), "nothing lost"
    assert len({k for k, n in calls.items() if n > 1}) <= 2, "only what the killed host held (2 lanes) twice"
    assert "now the intake leader" in survivor.log()
    assert_clean([survivor])


# ----- a full work stream ---------------------------------------------------------------------------------


def test_a_full_work_stream_holds_events_back_until_there_is_room(store_server, creds, store, prefix, slow_service,
                                                                  nats, hosts, tmp_path):
    minio_stream(nats.url)
    marker = first_sweep_marker(store, prefix)
    env = events_env(store_server, creds, prefix, slow_service, nats.url, reconcile_s=600,
                     IMGWORKER_CLUSTER_MAX_MSGS="2")
    hosts.append(Host("h0", env, str(tmp_path / "h0"), workers=1))
    wait_for_log(hosts, CONSUMING)
    wait_for_ledger(nats.url, 1, hosts=hosts)  # the marker: the start-up sweep is over
    keys = odd_keys(prefix, "full", 12)
    upload(store, keys)
    publish(nats.url, store_server.bucket, keys)
    wait_for_ledger(nats.url, len(keys) + 1, hosts=hosts, timeout=120)
    assert stop_all(hosts) == [0]
    assert "work stream full (2 messages): MinIO's notifications wait" in hosts[0].log()
    assert_one_outcome_each(nats.url, [marker, *keys], hosts)
    assert calls_under(slow_service, prefix) == {k: 1 for k in [marker, *keys]}
    assert_clean(hosts)


# ----- MinIO's stream missing -----------------------------------------------------------------------------


def test_a_missing_events_stream_is_reported_sweeps_go_on_and_it_is_used_once_created(
        store_server, creds, store, prefix, slow_service, nats, hosts, tmp_path):
    early = odd_keys(prefix, "early", 4)
    upload(store, early)
    env = events_env(store_server, creds, prefix, slow_service, nats.url, reconcile_s=600)
    hosts.append(Host("h0", env, str(tmp_path / "h0")))
    wait_for_log(hosts, "MinIO's event stream does not exist (a stream holding subject 'minio.events')")
    wait_for_ledger(nats.url, len(early), hosts=hosts)  # the start-up sweep's images: the host goes on
    minio_stream(nats.url)
    wait_for_log(hosts, CONSUMING, timeout=30)
    late = odd_keys(prefix, "late", 4)
    upload(store, late)
    publish(nats.url, store_server.bucket, late)
    wait_for_ledger(nats.url, len(early) + len(late), hosts=hosts)
    assert stop_all(hosts) == [0]
    log = hosts[0].log()
    assert log.count("MinIO's event stream does not exist") == 1, "said once, not at every look"
    assert "create it" in log
    assert_one_outcome_each(nats.url, early + late, hosts)
    assert_clean(hosts)
