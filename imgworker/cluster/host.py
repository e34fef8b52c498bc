"""What the shared queue and the shared ledger mean for one host's owners (see the package docstring).

``ClusterHost`` is what the supervisor calls in cluster mode: ``publish`` (the intake leader's
admission), ``feed`` (idle lanes take from the shared consumer), ``release`` (a stop hands back
what was fetched and not started), and, as the recorder's ``OutcomeClaims``, ``claim`` before an
outcome is written and ``settled`` after it. It decides; ``JetStreamLink`` talks to the server.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any, Protocol

import msgspec

from ..backoff import Backoff
from ..config import Config
from ..dispatch import Dispatch
from ..errors import ExitCode, ImgworkerError
from ..outcomes import ImageRef, Outcome, Result, WorkItem
from ..ports import OutcomeSink
from ..results import read_results
from . import image_version
from .events import MinioRecords
from .intents import Intent, Intents
from .jetstream import ClusterSetupRefused, ClusterUnavailable, JetStreamLink

log = logging.getLogger(__name__)

#: The most images the leader publishes in one loop step: a sweep never holds the loop up for long.
PUBLISH_BATCH = 256


class ClusterNotStarted(ImgworkerError):
    """A stop came while the host still waited for the NATS server at start."""

    exit_code = ExitCode.INTERRUPTED


class Backlog(Protocol):
    """Where the leader's intake keeps images found and not yet published (``intake.Intake``)."""

    def take(self, limit: int) -> list[ImageRef]: ...

    def put_back(self, refs: list[ImageRef]) -> None: ...


class Recovering(Protocol):
    """Where ``ClusterHost.recover`` hands an outcome this host counted in the ledger and never journaled."""

    def recovered(self, result: Result) -> None: ...


class LedgerEntry(msgspec.Struct, frozen=True):
    """One image version's outcome as the cluster ledger keeps it: which host counted it, and its results line."""

    key: str
    outcome: Outcome
    host: str
    task_type: str = ""
    attempt: int = 1
    cause: str = ""
    detections: int = 0
    algo_ms: float | None = None
    e2e_ms: float | None = None
    started_at: float = 0.0
    finished_at: float = 0.0
    token: str = ""  # unique per claim: a claim retried after a lost answer recognises its own write
    version: str = ""  # the object version (``image_version``) the ledger key names
    task_id: str = ""
    stat_ms: float | None = None
    worker: int = -1
    algo_calls: int = 0
    error: str = ""
    endpoint: str = ""

    @classmethod
    def of(cls, result: Result, *, host: str, token: str, version: str) -> LedgerEntry:
        return cls(key=result.key, outcome=result.outcome, host=host, task_type=result.task_type,
                   attempt=result.attempt, cause=result.cause, detections=result.detections, algo_ms=result.algo_ms,
                   e2e_ms=result.e2e_ms, started_at=result.started_at, finished_at=result.finished_at, token=token,
                   version=version, task_id=result.task_id, stat_ms=result.stat_ms, worker=result.worker,
                   algo_calls=result.algo_calls, error=result.error, endpoint=result.endpoint)

    def result(self) -> Result:
        """The results line the claiming host writes for it (rebuilt by ``ClusterHost.recover``)."""
        return Result(key=self.key, outcome=self.outcome, task_type=self.task_type, task_id=self.task_id,
                      detections=self.detections, algo_ms=self.algo_ms, e2e_ms=self.e2e_ms, stat_ms=self.stat_ms,
                      worker=self.worker, attempt=self.attempt, algo_calls=self.algo_calls, cause=self.cause,
                      error=self.error, endpoint=self.endpoint, started_at=self.started_at,
                      finished_at=self.finished_at)


class ClusterFigures(msgspec.Struct):
    """What this host saw of the shared queue and ledger (logged at the end, exported as metrics)."""

    fetched: int = 0
    already_counted: int = 0  # delivered again, found in the ledger: acked, not analysed
    late_outcomes: int = 0  # analysed here, but another host's outcome was in the ledger first
    released: int = 0  # fetched, not started, naked at a stop
    published: int = 0
    stream_full: int = 0  # publish batches refused by a full stream
    unrecorded: int = 0  # the ledger could not be reached: handed back unrecorded
    recovered: int = 0  # counted in the ledger by this host's earlier run, journaled at this start
    inherited_counted: int = 0  # found by a new leader's first listings with an outcome in the ledger: not published
    republished: int = 0  # images published from MinIO's notifications while this host led


