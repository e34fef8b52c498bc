"""Expiry elsewhere decided on the cluster's intake leader, on in-memory parts behind the fake JetStream link.

The count rule (``external_max_count``): each task directory keeps only its newest N elsewhere. The
uploads are named as captured in 2024, so no arrival is recent: an image is doomed exactly when N
newer images of its directory were taken in. The leader does not fetch here (``link.fetching``);
``deliver_elsewhere`` hands messages to another host that holds them. Counted at the far end: the
ledger's entries, the work stream's messages, what was ever published, the algorithm's calls.
"""

from __future__ import annotations

from typing import Any

import pytest

from imgworker.cluster.expiry import LeaderExpiry
from imgworker.memstore import MemoryAlgo
from tests.unit.test_cluster_leader_cleaner import PREFIX, FakeLink, Watched, leader, sweeps, upload

pytestmark = pytest.mark.timeout(60)


def expiring(tmp_path: Any, store: Watched, *, keep: int) -> tuple[Any, FakeLink, MemoryAlgo]:
    algo = MemoryAlgo(store)
    sup, link = leader(tmp_path, store, algo=algo, external_max_count=keep)
    link.fetching = False
    return sup, link, algo


def outcomes(link: FakeLink) -> dict[str, tuple[str, str]]:
    return {key: (e.outcome.value, e.cause) for key, e in link.entries().items()}


def ever_published(link: FakeLink) -> set[str]:
    return {msg_id.split("@")[0].split("#")[0] for msg_id in link.ids}


def test_published_images_the_count_rule_dooms_are_withdrawn_and_dropped_but_never_a_delivered_one(tmp_path):
    store = Watched()
    sup, link, algo = expiring(tmp_path, store, keep=3)
    old = upload(store, 0, 3)
    with sup.running(drain=False):
        sweeps(sup, 2)
        assert set(old) <= {ref.key for ref in link.stream.values()}, "not doomed yet: published"
        link.deliver_elsewhere(1)  # another host holds the oldest
        new = upload(store, 100, 3)  # three newer in the same directory: the older three are doomed
        sweeps(sup, 2)
    assert isinstance(sup.leader_expiry, LeaderExpiry)
    assert outcomes(link) == {key: ("dropped_expired", "would_expire") for key in old[1:]}
    assert old[0] not in link.entries() and [ref.key for ref in link.elsewhere] == [old[0]], "delivered: kept"
    queued = {ref.key for ref in link.stream.values()}
    assert not queued & set(old[1:]), "withdrawn from the stream"
    assert set(new) <= queued, "the newest three wait for a worker"
    assert not algo.calls and set(store.keys()) == set(old) | set(new), "expiry deletes nothing itself"
    assert sup.leader_expiry.figures.withdrawn == 2


def test_backlog_images_the_count_rule_dooms_are_dropped_directly_never_published(tmp_path, monkeypatch):
    store = Watched()
    sup, link, algo = expiring(tmp_path, store, keep=2)
    assert sup.cluster is not None
    monkeypatch.setattr(sup.cluster, "can_publish", lambda: False)  # the stream is full: all stays in the backlog
    with sup.running(drain=False):
        sweeps(sup, 2)  # the term's first listings (what they find, an earlier leader may have published)
        keys = upload(store, 0, 5)
        sweeps(sup, 2)
        assert not link.ids
        monkeypatch.undo()
        sweeps(sup, 2)
    assert outcomes(link) == {key: ("dropped_expired", "would_expire") for key in keys[:3]}
    assert ever_published(link) == set(keys[3:]), "the doomed were never published; the newest two were"
    assert sup.leader_expiry.figures.from_backlog == 3 and not algo.calls


def test_images_already_doomed_at_admission_are_not_published(tmp_path):
    store = Watched()
    sup, link, _ = expiring(tmp_path, store, keep=2)
    with sup.running(drain=False):
        sweeps(sup, 2)  # the term's first listings (what they find, an earlier leader may have published)
        keys = upload(store, 0, 6)
        sweeps(sup, 2)
    assert outcomes(link) == {key: ("dropped_expired", "would_expire") for key in keys[:4]}
    assert ever_published(link) == set(keys[4:])
    assert sup.leader_expiry.figures.not_published == 4


