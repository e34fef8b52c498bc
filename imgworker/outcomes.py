"""Outcome names, the unit of work, and the per-image result record."""

from __future__ import annotations

import enum

import msgspec


class Outcome(str, enum.Enum):
    """Every image the scanner accepts ends in exactly one of these."""

    INFERRED = "inferred"
    NO_DETECTION = "no_detection"
    SKIPPED_MISSING = "skipped_missing"
    FAILED_MISSING = "failed_missing"
    FAILED_ALGO = "failed_algo"
    FAILED_STORE = "failed_store"
    FAILED_WORKER = "failed_worker"
    DROPPED_BACKLOG = "dropped_backlog"
    DROPPED_EXPIRED = "dropped_expired"

    @property
    def is_failure(self) -> bool:
        return self.value.startswith("failed_")

    @property
    def is_success(self) -> bool:
        return self in (Outcome.INFERRED, Outcome.NO_DETECTION)

    @property
    def reached_algo(self) -> bool:
        """Counts in the failure-rate denominator: analysed, or failed on the way."""
        return self.is_success or self.is_failure


class ImageRef(msgspec.Struct, frozen=True, array_like=True):
    """One image found by the scanner."""

    key: str
    task_type: str = ""
    task_id: str = ""
    size: int = 0
    mtime: float = 0.0
    etag: str = ""  # as listed or in a change event, quotes stripped; "" when the source gives none


class IntakePosition(msgspec.Struct, frozen=True):
    """Where intake resumes after a restart: the change-event stream, and per-directory listing checkpoints.

    ``checkpoints`` maps a task directory to the last key below which every image has an outcome
    (incremental reconciliation lists only what sorts after it). ``backlog`` holds the images found
    but not yet queued, so the event stream can resume from its high-water mark.
    """

    events_ts_ns: int = 0
    checkpoints: dict[str, str] = {}
    backlog: list[str] = []


class WorkItem(msgspec.Struct, frozen=True, array_like=True):
    """What the supervisor hands a worker: the image and which attempt this is.

    ``spared``: it was once retried without using an attempt (its process was killed for another
    lane's deadline); that happens at most once per image.
    ``waits``: how many times it was put back to wait for a healthy algorithm endpoint (it carried a
    failed probe, or its calls failed as its endpoint went down); not attempts.
    ``calls``: the algorithm calls made for it before it was put back to wait; its final line counts them.
    """

    ref: ImageRef
    attempt: int = 1
    endpoints: tuple[str, ...] = ()
    spared: bool = False
    waits: int = 0
    calls: int = 0


class Result(msgspec.Struct, frozen=True, omit_defaults=True):
    """One line of the results file: the terminal outcome of one image."""

    key: str
    outcome: Outcome
    task_type: str = ""
    task_id: str = ""
    detections: int = 0
    algo_ms: float | None = None
    e2e_ms: float | None = None
    stat_ms: float | None = None
    worker: int = -1  # the lane that handled it (-1: none); named ``worker`` because results files already say so
    attempt: int = 1
    algo_calls: int = 0
    cause: str = ""
    error: str = ""  # the service's own ``error`` text of a ``success=false`` answer (sanitized, at most 200 chars)
    endpoint: str = ""
    action_errors: tuple[str, ...] = ()
    started_at: float = 0.0
    finished_at: float = 0.0
