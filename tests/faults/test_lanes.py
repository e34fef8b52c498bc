"""Worker processes with several lanes (``worker.threads``): faults injected for real, counted at the far end.

A process with lanes holds several images at once, so a death takes them all. These tests check
that each one still ends in exactly one outcome, that a deadline kill does not use up the
attempts of the images that only shared the process, and that recycling loses nothing.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import psutil
import pytest

from imgworker.services.algo_server import AlgoService, SyntheticParams
from imgworker.supervisor import Supervisor
from imgworker.worker import frame, unframe
from imgworker.pool import lanes_of
from tests.support.cli import cli_env, kill_tree_leftovers, reap, start_run, workers_of
from tests.support.driving import drive, drive_after_warm_up
from tests.support.kills import kill_workers_at_progress
from tests.support.results import SUCCESS, calls_under, count_results, read_outcomes, results_of
from tests.support.store import upload

pytestmark = pytest.mark.timeout(240)


def test_frames_carry_their_lane_and_a_short_frame_is_refused():
    assert unframe(frame(7, b"payload")) == (7, b"payload")
    assert unframe(frame(0, b"")) == (0, b"")
    with pytest.raises(ValueError, match="names no lane"):
        unframe(b"\x01\x02")
    assert lanes_of(0, 3) == (0, 1, 2) and lanes_of(2, 3) == (6, 7, 8)


def test_random_sigkills_of_threaded_workers_lose_nothing(tmp_path, store_server, creds, store, prefix):
    keys = [f"{prefix}p/cam-{i % 4}/20240101-1200{i // 100:02d}.{i % 100:03d}.jpg" for i in range(200)]
    upload(store, keys)
    with AlgoService("synthetic", SyntheticParams(latency_ms=60.0, sigma=0.3, detection_rate=0.5)) as service:
        env = cli_env(store_server, creds, IMGWORKER_STORE_PREFIX=prefix, IMGWORKER_ALGO_ENDPOINT=service.endpoint,
                      IMGWORKER_RUN_STATE_DIR=str(tmp_path / "s"), IMGWORKER_WORKER_MAX_ATTEMPTS="20")
        report = tmp_path / "r.json"
        proc = start_run(env, "run", "--workers", "2", "--threads", "4", "--until-idle", "--no-progress",
                         "--report-json", str(report), log_path=str(tmp_path / "log"))
        try:
            # one kill per 20 result lines, the last at 160 of 200: every kill lands mid-run
            kills = kill_workers_at_progress(proc, random.Random(11), kills=8, every=20,
                                             progress=lambda: count_results(results_cfg(tmp_path)))
            assert reap(proc, 120) == 0, (tmp_path / "log").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                reap(proc, 1)
        calls = calls_under(service, prefix)
    data = json.loads(report.read_text())
    outcomes = read_outcomes(results_cfg(tmp_path))
    assert kills == 8
    assert sorted(outcomes) == sorted(keys)
    assert all(len(v) == 1 for v in outcomes.values()), "an image was counted twice"
    assert {v[0] for v in outcomes.values()} <= set(SUCCESS)
    assert data["conserved"] and data["outcomes"]["failed_worker"] == 0
    assert data["worker_restarts"] >= kills - 1 and data["retries"] >= 1
    assert all(calls.get(k, 0) >= 1 for k in keys), "an image got an outcome without a call to the service"


def results_cfg(tmp_path):
    from imgworker.config import load_config

    return load_config(env={}, overrides={"run": {"state_dir": str(tmp_path / "s")}})


def test_deadline_kill_retries_the_other_lanes_without_using_their_attempts(make_config, store, prefix):
    # lanes busy for about 6 s on 1.5 s calls: when the trickling image passes its 4 s deadline, the
    # process is killed with other images in its lanes. max_attempts 1: if those were charged, they
    # would end failed_worker.
    params = SyntheticParams(latency_ms=1500.0, sigma=0.0, detection_rate=0.5, trickle_s=1.0, hang_s=60.0)
    trickle = f"{prefix}p/t/a-trickle-000.jpg"  # listed first: it is taken while the other lanes are busy
    normal = [f"{prefix}p/t/plain-{i:03d}.jpg" for i in range(8)]
    with AlgoService("synthetic", params) as service:
        cfg = make_config(worker={"count": 1, "threads": 3, "item_deadline_s": 4.0, "max_attempts": 1},
                          algo={"endpoint": service.endpoint, "timeout_s": 60.0, "retries": 0})
        report = drive_after_warm_up(cfg, store, [trickle, *normal], timeout=150)
        calls = calls_under(service, prefix)
    results = {r.key: r for r in results_of(cfg)}
    assert sorted(results) == sorted([trickle, *normal])
    assert (results[trickle].outcome.value, results[trickle].cause) == ("failed_worker", "deadline")
    assert {k: results[k].outcome.value for k in normal} == {k: results[k].outcome.value for k in normal
                                                               if results[k].outcome.value in SUCCESS}
    assert calls.get(trickle) == 1, "max_attempts 1: the trickling image must not be posted again"
    again = [k for k in normal if calls.get(k, 0) == 2]
    assert again, f"no other lane held an image when the process was killed: calls {calls}"
    assert max(calls.get(k, 0) for k in normal) <= 2
    assert report.deadline_kills == 1 and report.worker_restarts == 0 and report.retries == len(again)
    assert report.conserved


def test_recycling_a_threaded_worker_finishes_every_lane_first(make_config, store, prefix):
    keys = [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(18)]
    upload(store, keys)
    with AlgoService("synthetic", SyntheticParams(latency_ms=80.0, sigma=0.5, detection_rate=0.5)) as service:
        cfg = make_config(worker={"count": 2, "threads": 3, "max_tasks": 2}, algo={"endpoint": service.endpoint})
        report = drive(Supervisor(cfg, show_progress=False), timeout=180)
        calls = calls_under(service, prefix)
    assert report.inferences == 18 and report.conserved
    assert report.worker_recycles >= 3
    assert report.worker_restarts == 0 and report.retries == 0
    assert Counter(calls.get(k, 0) for k in keys) == {1: 18}, "recycling re-posted or skipped an image"
    outcomes = read_outcomes(cfg)
    assert sorted(outcomes) == sorted(keys) and all(len(v) == 1 for v in outcomes.values())


def test_a_worker_channel_skips_unusable_frames_and_leaves_on_stop_or_a_closed_pipe(make_config):
    from multiprocessing import Pipe

    from imgworker.outcomes import ImageRef, WorkItem
    from imgworker.worker import STOP, _Channel, encode_item

    ours, theirs = Pipe(duplex=True)
    channel = _Channel(theirs, make_config(), lanes=(4, 5))
    item = WorkItem(ref=ImageRef(key="p/t/a b%+é.jpg", task_type="t", task_id="x"))
    ours.send_bytes(encode_item(9, item))  # not one of this worker's lanes
    ours.send_bytes(b"\x01")  # names no lane
    ours.send_bytes(frame(4, b"\xc1"))  # not msgpack: lane 4 is answered at once, not left waiting
    ours.send_bytes(encode_item(5, item))
    assert channel.next_item() == (5, item)
    lane, payload = unframe(ours.recv_bytes())
    from imgworker.worker import decode_reply

    answered = decode_reply(payload)
    assert lane == 4 and answered.undecodable.startswith("item not decodable")
    assert (answered.result.outcome.value, answered.result.cause) == ("failed_algo", "internal_error")
    assert not ours.poll(0.1), "only the frame that named a lane was answered"
    ours.send_bytes(STOP)
    assert channel.next_item() is None and channel.ended.is_set() and not channel.gone
    assert channel.next_item() is None, "after the stop message nothing more is read"

    ours2, theirs2 = Pipe(duplex=True)
    gone = _Channel(theirs2, make_config(), lanes=(0,))
    ours2.close()
    assert gone.next_item() is None and gone.gone


def test_an_image_stuck_beside_another_is_spared_at_most_once(make_config, store, prefix):
    # lane 0 holds trickling image A; lane 1 does quick images, then takes trickling image C. When A
    # passes its deadline the process dies with C in it: C is retried once without using an attempt,
    # then it is charged like any overdue image. So it is posted at most max_attempts + 1 times.
    params = SyntheticParams(latency_ms=200.0, sigma=0.0, detection_rate=0.5, trickle_s=1.0, hang_s=60.0)
    a = f"{prefix}p/t/a-trickle.jpg"
    plain = [f"{prefix}p/t/b-plain-{i}.jpg" for i in range(5)]
    c = f"{prefix}p/t/c-trickle.jpg"
    with AlgoService("synthetic", params) as service:
        cfg = make_config(worker={"count": 1, "threads": 2, "item_deadline_s": 4.0, "max_attempts": 2},
                          algo={"endpoint": service.endpoint, "timeout_s": 60.0, "retries": 0})
        report = drive_after_warm_up(cfg, store, [a, *plain, c], timeout=180)
        calls = calls_under(service, prefix)
    results = {r.key: r for r in results_of(cfg)}
    assert sorted(results) == sorted([a, *plain, c]) and report.conserved
    for key in (a, c):
        assert results[key].outcome.value == "failed_worker", results[key]
        assert 1 <= calls.get(key, 0) <= cfg.worker.max_attempts + 1, (key, calls)
    assert {results[k].outcome.value for k in plain} <= set(SUCCESS)
    assert all(calls.get(k) == 1 for k in plain)


def test_supervisor_sigkill_with_lanes_holding_long_calls_leaves_no_worker_behind(tmp_path, store_server, creds,
                                                                                   store, prefix):
    # Every lane is in a call that lasts longer than the test: a worker outlives its supervisor unless
    # it dies with it (it cannot notice a closed pipe while its lanes wait on the service).
    count, threads = 2, 4
    lanes = count * threads
    keys = [f"{prefix}p/cam-{i % 2}/20240101-120000.{i:03d}.jpg" for i in range(3 * lanes)]
    upload(store, keys)
    state = tmp_path / "s"
    with AlgoService("synthetic", SyntheticParams(latency_ms=600_000.0, sigma=0.0)) as stuck, \
            AlgoService("synthetic", SyntheticParams(latency_ms=20.0, sigma=0.0, detection_rate=0.5)) as quick:
        env = cli_env(store_server, creds, IMGWORKER_STORE_PREFIX=prefix, IMGWORKER_RUN_STATE_DIR=str(state),
                      IMGWORKER_RUN_CHECKPOINT_INTERVAL_S="0.5", IMGWORKER_ALGO_TIMEOUT_S="1200")
        first = start_run({**env, "IMGWORKER_ALGO_ENDPOINT": stuck.endpoint}, "run", "--workers", str(count),
                          "--threads", str(threads), "--no-progress", log_path=str(tmp_path / "first.log"))
        orphans: list = []
        try:
            deadline = time.monotonic() + 60
            while len(calls_under(stuck, prefix)) < lanes:
                assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
                time.sleep(0.05)
            workers = workers_of(first.pid)
            orphans = psutil.Process(first.pid).children(recursive=True)
            assert len(workers) == count
            first.kill()
            first.wait(30)
            _, alive = psutil.wait_procs(workers, timeout=30)  # generous: they should go at once
            left = [f"{p.pid}" for p in alive]
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
            stray = kill_tree_leftovers(orphans)
        assert not left, f"worker processes outlived their SIGKILLed supervisor: {left} (also left: {stray})"
        second = start_run({**env, "IMGWORKER_ALGO_ENDPOINT": quick.endpoint}, "run", "--workers", str(count),
                           "--threads", str(threads), "--until-idle", "--no-progress",
                           log_path=str(tmp_path / "second.log"))
        assert reap(second, 120) == 0, (tmp_path / "second.log").read_text()[-3000:]
        calls = Counter(calls_under(stuck, prefix)) + Counter(calls_under(quick, prefix))
    outcomes = read_outcomes(results_cfg(tmp_path))
    assert sorted(outcomes) == sorted(keys) and all(len(v) == 1 for v in outcomes.values())
    assert {v[0] for v in outcomes.values()} <= set(SUCCESS)
    twice = sorted(k for k in keys if calls[k] == 2)
    assert all(1 <= calls[k] <= 2 for k in keys), calls
    assert len(twice) <= lanes, f"{len(twice)} images called twice ({lanes} lanes could hold at most {lanes})"
