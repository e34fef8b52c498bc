"""``imgworker tune``: throughput, latency and cost against the number of worker processes.

Each point runs the real pipeline (supervisor, N workers, Manager) against the embedded store,
pre-filled once, and an algorithm service. A point is measured only once stable: a warm-up, then
consecutive windows until the last ``stable_windows`` agree within ``tolerance``, with a cap.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import msgspec
import psutil

from .config import Config, Credentials, load_config
from .outcomes import Result
from .services.algo_server import AlgoService, SyntheticParams
from .services.loadgen import generated_frames
from .services.store_server import EmbeddedStore
from .stats import LogHistogram
from .store import Store
from .supervisor import Supervisor

log = logging.getLogger(__name__)


class TuneParams(msgspec.Struct, frozen=True, kw_only=True):
    workers: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    latency_ms: float = 200.0
    sigma: float = 0.0
    warmup_s: float = 3.0
    startup_cap_s: float = 120.0
    window_s: float = 2.0  # at least; longer where N is small (window_length)
    stable_windows: int = 3
    tolerance: float = 0.05
    max_windows: int = 8
    images: int = 4000
    p95_budget_ms: float = 0.0
    stat_check: bool = True


class Point(msgspec.Struct, frozen=True, kw_only=True):
    workers: int
    throughput_per_s: float
    ideal_per_s: float
    efficiency: float
    """Against N / the measured mean algorithm latency."""
    efficiency_nominal: float
    """Against N / the nominal latency (``latency_ms``): a service slowing under load cannot hide here."""
    p50_ms: float
    p95_ms: float
    p99_ms: float
    algo_p50_ms: float
    algo_p95_ms: float
    algo_p99_ms: float
    overhead_p50_ms: float
    overhead_p99_ms: float
    stat_p50_ms: float
    overhead_excl_check_p50_ms: float
    overhead_excl_check_p99_ms: float
    cpu_s_per_1000: float
    rss_worker_mb: float
    rss_supervisor_mb: float
    rss_manager_mb: float
    windows: int
    stable: bool
    images: int


class TuneResult(msgspec.Struct, frozen=True):
    params: TuneParams
    points: list[Point]
    recommended_workers: int
    reason: str


# ----- arithmetic (pure, tested) ------------------------------------------------------------


def ideal_throughput(workers: int, mean_latency_ms: float, capacity_per_s: float = 0.0) -> float:
    """min(N / mean algorithm latency, the service's capacity if known)."""
    ideal = workers / (mean_latency_ms / 1000.0) if mean_latency_ms > 0 else 0.0
    return min(ideal, capacity_per_s) if capacity_per_s > 0 else ideal


def efficiency(throughput: float, ideal: float) -> float:
    return round(throughput / ideal, 4) if ideal > 0 else 0.0


def is_stable(rates: Sequence[float], *, windows: int, tolerance: float) -> bool:
    """The last ``windows`` rates agree within ``tolerance`` of their mean."""
    if len(rates) < windows:
        return False
    last = rates[-windows:]
    mean = sum(last) / windows
    return mean > 0 and all(abs(r - mean) <= tolerance * mean for r in last)


def recommend(points: Sequence[Point], p95_budget_ms: float = 0.0) -> tuple[int, str]:
    """Smallest N within 95 % of the best throughput; or the largest N meeting a p95 budget."""
    if not points:
        raise ValueError("no points to recommend from")
    if p95_budget_ms > 0:
        meeting = [p for p in points if p.p95_ms <= p95_budget_ms]
        if meeting:
            largest = max(meeting, key=lambda p: p.workers)
            return largest.workers, f"largest N with p95 end to end <= {p95_budget_ms:g} ms"
        fastest = min(points, key=lambda p: p.p95_ms)
        return fastest.workers, f"no N meets p95 <= {p95_budget_ms:g} ms; N with the lowest p95"
    best = max(p.throughput_per_s for p in points)
    knee = min((p for p in points if p.throughput_per_s >= 0.95 * best), key=lambda p: p.workers)
    return knee.workers, f"smallest N reaching 95 % of the best throughput ({best:.1f} img/s)"


def window_length(params: TuneParams, workers: int, min_completions: int = 50) -> float:
    """Long enough for ``min_completions`` at the ideal rate, so counting noise stays under the tolerance."""
    ideal = ideal_throughput(workers, params.latency_ms)
    return max(params.window_s, min_completions / ideal) if ideal > 0 else params.window_s


def window_rates(finish_times: Sequence[float], start: float, window_s: float, count: int) -> list[float]:
    """Completions per second in consecutive windows starting at ``start``."""
    rates = []
    for i in range(count):
        lo, hi = start + i * window_s, start + (i + 1) * window_s
        rates.append(sum(1 for t in finish_times if lo <= t < hi) / window_s)
    return rates


# ----- measurement ----------------------------------------------------------------------------


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def _own_processes() -> list[psutil.Process]:
    """The supervisor and its Python children (workers, Manager); not the store or the service."""
    me = psutil.Process()
    return [me] + [c for c in me.children() if "imgworker:" in " ".join(_cmdline(c))]


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _rss_mb(procs: list[psutil.Process], title: str) -> float:
    values = []
    for proc in procs:
        if title in " ".join(_cmdline(proc)):
            try:
                values.append(proc.memory_info().rss / 2**20)
            except psutil.NoSuchProcess:
                continue
    return round(sum(values) / len(values), 1) if values else 0.0


def measure_point(cfg: Config, params: TuneParams, workers: int) -> Point:
    """Run the pipeline with N workers until throughput is stable (or the cap), then stop it."""
    cfg = msgspec.structs.replace(cfg, worker=msgspec.structs.replace(cfg.worker, count=workers),
                                  run=msgspec.structs.replace(cfg.run, state_dir=tempfile.mkdtemp(prefix="tune-")))
    finished: list[Result] = []

    def record(result: Result) -> None:
        finished.append(msgspec.structs.replace(result, finished_at=time.monotonic()))

    sup = Supervisor(cfg, show_progress=False, on_result=record)
    sup.start()
    try:
        point = _run_windows(sup, params, workers, finished)
    finally:
        sup.request_stop("tune point measured", force=True)
        sup.shutdown()
        shutil.rmtree(cfg.run.state_dir, ignore_errors=True)
    return point


def _run_windows(sup: Supervisor, params: TuneParams, workers: int, finished: list[Result]) -> Point:
    # every worker started and answered once (spawning many takes a while), then the warm-up
    sup.step_until(lambda: len({r.worker for r in finished}) >= workers, timeout_s=params.startup_cap_s)
    sup.step_until(lambda: False, timeout_s=params.warmup_s)
    procs = _own_processes()
    cpu0, start, n0 = _cpu_seconds(procs), time.monotonic(), len(finished)
    window = window_length(params, workers)
    rates: list[float] = []
    while len(rates) < params.max_windows and not is_stable(rates, windows=params.stable_windows,
                                                               tolerance=params.tolerance):
        end = start + (len(rates) + 1) * window
        sup.step_until(lambda: time.monotonic() >= end)
        rates.append(window_rates([r.finished_at for r in finished], end - window, window, 1)[0])
    elapsed = time.monotonic() - start
    procs = _own_processes()
    cpu = _cpu_seconds(procs) - cpu0
    measured = [r for r in finished[n0:] if r.outcome.is_success]
    return _point(workers, params, measured, rates, elapsed, cpu, procs, len(finished) - n0)


def _point(workers: int, params: TuneParams, measured: list[Result], rates: list[float], elapsed: float,
           cpu: float, procs: list[psutil.Process], count: int) -> Point:
    e2e, algo, overhead, stat, bare = (LogHistogram() for _ in range(5))
    for r in measured:
        e2e.add(r.e2e_ms or 0.0)
        algo.add(r.algo_ms or 0.0)
        overhead.add(max(0.0, (r.e2e_ms or 0.0) - (r.algo_ms or 0.0)))
        stat.add(r.stat_ms or 0.0)
        bare.add(max(0.0, (r.e2e_ms or 0.0) - (r.algo_ms or 0.0) - (r.stat_ms or 0.0)))
    stable = is_stable(rates, windows=params.stable_windows, tolerance=params.tolerance)
    tail = rates[-params.stable_windows:] if stable else rates
    throughput = sum(tail) / len(tail) if tail else 0.0
    ideal = ideal_throughput(workers, algo.mean or params.latency_ms)
    return Point(
        workers=workers, throughput_per_s=round(throughput, 2), ideal_per_s=round(ideal, 2),
        efficiency=efficiency(throughput, ideal),
        efficiency_nominal=efficiency(throughput, ideal_throughput(workers, params.latency_ms)),
        p50_ms=round(e2e.percentile(50), 2), p95_ms=round(e2e.percentile(95), 2), p99_ms=round(e2e.percentile(99), 2),
        algo_p50_ms=round(algo.percentile(50), 2), algo_p95_ms=round(algo.percentile(95), 2),
        algo_p99_ms=round(algo.percentile(99), 2),
        overhead_p50_ms=round(overhead.percentile(50), 3), overhead_p99_ms=round(overhead.percentile(99), 3),
        stat_p50_ms=round(stat.percentile(50), 3), overhead_excl_check_p50_ms=round(bare.percentile(50), 3),
        overhead_excl_check_p99_ms=round(bare.percentile(99), 3),
        cpu_s_per_1000=round(cpu / count * 1000, 3) if count else 0.0,
        rss_worker_mb=_rss_mb(procs, "imgworker: worker"), rss_supervisor_mb=_rss_mb(procs, "imgworker: supervisor"),
        rss_manager_mb=_rss_mb(procs, "imgworker: ledger"), windows=len(rates), stable=stable, images=count,
    )


def prefill(store: Store, prefix: str, count: int) -> None:
    """Upload ``count`` small frames under prefix, in parallel."""
    frames = generated_frames(8, size=(48, 64))
    keys = [f"{prefix}bench/cam-{i % 16:02d}/20240101-{i // 1000:06d}.{i % 1000:03d}.jpg" for i in range(count)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda ik: store.put(ik[1], frames[ik[0] % len(frames)]), enumerate(keys)))


