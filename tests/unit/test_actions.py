from __future__ import annotations

from imgworker.actions import alerts_key, apply, results_key
from imgworker.config import load_config
from imgworker.errors import StoreUnavailable
from imgworker.outcomes import ImageRef, Outcome

REF = ImageRef(key="cam/person/t1/20240101-000000.000.jpg", task_type="person", task_id="t1")


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
    assert alerts_key(c, REF.key) == "cam/alerts/person/t1/20240101-000000.000.jpg"
    assert results_key(c, REF.key) == "cam/results/person/t1/20240101-000000.000.jpg.json"


def test_each_failed_action_is_named():
    c = cfg(delete_no_detection=True, copy_alerts=True, write_results=True)
    store = BrokenStore()
    assert apply(c, store, REF, Outcome.INFERRED, 2) == ("write_results", "copy_alerts")
    assert apply(c, store, REF, Outcome.NO_DETECTION, 0) == ("write_results", "delete_no_detection")
    assert apply(c, store, REF, Outcome.FAILED_ALGO, 0) == ()


def test_actions_are_off_by_default():
    store = BrokenStore()
    assert apply(cfg(), store, REF, Outcome.INFERRED, 1) == () and store.calls == []
