"""Re-admitting images whose latest outcome matches (``imgworker retry``): a dead-letter replay.

The results file stays append-only and every image keeps exactly one latest outcome:

1. With the state directory's lock held (no run may be appending, and a run reads re-admissions
   only when it starts), the file is read once: each key's latest line.
2. Images whose latest line is a result matching the filter are selected; an image already
   re-admitted (its latest line is a ``Retried``) is not selected twice.
3. Each selected object is looked up in the store (StatObject); one that is gone is not re-admitted.
4. One ``Retried`` line per image is appended and fsynced before anything is reported.

The next run's start takes each re-admitted key out of the processed set and queues it (see
``ledger.Ledger._restore``); its next result line supersedes the old one. A crash before step 4's
write re-admits nothing; one during it leaves a cut last line (cut off at the next start) and the
lines before it, each re-admitting its image once; running ``retry`` again selects only the rest.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone

import msgspec

from .errors import ConfigError, ObjectMissing
from .outcomes import Outcome, Result
from .results import Retried, read_entries_at, truncate_partial_line

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_encoder = msgspec.json.Encoder()


class Selection(msgspec.Struct, frozen=True):
    """Which images to re-admit: latest outcome in ``outcomes``, and optionally its cause, age and key prefix."""

    outcomes: tuple[Outcome, ...]
    cause: str = ""
    since: float = 0.0  # epoch seconds: the outcome was recorded at or after this
    key_prefix: str = ""

    def matches(self, result: Result) -> bool:
        return (result.outcome in self.outcomes and (not self.cause or result.cause == self.cause)
                and result.finished_at >= self.since and result.key.startswith(self.key_prefix))


class Found(msgspec.Struct, frozen=True):
    """What the results file says: the images selected, and how many are already re-admitted."""

    selected: list[Result]
    awaiting: int


def parse_since(text: str, *, now: float) -> float:
    """An ISO 8601 time (no zone: local time) or an age such as 90s, 30m, 2h, 1d; epoch seconds."""
    age = _AGE.match(text)
    if age:
        return now - float(age.group(1)) * _UNIT_S[age.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(f"--since: value {text!r} is not allowed (a time such as 2024-05-01T12:00 or "
                          "2024-05-01T12:00:00+00:00, or an age such as 90s, 30m, 2h, 1d)") from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # local time, as the user reads a clock
    return moment.astimezone(timezone.utc).timestamp()


def find(path: str, selection: Selection) -> Found:
    """Each key's latest line in ``path``; the results that match, and the keys already awaiting re-analysis."""
    latest: dict[str, Result | Retried] = {}
    for _, entry in read_entries_at(path):
        latest[entry.retried if isinstance(entry, Retried) else entry.key] = entry
    selected = [e for e in latest.values() if isinstance(e, Result) and selection.matches(e)]
    awaiting = sum(1 for e in latest.values() if isinstance(e, Retried))
    return Found(selected=selected, awaiting=awaiting)


def still_stored(results: Iterable[Result], stat: Callable[[str], int]) -> tuple[list[Result], list[str]]:
    """(results whose object still exists, keys whose object is gone); other store errors propagate."""
    present: list[Result] = []
    gone: list[str] = []
    for result in results:
        try:
            stat(result.key)
        except ObjectMissing:
            gone.append(result.key)
            continue
        present.append(result)
    return present, gone


def readmit(path: str, results: list[Result], *, now: float | None = None) -> None:
    """Append one ``Retried`` line per result to ``path`` and fsync it; the caller holds the state lock."""
    if not results:
        return
    at = time.time() if now is None else now
    data = b"".join(_encoder.encode(Retried(retried=r.key, was=r.outcome.value, cause=r.cause, at=at)) + b"\n"
                    for r in results)
    truncate_partial_line(path)  # a line cut by a crash would swallow the first re-admission
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
