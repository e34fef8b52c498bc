"""Change events: new images found from the store's own notifications instead of re-listing the bucket.

    SeaweedFS filer ── weed filer.meta.tail ─stdout─▶ split_objects ─▶ seaweed_change ─┐
    MinIO ── webhook POST ─▶ _WebhookServer ─▶ parse_minio ─────────────────────────────┼─▶ wanted() ─▶ pipe
    MinIO ── NATS JetStream (durable pull consumer) ─▶ parse_minio ─────────────────────┘   (EventBatch)

The watcher process runs one source and sends ``EventBatch`` messages to the supervisor, after
one ``WatcherReady`` at start. Each batch carries ``ts_ns``, the position to resume from: every
event up to it has been sent, in this batch or an earlier one. The SeaweedFS source resumes from
a position with ``-timeAgo`` and overlaps by ``OVERLAP_NS``, so an event may arrive twice (the
supervisor's processed set absorbs repeats, and keeps a finished key while a replay can reach it);
when only events it does not want went by, or none for ``QUIET_S``, it sends an empty batch now and
then so the position moves on.

Acknowledged means durable. MinIO never sends an acknowledged event again, so a webhook answers
200, and the NATS source acks, only once the batch is in the pipe; the supervisor reads the pipe
to its end in every case, into the backlog that its checkpoint saves:
  - stop: the supervisor sends STOP; the source stops acknowledging first (the webhook answers 503
    to every later POST, which MinIO keeps in its ``queue_dir`` and sends again; NATS naks what it
    fetched but could not put in the pipe), the SeaweedFS source sends what its batcher holds; the
    process exits, and ``Watcher.stop`` hands every message read until the pipe ends to its caller;
  - death: what a dead watcher sent is read the same way before it is replaced;
  - crash of the supervisor: events acknowledged before a checkpoint are covered by the start-up
    full listing (the first sweep after every start lists the whole prefix).
What was not acknowledged, MinIO (with ``queue_dir``) or JetStream sends again.

Keys are exactly the S3 keys. SeaweedFS's S3 gateway keeps multipart parts under the bucket's
``.uploads/`` folder; those are not objects and are skipped. Deletes and directories are skipped.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hmac
import importlib.util
import logging
import os
import queue
import signal
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar

import msgspec

from .backoff import Backoff
from .children import ChildHandle, child_setup, die_with_parent
from .config import Config
from .errors import ImgworkerError
from .logs import LogSettings
from .scanner import is_image

if TYPE_CHECKING:
    import asyncio

    from nats.js.api import ConsumerConfig
    from nats.js.client import JetStreamContext

log = logging.getLogger(__name__)
_T = TypeVar("_T")

MAX_BATCH_EVENTS = 256
MAX_BATCH_WAIT_S = 0.05
PROGRESS_INTERVAL_S = 1.0  # an empty batch that only moves the resume position, at most this often
OVERLAP_NS = 2_000_000_000  # replay this much before the resume position: clock skew, the tool's start-up
#: the tool running and silent this long: every event older than that has come (it sends in time order),
#: so the resume position moves to now less this, and a restart does not replay old events of an idle bucket
QUIET_S = 10.0
RESTART_BACKOFF_S = (0.5, 10.0)  # first wait and cap before the tail tool (or a NATS connection) is tried again
MAX_WEBHOOK_BODY = 16 << 20
_UPLOADS_DIR = ".uploads/"  # SeaweedFS's multipart staging folder inside a bucket
_CREATED = frozenset({"ObjectCreated:Put", "ObjectCreated:Post", "ObjectCreated:Copy",
                      "ObjectCreated:CompleteMultipartUpload"})


class EventError(ImgworkerError):
    """A change-event payload could not be understood."""


class ChangeEvent(msgspec.Struct, frozen=True, array_like=True):
    """One object created or overwritten: its S3 key, size, upload time, and the event's own time."""

    key: str
    size: int
    mtime: float
    ts_ns: int


