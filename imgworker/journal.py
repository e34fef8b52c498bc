"""Durability: the lock of a state directory and the results journal.

Policy (durable before destructive):

- Each result line is handed to the operating system (one ``write`` on an ``O_APPEND`` file,
  no user-space buffer) the moment the supervisor decides the outcome. A crash of imgworker
  itself, even SIGKILL, cannot lose it.
- The journal is fsynced before anything irreversible happens to an image (every delete batch
  of the janitor: cleaner deletes and ``delete_no_detection``), at every checkpoint, and at
  exit. A power loss can lose the last lines only of images that nothing has deleted yet;
  those are analysed again after the restart, never lost.
- One run per state directory: ``RunLock`` holds an exclusive ``flock`` on ``<state_dir>/lock``
  for the life of the run; a second run refuses to start (exit code 8).
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading

import msgspec

from .errors import AlreadyRunning, StateError
from .files import fsync_directory
from .outcomes import Result
from .results import truncate_partial_line

_encoder = msgspec.json.Encoder()


class RunLock:
    """An exclusive, non-blocking ``flock`` on the state directory, released when the process ends."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, "lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            os.makedirs(self.state_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StateError(f"cannot use state directory {self.state_dir}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AlreadyRunning(
                    f"another imgworker run (pid {holder}) is using the state directory {self.state_dir}; "
                    "stop it first, or give this run its own run.state_dir"
                ) from None
            raise StateError(f"cannot lock {self.path}: {exc.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


class ResultsJournal:
    """The append-only results file, written through to the OS line by line."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        truncate_partial_line(path)
        self.path = path
        created = not os.path.exists(path)
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if created:  # its entry must be durable before any delete relies on its lines
            fsync_directory(os.path.dirname(os.path.abspath(path)))
        self.offset = os.fstat(self._fd).st_size
        self._lock = threading.Lock()  # the janitor thread fsyncs while the supervisor writes and closes
        self._failure = ""

    def write(self, result: Result) -> int:
        """Append one line; return the offset it starts at. A failed write is cut back and is fatal."""
        if self._failure or self._fd is None:
            raise StateError(f"results file {self.path} cannot be written: {self._failure or 'closed'}")
        data = _encoder.encode(result) + b"\n"
        start = self.offset
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            self._fail(exc)
        self.offset += len(data)
        return start

    def _fail(self, exc: OSError) -> None:
        """Cut a partly written line (disk full, I/O error) and refuse every later write."""
        self._failure = exc.strerror or type(exc).__name__
        try:
            os.ftruncate(self._fd, self.offset)  # type: ignore[arg-type]
        except OSError:
            pass
        raise StateError(f"results file {self.path} cannot be written: {self._failure}") from None

    def sync(self) -> int:
        """fsync; return the offset everything before which is on disk."""
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)
            return self.offset

    @property
    def closed(self) -> bool:
        return self._fd is None

    def close(self) -> None:
        with self._lock:
            if self._fd is None:
                return
            fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
