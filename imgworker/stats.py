"""Counts, latency histograms and the report (plain data, no I/O)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import msgspec

from .endpoints import display_url
from .outcomes import Outcome, Result
from .results import Retried

#: A run whose lanes waited for images (queue empty, a lane idle) this share of its time was input-bound.
INPUT_BOUND_SHARE = 0.9
#: How many distinct ``error`` texts of ``success=false`` answers a report keeps.
_FALSE_ERRORS_KEPT = 5


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
    http_retries: int = 0
    """Algorithm calls beyond the first for an image (the worker's own retries); ``retries`` counts
    images dispatched again (their process died, or they waited for an endpoint)."""
    readmitted: int = 0
    """Images ``imgworker retry`` re-admitted: in a run, those it analyses again; from a file, the
    re-admission lines."""
    awaiting_retry: int = 0
    """From a file: images re-admitted and not analysed since (counted by their earlier outcome)."""
    answered_false: int = 0
    """Answers with ``success=false``: counted as ``no_detection``, as the original system counts them."""
    false_errors: dict[str, int] = {}
    """The service's ``error`` texts of those answers (the most frequent few), with their counts."""
    input_starved_share: float | None = None
    """Share of the run's time its lanes waited for images with the queue empty (None: not known)."""
    samples: dict[str, int] = {}
    """How many values each latency figure is over (``inference``, ``end_to_end``, ``discovery``)."""
    scope: str = ""
    """What the figures cover: this run (live) or every line of a results file."""
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
        self.http_retries = 0
        self.readmitted = 0
        self.awaiting_retry = 0
        self.answered_false = 0
        self.false_errors: dict[str, int] = {}
        self.starved_s = 0.0
        self.observed_s = 0.0

    def record(self, result: Result) -> None:
        self.counts[result.outcome] += 1
        if result.cause == "no_healthy_endpoint":
            self.no_healthy_endpoint += 1
        self.http_retries += max(0, result.algo_calls - 1)
        if result.cause == "success_false":
            self.answered_false += 1
            text = result.error or "(no error text)"
            if text in self.false_errors or len(self.false_errors) < 100:  # bounded: a few texts are shown
                self.false_errors[text] = self.false_errors.get(text, 0) + 1
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
            http_retries=self.http_retries,
            readmitted=self.readmitted,
            awaiting_retry=self.awaiting_retry,
            answered_false=self.answered_false,
            false_errors=dict(sorted(self.false_errors.items(), key=lambda kv: -kv[1])[:_FALSE_ERRORS_KEPT]),
            input_starved_share=round(self.starved_s / self.observed_s, 3) if self.observed_s > 0 else None,
            samples={"inference": self.algo_ms.count, "end_to_end": self.e2e_ms.count,
                     "discovery": self.discovery_ms.count},
        )


def stats_from_results(results: Iterable[Result | Retried], lanes: int = 0) -> Stats:
    """Rebuild totals from a results file's lines: each image once, by its latest outcome.

    A re-admission line (``imgworker retry``) supersedes the image's earlier lines; an image
    re-admitted and not analysed since counts by its earlier outcome, in ``awaiting_retry``. A key
    with more than one result line not separated by a re-admission counts in ``duplicates``, and
    the report is then not conserved.
    """
    stats = Stats(lanes)
    latest: dict[str, Result] = {}
    lines: dict[str, int] = {}  # result lines since the key's last re-admission
    awaiting: set[str] = set()
    for entry in results:
        if isinstance(entry, Retried):
            stats.readmitted += 1
            lines[entry.retried] = 0
            awaiting.add(entry.retried)
            continue
        latest[entry.key] = entry
        lines[entry.key] = lines.get(entry.key, 0) + 1
        awaiting.discard(entry.key)
    for result in latest.values():
        stats.record(result)
    stats.scanned = len(latest)
    stats.duplicates = sum(1 for n in lines.values() if n > 1)
    stats.awaiting_retry = len(awaiting & latest.keys())
    return stats


def _of_run(report: Report, figure: str) -> str:
    """A figure only a running supervisor knows: n/a in a report rebuilt from results (no processes known)."""
    return figure if report.processes else "n/a (not in the results)"


def _lanes(report: Report) -> str:
    """'N lanes' or 'P processes x T lanes' (lanes at once, and how they were run)."""
    if not report.lanes:
        return "unknown number of lanes"
    if not report.processes:
        return f"{report.lanes} lanes"
    return f"{report.processes} processes x {report.lanes // report.processes} lanes"


def _ratio(numerator: int, denominator: int) -> float:
    return round(numerator / denominator, 6) if denominator else 0.0


def _ms(report: Report, figure: str, *values: float) -> str:
    """Latency values in ms, or "n/a" when the figure is over no value at all."""
    if report.samples and not report.samples.get(figure):
        return "n/a"
    return " / ".join(f"{v:.1f}" for v in values) + " ms"


def _pct(numerator: int, denominator: int) -> str:
    return f"{numerator / denominator:.2%}" if denominator else "n/a"


