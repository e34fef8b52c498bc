"""Stopping and disturbing ``imgworker run`` the way an operator or a service manager does.

Every run here is started with ``start_new_session=True``, so it has its own process group, like a
systemd unit (``KillMode=control-group``) or a job in a terminal. Stop signals go to the whole
group with ``os.killpg``: the children (workers, scanner, ledger) receive them too and must leave
the decision to the supervisor. What is checked is what an operator sees and what the far end
sees: the exit code, the printed report, ``state.json``, the results file (one line per image),
the processes left in the group, and how many POSTs each image got at the algorithm service.

Scenarios:

1. group SIGTERM mid-run drains, exits 0, and a second run finishes the rest: one call per image;
2. a second group signal forces the exit: in-flight images are ``pending`` in state.json and are
   finished by the next run (at most one extra call each, at most one per worker);
3. a systemd-style stop (a stop timeout, then SIGKILL) with 24 workers held by calls that never end
   within the test: the supervisor must exit by itself with 0 and list every held image as pending;
4. a second instance on the same state directory refuses with exit code 8 and leaves the first alone;
5. SIGKILL of the ledger Manager mid-run: the run finishes, exit 0, one call per image;
6. SIGKILL of the scanner mid-run: a new scanner is started and lists new images;
7. group SIGINT (Ctrl-C in a terminal) behaves like SIGTERM.

No verdict depends on how fast the machine is: every deadline only turns a hang into a clear failure.
In scenario 3 the service never answers while the test runs, so a supervisor that waited for its
calls would never exit by itself, however generous the stop timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from imgworker.services.algo_server import AlgoService, SyntheticParams
from tests.support.cli import cli_env, workers_of
from tests.support.store import upload

pytestmark = pytest.mark.timeout(180)

OK_OUTCOMES = {"inferred", "no_detection"}


# ----- helpers ----------------------------------------------------------------------------------


class Run:
    """``imgworker run`` in its own session (process group), stdout and stderr in separate files."""

    def __init__(self, tmp_path: Path, name: str, env: dict[str, str], *args: str) -> None:
        self.name = name
        self.out_path = tmp_path / f"{name}.out"
        self.err_path = tmp_path / f"{name}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "imgworker", "run", "--no-progress", *args],
                                         env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL, text=True,
                                         start_new_session=True)
        self.pgid = self.proc.pid  # a session leader's group id is its pid

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stdout(self) -> str:
        return self.out_path.read_text()

    def stderr(self) -> str:
        return self.err_path.read_text()

    def tail(self, n: int = 3000) -> str:
        return f"--- {self.name} stdout ---\n{self.stdout()[-n:]}\n--- {self.name} stderr ---\n{self.stderr()[-n:]}"

    def signal_group(self, sig: int) -> None:
        os.killpg(self.pgid, sig)

    def wait(self, timeout: float) -> int:
        """Wait for the supervisor; a hang is a failure (the finally block reaps it)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout} s\n{self.tail()}") from None

    def reap(self) -> None:
        """Always: SIGKILL whatever is left of the group, and reap the supervisor."""
        if self.proc.poll() is None:
            _killpg_quietly(self.pgid)
            self.proc.wait(30)
        _killpg_quietly(self.pgid)  # orphans, if any, were still in the group
        psutil.wait_procs(group_members(self.pgid), timeout=10)


