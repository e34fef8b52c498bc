"""The cluster-wide report, built from the outcome ledger and the work stream (``imgworker report --cluster``).

The figures are the one-host report's, computed from the ledger's entries (one per image, so
``duplicates`` is 0 by construction of create-if-absent). Conservation: every image published and
not yet counted is still in the stream: undelivered (``pending``) or delivered and not yet acked
(``in flight``). ``hosts`` maps each host to the number of images whose outcome it recorded.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgspec

from ..config import ClusterConfig
from ..outcomes import Result
from ..stats import Report, stats_from_results
from .host import LedgerEntry
from .jetstream import read_cluster

#: What the cluster report's figures cover (its first line).
LEDGER_SCOPE = ("the cluster's outcome ledger: each image once, by the outcome the host that counted it recorded; "
                "images still in the work stream are pending or in flight; rates over the time from the first image "
                "started to the last outcome. Lanes, re-dispatches, worker restarts and endpoint health are in each "
                "host's own report and /metrics, not in the ledger")


def cluster_report(cfg: ClusterConfig) -> tuple[Report, dict[str, int], dict[str, int]]:
    """The report, the images per host, and the stream's figures."""
    values, figures = read_cluster(cfg)
    entries = [msgspec.json.decode(v, type=LedgerEntry) for v in values]
    results = [Result(key=e.key, outcome=e.outcome, task_type=e.task_type, attempt=e.attempt, cause=e.cause,
                      detections=e.detections, algo_ms=e.algo_ms, e2e_ms=e.e2e_ms, started_at=e.started_at,
                      finished_at=e.finished_at) for e in entries]
    stats = stats_from_results(results)
    waiting, held = figures["consumer_pending"], figures["consumer_ack_pending"]
    stats.scanned += figures["stream_messages"]  # published, not yet counted
    finished = [e.finished_at for e in entries if e.finished_at]
    started = [e.started_at or e.finished_at for e in entries if e.finished_at]
    wall = max(finished) - min(started) if finished else 0.0
    report = msgspec.structs.replace(stats.report(pending=waiting, in_flight=held, wall_s=wall), scope=LEDGER_SCOPE)
    return report, dict(Counter(e.host for e in entries)), figures


def report_json(report: Report, hosts: dict[str, int], figures: dict[str, int]) -> bytes:
    data: dict[str, Any] = msgspec.to_builtins(report)
    data["hosts"] = hosts
    data["stream"] = figures
    return msgspec.json.format(msgspec.json.encode(data))
