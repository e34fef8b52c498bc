"""The cleaner on the cluster's intake leader, on in-memory parts behind a fake JetStream link.

``FakeLink`` keeps a work stream (sequence -> image, delivered in order to whoever fetches), the
consumer's highest delivered sequence, the ledger (create-if-absent) and the lease. The leader is
also a worker host here; ``elsewhere`` hands messages to "another host" that holds them and never
answers, so the leader cannot know about them but through the consumer's delivered sequence.
Counted at the far end: the ledger's entries, the objects left in the store, what each delete
found in the ledger at the instant it ran.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Any

import msgspec
import pytest

from imgworker.cluster import object_version
from imgworker.cluster.host import LedgerEntry
from imgworker.cluster.jetstream import ClusterUnavailable, Delivery, Published
from imgworker.config import load_config
from imgworker.errors import ConfigError
from imgworker.memstore import MemoryAlgo, MemoryStore
from imgworker.outcomes import ImageRef, Outcome
from tests.support.memory import config, supervisor

pytestmark = pytest.mark.timeout(60)

PREFIX = "cam/"


class FakeLink:
    """A JetStream server as one host's link sees it (see the module docstring)."""

    def __init__(self) -> None:
        self.stream: dict[int, ImageRef] = {}
        self.seq = 0
        self.ids: dict[str, int] = {}
        self.delivered_seq = 0
        self.ledger: dict[tuple[str, str], bytes] = {}
        self.held: dict[str, int] = {}
        self.sequences: dict[str, int] = {}
        self.lease_terms = 1
        self.lead = True
        self.fetching = True  # the leader's own lanes take work
        self.elsewhere: list[ImageRef] = []  # delivered to another host, which holds them
        self.on_withdraw: Any = None
        self.on_publish: Any = None
        self.republished: list[str] = []
        self.full = False  # the stream refuses every publish (discard new)
        self.answers_lost = False
        self.events_published: collections.deque[ImageRef] = collections.deque()

    def start(self) -> None: ...

    def close(self) -> None: ...

    def leading(self) -> bool:
        return self.lead

    def confirm_lease(self) -> bool:
        return self.lead

    def _append(self, ref: ImageRef, msg_id: str) -> int:
        if msg_id in self.ids:
            return self.ids[msg_id]
        self.seq += 1
        self.ids[msg_id] = self.seq
        self.stream[self.seq] = ref
        return self.seq

    def publish(self, refs: list[ImageRef]) -> Published:
        if not self.lead:
            return Published(sent=0, deposed=True)
        if self.full:
            return Published(sent=0, full=True)
        if self.answers_lost:  # stored, but the PubAcks never came back (NATS went away meanwhile)
            for ref in refs:
                self._append(ref, f"{ref.key}@{object_version(ref.mtime, ref.size)}")
            raise ClusterUnavailable("timeout")
        for ref in refs:
            self.sequences[ref.key] = self._append(ref, f"{ref.key}@{object_version(ref.mtime, ref.size)}")
        if self.on_publish is not None:
            self.on_publish()
        return Published(sent=len(refs))

    def publish_event(self, ref: ImageRef) -> None:
        """The leader's link republishes a MinIO notification (its loop, not the intake): as ``_republish``."""
        self.sequences[ref.key] = self._append(ref, f"{ref.key}@{object_version(ref.mtime, ref.size)}")
        self.events_published.append(ref)

    def _deliver(self) -> tuple[int, ImageRef] | None:
        for seq in sorted(self.stream):
            if seq > self.delivered_seq:
                self.delivered_seq = seq
                return seq, self.stream[seq]
        return None

    def deliver_elsewhere(self, n: int) -> None:
        for _ in range(n):
            got = self._deliver()
            if got is not None:
                self.elsewhere.append(got[1])

    def fetch(self, n: int) -> list[Delivery]:
        out = []
        while self.fetching and len(out) < n:
            got = self._deliver()
            if got is None:
                break
            seq, ref = got
            self.held[ref.key] = seq
            counted = (ref.key, object_version(ref.mtime, ref.size)) in self.ledger
            out.append(Delivery(ref=ref, delivered=1, counted=counted))
        return out

    def claim(self, key: str, version: str, value: bytes) -> bool:
        if (key, version) in self.ledger:
            return False
        self.ledger[(key, version)] = value
        return True

    def ledger_value(self, key: str, version: str) -> bytes | None:
        return self.ledger.get((key, version))

    def settle(self, key: str, *, term: bool = False) -> None:
        seq = self.held.pop(key, None)
        if seq is not None:
            self.stream.pop(seq, None)

    def release(self, keys: list[str]) -> None:
        for key in keys:
            self.held.pop(key, None)

    def forget(self, key: str) -> None:
        self.held.pop(key, None)

    def holds(self) -> int:
        return len(self.held)

    def figures(self) -> dict[str, int]:
        return {}

    def counted(self, versions: dict[str, str]) -> set[str]:
        return {key for key, version in versions.items() if (key, version) in self.ledger}

    def delivered_up_to(self) -> int:
        return self.delivered_seq

    def withdraw(self, seq: int) -> bool:
        there = self.stream.pop(seq, None) is not None
        if self.on_withdraw is not None:
            self.on_withdraw(seq)
        return there

    def publish_again(self, ref: ImageRef, tag: str) -> int:
        self.republished.append(ref.key)
        seq = self._append(ref, f"{ref.key}#{tag}")
        self.sequences[ref.key] = seq
        return seq

    def entries(self) -> dict[str, LedgerEntry]:
        return {key: msgspec.json.decode(v, type=LedgerEntry) for (key, _), v in self.ledger.items()}


