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

The intake backlog (images found, not yet queued) is saved the same way, by the supervisor's
handle: a checkpoint appends what entered or left it since the last one to a backlog log
(``"key"`` entered, ``{"left": "key"}`` left), compacted into a new file when it holds more than
twice the live backlog, and the state file names that log and its valid length. Actions given up
(``janitor.OwedAction``) are listed in the state file.

Two offsets into the results file: ``results_offset``, up to which every line's key is in the key
log (a checkpoint's fsynced length: a start adds only the keys of the lines after it, so a key
pruned and saved is not brought back by an older line), and ``actions_offset``, from which result
actions are redone (the janitor's watermark: every action before it is done; ``imgworker repair``
sets it too). A start redoes an action only for a key still in the processed set: a pruned key's
object is gone, and a new upload under that name must not get an old line's action.

``Ledger`` is the supervisor's handle. It buffers finished keys and flushes them before any
call that reads the set, so no caller has to place flushes by hand. If the Manager process
dies, the next call starts a new one and rebuilds the set from disk (the state file, then the
results written after it), then forgets again the keys pruned since the last save (the handle
keeps them), which is the same set: every outcome is in the results journal.
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
from .janitor import OwedAction
from .outcomes import IntakePosition, Result
from .ports import ProcessedSet as ProcessedSetPort
from .ports import ProcessedSetBackend
from .results import Retried, read_entries_at, read_results_at

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
    backlog_log: str = ""  # when set, the backlog is in this log, not in ``intake.backlog``
    backlog_bytes: int = 0
    owed: list[OwedAction] = []
    actions_offset: int = -1  # result actions are redone from here; -1: from results_offset

    @property
    def actions_from(self) -> int:
        return self.actions_offset if self.actions_offset >= 0 else self.results_offset


class _Pruned(msgspec.Struct, frozen=True):
    pruned: str


class _Left(msgspec.Struct, frozen=True):
    left: str


_key_encoder = msgspec.json.Encoder()
_key_decoder = msgspec.json.Decoder(str | _Pruned)
_backlog_decoder = msgspec.json.Decoder(str | _Left)
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

    def end_sweep(self, *, events: bool = False, position_ns: int = 0, now_ns: int | None = None) -> list[str]:
        """Drop entries the last two complete sweeps did not see (their objects are gone); return them.

        An entry pruned is an image that would be analysed again if an event for it came back: a
        duplicate, or a replay of the event stream. With ``events`` (a watcher runs) an entry missed
        by two complete sweeps therefore stays until the event position ``position_ns`` is
        ``REPLAY_REACH_NS`` past the time it was first found missing: the position a checkpoint will
        save with this prune, from which a watcher resumes ``OVERLAP_NS`` early after a crash; once
        it is past, the entry's event (older than that time) is out of any replay's reach. With no
        event handled yet (0), nothing is saved for a watcher to resume from (it starts from now),
        and the time now stands for it.
        """
        now = time.time_ns() if now_ns is None else now_ns
        gen = self._generation
        missed = {k: self._missed.get(k, now) for k, g in self._seen.items() if g < gen - 1}
        replay_from = position_ns or now
        stale = [k for k, first in missed.items() if not events or first + REPLAY_REACH_NS < replay_from]
        for key in stale:
            del self._seen[key]
            del missed[key]
        self._missed = missed
        self._unsaved.extend(_key_encoder.encode(_Pruned(k)) + b"\n" for k in stale)
        return stale

    def discard_many(self, keys: list[str]) -> None:
        """Forget keys again (a rebuild from disk brought back keys pruned since the last save)."""
        gone = [k for k in keys if self._seen.pop(k, None) is not None]
        self._unsaved.extend(_key_encoder.encode(_Pruned(k)) + b"\n" for k in gone)

    def save(self, path: str, results_offset: int, pending: list[str],
             intake: IntakePosition = IntakePosition(), *, backlog_log: str = "", backlog_bytes: int = 0,
             owed: list[OwedAction] | None = None, actions_offset: int = -1) -> None:
        """Append new keys to the key log (or compact it), then replace the small state file."""
        directory = os.path.dirname(os.path.abspath(path))
        previous = self._log_name
        if not self._log_name or self._log_lines > 2 * len(self._seen) + _COMPACT_SLACK:
            size = self._compact(directory)
        else:
            size = self._append(directory)
        state = LedgerState(results_offset=results_offset, pending=pending, log_name=self._log_name,
                            log_bytes=size, intake=intake, backlog_log=backlog_log, backlog_bytes=backlog_bytes,
                            owed=owed or [], actions_offset=actions_offset)
        write_atomic(path, msgspec.json.encode(state))
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
        self._missed = {}
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