class WatchSource(msgspec.Struct, frozen=True, kw_only=True):
    """Where the watcher gets its events; ``token`` and a password in ``nats_url`` never show in its repr."""

    kind: Literal["seaweed", "minio_webhook", "minio_nats"]
    filer: str = ""  # seaweed: host:httpport.grpcport
    host: str = "127.0.0.1"  # webhook: where to listen
    port: int = 0  # webhook: 0 = any free port (WatcherReady says which)
    token: str = ""  # webhook: MinIO's auth_token (empty = no check); NATS: the server's auth token
    nats_url: str = "nats://127.0.0.1:4222"
    subject: str = "minio.events"  # NATS: the subject MinIO publishes to (its ``subject`` setting)
    stream: str = ""  # NATS: the JetStream stream; empty = the one holding ``subject``
    durable: str = "imgworker"  # NATS: the durable consumer, which keeps the position

    def __repr__(self) -> str:
        url = urllib.parse.urlsplit(self.nats_url)
        nats_url = url._replace(netloc=f"***@{url.hostname}:{url.port}").geturl() if url.password else self.nats_url
        return (f"WatchSource(kind={self.kind!r}, filer={self.filer!r}, host={self.host!r}, port={self.port!r}, "
                f"token={'***' if self.token else ''!r}, nats_url={nats_url!r}, subject={self.subject!r}, "
                f"stream={self.stream!r}, durable={self.durable!r})")

    __str__ = __repr__


class EventBatch(msgspec.Struct, tag="batch", array_like=True):
    """Wanted events, and the position to resume from (every event up to ``ts_ns`` has been sent)."""

    events: list[ChangeEvent]
    ts_ns: int


class WatcherReady(msgspec.Struct, tag="ready", array_like=True):
    """Sent once at start; ``port`` is the webhook's bound port (0 for SeaweedFS)."""

    port: int


WatcherMessage = EventBatch | WatcherReady
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(WatcherMessage)


# --- SeaweedFS: weed filer.meta.tail --------------------------------------------------------------

class _Attributes(msgspec.Struct):
    fileSize: int = 0  # noqa: N815 (the tool's field names)
    mtime: int = 0
    mtimeNs: int = 0  # noqa: N815


class _Entry(msgspec.Struct):
    name: str = ""
    isDirectory: bool = False  # noqa: N815
    attributes: _Attributes = msgspec.field(default_factory=_Attributes)


class _Notification(msgspec.Struct):
    oldEntry: _Entry | None = None  # noqa: N815
    newEntry: _Entry | None = None  # noqa: N815
    newParentPath: str = ""  # noqa: N815


class MetaEvent(msgspec.Struct):
    """The fields of one ``filer.meta.tail`` object that say what changed (numbers come as strings)."""

    directory: str = ""
    eventNotification: _Notification | None = None  # noqa: N815
    tsNs: int = 0  # noqa: N815


_meta_decoder = msgspec.json.Decoder(MetaEvent, strict=False)  # lax: "123" decodes as 123


def split_objects(stream: IO[bytes]) -> Iterator[bytes]:
    """Cut the tool's output into JSON objects: each starts with a line ``{`` and ends with a line ``}``.

    Nested braces are indented and JSON strings cannot hold a raw newline, so a bare ``}`` line ends
    only a top-level object. A one-line object is taken whole; other lines outside an object, and a
    last object cut short (the tool died), are dropped.
    """
    lines: list[bytes] | None = None
    for line in stream:
        bare = line.rstrip(b"\r\n")
        if lines is None:
            if bare == b"{":
                lines = [line]
            elif bare.startswith(b"{") and bare.endswith(b"}"):
                yield bare
            continue
        lines.append(line)
        if bare == b"}":
            yield b"".join(lines)
            lines = None


def decode_meta(obj: bytes | str) -> MetaEvent:
    """One metadata object; EventError if it is not one."""
    try:
        return _meta_decoder.decode(obj)
    except msgspec.DecodeError as exc:
        raise EventError(f"malformed filer metadata event: {exc}") from exc


def seaweed_change(meta: MetaEvent, bucket: str) -> ChangeEvent | None:
    """The regular file this event created or updated under ``/buckets/<bucket>/``, else None."""
    note = meta.eventNotification
    if note is None or note.newEntry is None or note.newEntry.isDirectory or not note.newEntry.name:
        return None
    parent = note.newParentPath or meta.directory
    path = f"{parent.rstrip('/')}/{note.newEntry.name}"
    root = f"/buckets/{bucket}/"
    if not path.startswith(root) or path.startswith(root + _UPLOADS_DIR):
        return None
    attrs = note.newEntry.attributes
    # The event's own time has nanosecond precision; the entry's mtime from an S3 upload has whole seconds.
    mtime = meta.tsNs / 1e9 if meta.tsNs else attrs.mtime + attrs.mtimeNs / 1e9
    return ChangeEvent(key=path[len(root):], size=attrs.fileSize, mtime=mtime, ts_ns=meta.tsNs)


