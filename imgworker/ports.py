"""The contracts between the supervisor's owners and what they drive: the store and the processed set.

Each protocol is what the owners call, no more; an implementation plugs in behind it without the
owners changing. ``store.Store`` (minio) and ``memstore.MemoryStore`` are both ``ObjectStore``s;
``ledger.LocalBackend`` and ``ledger.ManagerBackend`` are both ``ProcessedSetBackend``s, and
``ledger.Ledger`` is the ``OutcomeLedger`` intake asks; ``recorder.Recorder`` is the ``OutcomeSink``
every owner ends images through; ``cluster.host.ClusterHost`` is the ``OutcomeClaims`` it asks first in
cluster mode; the pool's contract is ``pool.Pool``. mypy checks every implementation against its protocol where the
supervisor's ``Parts`` are built.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

from .outcomes import ImageRef, IntakePosition, Outcome, Result

if TYPE_CHECKING:
    from .janitor import OwedAction
    from .ledger import LedgerState, Restored


class ObjectStore(Protocol):
    """The object store as imgworker uses it; every error is one of ``errors.StoreError``'s kinds.

    ``StoreUnavailable`` is transient (retry), ``ObjectMissing`` is permanent for that key, and
    ``StoreFatal`` comes only from ``check`` at start.
    """

    @property
    def bucket(self) -> str: ...

    def check(self) -> None:
        """Fail fast at start: endpoint, credentials, TLS and bucket (``StoreFatal``)."""

    def stat(self, key: str) -> int:
        """The object's size; ``ObjectMissing`` if it is gone."""

    def probe(self, key: str) -> None:
        """Read the first byte, as the algorithm service's GET would: is the data path up?"""

    def presign(self, key: str, expiry_s: int) -> str:
        """A presigned GET URL for ``key``, valid ``expiry_s`` seconds (a secret: never logged whole)."""

    def put(self, key: str, data: bytes, content_type: str = ...) -> None:
        """Write an object (result documents)."""

    def copy(self, source: str, target: str) -> None:
        """Server-side copy within the bucket (alert copies)."""

    def delete(self, keys: Iterable[str]) -> list[str]:
        """Batch delete; the keys the store refused."""

    def list_dirs(self, prefix: str) -> list[str]:
        """The common prefixes (ending in ``/``) directly below ``prefix``."""

    def list_pages(self, prefix: str, page_size: int, start_after: str = ...) -> Iterator[list[ImageRef]]:
        """Every object under ``prefix`` after ``start_after``, in key order, lazily, one page at a time."""


class ProcessedSet(Protocol):
    """The set of keys with a recorded outcome, as the ledger calls it (one call per page, not per key)."""

    def filter_new(self, keys: list[str]) -> list[str]:
        """The keys not in the set; those in it are marked as seen by the current sweep."""

    def add_many(self, keys: list[str]) -> None:
        """Record keys that reached their outcome."""

    def contains(self, key: str) -> bool: ...

    def size(self) -> int: ...

    def begin_sweep(self) -> None:
        """A full listing begins: keys it lists are marked with a new generation."""

    def end_sweep(self, *, events: bool = ..., position_ns: int = ...) -> list[str]:
        """Drop keys the last two full listings did not see (with events, out of any replay's reach); those dropped."""

    def discard_many(self, keys: list[str]) -> None:
        """Forget keys again: a rebuild from disk brought back keys pruned since the last save."""

    def save(self, path: str, results_offset: int, pending: list[str], intake: IntakePosition = ..., *,
             backlog_log: str = ..., backlog_bytes: int = ..., owed: list[OwedAction] | None = ...,
             actions_offset: int = ...) -> None:
        """Make the set and the small state file durable (see ``ledger``'s docstring for the layout)."""

    def load(self, path: str) -> LedgerState:
        """Fill the set from the state file at ``path`` and the key log it names."""


class ProcessedSetBackend(Protocol):
    """Where the processed set lives: this process, or a Manager process that may die and be replaced."""

    def start(self) -> ProcessedSet:
        """A fresh, empty set (the ledger fills it from disk)."""

    def alive(self) -> bool: ...

    def stop(self) -> None: ...


class OutcomeLedger(Protocol):
    """Which images already have an outcome: what intake asks before it takes an image in.

    ``add`` is called once per outcome, after its results line is written; ``filter_new`` answers
    for a whole page. ``save`` and ``start`` make it survive a restart; ``begin_sweep``/``end_sweep``
    bracket a full listing, after which keys of objects that are gone may be forgotten.
    """

    def start(self) -> Restored: ...

    def add(self, key: str) -> None: ...

    def filter_new(self, keys: list[str]) -> set[str]: ...

    def begin_sweep(self) -> None: ...

    def end_sweep(self, *, events: bool = ..., position_ns: int = ...) -> int: ...

    def size(self) -> int: ...

    def save(self, offset: int, unfinished: list[str], intake: IntakePosition = ...,
             owed: list[OwedAction] | None = ..., *, actions_from: int | None = ...) -> None: ...

    def stop(self) -> None: ...


class OutcomeSink(Protocol):
    """Where every image ends: ``recorder.Recorder``, the one writer of results lines.

    ``finish`` records an outcome (its line first, then everything that follows from it); ``drop``
    ends an image no lane will see, and only then takes it out of the queue or the backlog;
    ``accepted`` counts an image taken in, which from then on owes exactly one outcome.
    """

    def finish(self, result: Result) -> None: ...

    def drop(self, ref: ImageRef, outcome: Outcome, cause: str) -> None: ...

    def accepted(self, ref: ImageRef) -> None: ...


class OutcomeClaims(Protocol):
    """Cluster mode's outcome ledger, asked by the sink before it ends an image (``cluster.host.ClusterHost``).

    ``claim`` writes the outcome to the shared ledger if no host did: only then is it counted here
    (results line, figures, actions). ``settled`` follows the local write: the image's message may go.
    """

    def claim(self, result: Result) -> bool: ...

    def settled(self, result: Result) -> None: ...
