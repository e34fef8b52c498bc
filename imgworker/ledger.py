"""The processed set: served by a multiprocessing Manager, batched, bounded, durable.

Every call takes a whole listing page (one round trip per page, not per key). Entries for
objects that no longer exist are pruned by sweeps: a sweep marks every key a complete listing
saw, and ``end_sweep`` drops the rest, so the set is bounded by what the bucket holds. A pruned
key would be analysed again if an event for it came back, so a key is kept for as long as a
replay of the event stream can reach it (see ``ProcessedSet.end_sweep``).

Saving costs time proportional to what changed, not to the set: keys finished since the last
checkpoint are appended to a key log (one JSON line per change: ``"key"`` added, ``{"pruned": "key"}``
removed; fsynced), and the small state file
(results offset, unfinished keys, the log's name and valid length, the change-event position) is
replaced atomically. When the log holds more than twice the live set (pruned keys), it is
compacted into a new log file named in the next state file, so a crash at any point leaves a
state file and the log it names consistent. A log longer than the state file says (a crash
between the two writes) is cut back: those keys' result lines come after the saved offset and
are replayed.

``Ledger`` is the supervisor's handle. It buffers finished keys and flushes them before any
call that reads the set, so no caller has to place flushes by hand. If the Manager process
dies, the next call starts a new one and rebuilds the set from disk (the state file, then the
results written after it), which is the same set: every outcome is in the results journal.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.managers import BaseManager
from typing import Any, TypeVar

import msgspec

from .children import CTX, child_setup, signals_blocked
from .errors import StateError
from .events import OVERLAP_NS
from .files import write_atomic
from .outcomes import IntakePosition, Result
from .results import read_results

log = logging.getLogger(__name__)
T = TypeVar("T")


class LedgerState(msgspec.Struct):
    """What the state file holds (version 1 kept every processed key in ``processed``)."""

    version: int = 2
    results_offset: int = 0
    processed: list[str] = []
    pending: list[str] = []
    log_name: str = ""
    log_bytes: int = 0
    intake: IntakePosition = IntakePosition()


class _Pruned(msgspec.Struct, frozen=True):
    pruned: str


_key_encoder = msgspec.json.Encoder()
_key_decoder = msgspec.json.Decoder(str | _Pruned)
_COMPACT_SLACK = 10_000
#: a key is pruned only once the saved event position is this far past the time it was first missed:
#: a watcher resumes ``OVERLAP_NS`` before that position, and the clock of the store's events may be up
#: to ``OVERLAP_NS`` ahead of ours
REPLAY_REACH_NS = 2 * OVERLAP_NS


class ProcessedSet:
    """Keys of images that reached a terminal outcome, with the sweep generation that last saw them."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}
        self._generation = 0
        self._unsaved: list[bytes] = []  # key-log lines written since the last save
        self._log_name = ""
        self._log_lines = 0
        self._missed: dict[str, int] = {}  # key -> wall time (ns) two complete sweeps had first not seen it
        self._events_ts_ns = 0  # the event position in the last state saved or loaded: where a replay starts

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
        self._unsaved.extend(_key_encoder.encode(k) + b"\n" for k in keys)

    def contains(self, key: str) -> bool:
        return key in self._seen

    def size(self) -> int:
        return len(self._seen)

    def begin_sweep(self) -> None:
        self._generation += 1

    def end_sweep(self, *, events: bool = False, now_ns: int | None = None) -> int:
        """Drop entries the last two complete sweeps did not see (their objects are gone); return how many.

        An entry pruned is an image that would be analysed again if an event for it came back: a
        duplicate, or a replay of the event stream. With ``events`` (a watcher runs) an entry missed
        by two complete sweeps therefore stays until the saved event position is ``REPLAY_REACH_NS``
        past the time it was first found missing: a watcher resumes ``OVERLAP_NS`` before that
        position, which does not move while the bucket is idle; once it is past, the entry's event
        (older than that time) is out of any replay's reach. Without a saved position (no event
        handled yet) a watcher starts from now, and the time now stands for it.
        """
        now = time.time_ns() if now_ns is None else now_ns
        gen = self._generation
        missed = {k: self._missed.get(k, now) for k, g in self._seen.items() if g < gen - 1}
        replay_from = self._events_ts_ns or now
        stale = [k for k, first in missed.items() if not events or first + REPLAY_REACH_NS < replay_from]
        for key in stale:
            del self._seen[key]
            del missed[key]
        self._missed = missed
        self._unsaved.extend(_key_encoder.encode(_Pruned(k)) + b"\n" for k in stale)
        return len(stale)

    def save(self, path: str, results_offset: int, pending: list[str],
             intake: IntakePosition = IntakePosition()) -> None:
        """Append new keys to the key log (or compact it), then replace the small state file."""
        directory = os.path.dirname(os.path.abspath(path))
        previous = self._log_name
        if not self._log_name or self._log_lines > 2 * len(self._seen) + _COMPACT_SLACK:
            size = self._compact(directory)
        else:
            size = self._append(directory)
        state = LedgerState(results_offset=results_offset, pending=pending, log_name=self._log_name,
                            log_bytes=size, intake=intake)
        write_atomic(path, msgspec.json.encode(state))
        self._events_ts_ns = intake.events_ts_ns
        if previous and previous != self._log_name:
            _unlink(os.path.join(directory, previous))

    def _append(self, directory: str) -> int:
        with open(os.path.join(directory, self._log_name), "ab") as f:
            good = f.tell()
            try:
                f.write(b"".join(self._unsaved))
                f.flush()
                os.fsync(f.fileno())
            except OSError:
                f.truncate(good)  # a partial line would make the log unreadable at the next start
                raise
            size = f.tell()
        self._log_lines += len(self._unsaved)
        self._unsaved = []
        return size

    def _compact(self, directory: str) -> int:
        """Write the live set to a new log file (its name goes into the next state file)."""
        generation = int(self._log_name.split(".")[1]) + 1 if self._log_name else 1
        name = f"processed.{generation}.log"
        data = b"".join(_key_encoder.encode(k) + b"\n" for k in self._seen)
        write_atomic(os.path.join(directory, name), data)
        self._log_name, self._log_lines = name, len(self._seen)  # only once the new log is written
        self._unsaved = []
        return len(data)

    def load(self, path: str) -> LedgerState:
        """Load a state file (its processed keys replace ours); a missing file is an empty state."""
        try:
            with open(path, "rb") as f:
                state = msgspec.json.decode(f.read(), type=LedgerState)
        except FileNotFoundError:
            return LedgerState()
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise StateError(
                f"state file {path} is corrupt ({str(exc)[:120]}); run `imgworker repair --state-dir "
                f"{os.path.dirname(os.path.abspath(path))}` to rebuild it from the results file"
            ) from None
        if state.version < 2:
            self._seen = dict.fromkeys(state.processed, self._generation)
            self._log_name, self._log_lines = "", 0
        else:
            self._load_log(os.path.dirname(os.path.abspath(path)), state)
        self._unsaved = []
        self._missed, self._events_ts_ns = {}, state.intake.events_ts_ns
        state.processed = []
        return state

    def _load_log(self, directory: str, state: LedgerState) -> None:
        """Read the key log up to the length the state file names; cut off what a crash added after."""
        self._seen, self._log_name, self._log_lines = {}, state.log_name, 0
        if not state.log_name:
            return
        log_path = os.path.join(directory, state.log_name)
        try:
            with open(log_path, "rb+") as f:
                data = f.read(state.log_bytes)
                if len(data) < state.log_bytes:
                    raise StateError(f"key log {log_path} is shorter than state.json says; "
                                     f"run `imgworker repair --state-dir {directory}`")
                f.truncate(state.log_bytes)
        except FileNotFoundError:
            raise StateError(f"key log {log_path} is missing; run `imgworker repair --state-dir {directory}`") from None
        try:
            changes = [_key_decoder.decode(line) for line in data.splitlines()]
        except msgspec.DecodeError as exc:
            raise StateError(f"key log {log_path} is corrupt ({exc}); run `imgworker repair --state-dir "
                             f"{directory}`") from None
        for change in changes:
            if isinstance(change, str):
                self._seen[change] = self._generation
            else:
                self._seen.pop(change.pruned, None)
        self._log_lines = len(changes)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class LedgerManager(BaseManager):
    """The Manager process that serves the processed set."""


