"""``imgworker tune``: throughput, latency and cost against processes x lanes.

Each point is one configuration of ``processes`` worker processes of ``lanes`` lanes each, so
N = processes x lanes images in flight. It runs the real pipeline (supervisor, workers, Manager,
scanner) against the embedded store, pre-filled once, and an algorithm service. A point is measured
only once stable: a warm-up, then consecutive windows until the last ``stable_windows`` agree within
``tolerance``, with a cap. CPU and RSS count every imgworker process of the run (not the store or
the service).

The recommendation (``recommend``) is a pure function of the measured points:

- among the points within ``WITHIN`` (95 %) of the best throughput (of those meeting the p95 budget,
  if one is given), the smallest CPU per image; points within ``CPU_TIE`` (5 %) of that smallest CPU
  count as tied, and the tie goes to the fewest images in flight, then the fewest processes (less
  memory);
- the initial limit for ``--adaptive`` is the knee: the smallest N whose best configuration reaches
  95 % of the best throughput, the N past which throughput stops growing.
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


#: a configuration within this fraction of the best throughput is a candidate; also the knee's threshold
WITHIN = 0.95
#: CPU per image within this fraction of the smallest counts as a tie (measurement noise)
CPU_TIE = 0.05
#: the ``--total`` and ``--lanes`` a bare ``imgworker tune`` measures
DEFAULT_TOTALS = (8, 16, 32, 64, 128)
DEFAULT_LANES = (1, 4, 8, 16)
#: the bounds ``worker.count`` and ``worker.threads`` accept
MAX_PROCESSES, MAX_LANES = 1024, 256


class TuneParams(msgspec.Struct, frozen=True, kw_only=True):
    grid: tuple[tuple[int, int], ...] = ((1, 1), (2, 1), (4, 1), (8, 1))
    """(processes, lanes) pairs, measured in this order."""
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
    scan_interval_s: float = 5.0
    """How often the embedded run relists the pre-filled bucket. Nothing new arrives while tuning, so a
    long interval keeps re-listing out of the CPU per image that tells configurations apart."""


class Point(msgspec.Struct, frozen=True, kw_only=True):
    workers: int
    """Worker processes."""
    lanes: int
    """Lanes per process."""
    in_flight: int
    """N: images analysed at once, processes x lanes."""
    lanes_answered: int = 0
    """Distinct lanes that finished an image while measured: N when every lane of the run worked."""
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
    rss_total_peak_mb: float
    """The most RSS every imgworker process of the run held together, sampled at each window's end."""
    windows: int
    stable: bool
    images: int
    ran_out: bool = False
    """The queue was empty at the end of a measuring window: every image had been handed out, so lanes
    waited for images and the throughput reads low (measure again with more images)."""


class Recommendation(msgspec.Struct, frozen=True, kw_only=True):
    processes: int
    lanes: int
    initial_limit: int
    """The knee: where to start ``--adaptive`` (never above processes x lanes)."""
    knee_reached: bool
    """False when throughput still grew at the largest N measured (measure larger N)."""
    reason: str


class TuneResult(msgspec.Struct, frozen=True, kw_only=True):
    params: TuneParams
    points: list[Point]
    recommended_workers: int
    recommended_lanes: int
    initial_limit: int
    knee_reached: bool
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


