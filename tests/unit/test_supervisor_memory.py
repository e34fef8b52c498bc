"""The supervisor driven step by step through an in-memory store, an inline pool and an inline lister.

Every invariant is counted at the far end: the calls the in-memory algorithm received, the
objects left in the in-memory bucket, the lines in the results file.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from imgworker.config import Config
from imgworker.errors import AlreadyRunning, StateError
from imgworker.ledger import Ledger, LocalBackend
from imgworker.memstore import MemoryAlgo, MemoryStore
from imgworker.outcomes import WorkItem
from imgworker.pool import Exit
from imgworker.results import read_results
from imgworker.supervisor import Supervisor, memory_parts
from tests.support.driving import reach, steps
from tests.support.memory import (
    EVENTS, InlineWatcher, config, crash, event_batch, events_supervisor, fill, supervisor,
)
from tests.support.results import lines, outcomes

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=[None, 1, 2], ids=["prompt", "late-1", "late-2"])
def late(request: pytest.FixtureRequest) -> int | None:
    """Answers delivered in the step they are run, or held for a few steps and reordered (seeded)."""
    return request.param


def test_every_image_one_outcome_and_one_call(tmp_path, late):
    cfg = config(tmp_path)
    store = MemoryStore()
    keys = fill(store, ["p/a", "p/b"], 5)
    algo = MemoryAlgo(store, detections=lambda path: int(path.endswith("1.jpg")))
    report = supervisor(cfg, store, algo, late=late).run()
    assert report.conserved and report.scanned == 10
    assert lines(cfg) == Counter(keys) and algo.calls == Counter(keys)


def test_crash_after_results_were_written_analyses_nothing_twice(tmp_path, late):
    cfg = config(tmp_path, worker={"count": 1})
    store = MemoryStore()
    keys = fill(store, ["p/a"], 8)
    algo = MemoryAlgo(store)
    first = supervisor(cfg, store, algo, late=late)
    first.start()
    reach(first, lambda: len(lines(cfg)) >= 4, "four result lines")
    crash(first)  # no checkpoint was ever written: only the results journal survives
    supervisor(cfg, store, algo, late=late).run()
    assert lines(cfg) == Counter(keys)
    assert algo.calls == Counter(keys)


def test_crash_before_delete_action_redoes_it_and_keeps_the_real_outcome(tmp_path, late):
    cfg = config(tmp_path, worker={"count": 1}, actions={"delete_no_detection": True})
    store = MemoryStore()
    keys = fill(store, ["p/a"], 6)
    algo = MemoryAlgo(store)
    first = supervisor(cfg, store, algo, late=late)
    first.start()
    assert first.janitor is not None
    first.janitor.collect = lambda: []  # type: ignore[method-assign]  # crash before any delete ran
    reach(first, lambda: len(lines(cfg)) >= 3, "three result lines")
    first.checkpoint()  # the watermark stays at the first line whose delete is not done
    crash(first)
    assert all(key in store for key in keys)
    supervisor(cfg, store, algo, late=late).run()
    assert outcomes(cfg) == {key: "no_detection" for key in keys}
    assert len(store) == 0 and algo.calls == Counter(keys)


def test_result_line_is_written_before_the_image_is_deleted(tmp_path, late):
    cfg = config(tmp_path, actions={"delete_no_detection": True})
    store = MemoryStore()
    keys = fill(store, ["p/a", "p/b"], 4)
    seen_at_delete: list[bool] = []
    real_delete = store.delete

    def delete(batch: Any) -> list[str]:
        batch = list(batch)
        written = set(lines(cfg))
        seen_at_delete.extend(key in written for key in batch)
        return real_delete(batch)

    store.delete = delete  # type: ignore[method-assign]
    supervisor(cfg, store, MemoryAlgo(store), late=late).run()
    assert len(seen_at_delete) == len(keys) and all(seen_at_delete)


def test_power_loss_after_a_delete_batch_leaves_no_image_deleted_without_its_line(tmp_path, late):
    """Durable before destructive: cut the results file back to what was fsynced when the last delete
    batch was sent (a power loss right after it), restart, and count what the bucket lost."""
    cfg = config(tmp_path, actions={"delete_no_detection": True})
    store = MemoryStore()
    keys = fill(store, ["p/a", "p/b"], 6)
    algo = MemoryAlgo(store)
    first = supervisor(cfg, store, algo, late=late)
    first.start()
    assert first.janitor is not None
    fsynced = [0]
    real_sync = first.janitor.sync

    def sync() -> object:
        fsynced[0] = real_sync()  # type: ignore[assignment]
        return fsynced[0]

    first.janitor.sync = sync
    durable_at_delete: list[int] = []
    real_delete = store.delete

    def delete(batch: Any) -> list[str]:
        durable_at_delete.append(fsynced[0])
        return real_delete(batch)

    store.delete = delete  # type: ignore[method-assign]
    reach(first, lambda: len(store) <= 6, "six images deleted")  # others are still to be analysed
    crash(first)
    store.delete = real_delete  # type: ignore[method-assign]
    with open(cfg.results_path, "r+b") as f:
        f.truncate(durable_at_delete[-1])  # what was not fsynced is lost with the power
    supervisor(cfg, store, algo, late=late).run()
    written = outcomes(cfg)
    deleted_without_line = sorted(k for k in keys if k not in store and k not in written)
    assert not deleted_without_line, f"deleted, but their result line was not on disk: {deleted_without_line}"
    assert set(written.values()) == {"no_detection"}, written
    assert lines(cfg) == Counter(keys) and len(store) == 0


def test_an_image_is_spared_once_when_killed_for_another_lane_s_deadline(tmp_path):
    cfg = config(tmp_path, worker={"count": 2, "max_attempts": 1})
    store = MemoryStore()
    sup = supervisor(cfg, store, MemoryAlgo(store))
    sup.start()
    try:
        key = "p/a/20240101-000000.000.jpg"
        sup.dispatch.append(WorkItem(ref=sup_ref(key), waits=1))  # it once waited for an endpoint, too
        killed_for_lane_0 = Exit(process=0, lanes=(0, 1), code=-9, retiring=False, overdue=(0,))
        for kill in range(2):  # its process is killed twice for the other lane's deadline
            queued = sup.dispatch.pop_next()
            assert queued is not None
            sup.inflight.take(1, queued.item, queued_at=queued.queued_at)
            sup._on_exit(killed_for_lane_0)
            if kill == 0:  # spared: back in the queue as it was, its one attempt not used
                (again,) = sup.dispatch.in_take_order()
                assert (again.attempt, again.spared, again.waits) == (1, True, 1)
        assert outcomes(cfg) == {key: "failed_worker"}, "spared more than once: its attempts never run out"
        assert [r.cause for r in read_results(cfg.results_path)] == ["deadline_of_another_lane"]
        assert sup.dispatch.pending == 0 and len(sup.inflight) == 0
    finally:
        sup.request_stop("test", force=True)
        sup.shutdown()


def test_a_results_file_shorter_than_the_checkpoint_is_refused_at_start(tmp_path):
    cfg = config(tmp_path)
    store = MemoryStore()
    fill(store, ["p/a"], 6)
    supervisor(cfg, store, MemoryAlgo(store)).run()  # ends with a checkpoint at the end of the results
    size = os.path.getsize(cfg.results_path)
    with open(cfg.results_path, "r+b") as f:
        f.truncate(size // 2)
    algo = MemoryAlgo(store)
    with pytest.raises(StateError, match="is shorter") as refused:
        supervisor(cfg, store, algo).start()
    assert "imgworker repair" in str(refused.value)
    assert refused.value.exit_code == 7 and not algo.calls
    supervisor(cfg, store, MemoryAlgo(store)).lock.acquire()  # a refused start leaves no lock behind


def test_cleaner_never_deletes_an_image_whose_alert_copy_is_pending(tmp_path, late):
    cfg = config(tmp_path, actions={"copy_alerts": True},
                 retention={"enabled": True, "max_count": 1, "protect": "queued"})
    store = MemoryStore()
    keys = fill(store, ["p/a"], 5)
    algo = MemoryAlgo(store, detections=lambda path: 1)
    sup = supervisor(cfg, store, algo, late=late)
    with sup.running():
        assert sup.janitor is not None
        held_back = sup.janitor.collect
        sup.janitor.collect = lambda: []  # type: ignore[method-assign]  # copies wait
        reach(sup, lambda: len(lines(cfg)) == len(keys), "a result line for every image")
        sup.intake.next_sweep = 0.0
        reach(sup, lambda: sup.cleaner.passes > 0, "a cleaner pass")
        assert all(key in store for key in keys)  # every image still has an alert copy to make
        sup.janitor.collect = held_back  # type: ignore[method-assign]
    assert sorted(k for k in store.keys() if k.startswith("alerts/")) == sorted(f"alerts/{k}" for k in keys)
    assert outcomes(cfg) == {key: "inferred" for key in keys}


def test_unexpected_exception_is_one_outcome_and_one_call(tmp_path, late):
    cfg = config(tmp_path)
    store = MemoryStore()
    keys = fill(store, ["p/a"], 4)
    algo = MemoryAlgo(store, fail=lambda path: RuntimeError("bug") if path == keys[1] else None)
    report = supervisor(cfg, store, algo, late=late).run()
    assert outcomes(cfg)[keys[1]] == "failed_algo"
    assert [r.cause for r in read_results(cfg.results_path) if r.key == keys[1]] == ["internal_error"]
    assert algo.calls[keys[1]] == 1 and report.worker_restarts == 0


def test_worker_death_retries_then_fails_the_item(tmp_path, late):
    cfg = config(tmp_path, worker={"count": 1, "max_attempts": 2})
    store = MemoryStore()
    keys = fill(store, ["p/a"], 3)
    sup = supervisor(cfg, store, MemoryAlgo(store), late=late, die_on=lambda item: item.ref.key == keys[0])
    report = sup.run()
    assert outcomes(cfg)[keys[0]] == "failed_worker" and report.retries == 1
    assert [r.cause for r in read_results(cfg.results_path) if r.key == keys[0]] == ["worker_died_exit_-9"]
    assert lines(cfg) == Counter(keys)


def test_a_dead_route_does_not_hold_up_the_others(tmp_path):
    dead = "http://127.0.0.1:9/infer"
    cfg = config(tmp_path, worker={"count": 1},
                 algo={"routes": {"vehicle": [dead]}, "eject_after_failures": 1, "retries": 0,
                       "no_endpoint_budget_s": 3600.0, "eject_cooldown_s": 3600.0})
    store = MemoryStore()
    vehicles = fill(store, ["vehicle/t"], 4)
    people = fill(store, ["person/t"], 4)
    algo = MemoryAlgo(store)
    algo.down.add(dead)
    sup = supervisor(cfg, store, algo)
    with sup.running(drain=False):
        reach(sup, lambda: all(k in lines(cfg) for k in people), "a result line for every person image", max_steps=200)
        done = outcomes(cfg)
    assert all(done[k] == "no_detection" for k in people)
    assert sum(algo.calls[k] for k in vehicles) == 1  # one failed call ejected the route; the rest wait
    assert sup.dispatch.pending == len(vehicles)  # the image whose call ejected it waits too, uncharged
    assert not any(k in done for k in vehicles)
    # the report's "re-dispatches (process died, or waited for an endpoint)": that image went back once
    assert sup.report().retries == 1


def test_no_endpoint_budget_is_counted_per_image(tmp_path):
    cfg = config(tmp_path, algo={"no_endpoint_budget_s": 60.0, "eject_after_failures": 1, "retries": 0})
    store = MemoryStore()
    sup = supervisor(cfg, store, MemoryAlgo(store))
    sup.start()
    try:
        sup.endpoints.states[cfg.algo.endpoint].ejected_until = 1e18
        sup.endpoints.states[cfg.algo.endpoint].down_since = 1000.0
        old, young = (WorkItem(ref=sup_ref(f"p/a/{n}.jpg")) for n in ("old", "young"))
        sup.dispatch.append(old)
        sup.dispatch.append(young)
        sup.dispatch._queues["p"]["p/a/young.jpg"].queued_at = 1050.0
        sup.dispatch._queues["p"]["p/a/old.jpg"].queued_at = 900.0
        sup._fail_waited_out(1065.0)  # old waited 65 s of outage, young only 15 s
        assert outcomes(cfg) == {"p/a/old.jpg": "failed_algo"}
        assert sup.dispatch.pending_keys() == ["p/a/young.jpg"]
    finally:
        sup.request_stop("test", force=True)
        sup.shutdown()


def sup_ref(key: str) -> Any:
    from imgworker.outcomes import ImageRef

    return ImageRef(key=key, task_type="p", task_id="a")


def test_full_queue_takes_directories_in_turn_and_keeps_cleaning(tmp_path, late):
    cfg = config(tmp_path, worker={"count": 1}, dispatch={"queue_capacity": 2},
                 retention={"enabled": True, "max_count": 3, "protect": "lease"})
    store = MemoryStore()
    fill(store, ["p/a", "p/b", "p/c", "p/d"], 6)
    sup = supervisor(cfg, store, MemoryAlgo(store), late=late)
    with sup.running(drain=False):
        reach(sup, lambda: sup.cleaner.passes >= 1, "a cleaner pass")
        groups = Counter(k.split("/")[1] for k in lines(cfg))
        assert len(store) <= 4 * 3  # the limit held while the queue was full
        assert set(groups) == {"a", "b", "c", "d"}  # no directory starved behind the first
    assert sum(1 for _ in read_results(cfg.results_path)) == len(lines(cfg))


def test_until_idle_waits_for_a_sweep_that_began_after_intake_ended(tmp_path, late):
    cfg = config(tmp_path)
    store = MemoryStore()
    early = fill(store, ["p/a"], 2)
    uploading = [True]
    sup = supervisor(cfg, store, MemoryAlgo(store), late=late, intake_done=lambda: not uploading[0])

    def listed_after_the_work(n: int) -> Callable[[], bool]:
        """Stop early on a drain; else once ``n`` listings completed after both images had their lines."""
        since: list[int] = []

        def done() -> bool:
            if sup.draining:
                return True
            if not since and len(lines(cfg)) >= 2 and not sup.intake.sweeping:
                since.append(sup.intake.scans_completed)
            return bool(since) and sup.intake.scans_completed >= since[0] + n

        return done

    with sup.running():
        # two complete listings that found nothing new, both begun while intake was not done
        reach(sup, listed_after_the_work(2), "two empty listings while intake was not done")
        assert not sup.draining, "idle while intake was not done"
        late_keys = fill(store, ["p/z"], 1)
        uploading[0] = False
        reach(sup, sup.finished, "the run's end")
    assert lines(cfg) == Counter(early + late_keys)


def test_second_run_on_the_same_state_directory_is_refused(tmp_path):
    cfg = config(tmp_path)
    store = MemoryStore()
    first = supervisor(cfg, store, MemoryAlgo(store))
    first.start()
    try:
        with pytest.raises(AlreadyRunning, match="another imgworker run"):
            supervisor(cfg, store, MemoryAlgo(store)).start()
    finally:
        first.request_stop("test", force=True)
        first.shutdown()
    supervisor(cfg, store, MemoryAlgo(store)).start()  # the lock was released


def test_corrupt_state_file_is_refused_with_the_repair_command(tmp_path):
    cfg = config(tmp_path)
    os.makedirs(cfg.run.state_dir)
    with open(os.path.join(cfg.run.state_dir, "state.json"), "w") as f:
        f.write('{"version": 1, "processed": [')
    store = MemoryStore()
    with pytest.raises(StateError, match="imgworker repair"):
        supervisor(cfg, store, MemoryAlgo(store)).start()
    supervisor(cfg, store, MemoryAlgo(store)).lock.acquire()  # a refused start leaves no lock behind


def test_events_find_images_without_listing_and_reconciliation_finds_what_they_missed(tmp_path):
    cfg = config(tmp_path, scan={"mode": "events", "events": EVENTS, "reconcile_interval_s": 3600.0},
                 run={"until_idle": False})
    store = MemoryStore()
    watchers: list[InlineWatcher] = []
    algo = MemoryAlgo(store)
    sup = events_supervisor(cfg, store, algo, watchers)
    with sup.running():
        # the first reconciliation runs at start; the bucket is empty
        reach(sup, lambda: sup.intake.scans_completed >= 1, "the first reconciliation")
        announced = fill(store, ["p/a"], 3)
        missed = fill(store, ["p/b"], 2)  # uploaded, but the event stream never said so
        watchers[0].batches.append(event_batch(store, announced, ts_ns=500))
        steps(sup, 20)
        assert set(lines(cfg)) == set(announced)  # found by events alone: no listing ran
        assert sup.intake.scans_completed == 1
        sup.intake.next_sweep = 0.0  # the reconciliation interval comes round
        reach(sup, lambda: len(lines(cfg)) >= 5, "a result line for every image")
    assert lines(cfg) == Counter(announced + missed) and algo.calls == Counter(announced + missed)
    assert sup.stats.discovery_ms.count == 5


def test_the_event_position_and_the_backlog_survive_a_restart_without_a_gap(tmp_path):
    cfg = config(tmp_path, scan={"mode": "events", "events": EVENTS, "reconcile_interval_s": 3600.0},
                 worker={"count": 1}, dispatch={"queue_capacity": 1}, run={"until_idle": False})
    store = MemoryStore()
    keys = fill(store, ["p/a"], 4)
    watchers: list[InlineWatcher] = []
    first = events_supervisor(cfg, store, MemoryAlgo(store), watchers, intake_done=lambda: False)
    with first.running(drain=False):
        first.intake.next_sweep = float("inf")  # no reconciliation: only events
        watchers[0].batches += [event_batch(store, keys[:2], ts_ns=100), event_batch(store, keys[2:], ts_ns=200)]
        steps(first, 3)
        first.checkpoint()
    done = set(lines(cfg))
    assert done != set(keys)  # a full queue kept some event-found images in the backlog
    algo = MemoryAlgo(store)
    second = events_supervisor(cfg, store, algo, watchers, intake_done=lambda: False)
    with second.running():
        assert watchers[-1].since_ns == 200  # the stream resumes after the last event handled ...
        second.intake.next_sweep = float("inf")
        steps(second, 20)  # ... and no event is replayed: the saved backlog brings the rest
    assert lines(cfg) == Counter(keys)
    assert set(algo.calls) == set(keys) - done


def test_a_dead_watcher_is_restarted_from_the_last_event_handled(tmp_path):
    cfg = config(tmp_path, scan={"mode": "events", "events": EVENTS, "reconcile_interval_s": 3600.0},
                 run={"until_idle": False})
    store = MemoryStore()
    keys = fill(store, ["p/a"], 2)
    watchers: list[InlineWatcher] = []
    sup = events_supervisor(cfg, store, MemoryAlgo(store), watchers, intake_done=lambda: False)
    with sup.running(drain=False):
        sup.intake.next_sweep = float("inf")
        watchers[0].batches.append(event_batch(store, keys[:1], ts_ns=300))
        sup.step()
        watchers[0].batches.append(event_batch(store, keys[1:], ts_ns=400))  # sent just before it died
        watchers[0].alive = lambda: False  # type: ignore[method-assign]
        sup.step()
        assert sup.intake.watcher is None  # a dead watcher is not waited on ...
        assert keys[1] in sup.intake.backlog or keys[1] in sup.dispatch or keys[1] in lines(cfg)  # ... nor lost
        sup.intake._watcher_restart_at = 1.0  # its backoff has passed
        sup.step()
        assert len(watchers) == 2 and watchers[1].since_ns == 400


def test_what_the_watcher_sent_before_a_stop_is_in_the_saved_backlog(tmp_path):
    cfg = config(tmp_path, scan={"mode": "events", "events": EVENTS, "reconcile_interval_s": 3600.0},
                 run={"until_idle": False})
    store = MemoryStore()
    keys = fill(store, ["p/a", "p/b"], 2)
    watchers: list[InlineWatcher] = []
    sup = events_supervisor(cfg, store, MemoryAlgo(store), watchers, intake_done=lambda: False)
    sup.start()
    sup.intake.next_sweep = float("inf")
    sup.request_stop("test", force=True)
    watchers[0].batches.append(event_batch(store, keys, ts_ns=500))  # acknowledged to the store, not yet read
    sup.shutdown()
    restored = Ledger(os.path.join(cfg.run.state_dir, "state.json"), cfg.results_path, LocalBackend()).start()
    assert sorted(restored.intake.backlog) == sorted(keys) and restored.intake.events_ts_ns == 500


def test_the_watcher_is_read_while_draining_after_the_lister_died(tmp_path):
    cfg = config(tmp_path, scan={"mode": "events", "events": EVENTS, "reconcile_interval_s": 3600.0},
                 run={"until_idle": False})
    store = MemoryStore()
    keys = fill(store, ["p/a"], 2)
    watchers: list[InlineWatcher] = []
    sup = events_supervisor(cfg, store, MemoryAlgo(store), watchers, intake_done=lambda: False)
    with sup.running(drain=False):
        sup.intake.next_sweep = float("inf")
        sup.request_stop("test")
        assert sup.intake.lister is not None
        sup.intake.lister.alive = lambda: False  # type: ignore[method-assign]
        watchers[0].batches.append(event_batch(store, keys, ts_ns=700))
        steps(sup, 2)
        assert sup.intake.lister is None and sup.intake.backlog.keys() == set(keys)


def test_incremental_reconciliation_reads_only_what_is_new_and_keeps_its_checkpoints(tmp_path):
    cfg = config(tmp_path, scan={"reconcile": "incremental"}, run={"until_idle": False})
    store = MemoryStore()
    first_keys = fill(store, ["cam/a", "cam/b"], 5)
    listed: list[str] = []
    real_pages = store.list_pages

    def counting_pages(prefix: str, page_size: int, start_after: str = "") -> Any:
        for page in real_pages(prefix, page_size, start_after):
            listed.extend(ref.key for ref in page)
            yield page

    store.list_pages = counting_pages  # type: ignore[method-assign]
    sup = supervisor(cfg, store, MemoryAlgo(store))

    def swept_to_the_end() -> bool:
        if len(lines(cfg)) >= 10 and not sup.intake.sweeping and sup.intake.checkpoints.get("cam/b") == first_keys[-1]:
            return True
        sup.intake.next_sweep = 0.0
        return False

    with sup.running():
        reach(sup, swept_to_the_end, "ten result lines and a finished sweep up to the last key")
        assert sup.intake.checkpoints == {"cam/a": first_keys[4], "cam/b": first_keys[-1]}
        late = [f"cam/a/20240101-000001.{i:03d}.jpg" for i in range(2)]
        for key in late:
            store.put(key, b"jpeg")
        listed.clear()
        scans = sup.intake.scans_completed
        sup.intake.next_sweep = 0.0
        reach(sup, lambda: sup.intake.scans_completed > scans, "the next sweep")
        assert sorted(listed) == late  # nothing below the checkpoints was read again
        reach(sup, lambda: len(lines(cfg)) >= 12, "a result line for the two new images")
        sup.checkpoint()
    assert lines(cfg) == Counter(first_keys + late)
    restarted = supervisor(cfg, store, MemoryAlgo(store))
    with restarted.running(drain=False):
        assert restarted.intake.checkpoints["cam/b"] == first_keys[-1]


def test_incremental_passes_do_not_count_towards_pruning_the_processed_set(tmp_path):
    """An entry goes only after two FULL listings missed its object; incremental passes between them do not count."""
    cfg = config(tmp_path, scan={"reconcile": "incremental", "full_every": 2, "interval_s": 3600.0},
                 run={"until_idle": False})
    store = MemoryStore()
    keys = fill(store, ["cam/a"], 2)
    gone = keys[0]
    sup = supervisor(cfg, store, MemoryAlgo(store))

    def processed(key: str) -> bool:
        return sup.ledger._call(lambda s: s.contains(key))  # reads without marking it seen

    def listings(n: int) -> None:
        """Begin listings one after another until ``n`` have completed since the start."""

        def done() -> bool:
            if sup.intake.scans_completed >= n:
                return True
            if not sup.intake.sweeping:
                sup.intake.next_sweep = 0.0
            return False

        reach(sup, done, f"{n} complete listings")

    # listings 0 and 1 are full (the first after a start, then every second one), 2 incremental, 3 full, ...
    def full(index: int) -> bool:
        return index == 0 or index % 2 == 1

    with sup.running():
        reach(sup, lambda: len(lines(cfg)) >= 2 and not sup.intake.sweeping, "both images processed")
        done = sup.intake.scans_completed
        listings(done + 1 if done % 2 else done + 2)  # a full listing saw both; the next one is incremental
        assert not full(sup.intake.scans_completed) and processed(gone)
        store.delete([gone])
        listings(sup.intake.scans_completed + 1)  # incremental
        assert processed(gone)
        listings(sup.intake.scans_completed + 1)  # the first full listing that misses it
        assert full(sup.intake.scans_completed - 1)
        assert processed(gone), "pruned after one full listing missed it"
        listings(sup.intake.scans_completed + 2)  # incremental, then the second full listing that misses it
        assert not processed(gone) and processed(keys[1])
    assert lines(cfg) == Counter(keys)


def test_incremental_reconciliation_is_refused_with_the_cleaner(tmp_path):
    from imgworker.errors import ConfigError

    with pytest.raises(ConfigError, match="scan.reconcile"):
        config(tmp_path, scan={"reconcile": "incremental"}, retention={"enabled": True, "max_count": 5})


def sweeping_steps(sup: Supervisor, n: int) -> None:
    """``n`` steps, a sweep requested before each one that finds none running."""

    def request_a_sweep() -> bool:
        if not sup.intake.sweeping:
            sup.intake.next_sweep = 0.0
        return False

    sup.step_until(request_a_sweep, max_steps=n)


@pytest.mark.parametrize("full_every", [1, 60], ids=["every-pass-full", "incremental-passes"])
def test_a_full_pass_keeps_backlog_keys_outside_task_directories(tmp_path, full_every):
    """Incremental reconciliation: event-found keys beside the ``<type>/<id>/`` directories are listed by full
    passes, and an incremental pass, which cannot list them, never forgets them."""
    cfg = config(tmp_path, scan={"mode": "events", "events": EVENTS, "reconcile": "incremental",
                                 "full_every": full_every}, worker={"count": 1}, dispatch={"queue_capacity": 1},
                 run={"until_idle": False})
    store = MemoryStore()
    loose = [f"person/snap-{i}.jpg" for i in range(8)]
    nested = [f"person/cam{i}/20240101-000000.000.jpg" for i in range(8)]
    for key in loose + nested:
        store.put(key, b"\xff\xd8jpeg")
    watchers: list[InlineWatcher] = []
    algo = MemoryAlgo(store)
    sup = events_supervisor(cfg, store, algo, watchers, intake_done=lambda: False)
    with sup.running():
        watchers[0].batches.append(event_batch(store, loose + nested, ts_ns=100))
        sweeping_steps(sup, 400)  # a full pass after nearly every step, while the queue holds one image
    assert lines(cfg) == Counter(loose + nested) and algo.calls == Counter(loose + nested)


def test_a_key_outside_task_directories_stays_processed_while_it_exists(tmp_path):
    """Pruning follows complete listings of the whole prefix: a replayed event for a key that still exists is absorbed."""
    cfg = config(tmp_path, scan={"mode": "events", "events": EVENTS, "reconcile": "incremental",
                                 "full_every": 2}, run={"until_idle": False})
    store = MemoryStore()
    loose = ["person/snap-1.jpg", "person/snap-2.jpg"]
    for key in loose:
        store.put(key, b"\xff\xd8jpeg")
    watchers: list[InlineWatcher] = []
    algo = MemoryAlgo(store)
    sup = events_supervisor(cfg, store, algo, watchers, intake_done=lambda: False)
    with sup.running():
        watchers[0].batches.append(event_batch(store, loose, ts_ns=100))
        sweeping_steps(sup, 50)
        assert lines(cfg) == Counter(loose)

        def ten_sweeps() -> bool:  # five full passes and five incremental ones
            if sup.intake.scans_completed >= 10:
                return True
            if not sup.intake.sweeping:
                sup.intake.next_sweep = 0.0
            return False

        reach(sup, ten_sweeps, "ten sweeps")
        watchers[0].batches.append(event_batch(store, loose, ts_ns=200))  # a redelivery of the same events
        sweeping_steps(sup, 20)
    assert lines(cfg) == Counter(loose) and algo.calls == Counter(loose)


def test_the_first_listing_after_a_start_is_full_in_incremental_mode(tmp_path):
    """A key no event reported and no directory holds (its event was lost in a crash) is found at start."""
    cfg = config(tmp_path, scan={"reconcile": "incremental", "full_every": 60}, run={"until_idle": False})
    store = MemoryStore()
    keys = fill(store, ["cam/a"], 2) + ["cam/loose.jpg", "top.jpg"]
    for key in keys[2:]:
        store.put(key, b"\xff\xd8jpeg")
    algo = MemoryAlgo(store)
    sup = supervisor(cfg, store, algo)
    with sup.running():
        reach(sup, lambda: sup.intake.scans_completed >= 1, "the first listing")
        steps(sup, 50)  # no second listing: only the first one found anything
    assert lines(cfg) == Counter(keys)


class PipedLister:
    """A listing source like the lister process: its pages come through a pipe the loop can wait on."""

    def __init__(self, cfg: Config, store: MemoryStore) -> None:
        import multiprocessing

        from imgworker.lister import InlineLister

        self.inner = InlineLister(cfg, store)
        self.ours, self.theirs = multiprocessing.Pipe()
        self.released = 0  # messages the "process" has sent so far

    def waitables(self) -> list[Any]:
        return [self.ours]

    def alive(self) -> bool:
        return True

    def exitcode(self) -> int | None:
        return None

    def request_sweep(self, checkpoints: dict[str, str] | None = None) -> None:
        self.inner.request_sweep(checkpoints)

    def release(self) -> None:
        self.theirs.send_bytes(b"x")

    def poll(self) -> Any:
        if not self.ours.poll():
            return None
        self.ours.recv_bytes()
        return self.inner.poll()

    def stop(self, timeout: float = 2.0) -> None:
        self.ours.close()
        self.theirs.close()


def test_the_loop_blocks_while_a_sweep_waits_for_its_next_page(tmp_path):
    """No zero timeout while listing: the lister's pipe wakes the loop when a page comes."""
    from imgworker.supervisor import Parts

    cfg = config(tmp_path, run={"until_idle": False})
    store = MemoryStore()
    keys = fill(store, ["p/a"], 3)
    listers: list[PipedLister] = []

    def make_lister() -> PipedLister:
        listers.append(PipedLister(cfg, store))
        return listers[-1]

    base = memory_parts(cfg, store, MemoryAlgo(store))
    sup = Supervisor(cfg, show_progress=False, parts=Parts(store=store, make_lister=make_lister, pool=base.pool,
                                                           ledger_backend=base.ledger_backend, janitor_inline=True))
    timeouts: list[float] = []
    real_wait = sup.pool.wait

    def recording_wait(timeout: float, extra: Any) -> Any:
        timeouts.append(timeout)
        return real_wait(timeout, extra)

    sup.pool.wait = recording_wait  # type: ignore[method-assign]
    with sup.running(drain=False):
        sup.step()
        assert sup.intake.sweeping and len(timeouts) == 1
        sup.step()  # the lister has sent nothing yet: the loop waits on its pipe
        assert min(timeouts) >= 0.25, timeouts  # its longest wait (half a second), ended by the pipe
        for _ in range(2):  # one page, then the end marker
            listers[0].release()
            sup.step()
        assert not sup.intake.sweeping and sup.intake.scans_completed == 1
    assert set(lines(cfg)) <= set(keys)


