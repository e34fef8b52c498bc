"""Logging set-up: one console for the main process, child processes' records relayed through it.

    child (worker, lister, watcher): QueueHandler ─▶ its own log pipe ─▶ LogRelay thread (supervisor)
    supervisor's own records, relayed records ─▶ ConsoleHandler ─┐
    the progress status line ─────────────────────────────────────┴▶ Console (one lock): clear, emit, redraw

Every child gets its own one-way log pipe (``children.spawn``); only that child holds the writing
end, so a child that dies mid-write ends its pipe (EOF, or "end of file during message") and the
relay drops that pipe: nothing it sent whole is lost, and no other child's records wait on it. The
relay reads from its own thread, so a slow or dead child never blocks the supervisor's loop;
``drain_child_logs()`` reads every pipe to what is buffered, after the children are reaped, so
records a child wrote just before it left are printed before the final report.

On a terminal, a log record clears the status line, is written, and the status line is drawn
again, all under the console's lock. Off a terminal (journald, a pipe) no ``\\r`` is written and
each record is exactly one line: newlines inside a message or a traceback are escaped as ``\\n``.
"""

from __future__ import annotations

import copy
import logging
import logging.handlers
import os
import pickle
import subprocess
import sys
import threading
from multiprocessing.connection import Connection, wait
from typing import IO, Any

import msgspec

_CLEAR = "\r\033[K"


class LogSettings(msgspec.Struct, frozen=True):
    """How to log; chosen once by the CLI and handed to every child process."""

    level: str = "INFO"
    json: bool = False


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _origin(record: logging.LogRecord) -> str:
    """The child a relayed record came from (``worker 0``, ``scanner``), or ``""`` for the supervisor's own."""
    return str(getattr(record, "role", "") or "")


