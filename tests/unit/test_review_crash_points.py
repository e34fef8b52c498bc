"""Crash points where pruning the processed set meets a replay, a restart or a ledger rebuild.

Every image that enters ends in exactly one results line; nothing is analysed twice except items in
flight at a crash; nothing is deleted from the store before its line is durable.
"""

from __future__ import annotations

import types
from collections import Counter
from typing import Any

import pytest

from imgworker.memstore import MemoryAlgo, MemoryStore

from tests.support.memory import EVENTS, InlineWatcher, config, crash, event_batch, events_supervisor, supervisor
from tests.support.driving import reach, steps
from tests.support.results import lines

pytestmark = pytest.mark.timeout(60)


def pruned(sup: Any, key: str) -> bool:
    """Ask for a listing, and say whether ``key`` left the processed set (read without marking it seen)."""
    sup.intake.next_sweep = 0.0
    return not sup.ledger._call(lambda s: s.contains(key))


def sweeping_steps(sup: Any, n: int) -> None:
    """``n`` steps, a listing asked for before each."""
    for _ in range(n):
        sup.intake.next_sweep = 0.0
        steps(sup, 1)


def test_a_prune_before_any_saved_event_position_does_not_let_a_replay_analyse_a_finished_image_again(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Events mode, fresh state: a prune is weighed against the position its checkpoint will save.

    That position is the last event handled (store time, far behind now); after a crash the watcher
    replays from it less the overlap. Had the prune taken *now* for the replay's start, the replay would
    reach the finished image's event again and give it a second line.
    """
    wall = [1_700_000_000 * 10**9]
    import imgworker.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "time", types.SimpleNamespace(time_ns=lambda: wall[0]))
    cfg = config(tmp_path, scan={"mode": "events", "events": EVENTS, "reconcile_interval_s": 3600.0},
                 actions={"delete_no_detection": True}, run={"until_idle": False})
    store = MemoryStore()
    watchers: list[InlineWatcher] = []
    first = events_supervisor(cfg, store, MemoryAlgo(store), watchers, intake_done=lambda: False)
    first.start()
    reach(first, lambda: first.intake.scans_completed >= 1, "the start-up listing (the bucket is empty)")
    key = "p/a/20240101-000000.000.jpg"
    store.put(key, b"\xff\xd8jpeg")
    event_ts = wall[0] - 60 * 10**9  # the store's event time: a minute before the prune below
    watchers[0].batches.append(event_batch(store, [key], ts_ns=event_ts))
    reach(first, lambda: key not in store, "analysed (no detection), its line written, then deleted by its action")
    assert lines(cfg) == Counter([key])
    for _ in range(10):  # reconciliation listings that no longer see it, ten seconds apart
        wall[0] += 10 * 10**9
        first.intake.next_sweep = 0.0
        steps(first, 1)
        reach(first, lambda: not first.intake.sweeping, "the listing's end", max_steps=50)
    first.checkpoint()  # saves any prune, and the event position: the last event handled
    crash(first)

    algo = MemoryAlgo(store)
    second = events_supervisor(cfg, store, algo, watchers, intake_done=lambda: False)
    second.start()
    since = watchers[-1].since_ns
    assert since == event_ts
    reach(second, lambda: second.intake.scans_completed >= 1, "the start-up listing")  # the replay comes meanwhile
    # the watcher resumes OVERLAP_NS before its position: the finished image's event comes again
    watchers[-1].batches.append(event_batch(store, [key], ts_ns=event_ts))
    steps(second, 20)
    second.request_stop("test")
    second.step_until(second.finished, max_steps=100)
    second.shutdown()
    assert lines(cfg) == Counter([key]), f"a finished image got another line after a replay: {lines(cfg)}"


def test_a_restart_redoes_no_delete_of_a_pruned_key_and_analyses_its_new_upload(tmp_path: Any) -> None:
    """The watermark lags behind a finished, deleted and pruned image; its key is uploaded again; SIGKILL.

    The restart adds to the processed set only the lines after the checkpoint's fsynced offset (the key
    log holds the prune), and redoes the actions after the watermark only for keys still processed: the
    new upload is analysed, and the old line's ``delete_no_detection`` does not delete it.
    """
    from imgworker.errors import StoreUnavailable

    cfg = config(tmp_path, worker={"count": 1}, actions={"delete_no_detection": True, "copy_alerts": True})
    store = MemoryStore()
    alert = "p/a/20240101-000000.001.jpg"  # detections: an alert copy is due
    key = "p/a/20240101-000000.002.jpg"  # no detection: deleted by its action
    for k in (alert, key):
        store.put(k, b"\xff\xd8jpeg")
    algo = MemoryAlgo(store, detections=lambda path: int(path.endswith("1.jpg")))
    real_copy = store.copy

    def copy_fails(source: str, target: str) -> None:
        raise StoreUnavailable("the store refuses copies for now")

    store.copy = copy_fails  # type: ignore[method-assign]  # the alert's copy is retried: the watermark stays
    first = supervisor(cfg, store, algo, intake_done=lambda: False)
    first.start()
    reach(first, lambda: key not in store and len(lines(cfg)) >= 2, "both lines, and the deleted image gone")
    assert lines(cfg) == Counter([alert, key])
    reach(first, lambda: pruned(first, key), "complete listings that no longer see it: pruned")
    assert first.janitor is not None and first.janitor.watermark(10**9) == 0  # the alert's line holds it back
    store.put(key, b"\xff\xd8new image")  # the same key names a new image
    first.checkpoint()  # watermark: the alert's line, before the pruned key's line
    crash(first)

    store.copy = real_copy  # type: ignore[method-assign]
    second = supervisor(cfg, store, algo)
    second.start()
    assert second.janitor is not None
    second.recorder.janitor_done(second.janitor.collect())  # the redone actions run before anything is listed
    assert key in store, "the old line's delete was redone on the new upload, which has no line yet"
    assert second.step_until(second.finished, max_steps=500)
    second.shutdown()
    assert lines(cfg)[key] == 2 and algo.calls[key] == 2, f"the new upload of {key} was not analysed: {lines(cfg)}"


class _LostOnce:
    """The Manager's proxy after the Manager was SIGKILLed: the next call fails as a lost connection would."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.lost = True

    def __getattr__(self, name: str) -> Any:
        if self.lost:
            self.lost = False
            raise EOFError("the ledger process is gone")
        return getattr(self.real, name)