def _killpg_quietly(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    out = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return out


def describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for proc in procs:
        try:
            out.append(f"{proc.pid}: {' '.join(proc.cmdline())[:80]} ({proc.status()})")
        except psutil.NoSuchProcess:
            out.append(f"{proc.pid}: gone")
    return out


def assert_group_gone(run: Run) -> None:
    """After the supervisor exited, nothing of its group may keep running (bounded wait for the reaper)."""
    deadline = time.monotonic() + 10
    left = group_members(run.pgid)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = group_members(run.pgid)
    assert left == [], f"{run.name}: processes left in the group after the supervisor exited: {describe(left)}"


def children_titled(pid: int, title: str) -> list[psutil.Process]:
    out = []
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return out
    for child in children:
        try:
            if title in " ".join(child.cmdline()):
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out


def result_lines(state_dir: Path) -> dict[str, list[str]]:
    """key -> outcomes in the results file (a trailing partial line is ignored)."""
    path = state_dir / "results.jsonl"
    out: dict[str, list[str]] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return out
    for line in text.split("\n")[:-1]:
        if line.strip():
            record = json.loads(line)
            out.setdefault(record["key"], []).append(record["outcome"])
    return out


def count_lines(state_dir: Path) -> int:
    return sum(len(v) for v in result_lines(state_dir).values())


def read_state(state_dir: Path) -> dict:
    with open(state_dir / "state.json") as f:
        return json.load(f)


def wait_for(what: str, check: Callable[[], bool], timeout: float, run: Run | None = None) -> None:
    """Poll ``check``; a run that exits meanwhile, or the deadline, is a clear failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if run is not None and run.proc.poll() is not None:
            if check():
                return
            raise AssertionError(f"{run.name} exited ({run.proc.returncode}) while waiting for {what}\n{run.tail()}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}" + (f"\n{run.tail()}" if run else ""))


def calls_for(service: AlgoService, keys: list[str]) -> dict[str, int]:
    """POSTs the service received per key (0 for keys it never saw)."""
    calls = service.calls()
    return {key: calls.get(key, 0) for key in keys}


def called_keys(service: AlgoService, prefix: str) -> list[str]:
    return sorted(k for k, n in service.calls().items() if k.startswith(prefix) and n > 0)


def assert_each_once(state_dir: Path, keys: list[str]) -> dict[str, list[str]]:
    outcomes = result_lines(state_dir)
    missing = sorted(set(keys) - set(outcomes))
    extra = sorted(set(outcomes) - set(keys))
    twice = {k: v for k, v in outcomes.items() if len(v) != 1}
    assert not missing and not extra, f"missing result lines: {missing[:10]}; unexpected keys: {extra[:10]}"
    assert twice == {}, f"keys with more than one result line: {twice}"
    return outcomes


def make_keys(prefix: str, n: int, start: int = 0) -> list[str]:
    return [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(start, start + n)]


def run_env(store_server, creds, prefix: str, service: AlgoService, state_dir: Path, **extra: str) -> dict[str, str]:
    return cli_env(store_server, creds, IMGWORKER_STORE_PREFIX=prefix, IMGWORKER_ALGO_ENDPOINT=service.endpoint,
                   IMGWORKER_RUN_STATE_DIR=str(state_dir), IMGWORKER_SCAN_INTERVAL_S="0.2",
                   IMGWORKER_RUN_CHECKPOINT_INTERVAL_S="0.5", **extra)


@pytest.fixture(scope="module")
def fast_algo() -> Iterator[AlgoService]:
    with AlgoService("synthetic", SyntheticParams(latency_ms=150.0, sigma=0.0, detection_rate=0.5)) as service:
        yield service


# ----- 1 and 7: a group stop signal drains ----------------------------------------------------


def _drain_then_resume(tmp_path, store_server, creds, store, prefix, service, sig: int, *, workers: int = 4,
                       threads: int = 1) -> None:
    keys = make_keys(prefix, 60)
    upload(store, keys)
    state = tmp_path / "state"
    env = run_env(store_server, creds, prefix, service, state, IMGWORKER_RUN_GRACE_S="30")
    runs: list[Run] = []
    try:
        first = Run(tmp_path, "first", env, "--workers", str(workers), "--threads", str(threads), "--report-json",
                    str(tmp_path / "first.json"))
        runs.append(first)
        wait_for("8 result lines", lambda: count_lines(state) >= 8, 60, first)
        members = group_members(first.pgid)
        assert len(members) >= workers + 3, describe(members)  # supervisor, scanner, ledger, the workers
        first.signal_group(sig)
        rc = first.wait(60)
        assert rc == 0, first.tail()
        assert "imgworker report" in first.stdout(), first.tail()
        assert f"stopping ({signal.Signals(sig).name})" in first.stderr(), first.tail()
        assert "Traceback" not in first.stdout() + first.stderr(), first.tail()
        assert (state / "state.json").exists()
        assert_group_gone(first)
        report = json.loads((tmp_path / "first.json").read_text())
        saved = read_state(state)
        done_first = count_lines(state)
        print(f"{signal.Signals(sig).name}: first run rc={rc}, lines={done_first}, report pending="
              f"{report['pending']} in_flight={report['in_flight']}, state pending={len(saved['pending'])}")
        assert report["in_flight"] == 0, "in-flight items were not allowed to finish"
        assert saved["pending"], "the stop was meant to land mid-run: nothing was left pending"
        assert set(saved["pending"]).isdisjoint(result_lines(state)), "a finished image is also pending"

        second = Run(tmp_path, "second", env, "--workers", "4", "--until-idle")
        runs.append(second)
        rc2 = second.wait(120)
        assert rc2 == 0, second.tail()
        assert_group_gone(second)
    finally:
        for run in runs:
            run.reap()
    outcomes = assert_each_once(state, keys)
    assert {o for v in outcomes.values() for o in v} <= OK_OUTCOMES, outcomes
    calls = calls_for(service, keys)
    print(f"{signal.Signals(sig).name}: second run rc={rc2}, calls per key: {sorted(set(calls.values()))}")
    assert all(n == 1 for n in calls.values()), {k: n for k, n in calls.items() if n != 1}


def test_group_sigterm_mid_run_drains_and_a_second_run_finishes(tmp_path, store_server, creds, store, prefix,
                                                               fast_algo):
    _drain_then_resume(tmp_path, store_server, creds, store, prefix, fast_algo, signal.SIGTERM)


def test_group_sigterm_drains_every_lane_of_threaded_workers(tmp_path, store_server, creds, store, prefix,
                                                            fast_algo):
    _drain_then_resume(tmp_path, store_server, creds, store, prefix, fast_algo, signal.SIGTERM, workers=2, threads=3)


def test_group_sigint_like_ctrl_c_behaves_like_sigterm(tmp_path, store_server, creds, store, prefix, fast_algo):
    _drain_then_resume(tmp_path, store_server, creds, store, prefix, fast_algo, signal.SIGINT)


def test_group_sigterm_waits_for_calls_that_outlast_the_pool_s_grace(tmp_path, store_server, creds, store, prefix):
    # 4 s calls: far longer than the 1 s the pool gives workers once the drain is over, so only a drain
    # that waits for the in-flight images lets them end analysed.
    workers = 4
    keys = make_keys(prefix, 2 * workers)
    upload(store, keys)
    state = tmp_path / "state"
    runs: list[Run] = []
    with AlgoService("synthetic", SyntheticParams(latency_ms=4000.0, sigma=0.0, detection_rate=0.5)) as slow:
        env = run_env(store_server, creds, prefix, slow, state, IMGWORKER_RUN_GRACE_S="60",
                      IMGWORKER_ALGO_TIMEOUT_S="30")
        try:
            first = Run(tmp_path, "first", env, "--workers", str(workers), "--report-json",
                        str(tmp_path / "first.json"))
            runs.append(first)
            wait_for(f"{workers} images in flight at the service",
                     lambda: len(called_keys(slow, prefix)) >= workers, 60, first)
            first.signal_group(signal.SIGTERM)
            rc = first.wait(60)
            assert rc == 0, first.tail()
            assert_group_gone(first)
            called_first = called_keys(slow, prefix)
            finished_first = result_lines(state)
            report = json.loads((tmp_path / "first.json").read_text())
            print(f"slow drain: called {len(called_first)}, result lines {len(finished_first)}, report in_flight "
                  f"{report['in_flight']} pending {report['pending']}")
            unfinished = sorted(set(called_first) - set(finished_first))
            assert not unfinished, f"in flight at the stop, but the drain did not wait for them: {unfinished}"
            assert {o for k in called_first for o in finished_first[k]} <= OK_OUTCOMES, finished_first
            assert report["in_flight"] == 0 and report["pending"] == len(keys) - len(called_first)

            second = Run(tmp_path, "second", env, "--workers", str(workers), "--until-idle")
            runs.append(second)
            assert second.wait(120) == 0, second.tail()
            assert_group_gone(second)
        finally:
            for run in runs:
                run.reap()
        outcomes = assert_each_once(state, keys)
        calls = calls_for(slow, keys)
    assert {o for v in outcomes.values() for o in v} <= OK_OUTCOMES, outcomes
    assert all(n == 1 for n in calls.values()), {k: n for k, n in calls.items() if n != 1}


# ----- 2: a second group signal forces ----------------------------------------------------------


def test_second_group_signal_forces_and_in_flight_items_are_resumed(tmp_path, store_server, creds, store, prefix):
    workers = 4
    keys = make_keys(prefix, 6)
    upload(store, keys)
    state = tmp_path / "state"
    runs: list[Run] = []
    with AlgoService("synthetic", SyntheticParams(latency_ms=5000.0, sigma=0.0, detection_rate=0.5)) as slow:
        env = run_env(store_server, creds, prefix, slow, state, IMGWORKER_RUN_GRACE_S="60",
                      IMGWORKER_ALGO_TIMEOUT_S="30")
        try:
            first = Run(tmp_path, "first", env, "--workers", str(workers))
            runs.append(first)
            wait_for(f"{workers} images in flight at the service",
                     lambda: len(called_keys(slow, prefix)) >= workers, 60, first)
            first.signal_group(signal.SIGTERM)
            time.sleep(1.0)
            assert first.proc.poll() is None, "one SIGTERM with grace_s=60 must drain, not exit\n" + first.tail()
            called = called_keys(slow, prefix)
            first.signal_group(signal.SIGTERM)
            rc = first.wait(30)
            assert rc == 0, first.tail()
            assert "stopping at once (SIGTERM)" in first.stderr(), first.tail()
            assert_group_gone(first)
            saved = read_state(state)
            finished_first = result_lines(state)
            # in flight when forced: called at the service, no outcome written
            in_flight = sorted(set(called) - set(finished_first))
            print(f"forced: rc={rc}, called={len(called)}, in flight when forced={len(in_flight)}, "
                  f"state pending={len(saved['pending'])}, lines after first run={len(finished_first)}")
            assert in_flight, "nothing was in flight when the second signal came"
            assert set(in_flight) <= set(saved["pending"]), (in_flight, saved["pending"])

            second = Run(tmp_path, "second", env, "--workers", str(workers), "--until-idle")
            runs.append(second)
            rc2 = second.wait(120)
            assert rc2 == 0, second.tail()
            assert_group_gone(second)
        finally:
            for run in runs:
                run.reap()
        outcomes = assert_each_once(state, keys)
        assert {o for v in outcomes.values() for o in v} <= OK_OUTCOMES, outcomes
        calls = calls_for(slow, keys)
    twice = sorted(k for k, n in calls.items() if n == 2)
    print(f"forced: second rc={rc2}, calls per key={calls}, keys called twice={len(twice)}")
    assert all(1 <= n <= 2 for n in calls.values()), calls
    assert len(twice) <= workers, twice


# ----- 3: systemd stop with many busy workers ---------------------------------------------------


@pytest.mark.timeout(300)
def test_systemd_stop_with_24_busy_workers_exits_by_itself(tmp_path, store_server, creds, store, prefix):
    workers, grace_s = 24, 2
    stop_timeout_s = 90  # generous: the calls below last far longer than the whole test may
    keys = make_keys(prefix, 30)
    upload(store, keys)
    state = tmp_path / "state"
    runs: list[Run] = []
    with AlgoService("synthetic", SyntheticParams(latency_ms=3_600_000.0, sigma=0.0)) as stuck:
        env = run_env(store_server, creds, prefix, stuck, state, IMGWORKER_RUN_GRACE_S=str(grace_s),
                      IMGWORKER_ALGO_TIMEOUT_S="7200")
        try:
            run = Run(tmp_path, "unit", env, "--workers", str(workers))
            runs.append(run)
            wait_for(f"{workers} images held at the service", lambda: len(called_keys(stuck, prefix)) >= workers,
                     120, run)
            held = called_keys(stuck, prefix)
            assert len(workers_of(run.pid)) == workers
            run.signal_group(signal.SIGTERM)
            signalled = time.monotonic()
            # What systemd does with TimeoutStopSec: wait, then SIGKILL the control group.
            try:
                rc = run.proc.wait(stop_timeout_s)
                killed = False
                print(f"systemd stop: the supervisor exited {time.monotonic() - signalled:.1f} s after SIGTERM "
                      "(information only)")
            except subprocess.TimeoutExpired:
                run.signal_group(signal.SIGKILL)
                rc = run.proc.wait(30)
                killed = True
            assert not killed, f"the supervisor had to be SIGKILLed by the service manager\n{run.tail()}"
            assert rc == 0, run.tail()
            assert_group_gone(run)
        finally:
            for r in runs:
                r.reap()
        saved = read_state(state)
        calls = calls_for(stuck, keys)
    print(f"systemd stop: rc={rc}, killed={killed}, held={len(held)}, state pending={len(saved['pending'])}, "
          f"result lines={count_lines(state)}")
    assert len(held) == workers
    assert set(held) <= set(saved["pending"]), sorted(set(held) - set(saved["pending"]))
    assert set(held).isdisjoint(result_lines(state)), "a held image got an outcome though nothing finished"
    assert all(calls[k] == 1 for k in held)


# ----- 4: two instances on one state directory -------------------------------------------------


def test_second_instance_on_the_same_state_dir_exits_8_and_leaves_the_first_alone(tmp_path, store_server, creds,
                                                                                  store, prefix, fast_algo):
    keys = make_keys(prefix, 60)
    upload(store, keys)
    state = tmp_path / "state"
    env = run_env(store_server, creds, prefix, fast_algo, state)
    runs: list[Run] = []
    try:
        a = Run(tmp_path, "a", env, "--workers", "2", "--until-idle")
        runs.append(a)
        wait_for("A's first result line", lambda: count_lines(state) >= 1, 60, a)
        b = Run(tmp_path, "b", env, "--workers", "2", "--until-idle")
        runs.append(b)
        rc_b = b.wait(60)
        b_err = [line for line in b.stderr().splitlines() if line.strip()]
        print(f"two instances: B rc={rc_b}, B stderr={b_err}")
        assert rc_b == 8, b.tail()
        assert len(b_err) == 1, b_err
        assert "another imgworker run" in b_err[0] and f"(pid {a.pid})" in b_err[0], b_err
        assert "imgworker report" not in b.stdout()
        assert_group_gone(b)
        rc_a = a.wait(120)
        assert rc_a == 0, a.tail()
        assert "Traceback" not in a.stdout() + a.stderr(), a.tail()
        assert_group_gone(a)
    finally:
        for run in runs:
            run.reap()
    assert_each_once(state, keys)
    calls = calls_for(fast_algo, keys)
    print(f"two instances: A rc={rc_a}, calls per key: {sorted(set(calls.values()))}")
    assert all(n == 1 for n in calls.values()), {k: n for k, n in calls.items() if n != 1}


# ----- 5: losing the ledger Manager ---------------------------------------------------------------


def test_sigkill_of_the_ledger_manager_mid_run(tmp_path, store_server, creds, store, prefix, fast_algo):
    keys = make_keys(prefix, 60)
    upload(store, keys)
    state = tmp_path / "state"
    env = run_env(store_server, creds, prefix, fast_algo, state)
    runs: list[Run] = []
    try:
        run = Run(tmp_path, "run", env, "--workers", "2", "--until-idle")
        runs.append(run)
        wait_for("5 result lines", lambda: count_lines(state) >= 5, 60, run)
        wait_for("the ledger process", lambda: len(children_titled(run.pid, "imgworker: ledger")) == 1, 30, run)
        (ledger,) = children_titled(run.pid, "imgworker: ledger")
        old_pid = ledger.pid
        ledger.send_signal(signal.SIGKILL)
        remaining = len(keys) - count_lines(state)
        assert remaining > 0, "the ledger was meant to die while images remained"
        new_pids: list[int] = []

        def replaced() -> bool:
            new_pids[:] = [p.pid for p in children_titled(run.pid, "imgworker: ledger") if p.pid != old_pid]
            return bool(new_pids)

        wait_for("a new ledger process", replaced, 30, run)
        rc = run.wait(120)
        output = run.stdout() + run.stderr()
        print(f"ledger kill: {remaining} images remained, new ledger pid {new_pids}, rc={rc}")
        assert rc == 0, run.tail()
        assert "Traceback" not in output, run.tail(6000)
        assert "imgworker report" in run.stdout()
        assert_group_gone(run)
    finally:
        for r in runs:
            r.reap()
    outcomes = assert_each_once(state, keys)
    assert {o for v in outcomes.values() for o in v} <= OK_OUTCOMES, outcomes
    calls = calls_for(fast_algo, keys)
    print(f"ledger kill: calls per key: {sorted(set(calls.values()))}")
    assert all(n == 1 for n in calls.values()), {k: n for k, n in calls.items() if n != 1}


# ----- 6: losing the lister ----------------------------------------------------------------------


def test_sigkill_of_the_scanner_mid_run_starts_a_new_one(tmp_path, store_server, creds, store, prefix, fast_algo):
    first_batch = make_keys(prefix, 40)
    later = make_keys(prefix, 10, start=100)
    upload(store, first_batch)
    state = tmp_path / "state"
    env = run_env(store_server, creds, prefix, fast_algo, state, IMGWORKER_RUN_GRACE_S="30")
    runs: list[Run] = []
    try:
        run = Run(tmp_path, "run", env, "--workers", "2")
        runs.append(run)
        wait_for("5 result lines", lambda: count_lines(state) >= 5, 60, run)
        wait_for("the scanner process", lambda: len(children_titled(run.pid, "imgworker: scanner")) == 1, 30, run)
        (scanner,) = children_titled(run.pid, "imgworker: scanner")
        old_pid = scanner.pid
        scanner.send_signal(signal.SIGKILL)
        remaining = len(first_batch) - count_lines(state)
        new_pids: list[int] = []

        def replaced() -> bool:
            new_pids[:] = [p.pid for p in children_titled(run.pid, "imgworker: scanner") if p.pid != old_pid]
            return bool(new_pids)

        wait_for("a new scanner process", replaced, 30, run)
        upload(store, later)  # only the new scanner can find these
        wait_for("a result line for every image, the later ones included",
                 lambda: set(result_lines(state)) >= set(first_batch + later), 90, run)
        run.signal_group(signal.SIGTERM)
        rc = run.wait(60)
        print(f"scanner kill: {remaining} of the first batch remained, new scanner pid {new_pids}, rc={rc}")
        assert rc == 0, run.tail()
        assert "Traceback" not in run.stdout() + run.stderr(), run.tail(6000)
        assert "imgworker report" in run.stdout()
        assert_group_gone(run)
    finally:
        for r in runs:
            r.reap()
    outcomes = assert_each_once(state, first_batch + later)
    assert {o for v in outcomes.values() for o in v} <= OK_OUTCOMES, outcomes
    calls = calls_for(fast_algo, first_batch + later)
    print(f"scanner kill: calls per key: {sorted(set(calls.values()))}")
    assert all(n == 1 for n in calls.values()), {k: n for k, n in calls.items() if n != 1}
