"""When images expire elsewhere (S3 lifecycle, another program), estimate which queued ones will
be gone before a worker reaches them.

Two declared rules, either or both: images older than ``external_max_age_s`` are deleted, and each
task directory keeps only its newest ``external_max_count``. For the count rule an image's expiry
depends on how many newer images its directory holds now and how fast new ones arrive.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

from .cleaner import image_time, stored_image
from .config import RetentionConfig
from .outcomes import ImageRef

_RATE_WINDOW_S = 10.0


class ExpiryEstimator:
    """Keeps, per task directory, the capture times of the newest accepted images."""

    def __init__(self, cfg: RetentionConfig, prefix: str) -> None:
        self.max_age_s = cfg.external_max_age_s
        self.max_count = cfg.external_max_count
        self.prefix = prefix
        self._recent: dict[str, list[float]] = defaultdict(list)

    @property
    def enabled(self) -> bool:
        return bool(self.max_age_s or self.max_count)

    def observe(self, ref: ImageRef) -> None:
        """An image entered the system: it counts as newer than those before it in its directory."""
        if not self.max_count:
            return
        times = self._recent[stored_image(ref, self.prefix).group]
        bisect.insort(times, image_time(ref))
        if len(times) > 2 * self.max_count + 64:
            del times[: len(times) - self.max_count - 32]

    def arrival_rate(self, group: str, now: float) -> float:
        """Images per second arriving in a directory, over the last few seconds of capture time."""
        times = self._recent.get(group, [])
        recent = len(times) - bisect.bisect_left(times, now - _RATE_WINDOW_S)
        return recent / _RATE_WINDOW_S

    def would_expire(self, ref: ImageRef, *, within_s: float, now: float) -> bool:
        """True if the image is likely gone ``within_s`` seconds from ``now``."""
        ts = image_time(ref)
        if ts <= 0:
            return False  # capture time unknown (e.g. resumed from state): never guess it expired
        if self.max_age_s and ts + self.max_age_s < now + within_s:
            return True
        if not self.max_count:
            return False
        group = stored_image(ref, self.prefix).group
        times = self._recent.get(group, [])
        newer = len(times) - bisect.bisect_right(times, ts)
        return newer + self.arrival_rate(group, now) * within_s >= self.max_count
