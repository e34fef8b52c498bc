"""Which listed objects are images to analyse, and what their keys say (pure functions)."""

from __future__ import annotations

import datetime as dt
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
    rel = relative_key(key, prefix)
    if not rel or rel.endswith("/"):
        return False
    if not rel.lower().endswith(tuple(e.lower() for e in cfg.extensions)):
        return False
    if any(rel.startswith(p) for p in cfg.exclude_prefixes):
        return False
    parts = rel.split("/")
    if parts[-1].startswith("preview_"):
        return False
    return not any(part.startswith(".") for part in parts)


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
    """Filter a listing page to images and fill in their task fields."""
    out = []
    for ref in page:
        if is_image(ref.key, prefix=prefix, cfg=cfg):
            task_type, task_id = parse_task(ref.key, prefix)
            out.append(ImageRef(key=ref.key, task_type=task_type, task_id=task_id, size=ref.size, mtime=ref.mtime))
    return out
