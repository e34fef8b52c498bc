"""The janitor against the supervisor: cleaner deletes off the loop, and what a restart or a repair redoes.

Driven through the in-memory store and algorithm; counted at the far end (objects in the bucket,
store calls, calls the algorithm received, result lines).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import threading
from collections import Counter
from typing import Any

import msgspec
import pytest

import imgworker.janitor as janitor_module
from imgworker.cli import cmd_repair
from imgworker.errors import StoreUnavailable
from imgworker.memstore import MemoryAlgo, MemoryStore
from imgworker.outcomes import Outcome, Result
from imgworker.supervisor import Supervisor, memory_parts
from tests.support.driving import reach
from tests.support.memory import config, fill, supervisor
from tests.support.results import lines, outcomes

pytestmark = pytest.mark.timeout(60)


def alerts(store: MemoryStore) -> list[str]:
    return sorted(k for k in store.keys() if k.startswith("alerts/"))


def test_cleaner_deletes_wait_in_the_janitor_while_the_loop_goes_on(tmp_path):
    cfg = config(tmp_path, worker={"count": 1}, run={"until_idle": False},
                 retention={"enabled": True, "max_count": 2, "protect": "lease"})
    store = MemoryStore()
    keys = fill(store, ["p/a"], 6)
    entered, release = threading.Event(), threading.Event()
    real_delete = store.delete

    def delete(batch: Any) -> list[str]:
        entered.set()
        release.wait(20)  # a store brownout: the request hangs until the test lets it go
        return real_delete(batch)

    store.delete = delete  # type: ignore[method-assign]
    algo = MemoryAlgo(store)
    parts = dataclasses.replace(memory_parts(cfg, store, algo), janitor_inline=False)
    sup = Supervisor(cfg, show_progress=False, parts=parts)
    with sup.running():
        try:
            reach(sup, entered.is_set, "a delete request sent")
            # the first pass gave up the four oldest; the two kept are analysed meanwhile
            reach(sup, lambda: len(lines(cfg)) == 6 and sup.intake.scans_completed >= 3,
                  "six result lines and three sweeps", max_steps=50000)
            sup.checkpoint()
            during = (dict(Counter(outcomes(cfg).values())), Counter(algo.calls), sorted(store.keys()),
                      os.path.exists(os.path.join(cfg.run.state_dir, "state.json")), release.is_set())
        finally:
            release.set()
    assert during == ({"dropped_expired": 4, "no_detection": 2}, Counter(keys[4:]), sorted(keys), True, False)
    assert sorted(store.keys()) == keys[4:]
    assert (sup.cleaner.deleted, sup.cleaner.delete_errors, sup.cleaner.given_up) == (4, 0, 4)  # none twice


def test_repair_redoes_only_the_actions_after_the_watermark(tmp_path):
    cfg = config(tmp_path, worker={"count": 1}, actions={"copy_alerts": True})
    store = MemoryStore()
    keys = fill(store, ["p/a"], 6)
    supervisor(cfg, store, MemoryAlgo(store, detections=lambda path: 1)).run()
    assert store.calls["copy"] == 6
    late = fill(store, ["p/b"], 1)[0]
    with open(cfg.results_path, "ab") as f:  # written after the last checkpoint; its copy never ran
        f.write(msgspec.json.encode(Result(key=late, outcome=Outcome.INFERRED, task_type="p", task_id="b",
                                           detections=1)) + b"\n")
        f.write(b"{not json\n")
    assert cmd_repair(argparse.Namespace(state_dir=cfg.run.state_dir, results=None)) == 0
    algo = MemoryAlgo(store, detections=lambda path: 1)
    supervisor(cfg, store, algo).run()
    assert store.calls["copy"] == 7  # the one line after the watermark, not the whole history again
    assert alerts(store) == sorted(f"alerts/{k}" for k in keys + [late])
    assert algo.calls == Counter() and lines(cfg) == Counter(keys + [late])


def test_repair_without_a_usable_state_redoes_every_action(tmp_path):
    cfg = config(tmp_path, worker={"count": 1}, actions={"copy_alerts": True})
    store = MemoryStore()
    keys = fill(store, ["p/a"], 3)
    supervisor(cfg, store, MemoryAlgo(store, detections=lambda path: 1)).run()
    with open(os.path.join(cfg.run.state_dir, "state.json"), "w") as f:
        f.write("{")
    assert cmd_repair(argparse.Namespace(state_dir=cfg.run.state_dir, results=None)) == 0
    supervisor(cfg, store, MemoryAlgo(store)).run()
    assert store.calls["copy"] == 6 and alerts(store) == sorted(f"alerts/{k}" for k in keys)


def test_actions_given_up_come_back_after_a_restart(tmp_path, monkeypatch):
    monkeypatch.setattr(janitor_module, "MAX_ATTEMPTS", 1)  # the first failure gives up
    cfg = config(tmp_path, worker={"count": 1}, actions={"copy_alerts": True, "write_results": True})
    store = MemoryStore()
    keys = fill(store, ["p/a"], 4)
    real_copy = store.copy

    def copy(source: str, target: str) -> None:
        raise StoreUnavailable("down")

    store.copy = copy  # type: ignore[method-assign]
    report = supervisor(cfg, store, MemoryAlgo(store, detections=lambda path: 1)).run()
    assert report.action_errors == {"copy_alerts": 4} and alerts(store) == []
    store.copy = real_copy  # type: ignore[method-assign]
    algo = MemoryAlgo(store)
    report = supervisor(cfg, store, algo).run()
    assert alerts(store) == sorted(f"alerts/{k}" for k in keys) and report.action_errors == {}
    assert store.calls["copy"] == 4 and store.calls["put"] == 4 + 4  # the images, then each result object once
    supervisor(cfg, store, algo).run()  # done: not owed any more
    assert store.calls["copy"] == 4 and algo.calls == Counter()


def test_a_delete_given_up_is_redone_after_a_restart(tmp_path, monkeypatch):
    monkeypatch.setattr(janitor_module, "MAX_ATTEMPTS", 1)
    cfg = config(tmp_path, worker={"count": 1}, actions={"delete_no_detection": True})
    store = MemoryStore()
    keys = fill(store, ["p/a"], 3)
    store.refuse_deletes(set(keys))
    report = supervisor(cfg, store, MemoryAlgo(store)).run()
    assert report.action_errors == {"delete_no_detection": 3} and sorted(store.keys()) == keys
    store.refuse_deletes(set())
    algo = MemoryAlgo(store)
    supervisor(cfg, store, algo).run()
    assert len(store) == 0 and algo.calls == Counter()
    assert outcomes(cfg) == dict.fromkeys(keys, "no_detection")


def test_an_owed_delete_of_a_key_no_longer_processed_is_not_redone(tmp_path):
    cfg = config(tmp_path, worker={"count": 1}, actions={"delete_no_detection": True})
    store = MemoryStore()
    (key,) = fill(store, ["p/a"], 1)  # uploaded again after the last run pruned its key
    os.makedirs(cfg.run.state_dir)
    line = msgspec.json.encode(Result(key=key, outcome=Outcome.NO_DETECTION, task_type="p", task_id="a")) + b"\n"
    with open(cfg.results_path, "wb") as f:
        f.write(line)
    with open(os.path.join(cfg.run.state_dir, "state.json"), "wb") as f:
        f.write(msgspec.json.encode({"version": 2, "results_offset": len(line), "owed": [[0, "delete_no_detection", key]]}))
    algo = MemoryAlgo(store)
    supervisor(cfg, store, algo).run()
    assert algo.calls == Counter([key]) and store.deletes == [key]  # analysed, then deleted once, by its own action


def test_inflight_deletes_queued_images_before_a_worker_can_take_one(tmp_path):
    cfg = config(tmp_path, worker={"count": 1}, run={"until_idle": False},
                 retention={"enabled": True, "max_count": 2, "protect": "inflight"})
    store = MemoryStore()
    keys = fill(store, ["p/a"], 6)
    release = threading.Event()
    real_delete = store.delete

    def delete(batch: Any) -> list[str]:
        if threading.current_thread() is not threading.main_thread():
            release.wait(20)  # the janitor's thread is held up by a slow store
        return real_delete(batch)

    store.delete = delete  # type: ignore[method-assign]
    algo = MemoryAlgo(store)
    sup = Supervisor(cfg, show_progress=False,
                     parts=dataclasses.replace(memory_parts(cfg, store, algo), janitor_inline=False))
    with sup.running():
        try:
            reach(sup, lambda: len(lines(cfg)) == 6, "six result lines", max_steps=500)
        finally:
            release.set()
    assert algo.calls == Counter(keys[4:])  # the four oldest were deleted while queued: no worker analysed them
    assert dict(Counter(outcomes(cfg).values())) == {"skipped_missing": 4, "no_detection": 2}
