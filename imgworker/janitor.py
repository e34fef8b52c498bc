"""The janitor: the one owner of every change imgworker makes in the store.

Cleaner deletes and result actions (``copy_alerts``, ``write_results``, ``delete_no_detection``)
are jobs, run in order by one background thread of the supervisor, so the loop never waits on
the store (``run_now`` runs jobs in the caller's thread: only for deletes that must leave no
window after the cleaner's plan, see ``retention``). A job is submitted only after the image's result line is written; before running
jobs the janitor fsyncs the results journal (durable before destructive, even across a power
loss). Consecutive delete jobs are coalesced into one batch request. A failed action (store
unreachable) is retried with capped backoff, and its image stays protected from the cleaner
until it succeeds or is given up after ``MAX_ATTEMPTS`` (counted in ``action_errors``). The keys
of cleaner deletes not done yet are known (``deleting``), so a later pass does not plan them again.

The janitor also keeps the checkpoint's *watermark*: the offset of the oldest result line whose
actions are not done yet. A checkpoint records that offset, so after a crash the actions of
every line past it are run again. They are idempotent (a copy or a put overwrites the same
key; deleting a deleted key is not an error).

An action given up (the store stayed unreachable) is *owed*: it no longer holds the watermark
back, nor its image from the cleaner, but ``owed()`` lists it (result line, action, key) until a
later attempt succeeds. A checkpoint saves that list and the next start submits those actions
again (``Job.owed``). An action that cannot succeed (its image is gone) is not owed.

With ``inline=True`` jobs run in the caller's thread at ``collect()``: deterministic tests.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

import msgspec

from .backoff import Backoff
from .errors import ObjectMissing, StoreError

log = logging.getLogger(__name__)
T = TypeVar("T")


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
    attempt: int = 0
    not_before: float = 0.0
    owed: bool = False  # given up by an earlier run: tried again, without holding the watermark back


class Done(msgspec.Struct, frozen=True):
    """What a finished job did: keys deleted or refused, whether it failed, and whether it never can succeed."""

    job: Job
    deleted: int = 0
    refused: int = 0
    failed: bool = False
    impossible: bool = False  # its image is gone: neither retried nor owed


class OwedAction(msgspec.Struct, frozen=True, array_like=True):
    """An action given up: the offset of its result line, the action's name, the image."""

    line: int
    action: str
    key: str


MAX_ATTEMPTS = 8  # about two minutes of capped backoff, then an action is given up (and counted)
_ACTION_BACKOFF = Backoff(0.5, 30.0)  # between tries of a failed result action: 0.5 s doubling, capped


