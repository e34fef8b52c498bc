"""``imgworker top``: a live table of running instances, one row per ``/metrics`` address.

Each poll reads every address's Prometheus text (and its ``/healthz``), turns it into one ``Row``
of figures, and draws the rows with ``rich`` (an optional extra: ``imgworker[top]``). Rates
(throughput, p50/p95) are taken between two polls; the first poll's are over the whole run. An
address that does not answer is a row that says ``down`` and why (shortened), never an error. A
terminal too narrow for one column per figure gets one row per instance, its figures stacked in a
few short lines. When stdout is not a terminal (or with ``--once``), one plain table is printed and
``top`` exits, non-zero if no address answered: with ``--once`` it polls twice, ``interval`` apart
(at most a second), so the rates are current. Storage reads n/a when the run has no retention cleaner.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ExitCode

#: Samples of one scrape: sample name -> [(labels, value)].
Samples = dict[str, list[tuple[dict[str, str], float]]]

_SUCCESS = ("inferred", "no_detection")
_SHORT = {"inferred": "inf", "no_detection": "no_det", "skipped_missing": "skip", "failed_missing": "f_miss",
          "failed_algo": "f_algo", "failed_store": "f_store", "failed_worker": "f_work",
          "dropped_backlog": "d_backlog", "dropped_expired": "d_exp"}


def metrics_url(url: str) -> str:
    """``host:port`` or ``http://host:port`` -> ``http://host:port/metrics``; a full URL is kept."""
    if "://" not in url:
        url = "http://" + url
    scheme, rest = url.split("://", 1)
    return url if "/" in rest else f"{scheme}://{rest}/metrics"


def _health_url(url: str) -> str:
    base = url[: -len("/metrics")] if url.endswith("/metrics") else url.rstrip("/")
    return base + "/healthz"


def scrape(url: str, timeout_s: float) -> Samples:
    """One scrape's samples; OSError (or ValueError for text that is not Prometheus's) if it fails."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (the operator's own address)
        text = resp.read().decode("utf-8", "replace")
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def health(url: str, timeout_s: float) -> str:
    """What ``/healthz`` says (``ok``, ``idle``, ``stalled``, ``stopping``), or ``?`` if it does not answer."""
    try:
        with urllib.request.urlopen(_health_url(url), timeout=timeout_s) as resp:  # noqa: S310
            body = resp.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    except (OSError, ValueError):
        return "?"
    try:
        return str(json.loads(body).get("status", "?"))
    except ValueError:
        return "?"


def _total(samples: Samples, name: str, **match: str) -> float | None:
    rows = [v for labels, v in samples.get(name, []) if all(labels.get(k) == m for k, m in match.items())]
    return sum(rows) if rows else None


def _buckets(samples: Samples, name: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of a histogram, in bound order."""
    out = [(float(labels["le"]), v) for labels, v in samples.get(name + "_bucket", []) if "le" in labels]
    return sorted(out)


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of a cumulative histogram, interpolated in its bucket (as histogram_quantile does)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / width if width else 1.0)
        lower_bound, lower_count = bound, count
    return lower_bound