def parse_seaweed(objects: Iterable[bytes | str], bucket: str) -> Iterator[ChangeEvent]:
    """Created or updated regular files of ``bucket``; EventError on a malformed object."""
    for obj in objects:
        change = seaweed_change(decode_meta(obj), bucket)
        if change is not None:
            yield change


def tail_command(*, filer: str, bucket: str, prefix: str, since_ns: int, now_ns: int) -> list[str]:
    """``weed filer.meta.tail`` from ``OVERLAP_NS`` before ``since_ns``, for keys under ``prefix``."""
    from .services.store_server import weed_binary

    ago_ms = (max(0, now_ns - since_ns) + OVERLAP_NS) // 1_000_000
    # The tool matches pathPrefix as a plain string: the slash keeps bucket "b" from matching "b2".
    path = f"/buckets/{bucket}/{prefix}"
    return [weed_binary(), "filer.meta.tail", f"-filer={filer}", f"-pathPrefix={path}", f"-timeAgo={ago_ms}ms"]


# --- MinIO: bucket notifications (webhook and NATS bodies are the same) ---------------------------

class _S3Bucket(msgspec.Struct):
    name: str


class _S3Object(msgspec.Struct):
    key: str
    size: int = 0  # omitted by MinIO for an empty object


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
        out.append(ChangeEvent(key=key, size=record.s3.object.size, mtime=ts_ns / 1e9, ts_ns=ts_ns))
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


# --- Shared by the sources ------------------------------------------------------------------------

def wanted(event: ChangeEvent, cfg: Config) -> bool:
    """What a listing would select: keys under the configured prefix that are images."""
    return event.key.startswith(cfg.store.prefix) and is_image(event.key, prefix=cfg.store.prefix, cfg=cfg.scan)


class Batcher:
    """Collects wanted events into batches: due at ``max_events``, or ``max_wait_s`` after the first.

    Seen events it does not want still move the position; that alone makes a batch due after
    ``progress_s`` (an empty one), so a restart need not replay them.
    """

    def __init__(self, ts_ns: int, *, max_events: int = MAX_BATCH_EVENTS, max_wait_s: float = MAX_BATCH_WAIT_S,
                 progress_s: float = PROGRESS_INTERVAL_S) -> None:
        self.max_events = max_events
        self.max_wait_s = max_wait_s
        self.progress_s = progress_s
        self.events: list[ChangeEvent] = []
        self.ts_ns = self.sent_ts_ns = ts_ns
        self.deadline: float | None = None

    def add(self, event: ChangeEvent | None, ts_ns: int, now: float) -> None:
        """Record that the stream reached ``ts_ns``, with ``event`` if it is wanted."""
        self.ts_ns = max(self.ts_ns, ts_ns)
        if event is not None:
            self.events.append(event)
            self._due_by(now + self.max_wait_s)
        elif self.ts_ns > self.sent_ts_ns:
            self._due_by(now + self.progress_s)

    def _due_by(self, when: float) -> None:
        self.deadline = when if self.deadline is None else min(self.deadline, when)

    def due(self, now: float) -> bool:
        return len(self.events) >= self.max_events or (self.deadline is not None and now >= self.deadline)

    def take(self) -> EventBatch:
        batch = EventBatch(events=self.events, ts_ns=self.ts_ns)
        self.events, self.sent_ts_ns, self.deadline = [], self.ts_ns, None
        return batch


class _Pipe:
    """The watcher's end of the pipe: sends from several threads, one at a time, until ``stop_sending``."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.open = True

    def send(self, message: WatcherMessage) -> bool:
        """False once the supervisor is gone or the stop began: then the message is not in the pipe."""
        data = _encoder.encode(message)
        with self.lock:
            if not self.open:
                return False
            try:
                self.conn.send_bytes(data)
                return True
            except OSError:
                return False

    def stop_sending(self) -> None:
        """Refuse every later send; a send under way finishes first (its message is in the pipe)."""
        with self.lock:
            self.open = False

    def wait_for_stop(self) -> None:
        """Block until the supervisor says stop or goes away."""
        try:
            self.conn.recv_bytes()
        except (EOFError, OSError):
            pass


# --- The SeaweedFS source -------------------------------------------------------------------------

_TAIL_ENDED = object()
_STOPPING = object()


class TailProcess:
    """One run of ``weed filer.meta.tail``; threads feed its objects, then ``_TAIL_ENDED``, to ``inbox``.

    Started from the watcher's main thread: ``PR_SET_PDEATHSIG`` fires when the thread that started
    the child ends, and the tool must not outlive the watcher.
    """

    def __init__(self, command: list[str], inbox: queue.Queue[object]) -> None:
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_die_with_watcher)
        self.objects = 0
        threading.Thread(target=self._pump, args=(inbox,), name="tail-stdout", daemon=True).start()
        threading.Thread(target=self._log_stderr, name="tail-stderr", daemon=True).start()

    def _pump(self, inbox: queue.Queue[object]) -> None:
        assert self.proc.stdout is not None
        for obj in split_objects(self.proc.stdout):
            self.objects += 1
            inbox.put(obj)
        inbox.put(_TAIL_ENDED)

    def _log_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            log.warning("weed filer.meta.tail: %s", line.decode("utf-8", "replace").rstrip())

    def stop(self) -> int:
        """Kill it if it still runs; always reaped. The exit code."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return self.proc.wait()


