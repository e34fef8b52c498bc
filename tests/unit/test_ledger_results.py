from __future__ import annotations

import json
import os


import pytest

from imgworker.journal import ResultsJournal as ResultsWriter
from imgworker.ledger import Ledger, ManagerBackend, ProcessedSet
from imgworker.outcomes import IntakePosition, Outcome, Result
from imgworker.results import read_results


def test_sweep_prunes_only_unseen_keys():
    ps = ProcessedSet()
    ps.add_many(["a", "b", "c"])
    ps.begin_sweep()
    ps.filter_new(["a"])
    ps.end_sweep()
    ps.begin_sweep()
    assert ps.filter_new(["a", "x"]) == ["x"]
    ps.add_many(["x"])  # finished during the sweep
    assert sorted(ps.end_sweep()) == ["b", "c"]  # b and c were not listed by two complete sweeps
    assert sorted(k for k in "abcx" if ps.contains(k)) == ["a", "x"]


def test_save_is_atomic_and_loadable(tmp_path):
    path = str(tmp_path / "state.json")
    ps = ProcessedSet()
    ps.add_many(["a", "中文 %+#"])
    ps.save(path, 123, ["p1"])
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")] == []
    other = ProcessedSet()
    state = other.load(path)
    assert (state.results_offset, state.pending) == (123, ["p1"])
    assert other.contains("中文 %+#") and other.size() == 2
    assert ProcessedSet().load(str(tmp_path / "missing.json")).results_offset == 0


@pytest.mark.timeout(60)
def test_manager_serves_batched_operations(tmp_path):
    backend = ManagerBackend()
    ledger = backend.start()
    try:
        ledger.add_many([f"k{i}" for i in range(1000)])
        assert ledger.filter_new([f"k{i}" for i in range(995, 1005)]) == [f"k{i}" for i in range(1000, 1005)]
        assert ledger.size() == 1000
        ledger.save(str(tmp_path / "s.json"), 0, [])
        loaded = ProcessedSet()
        loaded.load(str(tmp_path / "s.json"))
        assert loaded.size() == 1000
    finally:
        backend.stop()


@pytest.mark.timeout(60)
def test_lost_manager_is_restarted_and_rebuilt_from_disk(tmp_path):
    results = str(tmp_path / "results.jsonl")
    journal = ResultsWriter(results)
    ledger = Ledger(str(tmp_path / "state.json"), results)
    ledger.start()
    try:
        for key in ("a", "b"):
            journal.write(Result(key=key, outcome=Outcome.INFERRED))
            ledger.add(key)
        ledger.save(journal.sync(), [])
        journal.write(Result(key="c", outcome=Outcome.NO_DETECTION))  # after the checkpoint
        ledger.add("d")  # buffered, not yet sent
        ledger.backend._manager._process.kill()  # the Manager dies
        ledger.backend._manager._process.join()
        assert ledger.filter_new(["a", "b", "c", "d", "e"]) == {"e"}
        assert ledger.restarts == 1
    finally:
        ledger.stop()
        journal.close()


def test_partial_trailing_line_is_not_a_result(tmp_path):
    path = str(tmp_path / "r.jsonl")
    writer = ResultsWriter(path)
    writer.write(Result(key="a", outcome=Outcome.INFERRED))
    offset = writer.sync()
    writer.close()
    assert [r.key for r in read_results(path)] == ["a"]  # written through: readable before any flush
    with open(path, "ab") as f:
        f.write(b'{"key":"b","outcome":"infer')  # crash mid-write
    assert [r.key for r in read_results(path)] == ["a"]
    writer = ResultsWriter(path)  # reopening cuts the partial line
    assert os.path.getsize(path) == offset
    writer.write(Result(key="c", outcome=Outcome.NO_DETECTION))
    writer.close()
    assert [r.key for r in read_results(path)] == ["a", "c"]
    assert [r.key for r in read_results(path, offset=offset)] == ["c"]


def test_results_line_round_trips_unicode_keys(tmp_path):
    path = str(tmp_path / "r.jsonl")
    writer = ResultsWriter(path)
    writer.write(Result(key="人员/任务 1/a %+#.jpg", outcome=Outcome.FAILED_ALGO, cause="http_500"))
    writer.close()
    (result,) = read_results(path)
    assert (result.key, result.outcome, result.cause) == ("人员/任务 1/a %+#.jpg", Outcome.FAILED_ALGO, "http_500")


