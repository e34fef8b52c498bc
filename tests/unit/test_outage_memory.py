"""An algorithm endpoint that is down, driven step by step in memory: images wait, uncharged, then end once.

Counted at the far end: the calls the in-memory algorithm received per image, the lines in the
results file.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from imgworker.errors import AlgoTransient
from imgworker.memstore import MemoryAlgo, MemoryStore
from imgworker.results import read_results
from tests.support.driving import reach
from tests.support.memory import config, fill, supervisor
from tests.support.results import lines

pytestmark = pytest.mark.timeout(60)


def ends(cfg) -> dict[str, tuple[str, str]]:
    return {r.key: (r.outcome.value, r.cause) for r in read_results(cfg.results_path)}


def test_failed_probes_charge_no_image_and_the_budget_ends_each_once(tmp_path):
    cfg = config(tmp_path, worker={"count": 1},
                 algo={"eject_after_failures": 1, "retries": 0, "eject_cooldown_s": 0.0, "no_endpoint_budget_s": 3600.0})
    store = MemoryStore()
    keys = fill(store, ["p/t"], 3)
    algo = MemoryAlgo(store)
    algo.down.add(cfg.algo.endpoint)
    sup = supervisor(cfg, store, algo)
    with sup.running(drain=False):
        reach(sup, lambda: sum(algo.calls.values()) >= 12, "twelve failed probes", max_steps=2000)
        sup.step()
        assert not lines(cfg), "an image was ended while its budget was not spent"
        assert sup.dispatch.pending == 3
        assert sup.endpoints.figures()[cfg.algo.endpoint]["ejections"] == sum(algo.calls.values())
        assert min(algo.calls[k] for k in keys) >= 3  # each carried several failed probes, uncharged
        sup._fail_waited_out(time.monotonic() + 3600.0)  # the budget runs out
        assert ends(cfg) == {k: ("failed_algo", "no_healthy_endpoint") for k in keys}
        assert lines(cfg) == Counter(keys)


def test_an_image_that_makes_the_service_fail_does_not_keep_the_route_down(tmp_path):
    cfg = config(tmp_path, worker={"count": 1},
                 algo={"eject_after_failures": 2, "retries": 1, "eject_cooldown_s": 0.0, "no_endpoint_budget_s": 3600.0})
    store = MemoryStore()
    keys = fill(store, ["p/t"], 5)
    poison = keys[0]
    algo = MemoryAlgo(store, fail=lambda path: AlgoTransient("http_500") if path == poison else None)
    sup = supervisor(cfg, store, algo)
    with sup.running(drain=False):
        reach(sup, lambda: len(lines(cfg)) == len(keys), "a result line for every image", max_steps=2000)
    assert ends(cfg) == {poison: ("failed_algo", "http_500"), **{k: ("no_detection", "") for k in keys[1:]}}
    assert lines(cfg) == Counter(keys)
    # it waited once (its first outage could have been anyone's), then ended at its second
    assert algo.calls[poison] == 4 and all(algo.calls[k] == 1 for k in keys[1:])


def test_images_that_waited_are_analysed_once_the_service_answers(tmp_path):
    cfg = config(tmp_path, worker={"count": 2},
                 algo={"eject_after_failures": 1, "retries": 2, "eject_cooldown_s": 0.0, "no_endpoint_budget_s": 3600.0})
    store = MemoryStore()
    keys = fill(store, ["p/t"], 6)
    algo = MemoryAlgo(store)
    algo.down.add(cfg.algo.endpoint)
    sup = supervisor(cfg, store, algo)
    with sup.running(drain=False):
        reach(sup, lambda: sum(algo.calls.values()) >= 10, "ten failed calls", max_steps=2000)
        algo.down.clear()
        before = Counter(algo.calls)
        reach(sup, lambda: len(lines(cfg)) == len(keys), "a result line for every image", max_steps=2000)
    assert ends(cfg) == {k: ("no_detection", "") for k in keys}
    assert lines(cfg) == Counter(keys)
    assert algo.calls - before == Counter(keys)  # once the service answers, one call per image
    assert {r.attempt for r in read_results(cfg.results_path)} == {1}  # waiting used up no attempt
    # the calls made while it waited are counted on its final line too
    assert {r.key: r.algo_calls for r in read_results(cfg.results_path)} == {k: algo.calls[k] for k in keys}


def test_exit_code_and_report_say_the_service_was_unavailable(capsys):
    import msgspec

    from imgworker.cli import run_exit_code
    from imgworker.errors import ExitCode
    from imgworker.stats import Stats, format_report

    url = "http://user:pw-s3cret@gpu-1:8000/infer?token=tok-s3cret"
    base = Stats(1).report(pending=0, in_flight=0, wall_s=1.0)

    def with_calls(requests: int, failures: int, **extra: int):
        figures = {"requests": requests, "failures": failures, "ejections": 1, "in_flight": 0, "healthy": 0}
        return msgspec.structs.replace(base, endpoints={url: figures}, **extra)

    assert run_exit_code(base) == ExitCode.OK  # nothing to analyse, nothing called
    assert run_exit_code(with_calls(3, 2)) == ExitCode.OK  # some answers: a flaky service, not a down one
    assert run_exit_code(with_calls(3, 3)) == ExitCode.ALGO_UNAVAILABLE  # no call ever answered
    assert run_exit_code(with_calls(3, 0, no_healthy_endpoint=2)) == ExitCode.ALGO_UNAVAILABLE
    assert "images failed for want of a healthy endpoint" in capsys.readouterr().err
    text = format_report(with_calls(5, 5, no_healthy_endpoint=2))
    assert "| http://gpu-1:8000/infer | 5 | 5 | 1 | no |" in text  # one endpoint has its row too
    assert "failed for want of a healthy algorithm endpoint: 2" in text and "s3cret" not in text


def test_the_probe_is_known_by_its_lane_when_an_older_failure_arrives_during_it(tmp_path):
    cfg = config(tmp_path, worker={"count": 2},
                 algo={"eject_after_failures": 1, "retries": 0, "eject_cooldown_s": 0.0, "no_endpoint_budget_s": 3600.0})
    store = MemoryStore()
    fill(store, ["p/t"], 2)
    algo = MemoryAlgo(store)
    algo.down.add(cfg.algo.endpoint)
    sup = supervisor(cfg, store, algo)
    sup.start()
    try:
        for _ in range(500):
            if sup.dispatch.pending == 2:
                break
            sup.intake_step()
        sup.feed_idle()  # both sent while the endpoint is healthy
        late_lane = min(sup.pool.inbox)
        late = sup.pool.inbox.pop(late_lane)  # this lane's answer comes late (a slow timeout)
        for event in sup.pool.wait(0.0, [])[0]:  # the other lane fails: ejected, its image goes back to wait
            sup._on_event(event)
        sup.feed_idle()  # the cooldown is over: the other lane carries the probe, the image that already waited
        assert len(sup.pool.inbox) == 1 and late_lane not in sup.pool.inbox
        sup.pool.inbox[late_lane] = late
        for event in sup.pool.wait(0.0, [])[0]:  # the late failure arrives first, then the probe's
            sup._on_event(event)
        assert not lines(cfg), ends(cfg)  # neither is charged: one met the outage, the other was the probe
        assert sup.dispatch.pending == 2
    finally:
        sup.request_stop("test", force=True)
        sup.shutdown()


def test_calls_made_before_waiting_are_counted_on_the_final_line_and_in_http_retries(tmp_path):
    cfg = config(tmp_path, worker={"count": 1},
                 algo={"eject_after_failures": 1, "retries": 1, "eject_cooldown_s": 0.0, "no_endpoint_budget_s": 3600.0})
    store = MemoryStore()
    keys = fill(store, ["p/t"], 3)
    algo = MemoryAlgo(store)
    algo.down.add(cfg.algo.endpoint)
    sup = supervisor(cfg, store, algo)
    with sup.running(drain=False):
        reach(sup, lambda: min(algo.calls[k] for k in keys) >= 2, "every image called while the endpoint is down",
              max_steps=2000)
        sup.step()
        sup._fail_waited_out(time.monotonic() + 3600.0)  # the budget runs out: each ends without a lane
        assert ends(cfg) == {k: ("failed_algo", "no_healthy_endpoint") for k in keys}
        made = Counter(algo.calls)
        report = sup.recorder.stats.report(pending=0, in_flight=0, wall_s=1.0)
    finals = {r.key: r.algo_calls for r in read_results(cfg.results_path)}
    assert finals == {k: made[k] for k in keys}  # each line counts every call the service received for it
    assert report.http_retries == sum(made.values()) - len(keys)
