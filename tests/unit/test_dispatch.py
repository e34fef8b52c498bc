from __future__ import annotations

from imgworker.config import DispatchConfig
from imgworker.dispatch import Dispatch
from imgworker.inflight import InFlight
from imgworker.outcomes import ImageRef, WorkItem


def refs(n: int) -> list[ImageRef]:
    return [ImageRef(key=f"k{i}") for i in range(n)]


def test_fifo_and_a_held_key_counts_as_known():
    inflight = InFlight(deadline_s=10.0)
    d = Dispatch(DispatchConfig(queue_capacity=10), is_held=inflight.is_held)
    for r in refs(3):
        assert d.offer(r) == []
    queued = d.pop_next()
    assert queued is not None and queued.item.ref.key == "k0"
    assert "k0" not in d and d.pending == 2  # out of the queue, held by nobody yet
    inflight.take(1, queued.item, queued_at=queued.queued_at)
    assert "k0" in d and d.offer(ImageRef(key="k0")) == [] and d.pending == 2  # held: not offered twice
    assert inflight.done(1) is not None
    assert "k0" not in d and len(inflight) == 0


def test_duplicates_are_ignored():
    d = Dispatch(DispatchConfig(queue_capacity=10))
    d.offer(ImageRef(key="a"))
    assert d.offer(ImageRef(key="a")) == []
    assert d.pending == 1


def test_drop_oldest_and_drop_newest():
    oldest = Dispatch(DispatchConfig(queue_capacity=2, overflow="drop_oldest"))
    newest = Dispatch(DispatchConfig(queue_capacity=2, overflow="drop_newest"))
    for r in refs(2):
        oldest.offer(r)
        newest.offer(r)
    assert [r.key for r in oldest.offer(ImageRef(key="new"))] == ["k0"]
    assert oldest.pending_keys() == ["k1", "new"]
    assert [r.key for r in newest.offer(ImageRef(key="new"))] == ["new"]
    assert newest.pending_keys() == ["k0", "k1"]


def test_requeue_front_keeps_attempt():
    d = Dispatch(DispatchConfig(queue_capacity=1))
    d.offer(ImageRef(key="a"))
    queued = d.pop_next()
    assert queued is not None
    d.offer(ImageRef(key="b"))
    d.requeue_front(WorkItem(ref=queued.item.ref, attempt=2), queued_at=queued.queued_at)
    again = d.pop_next()
    assert again is not None and (again.item.ref.key, again.item.attempt) == ("a", 2)
    assert again.queued_at == queued.queued_at
