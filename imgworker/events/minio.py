"""The MinIO sources' shared part, bucket notifications, and the webhook source.

    MinIO ── webhook POST ─▶ _WebhookServer (a thread per connection) ─▶ parse_minio ─▶ wanted ─▶ pipe

MinIO never sends an acknowledged event again: the webhook answers 200 only once the batch is in
the pipe, and 503 to every POST once the stop began (MinIO keeps those in its ``queue_dir`` and sends
them again). The NATS source (``nats.py``) reads the same notification bodies. Keys arrive
URL-encoded with ``+`` for a space.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgspec

from ..config import Config, EventsConfig
from .messages import ChangeEvent, EventBatch, EventError, Pipe, WatcherReady, wanted

log = logging.getLogger(__name__)

MAX_WEBHOOK_BODY = 16 << 20
_CREATED = frozenset({"ObjectCreated:Put", "ObjectCreated:Post", "ObjectCreated:Copy",
                      "ObjectCreated:CompleteMultipartUpload"})


# --- MinIO: bucket notifications (webhook and NATS bodies are the same) ---------------------------

class _S3Bucket(msgspec.Struct):
    name: str


class _S3Object(msgspec.Struct):
    key: str
    size: int = 0  # omitted by MinIO for an empty object
    eTag: str = ""  # noqa: N815


class _S3(msgspec.Struct):
    bucket: _S3Bucket
    object: _S3Object


class _Record(msgspec.Struct):
    eventName: str  # noqa: N815
    s3: _S3
    eventTime: str = ""  # noqa: N815


class _NotificationLog(msgspec.Struct):
    Records: list[_Record]  # noqa: N815
    EventName: str = ""  # noqa: N815
    Key: str = ""  # noqa: N815


_minio_decoder = msgspec.json.Decoder(_NotificationLog)


def parse_minio(body: bytes, bucket: str) -> list[ChangeEvent]:
    """Objects created in ``bucket`` (Put, Post, Copy, CompleteMultipartUpload); EventError if malformed.

    Tagging, retention and legal-hold events are ``s3:ObjectCreated:*`` too, but change no content:
    they are skipped like deletes. Keys arrive URL-encoded with ``+`` for a space.
    """
    try:
        log_ = _minio_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise EventError(f"malformed bucket notification: {exc}") from exc
    out = []
    for record in log_.Records:
        if record.eventName.removeprefix("s3:") not in _CREATED or record.s3.bucket.name != bucket:
            continue
        ts_ns = _event_time_ns(record.eventTime)
        key = urllib.parse.unquote_plus(record.s3.object.key)
        out.append(ChangeEvent(key=key, size=record.s3.object.size, mtime=ts_ns / 1e9, ts_ns=ts_ns,
                               etag=record.s3.object.eTag.replace('"', "")))
    return out


def _event_time_ns(stamp: str) -> int:
    """``2024-01-01T00:00:00.123Z`` as epoch nanoseconds."""
    try:
        when = dt.datetime.fromisoformat(stamp)
    except ValueError as exc:
        raise EventError(f"malformed eventTime {stamp!r}") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return (when - _EPOCH) // dt.timedelta(microseconds=1) * 1000


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


# --- The MinIO webhook source ---------------------------------------------------------------------

class _WebhookServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], cfg: Config, token: str, pipe: Pipe) -> None:
        super().__init__(address, _WebhookHandler)
        self.cfg = cfg
        self.pipe = pipe
        # MinIO sends a token that already has a scheme ("Key Token") as it is, else "Bearer <token>".
        self.expected = "" if not token else token if len(token.split()) == 2 else f"Bearer {token}"

    def authorised(self, header: str) -> bool:
        return not self.expected or hmac.compare_digest(header.encode(), self.expected.encode())

    def deliver(self, body: bytes) -> int:
        """The HTTP status for one notification body: 200 only once its wanted events are in the pipe.

        503 once the stop began: MinIO keeps the event in its ``queue_dir`` and sends it again later.
        """
        if not self.pipe.open:
            return 503
        try:
            events = [e for e in parse_minio(body, self.cfg.store.bucket) if wanted(e, self.cfg)]
        except EventError as exc:
            log.warning("refused a notification: %s", exc)
            return 400
        if events and not self.pipe.send(EventBatch(events=events, ts_ns=max(e.ts_ns for e in events))):
            return 503
        return 200


class _WebhookHandler(BaseHTTPRequestHandler):
    server: _WebhookServer
    protocol_version = "HTTP/1.1"

    def do_HEAD(self) -> None:  # noqa: N802 (MinIO checks the target with HEAD)
        self._answer(200)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(200)

    def do_POST(self) -> None:  # noqa: N802
        status = self._refusal()
        if status:
            self._answer(status, close=True)
        else:
            length = int(self.headers["Content-Length"])
            self._answer(self.server.deliver(self.rfile.read(length)))

    def _refusal(self) -> int:
        """401 for a wrong token, 411/413 for a missing or huge body; 0 when the body may be read."""
        if not self.server.authorised(self.headers.get("Authorization", "")):
            return 401
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            return 411
        return 413 if int(length) > MAX_WEBHOOK_BODY else 0

    def _answer(self, status: int, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.debug("webhook: " + format, *args)


def run(cfg: Config, pipe: Pipe, since_ns: int, source: EventsConfig) -> None:
    """Serve the webhook until stopped; ``since_ns`` is unused (MinIO keeps what was not acknowledged)."""
    server = _WebhookServer((source.webhook_host, source.webhook_port), cfg, cfg.credentials.webhook_token, pipe)
    thread = threading.Thread(target=server.serve_forever, name="webhook", daemon=True)
    thread.start()
    try:
        if pipe.send(WatcherReady(port=int(server.server_address[1]))):
            log.info("webhook listening on %s:%d", source.webhook_host, server.server_address[1])
            pipe.wait_for_stop()
    finally:
        pipe.stop_sending()  # from here every POST is answered 503 (or finds no server): nothing more is acknowledged
        server.shutdown()
        server.server_close()