class Watched(MemoryStore):
    """A store whose deletes note whether the ledger held each image's outcome at that instant."""

    def __init__(self) -> None:
        super().__init__()
        self.link: FakeLink | None = None
        self.deleted: dict[str, bool] = {}

    def delete(self, keys: Any) -> list[str]:
        keys = list(keys)
        assert self.link is not None
        for key in keys:
            self.deleted[key] = key in self.link.entries()
        return super().delete(keys)


def upload(store: MemoryStore, first: int, n: int) -> list[str]:
    keys = [f"{PREFIX}person/c1/20240101-000000.{i:03d}.jpg" for i in range(first, first + n)]
    for key in keys:
        store.put(key, b"\xff\xd8jpeg")
    return keys


class Tagged(Watched):
    """A store that lists ETags, as S3 does (the version hosts' claims name, not ``<mtime>-<size>``)."""

    def _page(self, prefix: str, page_size: int, after: str | None) -> list[ImageRef]:
        refs = super()._page(prefix, page_size, after)
        with self._lock:
            bodies = {ref.key: self._objects[ref.key][0] for ref in refs if ref.key in self._objects}
        return [msgspec.structs.replace(ref, etag=hashlib.md5(bodies.get(ref.key, b"")).hexdigest()) for ref in refs]


def leader(tmp_path: Any, store: Watched, *, protect: str = "lease", max_count: int = 0, lanes: int = 1,
           algo: MemoryAlgo | None = None, actions: dict[str, Any] | None = None,
           **retention: Any) -> tuple[Any, FakeLink]:
    retention = {"enabled": bool(max_count), "protect": protect, "max_count": max_count, **retention}
    cfg = config(tmp_path, cluster={"url": "nats://127.0.0.1:1"}, store={"prefix": PREFIX},
                 run={"until_idle": False}, worker={"count": lanes, "threads": 1}, retention=retention,
                 actions=actions or {})
    sup = supervisor(cfg, store, algo or MemoryAlgo(store))
    link = FakeLink()
    assert sup.cluster is not None
    sup.cluster.link = link  # type: ignore[assignment]
    store.link = link
    return sup, link


def sweeps(sup: Any, n: int) -> None:
    """Step through ``n`` more complete listings (each followed by a cleaning pass)."""
    until = sup.intake.scans_completed + n
    assert sup.step_until(lambda: sup.intake.scans_completed >= until, timeout_s=30)


def test_queued_deletes_only_images_whose_outcome_is_in_the_ledger(tmp_path):
    store = Watched()
    sup, link = leader(tmp_path, store, protect="queued", max_count=3)
    keys = upload(store, 0, 12)
    with sup.running(drain=False):
        assert sup.step_until(lambda: len(link.entries()) == len(keys), max_steps=2000)
        sweeps(sup, 4)  # more listings, more passes
    assert store.deleted, "the leader's cleaner deleted images"
    assert all(store.deleted.values()), "every delete came after the image's ledger entry"
    assert {e.outcome.value for e in link.entries().values()} <= {"inferred", "no_detection"}
    assert len(store.keys()) <= 3