def test_a_ledger_rebuild_keeps_a_pruned_key_pruned_and_its_new_upload_is_analysed(tmp_path: Any) -> None:
    """SIGKILL of the Manager: the set is rebuilt from disk, then the keys pruned since the last save are forgotten.

    Otherwise a key finished, deleted and pruned since the last checkpoint would come back as processed,
    and an image uploaded again under that key would be taken for done: it would never get a line.
    """
    cfg = config(tmp_path, worker={"count": 1}, actions={"delete_no_detection": True})
    store = MemoryStore()
    key = "p/a/20240101-000000.000.jpg"
    store.put(key, b"\xff\xd8jpeg")
    sup = supervisor(cfg, store, MemoryAlgo(store), intake_done=lambda: False)
    sup.start()
    try:
        reach(sup, lambda: key not in store, "analysed (no detection), its line written, then deleted by its action")
        reach(sup, lambda: pruned(sup, key), "complete listings that no longer see it: pruned")
        store.put(key, b"\xff\xd8new image")  # the same key names a new image
        sup.ledger._set = _LostOnce(sup.ledger._set)  # the Manager is SIGKILLed ...
        sup.ledger.backend.alive = lambda: False  # type: ignore[method-assign]  # ... and found dead
        sweeping_steps(sup, 30)
        assert sup.ledger.restarts == 1
    finally:
        sup.request_stop("test")
        sup.step_until(sup.finished, max_steps=100)
        sup.shutdown()
    assert lines(cfg)[key] == 2, f"the new upload of {key} never got a line of its own: {lines(cfg)}"
