"""Optional result actions, planned from an image's written outcome and run by the janitor.

Pure planning: ``plan`` turns one result into store jobs. The supervisor submits them only
after the result line is written, so an action never runs for an outcome a crash could lose.
Order within one image: write the result object, copy the alert, then delete.
"""

from __future__ import annotations

import msgspec

from .config import Config
from .janitor import Job
from .outcomes import Outcome, Result
from .scanner import relative_key


def alerts_key(cfg: Config, key: str) -> str:
    """``<prefix><alerts_prefix><key below prefix>``: the scanner never lists it again."""
    return cfg.store.prefix + cfg.actions.alerts_prefix + relative_key(key, cfg.store.prefix)


def results_key(cfg: Config, key: str) -> str:
    return cfg.store.prefix + cfg.actions.results_prefix + relative_key(key, cfg.store.prefix) + ".json"


def plan(cfg: Config, result: Result, *, line: int) -> list[Job]:
    """The store jobs the configured actions ask for, for one written result line at offset ``line``."""
    a = cfg.actions
    jobs: list[Job] = []
    if a.write_results and result.outcome.is_success:
        body = msgspec.json.encode({"key": result.key, "task_type": result.task_type, "task_id": result.task_id,
                                    "outcome": result.outcome.value, "detections": result.detections})
        jobs.append(Job(kind="put", keys=(result.key,), action="write_results", target=results_key(cfg, result.key),
                        body=body, line=line))
    if a.copy_alerts and result.outcome is Outcome.INFERRED:
        jobs.append(Job(kind="copy", keys=(result.key,), action="copy_alerts", target=alerts_key(cfg, result.key),
                        line=line))
    if a.delete_no_detection and result.outcome is Outcome.NO_DETECTION:
        jobs.append(Job(kind="delete", keys=(result.key,), action="delete_no_detection", line=line))
    return jobs
