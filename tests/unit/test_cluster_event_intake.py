"""Cluster mode with MinIO's events: one version per upload whichever path found it; the leader's republish rules.

The republish rules are checked on ``JetStreamLink._republish`` with stand-ins for the MinIO
messages and the work stream: a MinIO message is acked only after every image it names was
stored in the work stream, a full stream naks it (never acks it), a deposed leader publishes
nothing and hands every message back; the lease is renewed by one CAS at a time.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from typing import Any

import msgspec
import pytest

from imgworker.cluster import image_version, ledger_key, object_version
from imgworker.cluster.events import MinioRecords
from imgworker.cluster.jetstream import JetStreamLink
from imgworker.config import load_config
from imgworker.errors import ConfigError
from imgworker.events.messages import ChangeEvent
from imgworker.listing import AnswerMemo
from imgworker.outcomes import ImageRef
from imgworker.scanner import select_images

BUCKET = "pics"
PREFIX = "in/"
ETAG = "9b2cf535f27731c974343645a3985328"


def cfg(**scan: Any) -> Any:
    return load_config(env={}, overrides={"store": {"bucket": BUCKET, "prefix": PREFIX},
                                          "cluster": {"url": "nats://127.0.0.1:4222", "max_msgs": 10},
                                          "scan": {"mode": "events", "events": {"source": "minio_nats"}, **scan}})


def record(key: str, *, event: str = "s3:ObjectCreated:Put", etag: str = ETAG, bucket: str = BUCKET,
           when: str = "2026-11-29T10:00:03.917Z", size: int = 11) -> dict[str, Any]:
    """One record as MinIO writes it: the key through Go's url.QueryEscape (space as +), the ETag unquoted."""
    return {"eventVersion": "2.0", "eventSource": "minio:s3", "eventTime": when, "eventName": event,
            "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
                   "object": {"key": urllib.parse.quote_plus(key, safe=""), "size": size, "eTag": etag,
                              "contentType": "image/jpeg", "sequencer": "17CB0D5A1E2B7E10"}}}


def body(*records: dict[str, Any]) -> bytes:
    first = records[0]
    return json.dumps({"EventName": first["eventName"], "Key": f"{BUCKET}/x", "Records": list(records)}).encode()


def listing_page(key: str, *, etag: str = ETAG, modified: str = "2026-11-29T10:00:02.000Z") -> bytes:
    """One ListObjectsV2 page (encoding-type url), ETag quoted as S3 gives it."""
    return (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<Name>{BUCKET}</Name><Prefix>{PREFIX}</Prefix><KeyCount>1</KeyCount><MaxKeys>1000</MaxKeys>"
            f"<EncodingType>url</EncodingType><IsTruncated>false</IsTruncated><Contents>"
            f"<Key>{urllib.parse.quote(key)}</Key><LastModified>{modified}</LastModified>"
            f"<ETag>&quot;{etag}&quot;</ETag><Size>11</Size><StorageClass>STANDARD</StorageClass></Contents>"
            f"</ListBucketResult>").encode()


# ----- one version per upload ------------------------------------------------------------------


@pytest.mark.parametrize("key", ["in/person/cam 1/a+b.jpg", "in/person/cam1/caf\u00e9 \u00fcber.jpg",
                                 "in/p/c/0001.jpg"])
def test_an_upload_seen_by_its_event_and_by_a_sweep_has_one_ledger_key(key):
    config = cfg()
    [by_event] = MinioRecords(config).refs(body(record(key)))
    answer = AnswerMemo().read(listing_page(key))
    [by_sweep] = select_images(answer.refs, prefix=PREFIX, cfg=config.scan)
    assert by_event.key == by_sweep.key == key
    assert by_event.mtime != by_sweep.mtime, "the event's time is not the listed LastModified"
    assert image_version(by_event) == image_version(by_sweep) == ETAG
    assert ledger_key(BUCKET, key, image_version(by_event)) == ledger_key(BUCKET, key, image_version(by_sweep))
    assert (by_event.task_type, by_event.task_id) == (by_sweep.task_type, by_sweep.task_id)


