"""Which listed objects are images to analyse, and what their keys say (pure functions)."""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Iterable

from .config import ScanConfig
from .outcomes import ImageRef

_STAMP = re.compile(r"^(\d{8}-\d{6}(?:\.\d{1,6})?)\.[A-Za-z0-9]+$")


def relative_key(key: str, prefix: str) -> str:
    """The key below the configured prefix."""
    return key[len(prefix):].lstrip("/") if prefix and key.startswith(prefix) else key


def is_image(key: str, *, prefix: str, cfg: ScanConfig) -> bool:
    """Images only: wanted extension, not excluded, no preview_*, no hidden path part."""
    return _is_image(relative_key(key, prefix), _lowered(tuple(cfg.extensions)), tuple(cfg.exclude_prefixes))


def _is_image(rel: str, extensions: tuple[str, ...], excluded: tuple[str, ...]) -> bool:
    """``is_image`` on the key below the prefix, with the extensions in lower case."""
    if not rel or rel.endswith("/") or not rel.lower().endswith(extensions) or rel.startswith(excluded):
        return False
    if rel.rpartition("/")[2].startswith("preview_"):
        return False
    return not rel.startswith(".") and "/." not in rel  # no path part starts with a dot


@functools.lru_cache(maxsize=8)
def _lowered(extensions: tuple[str, ...]) -> tuple[str, ...]:
    """The extensions in lower case, once per configuration rather than once per key."""
    return tuple(e.lower() for e in extensions)


def parse_task(key: str, prefix: str) -> tuple[str, str]:
    """(task_type, task_id) from ``<prefix>/<task_type>/<task_id>/<file>``; empty when not laid out so."""
    parts = relative_key(key, prefix).split("/")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        return "", ""
    return parts[0], parts[1]


def captured_at(key: str) -> float | None:
    """Capture time from a ``YYYYMMDD-HHMMSS.mmm`` file name, as UTC epoch seconds."""
    match = _STAMP.match(key.rsplit("/", 1)[-1])
    if not match:
        return None
    stamp = match.group(1)
    fmt = "%Y%m%d-%H%M%S.%f" if "." in stamp else "%Y%m%d-%H%M%S"
    try:
        return dt.datetime.strptime(stamp, fmt).replace(tzinfo=dt.timezone.utc).timestamp()
    except ValueError:
        return None


def select_images(page: Iterable[ImageRef], *, prefix: str, cfg: ScanConfig) -> list[ImageRef]:
    """Filter a listing page to images and fill in their task fields (``is_image`` and ``parse_task`` per key)."""
    extensions, excluded = _lowered(tuple(cfg.extensions)), tuple(cfg.exclude_prefixes)
    out = []
    for ref in page:
        rel = relative_key(ref.key, prefix)
        if _is_image(rel, extensions, excluded):
            parts = rel.split("/")
            if len(parts) != 3 or not parts[0] or not parts[1]:
                parts = ["", ""]
            out.append(ImageRef(ref.key, parts[0], parts[1], ref.size, ref.mtime, ref.etag))
    return out