def test_queued_never_deletes_an_image_another_host_holds(tmp_path):
    store = Watched()
    sup, link = leader(tmp_path, store, protect="queued", max_count=2)
    link.fetching = False
    keys = upload(store, 0, 6)
    with sup.running(drain=False):
        sweeps(sup, 3)
        link.deliver_elsewhere(6)
        sweeps(sup, 3)
    assert len(link.elsewhere) == 6 and not store.deleted
    assert set(store.keys()) == set(keys) and not link.entries()


def test_lease_gives_up_only_what_no_host_was_handed_and_records_it_first(tmp_path):
    store = Watched()
    sup, link = leader(tmp_path, store, protect="lease", max_count=4)
    link.fetching = False
    first = upload(store, 0, 3)
    with sup.running(drain=False):
        sweeps(sup, 2)  # the term's first pass: these may have been published by an earlier leader
        link.on_publish = lambda: link.deliver_elsewhere(5)  # another host takes the first five at once
        later = upload(store, 100, 10)
        sweeps(sup, 4)
    entries = link.entries()
    held = {ref.key for ref in link.elsewhere}
    assert held & set(later), "another host holds images published in this term"
    assert held and not held & set(entries) and held <= set(store.keys()), "what a host holds is never given up"
    assert set(first) <= set(store.keys()), "inherited images are not given up in the term"
    given_up = set(entries)
    assert given_up and given_up <= set(later)
    assert {(e.outcome.value, e.cause) for e in entries.values()} == {("dropped_expired", "retention")}
    assert all(store.deleted[key] for key in given_up) and set(store.deleted) == given_up
    assert not any(seq for seq, ref in link.stream.items() if ref.key in given_up), "withdrawn from the stream"
    assert len(store.keys()) == len(first) + len(held & set(later))  # over the limit: what hosts hold stays
    report = sup.report()
    assert report.conserved


def test_a_message_delivered_while_withdrawn_is_published_again_and_kept(tmp_path):
    store = Watched()
    sup, link = leader(tmp_path, store, protect="lease", max_count=1)
    link.fetching = False
    upload(store, 0, 1)
    with sup.running(drain=False):
        sweeps(sup, 2)
        later = upload(store, 100, 3)
        link.on_withdraw = lambda seq: link.deliver_elsewhere(5)  # a host fetches in between
        sweeps(sup, 2)
    assert link.republished, "the withdrawn messages went back to the stream"
    assert not link.entries() and not store.deleted
    assert set(later) <= set(store.keys())
    assert {ref.key for ref in link.stream.values()} >= set(link.republished)


def test_lease_never_gives_up_an_image_the_events_published_while_it_waits_in_the_backlog(tmp_path):
    """MinIO's notifications are republished by the link, not by intake: a later sweep that lists those images
    while the stream is full must not take them for the leader's own unpublished backlog (NEW)."""
    store = Watched()
    sup, link = leader(tmp_path, store, protect="lease", max_count=2)
    link.fetching = False
    upload(store, 0, 1)
    with sup.running(drain=False):
        sweeps(sup, 2)  # the term's first pass is behind
        later = upload(store, 100, 6)
        for ref in _refs(store, later):
            link.publish_event(ref)
        link.deliver_elsewhere(7)  # another host fetched them all (and the first) and works on them
        sup.clean(_inventory(store)[:1])  # a pass over a listing made before these uploads
        link.full = True  # the sweep's own publishes are refused: what it lists waits in the backlog
        sweeps(sup, 3)
    held = {ref.key for ref in link.elsewhere}
    assert set(later) <= held
    assert not link.entries() and not store.deleted, "what another host holds is neither given up nor deleted"
    assert set(later) <= set(store.keys())
    assert sup.cleaning.fence.given_up_unpublished == 0