def build_grid(*, totals: Sequence[int] = (), lanes: Sequence[int] = (1,),
               processes: Sequence[int] = ()) -> tuple[tuple[int, int], ...]:
    """(processes, lanes) pairs: every lane count that divides each total N, or processes x lanes.

    Raises ValueError, saying which value is wrong, for an empty or out-of-range list, or a total
    that no lane count divides.
    """
    _check_counts("--lanes", lanes, MAX_LANES)
    if processes:
        if totals:
            raise ValueError("give either --total or --workers, not both")
        _check_counts("--workers", processes, MAX_PROCESSES)
        return tuple((p, n) for p in processes for n in lanes)
    _check_counts("--total", totals, MAX_PROCESSES * MAX_LANES)
    pairs = []
    for total in totals:
        splits = [(total // n, n) for n in lanes if total % n == 0 and total // n <= MAX_PROCESSES]
        if not splits:
            raise ValueError(f"--total {total}: no --lanes value ({', '.join(map(str, lanes))}) divides it")
        pairs += splits
    return tuple(pairs)


def _check_counts(flag: str, values: Sequence[int], largest: int) -> None:
    if not values:
        raise ValueError(f"{flag}: give at least one value")
    bad = [v for v in values if not 1 <= v <= largest]
    if bad:
        raise ValueError(f"{flag}: value {bad[0]} is not allowed (each from 1 to {largest})")


def recommend(points: Sequence[Point], p95_budget_ms: float = 0.0) -> Recommendation:
    """Processes and lanes with the least CPU per image near the best throughput, and the knee.

    See the module docstring for the rule. With a p95 budget only points meeting it are considered;
    if none does, the point with the lowest p95 is recommended and its N is the initial limit.
    """
    if not points:
        raise ValueError("no points to recommend from")
    candidates = list(points)
    budget = ""
    if p95_budget_ms > 0:
        candidates = [p for p in points if p.p95_ms <= p95_budget_ms]
        if not candidates:
            low = min(points, key=lambda p: (p.p95_ms, p.cpu_s_per_1000))
            return Recommendation(processes=low.workers, lanes=low.lanes, initial_limit=low.in_flight,
                                  knee_reached=False,
                                  reason=f"no configuration meets p95 <= {p95_budget_ms:g} ms; the lowest p95")
        budget = f" among those with p95 <= {p95_budget_ms:g} ms"
    best = max(p.throughput_per_s for p in candidates)
    near = [p for p in candidates if p.throughput_per_s >= WITHIN * best]
    least = min(p.cpu_s_per_1000 for p in near)
    tied = [p for p in near if p.cpu_s_per_1000 <= least * (1 + CPU_TIE)]
    chosen = min(tied, key=lambda p: (p.in_flight, p.workers))
    knee = knee_of(candidates)
    reached = knee < max(p.in_flight for p in points)  # a larger N was measured: slower, or over the budget
    reason = (f"the least CPU per image ({chosen.cpu_s_per_1000:.2f} CPU-s / 1000) within "
              f"{WITHIN:.0%} of the best throughput ({best:.1f} img/s){budget}")
    if not reached:
        reason += "; throughput still grew at the largest N measured, so the knee may lie above it"
    short = sorted({p.in_flight for p in points if p.ran_out})
    if short:
        reason += (f"; N = {', '.join(map(str, short))} ran out of images while measured, so its throughput reads "
                   f"low and this choice may be too small: measure again with more --images")
    return Recommendation(processes=chosen.workers, lanes=chosen.lanes, initial_limit=knee, knee_reached=reached,
                          reason=reason)


def knee_of(points: Sequence[Point]) -> int:
    """The smallest N whose best point reaches WITHIN of the best throughput."""
    by_n: dict[int, float] = {}
    for p in points:
        by_n[p.in_flight] = max(by_n.get(p.in_flight, 0.0), p.throughput_per_s)
    best = max(by_n.values())
    return min(n for n, tput in by_n.items() if tput >= WITHIN * best)


def window_length(params: TuneParams, in_flight: int, min_completions: int = 50) -> float:
    """Long enough for ``min_completions`` at the ideal rate, so counting noise stays under the tolerance."""
    ideal = ideal_throughput(in_flight, params.latency_ms)
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


def _rss_total_mb(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            total += proc.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            continue
    return total


def _rss_mb(procs: list[psutil.Process], title: str) -> float:
    values = []
    for proc in procs:
        if title in " ".join(_cmdline(proc)):
            try:
                values.append(proc.memory_info().rss / 2**20)
            except psutil.NoSuchProcess:
                continue
    return round(sum(values) / len(values), 1) if values else 0.0


def measure_point(cfg: Config, params: TuneParams, workers: int, lanes: int = 1) -> Point:
    """Run the pipeline with ``workers`` processes of ``lanes`` lanes until throughput is stable (or the cap)."""
    cfg = msgspec.structs.replace(cfg, worker=msgspec.structs.replace(cfg.worker, count=workers, threads=lanes),
                                  run=msgspec.structs.replace(cfg.run, state_dir=tempfile.mkdtemp(prefix="tune-")))
    finished: list[Result] = []

    def record(result: Result) -> None:
        finished.append(msgspec.structs.replace(result, finished_at=time.monotonic()))

    sup = Supervisor(cfg, show_progress=False, on_result=record)
    sup.start()
    try:
        point = _run_windows(sup, params, (workers, lanes), finished)
    finally:
        sup.request_stop("tune point measured", force=True)
        sup.shutdown()
        shutil.rmtree(cfg.run.state_dir, ignore_errors=True)
    return point


def _run_windows(sup: Supervisor, params: TuneParams, config: tuple[int, int], finished: list[Result]) -> Point:
    workers, lanes = config
    # every lane started and answered once (spawning many takes a while), then the warm-up
    if not sup.step_until(lambda: len({r.worker for r in finished}) >= workers * lanes,
                          timeout_s=params.startup_cap_s):
        log.warning("tune: %d x %d: only %d of %d lanes answered within %g s; measuring anyway", workers, lanes,
                    len({r.worker for r in finished}), workers * lanes, params.startup_cap_s)
    sup.step_until(lambda: False, timeout_s=params.warmup_s)
    procs = _own_processes()
    cpu0, start, n0 = _cpu_seconds(procs), time.monotonic(), len(finished)
    window = window_length(params, workers * lanes)
    rates: list[float] = []
    rss_peak = _rss_total_mb(procs)
    ran_out = False
    while len(rates) < params.max_windows and not is_stable(rates, windows=params.stable_windows,
                                                               tolerance=params.tolerance):
        end = start + (len(rates) + 1) * window
        sup.step_until(lambda: time.monotonic() >= end)
        rates.append(window_rates([r.finished_at for r in finished], end - window, window, 1)[0])
        rss_peak = max(rss_peak, _rss_total_mb(_own_processes()))
        ran_out = ran_out or sup.pending == 0
    elapsed = time.monotonic() - start
    procs = _own_processes()
    cpu = _cpu_seconds(procs) - cpu0
    measured = [r for r in finished[n0:] if r.outcome.is_success]
    return _point(config, params, measured, rates, elapsed, cpu, procs, len(finished) - n0, rss_peak, ran_out)


def _point(config: tuple[int, int], params: TuneParams, measured: list[Result], rates: list[float], elapsed: float,
           cpu: float, procs: list[psutil.Process], count: int, rss_peak: float = 0.0, ran_out: bool = False) -> Point:
    workers, lanes = config
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
    ideal = ideal_throughput(workers * lanes, algo.mean or params.latency_ms)
    return Point(
        workers=workers, lanes=lanes, in_flight=workers * lanes, lanes_answered=len({r.worker for r in measured}),
        throughput_per_s=round(throughput, 2),
        ideal_per_s=round(ideal, 2), efficiency=efficiency(throughput, ideal),
        efficiency_nominal=efficiency(throughput, ideal_throughput(workers * lanes, params.latency_ms)),
        p50_ms=round(e2e.percentile(50), 2), p95_ms=round(e2e.percentile(95), 2), p99_ms=round(e2e.percentile(99), 2),
        algo_p50_ms=round(algo.percentile(50), 2), algo_p95_ms=round(algo.percentile(95), 2),
        algo_p99_ms=round(algo.percentile(99), 2),
        overhead_p50_ms=round(overhead.percentile(50), 3), overhead_p99_ms=round(overhead.percentile(99), 3),
        stat_p50_ms=round(stat.percentile(50), 3), overhead_excl_check_p50_ms=round(bare.percentile(50), 3),
        overhead_excl_check_p99_ms=round(bare.percentile(99), 3),
        cpu_s_per_1000=round(cpu / count * 1000, 3) if count else 0.0,
        rss_worker_mb=_rss_mb(procs, "imgworker: worker"), rss_supervisor_mb=_rss_mb(procs, "imgworker: supervisor"),
        rss_manager_mb=_rss_mb(procs, "imgworker: ledger"), rss_total_peak_mb=round(rss_peak, 1),
        windows=len(rates), stable=stable, images=count, ran_out=ran_out,
    )


def prefill(store: Store, prefix: str, count: int) -> None:
    """Upload ``count`` small frames under prefix, in parallel."""
    frames = generated_frames(8, size=(48, 64))
    keys = [f"{prefix}bench/cam-{i % 16:02d}/20240101-{i // 1000:06d}.{i % 1000:03d}.jpg" for i in range(count)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda ik: store.put(ik[1], frames[ik[0] % len(frames)]), enumerate(keys)))


def sweep(cfg: Config, params: TuneParams, progress: Callable[[str], None]) -> TuneResult:
    """Measure every (processes, lanes) of the grid against an existing configuration (store, prefix, service)."""
    points = []
    for workers, lanes in params.grid:
        point = measure_point(cfg, params, workers, lanes)
        points.append(point)
        progress(f"tune: {workers:4d} processes x {lanes:3d} lanes (N={point.in_flight:4d}) "
                 f"{point.throughput_per_s:8.1f} img/s (ideal {point.ideal_per_s:.1f}, "
                 f"efficiency {point.efficiency:.2f}, {point.efficiency_nominal:.2f} against {params.latency_ms:g} ms) "
                 f"p95 {point.p95_ms:.0f} ms CPU {point.cpu_s_per_1000:.2f} s/1000 "
                 f"RSS {point.rss_total_peak_mb:.0f} MB {'stable' if point.stable else 'NOT stable'}"
                 f"{'; ran out of images while measured: raise --images' if point.ran_out else ''}")
    rec = recommend(points, params.p95_budget_ms)
    return TuneResult(params=params, points=points, recommended_workers=rec.processes, recommended_lanes=rec.lanes,
                      initial_limit=rec.initial_limit, knee_reached=rec.knee_reached, reason=rec.reason)


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
                "scan": {"interval_s": params.scan_interval_s},
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
        "| processes | lanes | N | throughput/s | ideal/s | efficiency | efficiency vs nominal L | p50 ms | p95 ms "
        "| p99 ms | algo p50 | overhead p50 ms | overhead p99 ms | StatObject p50 ms "
        "| overhead without check p50 / p99 ms | CPU s / 1000 img | RSS worker MB | RSS total peak MB | stable |",
        "|" + "---|" * 19,
    ]
    for p in result.points:
        lines.append(
            f"| {p.workers} | {p.lanes} | {p.in_flight} | {p.throughput_per_s:.1f} | {p.ideal_per_s:.1f} "
            f"| {p.efficiency:.3f} | {p.efficiency_nominal:.3f} | {p.p50_ms:.1f} | {p.p95_ms:.1f} | {p.p99_ms:.1f} "
            f"| {p.algo_p50_ms:.1f} | {p.overhead_p50_ms:.2f} | {p.overhead_p99_ms:.2f} | {p.stat_p50_ms:.2f} "
            f"| {p.overhead_excl_check_p50_ms:.2f} / {p.overhead_excl_check_p99_ms:.2f} | {p.cpu_s_per_1000:.2f} "
            f"| {p.rss_worker_mb:.0f} | {p.rss_total_peak_mb:.0f} | {'yes' if p.stable else 'no'}"
            f"{' (ran out of images)' if p.ran_out else ''} |"
        )
    n = result.recommended_workers * result.recommended_lanes
    lines += ["", f"Recommended: **{result.recommended_workers} processes x {result.recommended_lanes} lanes** "
                  f"(`--workers {result.recommended_workers} --threads {result.recommended_lanes}`, N = {n}): "
                  f"{result.reason}.",
              f"Initial limit for `--adaptive`: **{result.initial_limit}** (the knee: the smallest N reaching "
              f"{WITHIN:.0%} of the best throughput{'' if result.knee_reached else '; not reached in this grid'}).",
              f"Algorithm latency {result.params.latency_ms:g} ms (sigma {result.params.sigma:g}), "
              f"existence check {'on' if result.params.stat_check else 'off'}. N = processes x lanes. Ideal and "
              f"efficiency use the measured mean algorithm latency; efficiency vs nominal L uses "
              f"{result.params.latency_ms:g} ms. CPU and RSS: every imgworker process of the run (supervisor, "
              f"workers, scanner, Manager), not the store or the service."]
    return "\n".join(lines)


def plot(result: TuneResult, path: str) -> None:
    """Throughput and CPU per image against N, one line per lane count; the recommendation marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, cpu) = plt.subplots(1, 2, figsize=(11, 4.2))
    for lanes in sorted({p.lanes for p in result.points}):
        row = sorted((p for p in result.points if p.lanes == lanes), key=lambda p: p.in_flight)
        n = [p.in_flight for p in row]
        label = f"{lanes} lane{'s' if lanes > 1 else ''} / process"
        ax.plot(n, [p.throughput_per_s for p in row], "o-", label=label)
        cpu.plot(n, [p.cpu_s_per_1000 for p in row], "o-", label=label)
    n_all = sorted({p.in_flight for p in result.points})
    ax.plot(n_all, [ideal_throughput(n, result.params.latency_ms) for n in n_all], "--", color="grey",
            label=f"N / {result.params.latency_ms:g} ms")
    chosen = [p for p in result.points
              if (p.workers, p.lanes) == (result.recommended_workers, result.recommended_lanes)]
    for p in chosen[:1]:
        ax.plot([p.in_flight], [p.throughput_per_s], "*", color="tab:green", markersize=14, label="recommended")
        cpu.plot([p.in_flight], [p.cpu_s_per_1000], "*", color="tab:green", markersize=14, label="recommended")
    ax.axvline(result.initial_limit, color="tab:green", alpha=0.3, label="knee (initial --adaptive limit)")
    for a, label in ((ax, "images / s"), (cpu, "CPU-s / 1000 images")):
        a.set_xscale("log", base=2)
        a.set_xlabel("images in flight N = processes x lanes")
        a.set_ylabel(label)
        a.legend(fontsize=7)
    fig.suptitle(f"imgworker tune: processes x lanes, algorithm latency {result.params.latency_ms:g} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
