"""The append-only results file: one msgspec JSON line per terminal outcome."""

from __future__ import annotations

import os
from collections.abc import Iterator

import msgspec

from .outcomes import Result

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Result)


class ResultsWriter:
    """Appends result lines; a line is only a result once its newline is written."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        truncate_partial_line(path)
        self.path = path
        self._file = open(path, "ab")

    def write(self, result: Result) -> None:
        self._file.write(_encoder.encode(result) + b"\n")

    def sync(self) -> int:
        """Flush and fsync; return the byte offset everything before which is durable."""
        self._file.flush()
        os.fsync(self._file.fileno())
        return self._file.tell()

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()


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
    """Yield complete result lines from ``offset``; an incomplete last line is ignored."""
    with open(path, "rb") as f:
        f.seek(offset)
        for line in f:
            if not line.endswith(b"\n"):
                return
            try:
                yield _decoder.decode(line)
            except msgspec.DecodeError:
                continue
