from __future__ import annotations

from imgworker.config import DispatchConfig
from imgworker.dispatch import Dispatch
from imgworker.outcomes import ImageRef, WorkItem


def refs(n: int) -> list[ImageRef]:
    return [ImageRef(key=f"k{i}") for i in range(n)]


def test_fifo_and_holder_tracking():
    d = Dispatch(DispatchConfig(queue_capacity=10))
    for r in refs(3):
        assert d.offer(r) == []
    item = d.take(worker=1)
    assert item is not None and item.ref.key == "k0"
    assert d.take(worker=1) is None  # one item per worker
    assert "k0" in d and d.held_by(1) == item
    assert d.protected() == {"k0", "k1", "k2"}
    assert d.release(1) == item
    assert "k0" not in d and d.in_flight == 0


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
    item = d.take(0)
    d.offer(ImageRef(key="b"))
    d.release(0)
    d.requeue_front(WorkItem(ref=item.ref, attempt=2))
    again = d.take(5)
    assert (again.ref.key, again.attempt) == ("a", 2)
