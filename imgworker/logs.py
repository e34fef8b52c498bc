"""Logging set-up shared by the CLI (main process) and worker processes (spawned, so set up again)."""

from __future__ import annotations

import logging
import sys

import msgspec


class LogSettings(msgspec.Struct, frozen=True):
    """How to log; chosen once by the CLI and handed to every child process."""

    level: str = "INFO"
    json: bool = False


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                "message": record.getMessage(), "pid": record.process}
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(data).decode()


def setup_logging(settings: LogSettings) -> None:
    """Human lines (or JSON lines) on stderr; noisy libraries only from WARNING."""
    handler = logging.StreamHandler(sys.stderr)
    text = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(_JsonFormatter() if settings.json else text)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    # urllib3 logs request lines, which would include presigned query strings.
    for noisy in ("urllib3", "aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def current_settings() -> LogSettings:
    """The settings in force in this process (what a child should use)."""
    root = logging.getLogger()
    as_json = any(isinstance(h.formatter, _JsonFormatter) for h in root.handlers)
    return LogSettings(level=logging.getLevelName(root.level), json=as_json)
