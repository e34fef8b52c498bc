"""Optional result actions, run by the worker after an image's outcome; failures are counted."""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from .config import Config
from .errors import StoreError
from .outcomes import ImageRef, Outcome
from .scanner import relative_key

log = logging.getLogger(__name__)


def alerts_key(cfg: Config, key: str) -> str:
    """``<prefix><alerts_prefix><key below prefix>``: the scanner never lists it again."""
    return cfg.store.prefix + cfg.actions.alerts_prefix + relative_key(key, cfg.store.prefix)


def results_key(cfg: Config, key: str) -> str:
    return cfg.store.prefix + cfg.actions.results_prefix + relative_key(key, cfg.store.prefix) + ".json"


def apply(cfg: Config, store: Any, ref: ImageRef, outcome: Outcome, detections: int) -> tuple[str, ...]:
    """Run the configured actions; return the names of those that failed."""
    a = cfg.actions
    failed = []
    if a.write_results and outcome.is_success:
        body = msgspec.json.encode({"key": ref.key, "task_type": ref.task_type, "task_id": ref.task_id,
                                    "outcome": outcome.value, "detections": detections})
        failed += _attempt("write_results", lambda: store.put(results_key(cfg, ref.key), body, "application/json"))
    if a.copy_alerts and outcome is Outcome.INFERRED:
        failed += _attempt("copy_alerts", lambda: store.copy(ref.key, alerts_key(cfg, ref.key)))
    if a.delete_no_detection and outcome is Outcome.NO_DETECTION:
        failed += _attempt("delete_no_detection", lambda: _delete_one(store, ref.key))
    return tuple(failed)


def _delete_one(store: Any, key: str) -> None:
    if store.delete([key]):
        raise StoreError(f"store refused to delete {key}")


def _attempt(name: str, action: Any) -> list[str]:
    try:
        action()
    except StoreError as exc:
        log.warning("result action %s failed: %s", name, exc)
        return [name]
    return []
