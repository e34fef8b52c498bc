"""Counts, latency histograms and the report (plain data, no I/O)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import msgspec

from .endpoints import display_url
from .outcomes import Outcome, Result


#: The latency buckets figures are given at (``/metrics`` histograms), in seconds.
BOUNDS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class HistogramFigures(msgspec.Struct, frozen=True):
    """One latency histogram at ``BOUNDS_S``: cumulative counts, the total count and the sum in seconds."""

    cumulative: list[int]
    count: int
    sum_s: float


class LogHistogram:
    """Bounded-memory latency histogram with 1 % relative bucket width."""

    _GROWTH = 1.01
    _ZERO = -(10**9)  # bucket of values <= 0

    def __init__(self) -> None:
        self._buckets: dict[int, int] = {}
        self.count = 0
        self.total = 0.0

    def add(self, value: float) -> None:
        index = self._ZERO if value <= 0 else math.floor(math.log(max(value, 1e-6)) / math.log(self._GROWTH))
        self._buckets[index] = self._buckets.get(index, 0) + 1
        self.count += 1
        self.total += value

    def cumulative(self, bounds: list[float]) -> tuple[list[int], float]:
        """Counts at or below each bound (bucket midpoints decide), and the sum: Prometheus buckets."""
        items = sorted(self._buckets.items())
        out = []
        for bound in bounds:
            out.append(sum(n for i, n in items if self._value(i) <= bound))
        return out, self.total

    def figures(self) -> HistogramFigures:
        """This histogram at ``BOUNDS_S`` (values are in milliseconds)."""
        counts, total_ms = self.cumulative([b * 1000.0 for b in BOUNDS_S])
        return HistogramFigures(cumulative=counts, count=self.count, sum_s=total_ms / 1000.0)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def percentile(self, q: float) -> float:
        """Value at quantile q (0..100), to within the bucket width."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(self.count * q / 100.0))
        seen = 0
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            if seen >= rank:
                return self._value(index)
        return 0.0

    def _value(self, index: int) -> float:
        """The representative value of a bucket (its geometric middle)."""
        return 0.0 if index == self._ZERO else float(self._GROWTH ** (index + 0.5))


class Report(msgspec.Struct, frozen=True):
    """The figures printed at the end of a run and written with --report-json."""

    scanned: int
    outcomes: dict[str, int]
    pending: int
    in_flight: int
    conserved: bool
    inferences: int
    failures: int
    attempted: int
    failure_rate: float
    failure_rate_denominator: str
    failure_rate_per_success: float
    success_rate: float
    retries: int
    worker_restarts: int
    worker_recycles: int
    deadline_kills: int
    avg_inference_ms: float
    p50_inference_ms: float
    p95_inference_ms: float
    p99_inference_ms: float
    p50_e2e_ms: float
    p99_e2e_ms: float
    p50_discovery_ms: float
    p99_discovery_ms: float
    throughput_per_s: float
    analysed_per_s: float
    wall_s: float
    lanes: int
    """Items the run could work on at once: worker processes x lanes (threads) each."""
    processes: int
    """Worker processes (0: unknown, e.g. a report rebuilt from a results file)."""
    busy_s: float = 0.0
    """First image started to last outcome, from the results' own timestamps (the run's wall time
    also holds start-up, waiting for new images and the stop)."""
    analysed_per_busy_s: float = 0.0
    cleaner: dict[str, int] = {}
    endpoints: dict[str, dict[str, int]] = {}
    action_errors: dict[str, int] = {}
    duplicates: int = 0
    """Keys with more than one outcome (a report rebuilt from a results file); 0 in a live run."""
    no_healthy_endpoint: int = 0
    """Images that ended ``failed_algo`` because no algorithm endpoint was healthy within their budget."""
    respawn_backoffs: int = 0
    """Worker processes that died before answering anything and were replaced after a backoff."""
    limits: dict[str, dict[str, float]] = {}
    """With ``algo.adaptive``: each endpoint's limit of calls in flight, time-weighted mean, min, max, now."""


