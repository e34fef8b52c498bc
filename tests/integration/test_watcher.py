"""Watcher processes against the real SeaweedFS metadata tail and a real HTTP client posting MinIO events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from multiprocessing.connection import wait
from typing import Any

import msgspec
import psutil
import pytest
import requests

from imgworker.config import Config, Credentials, EventsConfig, load_config
from imgworker.events import EventBatch, Watcher, WatcherReady
from imgworker.ledger import Ledger, LocalBackend
from imgworker.logs import LogSettings
from imgworker.services.netutil import free_port, port_open, wait_until
from imgworker.services.store_server import EmbeddedStore
from imgworker.store import Store
from tests.support.cluster import NatsServer
from tests.support.store import upload

pytestmark = pytest.mark.slow


@pytest.fixture()
def cfg(store_server: EmbeddedStore, creds: Credentials, prefix: str) -> Config:
    overrides = {"store": {"endpoint": store_server.endpoint, "bucket": store_server.bucket, "prefix": prefix}}
    return msgspec.structs.replace(load_config(env={}, overrides=overrides), credentials=creds)


@pytest.fixture()
def bucket(cfg: Config, creds: Credentials) -> Store:
    return Store(cfg.store, creds)


@contextlib.contextmanager
def running(cfg: Config, since_ns: int, source: EventsConfig, token: str = "") -> Iterator[Watcher]:
    """A watcher of ``source`` (``token``: the webhook's or the NATS server's) that is always stopped and reaped."""
    cfg = msgspec.structs.replace(cfg, scan=msgspec.structs.replace(cfg.scan, events=source),
                                  credentials=msgspec.structs.replace(cfg.credentials, webhook_token=token))
    watcher = Watcher(cfg, LogSettings(level="INFO"), since_ns)
    try:
        yield watcher
    finally:
        watcher.stop()
        assert not watcher.alive()


def next_message(watcher: Watcher, timeout_s: float) -> Any:
    """The next message, or None after ``timeout_s``; fails if the watcher died."""
    wait(watcher.waitables(), timeout_s)
    if not watcher.alive() and not watcher.conn.poll():
        pytest.fail(f"the watcher exited with {watcher.exitcode()}")
    return watcher.poll()


def ready(watcher: Watcher) -> WatcherReady:
    message = next_message(watcher, 60.0)
    assert isinstance(message, WatcherReady)
    return message


def receive(watcher: Watcher, expected: set[str], *, quiet_s: float = 1.0,
            limit_s: float = 60.0) -> tuple[list[str], int]:
    """Keys received until all of ``expected`` came and then nothing for ``quiet_s``; and the last ts_ns."""
    keys: list[str] = []
    last_ts = 0
    deadline = time.monotonic() + limit_s
    quiet_until: float | None = None
    while time.monotonic() < deadline and (quiet_until is None or time.monotonic() < quiet_until):
        message = next_message(watcher, 0.1)
        if message is None:
            continue
        assert isinstance(message, EventBatch)
        assert message.ts_ns >= last_ts
        keys += [event.key for event in message.events]
        last_ts = message.ts_ns
        if quiet_until is None and expected <= set(keys):
            quiet_until = time.monotonic() + quiet_s
    return keys, last_ts


def the_tool(watcher: Watcher, not_pid: int = 0) -> psutil.Process:
    """The watcher's ``weed filer.meta.tail`` child (a new one when ``not_pid`` is given)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for child in psutil.Process(watcher.process.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if "filer.meta.tail" in child.cmdline() and child.pid != not_pid:
                    return child
        time.sleep(0.05)
    pytest.fail("the watcher did not start weed filer.meta.tail")


def image_keys(prefix: str, start: int, count: int) -> list[str]:
    odd = ["cam 1/ünï café 100%+{}.jpg", "cam+2/a%41 b/{}.png"]
    return [f"{prefix}" + (odd[i % 2].format(i) if i % 5 == 0 else f"cam-{i % 3}/task{i}/20240101-000000.{i:03d}.jpg")
            for i in range(start, start + count)]