def _die_with_watcher() -> None:
    die_with_parent(signal.SIGKILL)


class SeaweedFeed:
    """Tails the filer's metadata log: one inbox item per ``step``, restarts the tool with backoff.

    While the bucket is idle the position still moves: after ``QUIET_S`` without an object from a
    running tool, it becomes now less ``QUIET_S``. At a stop, what the batcher holds is sent first.
    """

    def __init__(self, cfg: Config, source: WatchSource, since_ns: int, send: Callable[[WatcherMessage], bool],
                 inbox: queue.Queue[object], *, wall_ns: Callable[[], int] = time.time_ns) -> None:
        self.cfg = cfg
        self.source = source
        self.send = send
        self.inbox = inbox
        self.wall_ns = wall_ns
        self.batcher = Batcher(since_ns or wall_ns())
        self.tail: TailProcess | None = None
        self.restart_at = 0.0
        self.backoff = Backoff(*RESTART_BACKOFF_S)
        self.heard_at = 0.0  # when the running tool last sent an object, or started

    def timeout(self, now: float) -> float | None:
        """How long the next ``inbox.get`` may wait."""
        quiet_end = self.heard_at + QUIET_S if self.tail else self.restart_at
        deadlines = [d for d in (self.batcher.deadline, quiet_end) if d is not None]
        return max(0.0, min(deadlines) - now)

    def step(self, item: object, now: float) -> bool:
        """Handle one inbox item (None: a timeout); False once told to stop or the supervisor is gone."""
        if item is _STOPPING:
            self._flush()
            return False
        if item is _TAIL_ENDED:
            self._tail_ended(now)
        elif isinstance(item, bytes):
            self._take(item, now)
        if self.tail is None and now >= self.restart_at:
            self._start_tail(now)
        elif self.tail is not None and now >= self.heard_at + QUIET_S:
            self.heard_at = now
            self.batcher.add(None, self.wall_ns() - int(QUIET_S * 1e9), now)
        if self.batcher.due(now):
            return self.send(self.batcher.take())
        return True

    def _flush(self) -> None:
        """Send what the batcher holds (and its position): the supervisor reads the pipe to its end."""
        if self.batcher.events or self.batcher.ts_ns > self.batcher.sent_ts_ns:
            self.send(self.batcher.take())

    def _take(self, obj: bytes, now: float) -> None:
        self.heard_at = now
        try:
            meta = decode_meta(obj)
        except EventError as exc:
            log.warning("skipping an event: %s", exc)
            return
        change = seaweed_change(meta, self.cfg.store.bucket)
        self.batcher.add(change if change is not None and wanted(change, self.cfg) else None, meta.tsNs, now)

    def _start_tail(self, now: float) -> None:
        self.heard_at = now
        command = tail_command(filer=self.source.filer, bucket=self.cfg.store.bucket, prefix=self.cfg.store.prefix,
                               since_ns=self.batcher.ts_ns, now_ns=self.wall_ns())
        log.debug("starting %s", " ".join(command[1:]))
        self.tail = TailProcess(command, self.inbox)

    def _tail_ended(self, now: float) -> None:
        tail, self.tail = self.tail, None
        if tail is None:
            return
        code = tail.stop()
        if tail.objects:  # it worked for a while: this is a new failure, not the same one again
            self.backoff.reset()
        wait_s = self.backoff.fail()
        self.restart_at = now + wait_s
        log.warning("weed filer.meta.tail exited (code %s); starting it again in %.1f s", code, wait_s)

    def close(self) -> None:
        if self.tail is not None:
            self.tail.stop()
            self.tail = None