def test_saving_appends_only_what_changed_and_compacts_pruned_keys(tmp_path, monkeypatch):
    import imgworker.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "_COMPACT_SLACK", 2)
    path = str(tmp_path / "state.json")
    ps = ProcessedSet()
    ps.add_many(["a", "b", "中文 %+#\n"])
    ps.save(path, 10, [])
    first_log = json.loads((tmp_path / "state.json").read_text())["log_name"]
    size_after_first = (tmp_path / first_log).stat().st_size
    ps.add_many(["c"])
    ps.save(path, 20, ["p"])
    grown = (tmp_path / first_log).stat().st_size - size_after_first
    assert grown == len(b'"c"\n')  # a checkpoint writes what changed, not the whole set
    loaded = ProcessedSet()
    state = loaded.load(path)
    assert (state.results_offset, state.pending, loaded.size()) == (20, ["p"], 4)
    assert loaded.contains("中文 %+#\n")
    for _ in range(2):
        ps.begin_sweep()
        ps.filter_new(["c"])
        pruned = ps.end_sweep()
    assert len(pruned) == 3  # a, b and the unicode key are gone from the bucket
    for n in range(8):
        ps.begin_sweep()
        ps.add_many([f"k{n}"])
        ps.end_sweep()  # churn: the log grows with pruned keys
        ps.save(path, 30, [])
    current = json.loads((tmp_path / "state.json").read_text())["log_name"]
    assert current != first_log and not (tmp_path / first_log).exists()  # compacted into a new log
    reloaded = ProcessedSet()
    reloaded.load(path)
    assert reloaded.size() == ps.size() and not reloaded.contains("a")


def test_a_crash_between_log_append_and_state_write_is_cut_back(tmp_path):
    path = str(tmp_path / "state.json")
    ps = ProcessedSet()
    ps.add_many(["a"])
    ps.save(path, 5, [])
    log_name = json.loads((tmp_path / "state.json").read_text())["log_name"]
    with open(tmp_path / log_name, "ab") as f:
        f.write(b'"b"\n"c')  # appended, then the crash came before the state file was replaced
    loaded = ProcessedSet()
    loaded.load(path)
    assert loaded.contains("a") and not loaded.contains("b")
    assert (tmp_path / log_name).read_bytes() == b'"a"\n'


def test_version_1_state_files_still_load(tmp_path):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": 1, "results_offset": 7, "processed": ["a", "b"], "pending": ["c"]}))
    loaded = ProcessedSet()
    state = loaded.load(str(path))
    assert (state.results_offset, state.pending, loaded.size()) == (7, ["c"], 2)


def test_an_entry_is_pruned_only_after_two_complete_listings_missed_it():
    ps = ProcessedSet()
    ps.add_many(["kept", "gone"])
    ps.begin_sweep()
    ps.filter_new(["kept"])
    assert ps.end_sweep() == []  # one listing without it: an event replayed now must still find it
    ps.begin_sweep()
    ps.filter_new(["kept"])
    assert ps.end_sweep() == ["gone"] and not ps.contains("gone") and ps.contains("kept")


def test_with_events_a_missed_entry_stays_while_a_replay_of_the_saved_position_can_reach_it(tmp_path):
    s = 1_000_000_000
    ps = ProcessedSet()
    ps.add_many(["gone", "kept"])
    for now in (109, 110, 111, 300):  # missed from 110 s on; the bucket is idle: the position stays at 100 s
        ps.begin_sweep()
        ps.filter_new(["kept"])
        assert ps.end_sweep(events=True, position_ns=100 * s, now_ns=now * s) == []
    ps.begin_sweep()  # a watcher would resume from 112 s: 110 s is safe, but the store's clock may run ahead
    assert ps.end_sweep(events=True, position_ns=114 * s, now_ns=301 * s) == []
    ps.begin_sweep()
    assert ps.end_sweep(events=True, position_ns=115 * s, now_ns=302 * s) == ["gone"]
    assert not ps.contains("gone") and ps.contains("kept")


def test_a_failed_compaction_keeps_the_previous_log(tmp_path, monkeypatch):
    import imgworker.ledger as ledger_module

    path = str(tmp_path / "state.json")
    ps = ProcessedSet()
    ps.add_many([f"k{i}" for i in range(50)])
    ps.save(path, 1, [])
    monkeypatch.setattr(ledger_module, "_COMPACT_SLACK", -1000)  # force a compaction

    def full_disk(path: str, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ledger_module, "write_atomic", full_disk)
    ps.add_many(["k50"])
    with pytest.raises(OSError):
        ps.save(path, 2, [])
    monkeypatch.undo()
    ps.save(path, 3, [])  # the next checkpoint appends to the log the state file names
    loaded = ProcessedSet()
    loaded.load(path)
    assert loaded.size() == 51


