"""The one backoff: capped exponential delays with jitter, for retries and restarts alike.

After ``n`` consecutive failures the delay is ``min(cap_s, first_s * factor ** (n - 1))``, less a
random part of it: ``jitter`` is the share that is random (0: none; 0.5: half fixed, half
random; 1: anywhere from 0), so a jittered delay is never above the cap and many processes that
failed together do not all try again at the same instant. A success ``reset``\\ s the count.

Two ways to use it: ``delay(n)`` alone, where the caller keeps its own count (an item's attempt
number, a job's), or ``fail()``/``reset()``/``ready()``, where the ``Backoff`` keeps the count and
the time before which the next try waits. The random source and the clock are injectable, so
tests need neither luck nor sleeping.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

_MAX_EXPONENT = 64  # far past any cap: keeps factor ** n a finite float after many failures

#: First wait before a child that died before doing anything is started again.
RESTART_FIRST_S = 0.5
#: The longest such wait: a cause that is removed (a store back up, a fixed file) is noticed within it.
RESTART_CAP_S = 30.0


class Backoff:
    """Capped exponential backoff with jitter; counts consecutive failures until ``reset``."""

    def __init__(self, first_s: float, cap_s: float, *, factor: float = 2.0, jitter: float = 0.0,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"jitter must be within [0, 1], not {jitter}")
        self.first_s = first_s
        self.cap_s = cap_s
        self.factor = factor
        self.jitter = jitter
        self.rng = rng or random.Random()
        self.clock = clock
        self.failures = 0
        self.until = 0.0  # clock value before which the next try waits (0: no wait)

    def delay(self, failures: int) -> float:
        """The wait after ``failures`` consecutive failures (0 for none), jittered."""
        if failures <= 0:
            return 0.0
        ceiling = min(self.cap_s, self.first_s * self.factor ** min(failures - 1, _MAX_EXPONENT))
        random_part = ceiling * self.jitter
        return ceiling - random_part + self.rng.uniform(0.0, random_part)

    def fail(self) -> float:
        """Count one more failure; return the wait before the next try (also kept in ``until``)."""
        self.failures += 1
        wait_s = self.delay(self.failures)
        self.until = self.clock() + wait_s
        return wait_s

    def reset(self) -> None:
        """A success: the next failure waits the first delay again."""
        self.failures = 0
        self.until = 0.0

    def ready(self) -> bool:
        """The wait of the last failure is over."""
        return self.clock() >= self.until


def restart_backoff(*, rng: random.Random | None = None,
                    clock: Callable[[], float] = time.monotonic) -> Backoff:
    """How long a child process that keeps dying (a worker process, the lister) waits to be started again."""
    return Backoff(RESTART_FIRST_S, RESTART_CAP_S, jitter=0.5, rng=rng, clock=clock)