def test_a_withdrawn_image_whose_publish_again_failed_once_is_not_left_out_of_the_stream(tmp_path):
    """NATS away for a moment right after the withdraw: published again under the original Nats-Msg-Id, the
    image would be taken for a duplicate (the window holds the withdrawn message's id) and stored nowhere."""
    store = Watched()
    sup, link = leader(tmp_path, store, protect="lease", max_count=1)
    link.fetching = False
    upload(store, 0, 1)
    with sup.running(drain=False):
        sweeps(sup, 2)
        later = upload(store, 100, 3)
        withdrawn: list[int] = []
        link.on_withdraw = lambda seq: withdrawn.append(seq) or (len(withdrawn) == 1 and link.deliver_elsewhere(2))
        publish_again, failures = link.publish_again, [ClusterUnavailable("connection closed")]

        def away_once(ref: ImageRef, tag: str) -> int:
            if failures:
                raise failures.pop()
            return publish_again(ref, tag)

        link.publish_again = away_once  # type: ignore[method-assign]
        sweeps(sup, 3)
    assert withdrawn and not failures, "a withdrawn message went back while NATS was away"
    held = {ref.key for ref in link.elsewhere}
    in_stream = {ref.key for ref in link.stream.values()}
    for key in later:
        assert key in link.entries() or key in in_stream or key in held, f"{key}: no outcome, no message, no holder"


def test_lease_protects_what_another_leader_published_before_a_term_whose_first_listing_began_earlier(tmp_path):
    """This host lost the lease mid-listing and took it again: that listing, the new term's first, began before
    the term and missed what the other leader published meanwhile; it must not become this host's NEW."""
    store = Watched()
    sup, link = leader(tmp_path, store, protect="lease", max_count=1)
    link.fetching = False
    upload(store, 0, 1)
    with sup.running(drain=False):
        sweeps(sup, 2)
        before = _inventory(store)  # the listing in progress when the lease was lost
        theirs = upload(store, 100, 3)  # meanwhile, another leader published these and a host took them
        for ref in _refs(store, theirs):
            link._append(ref, f"{ref.key}@{object_version(ref.mtime, ref.size)}")
        link.deliver_elsewhere(4)
        link.lease_terms += 1  # taken again
        sup.clean(before)  # the term's first pass, over the listing that began before it
        link.full = True  # what the next listings find waits in the backlog
        sweeps(sup, 3)
    assert set(theirs) <= {ref.key for ref in link.elsewhere}
    assert not link.entries() and not store.deleted, "what another host holds is neither given up nor deleted"


def test_a_give_up_whose_outcome_was_not_recorded_deletes_nothing(tmp_path):
    """A forced stop while the ledger does not answer ends the claim unrecorded; the lease CAS may answer
    again just after: the image must not be deleted with no outcome anywhere."""
    store = Watched()
    sup, link = leader(tmp_path, store, protect="lease", max_count=1)
    link.fetching = False
    upload(store, 0, 1)
    with sup.running(drain=False):
        sweeps(sup, 2)
        upload(store, 100, 4)
        link.full = True  # they stay in the backlog: NEW
        assert sup.cluster is not None
        sup.cluster.give_up = lambda: True  # the stop is forced

        def away(key: str, version: str, value: bytes) -> bool:
            raise ClusterUnavailable("timeout")

        link.claim = away  # type: ignore[method-assign]
        sweeps(sup, 1)
        sup.step_until(lambda: False, max_steps=20)
    assert sup.cluster.figures.unrecorded, "the give-ups were tried and not recorded"
    assert all(store.deleted.values()), "nothing deleted without its outcome in the ledger"


def test_lease_never_gives_up_an_image_whose_publish_was_stored_but_not_answered(tmp_path):
    """NATS went away during a publish batch: the images go back to the backlog, yet the server stored them and
    a host may have fetched them: they are not the leader's unpublished backlog (NEW)."""
    store = Watched()
    sup, link = leader(tmp_path, store, protect="lease", max_count=1)
    link.fetching = False
    upload(store, 0, 1)
    with sup.running(drain=False):
        sweeps(sup, 2)
        link.answers_lost = True
        later = upload(store, 100, 4)
        sweeps(sup, 1)
        link.deliver_elsewhere(5)  # a host fetched them
        sweeps(sup, 3)
    assert set(later) <= {ref.key for ref in link.elsewhere}
    assert not link.entries() and not store.deleted, "what another host holds is neither given up nor deleted"