def written_by_this_process() -> int:
    """Bytes this process has handed to write() so far (the kernel's count)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def test_a_checkpoint_writes_what_changed_in_the_backlog_and_a_restart_restores_it_whole(tmp_path):
    from imgworker.ledger import LocalBackend
    from imgworker.outcomes import IntakePosition

    state, results = str(tmp_path / "state.json"), str(tmp_path / "results.jsonl")
    backlog = [f"cam/person/task-{i % 64:03d}/20240101-{i // 1000:06d}.{i % 1000:03d}.jpg" for i in range(100_000)]
    ledger = Ledger(state, results, LocalBackend())
    ledger.start()
    spent = []
    for keys in (backlog, backlog, backlog[10:] + ["cam/new/1.jpg"]):
        before = written_by_this_process()
        ledger.save(0, ["p"], IntakePosition(events_ts_ns=7, checkpoints={"a/b": "k"}, backlog=keys))
        spent.append(written_by_this_process() - before)
    assert spent[0] > 100_000 * 40  # the whole backlog, once
    assert spent[1] < 2_000  # unchanged: the small state file only
    assert spent[2] < 2_000 + 11 * 80  # ten keys left, one came
    restored = Ledger(state, results, LocalBackend()).start()
    assert restored.intake.backlog == sorted(backlog[10:] + ["cam/new/1.jpg"])
    assert (restored.intake.events_ts_ns, restored.intake.checkpoints, restored.pending) == (7, {"a/b": "k"}, ["p"])


def test_backlog_log_tail_left_by_a_crash_is_not_read_after_the_next_save(tmp_path):
    """A crash between the log append and the state file: the next save must not build on that tail."""
    from imgworker.ledger import LocalBackend
    from imgworker.outcomes import IntakePosition

    state, results = str(tmp_path / "state.json"), str(tmp_path / "results.jsonl")
    ledger = Ledger(state, results, LocalBackend())
    ledger.start()
    ledger.save(0, [], IntakePosition(backlog=["a", "b", "c"]))
    log_name = json.loads((tmp_path / "state.json").read_text())["backlog_log"]
    with open(tmp_path / log_name, "ab") as f:
        f.write(b'"d"\n{"left": "a"}\n')  # a checkpoint's append; the crash came before its state file
    again = Ledger(state, results, LocalBackend())
    assert again.start().intake.backlog == ["a", "b", "c"]
    again.save(0, [], IntakePosition(backlog=["a", "b"]))  # one more save, appended to the same log
    assert json.loads((tmp_path / "state.json").read_text())["backlog_log"] == log_name  # not compacted
    assert Ledger(state, results, LocalBackend()).start().intake.backlog == ["a", "b"]


def test_backlog_log_is_cut_back_after_a_crash_and_compacted_when_it_churns(tmp_path, monkeypatch):
    import imgworker.ledger as ledger_module
    from imgworker.ledger import LocalBackend
    from imgworker.outcomes import IntakePosition

    monkeypatch.setattr(ledger_module, "_COMPACT_SLACK", 2)
    state, results = str(tmp_path / "state.json"), str(tmp_path / "results.jsonl")
    ledger = Ledger(state, results, LocalBackend())
    ledger.start()
    ledger.save(0, [], IntakePosition(backlog=["a", "b"]))
    first = json.loads((tmp_path / "state.json").read_text())["backlog_log"]
    with open(tmp_path / first, "ab") as f:
        f.write(b'"c"\n{"left": "a"}\n')  # appended, then the crash came before the state file was replaced
    again = Ledger(state, results, LocalBackend())
    assert again.start().intake.backlog == ["a", "b"]
    for n in range(6):  # churn: every checkpoint, one key left and one came
        again.save(0, [], IntakePosition(backlog=["b", f"k{n}"]))
    current = json.loads((tmp_path / "state.json").read_text())["backlog_log"]
    assert current != first and not (tmp_path / first).exists()
    assert Ledger(state, results, LocalBackend()).start().intake.backlog == ["b", "k5"]
    again.save(0, [], IntakePosition(backlog=[]))
    assert Ledger(state, results, LocalBackend()).start().intake.backlog == []
