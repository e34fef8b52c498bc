"""Prometheus metrics served by the supervisor.

Workers report every outcome to the supervisor over their pipes, so the supervisor alone holds
the figures and a plain collector reads them at scrape time: no multiprocess mode, no shared
directory of per-process files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from .recorder import Snapshot
from .stats import BOUNDS_S, HistogramFigures

#: Each latency histogram of the snapshot, by its metric name and help text.
_LATENCIES = {
    "algorithm": ("imgworker_algorithm_latency", "Algorithm service call time of analysed images."),
    "end_to_end": ("imgworker_end_to_end_latency", "Dispatch to result, per image."),
    "stat": ("imgworker_stat_latency", "StatObject time of the existence check."),
    "discovery": ("imgworker_discovery_latency", "Upload (object mtime or event time) to dispatch."),
}


def _histogram(name: str, doc: str, figures: HistogramFigures) -> HistogramMetricFamily:
    buckets = [(repr(b), float(c)) for b, c in zip(BOUNDS_S, figures.cumulative)] + [("+Inf", float(figures.count))]
    family = HistogramMetricFamily(name, doc, unit="seconds")
    family.add_metric([], buckets, sum_value=figures.sum_s)
    return family


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class SupervisorCollector:
    """Reads the run's ``Snapshot`` when Prometheus scrapes."""

    def __init__(self, current: Callable[[], Snapshot | None]) -> None:
        self.current = current

    def describe(self) -> list[Metric]:
        return []  # figures are only read at scrape time

    def collect(self) -> Iterator[Metric]:
        snapshot = self.current()
        if snapshot is None:
            return
        report, gauges = snapshot.report, snapshot.gauges
        outcomes = CounterMetricFamily("imgworker_images", "Images by terminal outcome.", labels=["outcome"])
        for outcome, count in report.outcomes.items():
            outcomes.add_metric([outcome], count)
        yield outcomes
        yield _counter("imgworker_images_scanned", "Images accepted by the scanner.", report.scanned)
        for key, (name, doc) in _LATENCIES.items():
            if key in snapshot.latency:
                yield _histogram(name, doc, snapshot.latency[key])
        yield _counter("imgworker_change_events", "Change events received from the store.", gauges.events_received)
        yield _gauge("imgworker_queue_depth", "Images waiting in the queue.", gauges.queue_depth)
        yield _gauge("imgworker_in_flight", "Images held by lanes.", gauges.in_flight)
        yield _gauge("imgworker_workers_alive", "Worker processes alive.", gauges.processes_alive)
        yield _counter("imgworker_worker_restarts", "Workers replaced after an unexpected exit.", report.worker_restarts)
        yield _counter("imgworker_worker_respawn_backoffs",
                       "Worker processes that died before answering anything and were replaced after a backoff.",
                       report.respawn_backoffs)
        yield _counter("imgworker_worker_recycles", "Workers replaced after max_tasks or max_memory.",
                       report.worker_recycles)
        yield _counter("imgworker_retries", "Items dispatched again after their worker died.", report.retries)
        yield _counter("imgworker_deadline_kills", "Workers killed for holding an item past its deadline.",
                       report.deadline_kills)
        yield _counter("imgworker_scans", "Complete listings of the bucket.", gauges.scans_completed)
        yield _gauge("imgworker_scan_duration_seconds", "Duration of the last complete listing.", gauges.last_scan_s)
        yield _gauge("imgworker_backlog", "Images found but not yet queued (queue full).", gauges.backlog)
        yield _gauge("imgworker_objects_listed_peak", "Most images one complete listing found in the bucket.",
                     snapshot.cleaner.peak_objects_listed)
        yield from self._cleaner(snapshot)
        yield from self._endpoints(snapshot)
        yield from self._limits(snapshot)

    @staticmethod
    def _cleaner(snapshot: Snapshot) -> Iterator[Metric]:
        c = snapshot.cleaner
        yield _counter("imgworker_cleaner_deleted", "Images the retention cleaner deleted.", c.deleted)
        yield _counter("imgworker_cleaner_protected", "Deletions skipped to protect queued or held images.",
                       c.skipped_protected)
        yield _counter("imgworker_cleaner_given_up", "Queued images given up so storage limits hold.", c.given_up)

    @staticmethod
    def _endpoints(snapshot: Snapshot) -> Iterator[Metric]:
        requests = CounterMetricFamily("imgworker_algorithm_requests", "Calls per endpoint.", labels=["endpoint"])
        failures = CounterMetricFamily("imgworker_algorithm_failures", "Transient failures per endpoint.",
                                       labels=["endpoint"])
        healthy = GaugeMetricFamily("imgworker_algorithm_endpoint_healthy", "1 if not ejected.", labels=["endpoint"])
        for url, figures in snapshot.report.endpoints.items():
            requests.add_metric([url], figures["requests"])
            failures.add_metric([url], figures["failures"])
            healthy.add_metric([url], figures["healthy"])
        yield from (requests, failures, healthy)

    @staticmethod
    def _limits(snapshot: Snapshot) -> Iterator[Metric]:
        """Each endpoint's limit of calls in flight and what the adaptive controller bases it on."""
        label = ["endpoint"]
        limit = GaugeMetricFamily("imgworker_algorithm_limit", "Calls an endpoint may have in flight now.",
                                  labels=label)
        baseline = GaugeMetricFamily("imgworker_algorithm_baseline_seconds",
                                     "Mean call time with no queueing, from the last probe (0: not measured).",
                                     labels=label)
        queue = GaugeMetricFamily("imgworker_algorithm_queue_estimate",
                                  "Calls estimated to wait in the endpoint's queue, last window.", labels=label)
        infeasible = GaugeMetricFamily("imgworker_algorithm_budget_infeasible",
                                       "1 if the latency budget is missed even with no queueing.", labels=label)
        probes = CounterMetricFamily("imgworker_algorithm_probes", "Low-concurrency windows that re-measured the "
                                     "baseline.", labels=label)
        for url, f in snapshot.limits.items():
            limit.add_metric([url], f.limit)
            baseline.add_metric([url], f.baseline_s)
            queue.add_metric([url], f.queue_estimate)
            infeasible.add_metric([url], int(f.budget_infeasible))
            probes.add_metric([url], f.probes)
        yield from (limit, baseline, queue, infeasible, probes)


def serve_metrics(current: Callable[[], Snapshot | None], port: int, addr: str = "127.0.0.1") -> Any:
    """Serve /metrics for the run whose ``Snapshot`` ``current()`` returns (None: no run yet), from a daemon thread.

    Returns the server; ``shutdown()`` and ``server_close()`` stop it.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SupervisorCollector(current))
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
