"""This host's claims written to the shared ledger and not yet in its results file (``<state_dir>/cluster-claims.jsonl``).

A claim's record is appended and fsynced before its ledger write is sent, and is done once the
results line is written (or the write lost the race). A host killed in between (SIGKILL, power,
a results write that failed, a forced stop while a write's answer was lost) leaves the record;
at its next start ``ClusterHost.recover`` looks each one up in the ledger and, where this claim's
own entry is there and the results file has no line for it, writes the line and plans its
actions. The file holds only a checkpoint interval's worth of records: it is rewritten with the
claims still open whenever it grows past ``COMPACT_AT`` records.
"""

from __future__ import annotations

import contextlib
import os

import msgspec

from ..errors import StateError
from ..files import fsync_directory

#: Records in the file before it is rewritten with the open claims only.
COMPACT_AT = 4096


class Intent(msgspec.Struct, frozen=True):
    """One claim: which image version, the claim's token, and the results file's size when it was made."""

    token: str
    key: str
    version: str
    at: int  # the results file's size before the claim: its line, if written, starts at or after it


class Intents:
    """The open claims of this host, in memory and in an append-only file fsynced per record."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.open: dict[str, Intent] = {}
        self._fd: int | None = None
        self._records = 0

    def load(self) -> list[Intent]:
        """The records a previous run left (a torn last line is ignored): all of them are open until resolved."""
        found: list[Intent] = []
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as f:
            for line in f:
                with contextlib.suppress(msgspec.DecodeError):
                    found.append(msgspec.json.decode(line, type=Intent))
        self.open = {i.token: i for i in found}
        self._records = len(found)
        return found

    def add(self, intent: Intent) -> None:
        """Durably record a claim before its ledger write is sent; a failure is fatal (as a results write's is)."""
        data = msgspec.json.encode(intent) + b"\n"
        try:
            if self._fd is None:
                self._reopen()
            assert self._fd is not None
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fdatasync(self._fd)
        except OSError as exc:
            raise StateError(f"cannot record a claim in {self.path}: {exc.strerror or exc}") from None
        self.open[intent.token] = intent
        self._records += 1

    def done(self, token: str) -> None:
        """The claim's line is written, or it was not this host's: nothing to recover for it."""
        self.open.pop(token, None)
        if self._records >= COMPACT_AT and len(self.open) < COMPACT_AT // 2:
            self.compact()

    def compact(self) -> None:
        """Rewrite the file with the open claims only (atomically: a crash leaves the old or the new one)."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(b"".join(msgspec.json.encode(i) + b"\n" for i in self.open.values()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_directory(os.path.dirname(os.path.abspath(self.path)))
        self._records = len(self.open)
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _reopen(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        created = not os.path.exists(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if created:
            fsync_directory(os.path.dirname(os.path.abspath(self.path)))
