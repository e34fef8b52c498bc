"""What a source sends and how: the messages, the batcher, the watcher's end of the pipe.

Every source sends one ``WatcherReady``, then ``EventBatch`` messages; ``Pipe.send`` returns True
only once the message is in the pipe, which is what a source may acknowledge on (see the package
docstring).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TypeAlias

import msgspec

from ..config import Config, EventsConfig
from ..errors import ImgworkerError
from ..scanner import is_image

MAX_BATCH_EVENTS = 256
MAX_BATCH_WAIT_S = 0.05
PROGRESS_INTERVAL_S = 1.0  # an empty batch that only moves the resume position, at most this often
OVERLAP_NS = 2_000_000_000  # replay this much before the resume position: clock skew, the tool's start-up
RESTART_BACKOFF_S = (0.5, 10.0)  # first wait and cap before the tail tool (or a NATS connection) is tried again


class EventError(ImgworkerError):
    """A change-event payload could not be understood."""


class ChangeEvent(msgspec.Struct, frozen=True, array_like=True):
    """One object created or overwritten: its S3 key, size, upload time, the event's own time, and its ETag
    (quotes stripped; "" when the source gives none)."""

    key: str
    size: int
    mtime: float
    ts_ns: int
    etag: str = ""


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


def decode_message(data: bytes) -> WatcherMessage:
    """One message as the supervisor reads it from the pipe."""
    return _decoder.decode(data)


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


class Pipe:
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


#: What every source module exposes as ``run``: send to ``pipe`` until the supervisor says stop or is
#: gone. ``since_ns`` is the position to resume from (0: from now); ``source`` is ``cfg.scan.events``.
SourceRun: TypeAlias = Callable[[Config, Pipe, int, EventsConfig], None]