def run_seaweed(cfg: Config, pipe: _Pipe, since_ns: int, source: WatchSource) -> None:
    inbox: queue.Queue[object] = queue.Queue()

    def listen() -> None:
        pipe.wait_for_stop()
        inbox.put(_STOPPING)

    threading.Thread(target=listen, name="stop-listener", daemon=True).start()
    feed = SeaweedFeed(cfg, source, since_ns, pipe.send, inbox)
    try:
        feed.step(None, time.monotonic())  # starts the tool before saying ready
        if not pipe.send(WatcherReady(port=0)):
            return
        item: object = None
        while feed.step(item, time.monotonic()):
            try:
                item = inbox.get(timeout=feed.timeout(time.monotonic()))
            except queue.Empty:
                item = None
    finally:
        feed.close()


# --- The MinIO webhook source ---------------------------------------------------------------------

class _WebhookServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], cfg: Config, token: str, pipe: _Pipe) -> None:
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


def run_webhook(cfg: Config, pipe: _Pipe, source: WatchSource) -> None:
    server = _WebhookServer((source.host, source.port), cfg, source.token, pipe)
    thread = threading.Thread(target=server.serve_forever, name="webhook", daemon=True)
    thread.start()
    try:
        if pipe.send(WatcherReady(port=int(server.server_address[1]))):
            log.info("webhook listening on %s:%d", source.host, server.server_address[1])
            pipe.wait_for_stop()
    finally:
        pipe.stop_sending()  # from here every POST is answered 503 (or finds no server): nothing more is acknowledged
        server.shutdown()
        server.server_close()


# --- The MinIO NATS JetStream source --------------------------------------------------------------

def run_nats(cfg: Config, pipe: _Pipe, since_ns: int, source: WatchSource) -> None:
    import asyncio

    asyncio.run(NatsFeed(cfg, pipe, since_ns, source).run())


class NatsFeed:
    """Pulls MinIO's notifications from a durable JetStream consumer; acks once their batch is in the pipe.

    A new consumer starts at ``since_ns`` (less ``OVERLAP_NS``), or at new messages when it is 0; an
    existing one resumes where it was acknowledged. A lost server is retried with backoff.
    """

    def __init__(self, cfg: Config, pipe: _Pipe, since_ns: int, source: WatchSource) -> None:
        self.cfg = cfg
        self.pipe = pipe
        self.since_ns = since_ns
        self.source = source
        self.ready = False  # WatcherReady sent
        self.subscribed = False  # this session got as far as its subscription
        self.gone = False  # the supervisor went away

    async def run(self) -> None:
        import asyncio

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def listen() -> None:
            self.pipe.wait_for_stop()
            self.pipe.stop_sending()  # nothing is acknowledged any more unless its batch is already in the pipe
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=listen, name="stop-listener", daemon=True).start()
        backoff = Backoff(*RESTART_BACKOFF_S)
        while not stop.is_set() and not self.gone:
            try:
                await self.session(stop)
            except Exception as exc:  # nats-py raises many kinds; each means: connect again
                if self.subscribed:  # it worked for a while: this is a new failure, not the same one again
                    backoff.reset()
                    self.subscribed = False
                wait_s = backoff.fail()
                log.warning("NATS consumer failed (%s); connecting again in %.1f s", exc or type(exc).__name__,
                            wait_s)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait_s)

    async def session(self, stop: asyncio.Event) -> None:
        """One connection: subscribe, then batches until stopped."""
        import nats

        # No reconnects inside the client: a lost connection ends the session and run() connects again
        # with backoff. (max_reconnect_attempts=1 makes the first connect give up; 0 would retry forever.)
        connect = nats.connect(self.source.nats_url, token=self.source.token or None, connect_timeout=2,
                               allow_reconnect=False, max_reconnect_attempts=1, reconnect_time_wait=0.2,
                               error_cb=_log_nats_error)
        nc = await _unless_stopped(connect, stop)
        if nc is None:
            return
        try:
            sub = await nc.jetstream().pull_subscribe(self.source.subject, durable=self.source.durable,
                                                      stream=self.source.stream or None, config=self.consumer_config())
            self.subscribed = True
            if not self.ready:
                self.ready = True
                if not self.pipe.send(WatcherReady(port=0)):
                    self.gone = True
                    return
            while not stop.is_set() and not self.gone:
                messages = await _next_messages(sub, stop)
                if messages:
                    await self.deliver(messages)
                    await nc.flush()
        finally:
            await nc.close()

    def consumer_config(self) -> ConsumerConfig:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        if not self.since_ns:
            return ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.NEW)
        start = dt.datetime.fromtimestamp(max(0, self.since_ns - OVERLAP_NS) / 1e9, tz=dt.timezone.utc)
        return ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.BY_START_TIME,
                              opt_start_time=start)

    async def deliver(self, messages: list[Any]) -> None:
        """Send the wanted events of ``messages`` as one batch; then ack them (a malformed one is dropped).

        A batch the pipe refused (the stop began, or the supervisor is gone) is not acknowledged: its
        messages are naked, so the durable consumer hands them out again at once.
        """
        import asyncio

        wanted_events: list[ChangeEvent] = []
        malformed = set()
        for message in messages:
            try:
                wanted_events += [e for e in parse_minio(message.data, self.cfg.store.bucket) if wanted(e, self.cfg)]
            except EventError as exc:
                log.warning("dropping a NATS message: %s", exc)
                malformed.add(id(message))
        if wanted_events:
            batch = EventBatch(events=wanted_events, ts_ns=max(e.ts_ns for e in wanted_events))
            if not await asyncio.to_thread(self.pipe.send, batch):  # a full pipe must not stall the client
                self.gone = True
                await _nak(messages)
                return
        for message in messages:
            await (message.term() if id(message) in malformed else message.ack())


