"""Expiry elsewhere decided on the intake leader: the one host that sees every arrival.

With ``retention.external_max_age_s`` and/or ``external_max_count`` (images expire elsewhere: an S3
lifecycle rule, another program), the leader drops the images that would be gone before a worker is
done with them, cause ``would_expire`` (outcome ``dropped_expired``):

- every image intake admits is observed (``ExpiryEstimator``), so the count rule knows how many
  newer images each task directory holds and how fast they arrive. No other host can: each fetches
  only a share of the stream;
- at admission, an image that would expire even if a worker took it next is not published: it is
  ended directly (``screen``), if no host can have it (as below);
- after each complete listing (``drop_doomed``), each image's wait is its position in line over the
  cluster's throughput: a published image not yet delivered stands at ``seq - delivered`` (its stream
  sequence over the consumer's delivered sequence), a backlog image behind all of those, in the
  order intake would publish it. The doomed of the backlog are ended directly if no host can have
  them (first listed in this term, after its first two listings: before, an earlier leader may have
  published them; never published by this host, nor perhaps); the others are published, and the
  doomed published ones end only through ``ClusterCleaner.through_fence``, the cleaner's own
  fence: withdrawn from the stream by sequence, the consumer read again, ended only if still above
  it, else published again and kept.

Throughput: the rate the consumer's delivered sequence advances, sampled at each listing end over
the last ~``RATE_WINDOW_S``. Hosts fetch no more than their idle lanes, so deliveries follow the
cluster's completions, and the rate is counted in the same unit as the position in line (stream
sequences: a withdrawn or deduplicated message leaves the same gap in both). The ack floor would
lag the deliveries by what is in flight, and the stream's depth also moves with publishing. The
margin for the work itself is this host's mean end-to-end time (every host runs the same service).

Each end is a claim in the ledger first (create-if-absent, then the leader's results line), so an
image ends once cluster-wide. The lease is confirmed (the cleaner's compare-and-set) before a pass
decides and again before it ends anything: a deposed leader drops nothing. Every host still checks
at dispatch each delivery it fetched (``ExpiryGuard.drops``: the age rule; on the leader also the
count rule), a last guard that is safe because that host holds the delivery.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

import msgspec

from ..expiry import ExpiryEstimator
from ..intake import Backlog
from ..outcomes import ImageRef
from ..stats import Stats
from .host import ClusterHost
from .jetstream import ClusterUnavailable
from .retention import ClusterCleaner

log = logging.getLogger(__name__)

#: Seconds of the consumer's delivered sequence the cluster's throughput is measured over.
RATE_WINDOW_S = 10.0
#: The most image keys remembered as observed (an image observed twice would count as two arrivals).
OBSERVED_KEYS = 200_000

CAUSE = "would_expire"


class ExpiryFigures(msgspec.Struct):
    """What the leader's expiry ended, by where the image stood."""

    not_published: int = 0  # doomed at admission: never published
    from_backlog: int = 0  # doomed in the backlog after a listing
    withdrawn: int = 0  # published, undelivered, withdrawn through the fence


