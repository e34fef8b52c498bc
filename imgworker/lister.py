"""The lister process: lists the bucket page by page and filters it, off the supervisor's loop.

Listing and XML parsing cost milliseconds per 1,000 keys (``listing``); done in the supervisor they
would delay every dispatch and every reply behind them. The supervisor asks for a sweep; the
lister sends filtered pages, then an end marker saying whether the listing was complete. The
pipe gives back-pressure: while the supervisor does not read, the lister waits.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
import logging
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from .children import STOP, ChildHandle, child_setup
from .config import Config
from .errors import StoreError
from .logs import LogSettings
from .outcomes import ImageRef
from .ports import ObjectStore
from .scanner import relative_key, select_images

log = logging.getLogger(__name__)


class SweepRequest(msgspec.Struct, array_like=True):
    """One listing: the whole prefix (``full``), or each task directory from its checkpoint (incremental)."""

    checkpoints: dict[str, str] = {}
    full: bool = True


class ListingPage(msgspec.Struct, tag="page", array_like=True):
    refs: list[ImageRef]


class ListingEnd(msgspec.Struct, tag="end", array_like=True):
    ok: bool
    error: str = ""


ListingMessage = ListingPage | ListingEnd
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ListingMessage)
_request_decoder = msgspec.msgpack.Decoder(SweepRequest)


def lister_main(cfg: Config, conn: Connection, log_settings: LogSettings) -> None:
    """Entry point of the lister process: one sweep per request, until STOP or the supervisor is gone."""
    child_setup("scanner", log_settings)
    from .store import Store

    store = Store(cfg.store, cfg.credentials, read_timeout_s=cfg.store.list_timeout_s)
    while True:
        try:
            message = conn.recv_bytes()
            if message == STOP:
                return
            request = _request_decoder.decode(message)
            for reply in sweep_messages(store, cfg, None if request.full else request.checkpoints):
                conn.send_bytes(_encoder.encode(reply))
        except (EOFError, OSError):
            return


def sweep_messages(store: ObjectStore, cfg: Config, checkpoints: dict[str, str] | None = None) -> Iterator[ListingMessage]:
    """One listing as messages: filtered pages, then the end marker (ok or the store's error).

    ``checkpoints`` None lists the whole prefix, whatever the key layout; a dict (incremental) lists
    each ``<task_type>/<task_id>/`` from its checkpoint and nothing outside those directories.
    """
    try:
        for page in _pages(store, cfg, checkpoints):
            images = select_images(page, prefix=cfg.store.prefix, cfg=cfg.scan)
            if images:
                yield ListingPage(refs=images)
    except StoreError as exc:
        yield ListingEnd(ok=False, error=str(exc))
        return
    yield ListingEnd(ok=True)


def _pages(store: ObjectStore, cfg: Config, checkpoints: dict[str, str] | None) -> Iterator[list[ImageRef]]:
    """The whole prefix (``checkpoints`` None), or each ``<task_type>/<task_id>/`` after its checkpoint key."""
    prefix = cfg.store.prefix
    if checkpoints is None:
        yield from store.list_pages(prefix, cfg.scan.page_size)
        return
    for kind in store.list_dirs(prefix):
        if any(relative_key(kind, prefix).startswith(p) for p in cfg.scan.exclude_prefixes):
            continue  # alert copies and result objects are never analysed
        for directory in store.list_dirs(kind):
            relative = relative_key(directory, prefix).rstrip("/")
            yield from store.list_pages(directory, cfg.scan.page_size, start_after=checkpoints.get(relative, ""))


class Lister(ChildHandle):
    """The supervisor's handle on the lister process."""

    def __init__(self, cfg: Config, log_settings: LogSettings) -> None:
        super().__init__(lister_main, (cfg, log_settings), "imgworker-scanner")

    def request_sweep(self, checkpoints: dict[str, str] | None = None) -> None:
        """A listing of the whole prefix (``checkpoints`` None) or an incremental one from ``checkpoints``."""
        request = SweepRequest(checkpoints=checkpoints or {}, full=checkpoints is None)
        self.conn.send_bytes(_encoder.encode(request))

    def poll(self) -> ListingMessage | None:
        """The next message if one is buffered; EOFError/OSError if the lister is gone."""
        data = self.receive()
        return None if data is None else _decoder.decode(data)


class InlineLister:
    """Lists in the calling process when a sweep is requested: for tests with an in-memory store."""

    def __init__(self, cfg: Config, store: ObjectStore) -> None:
        self.cfg = cfg
        self.store = store
        self._messages: collections.deque[ListingMessage] = collections.deque()
        self.sweeps = 0

    def waitables(self) -> list[Any]:
        return []

    def alive(self) -> bool:
        return True

    def exitcode(self) -> int | None:
        return None

    def request_sweep(self, checkpoints: dict[str, str] | None = None) -> None:
        self.sweeps += 1
        self._messages.extend(sweep_messages(self.store, self.cfg, checkpoints))

    def poll(self) -> ListingMessage | None:
        return self._messages.popleft() if self._messages else None

    def stop(self, timeout: float = 2.0) -> None:
        self._messages.clear()
