"""The append-only results file: one msgspec JSON line per terminal outcome, and the re-admissions.

A corrupt complete line is a StateError when read (``imgworker repair`` moves it aside); an
incomplete last line is a crash mid-write and is not a result.

``imgworker retry`` appends a ``Retried`` line (``{"retried": KEY, ...}``) for each image it
re-admits. It is not an outcome: it says that the key's earlier lines are superseded, so a start
takes the key out of the processed set and queues it, and the image's next result line becomes
its one latest outcome. ``read_results`` yields only the results; ``read_entries_at`` yields both.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import msgspec

from .errors import StateError
from .files import write_atomic
from .outcomes import Result


class Retried(msgspec.Struct, frozen=True, omit_defaults=True):
    """A line that re-admits an image: its latest outcome (``was``, ``cause``) is analysed again."""

    retried: str
    was: str = ""
    cause: str = ""
    at: float = 0.0


_decoder = msgspec.json.Decoder(Result)
_retried_decoder = msgspec.json.Decoder(Retried)
_RETRIED_START = b'{"retried":'


def _decode(line: bytes) -> Result | Retried:
    """A result line, or a re-admission line; DecodeError if it is neither."""
    try:
        return _decoder.decode(line)
    except msgspec.DecodeError:
        if not line.startswith(_RETRIED_START):
            raise
        return _retried_decoder.decode(line)


def truncate_partial_line(path: str) -> None:
    """Cut a trailing line without newline, left by a crash mid-write."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(max(0, size - 65536))
            tail = f.read()
            if tail.endswith(b"\n"):
                return
            cut = tail.rfind(b"\n")
            f.truncate(size - len(tail) + cut + 1 if cut >= 0 else max(0, size - len(tail)))
    except FileNotFoundError:
        return


def read_results(path: str, *, offset: int = 0) -> Iterator[Result]:
    """Yield complete result lines from ``offset``; an incomplete last line is ignored.

    A complete line that does not decode raises StateError naming the line (1-based, counted from
    ``offset``) and its byte offset: skipping it would analyse that image again without a word.
    """
    for _, result in read_results_at(path, offset=offset):
        yield result


def read_results_at(path: str, *, offset: int = 0) -> Iterator[tuple[int, Result]]:
    """Like ``read_results``, with the byte offset each line starts at."""
    for position, entry in read_entries_at(path, offset=offset):
        if isinstance(entry, Result):
            yield position, entry


def read_entries_at(path: str, *, offset: int = 0) -> Iterator[tuple[int, Result | Retried]]:
    """Every complete line from ``offset``, results and re-admissions, with the byte offset it starts at."""
    position = offset
    with open(path, "rb") as f:
        f.seek(offset)
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                return
            try:
                yield position, _decode(line)
            except msgspec.DecodeError as exc:
                raise StateError(_corrupt_message(path, number, offset, position, exc)) from None
            position += len(line)


def _corrupt_message(path: str, number: int, start: int, position: int, exc: msgspec.DecodeError) -> str:
    """What is wrong, where, and the command that moves corrupt lines aside (only for a results file)."""
    if not _has_results(path):
        return (f"{path} is not an imgworker results file (no line of it is a result: {str(exc)[:120]}); "
                "give the results file of a run (STATE_DIR/results.jsonl, or run.results_file)")
    directory, name = os.path.split(os.path.abspath(path))
    fix = f"--state-dir {directory}" if name == "results.jsonl" else f"--state-dir DIR --results {path}"
    if start:
        where = f"the line at byte offset {position} (line {number} after the checkpoint at byte {start})"
    else:
        where = f"line {number} (byte offset {position})"
    return (
        f"results file {path}: {where} is corrupt ({str(exc)[:120]}); "
        f"run `imgworker repair {fix}` to move corrupt lines to {path}.corrupt"
    )


def _has_results(path: str, lines: int = 1000) -> bool:
    """Whether any of the first ``lines`` complete lines of ``path`` is a result or a re-admission."""
    with open(path, "rb") as f:
        for number, line in enumerate(f):
            if number >= lines:
                return False
            if _is_result(line):
                return True
    return False


def repair_results(path: str) -> tuple[int, int]:
    """Move corrupt lines of ``path`` to ``<path>.corrupt`` (appended) and keep the rest; return (kept, moved).

    An incomplete last line (a crash mid-write) is moved too, with a newline added. The results file is
    rewritten atomically, after the moved lines are durable, and only when something was moved.
    """
    with open(path, "rb") as f:
        good, bad = _split_lines(f)
    if bad:
        _append_durably(path + ".corrupt", bad)
        write_atomic(path, b"".join(good))
    return len(good), len(bad)


def offsets_after_repair(path: str) -> dict[int, tuple[int, bool]]:
    """For each line start (and the end) of ``path``: where it falls once ``repair_results`` ran, and if it is kept.

    A line moved aside maps to the start of the next line kept.
    """
    mapped: dict[int, tuple[int, bool]] = {}
    old = new = 0
    with open(path, "rb") as f:
        for line in f:
            kept = _is_result(line)
            mapped[old] = (new, kept)
            new += len(line) if kept else 0
            old += len(line)
    mapped[old] = (new, False)
    return mapped


def _is_result(line: bytes) -> bool:
    if not line.endswith(b"\n"):
        return False
    try:
        _decode(line)
    except msgspec.DecodeError:
        return False
    return True


def _split_lines(lines: Iterable[bytes]) -> tuple[list[bytes], list[bytes]]:
    """(lines that decode as results, lines that do not), every line ending in a newline."""
    good: list[bytes] = []
    bad: list[bytes] = []
    for line in lines:
        if _is_result(line):
            good.append(line)
        else:
            bad.append(line if line.endswith(b"\n") else line + b"\n")
    return good, bad


def _append_durably(path: str, lines: list[bytes]) -> None:
    with open(path, "ab") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