def test_a_new_upload_under_the_same_name_is_a_new_version():
    [first] = MinioRecords(cfg()).refs(body(record("in/p/c/1.jpg")))
    [second] = MinioRecords(cfg()).refs(body(record("in/p/c/1.jpg", etag="0f343b0931126a20f133d67c2b018a3b")))
    assert image_version(first) != image_version(second)


def test_a_ref_without_etag_keeps_the_listed_mtime_size_version():
    ref = ImageRef(key="in/p/c/1.jpg", size=10, mtime=1.5)
    assert image_version(ref) == object_version(1.5, 10)
    assert image_version(ImageRef(key="k", etag='"abc"')) == "abc"


def test_refs_and_events_encoded_before_the_etag_field_still_decode():
    old_ref = msgspec.msgpack.encode(["in/p/c/1.jpg", "p", "c", 10, 1.5])  # a work message or checkpoint of before
    assert msgspec.msgpack.decode(old_ref, type=ImageRef) == ImageRef("in/p/c/1.jpg", "p", "c", 10, 1.5)
    old_event = msgspec.msgpack.encode(["in/p/c/1.jpg", 10, 1.5, 7])
    assert msgspec.msgpack.decode(old_event, type=ChangeEvent).etag == ""


def test_only_wanted_creations_of_the_bucket_become_images():
    records = MinioRecords(cfg())
    assert records.refs(body(record("in/p/c/1.jpg", event="s3:ObjectRemoved:Delete"))) == []
    assert records.refs(body(record("in/p/c/1.jpg", bucket="other"))) == []
    assert records.refs(body(record("elsewhere/p/c/1.jpg"))) == []
    assert records.refs(body(record("in/p/c/notes.txt"))) == []
    [ref] = records.refs(body(record("in/p/c/1.jpg", event="s3:ObjectCreated:CompleteMultipartUpload")))
    assert ref.etag == ETAG


def test_events_mode_in_a_cluster_takes_minio_s_stream_only():
    assert cfg().scan.mode == "events"
    with pytest.raises(ConfigError, match=r"scan\.events\.source"):
        load_config(env={}, overrides={"cluster": {"url": "nats://n:4222"},
                                       "scan": {"mode": "events", "events": {"source": "minio_webhook"}}})


# ----- the leader's republish ------------------------------------------------------------------


class FakeMessage:
    def __init__(self, data: bytes, log: list[tuple[str, Any]]) -> None:
        self.data = data
        self.log = log

    async def ack(self) -> None:
        self.log.append(("ack", self.data))

    async def nak(self, delay: float | None = None) -> None:
        self.log.append(("nak", self.data))

    async def term(self) -> None:
        self.log.append(("term", self.data))


class FakeWorkStream:
    """The work stream: stores up to ``room`` messages, then refuses as a full stream with discard new does."""

    def __init__(self, log: list[tuple[str, Any]], room: int) -> None:
        self.log = log
        self.room = room

    async def publish(self, subject: str, payload: bytes, *, headers: dict[str, str], stream: str) -> Any:
        import nats.js.errors

        if self.room <= 0:
            raise nats.js.errors.APIError(code=503, err_code=10077, description="maximum messages exceeded")
        self.room -= 1
        self.log.append(("stored", headers["Nats-Msg-Id"]))
        return type("PubAck", (), {"seq": 100 - self.room, "duplicate": False})()


def republish(messages: list[bytes], *, room: int = 100, revision: int = 7,
              link: JetStreamLink | None = None) -> tuple[list[tuple[str, Any]], bool]:
    config = cfg()
    log: list[tuple[str, Any]] = []
    link = link or JetStreamLink(config.cluster, host="h0", bucket=BUCKET)
    link._js = FakeWorkStream(log, room)

    async def cas() -> int:
        log.append(("cas", revision))
        return revision

    link._renew_lease = cas  # type: ignore[method-assign]
    fakes = [FakeMessage(m, log) for m in messages]
    going_on = asyncio.run(link._republish(MinioRecords(config), fakes))
    return log, going_on