def test_a_withdraw_whose_answer_was_lost_leaves_no_image_without_a_message(tmp_path):
    """The delete by sequence reached the server, its answer did not: the message may be gone. Left as queued,
    the image would have no message, no holder and no outcome, and a later withdraw finds nothing to withdraw."""
    store = Watched()
    sup, link = leader(tmp_path, store, protect="lease", max_count=1)
    link.fetching = False
    upload(store, 0, 1)
    with sup.running(drain=False):
        sweeps(sup, 2)
        later = upload(store, 100, 3)
        withdraw, lost = link.withdraw, [ClusterUnavailable("timeout")]

        def answer_lost(seq: int) -> bool:
            there = withdraw(seq)
            if lost:
                raise lost.pop()
            return there

        link.withdraw = answer_lost  # type: ignore[method-assign]
        sweeps(sup, 3)
    assert not lost, "a withdraw went unanswered"
    in_stream = {ref.key for ref in link.stream.values()}
    for key in later:
        assert key in link.entries() or key in in_stream, f"{key}: no outcome, no message"


def test_an_image_put_back_after_its_withdrawal_is_never_given_up_through_its_copy(tmp_path):
    """A host may hold the original delivery of a put-back image: the copy's sequence above the consumer's says
    nothing about that host, so the image is not given up (nor deleted) through the copy."""
    store = Watched()
    sup, link = leader(tmp_path, store, protect="lease", max_count=1)
    link.fetching = False
    upload(store, 0, 1)
    with sup.running(drain=False):
        sweeps(sup, 2)
        upload(store, 100, 3)
        withdrawn: list[int] = []
        link.on_withdraw = lambda seq: withdrawn.append(seq) or (len(withdrawn) == 1 and link.deliver_elsewhere(2))
        sweeps(sup, 4)  # the copies are never delivered: a later pass may take them for undelivered
    held = {ref.key for ref in link.elsewhere}
    assert held & set(link.republished), "put back: a host holds the original delivery of one"
    assert not held & set(link.entries()), "what another host holds is not given up"
    assert not held & set(store.deleted)


def test_a_deposed_leader_deletes_nothing(tmp_path):
    store = Watched()
    sup, link = leader(tmp_path, store, protect="queued", max_count=1)
    upload(store, 0, 6)
    with sup.running(drain=False):
        assert sup.step_until(lambda: len(link.entries()) == 6, max_steps=2000)
        done_elsewhere = upload(store, 100, 4)
        for ref in _refs(store, done_elsewhere):  # another host's outcomes: deletable by the leader
            entry = LedgerEntry(key=ref.key, outcome=Outcome.INFERRED, host="h2")
            link.ledger[(ref.key, object_version(ref.mtime, ref.size))] = msgspec.json.encode(entry)
        before = dict(store.deleted)
        link.lead = False  # lost between its listing and its pass
        plan = sup.clean(_inventory(store))
        sup.step_until(lambda: False, max_steps=20)
    assert store.deleted == before and set(done_elsewhere) <= set(store.keys()), "nothing deleted once deposed"
    assert sup.cleaning.fence.deposed >= 1 and not plan.delete


def test_expired_images_end_would_expire_once_in_the_ledger_unanalysed_and_not_deleted(tmp_path):
    store = Watched()
    algo = MemoryAlgo(store)
    sup, link = leader(tmp_path, store, algo=algo, external_max_age_s=3600.0)  # captured in 2024: expired
    keys = upload(store, 0, 5)
    with sup.running(drain=False):
        assert sup.step_until(lambda: len(link.entries()) == len(keys), max_steps=2000)
    entries = link.entries()
    assert {(e.outcome.value, e.cause) for e in entries.values()} == {("dropped_expired", "would_expire")}
    assert not algo.calls and not link.stream and not link.held, "dropped unanalysed, and acked"
    assert set(store.keys()) == set(keys), "expiry deletes nothing itself"


def _refs(store: MemoryStore, keys: list[str]) -> list[ImageRef]:
    return [ref for page in store.list_pages(PREFIX, 1000) for ref in page if ref.key in keys]


def _inventory(store: MemoryStore) -> list[Any]:
    from imgworker.cleaner import stored_image

    return [stored_image(ref, PREFIX) for page in store.list_pages(PREFIX, 1000) for ref in page]


@pytest.mark.parametrize("protect", ["none", "inflight"])
def test_none_and_inflight_are_refused_in_cluster_mode_with_the_reason(protect):
    with pytest.raises(ConfigError, match=r"retention\.protect.*cluster\.url.*another host holds"):
        load_config(env={}, overrides={"cluster": {"url": "nats://n:4222"},
                                       "retention": {"enabled": True, "max_count": 5, "protect": protect}})


