"""The worker process: one or more lanes, each a thread with its own clients handling one item at a time.

A worker process serves ``worker.threads`` lanes. A lane is the unit the supervisor hands an
item to: its own minio client and ``requests`` session, holding at most one item. Frames on the
process's one pipe carry the lane number in front (``frame``/``unframe``). The process runs one
thread per lane; the threads take turns blocking on the pipe (no polling), and the one that reads
an item handles it with that lane's clients and sends the reply itself. Waiting on the algorithm service releases the GIL, so
lanes in one process cost less CPU per image than one process per image: fewer processes to
wake, and one interpreter's caches stay warm. The price is isolation: a process that dies takes
every item its lanes held.

The process exits when it receives the stop message (after its lanes have answered every item
sent before it), or at once when the supervisor's end of the pipe closes (the supervisor died).
Its first message is ``READY``, once its clients are built: only then does the supervisor hand
its lanes anything, so a process that dies while starting holds no item. It asks to be retired
(max_tasks, max_memory_mb) by flagging a reply; the supervisor then sends the stop message.
It ignores SIGTERM and SIGINT: the supervisor decides when it leaves. An unexpected exception while handling an item gives
that item an outcome (``failed_algo``, cause ``internal_error``): a bug is never a reason to
POST the same image again. The worker changes nothing in the store: result actions and every
delete are done by the supervisor's janitor once the outcome is written.
"""

from __future__ import annotations

import logging
import os
import random
import struct
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Protocol

import msgspec
import psutil

from .algo_client import AlgoAnswer, AlgoClient, AlgoRequest
from .backoff import Backoff
from .children import child_setup
from .endpoints import Call
from .config import Config
from .errors import AlgoError, AlgoPermanent, AlgoTransient, ImageGone, ObjectMissing, StoreError, StoreUnavailable
from .outcomes import Outcome, Result, WorkItem
from .logs import LogSettings

log = logging.getLogger(__name__)

STOP = b""
READY = b""  # the worker's first message (clients built); no frame is that short, so it names no lane
_item_decoder = msgspec.msgpack.Decoder(WorkItem)
_result_encoder = msgspec.msgpack.Encoder()


class Reply(msgspec.Struct, frozen=True, array_like=True):
    """What a worker sends back: the result, its HTTP calls, and whether it will exit right after."""

    result: Result
    retiring: bool = False
    calls: list[Call] = []
    undecodable: str = ""


class StoreOps(Protocol):
    def stat(self, key: str) -> int: ...
    def presign(self, key: str, expiry_s: int) -> str: ...
    def probe(self, key: str) -> None: ...


class AlgoOps(Protocol):
    def infer(self, request: AlgoRequest, endpoint: str = "") -> AlgoAnswer: ...


class _Trace:
    """What one item's processing measured along the way."""

    def __init__(self) -> None:
        self.detections = 0
        self.algo_ms: float | None = None
        self.stat_ms: float | None = None
        self.algo_calls = 0
        self.calls: list[Call] = []
        self.error = ""