def test_a_minio_message_is_acked_only_after_its_images_are_stored():
    two = body(record("in/p/c/1.jpg"), record("in/p/c/2 x.jpg", etag="e2"))
    log, going_on = republish([two])
    assert going_on
    assert log == [("cas", 7), ("stored", f"{BUCKET}/in/p/c/1.jpg@{ETAG}"), ("stored", f"{BUCKET}/in/p/c/2 x.jpg@e2"),
                   ("ack", two)]


def test_what_the_events_publish_is_known_to_the_leader_as_published_with_its_sequence():
    """Else its sweeps take those images in again (the cleaner would think them unpublished; a second message
    beyond the duplicate window), and the cleaner's fence would not know their messages."""
    from imgworker.cluster.host import ClusterHost

    config = cfg()
    link = JetStreamLink(config.cluster, host="h0", bucket=BUCKET)
    two = body(record("in/p/c/1.jpg", etag="e1"), record("in/p/c/2.jpg", etag="e2"))
    republish([two], link=link)
    assert link.sequences == {"in/p/c/1.jpg": 1, "in/p/c/2.jpg": 2}
    assert [ref.etag for ref in link.events_published] == ["e1", "e2"]
    host = ClusterHost(config, link=link)
    assert host.published("in/p/c/1.jpg") and host.published("in/p/c/2.jpg")
    assert not host.published("in/p/c/3.jpg")


def test_a_full_work_stream_naks_the_rest_and_acks_none_of_them():
    one, two, three = (body(record(f"in/p/c/{i}.jpg", etag=f"e{i}")) for i in (1, 2, 3))
    log, going_on = republish([one, two, three], room=1)
    assert not going_on, "the leader stops fetching a while"
    assert log == [("cas", 7), ("stored", f"{BUCKET}/in/p/c/1.jpg@e1"), ("ack", one), ("nak", two), ("nak", three)]


def test_a_deposed_leader_publishes_nothing_and_hands_every_message_back():
    one, two = (body(record(f"in/p/c/{i}.jpg", etag=f"e{i}")) for i in (1, 2))
    log, _ = republish([one, two], revision=0)
    assert log == [("cas", 0), ("nak", one), ("nak", two)]


def test_unwanted_notifications_are_acked_and_malformed_ones_termed():
    delete = body(record("in/p/c/1.jpg", event="s3:ObjectRemoved:Delete"))
    log, _ = republish([delete, b'{"Records": ['])
    assert log == [("cas", 7), ("ack", delete), ("term", b'{"Records": [')]


@pytest.mark.parametrize("key", ["in/person/cam 1/a+b.jpg", "in/p/c/0001.jpg"])
def test_a_sweep_and_an_event_publish_one_upload_under_one_message_id(key):
    """The work stream's duplicate window drops the second publish only if both name the same Nats-Msg-Id."""
    config = cfg()
    [by_event] = MinioRecords(config).refs(body(record(key)))
    [by_sweep] = select_images(AnswerMemo().read(listing_page(key)).refs, prefix=PREFIX, cfg=config.scan)
    log: list[tuple[str, Any]] = []
    link = JetStreamLink(config.cluster, host="h0", bucket=BUCKET)

    class Stream(FakeWorkStream):
        async def publish(self, subject: str, payload: bytes, *, headers: dict[str, str], stream: str) -> Any:
            await super().publish(subject, payload, headers=headers, stream=stream)
            return type("PubAck", (), {"seq": len(log), "duplicate": None})()

    link._js = Stream(log, room=10)

    async def cas() -> int:
        return 7

    link._renew_lease = cas  # type: ignore[method-assign]
    assert asyncio.run(link._publish([by_sweep])).sent == 1
    asyncio.run(link._republish(MinioRecords(config), [FakeMessage(body(record(key)), log)]))
    ids = [entry for kind, entry in log if kind == "stored"]
    assert ids == [f"{BUCKET}/{key}@{ETAG}"] * 2 and by_event.etag == by_sweep.etag == ETAG


