"""Prometheus metrics served by the supervisor.

Workers report every outcome to the supervisor over their pipes, so the supervisor alone holds
the figures and a plain collector reads them at scrape time: no multiprocess mode, no shared
directory of per-process files. The same port answers ``/healthz`` (see ``health`` for the rule):
200 with a short JSON body while the run is alive and making progress (or idle), 503 when it is
stalled or stopping.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
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
        yield _gauge("imgworker_lanes", "Images the run can work on at once (processes x lanes each).", report.lanes)
        yield _counter("imgworker_worker_restarts", "Workers replaced after an unexpected exit.", report.worker_restarts)
        yield _counter("imgworker_worker_respawn_backoffs",
                       "Worker processes that died before answering anything and were replaced after a backoff.",
                       report.respawn_backoffs)
        yield _counter("imgworker_worker_recycles", "Workers replaced after max_tasks or max_memory.",
                       report.worker_recycles)
        yield _counter("imgworker_retries", "Items sent back to the queue: their worker died, or their endpoint went down.", report.retries)
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
        yield _gauge("imgworker_retention_enabled", "1 if the run has a retention cleaner (retention.enabled).",
                     float(c.enabled))
        yield _counter("imgworker_cleaner_deleted", "Images the retention cleaner deleted.", c.deleted)
        yield _counter("imgworker_cleaner_protected", "Deletions skipped to protect queued or held images.",
                       c.skipped_protected)
        yield _counter("imgworker_cleaner_given_up", "Queued images given up so storage limits hold.", c.given_up)
        yield _counter("imgworker_cleaner_passes_over_limit",
                       "Cleaning passes that left storage over a retention limit (protected images kept).",
                       c.passes_over_limit)
        yield _gauge("imgworker_cleaner_peak_objects", "Most images left in the bucket after a cleaning pass.",
                     c.peak_objects)
        yield _gauge("imgworker_cleaner_peak_bytes", "Most bytes left in the bucket after a cleaning pass.",
                     c.peak_bytes)

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


Health = Callable[[], tuple[int, dict[str, Any]]]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        """No access log on the terminal."""


def metrics_app(registry: CollectorRegistry, health: Health | None) -> Callable[..., Iterable[bytes]]:
    """``/healthz`` answered by ``health``; every other path is Prometheus's exposition."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/healthz" or health is None:
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        code, body = health()
        reason = "OK" if code == 200 else "Service Unavailable"
        start_response(f"{code} {reason}", [("Content-Type", "application/json")])
        return [json.dumps(body).encode() + b"\n"]

    return app


class HostLabelled:
    """Another collector's metrics, every sample with a ``host`` label (cluster mode: one series per host)."""

    def __init__(self, inner: Any, host: str) -> None:
        self.inner = inner
        self.host = host

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        for metric in self.inner.collect():
            metric.samples = [sample._replace(labels={**sample.labels, "host": self.host}) for sample in metric.samples]
            yield metric


def serve_metrics(current: Callable[[], Snapshot | None], port: int, addr: str = "127.0.0.1",
                  health: Health | None = None, *, host: str = "", extra: list[Any] | None = None) -> Any:
    """Serve /metrics for the run whose ``Snapshot`` ``current()`` returns (None: no run yet), and
    /healthz from ``health()`` (status, JSON body), from a daemon thread.

    With ``host`` (cluster mode) every sample carries a ``host`` label; ``extra`` collectors are
    served beside (and labelled alike). Returns the server; ``shutdown()`` and ``server_close()`` stop it.
    """
    registry = CollectorRegistry(auto_describe=False)
    for collector in [SupervisorCollector(current), *(extra or [])]:
        registry.register(HostLabelled(collector, host) if host else collector)

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET

    server = make_server(addr, port, metrics_app(registry, health), Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
