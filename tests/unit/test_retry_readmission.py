"""Re-admission (``imgworker retry``) through the supervisor on in-memory parts, with crashes at each point.

Counted at the far end: the calls the in-memory algorithm received per image, and the result
lines per image after its re-admission.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pytest

from imgworker.errors import AlgoPermanent
from imgworker.memstore import MemoryAlgo, MemoryStore
from imgworker.outcomes import Outcome
from imgworker.results import Retried, read_entries_at
from imgworker.retry import Selection, find, readmit, still_stored
from imgworker.stats import stats_from_results
from tests.support.driving import reach
from tests.support.memory import config, crash, fill, supervisor
from tests.support.results import outcomes

pytestmark = pytest.mark.timeout(60)

FAILED_ALGO = Selection(outcomes=(Outcome.FAILED_ALGO,))


class Switch:
    """The service fails every call until it is switched on."""

    def __init__(self) -> None:
        self.healthy = False

    def __call__(self, image_path: str) -> BaseException | None:
        return None if self.healthy else AlgoPermanent("http_400", "model not loaded")


def after_readmission(cfg: Any) -> Counter[str]:
    """key -> result lines written after its last re-admission line."""
    counts: Counter[str] = Counter()
    for _, entry in read_entries_at(cfg.results_path):
        if isinstance(entry, Retried):
            counts[entry.retried] = 0
        elif entry.key in counts:
            counts[entry.key] += 1
    return counts


def failed_run(tmp_path: Any, n: int = 6) -> tuple[Any, MemoryStore, MemoryAlgo, Switch, list[str]]:
    cfg = config(tmp_path, worker={"count": 1})
    store = MemoryStore()
    keys = fill(store, ["p/a"], n)
    switch = Switch()
    algo = MemoryAlgo(store, fail=switch)
    supervisor(cfg, store, algo).run()
    assert set(outcomes(cfg).values()) == {"failed_algo"}
    return cfg, store, algo, switch, keys


def retry(cfg: Any, store: MemoryStore) -> tuple[int, list[str]]:
    found = find(cfg.results_path, FAILED_ALGO)
    present, gone = still_stored(found.selected, store.stat)
    readmit(cfg.results_path, present)
    return len(present), gone


def test_a_readmitted_image_is_analysed_once_more_and_its_new_outcome_supersedes(tmp_path):
    cfg, store, algo, switch, keys = failed_run(tmp_path)
    store.delete([keys[0]])  # gone since: not re-admitted
    assert retry(cfg, store) == (5, [keys[0]])
    switch.healthy = True
    report = supervisor(cfg, store, algo).run()
    assert algo.calls == Counter({keys[0]: 1, **{k: 2 for k in keys[1:]}})
    assert outcomes(cfg) == {keys[0]: "failed_algo", **{k: "no_detection" for k in keys[1:]}}
    assert after_readmission(cfg) == Counter({k: 1 for k in keys[1:]})
    assert (report.readmitted, report.scanned, report.conserved) == (5, 5, True)
    entries = [e for _, e in read_entries_at(cfg.results_path)]
    from_file = stats_from_results(entries).report(pending=0, in_flight=0, wall_s=1.0)
    assert (from_file.scanned, from_file.duplicates, from_file.readmitted, from_file.conserved) == (6, 0, 5, True)
    assert from_file.outcomes["no_detection"] == 5 and from_file.outcomes["failed_algo"] == 1


def test_retry_twice_before_a_run_readmits_each_image_once(tmp_path):
    cfg, store, algo, switch, keys = failed_run(tmp_path)
    assert retry(cfg, store) == (6, [])
    assert retry(cfg, store) == (0, [])
    assert find(cfg.results_path, FAILED_ALGO).awaiting == 6
    switch.healthy = True
    supervisor(cfg, store, algo).run()
    assert algo.calls == Counter({k: 2 for k in keys})


@pytest.mark.parametrize("checkpointed", [False, True], ids=["before-checkpoint", "after-checkpoint"])
def test_a_crash_while_readmitted_images_are_analysed_neither_loses_nor_doubles(tmp_path, checkpointed):
    cfg, store, algo, switch, keys = failed_run(tmp_path, n=8)
    retry(cfg, store)
    switch.healthy = True
    second = supervisor(cfg, store, algo)
    second.start()
    reach(second, lambda: sum(after_readmission(cfg).values()) >= 3, "three re-analysed")
    if checkpointed:
        second.checkpoint()  # the saved offset is past the re-admission lines; the rest wait as pending
    crash(second)
    report = supervisor(cfg, store, algo).run()
    assert after_readmission(cfg) == Counter({k: 1 for k in keys})
    assert algo.calls == Counter({k: 2 for k in keys})
    assert set(outcomes(cfg).values()) == {"no_detection"} and report.conserved


def test_a_readmission_line_cut_by_a_crash_readmits_the_lines_before_it(tmp_path):
    cfg, store, algo, switch, keys = failed_run(tmp_path, n=4)
    found = find(cfg.results_path, FAILED_ALGO)
    readmit(cfg.results_path, found.selected[:2])
    with open(cfg.results_path, "ab") as f:
        f.write(b'{"retried":"' + found.selected[2].key.encode())  # the write a crash cut
    switch.healthy = True
    supervisor(cfg, store, algo).run()
    readmitted = {r.key for r in found.selected[:2]}
    assert algo.calls == Counter({k: 2 if k in readmitted else 1 for k in keys})
    assert retry(cfg, store) == (2, [])  # running retry again takes the rest


def test_readmitted_images_are_queued_at_start_without_waiting_for_a_listing(tmp_path):
    from tests.support.driving import steps
    from tests.support.memory import EVENTS, events_supervisor

    cfg, store, algo, switch, keys = failed_run(tmp_path, n=4)
    cfg = config(tmp_path, worker={"count": 1}, scan={"mode": "events", "events": EVENTS})
    retry(cfg, store)
    switch.healthy = True
    second = events_supervisor(cfg, store, algo, [], intake_done=lambda: False)
    with second.running():
        second.intake.next_sweep = float("inf")  # no listing: only what the start queued
        steps(second, 20)
        assert second.intake.scans_completed == 0
    assert after_readmission(cfg) == Counter({k: 1 for k in keys})
    assert algo.calls == Counter({k: 2 for k in keys})


def test_a_readmission_after_a_crash_supersedes_the_lines_no_checkpoint_saved(tmp_path):
    cfg = config(tmp_path, worker={"count": 1})
    store = MemoryStore()
    keys = fill(store, ["p/a"], 5)
    switch = Switch()
    algo = MemoryAlgo(store, fail=switch)
    first = supervisor(cfg, store, algo)
    first.start()
    reach(first, lambda: len(outcomes(cfg)) == 5, "five failed")
    crash(first)  # no checkpoint: the next start reads every line, the failures and then the re-admissions
    assert retry(cfg, store) == (5, [])
    switch.healthy = True
    supervisor(cfg, store, algo).run()
    assert algo.calls == Counter({k: 2 for k in keys})
    assert after_readmission(cfg) == Counter({k: 1 for k in keys})


def test_a_start_redoes_no_action_of_a_superseded_line(tmp_path):
    from imgworker.journal import ResultsJournal
    from imgworker.ledger import Ledger, LocalBackend
    from imgworker.outcomes import Result

    results = str(tmp_path / "results.jsonl")
    journal = ResultsJournal(results)
    journal.write(Result(key="k", outcome=Outcome.INFERRED, detections=1))
    journal.write(Result(key="other", outcome=Outcome.INFERRED, detections=1))
    journal.close()
    readmit(results, [Result(key="k", outcome=Outcome.INFERRED)])
    ledger = Ledger(str(tmp_path / "state.json"), results, LocalBackend())
    restored = ledger.start()  # no checkpoint: every line's actions would be redone
    assert [r.key for _, r in restored.redo] == ["other"]
    assert (restored.pending, restored.readmitted) == (["k"], ["k"])
    assert ledger.filter_new(["k", "other"]) == {"k"}


def test_a_start_redoes_no_owed_action_of_a_superseded_line(tmp_path):
    from imgworker.janitor import OwedAction
    from imgworker.journal import ResultsJournal
    from imgworker.ledger import Ledger, LocalBackend
    from imgworker.outcomes import Result

    results = str(tmp_path / "results.jsonl")
    journal = ResultsJournal(results)
    k_line = journal.write(Result(key="k", outcome=Outcome.INFERRED, detections=1))
    other_line = journal.write(Result(key="other", outcome=Outcome.INFERRED, detections=1))
    synced = journal.sync()
    journal.close()
    first = Ledger(str(tmp_path / "state.json"), results, LocalBackend())
    first.start()
    first.add("k")
    first.add("other")
    # the last run gave up both copies: each is owed to the next start
    owed = [OwedAction(k_line, "copy_alerts", "k"), OwedAction(other_line, "copy_alerts", "other")]
    first.save(synced, [], owed=owed)
    readmit(results, [Result(key="k", outcome=Outcome.INFERRED)])  # k's outcome is superseded
    restored = Ledger(str(tmp_path / "state.json"), results, LocalBackend()).start()
    assert [(entry.key, result.key) for entry, result in restored.owed] == [("other", "other")]
    assert (restored.pending, restored.readmitted) == (["k"], ["k"])


def test_a_start_after_the_readmitted_image_was_analysed_again_queues_it_no_more(tmp_path):
    from imgworker.journal import ResultsJournal
    from imgworker.ledger import Ledger, LocalBackend
    from imgworker.outcomes import Result

    results = str(tmp_path / "results.jsonl")
    journal = ResultsJournal(results)
    journal.write(Result(key="k", outcome=Outcome.FAILED_ALGO))
    journal.close()
    readmit(results, [Result(key="k", outcome=Outcome.FAILED_ALGO)])
    journal = ResultsJournal(results)
    journal.write(Result(key="k", outcome=Outcome.INFERRED, detections=1))  # analysed again, then a crash
    journal.close()
    restored = Ledger(str(tmp_path / "state.json"), results, LocalBackend()).start()
    assert (restored.pending, restored.readmitted) == ([], [])


def test_the_readmission_lines_are_on_disk_before_retry_reports(tmp_path, monkeypatch):
    import imgworker.retry as retry_module

    cfg, store, algo, switch, keys = failed_run(tmp_path, n=2)
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_size)
        real_fsync(fd)

    monkeypatch.setattr(retry_module.os, "fsync", fsync)
    retry(cfg, store)
    assert synced and synced[-1] == os.path.getsize(cfg.results_path)  # the fsync covered every re-admission


def test_a_results_line_cut_by_a_crash_does_not_swallow_the_first_readmission(tmp_path):
    cfg, store, algo, switch, keys = failed_run(tmp_path, n=3)
    with open(cfg.results_path, "ab") as f:
        f.write(b'{"key":"' + keys[0].encode())  # the last run's write a crash cut
    assert retry(cfg, store) == (3, [])
    assert find(cfg.results_path, FAILED_ALGO).awaiting == 3
    switch.healthy = True
    supervisor(cfg, store, algo).run()
    assert algo.calls == Counter({k: 2 for k in keys})


def test_since_cause_and_key_prefix_select_only_what_they_name(tmp_path):
    from imgworker.journal import ResultsJournal
    from imgworker.outcomes import Result

    results = str(tmp_path / "results.jsonl")
    journal = ResultsJournal(results)
    journal.write(Result(key="a/old", outcome=Outcome.FAILED_ALGO, cause="http_500", finished_at=100.0))
    journal.write(Result(key="a/new", outcome=Outcome.FAILED_ALGO, cause="http_500", finished_at=200.0))
    journal.write(Result(key="a/other", outcome=Outcome.FAILED_ALGO, cause="timeout", finished_at=200.0))
    journal.write(Result(key="b/new", outcome=Outcome.FAILED_ALGO, cause="http_500", finished_at=200.0))
    journal.close()
    selection = Selection(outcomes=(Outcome.FAILED_ALGO,), cause="http_500", since=150.0, key_prefix="a/")
    assert [r.key for r in find(results, selection).selected] == ["a/new"]


def test_a_readmitted_key_the_checkpoint_also_saved_as_unfinished_is_queued_once(tmp_path):
    from imgworker.journal import ResultsJournal
    from imgworker.ledger import Ledger, LocalBackend
    from imgworker.outcomes import Result

    results = str(tmp_path / "results.jsonl")
    ledger = Ledger(str(tmp_path / "state.json"), results, LocalBackend())
    ledger.start()
    ledger.save(0, ["k"])  # a checkpoint while k was unfinished
    ledger.stop()
    journal = ResultsJournal(results)
    journal.write(Result(key="k", outcome=Outcome.FAILED_ALGO))  # its outcome, then a stop without a checkpoint
    journal.close()
    readmit(results, [Result(key="k", outcome=Outcome.FAILED_ALGO)])
    restored = Ledger(str(tmp_path / "state.json"), results, LocalBackend()).start()
    assert (restored.pending, restored.readmitted) == (["k"], ["k"])
