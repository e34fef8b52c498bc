"""The retention cleaner in cluster mode: it runs on the intake leader only, after each of its complete listings.

An image's status across hosts, as the leader can know it:

- DONE: its ledger entry (``ledger_key`` of its listed version) exists. Entries are never deleted, so
  a key found once is cached as done and never looked up again.
- HELD (never deleted, never given up): a lane of the leader holds it or its actions are not done,
  the leader fetched it, or it is not DONE and the leader cannot prove that no host has it (below).
- NEW: in the leader's backlog, never published by it, and first listed in the leader's current
  lease term. No other host can have it: an earlier leader listed only what existed before this
  term began, and what this term's first two complete listings saw is *inherited* (HELD) for the
  term (the first may have begun before the term: the lease lost mid-listing and taken again).
- QUEUED: published by this leader (it knows the message's stream sequence from its PubAck).

``queued`` deletes DONE images only: the ledger entry exists before the delete (durable before
destructive). ``lease`` (storage wins) may then give up the oldest NEW and QUEUED images:

- a NEW image is given up directly: its outcome (``dropped_expired``, cause ``retention``) is
  claimed in the ledger through the recorder (create-if-absent, then its results line), then deleted;
- a QUEUED image only through the fence: the shared consumer delivers in stream order, so a
  message whose sequence is above the consumer's ``delivered.stream_seq`` reached no host. The
  leader deletes the message from the stream by sequence, *then* reads the consumer again: still
  above, it was never delivered and can no longer be, and the image is given up as above. Below it,
  a host may have it: the object stays and the image is published again under a Nats-Msg-Id of its
  own (the duplicate window would drop the old one), so nothing is lost (``republished``).

Either way the outcome is claimed before the delete, so an image ends once cluster-wide: a host
that analysed it anyway loses the create race. Leadership is confirmed by a compare-and-set on the
lease (the same fence as intake's publishes) before the pass decides and again before its deletes
are submitted: a deposed leader stops at once and deletes nothing. Deletes it submitted before it
was deposed are safe still: DONE images, or images whose outcome is already in the ledger.

``none`` and ``inflight`` are refused in cluster mode (``config``): they need to know which host
holds what, and the leader does not.

Expiry elsewhere is decided on the leader as well (``LeaderExpiry``, ``expiry.py``): it ends the
doomed of its backlog with ``end`` and the doomed published ones through the same fence
(``through_fence``, cause ``would_expire``). Every host still applies ``ExpiryGuard.drops`` to the
images it fetched and holds (its drop is its claim in the ledger, then the ack).

Limits: one pass looks up in the ledger each listed image not yet known as done (concurrently, in
chunks); a result action another host still has to run on a DONE image (a tag, a move) may find
the object deleted by the leader and is counted as that host's action error.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Protocol

import msgspec

from ..backoff import Backoff
from ..cleaner import CleanerStats, Plan, Status, StoredImage, plan_cleanup
from ..config import Config
from ..dispatch import Dispatch
from ..inflight import InFlight
from ..janitor import Done, Janitor
from ..outcomes import ImageRef, Outcome
from ..ports import OutcomeLedger, OutcomeSink
from ..retention import CleanerPass
from ..scanner import parse_task
from . import image_version
from .host import ClusterHost
from .jetstream import ClusterUnavailable

log = logging.getLogger(__name__)


class Backlogged(Protocol):
    """The leader's intake: which images it found and has not published yet."""

    def __contains__(self, key: str) -> bool: ...


class FenceFigures(msgspec.Struct):
    """What the leader's cleaner did beyond one host's: give-ups through the fence, and what it put back."""

    given_up_unpublished: int = 0  # from the leader's backlog
    given_up_withdrawn: int = 0  # withdrawn from the stream, proven undelivered
    republished: int = 0  # withdrawn, then found possibly delivered: published again, kept
    deposed: int = 0  # passes (or their deletes) stopped because the lease was lost