def test_a_deposed_leader_drops_nothing(tmp_path, monkeypatch):
    store = Watched()
    sup, link, _ = expiring(tmp_path, store, keep=3)
    old = upload(store, 0, 3)
    with sup.running(drain=False):
        sweeps(sup, 2)
        monkeypatch.setattr(link, "confirm_lease", lambda: False)  # lost; this host has not noticed yet
        upload(store, 100, 3)
        sweeps(sup, 2)
        assert sup.leader_expiry.drop_doomed() == 0
        answers = iter([True])  # lost between the pass's decision and its ends
        monkeypatch.setattr(link, "confirm_lease", lambda: next(answers, False))
        assert sup.leader_expiry.drop_doomed() == 0
    assert not link.entries(), "nothing ended once deposed"
    assert set(old) <= {ref.key for ref in link.stream.values()}, "nothing withdrawn"
    assert sup.cleaning.fence.deposed >= 1


def test_a_new_leader_never_ends_what_an_earlier_leader_published_and_a_host_holds(tmp_path):
    """The earlier leader published these and a host works on them; to the new leader they are backlog images
    (it did not publish them): that no host can have them holds only for what it first listed in its term."""
    from imgworker.cluster import object_version
    from tests.unit.test_cluster_leader_cleaner import _refs

    store = Watched()
    sup, link, _ = expiring(tmp_path, store, keep=3)
    old = upload(store, 0, 3)
    for ref in _refs(store, old):
        link._append(ref, f"{ref.key}@{object_version(ref.mtime, ref.size)}")
    link.deliver_elsewhere(3)
    upload(store, 100, 3)  # newer ones: the count rule dooms the old three
    with sup.running(drain=False):
        sweeps(sup, 4)
    assert {ref.key for ref in link.elsewhere} == set(old)
    assert not set(old) & set(link.entries()), "what another host holds is not ended under it"


def test_images_the_events_published_count_as_arrivals_and_the_doomed_are_withdrawn(tmp_path):
    """With MinIO's events the link publishes, not intake: the count rule must still see those arrivals."""
    from tests.unit.test_cluster_leader_cleaner import _refs

    store = Watched()
    sup, link, algo = expiring(tmp_path, store, keep=2)
    with sup.running(drain=False):
        sweeps(sup, 2)  # the term's first listings
        keys = upload(store, 0, 5)
        for ref in _refs(store, keys):
            link.publish_event(ref)
        sweeps(sup, 2)
    assert outcomes(link) == {key: ("dropped_expired", "would_expire") for key in keys[:3]}
    assert {ref.key for ref in link.stream.values()} == set(keys[3:]), "the doomed withdrawn, the newest two wait"
    assert not algo.calls


def test_a_host_still_drops_at_dispatch_what_expired_in_the_stream(tmp_path):
    store = Watched()
    algo = MemoryAlgo(store)
    sup, link = leader(tmp_path, store, algo=algo, external_max_age_s=3600.0)  # captured in 2024: expired
    link.lead = False  # a host that does not lead: it only fetches what an earlier leader published
    keys = upload(store, 0, 3)
    for page in store.list_pages(PREFIX, 1000):
        for ref in page:
            link._append(ref, ref.key)
    with sup.running(drain=False):
        assert sup.step_until(lambda: len(link.entries()) == len(keys), max_steps=2000)
    assert outcomes(link) == {key: ("dropped_expired", "would_expire") for key in keys}
    assert not algo.calls and not link.stream and not link.held, "dropped unanalysed, and acked"


