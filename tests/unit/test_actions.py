from __future__ import annotations

import pytest

from imgworker.actions import alerts_key, plan, results_key
from imgworker.config import load_config
from imgworker.errors import StoreUnavailable
from imgworker.janitor import MAX_ATTEMPTS, Janitor, Job
from imgworker.outcomes import Outcome, Result

KEY = "cam/person/t1/20240101-000000.000.jpg"


def result(outcome: Outcome, detections: int = 0) -> Result:
    return Result(key=KEY, outcome=outcome, task_type="person", task_id="t1", detections=detections)


class BrokenStore:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def put(self, key, data, content_type="") -> None:
        self.calls.append("put")
        raise StoreUnavailable("down")

    def copy(self, source, target) -> None:
        self.calls.append("copy")
        raise StoreUnavailable("down")

    def delete(self, keys):
        self.calls.append("delete")
        return list(keys)  # refused


def cfg(**actions):
    return load_config(env={}, overrides={"store": {"prefix": "cam/"}, "actions": actions})


def test_keys_stay_out_of_the_scanned_tree():
    c = cfg()
    assert alerts_key(c, KEY) == "cam/alerts/person/t1/20240101-000000.000.jpg"
    assert results_key(c, KEY) == "cam/results/person/t1/20240101-000000.000.jpg.json"


def test_plan_per_outcome_puts_the_delete_last():
    c = cfg(delete_no_detection=True, copy_alerts=True, write_results=True)
    assert [j.action for j in plan(c, result(Outcome.INFERRED, 2), line=7)] == ["write_results", "copy_alerts"]
    assert [j.action for j in plan(c, result(Outcome.NO_DETECTION), line=7)] == ["write_results",
                                                                                   "delete_no_detection"]
    assert plan(c, result(Outcome.FAILED_ALGO), line=7) == []
    assert {j.line for j in plan(c, result(Outcome.INFERRED, 1), line=7)} == {7}


def test_actions_are_off_by_default():
    assert plan(cfg(), result(Outcome.INFERRED, 1), line=0) == []


def test_failed_actions_are_retried_then_given_up_and_keep_the_image_protected_meanwhile():
    c = cfg(delete_no_detection=True, copy_alerts=True, write_results=True)
    store = BrokenStore()
    synced: list[int] = []
    now = [0.0]
    janitor = Janitor(store, sync=lambda: synced.append(1), inline=True, clock=lambda: now[0])
    janitor.submit(plan(c, result(Outcome.INFERRED, 2), line=0) + plan(c, result(Outcome.NO_DETECTION), line=100))
    assert janitor.collect() == []  # first attempts failed: queued again with backoff
    assert janitor.watermark(200) == 0 and janitor.has_open_actions(KEY)
    done = []
    for _ in range(MAX_ATTEMPTS):
        now[0] += 60.0
        done += janitor.collect()
    assert sorted((d.job.action, d.failed) for d in done) == [("copy_alerts", True), ("delete_no_detection", True),
                                                              ("write_results", True), ("write_results", True)]
    assert store.calls.count("copy") == MAX_ATTEMPTS
    assert len(synced) == len(store.calls)  # the journal is fsynced before every store change
    assert janitor.watermark(200) == 200 and not janitor.has_open_actions(KEY)


def test_an_action_succeeds_once_the_store_is_back():
    c = cfg(copy_alerts=True)
    store = BrokenStore()
    now = [0.0]
    janitor = Janitor(store, sync=lambda: None, inline=True, clock=lambda: now[0])
    janitor.submit(plan(c, result(Outcome.INFERRED, 1), line=5))
    assert janitor.collect() == [] and janitor.watermark(50) == 5
    store.copy = lambda source, target: None  # type: ignore[method-assign]
    now[0] += 60.0
    assert [(d.job.action, d.failed) for d in janitor.collect()] == [("copy_alerts", False)]
    assert janitor.watermark(50) == 50


@pytest.mark.timeout(30)
def test_threaded_janitor_batches_consecutive_deletes():
    class Store:
        def __init__(self) -> None:
            self.batches: list[list[str]] = []

        def delete(self, keys):
            self.batches.append(list(keys))
            return []

    store = Store()
    janitor = Janitor(store, sync=lambda: None, batch_size=3)  # type: ignore[arg-type]
    with janitor._lock:  # hold the thread back so the jobs queue up
        janitor.submit([Job(kind="delete", keys=(f"k{i}",), action="delete_no_detection", line=i) for i in range(5)])
    import time

    done = janitor.close(time.monotonic() + 10)
    assert sorted(d.job.keys[0] for d in done) == [f"k{i}" for i in range(5)]
    assert sorted(len(b) for b in store.batches) == [2, 3]
    assert janitor.watermark(99) == 99


def test_an_action_given_up_is_owed_without_holding_the_watermark_and_an_impossible_one_is_not():
    import msgspec

    from imgworker.errors import ObjectMissing
    from imgworker.janitor import OwedAction

    c = cfg(copy_alerts=True, write_results=True)
    store = BrokenStore()

    def copy(source, target) -> None:
        store.calls.append("copy")
        raise ObjectMissing("gone")

    store.copy = copy  # type: ignore[method-assign]
    now = [0.0]
    janitor = Janitor(store, sync=lambda: None, inline=True, clock=lambda: now[0])
    janitor.submit(plan(c, result(Outcome.INFERRED, 1), line=3))
    for _ in range(MAX_ATTEMPTS):
        now[0] += 60.0
        janitor.collect()
    assert janitor.owed() == [OwedAction(line=3, action="write_results", key=KEY)]
    assert store.calls.count("copy") == 1  # the image is gone: the copy is neither retried nor owed
    assert janitor.watermark(50) == 50 and not janitor.has_open_actions(KEY)
    store.put = lambda key, data, content_type="": None  # type: ignore[method-assign]  # the store is back
    janitor.submit([msgspec.structs.replace(job, owed=True) for job in plan(c, result(Outcome.INFERRED, 1), line=3)
                    if job.action == "write_results"])
    assert janitor.watermark(50) == 50 and janitor.owed() != [] and janitor.has_open_actions(KEY)
    assert [(d.job.action, d.failed) for d in janitor.collect()] == [("write_results", False)]
    assert janitor.owed() == [] and not janitor.has_open_actions(KEY)


def test_cleaner_deletes_waiting_in_the_janitor_are_known_until_done():
    class Store:
        def delete(self, keys):
            return ["b"]  # refused

    janitor = Janitor(Store(), sync=lambda: None, inline=True)  # type: ignore[arg-type]
    janitor.submit([Job(kind="delete", keys=("a", "b"))])
    assert janitor.deleting() == {"a", "b"} and janitor.watermark(9) == 9
    (done,) = janitor.collect()
    assert (done.deleted, done.refused, janitor.deleting()) == (1, 1, set())
