"""The SeaweedFS source: ``weed filer.meta.tail`` as a subprocess, read by threads into one inbox.

    weed filer.meta.tail ─stdout─▶ TailProcess thread ─▶ inbox ─▶ SeaweedFeed.step ─▶ Batcher ─▶ pipe
    supervisor's STOP ─▶ stop-listener thread ─────────────▲

The tool resumes from a position with ``-timeAgo`` and overlaps by ``OVERLAP_NS``, so an event may
arrive twice. When only events it does not want went by, or none for ``QUIET_S``, the feed sends an
empty batch now and then so the position moves on. SeaweedFS's S3 gateway keeps multipart parts
under the bucket's ``.uploads/`` folder; those are not objects and are skipped, as are deletes and
directories.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO

import msgspec

from ..backoff import Backoff
from ..binaries import weed_binary
from ..children import die_with_parent
from ..config import Config, EventsConfig
from .messages import (
    OVERLAP_NS, RESTART_BACKOFF_S, Batcher, ChangeEvent, EventError, Pipe, WatcherMessage, WatcherReady, wanted,
)

log = logging.getLogger(__name__)

#: the tool running and silent this long: every event older than that has come (it sends in time order),
#: so the resume position moves to now less this, and a restart does not replay old events of an idle bucket
QUIET_S = 10.0
_UPLOADS_DIR = ".uploads/"  # SeaweedFS's multipart staging folder inside a bucket


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
    ago_ms = (max(0, now_ns - since_ns) + OVERLAP_NS) // 1_000_000
    # The tool matches pathPrefix as a plain string: the slash keeps bucket "b" from matching "b2".
    path = f"/buckets/{bucket}/{prefix}"
    return [weed_binary(), "filer.meta.tail", f"-filer={filer}", f"-pathPrefix={path}", f"-timeAgo={ago_ms}ms"]


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

    def __init__(self, cfg: Config, source: EventsConfig, since_ns: int, send: Callable[[WatcherMessage], bool],
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


def run(cfg: Config, pipe: Pipe, since_ns: int, source: EventsConfig) -> None:
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