class LeaderExpiry:
    """The intake leader's expiry decisions (see the module docstring)."""

    def __init__(self, *, estimator: ExpiryEstimator, host: ClusterHost, fence: ClusterCleaner, backlog: Backlog,
                 stats: Stats, clock: Callable[[], float] = time.monotonic) -> None:
        self.expiry = estimator
        self.host = host
        self.fence = fence
        self.backlog = backlog
        self.stats = stats  # read only: the mean end-to-end time
        self.clock = clock
        self.figures = ExpiryFigures()
        self._observed: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._published: dict[str, ImageRef] = {}  # published here and not known delivered
        self._samples: list[tuple[float, int]] = []  # (clock, consumer's delivered sequence)
        self._term = -1
        self._term_listings = 0
        self._inherited: set[str] = set()  # in the backlog at this term's first listings: perhaps published

    @property
    def enabled(self) -> bool:
        return self.expiry.enabled

    def observe(self, ref: ImageRef) -> None:
        """An image was taken in by intake: once per key, it counts as an arrival in its directory."""
        if ref.key in self._observed:
            return
        self._observed[ref.key] = None
        while len(self._observed) > OBSERVED_KEYS:
            self._observed.popitem(last=False)
        self.expiry.observe(ref)

    def event_published(self, ref: ImageRef) -> None:
        """An image the link published from MinIO's notifications (not through intake): an arrival, in line."""
        if self.enabled:
            self.observe(ref)
            self._published[ref.key] = ref

    def screen(self, refs: list[ImageRef]) -> list[ImageRef]:
        """Before a publish: end the images that would expire even if taken next; the rest are to be published."""
        if not self.enabled:
            return refs
        for ref in refs:
            self.observe(ref)
        now, margin = time.time(), self._margin()
        doomed = [ref for ref in refs if self.expiry.would_expire(ref, within_s=margin, now=now)
                  and self._only_here(ref.key)]  # the others are published: the fence decides for them
        if doomed and not self.fence.confirm():
            return refs  # deposed: nothing ended here; the publish is refused by the same fence
        gone = {ref.key for ref in doomed}
        for ref in doomed:
            self.fence.end(ref, CAUSE)
        self.figures.not_published += len(doomed)
        keep = [ref for ref in refs if ref.key not in gone]
        self._published.update((ref.key, ref) for ref in keep)
        return keep

    def drop_doomed(self) -> int:
        """After a complete listing: end the backlog and undelivered published images that would expire; how many."""
        if not self.enabled or not self.host.leading():
            return 0
        backlog = [ref for ref in self.backlog.in_take_order() if ref.mtime or ref.size or ref.etag]
        for ref in backlog:
            self.observe(ref)
        self._inherit([ref.key for ref in backlog])
        if not self.fence.confirm():
            return 0
        try:
            delivered = self.host.link.delivered_up_to()
        except ClusterUnavailable as exc:
            log.warning("expiry: cannot read the work consumer (%s); nothing dropped this time", exc)
            return 0
        self._sample(delivered)
        published, in_backlog = self._doomed(backlog, delivered)
        if not (published or in_backlog) or not self.fence.confirm():
            return 0
        for ref in in_backlog:
            self.fence.end(ref, CAUSE)
        withdrawn = self.fence.through_fence(published, CAUSE) if published else []
        for key in withdrawn:
            self._published.pop(key, None)
        self.figures.from_backlog += len(in_backlog)
        self.figures.withdrawn += len(withdrawn)
        ended = len(in_backlog) + len(withdrawn)
        log.info("expiry: dropped %d images that would expire before a worker is done (%d from the backlog, %d "
                 "withdrawn from the stream; %.1f images/s)", ended, len(in_backlog), len(withdrawn),
                 self.throughput())
        return ended

    def throughput(self) -> float:
        """Stream sequences delivered per second over the last ~``RATE_WINDOW_S`` (0 until a second is measured)."""
        if len(self._samples) < 2:
            return 0.0
        (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
        return (s1 - s0) / (t1 - t0) if t1 - t0 >= 1.0 else 0.0

    def _doomed(self, backlog: list[ImageRef], delivered: int) -> tuple[list[ImageRef], list[ImageRef]]:
        """The published-undelivered and the backlog images whose wait in line outlasts them."""
        sequences = self.host.link.sequences
        self._published = {key: ref for key, ref in self._published.items() if sequences.get(key, 0) > delivered}
        now, margin, rate = time.time(), self._margin(), self.throughput()

        def doomed(ref: ImageRef, position: int) -> bool:
            wait = position / rate if rate > 0 else 0.0
            return self.expiry.would_expire(ref, within_s=wait + margin, now=now)

        published = [ref for key, ref in self._published.items() if doomed(ref, sequences[key] - delivered)]
        tail = max((sequences[key] for key in self._published), default=delivered) - delivered
        in_backlog = [ref for n, ref in enumerate(backlog, start=1)
                      if doomed(ref, tail + n) and self._only_here(ref.key)]
        return published, in_backlog

    def _inherit(self, backlog: list[str]) -> None:
        """A term's first two listings: what the backlog holds may have been published by an earlier leader (the
        first listing may have begun before the term)."""
        if self.host.link.lease_terms != self._term:
            self._term, self._term_listings, self._inherited = self.host.link.lease_terms, 0, set()
        if self._term_listings < 2:
            self._inherited.update(backlog)
            self._term_listings += 1

    def _only_here(self, key: str) -> bool:
        """A backlog image no host can have: first listed in this term, never published (nor maybe) by this host."""
        if self.host.link.lease_terms != self._term or self._term_listings < 2:
            return False  # the term's first listings are not behind: an earlier leader may have published it
        return key not in self._inherited and not self.host.maybe_published(key) \
            and key not in self.host.link.sequences

    def _sample(self, delivered: int) -> None:
        now = self.clock()
        self._samples.append((now, delivered))
        while len(self._samples) > 2 and now - self._samples[1][0] > RATE_WINDOW_S:
            self._samples.pop(0)

    def _margin(self) -> float:
        return self.stats.e2e_ms.mean / 1000.0
