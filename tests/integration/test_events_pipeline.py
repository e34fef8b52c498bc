"""The pipeline on change events from the real SeaweedFS filer, with reconciliation behind it.

Counted at the far end: the calls the algorithm service received and the result lines.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from multiprocessing.connection import wait

import psutil
import pytest

from imgworker.services.algo_server import AlgoService, SyntheticParams
from imgworker.supervisor import Supervisor
from tests.support.driving import reach, steps
from tests.support.results import lines
from tests.support.store import upload

pytestmark = pytest.mark.timeout(180)


def events_config(make_config, store_server, **sections):
    return make_config(scan={"mode": "events", "events": {"filer": store_server.filer_address},
                             "reconcile_interval_s": 3600.0}, run={"until_idle": False}, **sections)


PATIENCE_S = 90.0  #: how long a test steps towards one condition before it fails


def watcher_process() -> psutil.Process:
    me = psutil.Process(os.getpid())
    found = [c for c in me.children() if "imgworker: watcher" in " ".join(c.cmdline())]
    assert len(found) == 1, found
    return found[0]


def test_events_find_new_images_without_a_listing(make_config, store_server, store, prefix):
    with AlgoService("synthetic", SyntheticParams(latency_ms=10.0, sigma=0.0)) as service:
        cfg = events_config(make_config, store_server, algo={"endpoint": service.endpoint})
        sup = Supervisor(cfg, show_progress=False)
        with sup.running():
            reach(sup, lambda: sup.intake.scans_completed >= 1, "the start-up reconciliation", PATIENCE_S)
            keys = [f"{prefix}person/t1/20240101-120000.{i:03d}.jpg" for i in range(12)]
            keys.append(f"{prefix}person/t1/with space %+ü.jpg")
            upload(store, keys)
            reach(sup, lambda: len(lines(cfg)) >= len(keys), "the uploaded images", PATIENCE_S)
            assert sup.intake.scans_completed == 1  # found by events alone
            assert sup.intake.events_received >= len(keys)
        calls = service.calls()
    assert lines(cfg) == Counter(keys)
    assert all(calls.get(k) == 1 for k in keys), calls
    report = sup.report()
    assert report.p99_discovery_ms > 0 and report.conserved


def test_a_stopped_event_stream_is_covered_by_reconciliation_exactly_once(make_config, store_server, store, prefix,
                                                                           algo_server):
    cfg = events_config(make_config, store_server)
    sup = Supervisor(cfg, show_progress=False)
    watcher = None
    with sup.running():
        try:
            reach(sup, lambda: sup.intake.scans_completed >= 1, "the start-up reconciliation", PATIENCE_S)
            watcher = watcher_process()
            watcher.send_signal(signal.SIGSTOP)  # the event stream stops delivering
            keys = [f"{prefix}vehicle/t2/20240101-120000.{i:03d}.jpg" for i in range(10)]
            upload(store, keys)
            steps(sup, 20)
            assert not lines(cfg)  # nothing can have found them yet
            sup.intake.next_sweep = 0.0  # the reconciliation interval comes round
            reach(sup, lambda: len(lines(cfg)) >= len(keys), "reconciliation", PATIENCE_S)
            watcher.send_signal(signal.SIGCONT)  # the late events arrive: already analysed, not again
            received = sup.intake.events_received
            reach(sup, lambda: sup.intake.events_received >= received + len(keys), "the late events", PATIENCE_S)
            steps(sup, 20)
        finally:
            if watcher is not None:
                watcher.send_signal(signal.SIGCONT)
    assert lines(cfg) == Counter(keys)
    calls = algo_server.calls()
    assert all(calls.get(k) == 1 for k in keys), {k: calls.get(k) for k in keys}


def test_restart_resumes_the_event_stream_without_a_gap(make_config, store_server, store, prefix, algo_server):
    cfg = events_config(make_config, store_server)
    first = [f"{prefix}person/t3/20240101-120000.{i:03d}.jpg" for i in range(5)]
    sup = Supervisor(cfg, show_progress=False)
    with sup.running():
        reach(sup, lambda: sup.intake.scans_completed >= 1, "the start-up reconciliation", PATIENCE_S)
        upload(store, first)
        reach(sup, lambda: len(lines(cfg)) >= len(first), "the first images", PATIENCE_S)
    position = sup.intake.position().events_ts_ns
    assert position > 0
    later = [f"{prefix}person/t3/20240101-120001.{i:03d}.jpg" for i in range(5)]
    upload(store, later)  # while imgworker is down
    again = Supervisor(cfg, show_progress=False, intake_done=lambda: False)  # no catch-up listing at start
    with again.running():
        again.intake.next_sweep = float("inf")  # no reconciliation: the events must bring them
        reach(again, lambda: len(lines(cfg)) >= len(first) + len(later), "the images uploaded while down", PATIENCE_S)
        assert again.intake.scans_completed == 0
    assert lines(cfg) == Counter(first + later)
    calls = algo_server.calls()
    assert all(calls.get(k) == 1 for k in first + later)


def test_a_killed_watcher_loses_no_batch_it_had_sent(make_config, store_server, store, prefix):
    with AlgoService("synthetic", SyntheticParams(latency_ms=10.0, sigma=0.0)) as service:
        cfg = events_config(make_config, store_server, algo={"endpoint": service.endpoint})
        sup = Supervisor(cfg, show_progress=False, intake_done=lambda: False)
        with sup.running():
            reach(sup, lambda: sup.intake.scans_completed >= 1, "the start-up reconciliation", PATIENCE_S)
            watcher = sup.intake.watcher
            assert watcher is not None
            pipe = watcher.waitables()[0]
            keys = [f"{prefix}person/t4/20240101-120000.{i:03d}.jpg" for i in range(20)]
            upload(store, keys)  # the supervisor reads nothing meanwhile: the batches wait in the pipe
            assert wait([pipe], 60), "the watcher sent nothing"
            time.sleep(1.0)  # the rest of the batches follow within milliseconds
            watcher_process().kill()
            while watcher.alive():  # reaped before the next step, which must find it dead before it reads
                time.sleep(0.01)
            sup.step()
            assert sup.intake.watcher is None  # the death was seen ...
            assert sup.intake.events_received > 0  # ... after what it had sent was read
            reach(sup, lambda: len(lines(cfg)) >= len(keys), "the uploaded images", PATIENCE_S)
            steps(sup, 20)  # the new watcher replays the last seconds: nothing is taken twice
        calls = service.calls()
    assert lines(cfg) == Counter(keys)
    assert all(calls.get(k) == 1 for k in keys), {k: calls.get(k) for k in keys}


def test_a_replay_after_a_restart_does_not_bring_back_deleted_finished_images(make_config, store_server, store,
                                                                             prefix):
    with AlgoService("synthetic", SyntheticParams(latency_ms=10.0, sigma=0.0, detection_rate=0.0)) as service:
        cfg = events_config(make_config, store_server, algo={"endpoint": service.endpoint},
                            actions={"delete_no_detection": True})
        keys = [f"{prefix}person/t5/20240101-120000.{i:03d}.jpg" for i in range(10)]
        sup = Supervisor(cfg, show_progress=False, intake_done=lambda: False)
        with sup.running():
            reach(sup, lambda: sup.intake.scans_completed >= 1, "the start-up reconciliation", PATIENCE_S)
            upload(store, keys)
            reach(sup, lambda: len(lines(cfg)) >= len(keys), "the uploaded images", PATIENCE_S)  # then deleted at once
            for _ in range(2):  # two complete listings without them: their objects are gone
                done = sup.intake.scans_completed
                sup.intake.next_sweep = 0.0
                reach(sup, lambda: sup.intake.scans_completed > done, "a reconciliation", PATIENCE_S)
        assert not [ref for page in store.list_pages(prefix, 1000) for ref in page]  # no detection: deleted
        again = Supervisor(cfg, show_progress=False, intake_done=lambda: False)
        marker = f"{prefix}person/t5/20240101-120100.000.jpg"
        with again.running():  # its watcher resumes a little before the saved position
            upload(store, [marker])  # the tail sends in time order: any replay of the others comes first
            reach(again, lambda: marker in lines(cfg) and not again.in_flight
                  and not again.dispatch.pending and not again.intake.backlog, "the new image", PATIENCE_S)
        calls = service.calls()
    assert lines(cfg) == Counter(keys + [marker]), "a finished image was taken in again"
    assert all(calls.get(k) == 1 for k in keys + [marker])
