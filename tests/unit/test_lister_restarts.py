"""A lister that dies at start, again and again, is replaced after a growing backoff, not at every step."""

from __future__ import annotations

from typing import Any

import pytest

from imgworker.backoff import restart_backoff
from imgworker.config import load_config
from imgworker.dispatch import Dispatch
from imgworker.intake import Intake
from imgworker.lister import ListingEnd

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Lowest:
    """A random source that always gives the low end: the shortest waits the backoff allows."""

    def uniform(self, low: float, high: float) -> float:
        return low


class DeadLister:
    """A lister process that exited while starting (a bad setting, a missing file)."""

    def waitables(self) -> list[Any]:
        return []

    def alive(self) -> bool:
        return False

    def exitcode(self) -> int | None:
        return 1

    def request_sweep(self, checkpoints: dict[str, str] | None = None) -> None:
        raise BrokenPipeError

    def poll(self) -> Any:
        raise EOFError

    def stop(self, timeout: float = 2.0) -> None:
        pass


class AnsweringLister(DeadLister):
    """Lives until it has answered one sweep (an empty listing), then dies."""

    def __init__(self) -> None:
        self.answered = False
        self.asked = False

    def alive(self) -> bool:
        return not self.answered

    def request_sweep(self, checkpoints: dict[str, str] | None = None) -> None:
        self.asked = True

    def poll(self) -> Any:
        if not self.asked:
            return None
        self.answered = True
        return ListingEnd(ok=True)


def most_starts_within(seconds: float) -> int:
    """Listers started within ``seconds`` if every wait were the shortest the restart backoff allows."""
    backoff = restart_backoff(rng=Lowest())  # type: ignore[arg-type]
    starts, spent = 1, backoff.fail()
    while spent <= seconds:
        starts += 1
        spent += backoff.fail()
    return starts


class Ledger:
    def begin_sweep(self) -> None:
        pass

    def filter_new(self, keys: list[str]) -> set[str]:
        return set(keys)


def intake_with(make_lister: Any, clock: Clock) -> Intake:
    cfg = load_config(env={}, overrides={"scan": {"interval_s": 0.01}})
    intake = Intake(cfg, ledger=Ledger(), dispatch=Dispatch(cfg.dispatch), make_lister=make_lister, clock=clock)
    intake.start()
    return intake


def test_a_lister_that_dies_at_start_is_replaced_after_a_growing_backoff():
    clock = Clock()
    listers: list[DeadLister] = []

    def make_lister() -> DeadLister:
        listers.append(DeadLister())
        return listers[-1]

    intake = intake_with(make_lister, clock)
    for _ in range(50):  # steps without time passing: no new lister at all
        intake.step(draining=False)
    assert len(listers) == 1, "a new lister was started at once"
    assert intake.wake_at() == intake._lister_backoff.until > clock.now  # the loop sleeps until then
    run_s = 60.0
    started = clock.now
    while clock.now - started < run_s:  # one step every 50 ms for a minute
        clock.now += 0.05
        intake.step(draining=False)
    assert 4 <= len(listers) <= most_starts_within(run_s)


def test_a_lister_that_answered_is_replaced_after_the_first_wait_again():
    clock = Clock()
    listers: list[DeadLister] = [DeadLister(), DeadLister(), DeadLister(), AnsweringLister(), DeadLister()]
    made = iter(listers)
    intake = intake_with(lambda: next(made), clock)
    intake._lister_backoff.rng = Lowest()  # type: ignore[assignment]
    waits = []
    for lister in listers[:-1]:
        while intake.lister is lister:
            intake.step(draining=False)
        waits.append(intake._lister_backoff.until - clock.now)
        clock.now = intake._lister_backoff.until
        intake.step(draining=False)
    assert waits == [0.25, 0.5, 1.0, 0.25]