LedgerManager.register("ProcessedSet", ProcessedSet)


def _manager_init(lifeline: Connection) -> None:
    child_setup("ledger", None)
    threading.Thread(target=_exit_when_closed, args=(lifeline,), daemon=True, name="lifeline").start()


def _exit_when_closed(lifeline: Connection) -> None:
    """Block until the supervisor's end of the lifeline closes (it exited or died), then exit."""
    try:
        lifeline.recv_bytes()
    except (EOFError, OSError):
        pass
    os._exit(0)


class LocalBackend:
    """The processed set in this process: for tests that drive the supervisor without processes."""

    def __init__(self) -> None:
        self.processed = ProcessedSet()

    def start(self) -> Any:
        return self.processed

    def alive(self) -> bool:
        return True

    def stop(self) -> None:
        pass


class ManagerBackend:
    """The processed set in a Manager process, tied to the supervisor by a lifeline pipe."""

    def __init__(self) -> None:
        self._manager: LedgerManager | None = None
        self._lifeline: Connection | None = None

    def start(self) -> Any:
        theirs, ours = CTX.Pipe(duplex=False)
        manager = LedgerManager(ctx=CTX)
        with signals_blocked():
            manager.start(initializer=_manager_init, initargs=(theirs,))
        theirs.close()
        self._manager, self._lifeline = manager, ours
        return manager.ProcessedSet()  # type: ignore[attr-defined]

    def alive(self) -> bool:
        process = getattr(self._manager, "_process", None)
        return process is not None and process.is_alive()

    def stop(self) -> None:
        if self._manager is not None:
            try:
                self._manager.shutdown()
            except OSError:
                pass
            self._manager = None
        if self._lifeline is not None:
            self._lifeline.close()
            self._lifeline = None