class BacklogLog:
    """The backlog on disk, in the supervisor's process: what a checkpoint writes follows what changed.

    ``write`` appends the keys that entered the backlog and those that left it since the last save
    (fsynced), or, when the log holds more than twice the live backlog, writes the whole backlog to a
    new log file; either way it returns the log's name and valid length for the state file. The old
    file is removed only once a state file names the new one (``committed``).
    """

    def __init__(self) -> None:
        self._saved: set[str] = set()
        self._last: list[str] = []  # the list last saved: an equal one costs a comparison only
        self._name = ""
        self._lines = 0
        self._size = 0
        self._stale: list[str] = []

    def write(self, directory: str, keys: list[str]) -> tuple[str, int]:
        if keys == self._last:
            return self._name, self._size
        current = set(keys)
        if not self._name or self._lines > 2 * len(current) + _COMPACT_SLACK:
            self._compact(directory, current)
        else:
            self._append(directory, current)
        self._last = keys
        return self._name, self._size

    def committed(self, directory: str) -> None:
        """A state file names the current log: files it replaced can go."""
        for name in self._stale:
            if name != self._name:
                _unlink(os.path.join(directory, name))
        self._stale = []

    def _append(self, directory: str, current: set[str]) -> None:
        lines = [_key_encoder.encode(k) + b"\n" for k in sorted(current - self._saved)]
        lines += [_key_encoder.encode(_Left(k)) + b"\n" for k in sorted(self._saved - current)]
        if not lines:
            return
        with open(os.path.join(directory, self._name), "ab") as f:
            good = f.tell()
            try:
                f.write(b"".join(lines))
                f.flush()
                os.fsync(f.fileno())
            except OSError:
                f.truncate(good)  # a partial line would make the log unreadable at the next start
                raise
            self._size = f.tell()
        self._lines += len(lines)
        self._saved = current

    def _compact(self, directory: str, current: set[str]) -> None:
        generation = int(self._name.split(".")[1]) + 1 if self._name else 1
        name = f"backlog.{generation}.log"
        data = b"".join(_key_encoder.encode(k) + b"\n" for k in current)
        write_atomic(os.path.join(directory, name), data)
        if self._name:
            self._stale.append(self._name)
        self._name, self._lines, self._size, self._saved = name, len(current), len(data), current

    def load(self, directory: str, name: str, size: int) -> list[str]:
        """Read the log up to the length the state file names (cut off what a crash added after); the keys, sorted."""
        path = os.path.join(directory, name)
        repair = f"run `imgworker repair --state-dir {directory}`"
        try:
            with open(path, "rb+") as f:
                data = f.read(size)
                if len(data) < size:
                    raise StateError(f"backlog log {path} is shorter than state.json says; {repair}")
                f.truncate(size)
        except FileNotFoundError:
            raise StateError(f"backlog log {path} is missing; {repair}") from None
        try:
            changes = [_backlog_decoder.decode(line) for line in data.splitlines()]
        except msgspec.DecodeError as exc:
            raise StateError(f"backlog log {path} is corrupt ({exc}); {repair}") from None
        live: dict[str, None] = {}
        for change in changes:
            if isinstance(change, str):
                live[change] = None
            else:
                live.pop(change.left, None)
        self._saved, self._name, self._lines, self._size = set(live), name, len(changes), size
        self._last = sorted(live)
        return list(self._last)


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

    def start(self) -> ProcessedSetPort:
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

    def start(self) -> ProcessedSetPort:
        theirs, ours = CTX.Pipe(duplex=False)
        manager = LedgerManager(ctx=CTX)
        with signals_blocked():
            manager.start(initializer=_manager_init, initargs=(theirs,))
        theirs.close()
        self._manager, self._lifeline = manager, ours
        proxy: ProcessedSetPort = manager.ProcessedSet()  # type: ignore[attr-defined]
        return proxy

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
    """What a restore found: unfinished keys, results whose actions are redone, actions owed by the last run.

    ``redo`` holds the results from the checkpoint's watermark ``offset`` on, each with its own offset;
    ``owed`` the actions given up before it, each with the result line it belongs to. ``readmitted``:
    keys ``imgworker retry`` re-admitted since the last checkpoint that have no result since (they are
    also in ``pending``).
    """

    pending: list[str]
    redo: list[tuple[int, Result]]
    offset: int
    intake: IntakePosition = IntakePosition()
    owed: list[tuple[OwedAction, Result]] = []
    readmitted: list[str] = []


