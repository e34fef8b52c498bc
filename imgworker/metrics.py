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

from .stats import LogHistogram

_BOUNDS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]


def _histogram(name: str, doc: str, hist: LogHistogram) -> HistogramMetricFamily:
    counts, total_ms = hist.cumulative([b * 1000.0 for b in _BOUNDS_S])
    buckets = [(repr(b), float(c)) for b, c in zip(_BOUNDS_S, counts)] + [("+Inf", float(hist.count))]
    family = HistogramMetricFamily(name, doc, unit="seconds")
    family.add_metric([], buckets, sum_value=total_ms / 1000.0)
    return family


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class SupervisorCollector:
    """Reads the supervisor's figures when Prometheus scrapes."""

    def __init__(self, current: Callable[[], Any]) -> None:
        self.current = current

    def describe(self) -> list[Metric]:
        return []  # figures are only read at scrape time

    def collect(self) -> Iterator[Metric]:
        sup = self.current()
        if sup is None:
            return
        stats = sup.stats
        outcomes = CounterMetricFamily("imgworker_images", "Images by terminal outcome.", labels=["outcome"])
        for outcome, count in dict(stats.counts).items():
            outcomes.add_metric([outcome.value], count)
        yield outcomes
        yield _counter("imgworker_images_scanned", "Images accepted by the scanner.", stats.scanned)
        yield _histogram("imgworker_algorithm_latency", "Algorithm service call time of analysed images.",
                         stats.algo_ms)
        yield _histogram("imgworker_end_to_end_latency", "Dispatch to result, per image.", stats.e2e_ms)
        yield _histogram("imgworker_stat_latency", "StatObject time of the existence check.", stats.stat_ms)
        yield _histogram("imgworker_discovery_latency", "Upload (object mtime or event time) to dispatch.",
                         stats.discovery_ms)
        yield _counter("imgworker_change_events", "Change events received from the store.",
                       sup.intake.events_received)
        yield _gauge("imgworker_queue_depth", "Images waiting in the queue.", sup.pending)
        yield _gauge("imgworker_in_flight", "Images held by lanes.", sup.in_flight)
        yield _gauge("imgworker_workers_alive", "Worker processes alive.", sup.pool.alive())
        yield _counter("imgworker_worker_restarts", "Workers replaced after an unexpected exit.", stats.worker_restarts)
        yield _counter("imgworker_worker_recycles", "Workers replaced after max_tasks or max_memory.",
                       stats.worker_recycles)
        yield _counter("imgworker_retries", "Items dispatched again after their worker died.", stats.retries)
        yield _counter("imgworker_deadline_kills", "Workers killed for holding an item past its deadline.",
                       stats.deadline_kills)
        yield _counter("imgworker_scans", "Complete listings of the bucket.", sup.intake.scans_completed)
        yield _gauge("imgworker_scan_duration_seconds", "Duration of the last complete listing.",
                     sup.intake.last_scan_s)
        yield _gauge("imgworker_backlog", "Images found but not yet queued (queue full).", len(sup.intake.backlog))
        yield _gauge("imgworker_objects_listed_peak", "Most images one complete listing found in the bucket.",
                     sup.cleaner.peak_objects_listed)
        yield from self._cleaner(sup)
        yield from self._endpoints(sup)

    def _cleaner(self, sup: Any) -> Iterator[Metric]:
        c = sup.cleaner
        yield _counter("imgworker_cleaner_deleted", "Images the retention cleaner deleted.", c.deleted)
        yield _counter("imgworker_cleaner_protected", "Deletions skipped to protect queued or held images.",
                       c.skipped_protected)
        yield _counter("imgworker_cleaner_given_up", "Queued images given up so storage limits hold.", c.given_up)

    def _endpoints(self, sup: Any) -> Iterator[Metric]:
        requests = CounterMetricFamily("imgworker_algorithm_requests", "Calls per endpoint.", labels=["endpoint"])
        failures = CounterMetricFamily("imgworker_algorithm_failures", "Transient failures per endpoint.",
                                       labels=["endpoint"])
        healthy = GaugeMetricFamily("imgworker_algorithm_endpoint_healthy", "1 if not ejected.", labels=["endpoint"])
        for url, figures in sup.endpoints.figures().items():
            requests.add_metric([url], figures["requests"])
            failures.add_metric([url], figures["failures"])
            healthy.add_metric([url], figures["healthy"])
        yield from (requests, failures, healthy)


def serve_metrics(current: Callable[[], Any], port: int, addr: str = "127.0.0.1") -> Any:
    """Serve /metrics for the supervisor ``current()`` returns, from a daemon thread.

    Returns the server; ``shutdown()`` and ``server_close()`` stop it.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SupervisorCollector(current))
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