class _TextFormatter(logging.Formatter):
    """``time LEVEL logger [child]: message``; the message never spans lines, nor (``one_line``) the traceback."""

    def __init__(self, *, one_line: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(origin)s: %(message)s")
        self.one_line = one_line

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (the base class's name)
        origin = _origin(record)
        record.origin = f" [{origin}]" if origin else ""
        return _one_line(super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return _one_line(text) if self.one_line else text


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                "message": record.getMessage(), "pid": record.process}
        origin = _origin(record)
        if origin:
            data["process"] = origin
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            data["exc"] = record.exc_text
        return msgspec.json.encode(data).decode()


class Console:
    """One stream shared by log records and a status line, under one lock: clear, emit, redraw."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lock = threading.RLock()
        try:
            self.tty = stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self._status = ""

    def emit(self, text: str) -> None:
        """Write one record as its own line; on a terminal the status line is cleared first and drawn again."""
        with self.lock:
            if self._status:
                self.stream.write(_CLEAR)
            self.stream.write(text + "\n")
            if self._status:
                self.stream.write(self._status)
            self.stream.flush()

    def status(self, line: str) -> None:
        """Draw (or redraw) the status line; only on a terminal (off one, progress is a plain log line)."""
        if not self.tty:
            return
        with self.lock:
            self._status = _one_line(line)
            self.stream.write(_CLEAR + self._status)
            self.stream.flush()

    def end_status(self) -> None:
        """Leave the last status line as it is and go on below it."""
        with self.lock:
            if self._status:
                self.stream.write("\n")
                self.stream.flush()
                self._status = ""


class ConsoleHandler(logging.Handler):
    """A handler writing through a ``Console``; its lock is the console's."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console
        self.lock = console.lock  # the one lock of records and the status line

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.emit(self.format(record))
        except Exception:
            self.handleError(record)


_console: Console | None = None


def console() -> Console:
    """The console of this process's stderr (the one the log handler writes to, once logging is set up)."""
    global _console
    if _console is None or _console.stream is not sys.stderr:
        _console = Console(sys.stderr)
    return _console


def setup_logging(settings: LogSettings) -> None:
    """Human lines (or JSON lines) on stderr through the console; noisy libraries only from WARNING."""
    out = console()
    handler = ConsoleHandler(out)
    handler.setFormatter(_JsonFormatter() if settings.json else _TextFormatter(one_line=not out.tty))
    _install(handler, settings)


def _install(handler: logging.Handler, settings: LogSettings) -> None:
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    # urllib3 logs request lines, which would include presigned query strings.
    for noisy in ("urllib3", "aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def current_settings() -> LogSettings:
    """The settings in force in this process (what a child should use)."""
    root = logging.getLogger()
    as_json = any(isinstance(h.formatter, _JsonFormatter) for h in root.handlers)
    return LogSettings(level=logging.getLevelName(root.level), json=as_json)


# ----- child processes ---------------------------------------------------------------------------


class _PipeQueue:
    """What a child's ``QueueHandler`` puts records on: its log pipe to the supervisor."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def put_nowait(self, record: logging.LogRecord) -> None:
        try:
            data = pickle.dumps(record.__dict__)
        except Exception:  # an unpicklable extra attribute: the text still goes
            data = pickle.dumps({k: record.__dict__.get(k) for k in ("name", "levelno", "levelname", "msg",
                                                                     "created", "msecs", "process", "role")})
        try:
            self.conn.send_bytes(data)
        except OSError:
            pass  # the supervisor is gone; this process is about to be killed with it


class _ChildHandler(logging.handlers.QueueHandler):
    """Sends each record, rendered to plain data, to the supervisor; marks it with the child's role."""

    def __init__(self, conn: Connection, role: str) -> None:
        super().__init__(_PipeQueue(conn))  # type: ignore[arg-type]
        self.role = role

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        record.role = self.role
        return record


_to_parent: Connection | None = None


def send_to_parent(conn: Connection) -> None:
    """In a child, before it sets up logging: its records go to ``conn`` (the supervisor reads the other end)."""
    global _to_parent
    _to_parent = conn


def setup_child_logging(settings: LogSettings, role: str) -> None:
    """A child's logging: through its log pipe to the supervisor if it has one, else on stderr."""
    if _to_parent is None:
        setup_logging(settings)
        return
    _install(_ChildHandler(_to_parent, role), settings)


class LogRelay:
    """The supervisor's reader of every child's log pipe, in its own thread; records go to this process's handlers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: list[Connection] = []
        self._drains: list[threading.Event] = []
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="log-relay", daemon=True)
        self._thread.start()

    def adopt(self, conn: Connection) -> None:
        """Read ``conn`` (a child's log pipe) until its end."""
        with self._lock:
            self._conns.append(conn)
        self._wake()

    def drain(self, timeout_s: float = 2.0) -> bool:
        """Handle every record already in a pipe; False if the relay did not get to it within ``timeout_s``."""
        done = threading.Event()
        with self._lock:
            self._drains.append(done)
        self._wake()
        return done.wait(timeout_s)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _run(self) -> None:
        while True:
            with self._lock:
                conns = list(self._conns)
            ready = wait([*conns, self._wake_r])
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            for conn in conns:
                if conn in ready:
                    self._read(conn)
            with self._lock:
                drains, self._drains = self._drains, []
                conns = list(self._conns)
            if drains:
                for conn in conns:
                    self._read(conn)
                for done in drains:
                    done.set()

    def _read(self, conn: Connection) -> None:
        """Every whole record buffered in ``conn``; at its end (the child is gone), forget it."""
        try:
            while conn.poll(0):
                self._handle(conn.recv_bytes())
        except (EOFError, OSError):
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)
            conn.close()

    @staticmethod
    def _handle(data: bytes) -> None:
        try:
            record = logging.makeLogRecord(pickle.loads(data))
        except Exception:
            return
        logging.getLogger(record.name).handle(record)


_relay: LogRelay | None = None
_relay_lock = threading.Lock()


def relay() -> LogRelay:
    """This process's log relay (started on the first child)."""
    global _relay
    with _relay_lock:
        if _relay is None:
            _relay = LogRelay()
        return _relay


def drain_child_logs(timeout_s: float = 2.0) -> None:
    """Print what children logged and is still in their pipes (call once they are reaped)."""
    if _relay is not None:
        _relay.drain(timeout_s)


def forward_output(proc: subprocess.Popen[bytes], name: str) -> threading.Thread:
    """Log each line a helper process writes on its (piped) stdout, so it goes through the console."""
    assert proc.stdout is not None
    stream, logger = proc.stdout, logging.getLogger(name)

    def run() -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                logger.info("%s", line)
        stream.close()

    thread = threading.Thread(target=run, name=f"output-{name}", daemon=True)
    thread.start()
    return thread
