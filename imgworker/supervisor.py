"""The supervisor: owns the worker processes, the Manager and the signals; wires everything.

Data flow (one direction)::

    store listing ──pages──▶ scanner filter ──▶ ledger.filter_new (1 round trip per page)
         ──▶ Dispatch (bounded pending queue) ──one item──▶ worker i (own Pipe)
         ◀──Reply (Result)── worker i ──▶ Stats, results file, ledger.add_many

The supervisor always knows which item each worker holds (``Dispatch``). It waits on every
worker's result pipe *and* process sentinel with ``multiprocessing.connection.wait``, so a
death is seen at once without polling; the dead worker's item goes back to the head of the
queue (a retry) or, after ``worker.max_attempts``, ends as ``failed_worker``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from types import FrameType
from typing import Any

import msgspec

from .config import Config
from .cleaner import CleanerStats, Plan, Status, StoredImage, plan_cleanup, stored_image
from .dispatch import Dispatch
from .endpoints import EndpointPool
from .expiry import ExpiryEstimator
from .errors import StoreError, StoreUnavailable
from .ledger import start_ledger
from .lister import Lister, ListingEnd
from .logs import LogSettings, current_settings
from .outcomes import ImageRef, Outcome, Result, WorkItem
from .proctitle import set_title
from .progress import Progress
from .results import ResultsWriter, read_results
from .scanner import parse_task
from .stats import Report, Stats
from .store import Store
from .worker import STOP, decode_reply, encode_item, worker_main

log = logging.getLogger(__name__)

_CTX = multiprocessing.get_context("spawn")


class WorkerHandle:
    """One worker slot: its process, its channel, and whether it is leaving on purpose."""

    def __init__(self, slot: int, cfg: Config, log_settings: LogSettings) -> None:
        self.slot = slot
        ours, theirs = _CTX.Pipe(duplex=True)
        self.conn: Connection = ours
        self.process = _CTX.Process(
            target=worker_main, args=(slot, cfg, theirs, log_settings), name=f"imgworker-worker-{slot}"
        )
        self.process.start()
        theirs.close()  # only the worker holds that end: its death closes our side
        self.dispatched_at = 0.0
        self.endpoints: tuple[str, ...] = ()
        self.retiring = False

    @property
    def sentinel(self) -> int:
        return self.process.sentinel

    def send(self, item: WorkItem) -> None:
        self.dispatched_at = time.monotonic()
        self.endpoints = item.endpoints
        self.conn.send_bytes(encode_item(item))

    def stop(self, timeout: float) -> None:
        """Poison pill, join with grace, then terminate, kill, join."""
        try:
            self.conn.send_bytes(STOP)
        except OSError:
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(1.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class Supervisor:
    """Runs the pipeline; ``step()`` is one iteration of the loop and can be driven by tests."""

    def __init__(
        self,
        cfg: Config,
        *,
        intake_done: Callable[[], bool] = lambda: True,
        show_progress: bool = True,
        on_result: Callable[[Result], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.intake_done = intake_done
        self.on_result = on_result
        self.stats = Stats(cfg.worker.count)
        self.dispatch = Dispatch(cfg.dispatch)
        self.store = Store(cfg.store, cfg.credentials, read_timeout_s=cfg.store.list_timeout_s)
        self.progress = Progress(cfg.run.progress_interval_s, enabled=show_progress)
        self._log_settings = current_settings()
        self.workers: dict[int, WorkerHandle] = {}
        self.idle: list[int] = []
        self._manager: Any = None
        self._lifeline: Any = None
        self.ledger: Any = None
        self.results: ResultsWriter | None = None
        self._done_keys: list[str] = []
        self._sweeping = False
        self.lister: Any = None
        self._carry: list[ImageRef] = []
        self._next_scan = 0.0
        self._scan_failures = 0
        self._sweep_accepted = 0
        self._last_sweep_idle = False
        self._next_checkpoint = 0.0
        self._started = 0.0
        self._stop_reason = ""
        self.draining = False
        self.forced = False
        self._drain_deadline = 0.0
        self._signals = 0
        self.cleaner = CleanerStats()
        self.endpoints = EndpointPool(cfg.algo)
        self.expiry = ExpiryEstimator(cfg.retention, cfg.store.prefix)
        self.scans_completed = 0
        self.last_scan_s = 0.0
        self._sweep_started = 0.0
        self._no_endpoint_since = 0.0
        self._inventory: list[StoredImage] = []
        self._rate_samples: list[tuple[float, int]] = []

    # ----- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        set_title("supervisor")
        self.store.check()
        self._manager, self.ledger, self._lifeline = start_ledger()
        resumed = self._restore_state()
        self.results = ResultsWriter(self.cfg.results_path)
        self.lister = Lister(_CTX, self.cfg, self._log_settings)
        for slot in range(self.cfg.worker.count):
            self._spawn(slot)
        self._started = time.monotonic()
        self._next_checkpoint = self._started + self.cfg.run.checkpoint_interval_s
        log.info(
            "started: %d workers, bucket %s, prefix %r, %d processed known, %d pending resumed",
            self.cfg.worker.count, self.cfg.store.bucket, self.cfg.store.prefix, self.ledger.size(), resumed,
        )

    def run(self) -> Report:
        """Start, loop until a stop condition, shut down in order; return the report."""
        self.start()
        previous = self._install_signals()
        try:
            while not self.finished():
                self.step()
        finally:
            self.shutdown()
            self._restore_signals(previous)
        return self.report()

    def shutdown(self) -> None:
        """Stop workers (grace, terminate, kill), write state, stop the Manager."""
        for handle in list(self.workers.values()):
            handle.stop(timeout=0.2 if self.forced else 5.0)
            self._drain_replies(handle)
            handle.conn.close()
        self.workers.clear()
        self.idle.clear()
        if self.lister is not None:
            self.lister.stop()
            self.lister = None
        if self.ledger is not None:
            self.checkpoint()
        if self.results is not None:
            self.results.close()
        if self._manager is not None:
            self._manager.shutdown()
            self._lifeline.close()
            self._manager = None
        self.progress.close()

    def report(self) -> Report:
        report = self.stats.report(
            pending=self.dispatch.pending,
            in_flight=self.dispatch.in_flight,
            wall_s=time.monotonic() - self._started,
        )
        extra: dict[str, Any] = {"endpoints": self.endpoints.figures()}
        if self.cfg.retention.enabled:
            extra["cleaner"] = msgspec.structs.asdict(self.cleaner)
        return msgspec.structs.replace(report, **extra)

    # ----- the loop ------------------------------------------------------------------

    def step(self) -> None:
        """One iteration: scan a page, feed idle workers, wait for replies or deaths, book-keep."""
        now = time.monotonic()
        self._check_stop_conditions(now)
        if not self.draining:
            self.scan_step(now)
            self.feed_idle()
        self._wait_and_handle(self._wait_timeout(now))
        if time.monotonic() >= self._next_checkpoint:
            self.checkpoint()
        self.progress.maybe_show(self.stats, self.dispatch, len(self.workers))

    def finished(self) -> bool:
        if self.forced:
            return True
        if self.draining:
            return self.dispatch.in_flight == 0 or time.monotonic() >= self._drain_deadline
        return False

    def request_stop(self, reason: str, *, force: bool = False) -> None:
        """Stop intake and drain in-flight work (or, forced, stop at once)."""
        if not self.draining:
            log.info("stopping (%s): no new items, letting %d in flight finish", reason, self.dispatch.in_flight)
            self.draining = True
            self._stop_reason = reason
            self._drain_deadline = time.monotonic() + self.cfg.run.grace_s
        if force:
            self.forced = True

    def _check_stop_conditions(self, now: float) -> None:
        if self.draining:
            return
        if self.cfg.run.duration_s and now - self._started >= self.cfg.run.duration_s:
            self.request_stop("duration reached")
        elif self.cfg.run.until_idle and self._idle() and self.intake_done():
            self.request_stop("idle")

    def _idle(self) -> bool:
        return self._last_sweep_idle and self.dispatch.pending == 0 and self.dispatch.in_flight == 0

    def _wait_timeout(self, now: float) -> float:
        if self.draining:
            return 0.2
        wait_for = [0.5, self._next_checkpoint - now]
        if not self._sweeping:
            wait_for.append(self._next_scan - now)
        return max(0.0, min(wait_for))

    # ----- scanning ------------------------------------------------------------------

    def scan_step(self, now: float) -> None:
        """Start a sweep when due; accept whatever listing pages have arrived, as room allows."""
        if not self._sweeping:
            if now < self._next_scan:
                return
            self._begin_sweep()
        while self._can_accept() and (self._carry or self._next_page()):
            self._accept(self._carry)

    def _can_accept(self) -> bool:
        return self.cfg.dispatch.overflow != "block" or self.dispatch.room > 0

    def _begin_sweep(self) -> None:
        self._flush_done()
        self.ledger.begin_sweep()
        self._sweep_started = time.monotonic()
        self._sweeping = True
        self._sweep_accepted = 0
        self._inventory = []
        try:
            self.lister.request_sweep()
        except OSError:
            self._end_sweep(complete=False)  # the lister died; its sentinel brings a new one

    def _next_page(self) -> bool:
        """Take one message from the lister, if one is waiting; True if it brought new images."""
        try:
            message = self.lister.poll()
        except (EOFError, OSError):
            return False
        if message is None:
            return False
        if isinstance(message, ListingEnd):
            if message.ok:
                self._end_sweep(complete=True)
            else:
                self._scan_failed(StoreUnavailable(message.error))
            return False
        self._scan_failures = 0
        listed = message.refs
        if self.cfg.retention.enabled:
            self._inventory.extend(stored_image(r, self.cfg.store.prefix) for r in listed)
        images = [r for r in listed if r.key not in self.dispatch]
        self._flush_done()
        new = set(self.ledger.filter_new([r.key for r in images]))
        self._carry = [r for r in images if r.key in new]
        return bool(self._carry)

    def _accept(self, refs: list[ImageRef]) -> None:
        block = self.cfg.dispatch.overflow == "block"
        count = min(len(refs), self.dispatch.room) if block else len(refs)
        for ref in refs[:count]:
            self.stats.scanned += 1
            self._sweep_accepted += 1
            self.expiry.observe(ref)
            for dropped in self.dispatch.offer(ref):
                self._drop(dropped, Outcome.DROPPED_BACKLOG, "queue_full")
        self._carry = refs[count:]

    def _end_sweep(self, *, complete: bool) -> None:
        self._sweeping = False
        self._carry = []
        if complete:
            self.scans_completed += 1
            self.last_scan_s = time.monotonic() - self._sweep_started
            pruned = self.ledger.end_sweep()
            if pruned:
                log.info("processed set: pruned %d entries whose objects are gone", pruned)
            if self.cfg.retention.enabled:
                self.clean(self._inventory)
        self._inventory = []
        self._sample_rate()
        self.drop_doomed()
        self._last_sweep_idle = complete and self._sweep_accepted == 0
        self._next_scan = time.monotonic() + self.cfg.scan.interval_s

    def _scan_failed(self, exc: StoreError) -> None:
        """Capped exponential backoff with jitter (half fixed, half random) before the next sweep."""
        self._scan_failures += 1
        cap = min(30.0, self.cfg.scan.interval_s * 2 ** min(self._scan_failures, 6))
        delay = cap / 2 + random.uniform(0.0, cap / 2)
        log.warning("scan failed (%s); retrying in %.1f s", exc, delay)
        self._end_sweep(complete=False)
        self._next_scan = time.monotonic() + delay

    # ----- retention -----------------------------------------------------------------

    def clean(self, inventory: list[StoredImage]) -> Plan:
        """One cleaning pass over a complete listing, decided and executed without a window."""
        self._flush_done()
        outside = [img.key for img in inventory if img.key not in self.dispatch]
        new = set(self.ledger.filter_new(outside))

        def status(key: str) -> Status:
            if self.dispatch.is_held(key):
                return Status.HELD
            if self.dispatch.is_queued(key):
                return Status.QUEUED
            return Status.NEW if key in new else Status.DONE

        plan = plan_cleanup(inventory, self.cfg.retention, now=time.time(), status=status)
        self._count_plan(plan, status, inventory)
        by_key = {img.key: img for img in inventory}
        for key in plan.give_up:
            self._give_up(by_key[key], status(key))
        self._delete(plan.delete + plan.give_up)
        return plan

    def _count_plan(self, plan: Plan, status: Any, inventory: list[StoredImage]) -> None:
        c = self.cleaner
        c.passes += 1
        c.skipped_protected += plan.skipped_protected
        c.passes_over_limit += int(plan.limit_exceeded)
        c.given_up += len(plan.give_up)
        for key in plan.delete:
            st = status(key)
            c.deleted_unaccepted += st is Status.NEW
            c.deleted_queued += st is Status.QUEUED
            c.deleted_held += st is Status.HELD
        gone = set(plan.delete) | set(plan.give_up)
        left = [img for img in inventory if img.key not in gone]
        c.peak_objects_listed = max(c.peak_objects_listed, len(inventory))
        c.peak_objects = max(c.peak_objects, len(left))
        c.peak_bytes = max(c.peak_bytes, sum(img.size for img in left))

    def _give_up(self, img: StoredImage, status: Status) -> None:
        """Storage wins: end a queued (or not yet accepted) image explicitly before it is deleted."""
        if status is Status.NEW:
            self.stats.scanned += 1
        else:
            self.dispatch.withdraw(img.key)
        task_type, task_id = parse_task(img.key, self.cfg.store.prefix)
        self._drop(ImageRef(key=img.key, task_type=task_type, task_id=task_id), Outcome.DROPPED_EXPIRED, "retention")

    def _delete(self, keys: list[str]) -> None:
        size = self.cfg.retention.batch_size
        for start in range(0, len(keys), size):
            batch = keys[start : start + size]
            try:
                refused = self.store.delete(batch)
            except StoreError as exc:
                log.warning("cleaner: delete of %d images failed (%s); the next pass retries", len(batch), exc)
                self.cleaner.delete_errors += len(batch)
                continue
            self.cleaner.delete_errors += len(refused)
            self.cleaner.deleted += len(batch) - len(refused)

    def _sample_rate(self) -> None:
        now = time.monotonic()
        self._rate_samples.append((now, self.stats.finished))
        while len(self._rate_samples) > 2 and now - self._rate_samples[1][0] > 5.0:
            self._rate_samples.pop(0)

    def throughput_estimate(self) -> float:
        """Images finished per second over the last ~5 s (0 until a second of it is measured)."""
        if len(self._rate_samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._rate_samples[0], self._rate_samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 - t0 >= 1.0 else 0.0

    def drop_doomed(self) -> int:
        """With an external cleaner, drop queued images that would expire before a worker is done."""
        if not self.expiry.enabled or not self.dispatch.pending:
            return 0
        now, rate = time.time(), self.throughput_estimate()
        margin = self.stats.e2e_ms.mean / 1000.0
        doomed = []
        for position, item in enumerate(self.dispatch.in_take_order()):
            wait = position / rate if rate > 0 else 0.0
            if self.expiry.would_expire(item.ref, within_s=wait + margin, now=now):
                doomed.append(item)
        for item in doomed:
            self.dispatch.withdraw(item.ref.key)
            self._drop(item.ref, Outcome.DROPPED_EXPIRED, "would_expire")
        if doomed:
            log.info("dropped %d queued images that would expire before a worker reaches them", len(doomed))
        return len(doomed)

    def _head_would_expire(self) -> bool:
        """Drop the next item instead of dispatching it if it would expire before a worker is done."""
        head = self.dispatch.peek() if self.expiry.enabled else None
        margin = self.stats.e2e_ms.mean / 1000.0
        if head is None or not self.expiry.would_expire(head.ref, within_s=margin, now=time.time()):
            return False
        self.dispatch.withdraw(head.ref.key)
        self._drop(head.ref, Outcome.DROPPED_EXPIRED, "would_expire")
        return True

    # ----- dispatch and replies ----------------------------------------------------

    def feed_idle(self) -> None:
        while self.idle and self.dispatch.pending:
            if self._head_would_expire():
                continue
            head = self.dispatch.peek()
            assert head is not None
            endpoints = self.endpoints.choose(head.ref.task_type)
            if endpoints is None:
                if not self._wait_for_endpoint(head.ref):
                    return
                continue
            self._no_endpoint_since = 0.0
            slot = self.idle.pop()
            item = self.dispatch.take(slot)
            assert item is not None
            self.endpoints.dispatched(endpoints)
            try:
                self.workers[slot].send(msgspec.structs.replace(item, endpoints=endpoints))
            except OSError:
                pass  # it died; its sentinel will tell, and the item goes back

    def _wait_for_endpoint(self, head: ImageRef) -> bool:
        """No healthy endpoint: items wait, up to the budget; past it the head fails. True = go on."""
        now = time.monotonic()
        if not self._no_endpoint_since:
            self._no_endpoint_since = now
            log.warning("no healthy algorithm endpoint: images wait in the queue")
        if now - self._no_endpoint_since < self.cfg.algo.no_endpoint_budget_s:
            return False
        self.dispatch.withdraw(head.key)
        self._drop(head, Outcome.FAILED_ALGO, "no_healthy_endpoint")
        return True

    def _wait_and_handle(self, timeout: float) -> None:
        by_conn = {h.conn: h for h in self.workers.values()}
        by_sentinel = {h.sentinel: h for h in self.workers.values()}
        lister: list[Any] = [self.lister.sentinel]
        if self._sweeping and not self._carry and self._can_accept() and not self.draining:
            lister.append(self.lister.conn)  # read pages only while they can be accepted
        ready = wait(list(by_conn) + list(by_sentinel) + lister, timeout)
        for obj in ready:
            if obj in by_conn:
                self._drain_replies(by_conn[obj])  # type: ignore[index]
        for obj in ready:
            if obj in by_sentinel:
                self._on_exit(by_sentinel[obj])  # type: ignore[index]
        if self.lister.conn in ready:
            self.scan_step(time.monotonic())
        if self.lister.sentinel in ready:
            self._on_lister_exit()

    def _on_lister_exit(self) -> None:
        """The lister died: the sweep it was doing is incomplete; start a new lister."""
        self.lister.process.join()
        log.warning("the scanner process exited (exit code %s); starting a new one", self.lister.process.exitcode)
        self.lister.conn.close()
        self.lister = Lister(_CTX, self.cfg, self._log_settings)
        if self._sweeping:
            self._end_sweep(complete=False)

    def _drain_replies(self, handle: WorkerHandle) -> None:
        try:
            while not handle.conn.closed and handle.conn.poll():
                self._on_reply(handle, decode_reply(handle.conn.recv_bytes()))
        except (EOFError, OSError, msgspec.DecodeError):
            return  # the sentinel reports the death

    def _on_reply(self, handle: WorkerHandle, reply: Any) -> None:
        item = self.dispatch.release(handle.slot)
        e2e = (time.monotonic() - handle.dispatched_at) * 1000.0
        result = msgspec.structs.replace(reply.result, e2e_ms=e2e)
        self.endpoints.finished(handle.endpoints, reply.calls)
        handle.endpoints = ()
        if item is None or item.ref.key != result.key:
            log.error("worker %d answered for %r it was not holding; ignored", handle.slot, result.key)
            return
        self._finish(result)
        handle.retiring = reply.retiring
        if not reply.retiring:
            self.idle.append(handle.slot)

    def _on_exit(self, handle: WorkerHandle) -> None:
        handle.process.join()
        code = handle.process.exitcode
        self.workers.pop(handle.slot, None)
        if handle.slot in self.idle:
            self.idle.remove(handle.slot)
        item = self.dispatch.release(handle.slot)
        if item is not None:
            self.endpoints.finished(handle.endpoints, [])
            self._on_lost_item(item, handle.slot, code)
        if handle.retiring:
            self.stats.worker_recycles += 1
        else:
            self.stats.worker_restarts += 1
            log.warning("worker %d exited unexpectedly (exit code %s); starting a replacement", handle.slot, code)
        handle.conn.close()
        if not self.forced:
            self._spawn(handle.slot)

    def _on_lost_item(self, item: WorkItem, slot: int, code: int | None) -> None:
        ref = item.ref
        if item.attempt >= self.cfg.worker.max_attempts:
            log.error("worker %d died on %s %d times; giving up on it", slot, ref.key, item.attempt)
            self._finish(Result(key=ref.key, outcome=Outcome.FAILED_WORKER, task_type=ref.task_type, task_id=ref.task_id,
                                worker=slot, attempt=item.attempt, cause=f"worker_died_exit_{code}", finished_at=time.time()))
            return
        self.stats.retries += 1
        self.dispatch.requeue_front(WorkItem(ref=ref, attempt=item.attempt + 1))

    def _spawn(self, slot: int) -> None:
        if self.draining:
            return
        self.workers[slot] = WorkerHandle(slot, self.cfg, self._log_settings)
        self.idle.append(slot)

    def _drop(self, ref: ImageRef, outcome: Outcome, cause: str) -> None:
        """End an image that no worker will see."""
        self._finish(Result(key=ref.key, outcome=outcome, task_type=ref.task_type, task_id=ref.task_id, cause=cause,
                            finished_at=time.time()))

    def _finish(self, result: Result) -> None:
        """The one place an image gets its terminal outcome."""
        assert self.results is not None
        self.results.write(result)
        self.stats.record(result)
        self._done_keys.append(result.key)
        if self.on_result is not None:
            self.on_result(result)

    # ----- state -----------------------------------------------------------------------

    def _flush_done(self) -> None:
        if self._done_keys:
            self.ledger.add_many(self._done_keys)
            self._done_keys = []

    def checkpoint(self) -> None:
        """Make results durable, then write the processed set and the queue atomically."""
        self._flush_done()
        offset = self.results.sync() if self.results is not None and not self.results.closed else 0
        unfinished = self.dispatch.held_keys() + self.dispatch.pending_keys()
        self.ledger.save(self._state_path(), offset, unfinished)
        self._next_checkpoint = time.monotonic() + self.cfg.run.checkpoint_interval_s

    def _state_path(self) -> str:
        return os.path.join(self.cfg.run.state_dir, "state.json")

    def _restore_state(self) -> int:
        """Load the processed set, replay results written after it, requeue unfinished items."""
        state = self.ledger.load(self._state_path())
        if os.path.exists(self.cfg.results_path):
            batch: list[str] = []
            for result in read_results(self.cfg.results_path, offset=state.results_offset):
                batch.append(result.key)
                if len(batch) >= 1000:
                    self.ledger.add_many(batch)
                    batch = []
            self.ledger.add_many(batch)
        new = set(self.ledger.filter_new(state.pending))
        resumed = [k for k in state.pending if k in new]
        for key in resumed:
            task_type, task_id = parse_task(key, self.cfg.store.prefix)
            self.stats.scanned += 1
            self.dispatch.append(WorkItem(ref=ImageRef(key=key, task_type=task_type, task_id=task_id)))
        return len(resumed)

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
        self._signals += 1
        self.request_stop(signal.Signals(signum).name, force=self._signals > 1)