class ClusterCleaner(CleanerPass):
    """One cleaning pass on the intake leader (see the module docstring)."""

    def __init__(self, cfg: Config, *, host: ClusterHost, backlog: Backlogged, dispatch: Dispatch,
                 inflight: InFlight, ledger: OutcomeLedger, sink: OutcomeSink, cleaner: CleanerStats) -> None:
        super().__init__(cfg, dispatch=dispatch, inflight=inflight, ledger=ledger, sink=sink, cleaner=cleaner)
        self.host = host
        self.backlog = backlog
        self.fence = FenceFigures()
        self._done: set[str] = set()  # "key@version" known to have a ledger entry (it never goes away)
        self._term = -1
        self._inherited: set[str] = set()  # listed in this term's first passes: an earlier leader may have published
        self._term_passes = 0

    def run(self, inventory: list[StoredImage], janitor: Janitor) -> tuple[Plan, list[Done]]:
        link = self.host.link
        if not self.confirm():
            return Plan(delete=[], give_up=[]), []
        deleting = janitor.deleting()
        if deleting:
            inventory = [img for img in inventory if img.key not in deleting]
        versions = {img.key: image_version(self._ref(img)) for img in inventory}
        unknown = {key: v for key, v in versions.items() if f"{key}@{v}" not in self._done}
        try:
            found = link.counted(unknown) if unknown else set()
        except ClusterUnavailable as exc:
            log.warning("cleaner: the cluster ledger did not answer (%s); no pass this time", exc)
            return Plan(delete=[], give_up=[]), []
        self._done.update(f"{key}@{unknown[key]}" for key in found)
        done = {key for key, v in versions.items() if f"{key}@{v}" in self._done}
        self._done = {f"{key}@{versions[key]}" for key in done}  # what is no longer listed is forgotten
        if link.lease_terms != self._term:
            self._term, self._term_passes, self._inherited = link.lease_terms, 0, set()
        if self._term_passes < 2:  # a term's first listing may have begun before it (the lease lost mid-listing
            self._inherited |= set(versions) - done  # and taken again); its second began within it
            self._term_passes += 1
        self._inherited &= set(versions)
        for key in [k for k in list(link.sequences) if k in done or k not in versions]:
            link.sequences.pop(key, None)  # bounded by the images listed and not done
        delivered = 0
        if self.cfg.retention.protect == "lease":
            try:  # what a host may have been handed is not even planned to be given up (others are, instead)
                delivered = link.delivered_up_to()
            except ClusterUnavailable as exc:
                log.warning("cleaner: cannot read the work consumer (%s); no published image given up this time", exc)
                delivered = 1 << 62
        status = self.status_among(done, janitor, delivered=delivered)
        plan = plan_cleanup(inventory, self.cfg.retention, now=time.time(), status=status)
        by_key = {img.key: img for img in inventory}
        given_up = self._give_up_all([by_key[key] for key in plan.give_up], status)
        plan.skipped_protected += len(plan.give_up) - len(given_up)
        plan.limit_exceeded = plan.limit_exceeded or len(given_up) < len(plan.give_up)
        plan.give_up = given_up
        self._count(plan, status, inventory)
        if not (plan.delete or plan.give_up):
            return plan, []
        if not self.confirm():  # the fence right before the deletes: a deposed leader deletes nothing
            return plan, []
        janitor.submit(self._jobs(plan.delete + plan.give_up))
        if plan.give_up:
            log.info("cleaner: gave up %d images no host was handed (storage wins); %s", len(plan.give_up),
                     msgspec.structs.asdict(self.fence))
        return plan, []

    def status_among(self, done: set[str], janitor: Janitor, *, delivered: int = 0) -> Callable[[str], Status]:
        """An image's status across hosts, as far as the leader can prove it (see the module docstring).

        ``delivered``: the consumer's delivered stream sequence; a published image at or below it may
        be on a host (HELD).
        """
        sequences = self.host.link.sequences

        def status(key: str) -> Status:
            if self.inflight.is_held(key) or janitor.has_open_actions(key):
                return Status.HELD
            if key in done:
                return Status.DONE
            if self.dispatch.is_queued(key) or key in self._inherited:
                return Status.HELD  # fetched here, or perhaps published by an earlier leader
            if key in sequences:
                return Status.QUEUED if sequences[key] > delivered else Status.HELD
            return Status.NEW if key in self.backlog and not self.host.maybe_published(key) else Status.HELD

        return status

    def confirm(self) -> bool:
        """The lease compare-and-set: False (and nothing is to be ended or deleted) once this host is deposed."""
        try:
            leading = self.host.link.confirm_lease()
        except ClusterUnavailable as exc:
            log.warning("leader: cannot confirm the intake lease (%s); nothing deleted or given up", exc)
            return False
        if not leading:
            self.fence.deposed += 1
            log.warning("leader: this host no longer holds the intake lease; nothing deleted or given up")
        return leading

    def _give_up_all(self, images: list[StoredImage], status: Callable[[str], Status]) -> list[str]:
        """End what may be given up (backlog directly, published through the fence); the keys that ended."""
        if not images:
            return []
        ended: list[str] = []
        published: list[ImageRef] = []
        for img in images:
            if status(img.key) is Status.NEW:
                if self.end(self._ref(img), "retention"):
                    self.fence.given_up_unpublished += 1
                    ended.append(img.key)
            else:
                published.append(self._ref(img))
        if published:
            withdrawn = self.through_fence(published, "retention")
            self.fence.given_up_withdrawn += len(withdrawn)
            ended += withdrawn
        return ended

    def through_fence(self, refs: list[ImageRef], cause: str) -> list[str]:
        """Withdraw the undelivered messages, read the consumer again, end what no host got, put back the rest.

        The one way the leader ends a published image it does not hold (the cleaner's give-ups, and
        expiry's ``would_expire`` drops, ``LeaderExpiry``); ``cause`` goes on the ``dropped_expired``
        line. Returns the keys that ended.
        """
        link = self.host.link
        try:
            before = link.delivered_up_to()
        except ClusterUnavailable as exc:
            log.warning("cleaner: cannot read the work consumer (%s); nothing given up", exc)
            return []
        withdrawn: list[tuple[ImageRef, int]] = []
        for ref in refs:
            seq = link.sequences.get(ref.key, 0)
            if seq <= before:
                continue  # a host may hold it
            try:
                if link.withdraw(seq):
                    withdrawn.append((ref, seq))
            except ClusterUnavailable as exc:  # unknown: it may be gone (the answer was lost), or still there
                log.warning("cleaner: withdrawing %s from the stream failed (%s); it is published again", ref.key, exc)
                self._put_back(ref)  # not left queued with no message: a second copy at worst (the ledger)
                break
        if not withdrawn:
            return []
        after = None
        try:
            after = link.delivered_up_to()
        except ClusterUnavailable as exc:
            log.warning("cleaner: cannot read the work consumer again (%s); the withdrawn images go back", exc)
        ended: list[str] = []
        for ref, seq in withdrawn:
            if after is not None and seq > after:
                if self.end(ref, cause):
                    ended.append(ref.key)
            else:
                self._put_back(ref)
        return ended

    def _put_back(self, ref: ImageRef) -> None:
        """A withdrawn message a host may have been handed: publish the image again, keep the object.

        While NATS is away this waits and tries again (as a claim does): intake's own publish would
        carry the withdrawn message's Nats-Msg-Id, which the duplicate window takes for stored. The
        image is then known by no sequence (0: maybe delivered): a host may hold the withdrawn
        message's delivery, and the copy's sequence above the consumer's would say nothing about it.
        """
        backoff = Backoff(0.2, 2.0)
        while True:
            try:
                self.host.link.publish_again(ref, uuid.uuid4().hex[:12])
                break
            except ClusterUnavailable as exc:
                if not self.host.give_up():
                    wait_s = backoff.fail()
                    log.warning("cleaner: publishing %s again failed (%s); trying again in %.1f s", ref.key, exc,
                                wait_s)
                    time.sleep(wait_s)
                    continue
                log.error("cleaner: %s was withdrawn from the stream and could not be published again (%s); it "
                          "stays in the intake backlog", ref.key, exc)
                self.host.link.sequences.pop(ref.key, None)
                self.host.unpublished(ref.key)  # intake takes it in again at the next listing
                return
        self.host.link.sequences[ref.key] = 0  # held: never given up through the copy
        self.fence.republished += 1
        log.info("cleaner: %s may have been delivered while withdrawn; published again, kept", ref.key)

    def end(self, ref: ImageRef, cause: str) -> bool:
        """End an image no host holds: its outcome (``dropped_expired``) is claimed in the ledger and written first.

        For the cleaner (``retention``) that comes before the delete: storage wins. False if the claim
        ended unrecorded (the ledger did not answer and the stop is forced): it is not to be deleted.
        """
        unrecorded = self.host.figures.unrecorded
        self.host.ending(ref.key, image_version(ref))
        self.sink.accepted(ref)
        self.sink.drop(ref, Outcome.DROPPED_EXPIRED, cause)
        self.host.link.sequences.pop(ref.key, None)
        return self.host.figures.unrecorded == unrecorded

    def _ref(self, img: StoredImage) -> ImageRef:
        task_type, task_id = parse_task(img.key, self.cfg.store.prefix)
        return ImageRef(key=img.key, task_type=task_type, task_id=task_id, mtime=img.mtime, size=img.size,
                        etag=img.etag)
