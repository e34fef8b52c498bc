"""The order cluster mode's outcome ledger is asked in, on in-memory parts: claim, then the line, then the ack.

A host that dies after its ack and before its ledger write would lose the image (the message is
gone, no outcome anywhere); one that writes its line before the claim would count an outcome
another host recorded first. ``Recording`` stands in for ``ClusterHost`` as the recorder's claims;
``FakeLink`` for the JetStream server behind a ``ClusterHost``.
"""

from __future__ import annotations

from typing import Any

import pytest

from imgworker.memstore import MemoryAlgo, MemoryStore
from imgworker.outcomes import Result
from tests.support.memory import config, fill, supervisor
from tests.support.results import outcomes

pytestmark = pytest.mark.timeout(60)


class Recording:
    """Claims every outcome; notes what the results file held at each call."""

    def __init__(self, results_path: str) -> None:
        self.results_path = results_path
        self.calls: list[tuple[str, str, bool]] = []  # (call, key, the key's line already in the file)

    def _in_file(self, key: str) -> bool:
        with open(self.results_path, "rb") as f:
            return any(f'"key":"{key}"'.encode() in line for line in f)

    def claim(self, result: Result) -> bool:
        self.calls.append(("claim", result.key, self._in_file(result.key)))
        return True

    def settled(self, result: Result) -> None:
        self.calls.append(("settled", result.key, self._in_file(result.key)))


def run(tmp_path: Any) -> tuple[Recording, list[str], Any, Any]:
    cfg = config(tmp_path, worker={"count": 1})
    store = MemoryStore()
    keys = fill(store, ["p/a"], 5)
    sup = supervisor(cfg, store, MemoryAlgo(store))
    claims = Recording(cfg.results_path)
    sup.recorder.claims = claims
    report = sup.run()
    return claims, keys, cfg, report


def test_the_ledger_is_claimed_before_the_line_and_the_message_acked_after_it(tmp_path):
    claims, keys, cfg, report = run(tmp_path)
    for key in keys:
        mine = [(call, in_file) for call, k, in_file in claims.calls if k == key]
        assert mine == [("claim", False), ("settled", True)], (key, mine)
    assert set(outcomes(cfg)) == set(keys) and report.conserved



class FakeLink:
    """The server side of ``ClusterHost`` in memory: deliveries to hand out, and the acks it got."""

    def __init__(self, deliveries: list[Any]) -> None:
        self.deliveries = deliveries
        self.settled: list[tuple[str, bool]] = []

    def fetch(self, n: int) -> list[Any]:
        out, self.deliveries = self.deliveries[:n], self.deliveries[n:]
        return out

    def settle(self, key: str, *, term: bool = False) -> None:
        self.settled.append((key, term))


class Queue:
    """The local queue ``feed`` fills."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    @property
    def pending(self) -> int:
        return len(self.items)

    def append(self, item: Any) -> None:
        self.items.append(item)


def test_a_delivery_another_host_already_counted_is_acked_not_analysed(tmp_path):
    from imgworker.cluster.host import ClusterHost
    from imgworker.cluster.jetstream import Delivery
    from imgworker.outcomes import ImageRef

    cfg = config(tmp_path, cluster={"url": "nats://127.0.0.1:4222"})
    link = FakeLink([Delivery(ref=ImageRef(key="p/t/counted.jpg"), delivered=2, counted=True),
                     Delivery(ref=ImageRef(key="p/t/new.jpg"), delivered=1, counted=False)])
    host = ClusterHost(cfg, link=link)  # type: ignore[arg-type]
    queue, accepted = Queue(), []

    class Accepting:
        def accepted(self, ref: Any) -> None:
            accepted.append(ref.key)

        def finish(self, result: Result) -> None:
            raise AssertionError(result)

    host.feed(queue, Accepting(), idle=4)  # type: ignore[arg-type]
    assert link.settled == [("p/t/counted.jpg", False)]  # acked: it leaves the stream
    assert [item.ref.key for item in queue.items] == ["p/t/new.jpg"] and accepted == ["p/t/new.jpg"]
    assert host.figures.already_counted == 1


def test_a_final_failure_is_terminated_and_any_other_outcome_acked(tmp_path):
    from imgworker.cluster.host import ClusterHost
    from imgworker.outcomes import Outcome

    cfg = config(tmp_path, cluster={"url": "nats://127.0.0.1:4222"})
    link = FakeLink([])
    host = ClusterHost(cfg, link=link)  # type: ignore[arg-type]
    host.settled(Result(key="a", outcome=Outcome.FAILED_WORKER))  # never delivered again, whatever max_deliver
    host.settled(Result(key="b", outcome=Outcome.FAILED_ALGO))
    host.settled(Result(key="c", outcome=Outcome.INFERRED))
    assert link.settled == [("a", True), ("b", False), ("c", False)]
