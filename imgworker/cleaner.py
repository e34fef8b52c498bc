"""Retention rules and protection policies (pure planning; the supervisor executes the plan).

Rules (combinable, oldest first): at most ``max_count`` images per task directory
(``<prefix>/<task_type>/<task_id>/``, with overrides per ``task_type/task_id`` or ``task_type``),
nothing older than ``max_age_s``, at most ``max_bytes`` in total.

Protection policies, by the status of an image at the moment the plan is made:

========  ====================================================================================
none      deletes what the rules say, whatever its status
inflight  never deletes an image a worker holds (other images as ``none``)
queued    deletes only images that have a terminal outcome; queued, held and not-yet-accepted
          images are protected, even if a limit is then exceeded
lease     like ``queued``, but storage wins: if a limit is still exceeded, the oldest queued or
          not-yet-accepted images are given up explicitly (``dropped_expired``) and deleted;
          held images are never deleted
========  ====================================================================================
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Callable, Iterable

import msgspec

from .config import RetentionConfig
from .outcomes import ImageRef
from .scanner import captured_at, relative_key


class Status(enum.Enum):
    HELD = "held"
    QUEUED = "queued"
    NEW = "new"  # listed, not yet accepted by the scanner
    DONE = "done"  # has its terminal outcome


class StoredImage(msgspec.Struct, frozen=True, array_like=True):
    key: str
    group: str
    size: int
    ts: float
    mtime: float = 0.0  # as listed: with ``size`` and ``etag``, the object version cluster mode's ledger names
    etag: str = ""


class Plan(msgspec.Struct):
    """What one cleaning pass will do."""

    delete: list[str] = []
    give_up: list[str] = []
    skipped_protected: int = 0
    limit_exceeded: bool = False


def image_time(ref: ImageRef) -> float:
    """Capture time from the file name, else the store's modification time."""
    stamp = captured_at(ref.key)
    return stamp if stamp is not None else ref.mtime


def stored_image(ref: ImageRef, prefix: str) -> StoredImage:
    rel = relative_key(ref.key, prefix)
    group = rel.rsplit("/", 1)[0] if "/" in rel else ""
    return StoredImage(key=ref.key, group=group, size=ref.size, ts=image_time(ref), mtime=ref.mtime,
                       etag=ref.etag)


def _count_limit(cfg: RetentionConfig, group: str) -> int:
    overrides = cfg.max_count_overrides
    if group in overrides:
        return overrides[group]
    task_type = group.split("/", 1)[0]
    return overrides.get(task_type, cfg.max_count)


class _Planner:
    def __init__(self, cfg: RetentionConfig, status: Callable[[str], Status]) -> None:
        self.cfg = cfg
        self.status = status
        self.plan = Plan(delete=[], give_up=[])
        self.removed: set[str] = set()

    def deletable_now(self, st: Status) -> bool:
        policy = self.cfg.protect
        if policy == "none":
            return True
        if policy == "inflight":
            return st is not Status.HELD
        return st is Status.DONE

    def remove(self, img: StoredImage, *, give_up: bool) -> None:
        (self.plan.give_up if give_up else self.plan.delete).append(img.key)
        self.removed.add(img.key)

    def cover(self, ordered: list[StoredImage], need: float, weight: Callable[[StoredImage], float]) -> None:
        """Remove oldest-first until ``need`` (count or bytes) is covered, as the policy allows."""
        ordered = [img for img in ordered if img.key not in self.removed]
        if self.cfg.protect in ("none", "inflight"):
            need = self._cover_strict(ordered, need, weight)
        else:
            need = self._cover_substitute(ordered, need, weight)
        if need > 0:
            self.plan.limit_exceeded = True

    def _cover_strict(self, ordered: list[StoredImage], need: float, weight: Callable[[StoredImage], float]) -> float:
        """The rule's own choice: exactly the oldest; a protected one is skipped, not replaced."""
        for img in ordered:
            if need <= 0:
                break
            need -= weight(img)
            if self.deletable_now(self.status(img.key)):
                self.remove(img, give_up=False)
            else:
                self.plan.skipped_protected += 1
        return need

    def _cover_substitute(self, ordered: list[StoredImage], need: float, weight: Callable[[StoredImage], float]) -> float:
        """Finished images first (oldest first); under lease, then the oldest queued or new ones."""
        for img in ordered:
            if need <= 0:
                return need
            if self.status(img.key) is Status.DONE:
                self.remove(img, give_up=False)
                need -= weight(img)
            else:
                self.plan.skipped_protected += 1
        if self.cfg.protect != "lease":
            return need
        for img in ordered:
            if need <= 0:
                break
            if img.key not in self.removed and self.status(img.key) in (Status.QUEUED, Status.NEW):
                self.remove(img, give_up=True)
                need -= weight(img)
        return need

    def expire(self, images: Iterable[StoredImage], cutoff: float) -> None:
        """Age rule: every image older than the cutoff must go, as the policy allows."""
        for img in images:
            if img.ts >= cutoff or img.key in self.removed:
                continue
            st = self.status(img.key)
            if self.deletable_now(st):
                self.remove(img, give_up=False)
            elif self.cfg.protect == "lease" and st in (Status.QUEUED, Status.NEW):
                self.remove(img, give_up=True)
            else:
                self.plan.skipped_protected += 1
                self.plan.limit_exceeded = True


def plan_cleanup(
    images: list[StoredImage], cfg: RetentionConfig, *, now: float, status: Callable[[str], Status]
) -> Plan:
    """Decide one pass: which images to delete, which queued ones to give up first."""
    planner = _Planner(cfg, status)
    ordered = sorted(images, key=lambda img: (img.ts, img.key))
    if cfg.max_age_s:
        planner.expire(ordered, now - cfg.max_age_s)
    if cfg.max_count or cfg.max_count_overrides:
        groups: dict[str, list[StoredImage]] = defaultdict(list)
        for img in ordered:
            groups[img.group].append(img)
        for group, members in groups.items():
            limit = _count_limit(cfg, group)
            alive = [m for m in members if m.key not in planner.removed]
            if limit and len(alive) > limit:
                planner.cover(alive, len(alive) - limit, lambda _img: 1)
    if cfg.max_bytes:
        alive = [img for img in ordered if img.key not in planner.removed]
        total = sum(img.size for img in alive)
        if total > cfg.max_bytes:
            planner.cover(alive, total - cfg.max_bytes, lambda img: img.size)
    return planner.plan


class CleanerStats(msgspec.Struct):
    """What the cleaner did, and the storage it left behind; ``enabled``: the run has one (``retention``)."""

    enabled: bool = False
    passes: int = 0
    deleted: int = 0
    deleted_unaccepted: int = 0
    deleted_queued: int = 0
    deleted_held: int = 0
    given_up: int = 0
    skipped_protected: int = 0
    delete_errors: int = 0
    passes_over_limit: int = 0
    peak_objects: int = 0
    peak_bytes: int = 0
    peak_objects_listed: int = 0
