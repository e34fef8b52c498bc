"""Worker faults injected for real: SIGKILL, poison items, start-up deaths, recycling, supervisor death, titles."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import signal
import time

import psutil
import pytest

from imgworker.backoff import RESTART_CAP_S, restart_backoff
from imgworker.logs import LogSettings
from imgworker.pool import ProcessPool
from imgworker.services.algo_server import AlgoService, SyntheticParams
from imgworker.supervisor import Supervisor, process_parts
from tests.support.cli import cli_env, reap, start_run, workers_of
from tests.support.driving import reach, step_for
from tests.support.kills import kill_workers_at_progress
from tests.support.results import count_results, read_outcomes
from tests.support.store import upload

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def slow_algo():
    with AlgoService("synthetic", SyntheticParams(latency_ms=60.0, sigma=0.3, detection_rate=0.5)) as service:
        yield service


def test_random_sigkills_lose_nothing(tmp_path, store_server, creds, store, prefix, slow_algo):
    keys = [f"{prefix}p/cam-{i % 4}/20240101-1200{i // 100:02d}.{i % 100:03d}.jpg" for i in range(300)]
    upload(store, keys)
    env = cli_env(store_server, creds, IMGWORKER_STORE_PREFIX=prefix, IMGWORKER_ALGO_ENDPOINT=slow_algo.endpoint,
                  IMGWORKER_RUN_STATE_DIR=str(tmp_path / "s"), IMGWORKER_WORKER_MAX_ATTEMPTS="20")
    report = tmp_path / "r.json"
    proc = start_run(env, "run", "--workers", "8", "--until-idle", "--no-progress", "--report-json", str(report),
                     log_path=str(tmp_path / "log"))
    try:
        # one kill per 15 result lines, the last at 225 of 300: every kill lands mid-run
        kills = kill_workers_at_progress(proc, random.Random(7), kills=15, every=15,
                                         progress=lambda: count_results(_cfg(tmp_path)))
        assert reap(proc, 90) == 0, (tmp_path / "log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            reap(proc, 1)
    import json

    data = json.loads(report.read_text())
    outcomes = read_outcomes(_cfg(tmp_path))
    assert kills == 15
    assert sorted(outcomes) == sorted(keys)
    assert all(len(v) == 1 for v in outcomes.values()), "an image was counted twice"
    assert data["conserved"] and data["scanned"] == 300
    assert data["outcomes"]["failed_worker"] == 0 and data["failures"] == 0
    assert data["worker_restarts"] >= kills - 1
    assert data["retries"] >= 1


def _cfg(tmp_path):
    from imgworker.config import load_config

    return load_config(env={}, overrides={"run": {"state_dir": str(tmp_path / "s")}})


def test_poison_item_ends_as_failed_worker(make_config, store, prefix):
    # calls slower than one supervisor step, so the poison item is still held when the test looks
    with AlgoService("synthetic", SyntheticParams(latency_ms=800.0, sigma=0.0)) as very_slow:
        _poison(make_config(worker={"count": 2, "max_attempts": 3}, algo={"endpoint": very_slow.endpoint}),
                store, prefix)


def _poison(cfg, store, prefix):
    keys = [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(6)]
    poison = keys[2]
    upload(store, keys)
    sup = Supervisor(cfg, show_progress=False)
    kills = 0

    def finished_killing_the_poison_s_holder() -> bool:
        """After each step: SIGKILL the process whose lane holds the poison image."""
        nonlocal kills
        lane = sup.inflight.holder(poison)
        for handle in list(sup.pool.processes.values()):
            if lane in handle.lanes and handle.process.is_alive():
                os.kill(handle.process.pid, signal.SIGKILL)
                handle.process.join()
                kills += 1
        return sup.finished()

    with sup.running():
        reach(sup, finished_killing_the_poison_s_holder, "the run's end", 120)
    report = sup.report()
    outcomes = read_outcomes(cfg)
    assert kills == 3
    assert outcomes[poison] == ["failed_worker"]
    assert all(outcomes[k] != ["failed_worker"] for k in keys if k != poison)
    assert report.outcomes["failed_worker"] == 1 and report.retries == 2 and report.worker_restarts == 3
    assert report.conserved


class StillClock:
    """The restart backoff's clock: it stands still until the test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_workers_that_die_at_start_are_backed_off_and_cost_no_image_an_attempt(make_config, store, prefix, caplog):
    cfg = make_config(worker={"count": 2, "max_attempts": 1})  # one charged attempt would end an image failed_worker
    count = cfg.worker.count
    keys = [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(6)]
    upload(store, keys)
    clock = StillClock()
    pool = ProcessPool(cfg, LogSettings(level="NO-SUCH-LEVEL"),  # every new worker process exits in its set-up
                       make_backoff=lambda: restart_backoff(clock=clock))
    sup = Supervisor(cfg, show_progress=False, parts=dataclasses.replace(process_parts(cfg), pool=pool))
    caplog.set_level(logging.WARNING, logger="imgworker.supervisor")
    with sup.running():
        step_for(sup, 8.0)  # many start-ups' worth of time ...
        reach(sup, lambda: sup.dispatch.pending > 0, "images in the queue")
        assert sup.stats.worker_restarts == count, "a process was replaced before its backoff was over"
        for waits_over in (1, 2):  # ... then the backoff's waits end twice while the images wait in the queue
            clock.now += RESTART_CAP_S
            reach(sup, lambda: sup.stats.worker_restarts >= count * (1 + waits_over), "the next restarts")
        deaths = sup.stats.worker_restarts
        pool.log_settings = LogSettings()  # the cause is removed: the next replacements start and stay
        clock.now += RESTART_CAP_S
        reach(sup, sup.finished, "the run's end")
    report = sup.report()
    assert deaths == count * 3, "one start per worker each time the backoff's wait ended"
    assert report.respawn_backoffs == report.worker_restarts == deaths
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(re.fullmatch(r"worker process [01] exited before answering anything \(exit code 1\) holding 0 images; "
                            r"starting a replacement in \d+\.\d s", m) for m in warned), warned
    outcomes = read_outcomes(cfg)
    assert sorted(outcomes) == sorted(keys) and all(len(v) == 1 for v in outcomes.values())
    assert report.outcomes["failed_worker"] == 0 and report.retries == 0 and report.inferences == len(keys)