@pytest.mark.parametrize("protect", ["queued", "lease"])
def test_queued_and_lease_run_in_cluster_mode(protect):
    cfg = load_config(env={}, overrides={"cluster": {"url": "nats://n:4222"},
                                         "retention": {"enabled": True, "max_count": 5, "protect": protect}})
    assert cfg.retention.enabled and cfg.cluster.enabled


def test_with_etags_the_leader_finds_the_outcomes_hosts_wrote(tmp_path):
    """Hosts claim each image under its ETag: the cleaner looks up the same version, so done images are deleted."""
    store = Tagged()
    sup, link = leader(tmp_path, store, protect="queued", max_count=2)
    keys = upload(store, 0, 8)
    with sup.running(drain=False):
        assert sup.step_until(lambda: len(link.entries()) == len(keys), max_steps=2000)
        sweeps(sup, 3)
    assert {version for _, version in link.ledger} == {hashlib.md5(b"\xff\xd8jpeg").hexdigest()}
    assert store.deleted and all(store.deleted.values()) and len(store.keys()) <= 2


def test_queued_never_deletes_a_done_image_whose_alert_copy_is_pending(tmp_path):
    store = Watched()
    algo = MemoryAlgo(store, detections=lambda path: 1)
    sup, link = leader(tmp_path, store, protect="queued", max_count=1, algo=algo, actions={"copy_alerts": True})
    keys = upload(store, 0, 5)
    with sup.running(drain=False):
        assert sup.janitor is not None
        collect = sup.janitor.collect
        sup.janitor.collect = lambda: []  # type: ignore[method-assign]  # the copies stay open
        assert sup.step_until(lambda: len(link.entries()) == len(keys), max_steps=2000)
        sweeps(sup, 3)
        assert not sup.janitor.deleting() and not store.deleted, "done, but its alert copy is not made yet"
        sup.janitor.collect = collect  # type: ignore[method-assign]
        sweeps(sup, 3)
    alerts = sorted(k for k in store.keys() if "/alerts/" in k)
    assert alerts == sorted(k.replace(PREFIX, f"{PREFIX}alerts/") for k in keys)
    assert store.deleted and all(store.deleted.values())


def test_a_leader_deposed_during_its_pass_deletes_nothing(tmp_path):
    """The lease is lost after the pass's first check, while it reads the ledger: the check before the deletes holds."""
    store = Watched()
    sup, link = leader(tmp_path, store, protect="queued", max_count=1)
    upload(store, 0, 2)
    with sup.running(drain=False):
        assert sup.step_until(lambda: len(link.entries()) == 2, max_steps=2000)
        done_elsewhere = upload(store, 100, 4)
        for ref in _refs(store, done_elsewhere):  # another host's outcomes: deletable by a leader
            entry = LedgerEntry(key=ref.key, outcome=Outcome.INFERRED, host="h2")
            link.ledger[(ref.key, object_version(ref.mtime, ref.size))] = msgspec.json.encode(entry)
        before = dict(store.deleted)
        counted = link.counted

        def deposed_meanwhile(versions: dict[str, str]) -> set[str]:
            link.lead = False
            return counted(versions)

        link.counted = deposed_meanwhile  # type: ignore[method-assign]
        sup.clean(_inventory(store))
        sup.step_until(lambda: False, max_steps=20)
    assert store.deleted == before and set(done_elsewhere) <= set(store.keys()), "nothing deleted once deposed"
    assert sup.cleaning.fence.deposed == 1


def test_a_new_leader_gives_up_nothing_an_earlier_leader_published_and_a_host_holds(tmp_path):
    """Published by an earlier leader (its ids out of the duplicate window now) and held elsewhere: this term's
    publishes get new sequences above the consumer's, yet the images are inherited for the term."""
    store = Watched()
    sup, link = leader(tmp_path, store, protect="lease", max_count=1)
    link.fetching = False
    earlier = upload(store, 0, 6)
    for ref in _refs(store, earlier):
        link._append(ref, f"earlier-term/{ref.key}")
    link.deliver_elsewhere(6)
    with sup.running(drain=False):
        sweeps(sup, 3)
    assert len(link.elsewhere) == 6
    assert not link.entries() and not store.deleted and set(store.keys()) == set(earlier), \
        "what a host holds is never given up"