def test_until_idle_in_events_mode_ends_when_the_work_does_not_at_the_next_reconciliation(tmp_path):
    """A pre-filled bucket: once every image has its outcome, the listing that proves idleness runs at once."""
    cfg = config(tmp_path, scan={"mode": "events", "events": EVENTS, "reconcile_interval_s": 3600.0})
    store = MemoryStore()
    keys = fill(store, ["p/a", "p/b"], 6)
    watchers: list[InlineWatcher] = []
    algo = MemoryAlgo(store)
    sup = events_supervisor(cfg, store, algo, watchers)
    with sup.running(drain=False):
        assert sup.step_until(sup.finished, max_steps=200), "the run did not end within 200 steps"
        assert sup.stopping.reason == "idle"
        assert sup.intake.scans_completed == 2  # the one at start, the one after the last outcome
    assert lines(cfg) == Counter(keys) and algo.calls == Counter(keys)


def test_a_stop_signal_with_nothing_in_flight_is_still_announced(tmp_path, caplog):
    import logging
    import signal

    cfg = config(tmp_path, run={"until_idle": False})
    store = MemoryStore()
    sup = supervisor(cfg, store, MemoryAlgo(store))
    sup.start()
    try:
        sup.step()
        with caplog.at_level(logging.INFO, logger="imgworker.supervisor"):
            sup._on_signal(signal.SIGTERM, None)  # what the handler does: set the flags, nothing else
            assert sup.finished()
    finally:
        sup.shutdown()
    assert any("stopping (SIGTERM)" in r.getMessage() for r in caplog.records)


def test_a_result_action_is_handed_to_the_janitor_only_once_its_line_is_written(tmp_path):
    """Durable before destructive starts with the order in the recorder: the line, then the delete."""
    cfg = config(tmp_path, actions={"delete_no_detection": True})
    store = MemoryStore()
    keys = fill(store, ["p/a"], 4)
    algo = MemoryAlgo(store)
    sup = supervisor(cfg, store, algo)
    submitted: list[str] = []
    with sup.running():
        assert sup.janitor is not None
        real_submit = sup.janitor.submit

        def checked_submit(jobs: Any) -> None:
            written = lines(cfg)
            for job in jobs:
                assert all(key in written for key in job.keys), f"{job.action} of {job.keys} before its line"
                submitted.extend(job.keys)
            real_submit(jobs)

        sup.janitor.submit = checked_submit  # type: ignore[method-assign]
        reach(sup, lambda: len(lines(cfg)) == len(keys), "a line for every image", max_steps=500)
    assert sorted(submitted) == sorted(keys) and lines(cfg) == Counter(keys)