class Ledger:
    """The supervisor's handle on the processed set: buffered adds, own flush order, restart on loss."""

    def __init__(self, state_path: str, results_path: str, backend: ProcessedSetBackend | None = None) -> None:
        self.state_path = state_path
        self.results_path = results_path
        self.backend: ProcessedSetBackend = backend if backend is not None else ManagerBackend()
        self._set: Any = None
        self._done: list[str] = []
        self._pruned: dict[str, None] = {}  # pruned since the last save, and not finished again since
        self._backlog = BacklogLog()
        self.directory = os.path.dirname(os.path.abspath(state_path))
        self.restarts = 0

    def start(self) -> Restored:
        """Start the backend and load the processed set, the backlog and the owed actions from disk."""
        self._set = self.backend.start()
        restored, state = self._restore()
        if state.backlog_log:
            backlog = self._backlog.load(self.directory, state.backlog_log, state.backlog_bytes)
            restored.intake = msgspec.structs.replace(restored.intake, backlog=backlog)
        return restored

    def _restore(self) -> tuple[Restored, LedgerState]:
        state = self._set.load(self.state_path)
        size = os.path.getsize(self.results_path) if os.path.exists(self.results_path) else 0
        if max(state.results_offset, state.actions_from) > size:
            raise StateError(
                f"results file {self.results_path} is shorter ({size} bytes) than the state file says "
                f"({max(state.results_offset, state.actions_from)}); it was replaced or truncated. Run "
                f"`imgworker repair --state-dir {self.directory}` to rebuild the state from it"
            )
        redo: list[tuple[int, Result]] = []
        keys: list[str] = []
        readmitted: dict[str, None] = {}
        marked: dict[str, int] = {}  # key -> offset of its last re-admission line
        start = min(state.results_offset, state.actions_from)
        for offset, entry in read_entries_at(self.results_path, offset=start) if size else ():
            if isinstance(entry, Retried):
                if offset >= state.results_offset:  # before it, the key log has its prune
                    if keys:  # in file order: a result before the re-admission is superseded
                        self._set.add_many(keys)
                    keys = []
                    self._set.discard_many([entry.retried])
                    readmitted[entry.retried] = None
                marked[entry.retried] = offset
                continue
            if offset >= state.results_offset:  # before it, the key log has the key (or its prune)
                keys.append(entry.key)
                readmitted.pop(entry.key, None)
            if len(keys) == 1000:
                self._set.add_many(keys)
                keys = []
            if offset >= state.actions_from:
                redo.append((offset, entry))
        if keys:
            self._set.add_many(keys)
        redo = [(o, r) for o, r in redo if o > marked.get(r.key, -1)]  # a superseded line's actions are not redone
        # nor those given up: a re-admission comes after the run that gave them up, so it is read here
        owed = [(e, r) for e, r in self._read_owed(state.owed, before=state.actions_from)
                if e.line > marked.get(e.key, -1)]
        waiting = set(state.pending)
        pending = state.pending + [k for k in readmitted if k not in waiting]
        restored = Restored(pending=pending, redo=redo, offset=state.actions_from, intake=state.intake,
                            owed=owed, readmitted=list(readmitted))
        return restored, state

    def _read_owed(self, owed: list[OwedAction], *, before: int) -> list[tuple[OwedAction, Result]]:
        """Each owed action with its result line; one whose line is not there (any more) is dropped, logged."""
        out = []
        for entry in owed:
            if entry.line >= before:
                continue  # its line is redone whole
            try:
                found = next(read_results_at(self.results_path, offset=entry.line), None)
            except (StateError, OSError):
                found = None
            if found is None or found[1].key != entry.key:
                log.warning("owed %s of %s: its result line is not at byte %d of %s; not redone", entry.action,
                            entry.key, entry.line, self.results_path)
                continue
            out.append((entry, found[1]))
        return out

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
            self._restore()  # the backlog is not reloaded: the live one is in the supervisor
            if self._pruned:
                fresh.discard_many(list(self._pruned))  # disk has them until the next save
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
        self._pruned.pop(key, None)

    def filter_new(self, keys: list[str]) -> set[str]:
        return set(self._call(lambda s: s.filter_new(keys)))

    def begin_sweep(self) -> None:
        self._call(lambda s: s.begin_sweep())

    def end_sweep(self, *, events: bool = False, position_ns: int = 0) -> int:
        """Prune what two complete sweeps missed; with ``events``, only what no replay from ``position_ns`` reaches."""
        pruned: list[str] = self._call(lambda s: s.end_sweep(events=events, position_ns=position_ns))
        self._pruned.update(dict.fromkeys(pruned))
        return len(pruned)

    def size(self) -> int:
        return int(self._call(lambda s: s.size()))

    def save(self, offset: int, unfinished: list[str], intake: IntakePosition = IntakePosition(),
             owed: list[OwedAction] | None = None, *, actions_from: int | None = None) -> None:
        """Write the backlog's changes to its log, then the processed set's and the state file.

        ``offset``: every line before it has its key in the set (the results fsynced so far);
        ``actions_from``: every result action before it is done (the janitor's watermark; default ``offset``).
        """
        name, size = self._backlog.write(self.directory, intake.backlog)
        position = msgspec.structs.replace(intake, backlog=[])
        actions = -1 if actions_from is None or actions_from == offset else actions_from
        self._call(lambda s: s.save(self.state_path, offset, unfinished, position, backlog_log=name,
                                    backlog_bytes=size, owed=owed, actions_offset=actions))
        self._pruned = {}
        self._backlog.committed(self.directory)

    def stop(self) -> None:
        self.backend.stop()
