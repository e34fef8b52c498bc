"""Adaptive concurrency against a service whose capacity changes mid-run (adaptive.json, .md, .png).

    python -m benchmarks.adaptive [--phase-s 15] [--budget-ms 600]   (45 s phases: --images 11000)
    python -m benchmarks.adaptive --backend face [--rounds 4 --round-s 10]   (adaptive-face.json, .md, .png)

The synthetic service serves a fixed number of calls at once (its *slots*) and queues the rest, as
a model server does. In every run it goes through the same phases: 8, then 24, then 6 slots at
200 ms a call, then 6 slots at 400 ms (a 2x slowdown). The same pipeline (the real supervisor and
worker processes of 8 lanes, the embedded store, change events) runs each way in turn, in one
invocation: adaptive (ceiling 64 = 8 processes x 8 lanes, with a p95 budget), fixed 64, and fixed
N from 6 to 24 (the knees, and 12 a little above two of them for the client's own time), from which the best fixed N of each phase is taken.

Per phase: throughput (answered images a second), p50/p95 of the algorithm call as imgworker
timed it (queueing at the service included), and the calls that failed (timeouts here: the call
timeout is ``--timeout-s``). Images are pre-filled once; every way starts from an empty state.

With ``--backend face`` the service is the real face detector (scikit-image's LBP cascade, on the
photos scikit-image ships), whose knee is set by this machine's CPU rather than by a slot count:
adaptive (ceiling 64, the same budget) against fixed 64 and a few small fixed N. The ways are
interleaved in ``--rounds`` rounds of ``--round-s`` each (after the warm-up), the order rotated every
round, so that load from elsewhere on a shared host falls on every way alike: each way's figures are
its totals over all rounds, with the spread of its throughput across rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence

import msgspec
import numpy as np
import requests

from imgworker.config import Config, ScanConfig
from imgworker.outcomes import Result
from imgworker.store import Store
from imgworker.supervisor import Supervisor
from imgworker.tune import prefill

from ._common import RESULTS, embedded

#: Seconds after a step that ``p95_settled_ms`` leaves out.
SETTLE_S = 3.0
#: (slots, service time in ms) of each phase.
PHASES = ((8, 200.0), (24, 200.0), (6, 200.0), (6, 400.0))


class Way(msgspec.Struct, frozen=True):
    name: str
    processes: int
    threads: int
    adaptive: bool = False


#: The ways against the real face detector: its knee is a few calls (the service runs a thread per core).
FACE_WAYS = (Way("adaptive", 8, 8, adaptive=True), Way("fixed 64", 8, 8), Way("fixed 8", 1, 8), Way("fixed 4", 1, 4),
             Way("fixed 2", 1, 2))
WAYS = (Way("adaptive", 8, 8, adaptive=True), Way("fixed 64", 8, 8), Way("fixed 24", 3, 8), Way("fixed 12", 2, 6),
        Way("fixed 8", 1, 8), Way("fixed 6", 1, 6))


class Params(msgspec.Struct, frozen=True):
    phase_s: float = 15.0
    warmup_s: float = 8.0
    budget_ms: float = 600.0
    timeout_s: float = 3.0
    images: int = 4000
    sigma: float = 0.1
    rounds: int = 4
    """Face: rounds in which every way runs once, the order rotated."""
    round_s: float = 10.0
    """Face: seconds each way is measured in a round (after the warm-up)."""


class PhaseRow(msgspec.Struct, frozen=True):
    phase: int
    slots: int
    service_ms: float
    way: str
    throughput_per_s: float
    p50_ms: float
    p95_ms: float
    p95_settled_ms: float
    """p95 of the calls that ended ``SETTLE_S`` or more after the phase began (the step's own queue drained)."""
    failed_calls: int
    mean_limit: float = 0.0
    best_fixed: bool = False


class FaceRow(msgspec.Struct, frozen=True):
    """One way against the face detector, over the measured phase."""

    way: str
    throughput_per_s: float
    p50_ms: float
    p95_ms: float
    failed_calls: int
    faces: int
    """Faces the detector found in the answered images (it really ran)."""
    mean_limit: float = 0.0
    best_fixed: bool = False
    round_throughputs: tuple[float, ...] = ()
    """Answered images a second in each round, in round order."""


class FaceRound(msgspec.Struct, frozen=True):
    """One way in one round against the face detector: what it did in its measured seconds."""

    way: str
    answered: int
    ms: tuple[float, ...]
    failed_calls: int
    faces: int
    mean_limit: float
    samples: tuple["Sample", ...] = ()


class Sample(msgspec.Struct, frozen=True, array_like=True):
    t: float
    limit: int


def shape(cfg: Config, slots: int, latency_ms: float) -> None:
    url = cfg.algo.endpoint.rsplit("/", 1)[0] + "/shape"
    requests.post(url, json={"slots": slots, "latency_ms": latency_ms}, timeout=5).raise_for_status()


def _way_config(base: Config, way: Way, params: Params, state: str) -> Config:
    return msgspec.structs.replace(
        base, scan=ScanConfig(mode="events", events=base.scan.events),
        algo=msgspec.structs.replace(base.algo, adaptive=way.adaptive, timeout_s=params.timeout_s,
                                     latency_budget_ms=params.budget_ms if way.adaptive else None),
        worker=msgspec.structs.replace(base.worker, count=way.processes, threads=way.threads),
        run=msgspec.structs.replace(base.run, state_dir=state, until_idle=False))


def run_way(base: Config, way: Way, params: Params, progress: Callable[[str], None]) -> tuple[list[PhaseRow], list[Sample]]:
    """One way through every phase; its rows, and (adaptive) the limit over time."""
    state = tempfile.mkdtemp(prefix="adaptive-state-")
    cfg = _way_config(base, way, params, state)
    shape(cfg, PHASES[0][0], PHASES[0][1])
    results: list[Result] = []
    samples: list[Sample] = []
    failures: list[int] = []
    sup = Supervisor(cfg, show_progress=False, on_result=results.append)
    try:
        sup.start()
        sup.step_until(lambda: len(results) > 0, timeout_s=120)
        sup.step_until(lambda: False, timeout_s=params.warmup_s)  # the adaptive way's first probe and growth
        t0 = time.time()
        for index, (slots, ms) in enumerate(PHASES):
            shape(cfg, slots, ms)
            failures.append(_failed_calls(sup))
            end = t0 + (index + 1) * params.phase_s

            def over() -> bool:
                now = time.time()
                if way.adaptive:  # the limit's changes (the trace is a step function)
                    limit = next(iter(sup.endpoints.limit_figures().values())).limit
                    if not samples or limit != samples[-1].limit or now >= end:
                        samples.append(Sample(round(now - t0, 3), limit))
                return now >= end

            sup.step_until(over)
        failures.append(_failed_calls(sup))
    finally:
        sup.request_stop("adaptive benchmark: measured", force=True)
        sup.shutdown()
        shutil.rmtree(state, ignore_errors=True)
    rows = [_row(index, way, results, samples, t0, params, failures[index + 1] - failures[index])
            for index in range(len(PHASES))]
    for r in rows:
        progress(f"{way.name:>9} phase {r.phase + 1} ({r.slots} slots, {r.service_ms:g} ms): {r.throughput_per_s:6.1f}/s "
                 f"p50 {r.p50_ms:6.0f} p95 {r.p95_ms:6.0f} (settled {r.p95_settled_ms:6.0f}) ms, "
                 f"failed calls {r.failed_calls}"
                 + (f", mean limit {r.mean_limit:.1f}" if way.adaptive else ""))
    return rows, samples


def _failed_calls(sup: Supervisor) -> int:
    return sum(f["failures"] for f in sup.endpoints.figures().values())


def _row(index: int, way: Way, results: Sequence[Result], samples: Sequence[Sample], t0: float, params: Params,
         failed: int) -> PhaseRow:
    start, end = t0 + index * params.phase_s, t0 + (index + 1) * params.phase_s
    mine = [r for r in results if start <= r.finished_at < end and r.outcome.is_success]
    ms = [r.algo_ms for r in mine if r.algo_ms is not None] or [0.0]
    settled = [r.algo_ms for r in mine if r.algo_ms is not None and r.finished_at >= start + SETTLE_S] or [0.0]
    limits = _time_weighted(samples, index * params.phase_s, (index + 1) * params.phase_s)
    slots, service_ms = PHASES[index]
    return PhaseRow(phase=index, slots=slots, service_ms=service_ms, way=way.name,
                    throughput_per_s=round(len(mine) / params.phase_s, 2), p50_ms=round(float(np.percentile(ms, 50)), 1),
                    p95_ms=round(float(np.percentile(ms, 95)), 1),
                    p95_settled_ms=round(float(np.percentile(settled, 95)), 1), failed_calls=failed,
                    mean_limit=round(limits, 1))


def _time_weighted(samples: Sequence[Sample], start: float, end: float) -> float:
    """The time-weighted mean of a step function given by its changes, over [start, end) (0: no samples)."""
    area = 0.0
    for n, s in enumerate(samples):
        until = samples[n + 1].t if n + 1 < len(samples) else end
        area += s.limit * max(0.0, min(until, end) - max(s.t, start))
    return area / (end - start) if samples else 0.0


def mark_best(rows: list[PhaseRow]) -> list[PhaseRow]:
    """Mark, per phase, the fixed N of the highest throughput (within 2 %: the lower p95)."""
    out = list(rows)
    for index in range(len(PHASES)):
        fixed = [r for r in rows if r.phase == index and r.way != "adaptive"]
        top = max(r.throughput_per_s for r in fixed)
        best = min((r for r in fixed if r.throughput_per_s >= 0.98 * top), key=lambda r: r.p95_ms)
        out = [msgspec.structs.replace(r, best_fixed=True) if r is best else r for r in out]
    return out


def markdown(rows: Sequence[PhaseRow], params: Params) -> str:
    lines = [f"Phases of {params.phase_s:g} s; adaptive: ceiling 64 (8 processes x 8 lanes), p95 budget "
             f"{params.budget_ms:g} ms; call timeout {params.timeout_s:g} s; service jitter sigma {params.sigma:g}.",
             f"`p95 settled` leaves out the calls that ended in the first {SETTLE_S:g} s of a phase.",
             "", "| phase | way | img/s | p50 ms | p95 ms | p95 settled ms | failed calls | mean limit |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        way = f"**{r.way}** (best fixed)" if r.best_fixed else r.way
        limit = f"{r.mean_limit:.1f}" if r.way == "adaptive" else ""
        lines.append(f"| {r.phase + 1}: {r.slots} slots, {r.service_ms:g} ms | {way} | {r.throughput_per_s:.1f} | "
                     f"{r.p50_ms:.0f} | {r.p95_ms:.0f} | {r.p95_settled_ms:.0f} | {r.failed_calls} | {limit} |")
    lines += ["", "| phase | adaptive / best fixed N, throughput | adaptive p95 within the budget: whole phase, settled |",
              "|---|---|---|"]
    for index, (slots, ms) in enumerate(PHASES):
        adaptive = next(r for r in rows if r.phase == index and r.way == "adaptive")
        best = next(r for r in rows if r.phase == index and r.best_fixed)
        ratio = adaptive.throughput_per_s / best.throughput_per_s if best.throughput_per_s else 0.0
        within = [f"{'yes' if p95 <= params.budget_ms else 'no'} ({p95:.0f} ms)"
                  for p95 in (adaptive.p95_ms, adaptive.p95_settled_ms)]
        lines.append(f"| {index + 1}: {slots} slots, {ms:g} ms | {ratio:.2f} ({best.way}) | {', '.join(within)} |")
    return "\n".join(lines)


def plot(rows: Sequence[PhaseRow], samples: Sequence[Sample], params: Params, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (thr, p95, lim) = plt.subplots(1, 3, figsize=(14, 4.2))
    names = [w.name for w in WAYS]
    width = 0.8 / len(names)
    for n, name in enumerate(names):
        mine = sorted((r for r in rows if r.way == name), key=lambda r: r.phase)
        xs = [r.phase + n * width for r in mine]
        thr.bar(xs, [r.throughput_per_s for r in mine], width, label=name)
        p95.bar(xs, [r.p95_ms for r in mine], width, label=name)
    ticks = [i + 0.4 - width / 2 for i in range(len(PHASES))]
    for ax, label in ((thr, "answered images / s"), (p95, "p95 algorithm call, ms")):
        ax.set_xticks(ticks, [f"{s} slots\n{ms:g} ms" for s, ms in PHASES])
        ax.set_ylabel(label)
    p95.axhline(params.budget_ms, color="k", ls="--", lw=1, label="budget")
    p95.set_yscale("log")
    thr.legend(fontsize=8)
    lim.plot([s.t for s in samples], [s.limit for s in samples], drawstyle="steps-post", label="adaptive limit")
    knee_t = [t for i in range(len(PHASES)) for t in (i * params.phase_s, (i + 1) * params.phase_s)]
    lim.plot(knee_t, [PHASES[i][0] for i in range(len(PHASES)) for _ in (0, 1)], "k--", lw=1, label="slots")
    lim.set_xlabel("seconds")
    lim.set_ylabel("calls in flight allowed")
    lim.legend(fontsize=8)
    fig.suptitle("adaptive concurrency against a service of 8 -> 24 -> 6 slots, then a 2x slowdown")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure(params: Params, progress: Callable[[str], None] = print) -> tuple[list[PhaseRow], list[Sample]]:
    rows: list[PhaseRow] = []
    samples: list[Sample] = []
    with embedded(latency_ms=PHASES[0][1], sigma=params.sigma, bucket="adaptive") as cfg:
        prefill(Store(cfg.store, cfg.credentials, pool_size=16), "a/", params.images)
        base = msgspec.structs.replace(cfg, store=msgspec.structs.replace(cfg.store, prefix="a/"))
        for way in WAYS:
            mine, trace = run_way(base, way, params, progress)
            rows += mine
            samples = trace or samples
    return mark_best(rows), samples


def run_face_way(base: Config, way: Way, params: Params, progress: Callable[[str], None]) -> FaceRound:
    """One way against the face detector: a warm-up, then ``params.round_s`` measured."""
    state = tempfile.mkdtemp(prefix="adaptive-state-")
    results: list[Result] = []
    samples: list[Sample] = []
    sup = Supervisor(_way_config(base, way, params, state), show_progress=False, on_result=results.append)
    try:
        sup.start()
        sup.step_until(lambda: len(results) > 0, timeout_s=120)
        sup.step_until(lambda: False, timeout_s=params.warmup_s)
        failed = _failed_calls(sup)
        t0 = time.time()
        end = t0 + params.round_s

        def over() -> bool:
            now = time.time()
            limit = next(iter(sup.endpoints.limit_figures().values())).limit
            if not samples or limit != samples[-1].limit or now >= end:
                samples.append(Sample(round(now - t0, 3), limit))
            return now >= end

        sup.step_until(over)
        failed = _failed_calls(sup) - failed
    finally:
        sup.request_stop("adaptive benchmark: measured", force=True)
        sup.shutdown()
        shutil.rmtree(state, ignore_errors=True)
    mine = [r for r in results if t0 <= r.finished_at < end and r.outcome.is_success]
    got = FaceRound(way=way.name, answered=len(mine), ms=tuple(r.algo_ms for r in mine if r.algo_ms is not None),
                    failed_calls=failed, faces=sum(r.detections for r in mine),
                    mean_limit=round(_time_weighted(samples, 0.0, params.round_s), 1),
                    samples=tuple(samples) if way.adaptive else ())
    progress(f"{way.name:>9} face: {got.answered / params.round_s:6.1f}/s, failed calls {got.failed_calls}, "
             f"mean limit {got.mean_limit:.1f}")
    return got


def face_totals(rounds: Sequence[FaceRound], params: Params) -> list[FaceRow]:
    """Each way's totals over its rounds (``rounds`` in the order they ran), the best fixed N marked."""
    rows: list[FaceRow] = []
    for way in FACE_WAYS:
        mine = [r for r in rounds if r.way == way.name]
        ms = [m for r in mine for m in r.ms] or [0.0]
        seconds = params.round_s * len(mine)
        rows.append(FaceRow(way=way.name, throughput_per_s=round(sum(r.answered for r in mine) / seconds, 2),
                            p50_ms=round(float(np.percentile(ms, 50)), 1), p95_ms=round(float(np.percentile(ms, 95)), 1),
                            failed_calls=sum(r.failed_calls for r in mine), faces=sum(r.faces for r in mine),
                            mean_limit=round(sum(r.mean_limit for r in mine) / len(mine), 1),
                            round_throughputs=tuple(round(r.answered / params.round_s, 2) for r in mine)))
    fixed = [r for r in rows if r.way != "adaptive"]
    top = max(r.throughput_per_s for r in fixed)
    best = min((r for r in fixed if r.throughput_per_s >= 0.98 * top), key=lambda r: r.p95_ms)
    return [msgspec.structs.replace(r, best_fixed=True) if r is best else r for r in rows]


def face_prefill(store: Store, prefix: str, count: int) -> None:
    """Upload ``count`` images, the photos scikit-image ships (some with faces) in turn, in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    from imgworker.services.loadgen import photo_frames

    photos = photo_frames()
    keys = [f"{prefix}face/cam-{i % 16:02d}/20240101-{i // 1000:06d}.{i % 1000:03d}.jpg" for i in range(count)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda ik: store.put(ik[1], photos[ik[0] % len(photos)]), enumerate(keys)))


def measure_face(params: Params, progress: Callable[[str], None] = print) -> tuple[list[FaceRow], list[Sample]]:
    """The ways in ``params.rounds`` rounds, the order rotated each round; the adaptive limit over its rounds."""
    rounds: list[FaceRound] = []
    with embedded(bucket="adaptive-face", backend="face") as cfg:
        face_prefill(Store(cfg.store, cfg.credentials, pool_size=16), "f/", params.images)
        base = msgspec.structs.replace(cfg, store=msgspec.structs.replace(cfg.store, prefix="f/"))
        for n in range(params.rounds):
            order = FACE_WAYS[n % len(FACE_WAYS):] + FACE_WAYS[:n % len(FACE_WAYS)]
            progress(f"round {n + 1}: {', '.join(w.name for w in order)}")
            rounds += [run_face_way(base, way, params, progress) for way in order]
    adaptive = [r for r in rounds if r.way == "adaptive"]
    trace = [Sample(round(n * params.round_s + s.t, 3), s.limit) for n, r in enumerate(adaptive) for s in r.samples]
    return face_totals(rounds, params), trace


def face_markdown(rows: Sequence[FaceRow], params: Params) -> str:
    adaptive = next(r for r in rows if r.way == "adaptive")
    best = next(r for r in rows if r.best_fixed)
    lines = [f"The real face detector (LBP cascade, scikit-image's photos) on this machine's CPU; the ways interleaved in "
             f"{params.rounds} rounds of {params.round_s:g} s each (after a {params.warmup_s:g} s warm-up, the order "
             f"rotated every round); adaptive: ceiling 64 (8 processes x 8 lanes), p95 budget {params.budget_ms:g} ms; "
             f"call timeout {params.timeout_s:g} s. Figures are totals over the rounds; `img/s by round` is the spread.",
             "", "| way | img/s | img/s by round (min-max) | p50 ms | p95 ms | failed calls | faces found | mean limit |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        way = f"**{r.way}** (best fixed)" if r.best_fixed else r.way
        limit = f"{r.mean_limit:.1f}" if r.way == "adaptive" else ""
        spread = f"{' / '.join(f'{t:.1f}' for t in r.round_throughputs)} ({min(r.round_throughputs, default=0):.1f}-" \
                 f"{max(r.round_throughputs, default=0):.1f})"
        lines.append(f"| {way} | {r.throughput_per_s:.1f} | {spread} | {r.p50_ms:.0f} | {r.p95_ms:.0f} | "
                     f"{r.failed_calls} | {r.faces} | {limit} |")
    ratio = adaptive.throughput_per_s / best.throughput_per_s if best.throughput_per_s else 0.0
    lines += ["", f"Adaptive / best fixed N ({best.way}), throughput: {ratio:.2f}; adaptive p95 within the budget: "
              f"{'yes' if adaptive.p95_ms <= params.budget_ms else 'no'} ({adaptive.p95_ms:.0f} ms)."]
    return "\n".join(lines)


def face_plot(rows: Sequence[FaceRow], samples: Sequence[Sample], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (thr, p95, lim) = plt.subplots(1, 3, figsize=(14, 4.2))
    names = [r.way for r in rows]
    thr.bar(names, [r.throughput_per_s for r in rows])
    thr.set_ylabel("answered images / s")
    p95.bar(names, [r.p95_ms for r in rows])
    p95.set_ylabel("p95 algorithm call, ms")
    p95.set_yscale("log")
    for ax in (thr, p95):
        ax.tick_params(axis="x", labelrotation=30)
    lim.plot([s.t for s in samples], [s.limit for s in samples], drawstyle="steps-post", label="adaptive limit")
    lim.set_xlabel("measured seconds (its rounds back to back)")
    lim.set_ylabel("calls in flight allowed")
    lim.legend(fontsize=8)
    fig.suptitle("adaptive concurrency against the real face detector (knee set by CPU), ways interleaved")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Params()
    parser.add_argument("--phase-s", type=float, default=defaults.phase_s)
    parser.add_argument("--budget-ms", type=float, default=defaults.budget_ms)
    parser.add_argument("--timeout-s", type=float, default=defaults.timeout_s)
    parser.add_argument("--images", type=int, default=defaults.images)
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help="face: rounds of every way, interleaved")
    parser.add_argument("--round-s", type=float, default=defaults.round_s, help="face: seconds a way is measured a round")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--name", default="", help="results file name (default: adaptive, adaptive-face)")
    parser.add_argument("--backend", choices=["synthetic", "face"], default="synthetic",
                        help="the service of changing slots (default), or the real face detector")
    args = parser.parse_args(argv)
    params = Params(phase_s=args.phase_s, budget_ms=args.budget_ms, timeout_s=args.timeout_s, images=args.images,
                    rounds=args.rounds, round_s=args.round_s)
    os.makedirs(args.out, exist_ok=True)
    if args.backend == "face":
        name = args.name or "adaptive-face"
        face_rows, trace = measure_face(params)
        table = face_markdown(face_rows, params)
        with open(os.path.join(args.out, f"{name}.json"), "wb") as f:
            payload = {"params": params, "rows": face_rows, "limit_trace": trace}
            f.write(msgspec.json.format(msgspec.json.encode(payload)) + b"\n")
        with open(os.path.join(args.out, f"{name}.md"), "w", encoding="utf-8") as f:
            f.write(table + "\n")
        face_plot(face_rows, trace, os.path.join(args.out, f"{name}.png"))
        print(table)
        return 0
    args.name = args.name or "adaptive"
    rows, samples = measure(params)
    table = markdown(rows, params)
    with open(os.path.join(args.out, f"{args.name}.json"), "wb") as f:
        payload = {"params": params, "phases": PHASES, "rows": rows, "limit_trace": samples}
        f.write(msgspec.json.format(msgspec.json.encode(payload)) + b"\n")
    with open(os.path.join(args.out, f"{args.name}.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    plot(rows, samples, params, os.path.join(args.out, f"{args.name}.png"))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