def _input_bound(report: Report) -> str:
    share = report.input_starved_share
    if share is None:
        return "n/a (not kept per image: see the run's own report)"
    if share >= INPUT_BOUND_SHARE:
        return (f"yes: lanes waited for images {share:.0%} of the time with the queue empty; the throughput is "
                "the rate images arrived, not what the lanes can do (`imgworker tune` measures that)")
    return f"no: lanes waited for images {share:.0%} of the time"


def format_report(report: Report) -> str:
    """The human report: the figures, then the outcome breakdown."""
    answered = report.inferences
    inference = _ms(report, "inference", report.p50_inference_ms, report.p95_inference_ms, report.p99_inference_ms)
    discovery = _ms(report, "discovery", report.p50_discovery_ms, report.p99_discovery_ms)
    busy = (f"{report.analysed_per_busy_s:.2f} img/s analysed over {report.busy_s:.1f} s from the first image started"
            " to the last outcome" if report.busy_s > 0 else "n/a (no image was started and finished)")
    restarts = (f"{report.worker_restarts} ({report.respawn_backoffs}) / {report.worker_recycles} /"
                f" {report.deadline_kills}")
    lines = [
        "imgworker report",
        "",
        f"figures of: {report.scope}" if report.scope else "",
        "",
        "| figure | value |",
        "|---|---|",
        f"| images scanned | {report.scanned:,} |",
        f"| analysed (inferred + no_detection) | {answered:,} |",
        f"| failures (failed_*) | {report.failures:,} |",
        f"| failure rate | {_pct(report.failures, report.attempted)} of {report.attempted:,} attempted |",
        f"| success rate | {_pct(answered, report.attempted)} |",
        f"| answered success=false (counted as no_detection) | {report.answered_false:,} |",
        f"| mean inference time | {'n/a' if not answered else f'{report.avg_inference_ms:.2f} ms'} |",
        f"| p50 / p95 / p99 inference | {inference} |",
        f"| p50 / p99 end to end | {_ms(report, 'end_to_end', report.p50_e2e_ms, report.p99_e2e_ms)} |",
        f"| p50 / p99 discovery (upload to dispatch) | {discovery} |",
        f"| throughput while busy | {busy} |",
        f"| throughput over the run | {_rate(report.analysed_per_s, report.wall_s)} analysed,"
        f" {_rate(report.throughput_per_s, report.wall_s)} outcomes (skips and drops included) over"
        f" {report.wall_s:.1f} s of wall time, {_lanes(report)} |",
        f"| input-bound | {_input_bound(report)} |",
        f"| HTTP retries (calls beyond an image's first) | {report.http_retries:,} |",
        f"| re-dispatches (process died, or waited for an endpoint) | {_of_run(report, f'{report.retries:,}')} |",
        f"| re-admitted by `imgworker retry` | {report.readmitted:,} |",
        f"| worker restarts (backed off) / recycles / deadline kills | {_of_run(report, restarts)} |",
        "",
        "| outcome | images |",
        "|---|---|",
    ]
    lines = [line for n, line in enumerate(lines) if line or n != 2]
    lines += [f"| {name} | {count:,} |" for name, count in report.outcomes.items()]
    lines += [
        f"| (pending) | {report.pending:,} |",
        f"| (in flight) | {report.in_flight:,} |",
        "",
        f"conserved: {report.conserved} (scanned = outcomes + pending + in flight; each image once, by its latest"
        " outcome)",
    ]
    if report.duplicates:
        lines.append(f"keys with more than one outcome: {report.duplicates}")
    if report.awaiting_retry:
        lines.append(f"re-admitted, not analysed since (counted by their earlier outcome): {report.awaiting_retry:,}")
    lines.append(f"failure rate denominator: {report.failure_rate_denominator}")
    if report.false_errors:
        errors = ", ".join(f"{text!r} x{n:,}" for text, n in report.false_errors.items())
        lines.append(f"success=false errors: {errors}")
    if report.cleaner:
        lines += ["", "cleaner: " + ", ".join(f"{k}={v:,}" for k, v in report.cleaner.items())]
    if report.no_healthy_endpoint:
        lines.append(f"failed for want of a healthy algorithm endpoint: {report.no_healthy_endpoint:,}")
    lines += ["", "| endpoint | requests | failures | ejections | healthy |", "|---|---|---|---|---|"]
    if report.endpoints:
        lines += [f"| {display_url(url)} | {f['requests']:,} | {f['failures']:,} | {f['ejections']} |"
                  f" {'yes' if f['healthy'] else 'no'} |" for url, f in report.endpoints.items()]
    else:
        lines.append("| n/a (endpoint health is not kept per image: see the run's own report) "
                     "| n/a | n/a | n/a | n/a |")
    if report.limits:
        lines += ["", "| endpoint | adaptive limit: mean (time-weighted) | min | max | at the end |", "|---|---|---|---|---|"]
        lines += [f"| {url} | {f['mean']:.1f} | {f['min']:g} | {f['max']:g} | {f['now']:g} |"
                  for url, f in report.limits.items()]
    if report.action_errors:
        lines += ["", "result action failures: " + ", ".join(f"{k}={v}" for k, v in report.action_errors.items())]
    return "\n".join(lines)


def _rate(value: float, over_s: float) -> str:
    return f"{value:.2f} img/s" if over_s > 0 else "n/a"
