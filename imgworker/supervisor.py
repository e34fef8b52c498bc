"""The supervisor: wires the owners together and runs the loop.

Data flow (one direction)::

    Intake (watcher events, lister sweeps ─▶ ledger.filter_new ─▶ backlog, fair across directories)
        ─▶ Dispatch (bounded queue per task type) ─▶ InFlight (lane L holds item I, its deadline)
        ─▶ Pool (worker process i runs lanes, own pipe) ◀── Answer (lane) / Exit (process) ── Pool
        ─▶ Recorder.finish: results journal (written through) ─▶ Stats, Ledger ─▶ Janitor (actions)
    after each complete sweep: Ledger prune, CleanerPass ─▶ Janitor deletes, ExpiryGuard drops (Recorder.drop)

Who owns what: ``Intake`` finds images; ``Dispatch`` holds what waits; ``InFlight`` knows which
lane holds what, since when, and what is overdue (``_send`` records "lane L took item I",
``_lane_done`` "lane L is done"); ``Pool`` spawns, stops and kills worker processes and knows
which lanes are idle; ``Janitor`` makes every change in the store; ``CleanerPass`` and
``ExpiryGuard`` decide what retention gives up; ``Ledger`` owns the processed set and its
flushes; ``RunLock`` and ``ResultsJournal`` own durability; ``Recorder`` is the one place an
image gets its terminal outcome and the one owner of the run's figures (``snapshot()``). The
supervisor decides what an answer or a death means for an image, and installs the signal
handlers. One clock (``clock``, monotonic) times the loop and every owner it passes it to; results'
timestamps are wall-clock. ``step()`` is one iteration; ``Parts`` lets a test drive it with an in-memory store,
an inline pool and an inline lister, without processes or servers.

Cluster mode (``[cluster]``) adds ``ClusterHost``, a second queue and a second ledger behind these
owners (see ``imgworker.cluster``): the lease holder's intake publishes instead of queueing,
``feed_idle`` fetches no more than the idle lanes, and the recorder claims each outcome in the
shared ledger first. Expiry is then decided on the leader (``LeaderExpiry``: at publish and after
each complete listing); ``ExpiryGuard.drops`` stays every host's check at dispatch.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

import msgspec

from . import actions
from .cleaner import CleanerStats, Plan, StoredImage
from .cluster.expiry import LeaderExpiry
from .cluster.host import ClusterHost
from .config import Config
from .dispatch import Dispatch
from .endpoints import EndpointPool
from .inflight import Held, InFlight
from .intake import EventSource, Intake, ListingSource, SweepEnd
from .health import Health
from .janitor import Janitor
from .journal import ResultsJournal, RunLock
from .ledger import Ledger, LocalBackend, Restored
from .lister import InlineLister, Lister
from .logs import current_settings, drain_child_logs
from .memstore import MemoryStore
from .outcomes import ImageRef, Outcome, Result, WorkItem
from .ports import ObjectStore, ProcessedSetBackend
from .pool import Answer, Event, Exit, InlinePool, Pool, ProcessPool
from .proctitle import set_title
from .recorder import Gauges, Recorder, Snapshot
from .retention import CleanerPass, ExpiryGuard
from .progress import Progress
from .scanner import parse_task
from .stats import Report, Stats
from .worker import ItemProcessor, answer, internal_error

log = logging.getLogger(__name__)

#: The longest the loop blocks with nothing ready: bounds how late progress, stop conditions and
#: the janitor's finished jobs are looked at.
_MAX_WAIT_S = 0.5


@dataclass(frozen=True)
class Parts:
    """The collaborators that touch processes or the network; swapped for in-memory ones in tests."""

    store: ObjectStore
    make_lister: Callable[[], ListingSource]
    pool: Pool
    ledger_backend: ProcessedSetBackend | None = None
    janitor_inline: bool = False
    make_watcher: Callable[[int], EventSource] | None = None


def process_parts(cfg: Config) -> Parts:
    """Real parts: the minio store, a lister process, worker processes, a Manager, a watcher for events."""
    from .events import Watcher
    from .store import Store

    settings = current_settings()
    return Parts(store=Store(cfg.store, cfg.credentials, read_timeout_s=cfg.store.list_timeout_s),
                 make_lister=lambda: Lister(cfg, settings), pool=ProcessPool(cfg, settings),
                 make_watcher=lambda since_ns: Watcher(cfg, settings, since_ns))


def memory_parts(cfg: Config, store: MemoryStore, algo: Any, *, die_on: Callable[[WorkItem], bool] = lambda i: False,
                 make_watcher: Callable[[int], EventSource] | None = None) -> Parts:
    """In-memory parts: everything runs in this process, deterministically (see memstore)."""
    def process(lane: int, item: WorkItem) -> Any:
        processor = ItemProcessor(cfg, store=store, algo=algo, worker_id=lane, sleep=lambda s: None)
        return answer(processor, item, retiring=False)

    return Parts(store=store, make_lister=lambda: InlineLister(cfg, store),
                 pool=InlinePool(cfg.concurrency, process, die_on), ledger_backend=LocalBackend(), janitor_inline=True,
                 make_watcher=make_watcher)


def _cluster_host(cfg: Config, clock: Callable[[], float]) -> ClusterHost | None:
    """Cluster mode's side of the shared queue and ledger, or None on one host (nats is imported only then, by its link)."""
    return ClusterHost(cfg, clock=clock) if cfg.cluster.enabled else None


