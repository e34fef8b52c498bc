"""A NATS pull fetch whose wait ran out with nothing to deliver is an empty fetch, not an outage.

nats-py (2.16) raises its own ``nats.errors.TimeoutError`` when a fetch waited in vain, but a
batch fetch whose first, no-wait request took the whole timeout (a loaded host) raises the plain
``asyncio.TimeoutError`` instead. Both mean "nothing came". Stand-in subscriptions raise each, as
nats-py does, at the three places imgworker fetches: a cluster host's work fetch (``ClusterHost.feed``
through ``JetStreamLink``), the intake leader's fetch of MinIO's notifications, and the one-host
``minio_nats`` watcher's batch after its first message.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import nats.errors
import pytest

from imgworker.cluster import jetstream
from imgworker.cluster.host import ClusterHost
from imgworker.cluster.jetstream import JetStreamLink
from imgworker.config import load_config
from imgworker.dispatch import Dispatch
from imgworker.events.nats import _next_messages
from imgworker.outcomes import ImageRef

WAIT_RAN_OUT = pytest.mark.parametrize("error", [asyncio.TimeoutError, nats.errors.TimeoutError], ids=["plain", "nats"])


class EmptySubscription:
    """A pull subscription with nothing to deliver: each fetch raises ``error``, as nats-py does."""

    def __init__(self, error: type[Exception]) -> None:
        self.error = error
        self.fetches = 0

    async def fetch(self, batch: int, timeout: float) -> list[Any]:
        self.fetches += 1
        raise self.error()


class Sink:
    """Where fetched images would go (none come here)."""

    def accepted(self, ref: ImageRef) -> None: ...

    def finish(self, result: Any) -> None: ...


def cluster_cfg(tmp_path: Any) -> Any:
    return load_config(env={}, overrides={"cluster": {"url": "nats://127.0.0.1:1", "host": "h1"},
                                          "run": {"state_dir": str(tmp_path / "state")}})


@WAIT_RAN_OUT
def test_a_host_whose_fetch_found_nothing_logs_no_failure_and_fetches_again_at_once(tmp_path, caplog, error):
    cfg = cluster_cfg(tmp_path)
    link = JetStreamLink(cfg.cluster, host="h1", bucket=cfg.store.bucket)
    sub = EmptySubscription(error)
    link._sub = sub
    link._thread.start()  # the link's loop, without a server: only the fetch runs on it
    try:
        host = ClusterHost(cfg, link=link)
        dispatch = Dispatch(cfg.dispatch, lambda: 0.0)
        with caplog.at_level(logging.INFO):
            host.feed(dispatch, Sink(), idle=4)  # type: ignore[arg-type]
            host.feed(dispatch, Sink(), idle=4)  # type: ignore[arg-type]
    finally:
        link._loop.call_soon_threadsafe(link._loop.stop)
        link._thread.join(5.0)
    assert sub.fetches == 2, "an empty fetch is not an outage: the next one is not held back"
    assert dispatch.pending == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]


@WAIT_RAN_OUT
def test_the_leader_s_fetch_of_minio_s_notifications_that_found_nothing_is_empty(tmp_path, error):
    link = JetStreamLink(cluster_cfg(tmp_path).cluster, host="h1", bucket="pics")
    assert asyncio.run(link._events_fetch(EmptySubscription(error))) == []


class OneMessageThenNothing:
    """MinIO's stream on a one-host watcher: one message, then a batch fetch whose wait ran out."""

    def __init__(self, error: type[Exception]) -> None:
        self.error = error

    async def fetch(self, batch: int, timeout: float) -> list[Any]:
        if batch == 1:
            return ["the first message"]
        raise self.error()


@WAIT_RAN_OUT
def test_the_minio_nats_watcher_keeps_its_first_message_when_the_rest_of_the_batch_does_not_come(error):
    async def fetch() -> list[Any]:
        return await _next_messages(OneMessageThenNothing(error), asyncio.Event())  # type: ignore[arg-type]

    assert asyncio.run(fetch()) == ["the first message"]


def test_a_failure_without_a_message_is_logged_by_its_type(tmp_path, caplog, monkeypatch):
    """An exception whose text is empty (a plain TimeoutError) names its type in the WARNING, not nothing."""
    monkeypatch.setattr(jetstream, "EVENTS_RETRY_S", 0.01)
    link = JetStreamLink(cluster_cfg(tmp_path).cluster, host="h1", bucket="pics")
    monkeypatch.setattr(link, "leading", lambda: True)

    async def failing_subscription(events: Any) -> Any:
        raise ConnectionResetError()

    monkeypatch.setattr(link, "_events_subscription", failing_subscription)

    async def one_failure() -> None:
        task = asyncio.ensure_future(link._republish_events(object()))  # type: ignore[arg-type]
        while not [r for r in caplog.records if r.levelno == logging.WARNING]:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.WARNING):
        asyncio.run(asyncio.wait_for(one_failure(), 10))
    [warning] = {r.getMessage() for r in caplog.records if r.levelno == logging.WARNING}
    assert warning == "MinIO's notifications: ConnectionResetError; trying again in 0 s"