@pytest.mark.timeout(180)
def test_seaweed_watcher_finds_new_images_and_resumes_without_a_gap(
        cfg: Config, bucket: Store, store_server: EmbeddedStore, prefix: str) -> None:
    source = EventsConfig(source="seaweed", filer=store_server.filer_address)
    first = image_keys(prefix, 0, 20)
    with running(cfg, 0, source) as watcher:
        assert ready(watcher).port == 0
        upload(bucket, first + [f"{prefix}cam-0/notes.txt", f"{prefix}cam-0/preview_0.jpg"])
        keys, last_ts = receive(watcher, set(first))
    assert set(keys) == set(first)
    assert last_ts > 0

    later = image_keys(prefix, 20, 5)
    upload(bucket, later)  # while no watcher runs
    with running(cfg, last_ts, source) as watcher:
        ready(watcher)
        keys, _ = receive(watcher, set(later))
    assert set(later) <= set(keys) <= set(first) | set(later)  # the overlap may repeat a few


@pytest.mark.timeout(180)
def test_the_tool_is_restarted_when_it_dies_and_dies_with_the_watcher(
        cfg: Config, bucket: Store, store_server: EmbeddedStore, prefix: str) -> None:
    with running(cfg, 0, EventsConfig(source="seaweed", filer=store_server.filer_address)) as watcher:
        ready(watcher)
        tool = the_tool(watcher)
        tool.kill()
        keys = image_keys(prefix, 0, 5)
        upload(bucket, keys)  # perhaps before the new tool starts: it resumes with overlap
        got, _ = receive(watcher, set(keys), quiet_s=0.2)
        assert set(got) == set(keys)
        second = the_tool(watcher, not_pid=tool.pid)
        os.kill(watcher.process.pid, signal.SIGKILL)
        _, alive = psutil.wait_procs([second], timeout=30)
        assert alive == []


# --- MinIO webhook ---------------------------------------------------------------------------------

def minio_body(event_name: str, bucket: str, key: str, size: int = 1234) -> bytes:
    """A body as MinIO's webhook target posts it (the key through Go's url.QueryEscape)."""
    record = {"eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "",
              "eventTime": "2024-05-01T10:00:00.250Z", "eventName": event_name,
              "userIdentity": {"principalId": "minioadmin"},
              "requestParameters": {"principalId": "minioadmin", "region": "", "sourceIPAddress": "127.0.0.1"},
              "responseElements": {"x-amz-request-id": "17CB0D5A1E1E5C4A",
                                   "x-minio-origin-endpoint": "http://127.0.0.1:9000"},
              "s3": {"s3SchemaVersion": "1.0", "configurationId": "Config",
                     "bucket": {"name": bucket, "ownerIdentity": {"principalId": "minioadmin"},
                                "arn": f"arn:aws:s3:::{bucket}"},
                     "object": {"key": urllib.parse.quote_plus(key, safe=""), "size": size,
                                "eTag": "0f343b0931126a20f133d67c2b018a3b", "contentType": "image/jpeg",
                                "sequencer": "17CB0D5A1E2B7E10"}},
              "source": {"host": "127.0.0.1", "port": "", "userAgent": "MinIO (linux; amd64) minio-go/v7.0.70"}}
    return json.dumps({"EventName": event_name, "Key": f"{bucket}/{key}", "Records": [record]}).encode()


@pytest.fixture()
def plain_cfg(prefix: str) -> Config:
    """For sources that never touch the store: bucket "frames"."""
    return load_config(env={}, overrides={"store": {"bucket": "frames", "prefix": prefix}})


TOKEN = "tok-" + "x" * 20
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


