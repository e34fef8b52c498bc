"""The camera simulator: uploads images as ``<prefix>/<task_type>/<task_id>/<YYYYMMDD-HHMMSS.mmm>.jpg``."""

from __future__ import annotations

import datetime as dt
import io
import itertools
import logging
import random
import time
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

_PHOTOS = ("astronaut", "chelsea", "coffee", "camera", "cat", "rocket", "immunohistochemistry", "retina")


def jpeg(array: np.ndarray, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def photo_frames() -> list[bytes]:
    """Real photos shipped with scikit-image (empty when it is not installed)."""
    try:
        from skimage import data
    except ImportError:
        return []
    frames = []
    for name in _PHOTOS:
        try:
            frames.append(jpeg(getattr(data, name)()))
        except Exception:  # a photo that needs a download in some versions is simply left out
            continue
    return frames


def generated_frames(count: int, seed: int = 0, size: tuple[int, int] = (240, 320)) -> list[bytes]:
    """Synthetic frames: gradients with noise and a moving block, like a static camera."""
    rng = np.random.default_rng(seed)
    h, w = size
    frames = []
    for i in range(count):
        base = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, axis=0)
        img = np.stack([base, base[::-1], np.full((h, w), 80.0 + i % 100)], axis=-1)
        img += rng.normal(0, 12, img.shape)
        x = (i * 17) % (w - 40)
        img[60:100, x : x + 40] = 255
        frames.append(jpeg(np.clip(img, 0, 255).astype(np.uint8)))
    return frames


def frame_source(seed: int = 0) -> Iterator[bytes]:
    """Frames drawn at random, endlessly; all are made here, so the first is not late (a busy host takes seconds)."""
    frames = photo_frames() + generated_frames(8, seed)
    rng = random.Random(seed)
    return (rng.choice(frames) for _ in itertools.count())


class Cameras:
    """Names keys the way cameras do, never the same key twice."""

    def __init__(self, prefix: str, task_types: list[str], tasks_per_type: int) -> None:
        self.prefix = prefix.strip("/")
        self.tasks = [(t, f"task-{i:03d}") for t in task_types for i in range(tasks_per_type)]
        self._last: dict[tuple[str, str], int] = {}
        self._turn = 0

    def next_key(self, now: float) -> str:
        task = self.tasks[self._turn % len(self.tasks)]
        self._turn += 1
        ms = max(int(now * 1000), self._last.get(task, 0) + 1)
        self._last[task] = ms
        stamp = dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc)
        name = stamp.strftime("%Y%m%d-%H%M%S.") + f"{ms % 1000:03d}.jpg"
        parts = [self.prefix] if self.prefix else []
        return "/".join(parts + [task[0], task[1], name])


def run_loadgen(
    put: Callable[[str, bytes], None],
    *,
    rate: float,
    duration_s: float,
    cameras: Cameras,
    seed: int = 0,
    should_stop: Callable[[], bool] = lambda: False,
) -> int:
    """Upload at ``rate`` images/s for ``duration_s`` (0 = until stopped); return how many."""
    frames = frame_source(seed)
    start = time.monotonic()
    sent = 0
    while not should_stop():
        now = time.monotonic()
        if duration_s and now - start >= duration_s:
            break
        due = start + sent / rate
        if due > now:
            time.sleep(min(due - now, 0.2))
            continue
        put(cameras.next_key(time.time()), next(frames))
        sent += 1
    log.info("loadgen: uploaded %d images in %.1f s", sent, time.monotonic() - start)
    return sent