class ItemProcessor:
    """Turns one WorkItem into one Result; collaborators are injected so tests need no process."""

    def __init__(
        self,
        cfg: Config,
        *,
        store: StoreOps,
        algo: AlgoOps,
        worker_id: int,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.algo = algo
        self.worker_id = worker_id
        self.sleep = sleep
        self.rng = rng or random.Random()
        # Full jitter (anywhere from 0 to the capped delay): lanes that failed together spread out.
        self.algo_backoff = Backoff(cfg.algo.backoff_base_s, cfg.algo.backoff_cap_s, jitter=1.0, rng=self.rng)
        self.store_backoff = Backoff(0.1, 2.0, jitter=1.0, rng=self.rng)

    def process(self, item: WorkItem) -> Result:
        return self.process_item(item)[0]

    def process_item(self, item: WorkItem) -> tuple[Result, list[Call]]:
        """The item's result, and the HTTP calls made for it (for endpoint health)."""
        started = time.time()
        t0 = time.monotonic()
        fields = _Trace()
        outcome, cause = self._run(item, fields)
        log.debug("lane %d: %s -> %s %s", self.worker_id, item.ref.key, outcome.value, cause)
        result = Result(
            key=item.ref.key,
            outcome=outcome,
            task_type=item.ref.task_type,
            task_id=item.ref.task_id,
            detections=fields.detections,
            algo_ms=fields.algo_ms,
            e2e_ms=(time.monotonic() - t0) * 1000.0,
            stat_ms=fields.stat_ms,
            worker=self.worker_id,
            attempt=item.attempt,
            algo_calls=fields.algo_calls,
            cause=cause,
            error=fields.error,
            endpoint=fields.calls[-1].endpoint if fields.calls else "",
            started_at=started,
            finished_at=time.time(),
        )
        return result, fields.calls

    def _run(self, item: WorkItem, fields: _Trace) -> tuple[Outcome, str]:
        key = item.ref.key
        try:
            if self.cfg.worker.stat_check:
                t = time.monotonic()
                self._with_store_retry(lambda: self.store.stat(key))
                fields.stat_ms = (time.monotonic() - t) * 1000.0
            url = self._with_store_retry(lambda: self.store.presign(key, self.cfg.worker.presign_expiry_s))
        except ObjectMissing:
            outcome = Outcome.SKIPPED_MISSING if self.cfg.worker.stat_check else Outcome.FAILED_MISSING
            log.debug("lane %d: %s is gone, skipped", self.worker_id, key)
            return outcome, "object_missing"
        except StoreError as exc:
            log.warning("lane %d: store failed for %s: %s", self.worker_id, key, exc)
            return Outcome.FAILED_STORE, _short(exc)
        request = AlgoRequest(
            image_url=url,
            task_id=item.ref.task_id,
            task_type=item.ref.task_type,
            image_path=key,
            algo_config=self.cfg.algo.algo_config,
        )
        return self._infer(request, item.endpoints, fields)

    def _infer(self, request: AlgoRequest, endpoints: tuple[str, ...], fields: _Trace) -> tuple[Outcome, str]:
        """Call the service, retrying transient failures on the next endpoint; failures record their time.

        After a transient failure the image is read back from the store: if the store was the one
        failing (the service could not fetch the image), the worker waits for it within
        ``store_retry_budget_s`` and the attempt is not charged to the service.
        """
        attempts = self.cfg.algo.retries + 1
        targets = endpoints or (self.cfg.algo.endpoint,)
        last: AlgoError | None = None
        spent = 0.0
        attempt = refunds = 0
        while attempt < attempts:
            if attempt:
                self.sleep(self.algo_backoff.delay(attempt))
            endpoint = targets[attempt % len(targets)]
            attempt += 1
            fields.algo_calls += 1
            t = time.monotonic()
            try:
                answer = self.algo.infer(request, endpoint)
            except ImageGone:
                fields.calls.append(Call(endpoint, True, "", (time.monotonic() - t) * 1000.0))
                fields.algo_ms = spent + fields.calls[-1].ms
                return Outcome.FAILED_MISSING, "algo_404"
            except AlgoPermanent as exc:
                fields.calls.append(Call(endpoint, True, "", (time.monotonic() - t) * 1000.0))
                fields.algo_ms = spent + fields.calls[-1].ms
                return Outcome.FAILED_ALGO, exc.cause
            except AlgoTransient as exc:
                spent += (time.monotonic() - t) * 1000.0
                last = exc
                log.info("lane %d: %s attempt %d: %s", self.worker_id, request.image_path, attempt, exc.cause)
                store = self._store_after_failure(request.image_path)
                # a store outage is not the service's fault
                fields.calls.append(Call(endpoint, store == "waited", "" if store == "waited" else exc.cause))
                if store in _STORE_ENDS:
                    fields.algo_ms = spent
                    return _STORE_ENDS[store]
                if store == "waited" and refunds < 3:
                    refunds += 1
                    attempt -= 1
                continue
            fields.calls.append(Call(endpoint, True, "", answer.elapsed_ms))
            fields.algo_ms = answer.elapsed_ms
            fields.detections = answer.detections
            fields.error = answer.error
            if answer.success and answer.detections > 0:
                return Outcome.INFERRED, ""
            return Outcome.NO_DETECTION, "" if answer.success else "success_false"
        assert last is not None
        fields.algo_ms = spent
        return Outcome.FAILED_ALGO, last.cause

    def _store_after_failure(self, key: str) -> str:
        """Read the image back after a failed call: "ok", "waited" (the store was down), "gone", "unavailable"."""
        try:
            self.store.probe(key)
            return "ok"
        except ObjectMissing:
            return "gone"
        except StoreUnavailable:
            pass
        log.warning("lane %d: the store is unavailable after a failed call for %s; waiting for it", self.worker_id,
                    key)
        try:
            self._with_store_retry(lambda: self.store.probe(key))
        except ObjectMissing:
            return "gone"
        except StoreError:
            return "unavailable"
        return "waited"

    def _with_store_retry(self, op: Callable[[], object]) -> str:
        """Retry StoreUnavailable with backoff until the store budget is spent."""
        deadline = time.monotonic() + self.cfg.worker.store_retry_budget_s
        attempt = 0
        while True:
            try:
                return op()  # type: ignore[return-value]
            except StoreUnavailable:
                delay = self.store_backoff.delay(attempt + 1)
                if time.monotonic() + delay > deadline:
                    raise
                attempt += 1
                self.sleep(delay)


_STORE_ENDS = {"gone": (Outcome.FAILED_MISSING, "object_missing"),
               "unavailable": (Outcome.FAILED_STORE, "store_unavailable")}


def _short(exc: BaseException) -> str:
    return str(exc).split(":", 1)[0][:80] or type(exc).__name__


_LANE = struct.Struct("<I")


def frame(lane: int, payload: bytes) -> bytes:
    """A message on a worker's pipe: the lane number, then the payload."""
    return _LANE.pack(lane) + payload


def unframe(data: bytes) -> tuple[int, bytes]:
    """The lane and payload of a frame; ValueError if it is too short to name a lane."""
    if len(data) < _LANE.size:
        raise ValueError(f"a {len(data)}-byte frame names no lane")
    return _LANE.unpack_from(data)[0], data[_LANE.size:]


class _Channel:
    """The worker's end of its pipe, shared by its threads: one reads at a time, one sends at a time.

    The thread that reads an item handles it, as the lane the item names: no hand-off between
    threads. A lane holds one item at a time, so no two threads ever use one lane's clients at once;
    there are as many threads as lanes, so while a lane is free a thread is free to read.
    """

    def __init__(self, conn: Connection, cfg: Config, lanes: tuple[int, ...]) -> None:
        self.conn = conn
        self.cfg = cfg
        self.lanes = frozenset(lanes)
        self.done = 0
        self.me = psutil.Process()
        self.ended = threading.Event()  # the stop message was read, or the pipe closed
        self.gone = False  # the pipe closed: the supervisor is gone
        self._reading = threading.Lock()
        self._sending = threading.Lock()

    def next_item(self) -> tuple[int, WorkItem] | None:
        """The next (lane, item) for the calling thread; None once the process is to leave."""
        with self._reading:
            while not self.ended.is_set():
                try:
                    message = self.conn.recv_bytes()
                except (EOFError, OSError):
                    self.gone = True  # the supervisor is gone: exit on our own, no orphans
                    self.ended.set()
                    return None
                if message == STOP:
                    self.ended.set()
                    return None
                got = self._item_of(message)
                if got is not None:
                    return got
            return None

    def _item_of(self, message: bytes) -> tuple[int, WorkItem] | None:
        """The (lane, item) a frame carries; a frame that cannot be used is logged, and answered if it names a lane."""
        try:
            lane, payload = unframe(message)
        except ValueError as exc:
            log.error("worker: a message from the supervisor names no lane (%s); ignored", exc)
            return None
        if lane not in self.lanes:
            log.error("worker: a message from the supervisor names lane %d, not one of this worker's; ignored", lane)
            return None
        try:
            return lane, _item_decoder.decode(payload)
        except msgspec.DecodeError as exc:  # the lane waits for an answer: give it one at once
            log.error("worker: the item for lane %d could not be decoded (%s)", lane, exc)
            self.send(lane, _result_encoder.encode(Reply(result=Result(key="", outcome=Outcome.FAILED_ALGO,
                                                                        cause="internal_error"),
                                                         undecodable=f"item not decodable: {exc}"[:200])))
            return None

    def ready(self) -> None:
        """Tell the supervisor this process's lanes can take items."""
        with self._sending:
            try:
                self.conn.send_bytes(READY)
            except (BrokenPipeError, OSError):
                pass  # the supervisor is gone; the next read sees the pipe closed

    def count_one(self) -> bool:
        """Count one answered item; True if the process should now be retired."""
        with self._sending:
            self.done += 1
            return _should_retire(self.cfg, self.done, self.me)

    def send(self, lane: int, data: bytes) -> None:
        with self._sending:
            try:
                self.conn.send_bytes(frame(lane, data))
            except (BrokenPipeError, OSError):
                pass  # the supervisor is gone; the next read sees the pipe closed


def worker_main(index: int, lanes: tuple[int, ...], cfg: Config, conn: Connection, log_settings: LogSettings) -> None:
    """Entry point of a worker process (top-level so the spawn context can import it)."""
    child_setup(f"worker {index}", log_settings)
    channel = _Channel(conn, cfg, lanes)
    processors = {lane: _build_processor(lane, cfg) for lane in lanes}
    channel.ready()
    threads = [threading.Thread(target=_serve, args=(channel, processors), name=f"lane-{lane}", daemon=True)
               for lane in lanes]
    for thread in threads:
        thread.start()
    channel.ended.wait()
    if not channel.gone:
        for thread in threads:
            thread.join()  # every item sent before the stop message gets its answer


def _serve(channel: _Channel, processors: dict[int, ItemProcessor]) -> None:
    """One thread: answer each item it reads, as the lane the item names, until the process is to leave.

    Anything that escapes (a bug outside ``answer``) ends the whole process at once, so the supervisor
    sees the death now rather than a lane that never answers until its item deadline.
    """
    try:
        while (got := channel.next_item()) is not None:
            lane, item = got
            reply = answer(processors[lane], item, retiring=False)
            reply = msgspec.structs.replace(reply, retiring=channel.count_one())
            channel.send(lane, encode_reply(reply, item, lane))
    except BaseException:
        log.exception("worker: a lane failed outside an item; the process exits")
        os._exit(70)


def answer(processor: ItemProcessor, item: WorkItem, *, retiring: bool) -> Reply:
    """Process one item; an unexpected exception is that item's outcome, not a worker crash."""
    try:
        result, calls = processor.process_item(item)
    except Exception as exc:  # a bug must end this image once, not kill the worker and re-POST it
        log.exception("lane %d: unexpected error on %s", processor.worker_id, item.ref.key)
        return Reply(result=internal_error(item, processor.worker_id, exc), retiring=retiring)
    return Reply(result=result, retiring=retiring, calls=calls)


def internal_error(item: WorkItem, worker_id: int, exc: BaseException | str) -> Result:
    """The outcome of an item whose handling raised something imgworker did not expect."""
    detail = exc if isinstance(exc, str) else type(exc).__name__
    log.error("lane %d: %s ends failed_algo (internal_error: %s)", worker_id, item.ref.key, detail)
    return Result(key=item.ref.key, outcome=Outcome.FAILED_ALGO, task_type=item.ref.task_type,
                  task_id=item.ref.task_id, worker=worker_id, attempt=item.attempt, cause="internal_error",
                  finished_at=time.time())


def encode_reply(reply: Reply, item: WorkItem, worker_id: int) -> bytes:
    """Encode a reply; one that cannot be encoded becomes an internal_error reply for the same item."""
    try:
        return _result_encoder.encode(reply)
    except (OverflowError, TypeError, ValueError) as exc:
        fallback = Reply(result=internal_error(item, worker_id, exc), retiring=reply.retiring, calls=reply.calls)
        return _result_encoder.encode(fallback)


def _should_retire(cfg: Config, done: int, me: psutil.Process) -> bool:
    if cfg.worker.max_tasks and done >= cfg.worker.max_tasks:
        return True
    if cfg.worker.max_memory_mb:
        return bool(me.memory_info().rss > cfg.worker.max_memory_mb * 1024 * 1024)
    return False


def _build_processor(worker_id: int, cfg: Config) -> ItemProcessor:
    """Clients are built here, inside the worker, one set per lane: connection pools are not fork-safe."""
    from .store import Store

    store = Store(cfg.store, cfg.credentials, read_timeout_s=cfg.worker.stat_timeout_s, pool_size=2)
    algo = AlgoClient(cfg.algo)
    return ItemProcessor(cfg, store=store, algo=algo, worker_id=worker_id, rng=random.Random(os.getpid() * 1024 + worker_id))


def decode_reply(data: bytes) -> Reply:
    return msgspec.msgpack.decode(data, type=Reply)


def encode_item(lane: int, item: WorkItem) -> bytes:
    return frame(lane, msgspec.msgpack.encode(item))