class Stats:
    """Running totals of one run; ``report()`` derives every rate from them."""

    def __init__(self, lanes: int, *, processes: int = 0) -> None:
        self.lanes = lanes
        self.processes = processes
        self.scanned = 0
        self.retries = 0
        self.worker_restarts = 0
        self.worker_recycles = 0
        self.deadline_kills = 0
        self.respawn_backoffs = 0
        self.counts: dict[Outcome, int] = {o: 0 for o in Outcome}
        self.algo_ms = LogHistogram()
        self.e2e_ms = LogHistogram()
        self.stat_ms = LogHistogram()
        self.discovery_ms = LogHistogram()
        self.action_errors: dict[str, int] = {}
        self.duplicates = 0
        self.first_at = 0.0  # epoch seconds: the earliest start (or end) of an outcome recorded
        self.last_at = 0.0  # epoch seconds: the latest end of an outcome recorded
        self.no_healthy_endpoint = 0

    def record(self, result: Result) -> None:
        self.counts[result.outcome] += 1
        if result.cause == "no_healthy_endpoint":
            self.no_healthy_endpoint += 1
        if result.algo_ms is not None and result.outcome.is_success:
            self.algo_ms.add(result.algo_ms)
        if result.e2e_ms is not None and result.outcome.reached_algo:
            self.e2e_ms.add(result.e2e_ms)
        if result.stat_ms is not None:
            self.stat_ms.add(result.stat_ms)
        for action in result.action_errors:
            self.action_errors[action] = self.action_errors.get(action, 0) + 1
        self._span(result.started_at or result.finished_at, result.finished_at)

    def _span(self, began: float, ended: float) -> None:
        if began > 0:
            self.first_at = min(self.first_at, began) if self.first_at else began
        self.last_at = max(self.last_at, ended)

    @property
    def busy_s(self) -> float:
        return max(0.0, self.last_at - self.first_at) if self.first_at else 0.0

    @property
    def finished(self) -> int:
        return sum(self.counts.values())

    def latency_figures(self) -> dict[str, HistogramFigures]:
        """Every latency histogram by name: ``algorithm``, ``end_to_end``, ``stat``, ``discovery``."""
        return {"algorithm": self.algo_ms.figures(), "end_to_end": self.e2e_ms.figures(),
                "stat": self.stat_ms.figures(), "discovery": self.discovery_ms.figures()}

    def report(self, *, pending: int, in_flight: int, wall_s: float) -> Report:
        counts = self.counts
        successes = sum(n for o, n in counts.items() if o.is_success)
        failures = sum(n for o, n in counts.items() if o.is_failure)
        attempted = successes + failures
        finished = self.finished
        return Report(
            scanned=self.scanned,
            outcomes={o.value: counts[o] for o in Outcome},
            pending=pending,
            in_flight=in_flight,
            conserved=self.scanned == finished + pending + in_flight and not self.duplicates,
            inferences=successes,
            failures=failures,
            attempted=attempted,
            failure_rate=_ratio(failures, attempted),
            failure_rate_denominator="images that reached the algorithm step or failed on the way "
            "(successes + failed_*); skipped and dropped images are reported separately",
            failure_rate_per_success=_ratio(failures, successes),
            success_rate=_ratio(successes, attempted),
            retries=self.retries,
            worker_restarts=self.worker_restarts,
            worker_recycles=self.worker_recycles,
            deadline_kills=self.deadline_kills,
            respawn_backoffs=self.respawn_backoffs,
            avg_inference_ms=round(self.algo_ms.mean, 2),
            p50_inference_ms=round(self.algo_ms.percentile(50), 2),
            p95_inference_ms=round(self.algo_ms.percentile(95), 2),
            p99_inference_ms=round(self.algo_ms.percentile(99), 2),
            p50_e2e_ms=round(self.e2e_ms.percentile(50), 2),
            p99_e2e_ms=round(self.e2e_ms.percentile(99), 2),
            p50_discovery_ms=round(self.discovery_ms.percentile(50), 2),
            p99_discovery_ms=round(self.discovery_ms.percentile(99), 2),
            throughput_per_s=round(finished / wall_s, 3) if wall_s > 0 else 0.0,
            analysed_per_s=round(successes / wall_s, 3) if wall_s > 0 else 0.0,
            wall_s=round(wall_s, 3),
            lanes=self.lanes,
            processes=self.processes,
            busy_s=round(self.busy_s, 3),
            analysed_per_busy_s=round(successes / self.busy_s, 3) if self.busy_s > 0 else 0.0,
            action_errors=dict(self.action_errors),
            duplicates=self.duplicates,
            no_healthy_endpoint=self.no_healthy_endpoint,
        )


