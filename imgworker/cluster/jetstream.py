"""The one module that talks to NATS: a nats-py client on its own event loop, in one daemon thread.

``JetStreamLink``'s public methods block the caller (the supervisor's loop) for at most their
timeout; each runs one coroutine on the link's loop. Every nats-py error is translated into
``ClusterUnavailable`` (transient: the server is away, retry) where it enters. The progress notes
of the messages this host holds and the lease renewals run as tasks on that loop, whatever the
supervisor's loop is doing (see the package docstring).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import msgspec

from ..config import ClusterConfig
from ..events.messages import EventError
from ..outcomes import ImageRef
from . import image_version, ledger_key
from .events import MinioRecords

log = logging.getLogger(__name__)
_T = TypeVar("_T")

LEASE_KEY = "intake"
#: How long one fetch waits for messages: far below any AckWait (1 s at least), so a fetched
#: message never waits in the client's buffer while its AckWait runs.
FETCH_TIMEOUT_S = 0.1
#: The longest one blocking call waits for the server before it counts as unavailable.
CALL_TIMEOUT_S = 3.0
_WRONG_LAST_SEQUENCE = (10071, 10164)
_STREAM_FULL = 10077
#: MinIO's messages the leader fetches at a time, and how long it waits for them.
EVENTS_BATCH = 64
EVENTS_FETCH_TIMEOUT_S = 0.5
#: How long the leader waits before looking again for MinIO's missing stream, or after a failure.
EVENTS_RETRY_S = 5.0
#: A MinIO message refused by a full work stream comes again after this (its backlog's own backpressure).
EVENTS_FULL_DELAY_S = 1.0


class ClusterUnavailable(Exception):
    """The NATS server could not be reached or did not answer in time (transient)."""


class ClusterMissing(ClusterUnavailable):
    """The server answered, but the cluster's ledger bucket, work stream or consumer does not exist (yet)."""


class ClusterSetupRefused(ClusterUnavailable):
    """The server answered but refused to create or look up the stream, consumer or buckets (JetStream off, more
    replicas than nodes, a cluster still electing its leader): often a setting, sometimes a moment."""


def _refused(exc: BaseException) -> bool:
    """The server's own refusal (a JetStream API error, or no JetStream at all) behind a failed start."""
    import nats.js.errors

    cause = exc.__cause__
    return isinstance(cause, (nats.js.errors.APIError, nats.js.errors.ServiceUnavailableError)) or \
        type(cause).__name__ == "NoRespondersError"


class Delivery(msgspec.Struct, frozen=True):
    """One fetched message: the image, how often it was delivered, whether the ledger has it already."""

    ref: ImageRef
    delivered: int
    counted: bool


class Published(msgspec.Struct, frozen=True):
    """What one publish batch did: how many were stored (or found stored), and why it stopped early."""

    sent: int
    full: bool = False
    deposed: bool = False