_LOST = (EOFError, OSError)


class Restored(msgspec.Struct):
    """What a restore found: unfinished keys, and the results written after the last checkpoint."""

    pending: list[str]
    replayed: list[Result]
    offset: int
    intake: IntakePosition = IntakePosition()


class Ledger:
    """The supervisor's handle on the processed set: buffered adds, own flush order, restart on loss."""

    def __init__(self, state_path: str, results_path: str, backend: Any = None) -> None:
        self.state_path = state_path
        self.results_path = results_path
        self.backend = backend if backend is not None else ManagerBackend()
        self._set: Any = None
        self._done: list[str] = []
        self.restarts = 0

    def start(self) -> Restored:
        """Start the backend and load the processed set from disk."""
        self._set = self.backend.start()
        return self._restore()

    def _restore(self) -> Restored:
        state = self._set.load(self.state_path)
        replayed: list[Result] = []
        size = os.path.getsize(self.results_path) if os.path.exists(self.results_path) else 0
        if state.results_offset > size:
            raise StateError(
                f"results file {self.results_path} is shorter ({size} bytes) than the state file says "
                f"({state.results_offset}); it was replaced or truncated. Run `imgworker repair --state-dir "
                f"{os.path.dirname(os.path.abspath(self.state_path))}` to rebuild the state from it"
            )
        if size:
            replayed = list(read_results(self.results_path, offset=state.results_offset))
            for start in range(0, len(replayed), 1000):
                self._set.add_many([r.key for r in replayed[start : start + 1000]])
        return Restored(pending=state.pending, replayed=replayed, offset=state.results_offset,
                        intake=state.intake)

    def _call(self, op: Callable[[Any], T]) -> T:
        """Flush finished keys, then run ``op``; a lost Manager is restarted and rebuilt once."""
        try:
            self._flush()
            return op(self._set)
        except _LOST as exc:
            if self.backend.alive():
                raise  # the Manager answered with an error of its own (a full disk on save): not lost
            log.warning("the ledger process was lost (%s); starting a new one from the state on disk",
                        type(exc).__name__)
            self.restarts += 1
            self.backend.stop()
            self._set = None
            fresh = self.backend.start()
            self._restore_into(fresh)
            self._set = fresh
            self._flush()
            return op(self._set)

    def _restore_into(self, fresh: Any) -> None:
        """Rebuild a new set from disk; only a complete rebuild replaces the lost one."""
        lost, self._set = self._set, fresh
        try:
            self._restore()
        except BaseException:
            self._set = lost
            raise

    def _flush(self) -> None:
        if self._done:
            self._set.add_many(self._done)
            self._done = []

    def add(self, key: str) -> None:
        """Record a finished image (sent with the next call)."""
        self._done.append(key)

    def filter_new(self, keys: list[str]) -> set[str]:
        return set(self._call(lambda s: s.filter_new(keys)))

    def begin_sweep(self) -> None:
        self._call(lambda s: s.begin_sweep())

    def end_sweep(self, *, events: bool = False) -> int:
        """Prune what two complete sweeps missed; with ``events``, only what no event replay can reach."""
        return int(self._call(lambda s: s.end_sweep(events=events)))

    def size(self) -> int:
        return int(self._call(lambda s: s.size()))

    def save(self, offset: int, unfinished: list[str], intake: IntakePosition = IntakePosition()) -> None:
        self._call(lambda s: s.save(self.state_path, offset, unfinished, intake))

    def stop(self) -> None:
        self.backend.stop()
