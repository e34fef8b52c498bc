"""What the far end sees: calls per image at the algorithm service, objects in the bucket.

Each test counts independently of imgworker's own figures: the service's ``calls()`` (POSTs it
received per image_path), a listing of the bucket, and the results file read line by line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import signal
import threading
import time
from collections import Counter
from typing import Any

import psutil
import pytest

from imgworker.services.algo_server import AlgoService, SyntheticParams
from imgworker.services.netutil import free_port
from imgworker.store import Store
from imgworker.supervisor import Supervisor
from tests.support.cli import cli_env, kill_tree_leftovers, reap, start_run
from tests.support.driving import drive, drive_after_warm_up
from tests.support.results import SUCCESS, calls_under, count_results, read_outcomes, results_of
from tests.support.store import upload

pytestmark = pytest.mark.timeout(300)

# ----- helpers -------------------------------------------------------------------------


def wait_for_results(cfg, n: int, proc, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = count_results(cfg)
        if got >= n:
            return got
        assert proc.poll() is None, f"the run ended early (rc {proc.returncode}) with {got} results"
        time.sleep(0.02)
    raise AssertionError(f"fewer than {n} results after {timeout} s")


def stamp(base: dt.datetime, i: int, step_ms: int = 10) -> str:
    t = base + dt.timedelta(milliseconds=i * step_ms)
    return t.strftime("%Y%m%d-%H%M%S.") + f"{t.microsecond // 1000:03d}"


@pytest.fixture(scope="module")
def service_100ms():
    params = SyntheticParams(latency_ms=100.0, sigma=0.0, detection_rate=0.3, seed=7)
    with AlgoService("synthetic", params) as service:
        yield service


# ----- 1 and 2: the supervisor is SIGKILLed, then restarted ------------------------------


def crash_and_restart(tmp_path, store_server, creds, store, prefix, service, *, n: int, kill_after: int,
                      upload_while_running: bool = False, **extra_env: str):
    """Upload n images (before the start, or once it runs), run 8 workers via the CLI, SIGKILL the supervisor,
    restart with --until-idle."""
    base = dt.datetime(2024, 1, 1, 12, 0, 0)
    keys = [f"{prefix}person/cam-{i % 4}/{stamp(base, i)}.jpg" for i in range(n)]
    if not upload_while_running:
        upload(store, keys)
    state = tmp_path / "state"
    env = cli_env(store_server, creds, IMGWORKER_STORE_PREFIX=prefix, IMGWORKER_ALGO_ENDPOINT=service.endpoint,
                  IMGWORKER_RUN_STATE_DIR=str(state), IMGWORKER_RUN_CHECKPOINT_INTERVAL_S="0.5",
                  IMGWORKER_SCAN_INTERVAL_S="0.3", **extra_env)
    from imgworker.config import load_config

    cfg = load_config(env={}, overrides={"run": {"state_dir": str(state)}})
    first = start_run(env, "run", "--workers", "8", "--no-progress", log_path=str(tmp_path / "first.log"))
    orphans: list[psutil.Process] = []
    second = None
    try:
        if upload_while_running:
            wait_for_child(first, "imgworker: watcher")
            upload(store, keys)
        wait_for_results(cfg, kill_after, first)
        orphans = psutil.Process(first.pid).children(recursive=True)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        at_kill = count_results(cfg)
        report_path = tmp_path / "second.json"
        second = start_run(env, "run", "--workers", "8", "--until-idle", "--no-progress", "--report-json",
                           str(report_path), log_path=str(tmp_path / "second.log"))
        assert reap(second, 180) == 0, (tmp_path / "second.log").read_text()[-3000:]
        # children of the killed supervisor die with it (PR_SET_PDEATHSIG); none may still be calling the service
        gone, still = psutil.wait_procs(orphans, timeout=30)
        left = [f"{p.pid}" for p in still]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        if second is not None and second.poll() is None:
            reap(second, 1)
        stray = kill_tree_leftovers(orphans)
    assert not left and not stray, f"children of the killed supervisor outlived it: {left or stray}"
    report = json.loads(report_path.read_text())
    return keys, cfg, report, at_kill


def wait_for_child(proc, title: str, timeout: float = 60) -> None:
    """Until ``proc`` has a child process titled ``title``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended early (rc {proc.returncode})"
        for child in psutil.Process(proc.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if title in " ".join(child.cmdline()):
                    return
        time.sleep(0.05)
    raise AssertionError(f"no {title!r} child after {timeout} s")


@pytest.mark.parametrize("mode", ["listing", "events"])
def test_supervisor_sigkill_then_restart_calls_only_in_flight_images_twice(tmp_path, store_server, creds, store,
                                                                             prefix, service_100ms, mode):
    # events: found by change events as they are uploaded; killed late, so the restarted watcher's replay of
    # the last seconds brings back images already finished (and some acknowledged but never checkpointed)
    events = {"upload_while_running": True, "IMGWORKER_SCAN_MODE": "events",
              "IMGWORKER_SCAN_EVENTS_FILER": store_server.filer_address,
              "IMGWORKER_SCAN_RECONCILE_INTERVAL_S": "1"} if mode == "events" else {}
    keys, cfg, report, at_kill = crash_and_restart(tmp_path, store_server, creds, store, prefix, service_100ms,
                                                   n=200, kill_after=150 if events else 60, **events)
    outcomes = read_outcomes(cfg)
    assert sorted(outcomes) == sorted(keys)
    lines = Counter(len(v) for v in outcomes.values())
    assert lines == {1: len(keys)}, f"result lines per key: {lines}"
    assert report["conserved"] and report["in_flight"] == 0 and report["pending"] == 0
    assert {v[0] for v in outcomes.values()} <= set(SUCCESS)
    calls = calls_under(service_100ms, prefix)
    per_key = Counter(calls.get(k, 0) for k in keys)
    print(f"results at kill {at_kill}; calls per key {dict(sorted(per_key.items()))}; second run {report['scanned']} "
          f"scanned")
    assert per_key[0] == 0, "an image got a success outcome without a call to the service"
    twice = sorted(k for k in keys if calls.get(k, 0) == 2)
    assert len(twice) <= 8, f"{len(twice)} images called twice (8 workers could hold at most 8): {twice[:10]}"
    assert max(calls.values()) <= 2, f"called 3+ times: {[k for k, v in calls.items() if v > 2]}"


def test_sigkill_restart_with_delete_no_detection_deletes_exactly_the_empty_images(tmp_path, store_server, creds,
                                                                                   store, prefix, service_100ms):
    keys, cfg, report, at_kill = crash_and_restart(tmp_path, store_server, creds, store, prefix, service_100ms,
                                                   n=200, kill_after=60,
                                                   IMGWORKER_ACTIONS_DELETE_NO_DETECTION="true")
    outcomes = read_outcomes(cfg)
    assert sorted(outcomes) == sorted(keys)
    lines = Counter(len(v) for v in outcomes.values())
    assert lines == {1: len(keys)}, f"result lines per key: {lines}"
    final = {k: v[0] for k, v in outcomes.items()}
    by_outcome = Counter(final.values())
    calls = calls_under(service_100ms, prefix)
    print(f"results at kill {at_kill}; outcomes {dict(by_outcome)}; calls per key "
          f"{dict(sorted(Counter(calls.get(k, 0) for k in keys).items()))}")
    missing = sorted(k for k, o in final.items() if o in ("skipped_missing", "failed_missing"))
    assert not missing, f"{len(missing)} images were deleted before their own analysis: {missing[:10]}"
    assert set(by_outcome) <= set(SUCCESS), by_outcome
    listed = {r.key for page in store.list_pages(prefix, 1000) for r in page}
    empty = [k for k, o in final.items() if o == "no_detection"]
    inferred = [k for k, o in final.items() if o == "inferred"]
    assert empty and inferred
    still_there = sorted(k for k in empty if k in listed)
    assert not still_there, f"{len(still_there)} no_detection images were not deleted: {still_there[:10]}"
    lost = sorted(k for k in inferred if k not in listed)
    assert not lost, f"{len(lost)} inferred images were deleted: {lost[:10]}"
    assert max(calls.values()) <= 2 and sum(1 for v in calls.values() if v == 2) <= 8


# ----- 3: an absurd detection count ----------------------------------------------------------


def test_absurd_count_is_failed_algo_once_per_image_and_no_worker_dies(make_config, store, prefix):
    params = SyntheticParams(latency_ms=10.0, sigma=0.0, detection_rate=0.5, count_override=1e30)
    huge = [f"{prefix}p/t/huge-{i:03d}.jpg" for i in range(20)]
    normal = [f"{prefix}p/t/plain-{i:03d}.jpg" for i in range(5)]
    upload(store, huge + normal)
    with AlgoService("synthetic", params) as service:
        cfg = make_config(worker={"count": 3}, algo={"endpoint": service.endpoint, "retries": 2})
        report = drive(Supervisor(cfg, show_progress=False), timeout=120)
        calls = calls_under(service, prefix)
    results = {r.key: r for r in results_of(cfg)}
    assert sorted(results) == sorted(huge + normal)
    for key in huge:
        r = results[key]
        assert (r.outcome.value, r.cause, r.algo_calls) == ("failed_algo", "malformed_result", 1), r
        assert calls.get(key) == 1, f"{key}: {calls.get(key)} calls"
    assert {results[k].outcome.value for k in normal} <= set(SUCCESS)
    assert all(calls.get(k) == 1 for k in normal)
    assert report.worker_restarts == 0 and report.deadline_kills == 0 and report.retries == 0
    assert report.conserved and report.outcomes["failed_algo"] == 20


# ----- 4: a service that trickles its answer forever ------------------------------------------


def test_trickling_answer_is_ended_by_the_item_deadline(make_config, store, prefix):
    params = SyntheticParams(latency_ms=20.0, sigma=0.0, detection_rate=0.5, trickle_s=1.0, hang_s=60.0)
    trickle = f"{prefix}p/t/trickle-000.jpg"
    normal = [f"{prefix}p/t/plain-{i:03d}.jpg" for i in range(8)]
    with AlgoService("synthetic", params) as service:
        cfg = make_config(worker={"count": 2, "item_deadline_s": 3.0, "max_attempts": 1},
                          algo={"endpoint": service.endpoint, "timeout_s": 60.0, "retries": 0})
        report = drive_after_warm_up(cfg, store, [trickle, *normal], timeout=120)
        calls = calls_under(service, prefix)
    results = {r.key: r for r in results_of(cfg)}
    assert sorted(results) == sorted([trickle, *normal])
    r = results[trickle]
    assert (r.outcome.value, r.cause) == ("failed_worker", "deadline"), r
    assert report.deadline_kills >= 1 and report.conserved
    assert {results[k].outcome.value for k in normal} <= set(SUCCESS), {k: results[k] for k in normal}
    assert calls.get(trickle) == 1, "max_attempts 1: the trickling image must not be posted again"


# ----- 5: a route whose only endpoint is down -------------------------------------------------


def test_dead_route_fails_its_images_and_the_run_still_ends(make_config, store, prefix, algo_server):
    dead = f"http://127.0.0.1:{free_port()}/infer"
    person = [f"{prefix}person/t1/20240101-120000.{i:03d}.jpg" for i in range(20)]
    vehicle = [f"{prefix}vehicle/t1/20240101-120000.{i:03d}.jpg" for i in range(20)]
    upload(store, person + vehicle)
    cfg = make_config(worker={"count": 2},
                      algo={"routes": {"vehicle": [dead]}, "no_endpoint_budget_s": 5.0, "eject_cooldown_s": 1.0})
    report = drive(Supervisor(cfg, show_progress=False), timeout=150)
    results = results_of(cfg)
    lines = Counter(r.key for r in results)
    assert sorted(lines) == sorted(person + vehicle) and set(lines.values()) == {1}
    final = {r.key: r for r in results}
    assert {final[k].outcome.value for k in person} <= set(SUCCESS), [final[k] for k in person]
    vehicle_ends = Counter((final[k].outcome.value, final[k].cause) for k in vehicle)
    # the images whose calls ejected it, and those that carried failed probes, waited like the others
    assert vehicle_ends == {("failed_algo", "no_healthy_endpoint"): 20}, vehicle_ends
    assert report.conserved and report.pending == 0 and report.in_flight == 0
    assert report.endpoints[dead]["healthy"] == 0 and report.endpoints[dead]["ejections"] >= 1


# ----- 6: backlog under block + lease, seen by an independent listing ---------------------------


def test_backlog_under_block_and_lease_holds_the_storage_limit(make_config, store_server, creds, store, prefix):
    params = SyntheticParams(latency_ms=300.0, sigma=0.0, detection_rate=0.5)
    dirs = ["person/t1", "person/t2", "vehicle/t1", "vehicle/t2"]
    limit = 10 * len(dirs)
    uploaded: list[str] = []
    uploader_done = threading.Event()
    stop_watch = threading.Event()
    peak = [0]
    errors: list[BaseException] = []
    # The supervisor's complete listings, each recorded once the deletes its cleaning pass handed to the
    # janitor are done (they run on the janitor's thread); and, per watcher listing, how many objects of
    # the last such listing it still found.
    listings: list[frozenset[str]] = [frozenset()]
    survivors: list[int] = []

    def uploader(s: Store) -> None:
        try:
            base = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
            start = time.monotonic()
            for i in range(144):  # ~12 per second for ~12 s
                key = f"{prefix}{dirs[i % len(dirs)]}/{stamp(base, i, step_ms=83)}.jpg"
                s.put(key, b"\xff\xd8\xff\xe0fake-jpeg")
                uploaded.append(key)
                time.sleep(max(0.0, start + (i + 1) / 12.0 - time.monotonic()))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            uploader_done.set()

    def watcher(s: Store) -> None:
        try:
            while not stop_watch.is_set():
                last = listings[-1]
                seen = [r.key for page in s.list_pages(prefix, 1000) for r in page]
                peak[0] = max(peak[0], len(seen))
                survivors.append(sum(1 for key in seen if key in last))
                stop_watch.wait(0.3)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    with AlgoService("synthetic", params) as service:
        cfg = make_config(worker={"count": 2}, algo={"endpoint": service.endpoint},
                          dispatch={"queue_capacity": 8, "overflow": "block"},
                          retention={"enabled": True, "max_count": 10, "protect": "lease"},
                          scan={"interval_s": 0.3})
        threads = [threading.Thread(target=uploader, args=(Store(cfg.store, creds),), daemon=True),
                   threading.Thread(target=watcher, args=(Store(cfg.store, creds),), daemon=True)]
        sup = Supervisor(cfg, show_progress=False, intake_done=uploader_done.is_set)
        after_sweep, janitor_done = sup._after_sweep, sup.recorder.janitor_done
        cleaned: list[frozenset[str]] = []  # the last complete listing, until its deletes are done

        def recording_after_sweep(end: Any) -> None:
            after_sweep(end)
            if end.complete:
                cleaned[:] = [frozenset(image.key for image in end.inventory)]
                recording_janitor_done([])

        def recording_janitor_done(done: Any) -> None:
            janitor_done(done)
            if cleaned and sup.janitor is not None and not sup.janitor.deleting():
                listings.append(cleaned.pop())

        sup._after_sweep = recording_after_sweep  # type: ignore[method-assign]
        sup.recorder.janitor_done = recording_janitor_done  # type: ignore[method-assign]
        for t in threads:
            t.start()
        try:
            report = drive(sup, timeout=200)
        finally:
            uploader_done.wait(60)
            stop_watch.set()
            for t in threads:
                t.join(30)
        calls = calls_under(service, prefix)
    assert not errors, errors
    results = results_of(cfg)
    lines = Counter(r.key for r in results)
    final = {r.key: r.outcome.value for r in results}
    listed_after = sum(len(page) for page in store.list_pages(prefix, 1000))
    print(f"uploaded {len(uploaded)}; peak listed by the watcher {peak[0]} (limit {limit}); outcomes "
          f"{dict(Counter(final.values()))}; cleaner {report.cleaner}; left in bucket {listed_after}")
    # Enforced at every complete listing: of what a listing found, at most the limit (and the images
    # workers hold) is left once its deletes are done. Only what arrived since may exceed the limit.
    held = cfg.concurrency
    over = [n for n in survivors if n > limit + held]
    print(f"complete listings {len(listings) - 1}; watcher listings {len(survivors)}; most survivors of the last "
          f"complete listing {max(survivors)} (limit {limit} + {held} held)")
    assert len(listings) > 10 and len(survivors) > 10
    assert not over, f"{len(over)} times the bucket kept more of a cleaned listing than the limit allows: {over}"
    assert sorted(lines) == sorted(uploaded), "an uploaded image has no result line"
    assert set(lines.values()) == {1}, [k for k, n in lines.items() if n > 1]
    assert report.conserved and report.scanned == len(uploaded)
    for d in dirs:
        served = [k for k, o in final.items() if k.startswith(prefix + d + "/") and o in SUCCESS]
        assert served, f"{d} got no analysed image: intake was not fair"
    assert set(final.values()) <= {*SUCCESS, "dropped_expired"}, Counter(final.values())
    # the far end: only analysed images were posted, each once
    assert all(calls.get(k, 0) == 1 for k, o in final.items() if o in SUCCESS)
    assert all(calls.get(k, 0) == 0 for k, o in final.items() if o == "dropped_expired")
