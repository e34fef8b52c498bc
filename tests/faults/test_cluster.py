"""Cluster mode with real processes: hosts are ``imgworker run`` supervisors sharing one nats-server.

Counted at the far end: the ledger bucket (one outcome per image, and which host), every host's
results file (one line per image cluster-wide), and the POSTs the algorithm service received.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from imgworker.results import read_results
from imgworker.services.algo_server import AlgoService, SyntheticParams
from imgworker.config import ClusterConfig
from imgworker.services.netutil import free_port, wait_until
from tests.support.cli import cli_env
from tests.support.cluster import (
    Host, NatsServer, cluster_env, jetstream_cluster, ledger, per_key, wait_for_jetstream, wait_for_ledger,
)
from tests.support.results import calls_under
from tests.support.store import upload

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def slow_service() -> Iterator[AlgoService]:
    """300 ms a call: a host always holds images when it is killed or paused."""
    with AlgoService("synthetic", SyntheticParams(latency_ms=300.0, sigma=0.0, detection_rate=0.5, seed=3)) as service:
        yield service


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
    time.sleep(2.0)  # the leader sweeps the same bucket again, several times (every 0.3 s)
    assert stop_all(hosts) == [0, 0]
    assert_one_outcome_each(nats.url, keys, hosts)
    assert {e.host for e in entries} == {"h0", "h1"}, "both hosts analysed images"
    for host in hosts:  # every image is still there: the leader's processed set keeps its own
        assert "processed set: pruned" not in host.log()
    assert set(calls_under(slow_service, prefix).values()) == {1}, "each image analysed once"
    report = subprocess.run([sys.executable, "-m", "imgworker", "report", "--cluster", "--json"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    assert data["conserved"] and data["scanned"] == len(keys)
    assert sum(data["outcomes"].values()) == len(keys)
    assert data["hosts"] == dict(Counter(e.host for e in entries))


def test_calls_longer_than_ack_wait_are_not_handed_to_a_second_host(store_server, creds, store, prefix, nats, hosts,
                                                                   tmp_path):
    """Progress notes every AckWait/3 keep a running call's image with its host."""
    keys = images(store, prefix, 4)
    with AlgoService("synthetic", SyntheticParams(latency_ms=4000.0, sigma=0.0, seed=9)) as slow_calls:
        env = env_for(store_server, creds, prefix, slow_calls, nats.url, ack_wait_s=1.0)
        hosts += [Host(f"h{i}", env, str(tmp_path / f"h{i}")) for i in range(2)]
        wait_for_ledger(nats.url, len(keys), hosts=hosts)
        assert stop_all(hosts) == [0, 0]
        assert_one_outcome_each(nats.url, keys, hosts)
        assert calls_under(slow_calls, prefix) == {k: 1 for k in keys}, "each image analysed once"


