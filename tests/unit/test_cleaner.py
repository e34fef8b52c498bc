"""Retention planning: rules, policies, and properties that must hold for any state."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from imgworker.cleaner import Status, StoredImage, plan_cleanup, stored_image
from imgworker.config import DispatchConfig, RetentionConfig
from imgworker.dispatch import Dispatch
from imgworker.inflight import InFlight
from imgworker.outcomes import ImageRef


def images(group: str, n: int, start: float = 0.0, size: int = 10) -> list[StoredImage]:
    return [StoredImage(key=f"{group}/{i:04d}.jpg", group=group, size=size, ts=start + i) for i in range(n)]


def status_of(mapping: dict[str, Status]):
    return lambda key: mapping.get(key, Status.DONE)


def test_group_and_time_come_from_the_key():
    ref = ImageRef(key="cam/person/t1/20240101-000000.500.jpg", size=5, mtime=99.0)
    img = stored_image(ref, "cam/")
    assert (img.group, img.size) == ("person/t1", 5)
    assert img.ts == 1704067200.5
    assert stored_image(ImageRef(key="cam/x.jpg", mtime=7.0), "cam/").ts == 7.0


def test_count_rule_deletes_oldest_per_directory_with_overrides():
    inv = images("person/t1", 5) + images("car/t2", 5)
    cfg = RetentionConfig(enabled=True, max_count=3, max_count_overrides={"car": 1}, protect="none")
    plan = plan_cleanup(inv, cfg, now=100, status=status_of({}))
    assert sorted(plan.delete) == ["car/t2/0000.jpg", "car/t2/0001.jpg", "car/t2/0002.jpg", "car/t2/0003.jpg",
                                   "person/t1/0000.jpg", "person/t1/0001.jpg"]
    assert not plan.limit_exceeded


def test_age_and_bytes_rules():
    inv = images("a/b", 10, start=0.0, size=100)
    plan = plan_cleanup(inv, RetentionConfig(enabled=True, max_age_s=5, protect="none"), now=10, status=status_of({}))
    assert sorted(plan.delete) == [f"a/b/{i:04d}.jpg" for i in range(5)]
    plan = plan_cleanup(inv, RetentionConfig(enabled=True, max_bytes=350, protect="none"), now=10,
                        status=status_of({}))
    assert sorted(plan.delete) == [f"a/b/{i:04d}.jpg" for i in range(7)]


def test_policies_on_the_same_state():
    inv = images("a/b", 6)
    status = {"a/b/0000.jpg": Status.HELD, "a/b/0001.jpg": Status.QUEUED, "a/b/0002.jpg": Status.NEW}
    cfg = dict(enabled=True, max_count=3)
    none = plan_cleanup(inv, RetentionConfig(**cfg, protect="none"), now=0, status=status_of(status))
    assert sorted(none.delete) == ["a/b/0000.jpg", "a/b/0001.jpg", "a/b/0002.jpg"]
    inflight = plan_cleanup(inv, RetentionConfig(**cfg, protect="inflight"), now=0, status=status_of(status))
    assert sorted(inflight.delete) == ["a/b/0001.jpg", "a/b/0002.jpg"] and inflight.skipped_protected == 1
    queued = plan_cleanup(inv, RetentionConfig(**cfg, protect="queued"), now=0, status=status_of(status))
    assert sorted(queued.delete) == ["a/b/0003.jpg", "a/b/0004.jpg", "a/b/0005.jpg"]  # finished ones instead
    inv2 = images("a/b", 4)
    status2 = {k.key: Status.QUEUED for k in inv2[:3]} | {"a/b/0003.jpg": Status.HELD}
    queued2 = plan_cleanup(inv2, RetentionConfig(enabled=True, max_count=1, protect="queued"), now=0,
                           status=status_of(status2))
    assert queued2.delete == [] and queued2.limit_exceeded
    lease2 = plan_cleanup(inv2, RetentionConfig(enabled=True, max_count=1, protect="lease"), now=0,
                          status=status_of(status2))
    assert lease2.delete == [] and lease2.give_up == ["a/b/0000.jpg", "a/b/0001.jpg", "a/b/0002.jpg"]
    assert not lease2.limit_exceeded


statuses = st.sampled_from(list(Status))


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(0, 3), statuses, st.integers(1, 500)), min_size=1, max_size=60),
    protect=st.sampled_from(["queued", "lease"]),
    max_count=st.integers(0, 10),
    max_age=st.sampled_from([0.0, 10.0, 30.0]),
    max_bytes=st.sampled_from([0, 500, 5000]),
)
def test_protected_images_are_never_deleted(data, protect, max_count, max_age, max_bytes):
    inv, status = [], {}
    for i, (group, st_, size) in enumerate(data):
        key = f"g{group}/t/{i:04d}.jpg"
        inv.append(StoredImage(key=key, group=f"g{group}/t", size=size, ts=float(i)))
        status[key] = st_
    if not (max_count or max_age or max_bytes):
        max_count = 1
    cfg = RetentionConfig(enabled=True, max_count=max_count, max_age_s=max_age, max_bytes=max_bytes, protect=protect)
    plan = plan_cleanup(inv, cfg, now=float(len(inv)), status=status.__getitem__)
    assert all(status[k] is Status.DONE for k in plan.delete)
    assert len(set(plan.delete) | set(plan.give_up)) == len(plan.delete) + len(plan.give_up)
    if protect == "queued":
        assert plan.give_up == []
    else:
        assert all(status[k] in (Status.QUEUED, Status.NEW) for k in plan.give_up)
        # storage wins: only held images can keep a limit exceeded
        left = [img for img in inv if img.key not in set(plan.delete) | set(plan.give_up)]
        held = [img for img in left if status[img.key] is Status.HELD]
        if max_count:
            for group in {img.group for img in left}:
                in_group = [img for img in left if img.group == group]
                held_in = [img for img in held if img.group == group]
                assert len(in_group) <= max(max_count, len(held_in)) or plan.limit_exceeded
        if max_bytes and not held:
            assert sum(img.size for img in left) <= max_bytes


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["offer", "take", "release", "clean"]), st.integers(0, 3)),
                    max_size=80),
       protect=st.sampled_from(["queued", "lease"]))
def test_cleaner_racing_dispatch_never_deletes_queued_or_held(ops, protect):
    """Interleave dispatch and cleaning passes; every pass sees the live state and respects it."""
    inflight = InFlight(deadline_s=60.0)
    dispatch = Dispatch(DispatchConfig(queue_capacity=1000), is_held=inflight.is_held)
    stored: dict[str, StoredImage] = {}
    done: set[str] = set()
    counter = 0
    cfg = RetentionConfig(enabled=True, max_count=2, protect=protect)
    for op, arg in ops:
        if op == "offer":
            key = f"g{arg}/t/{counter:04d}.jpg"
            stored[key] = StoredImage(key=key, group=f"g{arg}/t", size=1, ts=float(counter))
            dispatch.offer(ImageRef(key=key))
            counter += 1
        elif op == "take":
            queued = dispatch.pop_next() if inflight.of_lane(arg) is None else None
            if queued is not None:
                inflight.take(arg, queued.item, queued_at=queued.queued_at)
        elif op == "release":
            held = inflight.done(arg)
            if held is not None:
                done.add(held.item.ref.key)
        else:
            def status(key: str) -> Status:
                if inflight.is_held(key):
                    return Status.HELD
                return Status.QUEUED if dispatch.is_queued(key) else Status.DONE

            plan = plan_cleanup(list(stored.values()), cfg, now=float(counter), status=status)
            for key in plan.delete:
                assert key not in dispatch, "deleted an image that is queued or held"
                assert key in done
                del stored[key]
            for key in plan.give_up:
                assert protect == "lease" and not inflight.is_held(key)
                dispatch.withdraw(key)
                done.add(key)
                del stored[key]
