"""MinIO's bucket notifications, as the intake leader republishes them to the work stream.

    MinIO ── its JetStream stream (no Nats-Msg-Id, one subject, keys URL-escaped)
          ─▶ the leader's durable pull consumer (JetStreamLink._republish_events, on the link's loop)
          ─▶ MinioRecords.refs: parse_minio ─▶ wanted ─▶ select_images (task fields), ETag kept
          ─▶ [lease CAS] ─▶ work stream (Nats-Msg-Id bucket/key@etag) ─▶ PubAck ─▶ ack MinIO's message

This module only decides what a record means; ``JetStreamLink`` talks to the server. A record of
a delete, of another bucket, or of an object a listing would not select is not wanted: its
message is acked without a publish. A body that is not a notification is termed.
"""

from __future__ import annotations

from ..config import Config
from ..events.messages import wanted
from ..events.minio import parse_minio
from ..outcomes import ImageRef
from ..scanner import select_images


class MinioRecords:
    """Turns one MinIO notification body into the images to publish (``EventError`` if malformed)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @property
    def subject(self) -> str:
        return self.cfg.scan.events.nats_subject

    @property
    def stream(self) -> str:
        """MinIO's stream as configured; empty: the one holding ``subject``."""
        return self.cfg.scan.events.nats_stream

    @property
    def durable(self) -> str:
        return self.cfg.scan.events.nats_durable

    def refs(self, body: bytes) -> list[ImageRef]:
        events = [e for e in parse_minio(body, self.cfg.store.bucket) if wanted(e, self.cfg)]
        found = [ImageRef(key=e.key, size=e.size, mtime=e.mtime, etag=e.etag) for e in events]
        return select_images(found, prefix=self.cfg.store.prefix, cfg=self.cfg.scan)
