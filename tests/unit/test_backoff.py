"""The one Backoff: its sequence, cap, jitter bounds, reset and clock; and the numbers each user keeps."""

from __future__ import annotations

import random

import pytest

from imgworker.backoff import Backoff, restart_backoff
from imgworker.config import load_config
from imgworker.dispatch import Dispatch
from imgworker.intake import Intake
from imgworker.memstore import MemoryAlgo, MemoryStore
from imgworker.worker import ItemProcessor

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_delays_double_from_the_first_up_to_the_cap():
    backoff = Backoff(0.5, 10.0)
    assert [backoff.fail() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff.failures == 7
    assert backoff.delay(0) == 0.0 and backoff.delay(10_000) == 10.0  # no overflow after many failures


def test_jitter_stays_within_its_share_of_the_capped_delay_and_varies():
    for jitter in (0.5, 1.0):
        backoff = Backoff(0.1, 3.0, jitter=jitter, rng=random.Random(7))
        for failures in range(1, 30):
            ceiling = min(3.0, 0.1 * 2 ** (failures - 1))
            delays = [backoff.delay(failures) for _ in range(50)]
            assert all(ceiling * (1 - jitter) <= d <= ceiling for d in delays)
            assert len(set(delays)) > 1, "the delay was not jittered"


def test_a_seeded_random_gives_the_same_delays():
    first = [Backoff(1.0, 30.0, jitter=0.5, rng=random.Random(3)).delay(n) for n in range(1, 8)]
    again = [Backoff(1.0, 30.0, jitter=0.5, rng=random.Random(3)).delay(n) for n in range(1, 8)]
    assert first == again


def test_reset_starts_again_from_the_first_delay():
    backoff = Backoff(0.5, 30.0)
    for _ in range(5):
        backoff.fail()
    backoff.reset()
    assert backoff.failures == 0 and backoff.until == 0.0 and backoff.ready()
    assert backoff.fail() == 0.5


def test_ready_once_the_wait_is_over_on_the_given_clock():
    clock = Clock()
    backoff = Backoff(2.0, 30.0, clock=clock)
    wait_s = backoff.fail()
    assert backoff.until == 102.0 and not backoff.ready()
    clock.now += wait_s
    assert backoff.ready()


def test_jitter_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError):
        Backoff(1.0, 2.0, jitter=1.5)


def test_restart_backoff_is_half_fixed_half_random_from_half_a_second_to_thirty():
    backoff = restart_backoff(rng=random.Random(1))
    delays = [backoff.fail() for _ in range(12)]
    assert 0.25 <= delays[0] <= 0.5 and 15.0 <= delays[-1] <= 30.0


def test_scan_failures_keep_their_numbers_twice_the_interval_and_at_most_64_intervals():
    cfg = load_config(env={}, overrides={"scan": {"interval_s": 0.1}})
    intake = Intake(cfg, ledger=None, dispatch=Dispatch(cfg.dispatch), make_lister=lambda: None)  # type: ignore[arg-type,return-value]
    ceilings = [min(30.0, 0.1 * 2 ** min(n, 6)) for n in range(1, 10)]  # the formula it replaced
    for failures, ceiling in zip(range(1, 10), ceilings):
        delays = [intake._scan_backoff.delay(failures) for _ in range(20)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert [intake._watcher_backoff.delay(n) for n in range(1, 10)] == [min(30.0, 0.5 * 2 ** min(n - 1, 6))
                                                                        for n in range(1, 10)]


def test_algorithm_retries_keep_full_jitter_from_the_configured_base_to_the_cap():
    cfg = load_config(env={}, overrides={"algo": {"backoff_base_s": 0.2, "backoff_cap_s": 1.0}})
    store = MemoryStore()
    processor = ItemProcessor(cfg, store=store, algo=MemoryAlgo(store), worker_id=0, rng=random.Random(5))
    for attempt in range(1, 8):
        ceiling = min(1.0, 0.2 * 2 ** (attempt - 1))
        assert all(0.0 <= processor.algo_backoff.delay(attempt) <= ceiling for _ in range(20))
