"""The Celery peer of benchmarks.peers: an app whose one task does what an imgworker worker does.

``celery -A benchmarks._celery_peer --broker URL --result-backend URL worker ...`` imports this
module and runs ``app``; the broker and backend come from those flags. Each pool process builds
its own clients on its first task, from the ``PEERS_TARGET`` environment variable (JSON of
``_floor.Target``) that benchmarks.peers sets for the worker subprocess only, so credentials
never appear on a command line. The task runs ``_floor.handle`` and returns its ``Timing``.
"""

from __future__ import annotations

import functools
import os

import msgspec
from celery import Celery

from ._floor import Clients, Target, handle

TASK = "peers.handle_image"
TARGET_ENV = "PEERS_TARGET"


def make_app(url: str | None = None, queue: str = "celery") -> Celery:
    """The app, on one Redis-protocol server as broker and result backend; acks late, prefetch 1."""
    app = Celery("peers", broker=url, backend=url, set_as_current=False)
    app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1, task_default_queue=queue,
                    task_serializer="json", result_serializer="json", accept_content=["json"],
                    broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)
    app.task(name=TASK)(handle_image)
    return app


def handle_image(key: str) -> list[float | bool]:
    """Stat, presign, POST one image; returns ``[started, finished, algo_ms, ok]``."""
    timing = handle(_clients(os.getpid()), key)
    return [timing.started, timing.finished, timing.algo_ms, timing.ok]


@functools.cache
def _clients(pid: int) -> Clients:
    """This pool process's clients (keyed by pid: a forked child never reuses its parent's)."""
    return Clients(msgspec.json.decode(os.environ[TARGET_ENV], type=Target))


app = make_app()
