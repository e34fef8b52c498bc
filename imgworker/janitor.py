"""The janitor: the one owner of every change imgworker makes in the store.

Cleaner deletes and result actions (``copy_alerts``, ``write_results``, ``delete_no_detection``)
are jobs, run in order by one background thread of the supervisor, so the loop never waits on
the store. A job is submitted only after the image's result line is written; before any delete
the janitor fsyncs the results journal (durable before destructive). Consecutive delete jobs
are coalesced into one batch request.

The janitor also keeps the checkpoint's *watermark*: the offset of the oldest result line whose
actions are not done yet. A checkpoint records that offset, so after a crash the actions of
every line past it are run again. They are idempotent (a copy or a put overwrites the same
key; deleting a deleted key is not an error).

With ``inline=True`` jobs run in the caller's thread at ``collect()``: deterministic tests.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

import msgspec

from .errors import StoreError

log = logging.getLogger(__name__)


class JanitorStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str = ...) -> None: ...
    def copy(self, source: str, target: str) -> None: ...
    def delete(self, keys: list[str]) -> list[str]: ...


class Job(msgspec.Struct, frozen=True):
    """One change in the store. ``line`` is the result line it belongs to (-1: a cleaner delete)."""

    kind: str  # "delete" | "copy" | "put"
    keys: tuple[str, ...]
    action: str = "cleaner"
    target: str = ""
    body: bytes = b""
    content_type: str = "application/json"
    line: int = -1


class Done(msgspec.Struct, frozen=True):
    """What a finished job did: keys deleted or refused, and a failed action's name."""

    job: Job
    deleted: int = 0
    refused: int = 0
    failed: bool = False


class Janitor:
    """Runs store jobs in submission order on one thread; reports what they did."""

    def __init__(self, store: JanitorStore, *, sync: Callable[[], object], batch_size: int = 1000,
                 inline: bool = False) -> None:
        self.store = store
        self.sync = sync
        self.batch_size = batch_size
        self.inline = inline
        self._jobs: collections.deque[Job] = collections.deque()
        self._done: collections.deque[Done] = collections.deque()
        self._open_lines: collections.deque[int] = collections.deque()  # line of each unfinished action job
        self._open_keys: collections.Counter[str] = collections.Counter()  # images with unfinished actions
        self._lock = threading.Condition()
        self._busy = False
        self._closing = False
        self._thread: threading.Thread | None = None
        if not inline:
            self._thread = threading.Thread(target=self._run, name="imgworker-janitor", daemon=True)
            self._thread.start()

    def submit(self, jobs: list[Job]) -> None:
        with self._lock:
            for job in jobs:
                self._jobs.append(job)
                if job.line >= 0:
                    self._open_lines.append(job.line)
                    self._open_keys.update(job.keys)
            self._lock.notify()

    def run_now(self, jobs: list[Job]) -> list[Done]:
        """Run jobs in the caller's thread at once (cleaner passes: no window between plan and delete)."""
        return [done for job in jobs for done in self._execute([job])]

    def has_open_actions(self, key: str) -> bool:
        """True while an action of this image is not done: the cleaner must not delete it yet."""
        with self._lock:
            return self._open_keys[key] > 0

    def watermark(self, end: int) -> int:
        """Offset before which every result line's actions are done (``end`` if none is open)."""
        with self._lock:
            return self._open_lines[0] if self._open_lines else end

    @property
    def outstanding(self) -> int:
        with self._lock:
            return len(self._jobs) + int(self._busy)

    def collect(self) -> list[Done]:
        """Reports of finished jobs since the last call (inline: run the queued jobs now)."""
        if self.inline:
            while self._step(block=False):
                pass
        with self._lock:
            out = list(self._done)
            self._done.clear()
        return out

    def close(self, deadline: float) -> list[Done]:
        """Finish queued jobs until ``deadline``; what is left is redone after a restart (see watermark)."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                log.warning("janitor: %d store jobs not finished at exit; they are redone at the next start",
                            self.outstanding)
        return self.collect()

    def _run(self) -> None:
        while self._step(block=True):
            pass

    def _step(self, *, block: bool) -> bool:
        """Run the next job (or batch of deletes); False when there is nothing more to do."""
        with self._lock:
            while block and not self._jobs and not self._closing:
                self._lock.wait()
            if not self._jobs:
                return False
            batch = self._next_batch()
            self._busy = True
        try:
            done = self._execute(batch)
        finally:
            with self._lock:
                self._busy = False
                self._done.extend(done)
                for job in batch:
                    if job.line >= 0:
                        self._open_lines.popleft()
                        self._open_keys.subtract(job.keys)
                        for key in job.keys:
                            if self._open_keys[key] <= 0:
                                del self._open_keys[key]
        return True

    def _next_batch(self) -> list[Job]:
        """One job, or consecutive delete jobs up to the batch size (called with the lock held)."""
        batch = [self._jobs.popleft()]
        if batch[0].kind != "delete":
            return batch
        size = len(batch[0].keys)
        while self._jobs and self._jobs[0].kind == "delete" and size + len(self._jobs[0].keys) <= self.batch_size:
            size += len(self._jobs[0].keys)
            batch.append(self._jobs.popleft())
        return batch

    def _execute(self, batch: list[Job]) -> list[Done]:
        if batch[0].kind == "delete":
            return self._delete(batch)
        job = batch[0]
        try:
            if job.kind == "copy":
                self.store.copy(job.keys[0], job.target)
            else:
                self.store.put(job.target, job.body, job.content_type)
        except StoreError as exc:
            log.warning("janitor: %s of %s failed: %s", job.action, job.keys[0], exc)
            return [Done(job=job, failed=True)]
        return [Done(job=job)]

    def _delete(self, batch: list[Job]) -> list[Done]:
        """fsync the results journal, then one batch delete for every key of the batch."""
        keys = [key for job in batch for key in job.keys]
        try:
            self.sync()
            refused = set(self.store.delete(keys))
        except (StoreError, OSError) as exc:
            log.warning("janitor: delete of %d images failed (%s); the next pass retries", len(keys), exc)
            refused = set(keys)
        return [_delete_done(job, refused) for job in batch]


def _delete_done(job: Job, refused: set[str]) -> Done:
    bad = sum(1 for key in job.keys if key in refused)
    return Done(job=job, deleted=len(job.keys) - bad, refused=bad, failed=bad > 0)
