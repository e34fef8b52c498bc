"""The per-image job without imgworker, and the bare-thread floor that runs it.

``handle`` is what an imgworker worker does for one image, written with nothing around it:
StatObject, presign a GET URL (the region is set, so presigning makes no network call), POST
``{image_url, task_id, task_type, image_path}`` to the algorithm service and read its answer.
It records when it started and finished (wall clock, comparable across processes) and how long
the POST took. The Celery task in ``_celery_peer`` calls the same function.

``run_floor`` is the least any implementation can cost on this machine: N threads in one
process, each with its own minio client and ``requests.Session``, taking keys from a pre-built
list (no dispatch, no discovery, no outcomes written anywhere).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta

import msgspec
import psutil
import requests
from minio import Minio

PRESIGN_EXPIRY = timedelta(minutes=15)


class Target(msgspec.Struct, frozen=True, kw_only=True):
    """Where the job goes: the store (with its credentials) and the algorithm service."""

    store_endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    algo_endpoint: str
    timeout_s: float = 30.0


class Timing(msgspec.Struct, frozen=True, array_like=True):
    """One image: wall-clock start and end of its job, the POST's duration, and whether it succeeded."""

    started: float
    finished: float
    algo_ms: float
    ok: bool


class Clients:
    """One minio client and one keep-alive HTTP session: one per thread or per process."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.minio = Minio(target.store_endpoint, access_key=target.access_key, secret_key=target.secret_key,
                           secure=False, region="us-east-1")
        self.session = requests.Session()
        self.session.headers["Content-Type"] = "application/json"

    def close(self) -> None:
        self.session.close()


def handle(clients: Clients, key: str) -> Timing:
    """Stat, presign, POST one image; any error, a non-200 answer or one without ``success`` is not ok."""
    started = time.time()
    try:
        return _job(clients, key, started)
    except Exception:  # a failed image is counted as such; it must not end the measurement
        return Timing(started, time.time(), 0.0, False)


def _job(clients: Clients, key: str, started: float) -> Timing:
    target = clients.target
    clients.minio.stat_object(target.bucket, key)
    url = clients.minio.presigned_get_object(target.bucket, key, expires=PRESIGN_EXPIRY)
    body = msgspec.json.encode({"image_url": url, "task_id": "", "task_type": "", "image_path": key})
    t = time.monotonic()
    resp = clients.session.post(target.algo_endpoint, data=body, timeout=target.timeout_s)
    algo_ms = (time.monotonic() - t) * 1000.0
    ok = resp.status_code == 200 and "success" in msgspec.json.decode(resp.content)
    return Timing(started, time.time(), algo_ms, ok)


class _Keys:
    """The pre-built list, handed out one key at a time to whichever thread asks."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._iter: Iterator[str] = iter(keys)
        self._lock = threading.Lock()

    def next(self) -> str | None:
        with self._lock:
            return next(self._iter, None)


def _thread(target: Target, keys: _Keys, start: threading.Barrier, out: list[Timing]) -> None:
    clients = Clients(target)  # built before the start barrier: not part of the measurement
    try:
        start.wait()
        while (key := keys.next()) is not None:
            out.append(handle(clients, key))
    finally:
        clients.close()


def run_floor(target: Target, keys: Sequence[str], workers: int) -> tuple[list[Timing], float]:
    """Run every key on ``workers`` threads; return the timings and this process's CPU-seconds spent."""
    me = psutil.Process()
    start = threading.Barrier(workers + 1, timeout=120.0)
    queue = _Keys(keys)
    out: list[Timing] = []  # list.append is atomic under the GIL
    threads = [threading.Thread(target=_thread, args=(target, queue, start, out), daemon=True, name=f"floor-{i}")
               for i in range(workers)]
    for thread in threads:
        thread.start()
    start.wait()
    cpu0 = _cpu(me)
    for thread in threads:
        thread.join()
    return out, _cpu(me) - cpu0


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system