def test_a_failed_publish_hands_the_message_and_the_rest_back_unacked():
    """A publish refused for another reason than a full stream (or a lost connection): nothing is acked unpublished."""
    import nats.js.errors

    one, two = (body(record(f"in/p/c/{i}.jpg", etag=f"e{i}")) for i in (1, 2))
    config = cfg()
    log: list[tuple[str, Any]] = []
    link = JetStreamLink(config.cluster, host="h0", bucket=BUCKET)

    class Refusing:
        async def publish(self, subject: str, payload: bytes, *, headers: dict[str, str], stream: str) -> None:
            raise nats.js.errors.APIError(code=500, err_code=10999, description="stream store failed")

    link._js = Refusing()

    async def cas() -> int:
        return 7

    link._renew_lease = cas  # type: ignore[method-assign]
    with pytest.raises(nats.js.errors.APIError):
        asyncio.run(link._republish(MinioRecords(config), [FakeMessage(m, log) for m in (one, two)]))
    assert log == [("nak", one), ("nak", two)]


def test_lease_renewals_from_two_tasks_at_once_do_not_depose_the_leader():
    """The lease keeper and the events' fence both renew: a CAS on a revision the other just replaced would fail."""
    import nats.js.errors

    class Lease:
        def __init__(self) -> None:
            self.seq = 3

        async def publish(self, subject: str, payload: bytes, *, headers: dict[str, str], msg_ttl: int) -> Any:
            expected = int(headers["Nats-Expected-Last-Subject-Sequence"])
            await asyncio.sleep(0.01)  # the round trip: the other task runs meanwhile
            if expected != self.seq:
                raise nats.js.errors.APIError(code=400, err_code=10071, description="wrong last sequence")
            self.seq += 1
            return type("Ack", (), {"seq": self.seq})()

    link = JetStreamLink(cfg().cluster, host="h0", bucket=BUCKET)
    link._js = Lease()
    link.lease_revision = 3

    async def both() -> list[int]:
        return list(await asyncio.gather(link._renew_lease(), link._renew_lease()))

    assert asyncio.run(both()) == [4, 5]
    assert link.lease_revision == 5


# ----- two versions of one name on one host ---------------------------------------------------------


class Delivered(FakeMessage):
    """A work message as a fetch returns it: the image, its stream sequence, how often it was delivered."""

    def __init__(self, ref: ImageRef, seq: int, log: list[tuple[str, Any]]) -> None:
        super().__init__(msgspec.msgpack.encode(ref), log)
        self.seq = seq
        self.metadata = type("Meta", (), {"num_delivered": 1})()

    async def ack(self) -> None:
        self.log.append(("ack", self.seq))

    async def nak(self, delay: float | None = None) -> None:
        self.log.append(("nak", self.seq))

    async def in_progress(self) -> None:
        self.log.append(("progress", self.seq))


def test_a_new_upload_under_a_name_this_host_holds_is_neither_swallowed_nor_acked_with_the_old_one():
    """The events publish every upload: v2 of a name may be delivered to the host still working on v1.
    v1's outcome must ack v1's message only; v2's comes again (to this host or another) and is analysed."""
    import nats.js.errors

    log: list[tuple[str, Any]] = []
    key = "in/p/c/1.jpg"
    batches = [[Delivered(ImageRef(key=key, etag="v1"), 1, log)], [Delivered(ImageRef(key=key, etag="v2"), 2, log)]]

    class Sub:
        async def fetch(self, n: int, timeout: float) -> list[Any]:
            return batches.pop(0)

    class Ledger:
        async def get(self, key: str) -> Any:
            raise nats.js.errors.KeyNotFoundError

    link = JetStreamLink(cfg().cluster, host="h0", bucket=BUCKET)
    link._sub, link._ledger = Sub(), Ledger()

    async def run() -> tuple[list[Any], list[Any]]:
        first, second = await link._fetch(1), await link._fetch(1)
        await link._settle(key, term=False)  # v1's outcome is in the ledger
        return first, second

    first, second = asyncio.run(run())
    assert [image_version(d.ref) for d in first] == ["v1"]
    assert ("ack", 2) not in log, "v2's message is not acked by v1's outcome"
    assert ("ack", 1) in log and ("nak", 2) in log, "v1 acked; v2 handed back to come again"