def _cluster_cleaner(cfg: Config, host: ClusterHost, sup: Supervisor) -> CleanerPass:
    """Cluster mode's cleaner: the intake leader's passes, with each image's status across hosts."""
    from .cluster.retention import ClusterCleaner

    cleaning = ClusterCleaner(cfg, host=host, backlog=sup.intake.backlog, dispatch=sup.dispatch, inflight=sup.inflight,
                              ledger=sup.ledger, sink=sup.recorder, cleaner=sup.recorder.cleaner)
    host.leader_figures["cleaner"] = cleaning.fence
    return cleaning


def _leader_expiry(cfg: Config, host: ClusterHost, sup: Supervisor) -> LeaderExpiry | None:
    """Cluster mode's expiry elsewhere, decided by the intake leader (``cluster.expiry``); None without its rules."""
    from .cluster.retention import ClusterCleaner

    if not sup.expiry.expiry.enabled:
        return None
    assert isinstance(sup.cleaning, ClusterCleaner)
    expiry = LeaderExpiry(estimator=sup.expiry.expiry, host=host, fence=sup.cleaning, backlog=sup.intake.backlog,
                          stats=sup.recorder.stats, clock=sup.clock)
    host.leader_figures["expiry"] = expiry.figures
    return expiry


class Stopping:
    """Signals and stop conditions set flags here; the loop acts on them."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.draining = False
        self.forced = False
        self.deadline = 0.0
        self.reason = ""
        self.signals = 0
        self.announced = (False, False)  # (draining, forced) already logged

    def request(self, reason: str, grace_s: float, *, force: bool = False) -> bool:
        """Stop intake and drain (or, forced, stop at once); True the first time."""
        first = not self.draining
        if first:
            self.draining, self.reason, self.deadline = True, reason, self.clock() + grace_s
        self.forced = self.forced or force
        return first


class Supervisor:
    """Runs the pipeline; ``step()`` is one iteration of the loop and can be driven by tests."""

    def __init__(self, cfg: Config, *, intake_done: Callable[[], bool] = lambda: True, show_progress: bool = True,
                 on_result: Callable[[Result], None] | None = None, parts: Parts | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        parts = parts or process_parts(cfg)
        self.parts = parts
        self.store = parts.store
        self.pool = parts.pool
        self.inflight = InFlight(cfg.item_deadline_s, clock)
        self.cluster = _cluster_host(cfg, clock)
        self.dispatch = Dispatch(cfg.dispatch, clock, is_held=self._held_or_published)
        self.endpoints = EndpointPool(cfg.algo, clock, lanes=cfg.concurrency)
        self.progress = Progress(cfg.run.progress_interval_s, log_interval_s=cfg.run.progress_log_interval_s,
                                 enabled=show_progress)
        self.health = Health(cfg.run.stall_after_s, clock)
        self.lock = RunLock(cfg.run.state_dir)
        self.ledger = Ledger(os.path.join(cfg.run.state_dir, "state.json"), cfg.results_path, parts.ledger_backend)
        self.intake = Intake(cfg, ledger=self.ledger, dispatch=self.dispatch, make_lister=parts.make_lister,
                             # in cluster mode the leader's link reads the events: no watcher process
                             make_watcher=None if self.cluster is not None else parts.make_watcher,
                             intake_done=intake_done, clock=clock)
        self.recorder = Recorder(cfg, ledger=self.ledger, waiting=self.intake, on_result=on_result,
                                 claims=self.cluster)
        self.cleaning = CleanerPass(cfg, dispatch=self.dispatch, inflight=self.inflight, ledger=self.ledger,
                                    sink=self.recorder, cleaner=self.recorder.cleaner) if self.cluster is None \
            else _cluster_cleaner(cfg, self.cluster, self)
        self.expiry = ExpiryGuard(cfg, dispatch=self.dispatch, sink=self.recorder, stats=self.recorder.stats,
                                  clock=clock)
        # the leader sees every arrival; it shares the estimator with its own check at dispatch
        self.leader_expiry = None if self.cluster is None else _leader_expiry(cfg, self.cluster, self)
        if self.cluster is not None and self.leader_expiry is not None:  # MinIO's events arrive through the link
            self.cluster.on_event_published = self.leader_expiry.event_published
        self.journal: ResultsJournal | None = None
        self.janitor: Janitor | None = None
        self.stopping = Stopping(clock)
        if self.cluster is not None:
            self.cluster.give_up = lambda: self.stopping.forced
        self._started = clock()
        self._next_checkpoint = 0.0
        self._sampled_at = clock()
        self._starved = False

    # ----- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Lock the state directory, check the store, restore state, start the children."""
        set_title("supervisor")
        self.lock.acquire()
        try:
            self.store.check()
            if self.cluster is not None:
                self.cluster.start(stop=lambda: self.stopping.draining)
            restored = self.ledger.start()
            self.journal = ResultsJournal(self.cfg.results_path)
            self.janitor = Janitor(self.store, sync=self.journal.sync, batch_size=self.cfg.retention.batch_size,
                                   inline=self.parts.janitor_inline)
            self.recorder.open(self.journal, self.janitor)
            if self.cluster is not None:  # before any new work: outcomes counted here and never journaled
                self.cluster.recover(self.recorder)
            resumed = self._resume(restored)
            self.intake.start(restored.intake)
            self.pool.start()
        except BaseException:
            self._close_durable()
            raise
        self._started = self._sampled_at = self.clock()
        self._next_checkpoint = self._started + self.cfg.run.checkpoint_interval_s
        log.info("started: %d processes x %d lanes, bucket %s, prefix %r, %d processed known, %d pending resumed",
                 self.cfg.worker.count, self.cfg.worker.threads, self.cfg.store.bucket, self.cfg.store.prefix, self.ledger.size(), resumed)

    def run(self) -> Report:
        """Start, loop until a stop condition, shut down in order; return the report."""
        previous = self._install_signals()  # first: a signal during start-up drains, it does not kill
        try:
            try:
                self.start()
                while not self.finished():
                    self.step()
            finally:
                self.shutdown()
            return self.report()
        finally:
            self._restore_signals(previous)

    @contextlib.contextmanager
    def running(self, *, drain: bool = True) -> Iterator[Supervisor]:
        """Started, then stopped in order whatever happens inside: drained (or, on an error, forced), shut down.

        For callers that drive ``step()`` themselves (tests, benchmarks, ``tune``) instead of ``run()``.
        """
        self.start()
        try:
            yield self
            if drain:
                self.request_stop("driver done")
                self.step_until(self.finished)
        finally:
            if not self.finished():
                self.request_stop("driver stopped", force=True)
            self.shutdown()

    def step_until(self, done: Callable[[], bool], *, timeout_s: float | None = None,
                   max_steps: int | None = None) -> bool:
        """Step until ``done()``; False if ``timeout_s`` or ``max_steps`` ran out first.

        ``timeout_s`` is real seconds (the driver's patience), whatever clock the supervisor runs on.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        steps = 0
        while not done():
            if (max_steps is not None and steps >= max_steps) or (deadline is not None and time.monotonic() > deadline):
                return False
            self.step()
            steps += 1
        return True

    def shutdown(self) -> None:
        """Stop every worker process against one deadline, stop the lister, finish store jobs, write state."""
        forced = self.stopping.forced
        self._stage("stopping worker processes", lambda: self._stop_pool(0.2 if forced else 1.0))
        if self.cluster is not None:
            self._stage("leaving the cluster", self._leave_cluster)
        self._stage("stopping the lister", self.intake.close)
        if self.janitor is not None:
            janitor = self.janitor
            self._stage("finishing store jobs",
                        lambda: self.recorder.janitor_done(janitor.close(time.monotonic() + (0.5 if forced else 3.0))))
        if self.journal is not None and not self.journal.closed:
            self._stage("writing state", self.checkpoint)
        self._stage("closing files", self._close_durable)
        self._stage("looking at the figures", self._observe_health)
        drain_child_logs()  # what the children logged before they left, before the report
        self.progress.close()

    def _stop_pool(self, grace_s: float) -> None:
        # the pool (like the janitor's thread) blocks in real time: its stop deadline is real time
        for event in self.pool.stop(time.monotonic() + grace_s, list(self.inflight)):
            self._on_event(event)

    @staticmethod
    def _stage(what: str, action: Callable[[], object]) -> None:
        """One shutdown stage; a failure is logged and the next stages still run."""
        try:
            action()
        except Exception:
            log.exception("shutdown: %s failed", what)

    def _leave_cluster(self) -> None:
        """Hand back what was fetched and not started, nak what is still held, give up the lease."""
        assert self.cluster is not None
        self.recorder.handed_back(self.cluster.release(self.dispatch))
        self.cluster.close()

    def _held_or_published(self, key: str) -> bool:
        """Held by a lane, or (cluster leader) published to the work stream: intake does not take it again."""
        return self.inflight.is_held(key) or (self.cluster is not None and self.cluster.published(key))

    def _close_durable(self) -> None:
        if self.journal is not None:
            self.journal.close()
        self.ledger.stop()
        self.lock.release()

    @property
    def stats(self) -> Stats:
        """The run's running totals (kept by the recorder)."""
        return self.recorder.stats

    @property
    def cleaner(self) -> CleanerStats:
        return self.recorder.cleaner

    @property
    def pending(self) -> int:
        """Images waiting in the queue."""
        return self.dispatch.pending

    @property
    def in_flight(self) -> int:
        """Images held by lanes."""
        return len(self.inflight)

    def snapshot(self) -> Snapshot:
        """The run's figures at this instant, typed: what ``/metrics``, progress and the report read."""
        gauges = Gauges(queue_depth=self.pending, in_flight=self.in_flight,
                        backlog=len(self.intake.backlog), processes_alive=self.pool.alive(),
                        events_received=self.intake.events_received, scans_completed=self.intake.scans_completed,
                        last_scan_s=self.intake.last_scan_s)
        return self.recorder.snapshot(gauges, wall_s=self.clock() - self._started,
                                      endpoints=self.endpoints.figures(), limits=self.endpoints.limit_figures())

    def report(self) -> Report:
        return self.snapshot().report

    # ----- the loop ------------------------------------------------------------------

    def step(self) -> None:
        """One iteration: intake, dispatch, wait for answers or deaths, deadlines, janitor, checkpoint."""
        now = self.clock()
        self._check_stop_conditions(now)
        if self.cluster is not None and self.stopping.draining:
            self.recorder.handed_back(self.cluster.release(self.dispatch))  # others start them now
        self.intake_step()
        if not self.stopping.draining:
            self.feed_idle()
        self._sample_input(self.clock())
        self._fail_waited_out(now)
        events, _ = self.pool.wait(self._wait_timeout(now), self.intake.waitables())
        for event in events:
            self._on_event(event)
        self._kill_overdue(self.clock())
        assert self.janitor is not None
        self.recorder.janitor_done(self.janitor.collect())
        if self.clock() >= self._next_checkpoint:
            self.checkpoint()
        self.progress.maybe_show(self.snapshot)
        if self.health.due():
            self._observe_health()

    def _observe_health(self) -> None:
        self.health.observe(self.snapshot(), stopping=self.stopping.draining)

    def healthz(self) -> tuple[int, dict[str, Any]]:
        """What ``/healthz`` answers (see ``health``); safe to call from another thread."""
        return self.health.verdict()

    def finished(self) -> bool:
        s = self.stopping
        if s.draining:
            self._announce_stop()  # a signal only set the flags: say so before the loop ends
        if s.forced:
            return True
        return s.draining and (self.in_flight == 0 or self.clock() >= s.deadline)

    @property
    def draining(self) -> bool:
        return self.stopping.draining

    def request_stop(self, reason: str, *, force: bool = False) -> None:
        """Stop intake and drain in-flight work (or, forced, stop at once)."""
        self.stopping.request(reason, self.cfg.run.grace_s, force=force)
        self._announce_stop()

    def _announce_stop(self) -> None:
        """Log a stop once it is requested (a signal handler only sets the flags)."""
        s = self.stopping
        if s.draining and not s.announced[0]:
            log.info("stopping (%s): no new items, letting %d in flight finish within %.0f s", s.reason,
                     self.in_flight, self.cfg.run.grace_s)
        if s.forced and not s.announced[1]:
            log.warning("stopping at once (%s): %d items in flight are resumed at the next start", s.reason,
                        self.in_flight)
        s.announced = (s.draining, s.forced)

    def _check_stop_conditions(self, now: float) -> None:
        if self.stopping.draining:
            self._announce_stop()
            return
        # a cluster host runs until stopped: its own idle says nothing of the cluster's (the leader would
        # stop as soon as it had published, before any host took its images)
        until_idle = self.cfg.run.until_idle and self.cluster is None
        if self.cfg.run.duration_s and now - self._started >= self.cfg.run.duration_s:
            self.request_stop("duration reached")
        elif until_idle and self._idle():
            self.request_stop("idle")
        elif until_idle and self.pending == 0 and self.in_flight == 0:
            self.intake.reconcile_when_drained()

    def _idle(self) -> bool:
        return self.intake.idle() and self.pending == 0 and self.in_flight == 0

    def _wait_timeout(self, now: float) -> float:
        if self.stopping.draining:
            return 0.2
        wake = [now + _MAX_WAIT_S, self._next_checkpoint, self.intake.wake_at() or now + _MAX_WAIT_S,
                self.inflight.next_deadline or now + _MAX_WAIT_S]
        return max(0.0, min(wake) - now)

    # ----- intake --------------------------------------------------------------------

    def intake_step(self) -> None:
        if self.cluster is not None and not self.cluster.leading():
            return  # one intake runs in a cluster: the lease holder's
        end = self.intake.step(draining=self.stopping.draining)
        if not self.stopping.draining:
            self._admit()
        if end is not None:
            self._after_sweep(end)

    def _admit(self) -> None:
        """Move images from the backlog into the queue, as room (or the overflow policy) allows."""
        if self.cluster is not None:
            # to the shared work stream, less what would expire anyway; taken in where a lane fetches it
            self.cluster.admit(self.intake, screen=None if self.leader_expiry is None else self.leader_expiry.screen)
            return
        block = self.cfg.dispatch.overflow == "block"
        refs = self.intake.take(self.dispatch.room if block else len(self.intake.backlog))
        for n, ref in enumerate(refs):
            self.recorder.accepted(ref)
            self.expiry.observe(ref)
            try:
                for dropped in self.dispatch.offer(ref):
                    self.recorder.drop(dropped, Outcome.DROPPED_BACKLOG, "queue_full")
            except BaseException:
                self.intake.put_back(refs[n + 1:])  # taken but never offered: the checkpoint saves them
                raise

    def _after_sweep(self, end: SweepEnd) -> None:
        if end.complete and end.full:
            if self.cluster is not None:
                self.cluster.swept()
            pruned = self.ledger.end_sweep(events=self.cfg.scan.mode == "events",
                                           position_ns=self.intake.events_position)
            if pruned:
                log.info("processed set: pruned %d entries whose objects are gone", pruned)
            self.recorder.listed(end.listed)
            if self.cfg.retention.enabled and not self.stopping.draining:  # a stop is not held up by deletes
                self.clean(end.inventory)
        self.expiry.sample_rate()
        self.expiry.drop_doomed()
        if end.complete and self.leader_expiry is not None and not self.stopping.draining:
            self.leader_expiry.drop_doomed()  # what the leader holds back or withdraws

    # ----- store jobs ------------------------------------------------------------------

    def clean(self, inventory: list[StoredImage]) -> Plan:
        """One cleaning pass over a complete listing (see retention.CleanerPass)."""
        assert self.janitor is not None
        plan, done = self.cleaning.run(inventory, self.janitor)
        self.recorder.janitor_done(done)
        return plan

    # ----- dispatch --------------------------------------------------------------------

    def feed_idle(self) -> None:
        """Give idle lanes the oldest item of any task type that has an endpoint now.

        Images whose no-endpoint budget ran out are failed first, so none of them carries a probe.
        """
        self._fail_waited_out(self.clock())
        if self.cluster is not None:
            self.cluster.feed(self.dispatch, self.recorder, self.pool.idle_lanes())
        blocked: set[str] = set()

        def usable(kind: str) -> bool:
            return kind not in blocked

        while self.pool.idle_lanes():
            item = self.dispatch.peek(usable)
            if item is None:
                return
            if self.expiry.drops(item):
                continue
            kind = item.ref.task_type
            endpoints = self.endpoints.choose(kind)
            if endpoints is None:
                blocked.add(kind)  # down or busy: other task types still go
                continue
            probe = self.endpoints.is_probe(endpoints)
            if probe and item.waits:
                item = self._least_waited_first(kind)
            sent = self._send(kind, endpoints, probe=probe)
            assert sent.ref.key == item.ref.key

    def _send(self, kind: str, endpoints: tuple[str, ...], *, probe: bool) -> WorkItem:
        """The next queued item of ``kind`` goes to an idle lane: the one place a lane takes an item."""
        queued = self.dispatch.pop_next(lambda k: k == kind)
        assert queued is not None
        lane = self.pool.take_idle_lane()
        sent = self.inflight.take(lane, queued.item, queued_at=queued.queued_at, endpoints=endpoints, probe=probe)
        self.endpoints.dispatched(endpoints)
        self.pool.send(lane, sent)
        self.recorder.dispatched(sent.ref)
        return sent

    def _sample_input(self, now: float) -> None:
        """Time since the last sample counts as input-starved if lanes then sat idle with the queue empty."""
        self.recorder.sampled(now - self._sampled_at, starved=self._starved)
        self._sampled_at = now
        self._starved = not self.stopping.draining and self.pending == 0 and self.pool.idle_lanes() > 0

    def _lane_done(self, lane: int) -> Held | None:
        """Lane ``lane`` is done with its item (answered, lost, or put back): the one place that says so."""
        held = self.inflight.done(lane)
        self.pool.return_lane(lane)  # idle again, unless its process is leaving or gone
        return held

    def _kill_overdue(self, now: float) -> None:
        """Kill the processes whose lanes hold an item past its deadline."""
        overdue = self.inflight.overdue(now)
        if overdue and self.pool.kill_overdue(overdue):
            self.inflight.look_again(now)  # an answer is waiting, maybe the overdue one's: read it first

    def _least_waited_first(self, kind: str) -> WorkItem:
        """Move the oldest queued item of ``kind`` that waited least to the front, and return it.

        A probe should test the service, not an image that already failed on it: an image that
        makes the service fail by itself would otherwise carry every probe and keep the route down.
        """
        queued = list(self.dispatch.waiting(kind))
        item, queued_at = min(queued, key=lambda pair: pair[0].waits)
        self.dispatch.withdraw(item.ref.key)
        self.dispatch.requeue_front(item, queued_at=queued_at)
        return item

    def _fail_waited_out(self, now: float) -> None:
        """An image whose route has no healthy endpoint waits up to its own budget, then fails."""
        budget = self.cfg.algo.no_endpoint_budget_s
        for kind in self.dispatch.task_types():
            since = self.endpoints.down_since(kind)
            if not since:
                continue
            # not only the head: images put back after failing (or moved up to carry a probe) leave
            # the queue out of queued_at order
            expired = [item for item, queued_at in self.dispatch.waiting(kind) if now - max(queued_at, since) >= budget]
            for item in expired:
                self.recorder.drop(item.ref, Outcome.FAILED_ALGO, "no_healthy_endpoint", algo_calls=item.calls)
            if expired:
                log.warning("%d %r images waited %.0f s for a healthy algorithm endpoint; failed", len(expired),
                            kind, budget)

    # ----- answers and deaths ----------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Answer):
            self._on_answer(event)
        elif isinstance(event, Exit):
            self._on_exit(event)

    def _on_answer(self, event: Answer) -> None:
        lane = event.lane
        held = self.inflight.of_lane(lane)
        if held is None:  # a worker bug: nothing to end, and the lane must not be idle twice
            log.error("lane %d answered without holding an item; ignored", lane)
            return
        item, reply = held.item, event.reply
        met_outage = self.endpoints.finished(held.endpoints, reply.calls, sent_at=held.sent_at, probe=held.probe)
        result = reply.result
        if reply.undecodable or result.key != item.ref.key:
            log.error("lane %d: reply for %s could not be used (%s)", lane, item.ref.key,
                      reply.undecodable or f"it names {result.key!r}")
            result = internal_error(item, lane, "unusable reply")
        elif met_outage and result.outcome is Outcome.FAILED_ALGO and (held.probe or not item.waits):
            self._wait_for_endpoint(lane, item, result)
            return
        e2e_ms = (self.clock() - held.sent_at) * 1000.0
        self.recorder.finish(msgspec.structs.replace(result, e2e_ms=e2e_ms, algo_calls=result.algo_calls + item.calls))
        self._lane_done(lane)  # only once the outcome is written: until then it is in flight

    def _wait_for_endpoint(self, lane: int, item: WorkItem, result: Result) -> None:
        """Put an item back at the head of its queue: its calls failed because its endpoint is down.

        It was the probe, or it was in flight as the outage began; it is not charged an attempt and
        waits within its no-endpoint budget like the images that never left the queue. An image that
        meets an outage again, not as the probe, after having waited ends ``failed_algo`` as usual:
        it may be the image that makes the service fail. The calls it made go with it, to be counted
        on its final line.
        """
        log.info("lane %d: %s waits for a healthy algorithm endpoint (%s)", lane, item.ref.key, result.cause)
        self.recorder.retried()
        self._requeue(lane, msgspec.structs.replace(item, endpoints=(), waits=item.waits + 1,
                                                    calls=item.calls + result.algo_calls))

    def _on_exit(self, event: Exit) -> None:
        lost = 0
        for lane in event.lanes:
            held = self.inflight.of_lane(lane)
            if held is not None:
                lost += 1
                self.endpoints.finished(held.endpoints, [], probe=held.probe)
                self._on_lost_item(held.item, lane, event)
        wait_s = 0.0 if self.stopping.draining else self.pool.respawn(event.process)
        if event.overdue:
            self.recorder.process_exited("deadline_kill")
        elif event.retiring and not lost:
            self.recorder.process_exited("recycled")
        else:
            self.recorder.process_exited("restarted", backed_off=wait_s > 0)
            self._report_death(event, lost, wait_s)

    def _report_death(self, event: Exit, lost: int, wait_s: float) -> None:
        """Warn of an unexpected exit; one that died before answering anything is replaced after a backoff."""
        if not wait_s:
            log.warning("worker process %d exited unexpectedly (exit code %s) holding %d images; starting a replacement",
                        event.process, event.code, lost)
            return
        log.warning("worker process %d exited before answering anything (exit code %s) holding %d images; "
                    "starting a replacement in %.1f s", event.process, event.code, lost, wait_s)

    def _on_lost_item(self, item: WorkItem, lane: int, event: Exit) -> None:
        """A lane's process died holding an item (or was killed past a deadline): retry, or give up.

        An item whose process was killed for another lane's deadline is retried once without using up
        one of its attempts: nothing says it was at fault. After any other death, or a second such kill,
        every item held is charged.
        """
        ref = item.ref
        if lane in event.overdue:
            cause = "deadline"
            log.warning("lane %d held %s past its %.0f s deadline; killed its process", lane, ref.key,
                        self.cfg.item_deadline_s)
        elif event.overdue and not item.spared:
            self.recorder.retried()
            self._requeue(lane, msgspec.structs.replace(item, endpoints=(), spared=True))
            return
        elif event.overdue:
            cause = "deadline_of_another_lane"
        else:
            cause = f"worker_died_exit_{event.code}"
        if item.attempt >= self.cfg.worker.max_attempts:
            log.error("lane %d: %s lost %d times (%s); giving up on it", lane, ref.key, item.attempt, cause)
            self.recorder.finish(Result(key=ref.key, outcome=Outcome.FAILED_WORKER, task_type=ref.task_type,
                                task_id=ref.task_id, worker=lane, attempt=item.attempt, cause=cause,
                                algo_calls=item.calls, finished_at=time.time()))
            self._lane_done(lane)
            return
        self.recorder.retried()
        self._requeue(lane, msgspec.structs.replace(item, endpoints=(), attempt=item.attempt + 1))

    def _requeue(self, lane: int, item: WorkItem) -> None:
        """The lane gives its item back to the head of the queue; it keeps the time it was first queued."""
        held = self._lane_done(lane)
        self.dispatch.requeue_front(item, queued_at=held.queued_at if held is not None else None)

    # ----- state -----------------------------------------------------------------------

    def checkpoint(self) -> None:
        """fsync the results, then write the processed set, the unfinished keys, the watermark, the owed actions."""
        assert self.journal is not None and self.janitor is not None
        synced = self.journal.sync()  # every line before it is on disk, and its key in the processed set
        watermark = self.janitor.watermark(synced)
        owed = self.janitor.owed()  # after the watermark: an action given up in between is counted in both
        self.ledger.save(synced, self.inflight.held_keys() + self.dispatch.pending_keys(),
                         self.intake.position(), owed, actions_from=watermark)
        self._next_checkpoint = self.clock() + self.cfg.run.checkpoint_interval_s

    def _resume(self, restored: Restored) -> int:
        """Queue the unfinished keys of the last run; redo the actions past the watermark, and those owed."""
        assert self.janitor is not None
        if self.cluster is not None:  # unfinished images are still in the work stream, or redelivered
            restored = msgspec.structs.replace(restored, pending=[])
        new = self.ledger.filter_new(restored.pending)
        resumed = [k for k in restored.pending if k in new]
        for key in resumed:
            task_type, task_id = parse_task(key, self.cfg.store.prefix)
            ref = ImageRef(key=key, task_type=task_type, task_id=task_id)
            self.recorder.accepted(ref)
            self.dispatch.append(WorkItem(ref=ref))
        readmitted = new.intersection(restored.readmitted)
        if readmitted:
            log.info("%d images re-admitted by `imgworker retry` are analysed again", len(readmitted))
            self.recorder.readmitted(len(readmitted))
        keys = [result.key for _, result in restored.redo]
        known = set(keys) - self.ledger.filter_new(keys) if keys else set()
        # a key pruned before the crash names an object that is gone, or a new upload under that name
        jobs = [job for line, result in restored.redo if result.key in known
                for job in actions.plan(self.cfg, result, line=line)]
        if jobs:
            log.info("redoing %d result actions written after the last checkpoint", len(jobs))
            self.janitor.submit(jobs)
        self._redo_owed(restored)
        return len(resumed)

    def _redo_owed(self, restored: Restored) -> None:
        """Submit again the actions the last run gave up (they stay owed until done).

        A delete is redone only while its key is still in the processed set: a key pruned since (its
        object was gone from two complete listings) may name a new upload, which must not be deleted.
        """
        assert self.janitor is not None
        keys = [entry.key for entry, _ in restored.owed]
        known = set(keys) - self.ledger.filter_new(keys) if keys else set()
        jobs = [msgspec.structs.replace(job, owed=True) for entry, result in restored.owed
                for job in actions.plan(self.cfg, result, line=entry.line)
                if job.action == entry.action and (job.kind != "delete" or entry.key in known)]
        if jobs:
            log.info("redoing %d result actions the last run gave up", len(jobs))
            self.janitor.submit(jobs)

    # ----- signals -----------------------------------------------------------------------

    def _install_signals(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    @staticmethod
    def _restore_signals(previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Signals only set flags: the first drains, the second forces."""
        self.stopping.signals += 1
        self.stopping.request(signal.Signals(signum).name, self.cfg.run.grace_s, force=self.stopping.signals > 1)
