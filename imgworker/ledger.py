"""The processed set: served by a multiprocessing Manager, batched, bounded, durable.

Every call takes a whole listing page (one round trip per page, not per key). Entries for
objects that no longer exist are pruned by sweeps: a sweep marks every key a complete listing
saw, and ``end_sweep`` drops the rest. ``save`` writes atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
import threading
from multiprocessing.connection import Connection
from multiprocessing.managers import BaseManager
from typing import Any

import msgspec

from .proctitle import set_title


class LedgerState(msgspec.Struct):
    """What the state file holds."""

    version: int = 1
    results_offset: int = 0
    processed: list[str] = []
    pending: list[str] = []


class ProcessedSet:
    """Keys of images that reached a terminal outcome, with the sweep generation that last saw them."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}
        self._generation = 0

    def filter_new(self, keys: list[str]) -> list[str]:
        """Keys not yet processed; processed ones are marked as seen by the current sweep."""
        new = []
        gen = self._generation
        for key in keys:
            if key in self._seen:
                self._seen[key] = gen
            else:
                new.append(key)
        return new

    def add_many(self, keys: list[str]) -> None:
        gen = self._generation
        for key in keys:
            self._seen[key] = gen

    def contains(self, key: str) -> bool:
        return key in self._seen

    def size(self) -> int:
        return len(self._seen)

    def begin_sweep(self) -> None:
        self._generation += 1

    def end_sweep(self) -> int:
        """Drop entries the completed sweep did not see (their objects are gone); return how many."""
        gen = self._generation
        stale = [k for k, g in self._seen.items() if g < gen]
        for key in stale:
            del self._seen[key]
        return len(stale)

    def save(self, path: str, results_offset: int, pending: list[str]) -> None:
        state = LedgerState(results_offset=results_offset, processed=list(self._seen), pending=pending)
        write_atomic(path, msgspec.json.encode(state))

    def load(self, path: str) -> LedgerState:
        """Load a state file (its processed keys replace ours); a missing file is an empty state."""
        try:
            with open(path, "rb") as f:
                state = msgspec.json.decode(f.read(), type=LedgerState)
        except FileNotFoundError:
            return LedgerState()
        self._seen = dict.fromkeys(state.processed, self._generation)
        state.processed = []
        return state


def write_atomic(path: str, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, rename over, fsync the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class LedgerManager(BaseManager):
    """The Manager process that serves the processed set."""


LedgerManager.register("ProcessedSet", ProcessedSet)


def _manager_init(lifeline: Connection) -> None:
    set_title("ledger")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when the Manager stops
    threading.Thread(target=_exit_when_closed, args=(lifeline,), daemon=True, name="lifeline").start()


def _exit_when_closed(lifeline: Connection) -> None:
    """Block until the supervisor's end of the lifeline closes (it exited or died), then exit."""
    try:
        lifeline.recv_bytes()
    except (EOFError, OSError):
        pass
    os._exit(0)


def start_ledger() -> tuple[LedgerManager, Any, Connection]:
    """Start the Manager (spawn context); return it, a ProcessedSet proxy and the lifeline to keep open."""
    ctx = multiprocessing.get_context("spawn")
    theirs, ours = ctx.Pipe(duplex=False)
    manager = LedgerManager(ctx=ctx)
    manager.start(initializer=_manager_init, initargs=(theirs,))
    theirs.close()
    return manager, manager.ProcessedSet(), ours  # type: ignore[attr-defined]