async def _nak(messages: list[Any]) -> None:
    """Hand ``messages`` back to the consumer; one that cannot be naked comes again after its ack wait."""
    for message in messages:
        try:
            await message.nak()
        except Exception as exc:  # nats-py raises many kinds; the connection may be going
            log.debug("could not nak a NATS message: %s", exc or type(exc).__name__)
            return


async def _unless_stopped(work: Awaitable[_T], stop: asyncio.Event) -> _T | None:
    """``work``'s result, or None (and ``work`` cancelled) if ``stop`` comes first."""
    import asyncio

    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)  # retrieved, so nothing is logged as lost
        return None
    return task.result()


async def _next_messages(sub: JetStreamContext.PullSubscription, stop: asyncio.Event) -> list[Any]:
    """The first message that comes (waiting until ``stop``), then what else comes within ``MAX_BATCH_WAIT_S``."""
    import nats.errors

    try:
        messages = list(await _unless_stopped(sub.fetch(1, timeout=5.0), stop) or [])
    except nats.errors.TimeoutError:
        return []
    if not messages:
        return []
    try:
        messages += await sub.fetch(MAX_BATCH_EVENTS - 1, timeout=MAX_BATCH_WAIT_S)
    except nats.errors.TimeoutError:
        pass
    return messages


async def _log_nats_error(exc: Exception) -> None:
    log.debug("NATS: %s", exc or type(exc).__name__)  # the session's end is logged once, by NatsFeed.run


# --- The process and the supervisor's handle ------------------------------------------------------

def watcher_main(cfg: Config, conn: Connection, log_settings: LogSettings, since_ns: int,
                 source: WatchSource) -> None:
    """Entry point of the watcher process: one source until STOP or the supervisor is gone."""
    child_setup("watcher", log_settings)
    pipe = _Pipe(conn)
    if source.kind == "seaweed":
        run_seaweed(cfg, pipe, since_ns, source)
    elif source.kind == "minio_nats":
        run_nats(cfg, pipe, since_ns, source)
    else:
        run_webhook(cfg, pipe, source)


def check_source(source: WatchSource) -> None:
    """EventError for a source that cannot work."""
    if source.kind == "seaweed" and not source.filer:
        raise EventError("a SeaweedFS watch needs the filer address (host:port.grpcport)")
    if not 0 <= source.port <= 65535:
        raise EventError(f"webhook port {source.port} is out of range")
    if source.kind == "minio_nats" and importlib.util.find_spec("nats") is None:
        raise EventError("the NATS source needs the nats-py package: pip install nats-py")


class Watcher(ChildHandle):
    """The supervisor's handle on the watcher process."""

    def __init__(self, cfg: Config, log_settings: LogSettings, since_ns: int, source: WatchSource) -> None:
        check_source(source)
        super().__init__(watcher_main, (cfg, log_settings, since_ns, source), "imgworker-watcher")

    def poll(self) -> WatcherMessage | None:
        """The next message if one is buffered; EOFError/OSError if the watcher is gone."""
        data = self.receive()
        return None if data is None else self.decode(data)

    def decode(self, data: bytes) -> WatcherMessage:
        """One message, as ``poll`` and ``stop`` hand it over (``stop`` reads the pipe to its end)."""
        return _decoder.decode(data)
