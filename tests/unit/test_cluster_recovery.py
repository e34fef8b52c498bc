"""A ledger entry whose creating host stopped before its results line gets that line at the host's next start.

``ClusterHost`` with a link kept in memory (the ledger is a dict with create-if-absent): the host
"dies" between the ledger write and the results line, then starts again with the same name and
state directory, as a service manager restarts it.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from imgworker.cluster.host import ClusterHost
from imgworker.cluster.jetstream import ClusterUnavailable, Delivery, Published
from imgworker.config import load_config
from imgworker.dispatch import Dispatch
from imgworker.journal import ResultsJournal
from imgworker.outcomes import ImageRef, Outcome, Result
from imgworker.results import read_results


class MemoryLink:
    """The ledger and held messages of a JetStreamLink, in memory; ``lose_answers`` makes a write land unanswered."""

    def __init__(self, ledger: dict[tuple[str, str], bytes]) -> None:
        self.ledger = ledger
        self.queue: list[ImageRef] = []
        self.acked: list[str] = []
        self.lose_answers = False
        self.published: list[ImageRef] = []
        self.lease_terms = 0  # never took the lease: no term's first listings to look up

    def start(self) -> None: ...

    def close(self) -> None: ...

    def fetch(self, n: int) -> list[Delivery]:
        out, self.queue = self.queue[:n], self.queue[n:]
        return [Delivery(ref=r, delivered=1, counted=(r.key, f"{int(r.mtime * 1e6)}-{r.size}") in self.ledger)
                for r in out]

    def claim(self, key: str, version: str, value: bytes) -> bool:
        if (key, version) in self.ledger:
            return False
        self.ledger[key, version] = value
        if self.lose_answers:
            raise ClusterUnavailable("no answer")
        return True

    def ledger_value(self, key: str, version: str) -> bytes | None:
        if self.lose_answers:
            raise ClusterUnavailable("no answer")
        return self.ledger.get((key, version))

    def settle(self, key: str, *, term: bool = False) -> None:
        self.acked.append(key)

    def forget(self, key: str) -> None: ...

    def publish(self, refs: list[ImageRef]) -> Published:
        self.published += refs
        return Published(sent=len(refs))


class Sink:
    """What the recorder does with a result (its line), without figures or actions."""

    def __init__(self, journal: ResultsJournal) -> None:
        self.journal = journal
        self.recovered_results: list[Result] = []

    def accepted(self, ref: ImageRef) -> None: ...

    def finish(self, result: Result) -> None: ...

    def recovered(self, result: Result) -> None:
        self.recovered_results.append(result)
        self.journal.write(result)


def host(tmp_path: Any, link: MemoryLink) -> ClusterHost:
    cfg = load_config(env={}, overrides={"cluster": {"url": "nats://127.0.0.1:1", "host": "h1"},
                                         "run": {"state_dir": str(tmp_path / "state")}})
    return ClusterHost(cfg, link=link)  # type: ignore[arg-type]


def fetched(h: ClusterHost, link: MemoryLink, ref: ImageRef, sink: Sink) -> None:
    link.queue.append(ref)
    h.feed(Dispatch(h.cfg.dispatch, lambda: 0.0), sink, idle=1)  # type: ignore[arg-type]


def lines(h: ClusterHost) -> list[str]:
    path = h.cfg.results_path
    return [r.key for r in read_results(path)] if os.path.exists(path) else []


REF = ImageRef(key="p/person/cam0/0001.jpg", task_type="person", task_id="cam0", size=10, mtime=1.5)
RESULT = Result(key=REF.key, outcome=Outcome.NO_DETECTION, task_type="person", task_id="cam0", algo_ms=12.5,
                worker=3, algo_calls=1, started_at=100.0, finished_at=101.25)


def test_killed_between_the_ledger_write_and_the_line_the_restart_writes_the_line_once(tmp_path):
    ledger: dict[tuple[str, str], bytes] = {}
    link = MemoryLink(ledger)
    first = host(tmp_path, link)
    journal = ResultsJournal(first.cfg.results_path)
    fetched(first, link, REF, Sink(journal))
    assert first.claim(RESULT)  # the ledger has it as h1's; the host dies before its line
    assert lines(first) == [] and len(ledger) == 1
    journal.close()

    again = host(tmp_path, MemoryLink(ledger))
    journal = ResultsJournal(again.cfg.results_path)
    sink = Sink(journal)
    assert again.recover(sink) == 1
    assert sink.recovered_results == [RESULT], "the line is the outcome the ledger counted, field for field"
    assert lines(again) == [REF.key]
    assert again.recover(sink) == 0, "recovered once: a second start writes nothing"
    journal.close()
    third = host(tmp_path, MemoryLink(ledger))
    journal = ResultsJournal(third.cfg.results_path)
    assert third.recover(Sink(journal)) == 0 and lines(third) == [REF.key]
    journal.close()


def test_a_line_written_before_the_kill_is_not_written_again(tmp_path):
    ledger: dict[tuple[str, str], bytes] = {}
    link = MemoryLink(ledger)
    first = host(tmp_path, link)
    journal = ResultsJournal(first.cfg.results_path)
    fetched(first, link, REF, Sink(journal))
    assert first.claim(RESULT)
    journal.write(RESULT)  # the line is written; the host dies before its claim is marked done
    journal.close()
    again = host(tmp_path, MemoryLink(ledger))
    journal = ResultsJournal(again.cfg.results_path)
    assert again.recover(Sink(journal)) == 0
    assert lines(again) == [REF.key]
    journal.close()


def test_a_claim_that_lost_the_race_is_not_recovered(tmp_path):
    ledger: dict[tuple[str, str], bytes] = {}
    other = host(tmp_path / "other", MemoryLink(ledger))
    other.name = "h0"
    link = MemoryLink(ledger)
    first = host(tmp_path, link)
    journal = ResultsJournal(first.cfg.results_path)
    fetched(other, other.link, REF, Sink(journal))  # type: ignore[arg-type]
    fetched(first, link, REF, Sink(journal))
    assert other.claim(RESULT)
    assert not first.claim(RESULT)
    journal.close()
    again = host(tmp_path, MemoryLink(ledger))
    journal = ResultsJournal(again.cfg.results_path)
    assert again.recover(Sink(journal)) == 0 and lines(again) == []
    journal.close()


def test_a_forced_stop_after_an_unanswered_write_that_landed_is_recovered(tmp_path):
    ledger: dict[tuple[str, str], bytes] = {}
    link = MemoryLink(ledger)
    first = host(tmp_path, link)
    first.give_up = lambda: True  # the stop is forced while the server does not answer
    journal = ResultsJournal(first.cfg.results_path)
    fetched(first, link, REF, Sink(journal))
    link.lose_answers = True
    assert not first.claim(RESULT), "handed back unrecorded"
    assert len(ledger) == 1, "but the write landed"
    journal.close()
    again = host(tmp_path, MemoryLink(ledger))
    journal = ResultsJournal(again.cfg.results_path)
    assert again.recover(Sink(journal)) == 1 and lines(again) == [REF.key]
    journal.close()


def test_the_ledger_entry_carries_the_object_version_it_was_fetched_as(tmp_path):
    ledger: dict[tuple[str, str], bytes] = {}
    link = MemoryLink(ledger)
    h = host(tmp_path, link)
    journal = ResultsJournal(h.cfg.results_path)
    fetched(h, link, REF, Sink(journal))
    assert h.claim(RESULT)
    newer = ImageRef(key=REF.key, task_type="person", task_id="cam0", size=11, mtime=2.5)
    fetched(h, link, newer, Sink(journal))
    assert h.claim(RESULT), "a new upload under the same name is a new image"
    assert set(ledger) == {(REF.key, "1500000-10"), (REF.key, "2500000-11")}
    journal.close()


def test_a_ref_without_its_version_is_not_published_the_next_sweep_lists_it_with_one(tmp_path):
    """A backlog restored from a checkpoint holds keys only: published so, its ledger key would name no version and
    the same image listed later (with its version) would be analysed again."""
    link = MemoryLink({})
    h = host(tmp_path, link)

    class Backlog:
        refs = [ImageRef(key="p/person/cam0/0002.jpg", task_type="person", task_id="cam0"), REF]
        back: list[ImageRef] = []

        def take(self, limit: int) -> list[ImageRef]:
            out, self.refs = self.refs[:limit], self.refs[limit:]
            return out

        def put_back(self, refs: list[ImageRef]) -> None:
            self.back += refs

    backlog = Backlog()
    h.admit(backlog)
    assert link.published == [REF] and backlog.back == [] and backlog.refs == []


@pytest.fixture(autouse=True)
def _no_server(monkeypatch):
    """Nothing here talks to NATS."""
    monkeypatch.setattr("imgworker.cluster.jetstream.JetStreamLink.start", lambda self: None)