def stats_from_results(results: Iterable[Result], lanes: int = 0) -> Stats:
    """Rebuild totals from result records: scanned is the distinct keys, every line an outcome.

    A key with more than one line counts in ``duplicates``, and the report is then not conserved.
    """
    stats = Stats(lanes)
    lines: dict[str, int] = {}
    for result in results:
        lines[result.key] = lines.get(result.key, 0) + 1
        stats.record(result)
    stats.scanned = len(lines)
    stats.duplicates = sum(1 for n in lines.values() if n > 1)
    return stats


def _lanes(report: Report) -> str:
    """'N lanes' or 'P processes x T lanes' (lanes at once, and how they were run)."""
    if not report.lanes:
        return "unknown number of lanes"
    if not report.processes:
        return f"{report.lanes} lanes"
    return f"{report.processes} processes x {report.lanes // report.processes} lanes"


def _ratio(numerator: int, denominator: int) -> float:
    return round(numerator / denominator, 6) if denominator else 0.0


def format_report(report: Report) -> str:
    """The human report: the original report's table, then the outcome breakdown."""
    lines = [
        "imgworker report",
        "",
        "| figure | value |",
        "|---|---|",
        f"| images scanned | {report.scanned:,} |",
        f"| inferences (answered) | {report.inferences:,} |",
        f"| failures (failed_*) | {report.failures:,} |",
        f"| failure rate | {report.failure_rate:.2%} of {report.attempted:,} attempted |",
        f"| failure rate per success (the old way) | {report.failure_rate_per_success:.2%} |",
        f"| success rate | {report.success_rate:.2%} |",
        f"| mean inference time | {report.avg_inference_ms:.2f} ms |",
        f"| p50 / p95 / p99 inference | {report.p50_inference_ms:.1f} / {report.p95_inference_ms:.1f}"
        f" / {report.p99_inference_ms:.1f} ms |",
        f"| p50 / p99 end to end | {report.p50_e2e_ms:.1f} / {report.p99_e2e_ms:.1f} ms |",
        f"| p50 / p99 discovery (upload to dispatch) | {report.p50_discovery_ms:.1f} / {report.p99_discovery_ms:.1f} ms |",
        f"| throughput while busy | {report.analysed_per_busy_s:.2f} img/s answered by the service over"
        f" {report.busy_s:.1f} s from the first image started to the last outcome |",
        f"| throughput over the run | {report.analysed_per_s:.2f} img/s answered, {report.throughput_per_s:.2f}"
        f" outcomes/s (skips and drops included) over {report.wall_s:.1f} s of wall time (start-up, waiting"
        f" for images and the stop included), {_lanes(report)} |",
        f"| retries / worker restarts (backed off) / recycles / deadline kills | {report.retries}"
        f" / {report.worker_restarts} ({report.respawn_backoffs}) / {report.worker_recycles} / {report.deadline_kills} |",
        "",
        "| outcome | images |",
        "|---|---|",
    ]
    lines += [f"| {name} | {count:,} |" for name, count in report.outcomes.items()]
    lines += [
        f"| (pending) | {report.pending:,} |",
        f"| (in flight) | {report.in_flight:,} |",
        "",
        f"conserved: {report.conserved} (scanned = outcomes + pending + in flight)",
    ]
    if report.duplicates:
        lines.append(f"keys with more than one outcome: {report.duplicates}")
    lines.append(f"failure rate denominator: {report.failure_rate_denominator}")
    if report.cleaner:
        lines += ["", "cleaner: " + ", ".join(f"{k}={v:,}" for k, v in report.cleaner.items())]
    if report.no_healthy_endpoint:
        lines.append(f"failed for want of a healthy algorithm endpoint: {report.no_healthy_endpoint:,}")
    if report.endpoints:
        lines += ["", "| endpoint | requests | failures | ejections | healthy |", "|---|---|---|---|---|"]
        lines += [f"| {display_url(url)} | {f['requests']:,} | {f['failures']:,} | {f['ejections']} |"
                  f" {'yes' if f['healthy'] else 'no'} |" for url, f in report.endpoints.items()]
    if report.limits:
        lines += ["", "| endpoint | adaptive limit: mean (time-weighted) | min | max | at the end |", "|---|---|---|---|---|"]
        lines += [f"| {url} | {f['mean']:.1f} | {f['min']:g} | {f['max']:g} | {f['now']:g} |"
                  for url, f in report.limits.items()]
    if report.action_errors:
        lines += ["", "result action failures: " + ", ".join(f"{k}={v}" for k, v in report.action_errors.items())]
    return "\n".join(lines)