@pytest.mark.timeout(60)
def test_webhook_takes_minio_notifications_only_with_the_token(plain_cfg: Config, prefix: str) -> None:
    with running(plain_cfg, 0, EventsConfig(source="minio_webhook"), token=TOKEN) as watcher:
        url = f"http://127.0.0.1:{ready(watcher).port}/minio/events"
        assert requests.head(url, timeout=10).status_code == 200  # MinIO's check that the target is up
        assert requests.get(url, timeout=10).status_code == 200
        image = f"{prefix}cam 1/ünï 100%+a.jpg"
        for body in (minio_body("s3:ObjectCreated:Put", "frames", image),
                     minio_body("s3:ObjectCreated:Put", "frames", f"{prefix}cam 1/notes.txt"),
                     minio_body("s3:ObjectRemoved:Delete", "frames", f"{prefix}cam 1/old.jpg"),
                     minio_body("s3:ObjectCreated:Put", "other", f"{prefix}cam 1/b.jpg")):
            assert requests.post(url, data=body, headers=AUTH, timeout=10).status_code == 200
        message = next_message(watcher, 10.0)
        assert isinstance(message, EventBatch)
        assert [(e.key, e.size) for e in message.events] == [(image, 1234)]

        body = minio_body("s3:ObjectCreated:Put", "frames", f"{prefix}x.jpg")
        assert requests.post(url, data=body, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
        assert requests.post(url, data=body, timeout=10).status_code == 401
        assert requests.post(url, data=b'{"Records": [', headers=AUTH, timeout=10).status_code == 400
        assert requests.post(url, data=b"[]", headers=AUTH, timeout=10).status_code == 400
        assert next_message(watcher, 0.5) is None  # nothing refused reached the pipe


@pytest.mark.timeout(60)
def test_webhook_posts_from_many_connections_all_arrive(plain_cfg: Config, prefix: str) -> None:
    keys = [f"{prefix}cam-{t}/{i:03d}.jpg" for t in range(8) for i in range(25)]
    statuses: list[int] = []
    with running(plain_cfg, 0, EventsConfig(source="minio_webhook")) as watcher:  # no token: no check
        url = f"http://127.0.0.1:{ready(watcher).port}/"

        def post(thread: int) -> None:
            with requests.Session() as session:
                for key in keys[thread * 25:(thread + 1) * 25]:
                    event = "s3:ObjectCreated:CompleteMultipartUpload" if thread % 2 else "s3:ObjectCreated:Put"
                    statuses.append(session.post(url, data=minio_body(event, "frames", key), timeout=10).status_code)

        threads = [threading.Thread(target=post, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        received, _ = receive(watcher, set(keys), quiet_s=0.2)
        for thread in threads:
            thread.join()
    assert statuses == [200] * len(keys)
    assert sorted(received) == sorted(keys)


@pytest.mark.timeout(120)
def test_a_stop_saves_every_event_the_webhook_acknowledged_and_posts_after_it_began_are_refused(
        make_config: Callable[..., Config], store_server: EmbeddedStore, prefix: str) -> None:
    from imgworker.supervisor import Supervisor

    port = free_port()
    base = make_config(run={"until_idle": False})
    scan = msgspec.structs.replace(base.scan, mode="events", reconcile_interval_s=3600.0,
                                   events=EventsConfig(source="minio_webhook", webhook_port=port))
    cfg = msgspec.structs.replace(base, scan=scan,
                                  credentials=msgspec.structs.replace(base.credentials, webhook_token=TOKEN))
    url = f"http://127.0.0.1:{port}/"
    acked: list[str] = []
    after_stop: list[int] = []  # statuses of POSTs begun once the stop was over (0: no answer)
    stopped, enough = threading.Event(), threading.Event()

    def post_until_enough() -> None:
        with requests.Session() as session:
            for i in range(100_000):
                if enough.is_set():
                    return
                key, late = f"{prefix}cam-2/{i:05d}.jpg", stopped.is_set()
                try:
                    status = session.post(url, data=minio_body("s3:ObjectCreated:Put", cfg.store.bucket, key),
                                          headers=AUTH, timeout=10).status_code
                except requests.ConnectionError:
                    status = 0
                if status == 200:
                    acked.append(key)
                if late:
                    after_stop.append(status)
                    if len(after_stop) >= 3:
                        enough.set()

    sup = Supervisor(cfg, show_progress=False)
    sup.start()
    poster = threading.Thread(target=post_until_enough)
    try:
        wait_until(lambda: port_open("127.0.0.1", port), timeout_s=60, what="the webhook", alive=lambda: True)
        poster.start()  # the supervisor reads nothing meanwhile: acknowledged batches wait in the pipe
        wait_until(lambda: len(acked) >= 30, timeout_s=60, what="acknowledged POSTs", alive=poster.is_alive)
        sup.request_stop("test", force=True)
        sup.shutdown()  # POSTs keep coming while it stops
        stopped.set()
        poster.join(30)
        assert enough.is_set(), "the poster is stuck"
    finally:
        enough.set()
        if poster.is_alive():
            poster.join()
        if sup.journal is not None and not sup.journal.closed:
            sup.shutdown()
    assert 200 not in after_stop  # MinIO keeps those in its queue_dir and sends them again
    restored = Ledger(os.path.join(cfg.run.state_dir, "state.json"), cfg.results_path, LocalBackend()).start()
    saved = set(restored.intake.backlog) | set(restored.pending)  # what the next start takes in again
    assert set(acked) <= saved, f"{len(set(acked) - saved)} of {len(acked)} acknowledged events are not saved"


# --- MinIO through NATS JetStream ------------------------------------------------------------------

@pytest.fixture()
def nats_server(tmp_path: Any) -> Iterator[NatsServer]:
    """nats-server with a stream "MINIO" on subject minio.events; always stopped."""
    server = NatsServer(str(tmp_path))
    try:
        server.start()
        jetstream(server.url, lambda js: js.add_stream(name="MINIO", subjects=["minio.events"]))
        yield server
    finally:
        server.stop()


def jetstream(url: str, action: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``action(jetstream context)`` on a connection of its own."""
    import nats

    async def main() -> Any:
        nc = await nats.connect(url)
        try:
            return await action(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(main())


def publish(url: str, bodies: list[bytes]) -> None:
    """As MinIO's NATS target does with ``jetstream on``: one JetStream publish per event."""
    async def each(js: Any) -> None:
        for body in bodies:
            await js.publish("minio.events", body)

    jetstream(url, each)


@pytest.mark.timeout(120)
def test_nats_consumer_takes_minio_events_acks_them_and_resumes_from_its_durable(
        nats_server: NatsServer, plain_cfg: Config, prefix: str) -> None:
    url = nats_server.url
    source = EventsConfig(source="minio_nats", nats_url=url, nats_subject="minio.events",
                          nats_durable="imgworker-test")
    first = [f"{prefix}cam-{i % 3}/ünï {i:03d}+%.jpg" for i in range(20)]
    others = [minio_body("s3:ObjectCreated:Put", "frames", f"{prefix}cam-0/notes.txt"),
              minio_body("s3:ObjectRemoved:Delete", "frames", f"{prefix}cam-0/old.jpg"),
              minio_body("s3:ObjectCreated:Put", "other", f"{prefix}cam-0/x.jpg"), b"not json"]
    with running(plain_cfg, 0, source) as watcher:
        ready(watcher)
        publish(url, [minio_body("s3:ObjectCreated:Put", "frames", key) for key in first] + others)
        keys, _ = receive(watcher, set(first))
    assert sorted(keys) == sorted(first)

    later = [f"{prefix}cam-1/later-{i}.jpg" for i in range(5)]
    publish(url, [minio_body("s3:ObjectCreated:CompleteMultipartUpload", "frames", key) for key in later])
    with running(plain_cfg, 0, source) as watcher:  # the durable consumer, not since_ns, says where to resume
        ready(watcher)
        keys, _ = receive(watcher, set(later))
    assert sorted(keys) == sorted(later)  # what was acknowledged does not come again
    info = jetstream(url, lambda js: js.consumer_info("MINIO", "imgworker-test"))
    assert (info.num_pending, info.num_ack_pending) == (0, 0)


@pytest.mark.timeout(120)
def test_nats_consumer_connects_again_after_the_server_restarts(
        nats_server: NatsServer, plain_cfg: Config, prefix: str) -> None:
    source = EventsConfig(source="minio_nats", nats_url=nats_server.url, nats_durable="imgworker-restart")
    keys = [f"{prefix}cam-2/{i:03d}.jpg" for i in range(10)]
    with running(plain_cfg, 0, source) as watcher:
        ready(watcher)
        nats_server.restart()
        publish(nats_server.url, [minio_body("s3:ObjectCreated:Put", "frames", key) for key in keys])
        got, _ = receive(watcher, set(keys), quiet_s=0.2)
    assert sorted(got) == sorted(keys)