def sweep(cfg: Config, params: TuneParams, progress: Callable[[str], None]) -> TuneResult:
    """Measure every N against an existing configuration (its store, prefix and service)."""
    points = []
    for n in params.workers:
        point = measure_point(cfg, params, n)
        points.append(point)
        progress(f"tune: N={n:4d} {point.throughput_per_s:8.1f} img/s (ideal {point.ideal_per_s:.1f}, "
                 f"efficiency {point.efficiency:.2f}, {point.efficiency_nominal:.2f} against {params.latency_ms:g} ms) "
                 f"p95 {point.p95_ms:.0f} ms "
                 f"overhead p50 {point.overhead_p50_ms:.2f} ms {'stable' if point.stable else 'NOT stable'}")
    workers, reason = recommend(points, params.p95_budget_ms)
    return TuneResult(params=params, points=points, recommended_workers=workers, reason=reason)


def run_tune(params: TuneParams, *, progress: Callable[[str], None] = print) -> TuneResult:
    """Start the embedded store and a synthetic service with latency L, pre-fill, sweep N."""
    workdir = tempfile.mkdtemp(prefix="imgworker-tune-")
    creds = Credentials(access_key="tune-" + secrets.token_hex(4), secret_key=secrets.token_urlsafe(24))
    synthetic = SyntheticParams(latency_ms=params.latency_ms, sigma=params.sigma, detection_rate=0.3)
    try:
        with EmbeddedStore(os.path.join(workdir, "store"), creds, bucket="tune") as server, \
                AlgoService("synthetic", synthetic) as algo:
            cfg = load_config(env={}, overrides={
                "store": {"endpoint": server.endpoint, "bucket": "tune", "prefix": "p/"},
                "algo": {"endpoint": algo.endpoint, "timeout_s": 30.0},
                "worker": {"stat_check": params.stat_check},
                "scan": {"interval_s": 0.5},
                "run": {"checkpoint_interval_s": 30.0},
            })
            cfg = msgspec.structs.replace(cfg, credentials=creds)
            progress(f"tune: uploading {params.images} images ...")
            prefill(Store(cfg.store, creds, pool_size=16), "p/", params.images)
            return sweep(cfg, params, progress)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def markdown(result: TuneResult) -> str:
    lines = [
        "| N | throughput/s | ideal/s | efficiency | efficiency vs nominal L | p50 ms | p95 ms | p99 ms | algo p50 "
        "| overhead p50 ms | overhead p99 ms | StatObject p50 ms | overhead without check p50 / p99 ms "
        "| CPU s / 1000 img | RSS worker MB | RSS supervisor MB | RSS Manager MB | stable |",
        "|" + "---|" * 18,
    ]
    for p in result.points:
        lines.append(
            f"| {p.workers} | {p.throughput_per_s:.1f} | {p.ideal_per_s:.1f} | {p.efficiency:.3f} "
            f"| {p.efficiency_nominal:.3f} | {p.p50_ms:.1f} | {p.p95_ms:.1f} | {p.p99_ms:.1f} | {p.algo_p50_ms:.1f} "
            f"| {p.overhead_p50_ms:.2f} | {p.overhead_p99_ms:.2f} | {p.stat_p50_ms:.2f} "
            f"| {p.overhead_excl_check_p50_ms:.2f} / {p.overhead_excl_check_p99_ms:.2f} | {p.cpu_s_per_1000:.2f} "
            f"| {p.rss_worker_mb:.0f} | {p.rss_supervisor_mb:.0f} | {p.rss_manager_mb:.0f} "
            f"| {'yes' if p.stable else 'no'} |"
        )
    lines += ["", f"Recommended: **{result.recommended_workers} workers** ({result.reason}).",
              f"Algorithm latency {result.params.latency_ms:g} ms (sigma {result.params.sigma:g}), "
              f"existence check {'on' if result.params.stat_check else 'off'}. Ideal and efficiency use the measured "
              f"mean algorithm latency; efficiency vs nominal L uses {result.params.latency_ms:g} ms."]
    return "\n".join(lines)


def plot(result: TuneResult, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [p.workers for p in result.points]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(n, [p.throughput_per_s for p in result.points], "o-", label="throughput")
    ax.plot(n, [p.ideal_per_s for p in result.points], "--", color="grey", label="ideal N / latency")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("worker processes (N)")
    ax.set_ylabel("images / s")
    ax2 = ax.twinx()
    ax2.plot(n, [p.p95_ms for p in result.points], "s:", color="tab:red", label="p95 end to end")
    ax2.set_ylabel("p95 ms", color="tab:red")
    ax.axvline(result.recommended_workers, color="tab:green", alpha=0.4, label="recommended")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="upper left", fontsize=8)
    ax.set_title(f"imgworker tune, algorithm latency {result.params.latency_ms:g} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