class JetStreamLink:
    """The work stream, its durable consumer, the ledger and lease buckets, through one connection."""

    def __init__(self, cfg: ClusterConfig, *, host: str, bucket: str, events: MinioRecords | None = None) -> None:
        self.cfg = cfg
        self.host = host
        self.bucket = bucket
        self.events = events  # MinIO's notifications to republish while leading (``scan.mode = "events"``)
        self.republished = 0  # images published from MinIO's notifications (link thread only)
        # those images, for the supervisor's thread to take (``ClusterHost.published``); a deque: thread-safe
        self.events_published: collections.deque[ImageRef] = collections.deque()
        self._lease_lock = asyncio.Lock()  # one CAS on the lease at a time: two on one revision would depose it
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nats-link", daemon=True)
        self._nc: Any = None
        self._js: Any = None
        self._sub: Any = None
        self._ledger: Any = None
        self._lease: Any = None
        self._held: dict[str, Any] = {}  # image key -> its latest delivered message, until acked or naked
        self._tasks: list[asyncio.Task[None]] = []
        self.lease_revision = 0  # the lease revision this host holds (0: not the leader)
        self._lease_renewed = 0.0
        self._closing = False
        self.lease_terms = 0  # how many times this host took the lease (a new term: what earlier leaders did is unknown)
        self.sequences: dict[str, int] = {}  # image key -> stream sequence of its publish (``cluster.retention``)
        self.last_error = ""  # the client's latest error, which a start that never connected names

    # ----- lifecycle (the supervisor's thread) ------------------------------------------------------

    def start(self) -> None:
        """Start the thread, connect, make sure the stream, consumer and buckets exist, start the tasks.

        Raises ``ClusterUnavailable`` (with no connection left open) if the server does not answer in
        time; calling it again tries again. Never connected: it names the client's last error.
        """
        import nats  # noqa: F401  - here, not on the link's thread: a missing nats-py is the CLI's to name (its extra)

        if not self._thread.is_alive():
            self._thread.start()
        try:
            self._call(self._open(), timeout=max(CALL_TIMEOUT_S, 10.0))
        except ClusterUnavailable as exc:
            connected = self._nc is not None
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._drop_connection(), self._loop).result(CALL_TIMEOUT_S)
            if not connected and self.last_error:  # nats-py tries to connect until the timeout: name why it could not
                raise ClusterUnavailable(self.last_error) from exc
            if connected and _refused(exc):
                raise ClusterSetupRefused(str(exc)) from exc
            raise

    def close(self) -> None:
        """Nak what is still held, close the connection, stop the thread."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(ClusterUnavailable):
            self._call(self._close(), timeout=CALL_TIMEOUT_S + 2.0)
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_cancel_the_rest(), self._loop).result(2.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)

    def _call(self, work: Coroutine[Any, Any, _T], *, timeout: float = CALL_TIMEOUT_S) -> _T:
        future = asyncio.run_coroutine_threadsafe(work, self._loop)
        try:
            return future.result(timeout)
        except ClusterUnavailable:
            raise
        except Exception as exc:  # nats-py raises many kinds; each means: not now
            future.cancel()
            raise ClusterUnavailable(str(exc) or type(exc).__name__) from exc

    # ----- the supervisor's calls ------------------------------------------------------------------

    def fetch(self, n: int) -> list[Delivery]:
        """Up to ``n`` new messages (waiting at most ``FETCH_TIMEOUT_S``), each looked up in the ledger."""
        return self._call(self._fetch(n))

    def publish(self, refs: list[ImageRef]) -> Published:
        """Publish images to the work stream, fenced by a CAS on the lease first (leader only)."""
        return self._call(self._publish(refs), timeout=CALL_TIMEOUT_S + 0.01 * len(refs))

    def claim(self, key: str, version: str, value: bytes) -> bool:
        """Create the ledger entry of this version of the image if absent: True if this call created it."""
        return self._call(self._claim(key, version, value))

    def ledger_value(self, key: str, version: str) -> bytes | None:
        """The ledger entry of this version of the image as stored, or None."""
        return self._call(self._ledger_value(key, version))

    def settle(self, key: str, *, term: bool = False) -> None:
        """The outcome is in the ledger: ack the message (``term`` for a final failure); no-op if not held."""
        self._call(self._settle(key, term=term))

    def release(self, keys: list[str]) -> None:
        """Nak held messages (fetched, not started): JetStream hands them to another host at once."""
        self._call(self._release(keys))

    def forget(self, key: str) -> None:
        """Stop the progress notes of a message without acking it: it is redelivered after AckWait."""
        self._loop.call_soon_threadsafe(self._held.pop, key, None)

    def holds(self) -> int:
        return len(self._held)

    def leading(self) -> bool:
        """This host holds the intake lease (renewed within its TTL)."""
        return bool(self.lease_revision) and time.monotonic() - self._lease_renewed < self.cfg.lease_ttl_s

    def figures(self) -> dict[str, int]:
        """The stream's depth and the consumer's pending, unacked and redelivered counts."""
        return self._call(_figures(self._js, self.cfg))

    # ----- the leader's cleaner (``cluster.retention``) ------------------------------------------------

    def counted(self, versions: dict[str, str]) -> set[str]:
        """Of these images (key -> object version), those whose ledger entry exists."""
        return self._call(self._counted(versions), timeout=CALL_TIMEOUT_S + 0.005 * len(versions))

    def confirm_lease(self) -> bool:
        """Renew the lease by CAS now: True only if this host still holds it (the fence before a delete)."""
        return bool(self._call(self._renew_lease()))

    def delivered_up_to(self) -> int:
        """The highest stream sequence the shared consumer ever delivered: any message above it reached no host."""
        return self._call(self._delivered_up_to())

    def withdraw(self, seq: int) -> bool:
        """Delete one message from the work stream by sequence: True if it was there (no host acked it)."""
        return self._call(self._withdraw(seq))

    def publish_again(self, ref: ImageRef, tag: str) -> int:
        """Publish an image again under a Nats-Msg-Id of its own (``@version#tag``): its new sequence."""
        return self._call(self._publish_again(ref, tag))

    async def _counted(self, versions: dict[str, str]) -> set[str]:
        keys = list(versions)
        found: set[str] = set()
        for start in range(0, len(keys), 256):  # bounded concurrency: one pass never floods the server
            chunk = keys[start:start + 256]
            values = await asyncio.gather(*(self._ledger_value(k, versions[k]) for k in chunk))
            found.update(k for k, v in zip(chunk, values) if v is not None)
        return found

    async def _delivered_up_to(self) -> int:
        info = await self._js.consumer_info(self.cfg.stream, self.cfg.consumer)
        return int(info.delivered.stream_seq or 0)

    async def _withdraw(self, seq: int) -> bool:
        import nats.js.errors

        try:
            return bool(await self._js.delete_msg(self.cfg.stream, seq))
        except nats.js.errors.APIError:  # not there (acked, or deleted already), or refused: either way, keep it
            return False

    async def _publish_again(self, ref: ImageRef, tag: str) -> int:
        headers = {"Nats-Msg-Id": f"{self.bucket}/{ref.key}@{image_version(ref)}#{tag}"}
        ack = await self._js.publish(self.cfg.subject, msgspec.msgpack.encode(ref), headers=headers,
                                     stream=self.cfg.stream)
        self.sequences[ref.key] = ack.seq
        return int(ack.seq)

    # ----- on the link's loop ------------------------------------------------------------------------

    async def _open(self) -> None:
        import nats

        options: dict[str, Any] = {}
        if self.cfg.credentials_file:
            options["user_credentials"] = self.cfg.credentials_file
        if self.cfg.ca_bundle:
            options["tls"] = ssl.create_default_context(cafile=self.cfg.ca_bundle)
        self._nc = await nats.connect(
            [u.strip() for u in self.cfg.url.split(",")], name=f"imgworker-{self.host}", connect_timeout=2,
            allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.5, ping_interval=5,
            max_outstanding_pings=2, error_cb=self._client_error, disconnected_cb=self._disconnected,
            reconnected_cb=_reconnected, **options)
        self._js = self._nc.jetstream(timeout=CALL_TIMEOUT_S)
        await self._ensure()
        self._tasks = [asyncio.ensure_future(self._progress_notes()), asyncio.ensure_future(self._keep_lease())]
        if self.events is not None:
            self._tasks.append(asyncio.ensure_future(self._republish_events(self.events)))

    async def _drop_connection(self) -> None:
        """A start that did not finish: its connection goes, so the next try opens a fresh one."""
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    async def _ensure(self) -> None:
        """Create what is missing; an existing stream, consumer or bucket is used as it is."""
        import nats.js.errors
        from nats.js.api import (
            AckPolicy, ConsumerConfig, DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig,
        )

        cfg = self.cfg
        stream = StreamConfig(name=cfg.stream, subjects=[cfg.subject], retention=RetentionPolicy.WORK_QUEUE,
                              discard=DiscardPolicy.NEW, max_msgs=cfg.max_msgs, storage=StorageType.FILE,
                              duplicate_window=cfg.duplicate_window_s, num_replicas=cfg.replicas)
        try:
            await self._js.stream_info(cfg.stream)
        except nats.js.errors.NotFoundError:
            await self._js.add_stream(stream)
        consumer = ConsumerConfig(durable_name=cfg.consumer, ack_policy=AckPolicy.EXPLICIT, ack_wait=cfg.ack_wait_s,
                                  max_deliver=-1, max_ack_pending=-1, max_waiting=4096)
        self._sub = await self._js.pull_subscribe(cfg.subject, durable=cfg.consumer, stream=cfg.stream,
                                                  config=consumer)
        for name, attr in ((cfg.ledger_bucket, "_ledger"), (cfg.lease_bucket, "_lease")):
            try:
                kv = await self._js.key_value(name)
            except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
                kv = await self._js.create_key_value(KeyValueConfig(bucket=name, history=1, replicas=cfg.replicas,
                                                                    storage=StorageType.FILE))
            setattr(self, attr, kv)

    async def _client_error(self, exc: Exception) -> None:
        self.last_error = str(exc) or type(exc).__name__
        await _log_error(exc)

    async def _disconnected(self) -> None:
        if not self._closing:
            log.warning("NATS connection lost; reconnecting")

    async def _close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._release(list(self._held))
        if self.lease_revision:  # hand the lease over at once rather than after its TTL
            with contextlib.suppress(Exception):
                await self._lease.delete(LEASE_KEY, last=self.lease_revision)
            self.lease_revision = 0
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._nc.close(), CALL_TIMEOUT_S)

    async def _fetch(self, n: int) -> list[Delivery]:
        try:
            messages = await self._sub.fetch(n, timeout=FETCH_TIMEOUT_S)
        except asyncio.TimeoutError:  # nats-py's own, or the plain one it raises when its wait ran out: nothing came
            return []
        out: list[Delivery] = []
        for message in messages:
            try:
                ref = msgspec.msgpack.decode(message.data, type=ImageRef)
            except msgspec.DecodeError:
                log.warning("dropping a malformed work message (%d bytes)", len(message.data))
                await message.term()
                continue
            held = self._held.get(ref.key)
            if held is not None and _version(held) != image_version(ref):
                # a new upload under a name this host still works on: one message per name is held here (its
                # outcome acks it), so this one goes back and comes again after the old one is settled
                with contextlib.suppress(Exception):  # not naked: it comes again after AckWait
                    await message.nak(delay=self.cfg.ack_wait_s)
                continue
            again = held is not None  # this host still holds an earlier delivery (it was paused)
            self._held[ref.key] = message
            if again:
                continue
            counted = await self._ledger_value(ref.key, image_version(ref)) is not None
            out.append(Delivery(ref=ref, delivered=message.metadata.num_delivered, counted=counted))
        return out

    async def _ledger_value(self, key: str, version: str) -> bytes | None:
        import nats.js.errors

        try:
            entry = await self._ledger.get(ledger_key(self.bucket, key, version))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return bytes(entry.value or b"")

    async def _claim(self, key: str, version: str, value: bytes) -> bool:
        import nats.js.errors

        try:
            # update(last=0), not create(): create would write again over a delete marker
            await self._ledger.update(ledger_key(self.bucket, key, version), value, last=0)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    async def _settle(self, key: str, *, term: bool) -> None:
        message = self._held.pop(key, None)
        if message is None:
            return
        with contextlib.suppress(Exception):  # a lost ack: redelivered, then acked as already counted
            await (message.term() if term else message.ack())

    async def _release(self, keys: list[str]) -> None:
        for key in keys:
            message = self._held.pop(key, None)
            if message is not None:
                with contextlib.suppress(Exception):  # not naked: redelivered after AckWait
                    await message.nak()

    async def _publish(self, refs: list[ImageRef]) -> Published:
        import nats.js.errors

        if not refs:
            return Published(sent=0)
        revision = await self._renew_lease()
        if not revision:
            return Published(sent=0, deposed=True)
        sent = 0
        for ref in refs:
            headers = {"Nats-Msg-Id": f"{self.bucket}/{ref.key}@{image_version(ref)}",
                       "Imgworker-Lease": str(revision)}
            try:
                ack = await self._js.publish(self.cfg.subject, msgspec.msgpack.encode(ref), headers=headers,
                                             stream=self.cfg.stream)
                self.sequences[ref.key] = ack.seq  # a duplicate's ack names the stored message's sequence
                await self._unless_withdrawn(ref, ack)
            except nats.js.errors.APIError as exc:
                if exc.err_code == _STREAM_FULL or "maximum messages" in (exc.description or ""):
                    return Published(sent=sent, full=True)
                raise
            sent += 1
        return Published(sent=sent)

    async def _unless_withdrawn(self, ref: ImageRef, ack: Any) -> None:
        """A duplicate whose stored message is gone with no outcome in the ledger: publish it under an id of its own.

        A message leaves the work stream once its outcome is in the ledger (the ack follows the
        claim), or when a leader's cleaner withdraws it. A leader that died between that withdraw
        and the image's end (or its new publish) left it with no message; the duplicate window would
        take every later publish of it for stored.
        """
        import nats.js.errors

        if not ack.duplicate:
            return
        try:
            await self._js.get_msg(self.cfg.stream, ack.seq)
            return
        except nats.js.errors.NotFoundError:
            pass
        if await self._ledger_value(ref.key, image_version(ref)) is None:  # looked up after the message was gone
            log.warning("%s: its message was withdrawn from the work stream and the image never ended; published "
                        "again", ref.key)
            await self._publish_again(ref, uuid.uuid4().hex[:12])
            self.sequences[ref.key] = 0  # maybe delivered before its withdrawal: never given up through the copy

    async def _renew_lease(self) -> int:
        """CAS the lease on the revision held: the new revision, or 0 (deposed: another host holds it)."""
        async with self._lease_lock:
            return await self._cas_lease()

    async def _cas_lease(self) -> int:
        import nats.js.errors

        revision = self.lease_revision
        if not revision:
            return 0
        headers = {"Nats-Expected-Last-Subject-Sequence": str(revision)}
        try:
            ack = await self._js.publish(f"$KV.{self.cfg.lease_bucket}.{LEASE_KEY}", self.host.encode(),
                                         headers=headers, msg_ttl=self.cfg.lease_ttl_s)
        except nats.js.errors.APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                log.warning("intake lease lost (revision %d is not the latest): no longer the intake leader",
                            revision)
                self.lease_revision = 0
                return 0
            raise
        self.lease_revision, self._lease_renewed = ack.seq, time.monotonic()
        return int(ack.seq)

    async def _keep_lease(self) -> None:
        """Renew the lease if held, else try to take it, every third of its TTL."""
        import nats.js.errors

        while True:
            try:
                if self.lease_revision:
                    await self._renew_lease()
                else:
                    revision = await self._lease.create(LEASE_KEY, self.host.encode(), msg_ttl=self.cfg.lease_ttl_s)
                    self.lease_revision, self._lease_renewed = revision, time.monotonic()
                    self.lease_terms += 1
                    log.info("this host is now the intake leader (lease revision %d)", revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                pass  # another host holds it
            except Exception as exc:  # away: a lease not renewed within its TTL is not held (leading())
                log.debug("lease: %s", str(exc) or type(exc).__name__)
            await asyncio.sleep(self.cfg.lease_ttl_s / 3)

    async def _republish_events(self, events: MinioRecords) -> None:
        """While this host leads: MinIO's notifications to the work stream, each acked only after its PubAck.

        A host that does not lead fetches nothing (a deposed leader stops at its next fetch; what it
        holds is naked when the CAS before its publishes fails). MinIO's stream must exist: while it
        does not, an error is logged once and it is looked for again every ``EVENTS_RETRY_S`` (the
        reconciliation sweeps go on meanwhile). Any other failure waits as long and tries again.
        """
        sub: Any = None
        missing = False
        while True:
            try:
                if not self.leading():
                    await asyncio.sleep(0.2)
                    continue
                if sub is None:
                    sub = await self._events_subscription(events)
                    if missing:
                        log.info("MinIO's event stream is there now: consuming its notifications")
                    missing = False
                messages = await self._events_fetch(sub)
                if messages and not await self._republish(events, messages):
                    await asyncio.sleep(EVENTS_FULL_DELAY_S)  # the work stream is full: stop fetching a while
            except asyncio.CancelledError:
                raise
            except _EventsStreamMissing as exc:
                if not missing:
                    log.error("%s; MinIO publishes only into an existing stream: create it (see the README, "
                              "\"More than one host\"). Intake goes on by reconciliation sweeps; looking again "
                              "every %.0f s", exc, EVENTS_RETRY_S)
                missing = True
                await asyncio.sleep(EVENTS_RETRY_S)
            except Exception as exc:  # away, or the consumer went: subscribe again later
                log.warning("MinIO's notifications: %s; trying again in %.0f s", str(exc) or type(exc).__name__,
                            EVENTS_RETRY_S)
                sub = None
                await asyncio.sleep(EVENTS_RETRY_S)

    async def _events_subscription(self, events: MinioRecords) -> Any:
        """The durable pull consumer on MinIO's stream (created at new messages if absent; a sweep finds older ones)."""
        import nats.js.errors
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        try:
            stream = events.stream or await self._js.find_stream_name_by_subject(events.subject)
            await self._js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            where = f"stream {events.stream!r}" if events.stream else f"a stream holding subject {events.subject!r}"
            raise _EventsStreamMissing(f"MinIO's event stream does not exist ({where})") from None
        consumer = ConsumerConfig(durable_name=events.durable, ack_policy=AckPolicy.EXPLICIT,
                                  deliver_policy=DeliverPolicy.NEW, ack_wait=self.cfg.ack_wait_s, max_deliver=-1)
        sub = await self._js.pull_subscribe(events.subject, durable=events.durable, stream=stream, config=consumer)
        log.info("consuming MinIO's notifications from stream %s (durable %s)", stream, events.durable)
        return sub

    async def _events_fetch(self, sub: Any) -> list[Any]:
        try:
            return list(await sub.fetch(EVENTS_BATCH, timeout=EVENTS_FETCH_TIMEOUT_S))
        except asyncio.TimeoutError:  # nats-py's own, or the plain one it raises when its wait ran out: nothing came
            return []

    async def _republish(self, events: MinioRecords, messages: list[Any]) -> bool:
        """Publish the wanted images of ``messages``, fenced by the lease CAS; ack each message after its PubAcks.

        False when the work stream is full: that message and the rest are naked with a delay, never
        acked, so nothing is dropped. Deposed: all are naked. A failure naks what is not acked yet.
        """
        import nats.js.errors

        revision = await self._renew_lease()
        if not revision:
            await _nak_all(messages)
            return True
        for n, message in enumerate(messages):
            try:
                refs = events.refs(message.data)
            except EventError as exc:
                log.warning("dropping a MinIO notification: %s", exc)
                await message.term()
                continue
            try:
                for ref in refs:
                    headers = {"Nats-Msg-Id": f"{self.bucket}/{ref.key}@{image_version(ref)}",
                               "Imgworker-Lease": str(revision)}
                    ack = await self._js.publish(self.cfg.subject, msgspec.msgpack.encode(ref), headers=headers,
                                                 stream=self.cfg.stream)
                    self.sequences[ref.key] = ack.seq  # for the cleaner's fence, as intake's publishes
                    await self._unless_withdrawn(ref, ack)
                    self.events_published.append(ref)
                    self.republished += 1
            except nats.js.errors.APIError as exc:
                if exc.err_code == _STREAM_FULL or "maximum messages" in (exc.description or ""):
                    log.info("work stream full (%d messages): MinIO's notifications wait", self.cfg.max_msgs)
                    await _nak_all(messages[n:], delay=EVENTS_FULL_DELAY_S)
                    return False
                await _nak_all(messages[n:])
                raise
            except BaseException:
                await _nak_all(messages[n:])
                raise
            await message.ack()  # its images are in the work stream (or were already: same Nats-Msg-Id)
        return True

    async def _progress_notes(self) -> None:
        """``in_progress()`` for every message this host holds, every third of AckWait."""
        while True:
            await asyncio.sleep(self.cfg.ack_wait_s / 3)
            for message in list(self._held.values()):
                try:
                    await message.in_progress()
                except Exception as exc:  # away: the messages come again after AckWait, the ledger decides
                    log.debug("progress note: %s", str(exc) or type(exc).__name__)
                    break



def read_cluster(cfg: ClusterConfig) -> tuple[list[bytes], dict[str, int]]:
    """Every value in the ledger bucket, and the work stream's figures, on a connection of its own.

    Read from the bucket's stream in order, not by a watch (watches may lose updates); takes no lease.
    """
    return asyncio.run(_read_cluster(cfg))


def probe(cfg: ClusterConfig) -> str:
    """Connect once and ask JetStream for this account's figures (``imgworker check``); ClusterUnavailable if none."""
    return asyncio.run(_probe(cfg))


async def _probe(cfg: ClusterConfig) -> str:
    nc = await _connect_once(cfg)
    try:
        info = await nc.jetstream(timeout=CALL_TIMEOUT_S).account_info()
        return f"JetStream answers ({info.streams} streams, {info.consumers} consumers)"
    except Exception as exc:
        raise ClusterUnavailable(str(exc) or type(exc).__name__) from exc
    finally:
        await nc.close()


async def _connect_once(cfg: ClusterConfig) -> Any:
    """A connection without reconnects; ClusterUnavailable naming the client's last error if there is none."""
    import nats

    options: dict[str, Any] = {}
    if cfg.credentials_file:
        options["user_credentials"] = cfg.credentials_file
    if cfg.ca_bundle:
        options["tls"] = ssl.create_default_context(cafile=cfg.ca_bundle)
    errors: list[str] = []

    async def error(exc: Exception) -> None:
        errors.append(str(exc) or type(exc).__name__)
        await _log_error(exc)

    try:
        return await nats.connect([u.strip() for u in cfg.url.split(",")], connect_timeout=2, allow_reconnect=False,
                                  max_reconnect_attempts=1, error_cb=error, **options)
    except Exception as exc:
        cause = str(exc) or type(exc).__name__
        raise ClusterUnavailable(f"{cause}: {errors[-1]}" if errors and errors[-1] != cause else cause) from exc


async def _read_cluster(cfg: ClusterConfig) -> tuple[list[bytes], dict[str, int]]:
    import nats.errors
    import nats.js.errors

    nc = await _connect_once(cfg)
    try:
        js = nc.jetstream(timeout=CALL_TIMEOUT_S)
        stream = f"KV_{cfg.ledger_bucket}"
        info = await js.stream_info(stream)
        values: list[bytes] = []
        if info.state.messages:
            sub = await js.subscribe(f"$KV.{cfg.ledger_bucket}.>", ordered_consumer=True, stream=stream)
            try:
                while len(values) < info.state.messages:
                    try:
                        message = await sub.next_msg(timeout=5.0)
                    except nats.errors.TimeoutError:
                        break
                    if message.data:  # a delete marker has none (ledger keys are never deleted)
                        values.append(message.data)
            finally:
                await sub.unsubscribe()
        figures = await _figures(js, cfg)
        return values, figures
    except nats.js.errors.NotFoundError as exc:  # the first host creates them
        raise ClusterMissing(f"its ledger bucket {cfg.ledger_bucket!r}, work stream {cfg.stream!r} or consumer "
                             f"{cfg.consumer!r} does not exist ({exc.description or exc})") from exc
    except Exception as exc:
        raise ClusterUnavailable(str(exc) or type(exc).__name__) from exc
    finally:
        await nc.close()


async def _figures(js: Any, cfg: ClusterConfig) -> dict[str, int]:
    stream = await js.stream_info(cfg.stream)
    consumer = await js.consumer_info(cfg.stream, cfg.consumer)
    return {"stream_messages": stream.state.messages, "consumer_pending": consumer.num_pending or 0,
            "consumer_ack_pending": consumer.num_ack_pending or 0,
            "consumer_redelivered": consumer.num_redelivered or 0}


def _version(message: Any) -> str:
    """The object version a held work message names (its image decoded again)."""
    return image_version(msgspec.msgpack.decode(message.data, type=ImageRef))


class _EventsStreamMissing(Exception):
    """MinIO's stream does not exist (MinIO publishes only into an existing one)."""


async def _nak_all(messages: list[Any], *, delay: float | None = None) -> None:
    """Hand MinIO's messages back; one that cannot be naked comes again after its AckWait."""
    for message in messages:
        try:
            await message.nak(delay=delay)
        except Exception as exc:  # nats-py raises many kinds; the connection may be going
            log.debug("could not nak a MinIO notification: %s", str(exc) or type(exc).__name__)
            return


async def _cancel_the_rest() -> None:
    """Cancel every other task of the link's loop (the client's own, should its close not have ended them)."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _log_error(exc: Exception) -> None:
    log.debug("NATS: %s", str(exc) or type(exc).__name__)


async def _reconnected() -> None:
    log.info("NATS connection back")
