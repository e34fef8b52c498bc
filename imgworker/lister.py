"""The lister process: lists the bucket page by page and filters it, off the supervisor's loop.

Listing and XML parsing cost tens of milliseconds per 1,000 keys; done in the supervisor they
would delay every dispatch and every reply behind them. The supervisor asks for a sweep; the
lister sends filtered pages, then an end marker saying whether the listing was complete. The
pipe gives back-pressure: while the supervisor does not read, the lister waits.
"""

from __future__ import annotations

import logging
import signal
import time
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext

import msgspec

from .config import Config
from .errors import StoreError
from .logs import LogSettings, setup_logging
from .outcomes import ImageRef
from .proctitle import set_title
from .scanner import select_images

log = logging.getLogger(__name__)

SWEEP = b"sweep"
STOP = b""


class ListingPage(msgspec.Struct, tag="page", array_like=True):
    refs: list[ImageRef]


class ListingEnd(msgspec.Struct, tag="end", array_like=True):
    ok: bool
    error: str = ""


ListingMessage = ListingPage | ListingEnd
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ListingMessage)


def lister_main(cfg: Config, conn: Connection, log_settings: LogSettings) -> None:
    """Entry point of the lister process: one sweep per request, until STOP or the supervisor is gone."""
    set_title("scanner")
    setup_logging(log_settings)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from .store import Store

    store = Store(cfg.store, cfg.credentials, read_timeout_s=cfg.store.list_timeout_s)
    while True:
        try:
            if conn.recv_bytes() != SWEEP:
                return
            sweep(store, cfg, conn)
        except (EOFError, OSError):
            return


def sweep(store: object, cfg: Config, conn: Connection) -> None:
    """List once: filtered pages, then the end marker."""
    try:
        for page in store.list_pages(cfg.store.prefix, cfg.scan.page_size):  # type: ignore[attr-defined]
            images = select_images(page, prefix=cfg.store.prefix, cfg=cfg.scan)
            if images:
                conn.send_bytes(_encoder.encode(ListingPage(refs=images)))
    except StoreError as exc:
        conn.send_bytes(_encoder.encode(ListingEnd(ok=False, error=str(exc))))
        return
    conn.send_bytes(_encoder.encode(ListingEnd(ok=True)))


class Lister:
    """The supervisor's handle on the lister process."""

    def __init__(self, ctx: SpawnContext, cfg: Config, log_settings: LogSettings) -> None:
        ours, theirs = ctx.Pipe(duplex=True)
        self.conn: Connection = ours
        self.process = ctx.Process(target=lister_main, args=(cfg, theirs, log_settings), name="imgworker-scanner")
        self.process.start()
        theirs.close()

    @property
    def sentinel(self) -> int:
        return self.process.sentinel

    def request_sweep(self) -> None:
        self.conn.send_bytes(SWEEP)

    def poll(self) -> ListingMessage | None:
        """The next message if one is buffered; EOFError/OSError if the lister is gone."""
        if not self.conn.poll():
            return None
        return _decoder.decode(self.conn.recv_bytes())

    def stop(self, timeout: float = 2.0) -> None:
        try:
            self.conn.send_bytes(STOP)
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        while self.process.is_alive() and time.monotonic() < deadline:
            try:
                while self.conn.poll(0.05):  # a lister blocked on sending must be able to finish
                    self.conn.recv_bytes()
            except (EOFError, OSError):
                break
        self.process.join(max(0.0, deadline - time.monotonic()))
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()
