"""Worker kills placed by progress, not by time: the same kills on a fast machine and on a slow one."""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Callable

import psutil

from tests.support.cli import workers_of


def kill_workers_at_progress(proc: subprocess.Popen[str], rng: random.Random, *, kills: int, every: int,
                             progress: Callable[[], int], within_s: float = 120.0) -> int:
    """SIGKILL one of the run's worker processes, chosen by ``rng``, each time ``progress()`` (result
    lines, say) has grown by ``every``: the n-th kill once it reaches ``n * every``. Return how many.

    The caller chooses ``kills * every`` well below the run's total, so the run cannot end before the
    last kill; ``within_s`` only turns a stuck run into a short count.
    """
    done = 0
    deadline = time.monotonic() + within_s
    while proc.poll() is None and done < kills and time.monotonic() < deadline:
        if progress() >= (done + 1) * every and _kill_one(proc.pid, rng):
            done += 1
            continue
        time.sleep(0.02)
    return done


def _kill_one(pid: int, rng: random.Random) -> bool:
    victims = workers_of(pid)
    if not victims:
        return False  # between a death and its replacement: try again at the next look
    try:
        rng.choice(victims).kill()
    except psutil.NoSuchProcess:
        return False
    return True