def test_recycling_finishes_the_item_first(make_config, store, prefix):
    cfg = make_config(worker={"count": 2, "max_tasks": 2})
    keys = [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(10)]
    upload(store, keys)
    report = Supervisor(cfg, show_progress=False).run()
    assert report.inferences == 10 and report.conserved
    assert report.worker_recycles >= 4
    assert report.worker_restarts == 0 and report.retries == 0


def test_memory_recycling(make_config, store, prefix):
    cfg = make_config(worker={"count": 1, "max_memory_mb": 1})  # any real process is above 1 MiB
    upload(store, [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(3)])
    report = Supervisor(cfg, show_progress=False).run()
    assert report.inferences == 3 and report.worker_recycles >= 2 and report.worker_restarts == 0


def test_supervisor_sigkill_leaves_no_orphans_and_titles_are_set(tmp_path, store_server, creds, algo_server, prefix):
    env = cli_env(store_server, creds, IMGWORKER_STORE_PREFIX=prefix, IMGWORKER_ALGO_ENDPOINT=algo_server.endpoint,
                  IMGWORKER_RUN_STATE_DIR=str(tmp_path / "s"))
    proc = start_run(env, "run", "--workers", "3", "--no-progress")
    try:
        deadline = time.monotonic() + 30
        while len(workers_of(proc.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        supervisor = psutil.Process(proc.pid)
        children = supervisor.children(recursive=True)
        # multiprocessing's own resource tracker is the one child without our title; it must exit too.
        titles = sorted(" ".join(c.cmdline()).strip() for c in children if "resource_tracker" not in " ".join(c.cmdline()))
        assert "imgworker: supervisor" in " ".join(supervisor.cmdline())
        assert titles == ["imgworker: ledger", "imgworker: scanner", "imgworker: worker 0", "imgworker: worker 1",
                          "imgworker: worker 2"]
        assert all(creds.secret_key not in t for t in titles)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], f"orphans left: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