def test_the_leader_exports_what_its_expiry_and_cleaner_ended(tmp_path):
    store = Watched()
    sup, link, _ = expiring(tmp_path, store, keep=3)
    old = upload(store, 0, 3)
    with sup.running(drain=False):
        sweeps(sup, 2)
        upload(store, 100, 3)
        sweeps(sup, 2)
    assert sup.cluster is not None
    exported = {family.name: family.samples[0].value for family in sup.cluster.collector().collect()
                if family.name.startswith(("imgworker_cluster_expiry", "imgworker_cluster_cleaner"))}
    assert exported["imgworker_cluster_expiry_withdrawn"] == len(old)
    assert exported["imgworker_cluster_expiry_not_published"] == 0
    assert "imgworker_cluster_cleaner_given_up_withdrawn" in exported


def test_a_deposed_leader_ends_nothing_at_admission(tmp_path, monkeypatch):
    """Deposed, not noticed yet: the images doomed at admission are neither ended nor published (the same fence)."""
    from imgworker.cluster.jetstream import Published

    store = Watched()
    sup, link, _ = expiring(tmp_path, store, keep=2)
    monkeypatch.setattr(link, "confirm_lease", lambda: False)
    monkeypatch.setattr(link, "publish", lambda refs: Published(sent=0, deposed=True))
    upload(store, 0, 6)
    with sup.running(drain=False):
        sweeps(sup, 2)
    assert not link.entries() and not link.ids, "nothing ended, nothing published"
    assert sup.leader_expiry.figures.not_published == 0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FenceStub:
    """The cleaner's fence as expiry uses it: the lease holds; what is ended or withdrawn is noted."""

    def __init__(self) -> None:
        self.ended: list[str] = []
        self.withdrawn: list[str] = []

    def confirm(self) -> bool:
        return True

    def end(self, ref: Any, cause: str) -> None:
        self.ended.append(ref.key)

    def through_fence(self, refs: list[Any], cause: str) -> list[str]:
        self.withdrawn += [ref.key for ref in refs]
        return [ref.key for ref in refs]


def test_an_image_s_wait_is_its_place_in_line_over_the_rate_deliveries_advance():
    """2 deliveries a second; published images 81-90 places ahead of the consumer, the backlog behind them; each
    image lives 41.25 s: published images whose place is over 82 are doomed (41.5 s and more), the backlog all."""
    import time
    from types import SimpleNamespace

    from imgworker.config import RetentionConfig
    from imgworker.expiry import ExpiryEstimator
    from imgworker.outcomes import ImageRef

    now = time.time()
    refs = [ImageRef(key=f"{PREFIX}person/c1/img-{i:03d}.jpg", task_type="person", task_id="c1", size=3, mtime=now,
                     etag=f"e{i}") for i in range(14)]
    published, backlog = refs[:10], refs[10:]
    link = SimpleNamespace(sequences={ref.key: 101 + n for n, ref in enumerate(published)}, delivered=0,
                           lease_terms=1)
    listed: list[ImageRef] = []  # the term's first two listings are behind before the backlog is listed
    link.delivered_up_to = lambda: link.delivered
    clock = Clock()
    fence = FenceStub()
    expiry = LeaderExpiry(estimator=ExpiryEstimator(RetentionConfig(external_max_age_s=41.25), PREFIX),
                          host=SimpleNamespace(leading=lambda: True, link=link, maybe_published=lambda key: False),
                          fence=fence, backlog=SimpleNamespace(in_take_order=lambda: listed),
                          stats=SimpleNamespace(e2e_ms=SimpleNamespace(mean=0.0)), clock=clock)
    assert expiry.screen(published) == published, "none doomed at admission: published"
    assert expiry.drop_doomed() == 0 and expiry.drop_doomed() == 0, "no delivery rate measured yet"
    listed.extend(backlog)
    clock.now, link.delivered = 10.0, 20
    assert expiry.throughput() == 0.0 and expiry.drop_doomed() == len(published) - 2 + len(backlog)
    assert expiry.throughput() == 2.0
    assert fence.withdrawn == [ref.key for ref in published[2:]], "places 81 and 82: 40.5 s and 41 s, in time"
    assert fence.ended == [ref.key for ref in backlog]