def test_a_second_term_inherits_what_other_leaders_published_meanwhile(tmp_path):
    store = Watched()
    sup, link = leader(tmp_path, store, protect="lease", max_count=1)
    link.fetching = False
    upload(store, 0, 1)
    with sup.running(drain=False):
        sweeps(sup, 2)
        link.lead = False  # another leader's term: it publishes new uploads, another host holds them
        meanwhile = upload(store, 100, 5)
        for ref in _refs(store, meanwhile):
            link._append(ref, f"other-leader/{ref.key}")
        link.deliver_elsewhere(6)
        link.lead, link.lease_terms = True, link.lease_terms + 1  # this host leads again: a new term
        sweeps(sup, 3)
    assert not link.entries() and not store.deleted and set(meanwhile) <= set(store.keys()), \
        "what a host holds is never given up"


def test_a_new_upload_under_a_done_name_is_not_deleted_before_its_own_outcome(tmp_path):
    """A done image's name uploaded again is a new version: the cleaner's memory of done images is per version."""
    store = Watched()
    sup, link = leader(tmp_path, store, protect="queued", max_count=2)
    first, second = upload(store, 0, 2)
    with sup.running(drain=False):
        assert sup.step_until(lambda: len(link.entries()) == 2, max_steps=2000)
        sweeps(sup, 1)  # both known as done
        link.fetching = False  # no lane analyses the new version
        store.put(first, b"\xff\xd8another jpeg")
        newer = upload(store, 100, 2)
        sweeps(sup, 3)
    assert first in store.keys(), "the new version is not done: it stays"
    assert second not in store.keys() and set(newer) <= set(store.keys())


def test_a_full_work_stream_keeps_images_in_the_leader_s_backlog_until_there_is_room(tmp_path):
    """Backpressure: refused images wait in the backlog and go out once there is room, with no listing in between
    (the store is away meanwhile)."""
    store = Watched()
    sup, link = leader(tmp_path, store)
    link.fetching = False
    room = {"free": False}
    publish = link.publish

    def full_until_freed(refs: list[ImageRef]) -> Published:
        return publish(refs) if room["free"] else Published(sent=0, full=True)

    link.publish = full_until_freed  # type: ignore[method-assign]
    keys = upload(store, 0, 5)
    with sup.running(drain=False):
        sweeps(sup, 2)
        assert not link.stream and sup.cluster is not None and sup.cluster.figures.stream_full
        store.set_outage(True)  # no listing finds them again from here on
        listed, refused = sup.intake.scans_completed, sup.cluster.figures.stream_full
        assert sup.step_until(lambda: sup.cluster.figures.stream_full > refused, timeout_s=30), "refused again"
        room["free"] = True
        assert sup.step_until(lambda: len(link.stream) == len(keys), timeout_s=30)
        assert sup.intake.scans_completed == listed
        store.set_outage(False)
    assert {ref.key for ref in link.stream.values()} == set(keys)


def test_a_new_leader_does_not_publish_again_what_other_hosts_counted(tmp_path):
    """A new lease term: what the bucket still holds and the ledger has an outcome for stays out of the stream."""
    store = Watched()
    sup, link = leader(tmp_path, store)
    counted_elsewhere = upload(store, 0, 5)
    for ref in _refs(store, counted_elsewhere):
        entry = LedgerEntry(key=ref.key, outcome=Outcome.INFERRED, host="h2")
        link.ledger[(ref.key, object_version(ref.mtime, ref.size))] = msgspec.json.encode(entry)
    new = upload(store, 100, 2)
    with sup.running(drain=False):
        sweeps(sup, 3)
        later = upload(store, 200, 2)  # after the term's first listings: published without a lookup
        sweeps(sup, 2)
    published = {msg_id.split("@")[0] for msg_id in link.ids}
    assert not published & set(counted_elsewhere), "counted by another host: not sent again"
    assert set(new) | set(later) <= published
    assert sup.cluster.figures.inherited_counted == len(counted_elsewhere)
    assert {key for key, _ in link.ledger} == set(counted_elsewhere) | set(new) | set(later), "one outcome each"