def _delta(now: list[tuple[float, float]], before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    earlier = dict(before)
    out = [(b, c - earlier.get(b, 0.0)) for b, c in now]
    return out if out and out[-1][1] > 0 else now


@dataclass
class Row:
    """One instance's figures, as the table shows them (None: not exported, or no data yet)."""

    url: str
    up: bool
    error: str = ""
    health: str = "?"
    done: float = 0.0
    per_s: float | None = None
    outcomes: dict[str, float] = field(default_factory=dict)
    failure_rate: float | None = None
    queue: float | None = None
    backlog: float | None = None
    busy: float | None = None
    lanes: float | None = None
    limit: float | None = None
    p50_s: float | None = None
    p95_s: float | None = None
    endpoints_up: int = 0
    endpoints: int = 0
    discovery_p95_s: float | None = None
    stored_peak: float | None = None  # None: no retention cleaner, or not exported
    over_limit: float | None = None


def figures(url: str, now: Samples, before: Samples | None, dt_s: float) -> Row:
    """The row of one instance from its scrape (and the previous one, ``dt_s`` earlier)."""
    outcomes = {labels.get("outcome", "?"): v for labels, v in now.get("imgworker_images_total", [])}
    done = sum(outcomes.values())
    failures = sum(v for o, v in outcomes.items() if o.startswith("failed_"))
    attempted = failures + sum(outcomes.get(o, 0.0) for o in _SUCCESS)
    row = Row(url=url, up=True, done=done, outcomes=outcomes,
              failure_rate=failures / attempted if attempted else None,
              queue=_total(now, "imgworker_queue_depth"), backlog=_total(now, "imgworker_backlog"),
              busy=_total(now, "imgworker_in_flight"), lanes=_total(now, "imgworker_lanes"),
              limit=_total(now, "imgworker_algorithm_limit"),
              stored_peak=(_total(now, "imgworker_cleaner_peak_objects")
                           if _total(now, "imgworker_retention_enabled") != 0 else None),
              over_limit=_total(now, "imgworker_cleaner_passes_over_limit_total"))
    e2e = _buckets(now, "imgworker_end_to_end_latency_seconds")
    discovery = _buckets(now, "imgworker_discovery_latency_seconds")
    if before is not None and dt_s > 0:
        previous = sum(v for _, v in before.get("imgworker_images_total", []))
        row.per_s = max(0.0, done - previous) / dt_s
        e2e = _delta(e2e, _buckets(before, "imgworker_end_to_end_latency_seconds"))
        discovery = _delta(discovery, _buckets(before, "imgworker_discovery_latency_seconds"))
    row.p50_s, row.p95_s = quantile(0.5, e2e), quantile(0.95, e2e)
    row.discovery_p95_s = quantile(0.95, discovery)
    healthy = now.get("imgworker_algorithm_endpoint_healthy", [])
    row.endpoints, row.endpoints_up = len(healthy), sum(1 for _, v in healthy if v >= 1)
    return row


class Poller:
    """Polls every address; keeps each one's last scrape for the rates."""

    def __init__(self, urls: Sequence[str], timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.urls = [metrics_url(u) for u in urls]
        self.timeout_s = timeout_s
        self.clock = clock
        self._last: dict[str, tuple[float, Samples]] = {}

    def poll(self) -> list[Row]:
        return [self._one(url) for url in self.urls]

    def _one(self, url: str) -> Row:
        try:
            samples = scrape(url, self.timeout_s)
        except (OSError, ValueError) as exc:
            self._last.pop(url, None)
            return Row(url=url, up=False, error=_why(exc))
        at = self.clock()
        before = self._last.get(url)
        self._last[url] = (at, samples)
        row = figures(url, samples, before[1] if before else None, at - before[0] if before else 0.0)
        row.health = health(url, self.timeout_s)
        return row


def _why(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    reason = getattr(exc, "reason", None) or exc
    return str(reason)[:60] or type(exc).__name__


# ----- the table ---------------------------------------------------------------------------------

COLUMNS = ("instance", "state", "img/s", "done", "outcomes", "fail %", "queue", "backlog", "lanes busy",
           "e2e p50/p95", "endpoints", "discovery p95", "storage")


def _n(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


#: The longest reason a ``down`` row shows.
DOWN_REASON_CHARS = 32


def _down(error: str) -> str:
    return "down: " + (error if len(error) <= DOWN_REASON_CHARS else error[: DOWN_REASON_CHARS - 1] + "…")


def _s(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def cells(row: Row) -> list[str]:
    """The row as text, column by column (``COLUMNS``)."""
    name = row.url.split("://", 1)[-1].removesuffix("/metrics")
    if not row.up:
        return [name, _down(row.error)] + [""] * (len(COLUMNS) - 2)
    outcomes = " ".join(f"{_SHORT.get(o, o)}={v:,.0f}" for o, v in row.outcomes.items() if v) or "none yet"
    busy = f"{_n(row.busy)}/{_n(row.lanes)}" + (f" (limit {_n(row.limit)})" if row.limit is not None else "")
    storage = "n/a" if row.stored_peak is None else f"peak {row.stored_peak:,.0f} obj"
    if row.over_limit:
        storage += f", OVER LIMIT x{row.over_limit:,.0f}"
    return [name, f"up ({row.health})", "n/a" if row.per_s is None else f"{row.per_s:.1f}", _n(row.done), outcomes,
            "n/a" if row.failure_rate is None else f"{row.failure_rate:.1%}", _n(row.queue), _n(row.backlog), busy,
            f"{_s(row.p50_s)} / {_s(row.p95_s)}", f"{row.endpoints_up}/{row.endpoints} up",
            _s(row.discovery_p95_s), storage]


def plain_table(rows: list[Row]) -> str:
    """A table in plain text, columns aligned: what a pipe or a log gets."""
    table = [list(COLUMNS)] + [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table)


def stacked(row: Row) -> str:
    """The row's figures as a few short lines, a group each: what a narrow terminal shows."""
    c = dict(zip(COLUMNS, cells(row)))
    if not row.up:
        return c["state"]
    return "\n".join([f"{c['state']}  {c['img/s']} img/s  done {c['done']}  fail {c['fail %']}",
                      f"outcomes {c['outcomes']}",
                      f"queue {c['queue']}  backlog {c['backlog']}  lanes busy {c['lanes busy']}",
                      f"e2e p50/p95 {c['e2e p50/p95']}  discovery p95 {c['discovery p95']}",
                      f"endpoints {c['endpoints']}  storage {c['storage']}"])


def wide_enough(rows: list[Row], width: int) -> bool:
    """Whether a terminal ``width`` columns wide shows every column whole (each cell is padded and ruled)."""
    plain = max((len(line) for line in plain_table(rows).splitlines()), default=0)
    return plain + len(COLUMNS) + 4 <= width


def rich_table(rows: list[Row], width: int = 10_000) -> Any:
    """One column per figure when ``width`` allows; else one row per instance with its figures stacked."""
    from rich.table import Table

    table = Table(title=f"imgworker top  {time.strftime('%H:%M:%S')}", expand=False)
    wide = wide_enough(rows, width)
    if wide:
        for name in COLUMNS:
            table.add_column(name, no_wrap=name in ("instance", "state"))
    else:
        table.add_column("instance", no_wrap=True, overflow="ellipsis", max_width=max(12, width // 4))
        table.add_column("figures", overflow="fold")
    for row in rows:
        style = "red" if not row.up or row.health in ("stalled", "stopping") or row.over_limit else None
        table.add_row(*(cells(row) if wide else cells(row)[:1] + [stacked(row)]), style=style)
    return table


def run_top(urls: Sequence[str], *, interval_s: float, once: bool, timeout_s: float) -> ExitCode:
    """Poll and draw until Ctrl-C; one plain snapshot when stdout is not a terminal or with ``once``."""
    poller = Poller(urls, timeout_s)
    if once or not sys.stdout.isatty():
        poller.poll()
        time.sleep(min(interval_s, 1.0))
        rows = poller.poll()
        print(plain_table(rows), flush=True)
        if not any(row.up for row in rows):
            print("imgworker: error: no address answered", file=sys.stderr)
            return ExitCode.UNANSWERED
        return ExitCode.OK
    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:
        print("imgworker: error: the live table needs rich: pip install 'imgworker[top]' "
              "(or use --once, or pipe the output, for a plain table)", file=sys.stderr)
        return ExitCode.CONFIG
    try:
        console = Console()
        with Live(rich_table(poller.poll(), console.width), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval_s)
                live.update(rich_table(poller.poll(), console.width), refresh=True)
    except KeyboardInterrupt:
        return ExitCode.OK
