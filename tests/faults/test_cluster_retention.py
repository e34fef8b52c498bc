"""The retention cleaner in cluster mode, with real processes: hosts are ``imgworker run`` supervisors sharing one
nats-server, and only the intake leader cleans.

Counted at the far end: the ledger bucket (one outcome per image), every host's results file (one
line per image cluster-wide), the objects left in the bucket, and the POSTs the algorithm service
received (an image deleted under a worker ends ``failed_missing``: the service's fetch got a 404).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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
    """300 ms a call: images wait in the stream while the lanes are busy."""
    with AlgoService("synthetic", SyntheticParams(latency_ms=300.0, sigma=0.0, detection_rate=0.5, seed=5)) as service:
        yield service


def env_for(store_server: Any, creds: Any, prefix: str, service: AlgoService, url: str, *, protect: str,
            max_count: int, **extra: str) -> dict[str, str]:
    base = cli_env(store_server, creds, IMGWORKER_STORE_PREFIX=prefix, IMGWORKER_ALGO_ENDPOINT=service.endpoint,
                   IMGWORKER_RETENTION_ENABLED="true", IMGWORKER_RETENTION_PROTECT=protect,
                   IMGWORKER_RETENTION_MAX_COUNT=str(max_count), IMGWORKER_WORKER_THREADS="1")
    return cluster_env(base, url, **extra)


def stored(store: Any, prefix: str) -> set[str]:
    return {ref.key for page in store.list_pages(prefix, 1000) for ref in page}


def lines_per_key(hosts: list[Host]) -> Counter[str]:
    out: Counter[str] = Counter()
    for host in hosts:
        path = os.path.join(host.state_dir, "results.jsonl")
        if os.path.exists(path):
            out.update(r.key for r in read_results(path))
    return out


def assert_one_outcome_each(url: str, keys: list[str], hosts: list[Host]) -> None:
    counts = per_key(ledger(url))
    assert set(counts) == set(keys) and set(counts.values()) == {1}, "one outcome per image in the ledger"
    lines = lines_per_key(hosts)
    assert set(lines) == set(keys) and set(lines.values()) == {1}, \
        f"one results line per image cluster-wide: {[k for k, n in lines.items() if n != 1]}"


def cluster_report(env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "imgworker", "report", "--cluster", "--json"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def wait_for(what: str, condition: Any, hosts: list[Host], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        assert any(h.proc.poll() is None for h in hosts), "every host ended"
        time.sleep(0.2)


def test_queued_on_two_hosts_deletes_only_done_images_and_none_under_a_worker(store_server, creds, store, prefix,
                                                                              slow_service, nats, hosts, tmp_path):
    keys = [f"{prefix}person/cam{i % 3}/{i:04d}.jpg" for i in range(24)]
    upload(store, keys)
    env = env_for(store_server, creds, prefix, slow_service, nats.url, protect="queued", max_count=2)
    hosts += [Host(f"h{i}", env, str(tmp_path / f"h{i}")) for i in range(2)]
    entries = wait_for_ledger(nats.url, len(keys), hosts=hosts)
    wait_for("the bucket within its limits", lambda: len(stored(store, prefix)) <= 3 * 2, hosts)
    assert [h.stop() for h in hosts] == [0, 0]
    assert_one_outcome_each(nats.url, keys, hosts)
    assert {e.outcome.value for e in entries} <= {"inferred", "no_detection"}, \
        "no image was deleted under a worker (the service's fetch would have got a 404: failed_missing)"
    calls = calls_under(slow_service, prefix)
    assert set(calls) == set(keys) and set(calls.values()) == {1}, "each image analysed once, every one of them"
    left = stored(store, prefix)
    assert len(left) <= 6 and left <= set(keys)
    assert {e.host for e in entries} == {"h0", "h1"}, "both hosts analysed images"
    report = cluster_report(env)
    assert report["conserved"] and report["scanned"] == len(keys)


def test_lease_gives_up_only_images_no_host_was_handed(store_server, creds, store, prefix, slow_service, nats, hosts,
                                                      tmp_path):
    env = env_for(store_server, creds, prefix, slow_service, nats.url, protect="lease", max_count=4)
    first = [f"{prefix}person/cam/a{i:03d}.jpg" for i in range(2)]
    upload(store, first)
    hosts += [Host(f"h{i}", env, str(tmp_path / f"h{i}"), workers=1) for i in range(2)]
    wait_for_ledger(nats.url, len(first), hosts=hosts)  # a leader took the lease and cleaned once
    burst: list[str] = []
    for wave in range(4):  # 8 a second for 2 lanes of 300 ms: the oldest not done are held by a lane by now
        burst += [f"{prefix}person/cam/b{wave}-{i:03d}.jpg" for i in range(8)]
        upload(store, burst[-8:])
        time.sleep(1.0)
    keys = first + burst
    entries = wait_for_ledger(nats.url, len(keys), hosts=hosts)
    assert [h.stop() for h in hosts] == [0, 0]
    assert_one_outcome_each(nats.url, keys, hosts)
    given_up = {e.key for e in entries if e.outcome.value == "dropped_expired"}
    assert given_up, "storage won: the leader gave images up"
    assert {e.cause for e in entries if e.key in given_up} == {"retention"}
    calls = calls_under(slow_service, prefix)
    assert not given_up & set(calls), "no image given up was ever sent to the service"
    assert set(calls) | given_up == set(keys) and set(calls.values()) == {1}
    assert {e.outcome.value for e in entries} <= {"inferred", "no_detection", "dropped_expired"}
    assert not given_up & stored(store, prefix), "what was given up is deleted"
    report = cluster_report(env)
    assert report["conserved"] and report["scanned"] == len(keys)
    assert report["outcomes"].get("dropped_expired") == len(given_up)


@pytest.mark.timeout(240)
def test_a_deposed_leader_deletes_nothing_and_the_new_leader_cleans(store_server, creds, store, prefix, slow_service,
                                                                    nats, hosts, tmp_path):
    env = env_for(store_server, creds, prefix, slow_service, nats.url, protect="queued", max_count=3)
    first = [f"{prefix}person/cam/a{i:03d}.jpg" for i in range(3)]  # within the limit: nothing to delete yet
    upload(store, first)
    old_report = tmp_path / "h0-report.json"
    old = Host("h0", env, str(tmp_path / "h0"), args=("--report-json", str(old_report)))
    hosts.append(old)
    wait_for_ledger(nats.url, len(first), hosts=hosts)  # h0 leads
    hosts.append(Host("h1", env, str(tmp_path / "h1")))
    time.sleep(1.0)
    old.signal_group(signal.SIGSTOP)  # longer than the lease's TTL: h1 takes it over
    later = [f"{prefix}person/cam/b{i:03d}.jpg" for i in range(9)]
    upload(store, later)
    keys = first + later
    wait_for_ledger(nats.url, len(keys), hosts=[hosts[1]], timeout=90)
    wait_for("the new leader cleans", lambda: len(stored(store, prefix)) <= 3, [hosts[1]])
    last = [f"{prefix}person/cam/c{i:03d}.jpg" for i in range(6)]  # more to clean as the old leader wakes up
    upload(store, last)
    old.signal_group(signal.SIGCONT)
    keys += last
    wait_for_ledger(nats.url, len(keys), hosts=hosts, timeout=90)
    wait_for("the new leader cleans again", lambda: len(stored(store, prefix)) <= 3, hosts)
    time.sleep(2.0)  # the old leader's loop has run again for a while: several listings' worth
    assert [h.stop() for h in hosts] == [0, 0]
    assert "now the intake leader" in hosts[1].log()
    report = json.loads(old_report.read_text())
    assert report["cleaner"]["passes"] >= 1 and report["cleaner"]["deleted"] == 0, \
        "the leader cleaned while it led, and deleted nothing after it lost the lease"
    assert_one_outcome_each(nats.url, keys, hosts)


def test_the_cleaner_s_lease_check_never_deposes_the_leader_itself(store_server, nats):
    """The fence before a delete renews the lease by CAS while the renewal task may do the same: both hold."""
    import asyncio

    from imgworker.cluster.jetstream import JetStreamLink
    from imgworker.config import ClusterConfig

    link = JetStreamLink(ClusterConfig(url=nats.url, lease_ttl_s=30), host="h0", bucket=store_server.bucket)
    link.start()
    try:
        deadline = time.monotonic() + 30
        while not link.leading():
            assert time.monotonic() < deadline, "no lease"
            time.sleep(0.05)
        async def renewals() -> list[int]:
            return list(await asyncio.gather(*(link._renew_lease() for _ in range(4))))

        revisions = asyncio.run_coroutine_threadsafe(renewals(), link._loop).result(10)
        assert all(revisions) and link.leading(), "concurrent renewals of a held lease all succeed"
        assert link.confirm_lease()
    finally:
        link.close()


def test_a_message_withdrawn_by_a_leader_that_died_before_ending_it_is_published_again(store_server, nats):
    """The leader died between the fence's withdraw and the image's end. The next leader publishes the image under
    the same Nats-Msg-Id within the duplicate window: the server takes it for a duplicate of a message that is
    gone. Without a second message the image would have no message, no holder and no outcome."""
    from imgworker.cluster.jetstream import JetStreamLink
    from imgworker.config import ClusterConfig
    from imgworker.outcomes import ImageRef

    ref = ImageRef(key="p/person/c1/a.jpg", task_type="person", task_id="c1", size=3, mtime=1.0, etag="e1")
    other = ImageRef(key="p/person/c1/b.jpg", task_type="person", task_id="c1", size=3, mtime=2.0, etag="e2")
    links = [JetStreamLink(ClusterConfig(url=nats.url, lease_ttl_s=30), host=f"h{i}", bucket=store_server.bucket)
             for i in range(2)]

    def lead(link: JetStreamLink) -> None:
        link.start()
        deadline = time.monotonic() + 30
        while not link.leading():
            assert time.monotonic() < deadline, "no lease"
            time.sleep(0.05)

    try:
        lead(links[0])
        assert links[0].publish([ref, other]).sent == 2
        assert links[0].withdraw(links[0].sequences[ref.key])  # and it dies: its lease is given up, nothing ended
        links[0].close()
        lead(links[1])
        assert links[1].publish([ref, other]).sent == 2
        assert links[1].figures()["stream_messages"] == 2, "the withdrawn image is in the stream again, once"
        assert links[1].sequences[ref.key] == 0, "a host may hold the withdrawn delivery: never given up via the copy"
        fetched: list[str] = []
        deadline = time.monotonic() + 10
        while len(fetched) < 2 and time.monotonic() < deadline:
            fetched += [d.ref.key for d in links[1].fetch(2)]
        assert sorted(fetched) == [ref.key, other.key]
    finally:
        for link in links:
            link.close()


def test_each_time_a_host_takes_the_lease_again_is_a_new_term(nats):
    """The cleaner inherits what a term's first listing finds: a host that led, lost the lease and took it again
    starts a new term (another leader may have published meanwhile)."""
    import asyncio

    from imgworker.cluster.jetstream import LEASE_KEY, JetStreamLink
    from imgworker.config import ClusterConfig

    link = JetStreamLink(ClusterConfig(url=nats.url, lease_ttl_s=3), host="h0", bucket="pics")
    link.start()

    def on_link(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, link._loop).result(10)

    def wait(what: str, condition: Any) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    try:
        wait("no lease", link.leading)
        assert link.lease_terms == 1
        on_link(link._lease.put(LEASE_KEY, b"h1"))  # another host's lease (no TTL: h0 cannot take it back)
        wait("not deposed", lambda: not link.leading())
        assert link.lease_terms == 1
        on_link(link._lease.delete(LEASE_KEY))  # it is gone: h0 takes the lease again
        wait("not leading again", link.leading)
        assert link.lease_terms == 2
    finally:
        link.close()


def test_a_withdrawn_message_published_again_is_in_the_stream_and_a_withdrawn_one_reaches_no_host(nats):
    """What the leader's fence relies on, against a real server: a withdrawn message is never delivered, the
    consumer's delivered sequence stays below it, and publishing the image again stores a new message (the
    duplicate window would drop one under the image's own Nats-Msg-Id)."""
    from imgworker.cluster.jetstream import JetStreamLink
    from imgworker.config import ClusterConfig
    from imgworker.outcomes import ImageRef

    link = JetStreamLink(ClusterConfig(url=nats.url, lease_ttl_s=30), host="h0", bucket="pics")
    link.start()
    try:
        deadline = time.monotonic() + 30
        while not link.leading():
            assert time.monotonic() < deadline, "no lease"
            time.sleep(0.05)
        kept, withdrawn = (ImageRef(key=f"in/p/c/{n}.jpg", size=3, mtime=1.0, etag=f"e{n}") for n in (1, 2))
        assert link.publish([kept, withdrawn]).sent == 2
        first, second = link.sequences[kept.key], link.sequences[withdrawn.key]
        assert link.withdraw(second) and not link.withdraw(second), "deleted once"
        assert [d.ref.key for d in link.fetch(10)] == [kept.key] and link.delivered_up_to() < second
        again = link.publish_again(withdrawn, "t1")
        assert again > second and link.sequences[withdrawn.key] == again
        assert [d.ref.key for d in link.fetch(10)] == [withdrawn.key], "back in the stream, delivered"
        assert link.delivered_up_to() == again and first < second
    finally:
        link.close()