class Janitor:
    """Runs store jobs in submission order on one thread; retries failed actions; reports what they did."""

    def __init__(self, store: JanitorStore, *, sync: Callable[[], object], batch_size: int = 1000,
                 inline: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.sync = sync
        self.batch_size = batch_size
        self.inline = inline
        self.clock = clock
        self._jobs: collections.deque[Job] = collections.deque()
        self._done: collections.deque[Done] = collections.deque()
        self._open_lines: collections.Counter[int] = collections.Counter()  # result lines with unfinished actions
        self._open_keys: collections.Counter[str] = collections.Counter()  # images with unfinished actions
        self._deleting: collections.Counter[str] = collections.Counter()  # keys of cleaner deletes not done yet
        self._owed: dict[tuple[int, str], str] = {}  # (line, action) -> key of actions given up, not yet done
        self._lock = threading.Condition()
        self._busy = False
        self._closing = False
        self._give_up_at = float("inf")
        self._thread: threading.Thread | None = None
        if not inline:
            self._thread = threading.Thread(target=self._run, name="imgworker-janitor", daemon=True)
            self._thread.start()

    def submit(self, jobs: list[Job]) -> None:
        with self._lock:
            for job in jobs:
                self._jobs.append(job)
                if job.line < 0:
                    self._deleting.update(job.keys)
                    continue
                if job.owed:
                    self._owed[(job.line, job.action)] = job.keys[0]
                else:
                    self._open_lines[job.line] += 1
                self._open_keys.update(job.keys)
            self._lock.notify()

    def run_now(self, jobs: list[Job]) -> list[Done]:
        """Run jobs in the caller's thread at once: for deletes that must leave no window after the plan."""
        return [done for job in jobs for done in self._execute([job])]

    def deleting(self) -> set[str]:
        """Keys of the cleaner deletes submitted and not done yet (a later pass counts them as gone)."""
        with self._lock:
            return set(self._deleting)

    def owed(self) -> list[OwedAction]:
        """Actions given up and not done since, in results-file order: a checkpoint saves them."""
        with self._lock:
            return [OwedAction(line=line, action=action, key=key)
                    for (line, action), key in sorted(self._owed.items())]

    def has_open_actions(self, key: str) -> bool:
        """True while an action of this image is not done: the cleaner must not delete it yet."""
        with self._lock:
            return self._open_keys[key] > 0

    def watermark(self, end: int) -> int:
        """Offset before which every result line's actions are done (``end`` if none is open)."""
        with self._lock:
            return min(self._open_lines) if self._open_lines else end

    @property
    def outstanding(self) -> int:
        with self._lock:
            return len(self._jobs) + int(self._busy)

    def collect(self) -> list[Done]:
        """Reports of finished jobs since the last call (inline: run the jobs that are due now)."""
        if self.inline:
            while self._step(block=False):
                pass
        with self._lock:
            out = list(self._done)
            self._done.clear()
        return out

    def close(self, deadline: float) -> list[Done]:
        """Work until ``deadline``, then stop; what is left is redone after a restart (see watermark)."""
        with self._lock:
            self._closing = True
            self._give_up_at = deadline
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - self.clock()) + 0.1)
        else:
            while self.clock() < deadline and self._step(block=False):
                pass
        if self.outstanding:
            log.warning("janitor: %d store jobs not finished at exit; they are redone at the next start",
                        self.outstanding)
        with self._lock:
            out = list(self._done)
            self._done.clear()
        return out

    def _run(self) -> None:
        while self._step(block=True):
            pass

    def _step(self, *, block: bool) -> bool:
        """Run the next due job (or batch of deletes); False when there is nothing more to do now."""
        with self._lock:
            batch = self._wait_for_batch(block)
            if not batch:
                return False
            self._busy = True
        done: list[Done] = []
        try:
            done = self._execute(batch)
        except Exception:  # never let the thread die: the job is retried like a store failure
            log.exception("janitor: unexpected error on %s %s", batch[0].kind, batch[0].keys[:1])
            done = [Done(job=job, failed=True, refused=len(job.keys) if job.kind == "delete" else 0) for job in batch]
        finally:
            with self._lock:
                self._busy = False
                for report in done:
                    self._settle(report)
        return True

    def _wait_for_batch(self, block: bool) -> list[Job]:
        """The next due batch, waiting for one if ``block`` (called with the lock held)."""
        while True:
            now = self.clock()
            if self._closing and now >= self._give_up_at:
                return []
            if self._jobs and self._jobs[0].not_before <= now:
                return self._next_batch()
            if not block or (self._closing and not self._jobs):
                return []
            due = self._jobs[0].not_before if self._jobs else float("inf")
            self._lock.wait(max(0.01, min(due, self._give_up_at) - now) if due < float("inf") or self._closing
                            else None)

    def _settle(self, report: Done) -> None:
        """Book a finished job; a failed action is queued again with backoff until MAX_ATTEMPTS, then owed."""
        job = report.job
        if job.line >= 0 and report.failed and not report.impossible and job.attempt + 1 < MAX_ATTEMPTS:
            delay = _ACTION_BACKOFF.delay(job.attempt + 1)
            self._jobs.append(msgspec.structs.replace(job, attempt=job.attempt + 1, not_before=self.clock() + delay))
            return
        if job.line >= 0 and report.failed and not report.impossible:
            log.error("janitor: %s of %s given up after %d attempts; it is tried again at the next start",
                      job.action, job.keys[0], MAX_ATTEMPTS)
            self._owed[(job.line, job.action)] = job.keys[0]
        elif job.line >= 0:
            self._owed.pop((job.line, job.action), None)
        self._done.append(report)
        self._release(job)

    def _release(self, job: Job) -> None:
        if job.line < 0:
            _subtract(self._deleting, job.keys)
            return
        if not job.owed:
            _subtract(self._open_lines, (job.line,))
        _subtract(self._open_keys, job.keys)

    def _next_batch(self) -> list[Job]:
        """One job, or consecutive due delete jobs up to the batch size (called with the lock held)."""
        batch = [self._jobs.popleft()]
        if batch[0].kind != "delete":
            return batch
        size = len(batch[0].keys)
        while (self._jobs and self._jobs[0].kind == "delete" and self._jobs[0].not_before <= self.clock()
               and size + len(self._jobs[0].keys) <= self.batch_size):
            size += len(self._jobs[0].keys)
            batch.append(self._jobs.popleft())
        return batch

    def _execute(self, batch: list[Job]) -> list[Done]:
        """fsync the results journal first (the job acts on written outcomes), then run the batch."""
        try:
            self.sync()
        except OSError as exc:
            log.warning("janitor: cannot fsync the results file (%s); store changes wait", exc)
            return [Done(job=job, failed=True, refused=len(job.keys) if job.kind == "delete" else 0) for job in batch]
        if batch[0].kind == "delete":
            return self._delete(batch)
        job = batch[0]
        try:
            if job.kind == "copy":
                self.store.copy(job.keys[0], job.target)
            else:
                self.store.put(job.target, job.body, job.content_type)
        except ObjectMissing as exc:
            log.warning("janitor: %s of %s impossible: %s", job.action, job.keys[0], exc)
            return [Done(job=job, failed=True, impossible=True)]
        except StoreError as exc:
            log.warning("janitor: %s of %s failed (attempt %d): %s", job.action, job.keys[0], job.attempt + 1, exc)
            return [Done(job=job, failed=True)]
        return [Done(job=job)]

    def _delete(self, batch: list[Job]) -> list[Done]:
        """One batch delete for every key of the batch."""
        keys = [key for job in batch for key in job.keys]
        try:
            refused = set(self.store.delete(keys))
        except StoreError as exc:
            log.warning("janitor: delete of %d images failed (%s)", len(keys), exc)
            refused = set(keys)
        return [_delete_done(job, refused) for job in batch]


def _subtract(counter: collections.Counter[T], items: Iterable[T]) -> None:
    """Count ``items`` down once each; drop what reaches zero."""
    for item in items:
        counter[item] -= 1
        if counter[item] <= 0:
            del counter[item]


def _delete_done(job: Job, refused: set[str]) -> Done:
    bad = sum(1 for key in job.keys if key in refused)
    return Done(job=job, deleted=len(job.keys) - bad, refused=bad, failed=bad > 0)
