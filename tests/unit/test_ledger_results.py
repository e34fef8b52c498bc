from __future__ import annotations

import json
import os


import pytest

from imgworker.journal import ResultsJournal as ResultsWriter
from imgworker.ledger import Ledger, ManagerBackend, ProcessedSet
from imgworker.outcomes import Outcome, Result
from imgworker.results import read_results


def test_sweep_prunes_only_unseen_keys():
    ps = ProcessedSet()
    ps.add_many(["a", "b", "c"])
    ps.begin_sweep()
    assert ps.filter_new(["a", "x"]) == ["x"]
    ps.add_many(["x"])  # finished during the sweep
    assert ps.end_sweep() == 2  # b and c were not listed any more
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
        assert len(json.loads((tmp_path / "s.json").read_text())["processed"]) == 1000
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
