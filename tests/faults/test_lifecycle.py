"""Supervisor lifecycle with real signals: drain, force, restart after a clean stop and after SIGKILL.

Besides the result lines, each test counts the POSTs the algorithm service received per image.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from imgworker.config import load_config
from imgworker.services.algo_server import AlgoService, SyntheticParams
from tests.support.cli import cli_env, reap, start_run
from tests.support.results import calls_under, read_outcomes
from tests.support.store import upload

pytestmark = pytest.mark.timeout(180)

WORKERS = 4  # each run below: 4 processes of one lane, so at most 4 images are in flight at a stop


@pytest.fixture(scope="module")
def slow_algo():
    with AlgoService("synthetic", SyntheticParams(latency_ms=400.0, sigma=0.0, detection_rate=0.5)) as service:
        yield service


@pytest.fixture()
def setup(tmp_path, store_server, creds, store, prefix, slow_algo):
    keys = [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(40)]
    upload(store, keys)
    env = cli_env(store_server, creds, IMGWORKER_STORE_PREFIX=prefix, IMGWORKER_ALGO_ENDPOINT=slow_algo.endpoint,
                  IMGWORKER_RUN_STATE_DIR=str(tmp_path / "s"), IMGWORKER_RUN_CHECKPOINT_INTERVAL_S="0.5")
    cfg = load_config(env={}, overrides={"run": {"state_dir": str(tmp_path / "s")}})
    return keys, env, cfg, tmp_path


def calls_per_key(service: AlgoService, keys: list[str]) -> dict[str, int]:
    """POSTs the service received for each of ``keys`` (0 for one it never saw)."""
    calls = calls_under(service, os.path.commonprefix(keys))
    return {key: calls.get(key, 0) for key in keys}


def assert_in_flight_called_twice_at_most(calls: dict[str, int]) -> None:
    """Every image was called; only what was in flight at the stop or crash was called again."""
    assert all(1 <= n <= 2 for n in calls.values()), {k: n for k, n in calls.items() if not 1 <= n <= 2}
    twice = sorted(k for k, n in calls.items() if n == 2)
    assert len(twice) <= WORKERS, f"{len(twice)} images called twice ({WORKERS} lanes): {twice}"


def wait_for_results(cfg, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if sum(len(v) for v in read_outcomes(cfg).values()) >= n:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} results after {timeout} s")


def finish(env, tmp_path, name):
    report = tmp_path / f"{name}.json"
    proc = start_run(env, "run", "--workers", str(WORKERS), "--until-idle", "--no-progress", "--report-json",
                     str(report), log_path=str(tmp_path / f"{name}.log"))
    assert reap(proc, 120) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    return json.loads(report.read_text())


def test_sigterm_drains_then_restart_resumes(setup, slow_algo):
    keys, env, cfg, tmp_path = setup
    report_path = tmp_path / "first.json"
    proc = start_run(env, "run", "--workers", str(WORKERS), "--no-progress", "--report-json", str(report_path),
                     log_path=str(tmp_path / "first.log"))
    wait_for_results(cfg, 4)
    proc.send_signal(signal.SIGTERM)
    assert reap(proc, 30) == 0
    first = json.loads(report_path.read_text())
    assert first["in_flight"] == 0, "in-flight items were not allowed to finish"
    assert first["pending"] > 0 and first["conserved"]
    with open(f"{cfg.run.state_dir}/state.json") as f:
        assert len(json.load(f)["pending"]) == first["pending"]
    second = finish(env, tmp_path, "second")
    outcomes = read_outcomes(cfg)
    assert sorted(outcomes) == sorted(keys)
    assert all(len(v) == 1 for v in outcomes.values()), "an image was analysed twice"
    done_first = sum(first["outcomes"].values())
    assert second["scanned"] == len(keys) - done_first
    calls = calls_per_key(slow_algo, keys)
    assert all(n == 1 for n in calls.values()), {k: n for k, n in calls.items() if n != 1}


def test_second_signal_forces_a_quick_exit_and_still_writes_state(setup, slow_algo):
    keys, env, cfg, tmp_path = setup
    proc = start_run(env, "run", "--workers", str(WORKERS), "--no-progress", log_path=str(tmp_path / "first.log"))
    wait_for_results(cfg, 2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert reap(proc, 30) == 0
    with open(f"{cfg.run.state_dir}/state.json") as f:
        state = json.load(f)
    assert 0 < len(state["pending"]) <= len(keys)
    finish(env, tmp_path, "second")
    outcomes = read_outcomes(cfg)
    assert sorted(outcomes) == sorted(keys)
    assert all(len(v) == 1 for v in outcomes.values())
    assert_in_flight_called_twice_at_most(calls_per_key(slow_algo, keys))


def test_restart_after_supervisor_sigkill_analyses_nothing_twice(setup, slow_algo):
    keys, env, cfg, tmp_path = setup
    proc = start_run(env, "run", "--workers", str(WORKERS), "--no-progress", log_path=str(tmp_path / "first.log"))
    wait_for_results(cfg, 10)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    second = finish(env, tmp_path, "second")
    outcomes = read_outcomes(cfg)
    assert sorted(outcomes) == sorted(keys)
    assert all(len(v) == 1 for v in outcomes.values()), "a result line was duplicated after the crash"
    assert second["scanned"] < len(keys)
    assert_in_flight_called_twice_at_most(calls_per_key(slow_algo, keys))