def scrape(port: int, host: str) -> dict[str, float] | None:
    """A host's /metrics as sample name -> value (None while it does not answer); every sample has its host label."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    assert samples and all(s.labels.get("host") == host for s in samples), "every sample carries the host label"
    return {s.name: s.value for s in samples}


def test_the_leader_exports_the_stream_depth_and_the_consumer_s_counts(store_server, creds, store, prefix, nats,
                                                                      hosts, tmp_path):
    keys = images(store, prefix, 24)
    with AlgoService("synthetic", SyntheticParams(latency_ms=1000.0, sigma=0.0, seed=4)) as slower:
        env = env_for(store_server, creds, prefix, slower, nats.url)
        ports = [free_port(), free_port()]
        hosts += [Host(f"h{i}", env, str(tmp_path / f"h{i}"), args=("--metrics-port", str(ports[i])))
                  for i in range(2)]
        # while the lanes work through the first images, the rest wait in the stream, on the leader's figures
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            seen = [scrape(port, h.name) for port, h in zip(ports, hosts)]
            if all(seen) and sum(m["imgworker_cluster_leader"] for m in seen if m) == 1:
                leader = next(i for i, m in enumerate(seen) if m and m["imgworker_cluster_leader"] == 1)
                figures = seen[leader]
                assert figures is not None
                if figures.get("imgworker_cluster_stream_depth", 0) > 0:
                    break
            time.sleep(0.1)
        else:
            pytest.fail(f"no single leader exporting a stream depth > 0: {seen}")
        follower = hosts[1 - leader]
        assert "imgworker_cluster_stream_depth" not in (seen[1 - leader] or {}), "only the leader exports them"
        assert figures["imgworker_cluster_consumer_pending"] > 0, "images not yet delivered"
        # the follower pauses past AckWait holding images: they are redelivered, and the leader counts them
        while not any(e.host == follower.name for e in wait_for_ledger(nats.url, 1, hosts=hosts)):
            time.sleep(0.05)
        redelivered = 0.0
        follower.signal_group(signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 20
            while not redelivered and time.monotonic() < deadline:
                redelivered = (scrape(ports[leader], hosts[leader].name) or {}).get(
                    "imgworker_cluster_consumer_redelivered", 0.0)
                time.sleep(0.1)
        finally:
            follower.signal_group(signal.SIGCONT)
        assert redelivered > 0, "the paused host's images show as redelivered"
        wait_for_ledger(nats.url, len(keys), hosts=hosts)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            figures = scrape(ports[leader], hosts[leader].name) or {}
            if figures.get("imgworker_cluster_stream_depth") == 0:
                break
            time.sleep(0.2)
        assert figures["imgworker_cluster_stream_depth"] == 0 and figures["imgworker_cluster_consumer_pending"] == 0
        assert figures["imgworker_cluster_leader"] == 1
        assert stop_all(hosts) == [0, 0]
        assert_one_outcome_each(nats.url, keys, hosts)


# ----- a host dies, pauses, or is stopped -------------------------------------------------------


def test_sigkill_of_a_whole_host_leaves_one_outcome_each(store_server, creds, store, prefix, slow_service, nats, hosts,
                                                         tmp_path):
    """The killed host is started again (same name, same state directory), as its service manager would: an
    outcome it wrote to the ledger just before the kill, with no line yet, gets its line and actions there."""
    keys = images(store, prefix, 30)
    env = env_for(store_server, creds, prefix, slow_service, nats.url, IMGWORKER_ACTIONS_DELETE_NO_DETECTION="true")
    hosts += [Host(f"h{i}", env, str(tmp_path / f"h{i}")) for i in range(2)]
    victim, survivor = hosts[1], hosts[0]
    wait_for_ledger(nats.url, 1, hosts=hosts)
    while not any(e.host == victim.name for e in ledger(nats.url)):
        time.sleep(0.05)
    victim.kill()
    restarted = Host(victim.name, env, victim.state_dir)
    hosts.append(restarted)
    wait_for_ledger(nats.url, len(keys), hosts=[survivor, restarted])
    assert stop_all([survivor, restarted]) == [0, 0]
    assert_one_outcome_each(nats.url, keys, [survivor, restarted])
    calls = calls_under(slow_service, prefix)
    assert set(calls) == set(keys)
    # only what the killed host held (2 lanes) is analysed again
    assert len({k for k, n in calls.items() if n > 1}) <= 2
    # its actions ran once, wherever it was counted: exactly the no_detection images are gone
    outcomes = {e.key: e.outcome.value for e in ledger(nats.url)}
    listed = {r.key for page in store.list_pages(prefix, 1000) for r in page}
    assert listed == {k for k in keys if outcomes[k] != "no_detection"}
    assert "no_detection" in outcomes.values() and "inferred" in outcomes.values()


def test_a_paused_host_s_late_outcomes_are_not_counted(store_server, creds, store, prefix, slow_service, nats, hosts,
                                                       tmp_path):
    keys = images(store, prefix, 30)
    env = env_for(store_server, creds, prefix, slow_service, nats.url)
    hosts += [Host(f"h{i}", env, str(tmp_path / f"h{i}")) for i in range(2)]
    paused = hosts[1]
    while not any(e.host == paused.name for e in wait_for_ledger(nats.url, 1, hosts=hosts)):
        time.sleep(0.05)
    paused.signal_group(signal.SIGSTOP)  # a GC pause or a partition, longer than AckWait (2 s)
    try:
        wait_for_ledger(nats.url, len(keys), hosts=hosts)
    finally:
        paused.signal_group(signal.SIGCONT)
    time.sleep(1.0)  # its lanes answer now: their outcomes come late
    assert stop_all(hosts) == [0, 0]
    assert_one_outcome_each(nats.url, keys, hosts)
    twice = {k for k, n in calls_under(slow_service, prefix).items() if n > 1}
    assert twice, "the paused host's images were analysed again elsewhere"
    assert all(e.host != paused.name for e in ledger(nats.url) if e.key in twice)
    assert "is not counted" in paused.log()


def test_group_sigterm_drains_hands_back_and_exits_0(store_server, creds, store, prefix, nats, hosts, tmp_path):
    keys = images(store, prefix, 16)
    with AlgoService("synthetic", SyntheticParams(latency_ms=2500.0, sigma=0.0, seed=5)) as slower:
        # AckWait far longer than the test waits: what the stopped host held comes back only if it naks it;
        # no grace: its lanes' items are still held when it stops
        env = env_for(store_server, creds, prefix, slower, nats.url, ack_wait_s=120.0)
        hosts.append(Host("h0", env, str(tmp_path / "h0")))
        hosts.append(Host("h1", {**env, "IMGWORKER_RUN_GRACE_S": "0"}, str(tmp_path / "h1")))
        stopped = hosts[1]
        while not any(e.host == stopped.name for e in wait_for_ledger(nats.url, 1, hosts=hosts)):
            time.sleep(0.05)
        stopped.signal_group(signal.SIGTERM)
        assert stopped.proc.wait(30) == 0
        wait_for_ledger(nats.url, len(keys), hosts=hosts, timeout=60)
        assert hosts[0].stop() == 0
        assert_one_outcome_each(nats.url, keys, hosts)
        assert set(calls_under(slower, prefix)) == set(keys)
    assert "Traceback" not in stopped.log()


def test_killing_the_intake_leader_moves_intake_to_another_host(store_server, creds, store, prefix, slow_service, nats,
                                                                hosts, tmp_path):
    env = env_for(store_server, creds, prefix, slow_service, nats.url)
    leader = Host("h0", env, str(tmp_path / "h0"))
    hosts.append(leader)
    first = images(store, prefix, 10)
    wait_for_ledger(nats.url, 1, hosts=hosts)  # h0 took the lease: it published
    hosts.append(Host("h1", env, str(tmp_path / "h1")))
    wait_for_ledger(nats.url, len(first), hosts=hosts)
    leader.kill()
    later = [f"{prefix}person/later/{i:04d}.jpg" for i in range(10)]
    upload(store, later)
    wait_for_ledger(nats.url, len(first) + len(later), hosts=[hosts[1]], timeout=60)
    # started again as its service manager would: an outcome it counted but had not written is journaled then
    restarted = Host(leader.name, env, leader.state_dir)
    hosts.append(restarted)
    while "started:" not in restarted.log():
        assert restarted.proc.poll() is None, restarted.log()
        time.sleep(0.1)
    assert stop_all([hosts[1], restarted]) == [0, 0]
    assert_one_outcome_each(nats.url, first + later, [hosts[1], restarted])
    calls = calls_under(slow_service, prefix)
    assert all(calls[k] == 1 for k in later), "images found by the new leader are analysed once"
    assert "now the intake leader" in hosts[1].log()


def test_nats_server_away_for_seconds_then_back(store_server, creds, store, prefix, slow_service, nats, hosts,
                                                tmp_path):
    keys = images(store, prefix, 30)
    env = env_for(store_server, creds, prefix, slow_service, nats.url)
    hosts += [Host(f"h{i}", env, str(tmp_path / f"h{i}")) for i in range(2)]
    wait_for_ledger(nats.url, 6, hosts=hosts)
    nats.stop()
    time.sleep(3.0)
    nats.start()  # same port, same stored stream, consumer and buckets
    wait_for_ledger(nats.url, len(keys), hosts=hosts, timeout=90)
    assert stop_all(hosts) == [0, 0]
    assert_one_outcome_each(nats.url, keys, hosts)
    for host in hosts:
        assert "Traceback" not in host.log()


def test_a_host_started_before_nats_server_waits_for_it_then_works(store_server, creds, store, prefix, slow_service,
                                                                  hosts, tmp_path):
    """A host (re)started while the NATS server is down waits and retries, as a running host does."""
    keys = images(store, prefix, 8)
    late = NatsServer(str(tmp_path / "nats-late"))
    hosts.append(Host("h0", env_for(store_server, creds, prefix, slow_service, late.url), str(tmp_path / "h0")))
    try:
        wait_until(lambda: "does not answer yet" in hosts[0].log(), timeout_s=60, what="the host's first retry",
                   alive=lambda: hosts[0].proc.poll() is None)
        late.start()
        wait_for_ledger(late.url, len(keys), hosts=hosts, timeout=90)
        assert stop_all(hosts) == [0]
        assert_one_outcome_each(late.url, keys, hosts)
    finally:
        late.stop()
    assert "Traceback" not in hosts[0].log()


def test_a_stop_while_a_host_waits_for_nats_at_start_ends_it_with_a_clear_message(store_server, creds, store,
                                                                                    prefix, slow_service, hosts,
                                                                                    tmp_path):
    absent = NatsServer(str(tmp_path / "nats-absent"))  # never started
    hosts.append(Host("h0", env_for(store_server, creds, prefix, slow_service, absent.url), str(tmp_path / "h0")))
    wait_until(lambda: "does not answer yet" in hosts[0].log(), timeout_s=60, what="the host's first retry",
               alive=lambda: hosts[0].proc.poll() is None)
    hosts[0].signal_group(signal.SIGTERM)
    assert hosts[0].proc.wait(60) == 130
    log = hosts[0].log()
    assert "stopped while waiting for the NATS server" in log and "Traceback" not in log
    assert "results.jsonl" not in os.listdir(tmp_path / "h0") or not read_results(str(tmp_path / "h0" / "results.jsonl"))


# ----- an image no host survives ----------------------------------------------------------------


def test_an_image_delivered_max_attempts_times_ends_failed_worker_unanalysed(store_server, creds, store, prefix,
                                                                             slow_service, nats, hosts, tmp_path):
    """Its earlier holders all died holding it (whole hosts): it is not handed to a worker again."""
    from imgworker.cluster.jetstream import JetStreamLink
    from imgworker.config import ClusterConfig
    from imgworker.outcomes import ImageRef

    key = images(store, prefix, 1)[0]
    cluster = ClusterConfig(url=nats.url, ack_wait_s=1.0)
    dying = JetStreamLink(cluster, host="dying", bucket=store_server.bucket)
    dying.start()
    try:
        while not dying.leading():
            time.sleep(0.05)
        [[listed]] = list(store.list_pages(prefix, 10))  # the image as the leader lists it: with its version
        assert dying.publish([ImageRef(key=key, size=listed.size, mtime=listed.mtime, etag=listed.etag)]).sent == 1
        for _ in range(3):  # a host takes it and dies: no ack, no progress note, no nak
            got: list[Any] = []
            while not got:
                got = dying.fetch(1)
            dying.forget(key)
    finally:
        dying.close()
    env = env_for(store_server, creds, prefix, slow_service, nats.url, ack_wait_s=1.0,
                  IMGWORKER_WORKER_MAX_ATTEMPTS="3")
    hosts.append(Host("h0", env, str(tmp_path / "h0")))
    [entry] = wait_for_ledger(nats.url, 1, hosts=hosts)
    assert hosts[0].stop() == 0
    assert entry.outcome.value == "failed_worker" and entry.cause == "delivered_4_times"
    assert calls_under(slow_service, prefix) == {}, "not analysed a fourth time"
    from imgworker.cluster.jetstream import read_cluster
    _, figures = read_cluster(cluster)
    assert figures["stream_messages"] == 0 and figures["consumer_ack_pending"] == 0, "terminated, not looping"


def test_an_image_that_kills_its_worker_ends_failed_worker_after_max_attempts(make_config, store_server, store,
                                                                              prefix, nats, tmp_path):
    """Two in-process hosts with real worker processes; whichever lane takes the poison image has its process
    SIGKILLed. It ends ``failed_worker`` once, cluster-wide, and leaves the stream: it does not loop.

    A first host took it and died holding it: that delivery counts as one of the attempts."""
    from imgworker.cluster.jetstream import JetStreamLink, read_cluster
    from imgworker.config import ClusterConfig
    from imgworker.supervisor import Supervisor

    keys = images(store, prefix, 8)
    poison = keys[3]
    # published as the leader's sweep will publish it (same Nats-Msg-Id: stored once), then lost by its holder
    [ref] = [r for page in store.list_pages(prefix, 1000) for r in page if r.key == poison]
    dying = JetStreamLink(ClusterConfig(url=nats.url, ack_wait_s=2.0, lease_ttl_s=2), host="dying",
                          bucket=store_server.bucket)
    dying.start()
    try:
        while not dying.leading():
            time.sleep(0.05)
        assert dying.publish([ref]).sent == 1
        got: list[Any] = []
        while not got:
            got = dying.fetch(1)
        dying.forget(poison)  # it dies holding it: no ack, no progress note, no nak
    finally:
        dying.close()
    with AlgoService("synthetic", SyntheticParams(latency_ms=800.0, sigma=0.0)) as very_slow:
        sups = [Supervisor(make_config(worker={"count": 2, "max_attempts": 3}, algo={"endpoint": very_slow.endpoint},
                                       run={"state_dir": str(tmp_path / f"h{i}"), "until_idle": False},
                                       cluster={"url": nats.url, "host": f"h{i}", "ack_wait_s": 2.0,
                                                "lease_ttl_s": 2}), show_progress=False) for i in range(2)]
        kills = 0

        def kill_the_poison_s_holder(sup: Supervisor) -> None:
            nonlocal kills
            lane = sup.inflight.holder(poison)
            for handle in list(sup.pool.processes.values()):
                if lane in handle.lanes and handle.process.is_alive():
                    os.kill(handle.process.pid, signal.SIGKILL)
                    handle.process.join()
                    kills += 1

        with sups[0].running(), sups[1].running():
            deadline = time.monotonic() + 90
            while len(ledger(nats.url)) < len(keys) and time.monotonic() < deadline:
                for sup in sups:
                    sup.step()
                    kill_the_poison_s_holder(sup)
    outcomes = {e.key: e.outcome.value for e in ledger(nats.url)}
    assert set(per_key(ledger(nats.url)).values()) == {1} and set(outcomes) == set(keys)
    assert outcomes[poison] == "failed_worker"
    assert all(outcomes[k] in ("inferred", "no_detection") for k in keys if k != poison)
    assert kills == 2, "max_attempts (3) counts the delivery its first holder lost"
    _, figures = read_cluster(sups[0].cfg.cluster)
    assert figures["stream_messages"] == 0 and figures["consumer_ack_pending"] == 0


def test_an_outcome_in_the_ledger_without_its_line_gets_it_at_the_host_s_next_start(make_config, store, prefix, nats,
                                                                                     monkeypatch, tmp_path):
    """The results write fails after the ledger write (as a SIGKILL between the two would leave it): the ledger
    counts the image as h0's and no host has its line. Started again, h0 writes the line and deletes the
    empty image before it takes new work; the redelivery is acked as counted, not analysed again."""
    from imgworker.errors import StateError
    from imgworker.supervisor import Supervisor

    [key] = images(store, prefix, 1)
    with AlgoService("synthetic", SyntheticParams(latency_ms=10.0, sigma=0.0, detection_rate=0.0)) as empty:
        cfg = make_config(worker={"count": 1}, algo={"endpoint": empty.endpoint}, actions={"delete_no_detection": True},
                          run={"state_dir": str(tmp_path / "h0"), "until_idle": False},
                          cluster={"url": nats.url, "host": "h0", "ack_wait_s": 2.0, "lease_ttl_s": 2})
        listed = lambda: {r.key for page in store.list_pages(prefix, 1000) for r in page}  # noqa: E731
        lines = lambda: [r.key for r in read_results(cfg.results_path)]  # noqa: E731
        first = Supervisor(cfg, show_progress=False)
        first.start()
        try:
            def disk_full(result: Any) -> int:
                raise StateError("results file cannot be written: no space left on device")

            assert first.journal is not None
            monkeypatch.setattr(first.journal, "write", disk_full)
            with pytest.raises(StateError):
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    first.step()
        finally:
            first.request_stop("the results file failed", force=True)
            first.shutdown()
        assert [(e.key, e.host) for e in ledger(nats.url)] == [(key, "h0")]
        assert lines() == [] and key in listed()

        again = Supervisor(cfg, show_progress=False)
        with again.running():
            assert lines() == [key], "journaled at start, before any new work"
            assert again.step_until(lambda: key not in listed() and read_cluster_figures(cfg)["stream_messages"] == 0,
                                    timeout_s=60)
        assert lines() == [key] and len(ledger(nats.url)) == 1
        assert calls_under(empty, prefix) == {key: 1}, "not analysed again"


def read_cluster_figures(cfg: Any) -> dict[str, int]:
    from imgworker.cluster.jetstream import read_cluster

    return read_cluster(cfg.cluster)[1]


# ----- the ledger names an object version ------------------------------------------------------------


def test_a_new_upload_under_an_analysed_name_is_a_new_image_and_a_redelivery_is_not(store_server, nats):
    from imgworker.cluster import object_version
    from imgworker.cluster.host import LedgerEntry
    from imgworker.cluster.jetstream import JetStreamLink, read_cluster
    from imgworker.config import ClusterConfig
    from imgworker.outcomes import ImageRef, Outcome

    cluster = ClusterConfig(url=nats.url, ack_wait_s=30.0)
    link = JetStreamLink(cluster, host="h0", bucket=store_server.bucket)
    link.start()

    def fetch_one() -> Any:
        got: list[Any] = []
        while not got:
            got = link.fetch(1)
        [delivery] = got
        return delivery

    try:
        while not link.leading():
            time.sleep(0.05)
        first = ImageRef(key="re/0001.jpg", size=10, mtime=1.0)
        assert link.publish([first]).sent == 1
        assert not fetch_one().counted
        entry = LedgerEntry(key=first.key, outcome=Outcome.INFERRED, host="h0", version="1000000-10")
        assert link.claim(first.key, object_version(first.mtime, first.size), msgspec.json.encode(entry))
        link.release([first.key])  # handed back before its ack: delivered again, and counted
        again = fetch_one()
        assert again.counted and again.delivered == 2
        link.settle(first.key)
        link.publish([first])  # the same version published again: stored once (Nats-Msg-Id)
        assert read_cluster(cluster)[1]["stream_messages"] == 0
        newer = ImageRef(key=first.key, size=12, mtime=2.0)  # uploaded again under the same name
        assert link.publish([newer]).sent == 1
        delivery = fetch_one()
        assert delivery.ref == newer and not delivery.counted, "a new version is analysed"
        link.settle(newer.key)
    finally:
        link.close()


# ----- the intake leader is fenced ------------------------------------------------------------------


def test_a_deposed_leader_publishes_nothing(store_server, nats):
    """A leader paused past its lease TTL resumes thinking it leads: its publish is refused, not stored."""
    from imgworker.cluster.jetstream import JetStreamLink, read_cluster
    from imgworker.config import ClusterConfig
    from imgworker.outcomes import ImageRef

    cluster = ClusterConfig(url=nats.url, lease_ttl_s=1)
    old, new = (JetStreamLink(cluster, host=name, bucket=store_server.bucket) for name in ("old", "new"))
    old.start()
    try:
        while not old.leading():
            time.sleep(0.05)
        for task in old._tasks:  # its renewals stop, as in a pause; its lease expires
            old._loop.call_soon_threadsafe(task.cancel)
        new.start()
        try:
            while not new.leading():
                time.sleep(0.05)
            old._lease_renewed = time.monotonic()  # it wakes up believing its lease is fresh
            done = old.publish([ImageRef(key="stale/0001.jpg")])
            assert done.deposed and done.sent == 0
            _, figures = read_cluster(cluster)
            assert figures["stream_messages"] == 0, "the deposed leader's write did not land"
            assert new.publish([ImageRef(key="fresh/0001.jpg")]).sent == 1
            assert read_cluster(cluster)[1]["stream_messages"] == 1
        finally:
            new.close()
    finally:
        old.close()


# ----- a three-node JetStream cluster loses a node ----------------------------------------------------


def stream_leader(url: str, stream: str) -> int:
    """The index of the node (named ``n<i>``) leading a stream of the JetStream cluster."""
    import asyncio

    import nats

    async def ask() -> str:
        nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=1)
        try:
            info = await nc.jetstream(timeout=3.0).stream_info(stream)
            return str(info.cluster.leader)
        finally:
            await nc.close()

    return int(asyncio.run(ask()).removeprefix("n"))


def test_a_node_of_a_three_node_jetstream_cluster_dies_and_nothing_is_lost(store_server, creds, store, prefix,
                                                                           slow_service, hosts, tmp_path):
    nodes = jetstream_cluster(str(tmp_path / "js"))
    try:
        for node in nodes:
            node.start()
        url = ",".join(node.url for node in nodes)
        wait_for_jetstream(nodes[0].url)
        keys = images(store, prefix, 30)
        env = env_for(store_server, creds, prefix, slow_service, url, IMGWORKER_CLUSTER_REPLICAS="3")
        hosts += [Host(f"h{i}", env, str(tmp_path / f"h{i}")) for i in range(2)]
        wait_for_ledger(nodes[0].url, 6, hosts=hosts)
        # the node leading the work stream dies: it has three copies, two remain, a quorum elects another leader
        victim = stream_leader(nodes[0].url, ClusterConfig(url=url).stream)
        nodes[victim].kill()
        alive = nodes[(victim + 1) % len(nodes)].url
        wait_for_ledger(alive, len(keys), hosts=hosts, timeout=120)
        assert stop_all(hosts) == [0, 0]
        assert_one_outcome_each(alive, keys, hosts)
        for host in hosts:
            assert "Traceback" not in host.log()
    finally:
        for node in nodes:
            node.stop()


# ----- the demo ------------------------------------------------------------------------------------------


def test_demo_with_two_hosts_prints_and_writes_the_cluster_report(tmp_path):
    path = tmp_path / "report.json"
    demo = subprocess.run([sys.executable, "-m", "imgworker", "demo", "--hosts", "2", "--backend", "synthetic",
                           "--duration", "4", "--rate", "4", "--workers", "1", "--data-dir", str(tmp_path / "demo"),
                           "--report-json", str(path)], capture_output=True, text=True, timeout=240)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "| host | images analysed |" in demo.stdout
    data = json.loads(path.read_text())
    assert data["conserved"] and data["scanned"] > 0
    assert sum(data["hosts"].values()) == data["scanned"] == sum(data["outcomes"].values())
    assert set(data["hosts"]) <= {"host-1", "host-2"}
