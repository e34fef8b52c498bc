"""The MinIO-through-NATS source: a durable JetStream pull consumer, on an asyncio loop.

    MinIO ── NATS JetStream ─▶ NatsFeed.session (asyncio) ─▶ parse_minio ─▶ wanted ─▶ pipe ─▶ ack
    supervisor's STOP ─▶ stop-listener thread ─▶ stop_sending, then the loop's stop event

A message is acknowledged only once its batch is in the pipe; one fetched but refused by the pipe
(the stop began, or the supervisor is gone) is naked, so JetStream hands it out again. Needs the
``nats-py`` package (``pip install imgworker[nats]``), imported only here and only when this source runs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from ..backoff import Backoff
from ..config import Config, EventsConfig
from .messages import (
    MAX_BATCH_EVENTS, MAX_BATCH_WAIT_S, OVERLAP_NS, RESTART_BACKOFF_S, ChangeEvent, EventBatch, EventError, Pipe,
    WatcherReady, wanted,
)
from .minio import parse_minio

if TYPE_CHECKING:
    import asyncio

    from nats.js.api import ConsumerConfig
    from nats.js.client import JetStreamContext

log = logging.getLogger(__name__)
_T = TypeVar("_T")


def run(cfg: Config, pipe: Pipe, since_ns: int, source: EventsConfig) -> None:
    import asyncio

    asyncio.run(NatsFeed(cfg, pipe, since_ns, source).run())


class NatsFeed:
    """Pulls MinIO's notifications from a durable JetStream consumer; acks once their batch is in the pipe.

    A new consumer starts at ``since_ns`` (less ``OVERLAP_NS``), or at new messages when it is 0; an
    existing one resumes where it was acknowledged. A lost server is retried with backoff.
    """

    def __init__(self, cfg: Config, pipe: Pipe, since_ns: int, source: EventsConfig) -> None:
        self.cfg = cfg
        self.pipe = pipe
        self.since_ns = since_ns
        self.source = source
        self.ready = False  # WatcherReady sent
        self.subscribed = False  # this session got as far as its subscription
        self.gone = False  # the supervisor went away

    async def run(self) -> None:
        import asyncio

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def listen() -> None:
            self.pipe.wait_for_stop()
            self.pipe.stop_sending()  # nothing is acknowledged any more unless its batch is already in the pipe
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=listen, name="stop-listener", daemon=True).start()
        backoff = Backoff(*RESTART_BACKOFF_S)
        while not stop.is_set() and not self.gone:
            try:
                await self.session(stop)
            except Exception as exc:  # nats-py raises many kinds; each means: connect again
                if self.subscribed:  # it worked for a while: this is a new failure, not the same one again
                    backoff.reset()
                    self.subscribed = False
                wait_s = backoff.fail()
                log.warning("NATS consumer failed (%s); connecting again in %.1f s", str(exc) or type(exc).__name__,
                            wait_s)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait_s)

    async def session(self, stop: asyncio.Event) -> None:
        """One connection: subscribe, then batches until stopped."""
        import nats

        # No reconnects inside the client: a lost connection ends the session and run() connects again
        # with backoff. (max_reconnect_attempts=1 makes the first connect give up; 0 would retry forever.)
        token = self.cfg.credentials.webhook_token or None
        connect = nats.connect(self.source.nats_url, token=token, connect_timeout=2, allow_reconnect=False,
                               max_reconnect_attempts=1, reconnect_time_wait=0.2, error_cb=_log_nats_error)
        nc = await _unless_stopped(connect, stop)
        if nc is None:
            return
        try:
            sub = await nc.jetstream().pull_subscribe(self.source.nats_subject, durable=self.source.nats_durable,
                                                      stream=self.source.nats_stream or None,
                                                      config=self.consumer_config())
            self.subscribed = True
            if not self.ready:
                self.ready = True
                if not self.pipe.send(WatcherReady(port=0)):
                    self.gone = True
                    return
            while not stop.is_set() and not self.gone:
                messages = await _next_messages(sub, stop)
                if messages:
                    await self.deliver(messages)
                    await nc.flush()
        finally:
            await nc.close()

    def consumer_config(self) -> ConsumerConfig:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        if not self.since_ns:
            return ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.NEW)
        start = dt.datetime.fromtimestamp(max(0, self.since_ns - OVERLAP_NS) / 1e9, tz=dt.timezone.utc)
        return ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.BY_START_TIME,
                              opt_start_time=start)

    async def deliver(self, messages: list[Any]) -> None:
        """Send the wanted events of ``messages`` as one batch; then ack them (a malformed one is dropped).

        A batch the pipe refused (the stop began, or the supervisor is gone) is not acknowledged: its
        messages are naked, so the durable consumer hands them out again at once.
        """
        import asyncio

        wanted_events: list[ChangeEvent] = []
        malformed = set()
        for message in messages:
            try:
                wanted_events += [e for e in parse_minio(message.data, self.cfg.store.bucket) if wanted(e, self.cfg)]
            except EventError as exc:
                log.warning("dropping a NATS message: %s", exc)
                malformed.add(id(message))
        if wanted_events:
            batch = EventBatch(events=wanted_events, ts_ns=max(e.ts_ns for e in wanted_events))
            if not await asyncio.to_thread(self.pipe.send, batch):  # a full pipe must not stall the client
                self.gone = True
                await _nak(messages)
                return
        for message in messages:
            await (message.term() if id(message) in malformed else message.ack())


async def _nak(messages: list[Any]) -> None:
    """Hand ``messages`` back to the consumer; one that cannot be naked comes again after its ack wait."""
    for message in messages:
        try:
            await message.nak()
        except Exception as exc:  # nats-py raises many kinds; the connection may be going
            log.debug("could not nak a NATS message: %s", str(exc) or type(exc).__name__)
            return


async def _unless_stopped(work: Awaitable[_T], stop: asyncio.Event) -> _T | None:
    """``work``'s result, or None (and ``work`` cancelled) if ``stop`` comes first."""
    import asyncio

    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)  # retrieved, so nothing is logged as lost
        return None
    return task.result()


async def _next_messages(sub: JetStreamContext.PullSubscription, stop: asyncio.Event) -> list[Any]:
    """The first message that comes (waiting until ``stop``), then what else comes within ``MAX_BATCH_WAIT_S``."""
    import asyncio

    # asyncio.TimeoutError also catches nats-py's own: a batch fetch whose wait ran out raises the plain one
    try:
        messages = list(await _unless_stopped(sub.fetch(1, timeout=5.0), stop) or [])
    except asyncio.TimeoutError:
        return []
    if not messages:
        return []
    try:
        messages += await sub.fetch(MAX_BATCH_EVENTS - 1, timeout=MAX_BATCH_WAIT_S)
    except asyncio.TimeoutError:
        pass
    return messages


async def _log_nats_error(exc: Exception) -> None:
    log.debug("NATS: %s", str(exc) or type(exc).__name__)  # the session's end is logged once, by NatsFeed.run

