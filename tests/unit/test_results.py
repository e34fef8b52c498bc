"""The results file: a corrupt complete line is a StateError, ``repair_results`` moves it aside."""

from __future__ import annotations

import json
import os

import pytest

from imgworker.errors import ExitCode, StateError
from imgworker.results import read_results, repair_results


def write_lines(path, *lines: bytes) -> None:
    with open(path, "wb") as f:
        f.write(b"".join(lines))


def line(key: str) -> bytes:
    return json.dumps({"key": key, "outcome": "inferred"}).encode() + b"\n"


def test_corrupt_complete_line_is_a_state_error_naming_line_offset_and_repair(tmp_path):
    path = str(tmp_path / "results.jsonl")
    write_lines(path, line("a"), line("b"), b'{"key": "c", "outc\x00\n', line("d"))
    with pytest.raises(StateError) as err:
        list(read_results(path))
    message = str(err.value)
    assert f"results file {path}: line 3 (byte offset {len(line('a') + line('b'))}) is corrupt" in message
    assert f"imgworker repair --state-dir {tmp_path}" in message
    assert err.value.exit_code == ExitCode.STATE


def test_corrupt_line_number_counts_from_offset(tmp_path):
    path = str(tmp_path / "other.jsonl")
    write_lines(path, line("a"), line("b"), b"not json\n")
    offset = len(line("a"))
    with pytest.raises(StateError) as err:
        list(read_results(path, offset=offset))
    assert (f"the line at byte offset {offset + len(line('b'))} (line 2 after the checkpoint at byte {offset})"
            in str(err.value))
    assert f"--results {path}" in str(err.value)


def test_line_of_the_wrong_shape_is_corrupt(tmp_path):
    path = str(tmp_path / "results.jsonl")
    write_lines(path, line("a"), b'{"key": "b", "outcome": "no_such_outcome"}\n')
    with pytest.raises(StateError, match="line 2"):
        list(read_results(path))


def test_repair_moves_corrupt_lines_aside_and_keeps_good_ones(tmp_path):
    path = str(tmp_path / "results.jsonl")
    (tmp_path / "results.jsonl.corrupt").write_bytes(b"earlier\n")
    write_lines(path, line("a"), b"garbage\n", line("b"), b"\n", line("c"), b'{"key": "d", "out')
    assert repair_results(path) == (3, 3)
    assert [r.key for r in read_results(path)] == ["a", "b", "c"]
    with open(path, "rb") as f:
        assert f.read() == line("a") + line("b") + line("c")
    assert (tmp_path / "results.jsonl.corrupt").read_bytes() == b'earlier\ngarbage\n\n{"key": "d", "out\n'
    assert sorted(os.listdir(tmp_path)) == ["results.jsonl", "results.jsonl.corrupt"]


def test_repair_of_a_sound_file_changes_nothing(tmp_path):
    path = str(tmp_path / "results.jsonl")
    write_lines(path, line("a"), line("b"))
    before = os.stat(path).st_ino
    assert repair_results(path) == (2, 0)
    assert os.stat(path).st_ino == before
    assert not os.path.exists(path + ".corrupt")


def test_incomplete_last_line_is_ignored_silently(tmp_path):
    path = str(tmp_path / "results.jsonl")
    write_lines(path, line("a"), b"garbage without a newline")
    assert [r.key for r in read_results(path)] == ["a"]


def test_a_new_results_file_has_its_directory_entry_made_durable(tmp_path, monkeypatch):
    """Deletes rely on result lines: the file that holds them must survive a power loss, not only its data."""
    import imgworker.journal as journal_module
    from imgworker.journal import ResultsJournal

    synced: list[str] = []
    monkeypatch.setattr(journal_module, "fsync_directory", synced.append)
    path = tmp_path / "state" / "results.jsonl"
    ResultsJournal(str(path)).close()
    assert synced == [str(tmp_path / "state")]
    ResultsJournal(str(path)).close()  # it exists now: nothing more to make durable
    assert synced == [str(tmp_path / "state")]