class ClusterHost:
    """One host's side of the shared work stream and outcome ledger."""

    def __init__(self, cfg: Config, *, link: JetStreamLink | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.name = cfg.cluster.host or socket.gethostname()
        events = MinioRecords(cfg) if cfg.scan.mode == "events" else None  # only minio_nats (the config checks)
        self.link = link or JetStreamLink(cfg.cluster, host=self.name, bucket=cfg.store.bucket, events=events)
        self.clock = clock
        self.figures = ClusterFigures()
        self.give_up: Callable[[], bool] = lambda: False  # the supervisor's "stop forced"
        self._away = Backoff(0.5, 5.0)
        self._retry_at = 0.0
        self._full_until = 0.0
        # published by this host while it led, so its sweeps do not publish them again; bounded (the
        # oldest are forgotten: a key published again is stored once within the duplicate window,
        # and acked as already counted at delivery after it)
        self._published: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._unanswered: set[str] = set()  # back in the backlog after a publish that got no answer
        self.on_event_published: Callable[[ImageRef], None] | None = None  # the leader's expiry: an arrival
        self.intents = Intents(os.path.join(cfg.run.state_dir, "cluster-claims.jsonl"))
        self._versions: dict[str, str] = {}  # image key -> the object version of the delivery it was fetched as
        self._claimed: dict[str, str] = {}  # image key -> the token of its claim, until its line is written
        self._term = 0  # the lease term whose first listings are being looked up in the ledger before publishing
        self._term_listings: int | None = None
        # the leader's cleaner and expiry figures, exported as ``imgworker_cluster_<part>_<name>`` counters
        self.leader_figures: dict[str, msgspec.Struct] = {}

    def start(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Connect; while the NATS server does not answer, wait and try again (as a running host does).

        ``stop`` says a stop was asked for meanwhile: the host then gives up starting (nothing was taken).
        """
        away = Backoff(0.5, 5.0)
        while True:
            try:
                self.link.start()
                break
            except ClusterUnavailable as exc:
                if stop():
                    raise ClusterNotStarted("stopped while waiting for the NATS server (cluster.url) to answer at "
                                            f"start ({exc}); nothing was taken from the cluster") from exc
                wait_s = away.fail()
                if isinstance(exc, ClusterSetupRefused):
                    log.warning("cluster: the NATS server (cluster.url) answered but refused to set up the work "
                                "stream, consumer or buckets (%s): is JetStream on, and does cluster.replicas fit "
                                "its nodes? trying again in %.1f s", exc, wait_s)
                else:
                    log.warning("cluster: the NATS server (cluster.url) does not answer yet (%s); trying again in "
                                "%.1f s", exc, wait_s)
                until = time.monotonic() + wait_s
                while time.monotonic() < until and not stop():
                    time.sleep(0.1)
        log.info("cluster mode: host %s, stream %s, consumer %s, ledger %s", self.name, self.cfg.cluster.stream,
                 self.cfg.cluster.consumer, self.cfg.cluster.ledger_bucket)
        if self.cfg.run.until_idle:
            log.warning("--until-idle (run.until_idle) does not end a cluster host: it runs until stopped "
                        "(SIGTERM); whether the cluster is idle, imgworker report --cluster says")

    def close(self) -> None:
        self.link.close()
        self.intents.close()
        self.figures.republished = getattr(self.link, "republished", 0)
        log.info("cluster: %s", msgspec.structs.asdict(self.figures))

    def leading(self) -> bool:
        return self.link.leading()

    def collector(self) -> ClusterCollector:
        """The metrics of this host's side of the cluster (the leader adds the stream's figures)."""
        return ClusterCollector(self)

    # ----- intake (the leader) ---------------------------------------------------------------

    def can_publish(self) -> bool:
        """Not while the stream was full a moment ago, nor while the server is away."""
        now = self.clock()
        return now >= self._full_until and now >= self._retry_at

    def published(self, key: str) -> bool:
        """This host published the image while it led (intake does not take it in again).

        MinIO's notifications are republished by the link's loop, not by intake: those images count as
        published too, else a sweep would take them into the backlog, where the cleaner would see them
        as never published (``lease`` gives such images up), and publish them again beyond the
        duplicate window (a second message for one image).
        """
        self._take_event_publishes()
        return key in self._published

    def _take_event_publishes(self) -> None:
        events = getattr(self.link, "events_published", None)
        while events:
            ref = events.popleft()
            self._remember(ref.key)
            if self.on_event_published is not None:
                self.on_event_published(ref)

    def _remember(self, key: str) -> None:
        self._published[key] = None
        while len(self._published) > 4 * self.cfg.cluster.max_msgs:
            self._published.popitem(last=False)

    def maybe_published(self, key: str) -> bool:
        """Published, or its publish went unanswered (it may be stored and delivered): never the leader's alone."""
        return self.published(key) or key in self._unanswered

    def unpublished(self, key: str) -> None:
        """Its message left the stream without an outcome (the cleaner withdrew it): intake may take it in again."""
        self._published.pop(key, None)

    def admit(self, backlog: Backlog, *, screen: Callable[[list[ImageRef]], list[ImageRef]] | None = None) -> None:
        """The leader's admission: images from the backlog go to the work stream, not to the local queue.

        ``screen`` (expiry, ``LeaderExpiry.screen``) ends the images not worth publishing and returns the rest.
        """
        self._take_event_publishes()  # every step: the leader's expiry sees those arrivals when they come
        if not self.can_publish():
            return
        refs = backlog.take(PUBLISH_BATCH)
        # a ref restored from a checkpoint has no version (its ledger key would name none): it leaves the
        # backlog, and the next sweep lists it again with its version
        versioned = [ref for ref in refs if ref.mtime or ref.size or ref.etag]
        # an image one of MinIO's notifications brought in meanwhile is in the stream already
        versioned = [ref for ref in versioned if not self.published(ref.key)]
        if versioned and self._inheriting():
            try:
                versioned = self._not_counted(versioned)
            except ClusterUnavailable as exc:
                backlog.put_back(versioned)
                self._unavailable("ledger lookup", exc)
                return
        if versioned and screen is not None:
            versioned = screen(versioned)
        if versioned:
            backlog.put_back(self.publish(versioned))

    def swept(self) -> None:
        """A complete listing ended (the supervisor's ``_after_sweep``): a new term's inheritance runs for two."""
        if self._term_listings is not None:
            self._term_listings += 1

    def _inheriting(self) -> bool:
        """In a lease term's first two complete listings, what intake finds may be what earlier leaders published
        and other hosts counted: this host's own processed set knows only its own outcomes."""
        if self.link.lease_terms != self._term:
            self._term, self._term_listings = self.link.lease_terms, 0
        return self._term_listings is not None and self._term_listings < 2

    def _not_counted(self, refs: list[ImageRef]) -> list[ImageRef]:
        """Those of ``refs`` with no outcome in the ledger; the others are not published again (a new leader would
        otherwise re-send every image the bucket still holds: each one delivered, looked up and acked)."""
        counted = self.link.counted({ref.key: image_version(ref) for ref in refs})
        for key in counted:
            self._published[key] = None
        if counted:
            self.figures.inherited_counted += len(counted)
        return [ref for ref in refs if ref.key not in counted]

    def publish(self, refs: list[ImageRef]) -> list[ImageRef]:
        """Publish taken images to the work stream; return those not published (they go back to the backlog)."""
        try:
            done = self.link.publish(refs)
        except ClusterUnavailable as exc:
            self._unavailable("publish", exc)
            self._unanswered.update(ref.key for ref in refs)  # some may be stored: the server's answer was lost
            return refs
        self._away.reset()
        self.figures.published += done.sent
        for ref in refs[:done.sent]:
            self._remember(ref.key)
            self._unanswered.discard(ref.key)
        if done.deposed:
            self._retry_at = self.clock() + 1.0
        if done.full:
            self.figures.stream_full += 1
            self._full_until = self.clock() + 0.5
            log.info("work stream full (%d messages): intake waits", self.cfg.cluster.max_msgs)
        return refs[done.sent:]

    # ----- dispatch (every host) ----------------------------------------------------------------

    def feed(self, dispatch: Dispatch, sink: OutcomeSink, idle: int) -> None:
        """Fetch no more than ``idle`` images from the shared consumer into the local queue."""
        want = idle - dispatch.pending
        if want <= 0 or self.clock() < self._retry_at:
            return
        try:
            deliveries = self.link.fetch(want)
        except ClusterUnavailable as exc:
            self._unavailable("fetch", exc)
            return
        self._away.reset()
        for delivery in deliveries:
            ref = delivery.ref
            self.figures.fetched += 1
            if delivery.counted:
                self.figures.already_counted += 1
                self._settle(ref.key, term=False)
                continue
            sink.accepted(ref)
            self._versions[ref.key] = image_version(ref)
            if delivery.delivered > self.cfg.worker.max_attempts:
                log.error("%s delivered %d times, its holders lost it each time; giving up on it", ref.key,
                          delivery.delivered)
                sink.finish(Result(key=ref.key, outcome=Outcome.FAILED_WORKER, task_type=ref.task_type,
                                   task_id=ref.task_id, attempt=delivery.delivered - 1,
                                   cause=f"delivered_{delivery.delivered}_times", finished_at=time.time()))
                continue
            dispatch.append(WorkItem(ref=ref, attempt=max(1, delivery.delivered)))

    def release(self, dispatch: Dispatch) -> int:
        """A stop began: the images fetched but not started leave the local queue and are naked; how many."""
        keys = dispatch.pending_keys()
        if not keys:
            return 0
        for key in keys:
            dispatch.withdraw(key)
            self._versions.pop(key, None)
        try:
            self.link.release(keys)
        except ClusterUnavailable as exc:
            log.warning("could not hand back %d fetched images (%s); they come again after AckWait", len(keys), exc)
        self.figures.released += len(keys)
        log.info("handed %d fetched, unstarted images back to the cluster", len(keys))
        return len(keys)

    # ----- the ledger (OutcomeClaims) -------------------------------------------------------------

    def claim(self, result: Result) -> bool:
        """Write the outcome to the ledger if no host did: True if this host's outcome counts.

        While the server is away this waits and retries: a write whose answer was lost may still
        land (the client sends what it buffered once it reconnects), so an unanswered claim is
        never taken for "not written". Each retry recognises its own earlier write by its token.
        Only a forced stop (``give_up``) ends the wait; the image is then handed back unrecorded, and
        its claim stays open in ``intents``: should the write land after all, the next start journals it.

        The claim's intent is fsynced before the write is sent (see ``recover``).
        """
        version = self._versions.pop(result.key, "")
        entry = LedgerEntry.of(result, host=self.name, token=uuid.uuid4().hex, version=version)
        value = msgspec.json.encode(entry)
        self.intents.add(Intent(token=entry.token, key=result.key, version=version, at=self._results_size()))
        backoff = Backoff(0.2, 2.0)
        while True:
            try:
                won = self.link.claim(result.key, version, value) or self._wrote_it(result.key, version, entry.token)
                break
            except ClusterUnavailable as exc:
                if self.give_up():
                    log.error("outcome of %s not recorded: the cluster ledger is unreachable (%s) and the stop is "
                              "forced; it comes again (or, should the write land, is journaled at the next start)",
                              result.key, exc)
                    self.figures.unrecorded += 1
                    self.link.forget(result.key)
                    return False
                wait_s = backoff.fail()
                log.warning("cluster ledger unreachable (%s); recording %s again in %.1f s", exc, result.key, wait_s)
                time.sleep(wait_s)
        if won:
            self._claimed[result.key] = entry.token
        else:
            self.intents.done(entry.token)
            self.figures.late_outcomes += 1
            log.info("%s already has an outcome in the cluster ledger: this host's (%s) is not counted",
                     result.key, result.outcome.value)
            self._settle(result.key, term=False)
        return won

    def ending(self, key: str, version: str) -> None:
        """The leader ends an image it does not hold (the cleaner gives it up): its claim names this version."""
        self._versions[key] = version

    def _wrote_it(self, key: str, version: str, token: str) -> bool:
        """The entry that is there is this claim's own (its first try's answer was lost on the way)."""
        stored = self.link.ledger_value(key, version)
        return stored is not None and msgspec.json.decode(stored, type=LedgerEntry).token == token

    def settled(self, result: Result) -> None:
        """Its outcome is in the ledger and in this host's results: its message leaves the stream.

        The leader's intake no longer needs to skip it as published: it is in this host's processed
        set now, which a sweep must see it in (a key a sweep skips is pruned as gone).
        """
        self._published.pop(result.key, None)
        token = self._claimed.pop(result.key, None)
        if token is not None:
            self.intents.done(token)
        self._settle(result.key, term=result.outcome is Outcome.FAILED_WORKER)

    def recover(self, sink: Recovering) -> int:
        """At start, before any new work: journal the outcomes this host counted in the ledger and never wrote.

        Only the host whose write created a ledger entry writes its results line, so an entry whose
        creator died before its line (SIGKILL or power between the two, a results write that
        failed, a forced stop after a write whose answer was lost) would have no line anywhere and
        its actions never done: another host's delivery finds it counted and only acks. The creator
        restarts under the same host name and state directory (a service manager restarts it), and
        here writes those lines from the entries and plans their actions; how many.

        Which entries: this host's open claims in ``intents`` (fsynced before each write was sent),
        not a scan of the ledger: listing the ledger's keys and reading each entry is O(ledger) per
        start, the intents file is O(claims in the last moments before the stop). A claim is
        recovered when the ledger holds its own entry (same token) and the results file holds no
        line for it after the claim's ``at``; otherwise it was not written, or another host's won.
        """
        open_claims = self.intents.load()
        recovered = 0
        if open_claims:
            journaled = self._journaled_since(min(i.at for i in open_claims))
            backoff = Backoff(0.2, 2.0)
            for intent in open_claims:
                while True:
                    try:
                        stored = self.link.ledger_value(intent.key, intent.version)
                        break
                    except ClusterUnavailable as exc:
                        if self.give_up():
                            raise
                        wait_s = backoff.fail()
                        log.warning("cluster ledger unreachable (%s); looking up %s again in %.1f s", exc,
                                    intent.key, wait_s)
                        time.sleep(wait_s)
                entry = None if stored is None else msgspec.json.decode(stored, type=LedgerEntry)
                if entry is not None and entry.token == intent.token \
                        and (entry.key, entry.finished_at) not in journaled:
                    log.warning("%s: its outcome (%s) is in the cluster ledger as this host's but has no results "
                                "line (the host stopped in between): writing it now", entry.key, entry.outcome.value)
                    sink.recovered(entry.result())
                    recovered += 1
                self.intents.open.pop(intent.token, None)
        self.intents.compact()
        self.figures.recovered += recovered
        return recovered

    def _journaled_since(self, offset: int) -> set[tuple[str, float]]:
        """(key, finished_at) of this host's result lines from ``offset`` on."""
        path = self.cfg.results_path
        if not os.path.exists(path) or offset > os.path.getsize(path):
            offset = 0
        return {(r.key, r.finished_at) for r in read_results(path, offset=offset)} if os.path.exists(path) else set()

    def _results_size(self) -> int:
        try:
            return os.path.getsize(self.cfg.results_path)
        except FileNotFoundError:
            return 0

    def _settle(self, key: str, *, term: bool) -> None:
        try:
            self.link.settle(key, term=term)
        except ClusterUnavailable as exc:  # redelivered later, then acked as already counted
            log.warning("could not ack %s (%s); it will be acked as already counted", key, exc)

    def _unavailable(self, what: str, exc: Exception) -> None:
        wait_s = self._away.fail()
        self._retry_at = self.clock() + wait_s
        log.warning("NATS %s failed (%s); trying again in %.1f s", what, exc, wait_s)


class ClusterCollector:
    """Prometheus figures of one host's side of the cluster; the leader also exports the stream's."""

    def __init__(self, host: ClusterHost) -> None:
        self.host = host

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.host.figures.republished = getattr(self.host.link, "republished", 0)
        for name, value in msgspec.structs.asdict(self.host.figures).items():
            yield CounterMetricFamily(f"imgworker_cluster_{name}", f"Cluster mode: {name.replace('_', ' ')}.",
                                      value=value)
        for part, struct in self.host.leader_figures.items():
            for name, value in msgspec.structs.asdict(struct).items():
                yield CounterMetricFamily(f"imgworker_cluster_{part}_{name}",
                                          f"Cluster mode, the leader's {part}: {name.replace('_', ' ')}.", value=value)
        leading = self.host.leading()
        yield GaugeMetricFamily("imgworker_cluster_leader", "1 on the host holding the intake lease.", value=leading)
        if not leading:
            return
        try:
            figures = self.host.link.figures()
        except ClusterUnavailable:
            return
        exported = {"stream_messages": ("stream_depth",
                                        "Messages in the work stream (queued or delivered, not acked)."),
                    "consumer_pending": ("consumer_pending", "Messages not yet delivered."),
                    "consumer_ack_pending": ("consumer_ack_pending",
                                             "Messages delivered and not yet acked, on any host."),
                    "consumer_redelivered": ("consumer_redelivered",
                                             "Messages delivered more than once and not yet acked.")}
        for figure, value in figures.items():
            name, doc = exported[figure]
            yield GaugeMetricFamily(f"imgworker_cluster_{name}", doc, value=value)
