"""The existence check against the inference it saves.

    python -m benchmarks.check_vs_waste [--images 300] [--workers 8] [--latency-ms 50]

Measures StatObject latency on the embedded store, then, for several deletion probabilities
(images deleted just before dispatch), runs with the check on and off and records the
algorithm-seconds wasted on gone images, worker-seconds spent on checks and throughput.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

import msgspec

from imgworker.outcomes import Outcome
from imgworker.results import read_results
from imgworker.stats import LogHistogram
from imgworker.store import Store
from imgworker.supervisor import Supervisor
from imgworker.tune import prefill

from ._common import RESULTS, embedded, write_results

PROBABILITIES = (0.0, 0.005, 0.01, 0.024, 0.05, 0.10)


class Case(msgspec.Struct, frozen=True, kw_only=True):
    deletion_p: float
    check: bool
    images: int
    deleted: int
    throughput_per_s: float
    wasted_algo_s: float
    wasted_worker_s: float
    check_worker_s: float
    skipped_missing: int
    failed_missing: int
    inferences: int


def break_even(check_ms_per_image: float, waste_ms_per_gone_image: float) -> float:
    """Deletion probability above which checking every image costs less than the waste it avoids."""
    if waste_ms_per_gone_image <= 0:
        return 1.0
    return min(1.0, check_ms_per_image / waste_ms_per_gone_image)


def stat_latency(store: Store, key: str, count: int = 2000) -> dict[str, float]:
    hist = LogHistogram()
    for _ in range(count):
        t = time.perf_counter()
        store.stat(key)
        hist.add((time.perf_counter() - t) * 1000.0)
    return {"p50_ms": round(hist.percentile(50), 3), "p99_ms": round(hist.percentile(99), 3),
            "mean_ms": round(hist.mean, 3)}


def run_case(cfg, *, p: float, check: bool, images: int, workers: int, seed: int) -> Case:
    prefix = f"cvw-{int(p * 1000)}-{int(check)}-{seed}/"
    store = Store(cfg.store, cfg.credentials, pool_size=16)
    prefill(store, prefix, images)
    state = tempfile.mkdtemp(prefix="cvw-")
    cfg = msgspec.structs.replace(
        cfg, store=msgspec.structs.replace(cfg.store, prefix=prefix),
        worker=msgspec.structs.replace(cfg.worker, count=workers, threads=1, stat_check=check),
        run=msgspec.structs.replace(cfg.run, state_dir=state))
    sup = Supervisor(cfg, show_progress=False)
    sup.start()
    try:
        while sup.dispatch.pending + sup.in_flight < images:
            sup.intake_step()
        queued = sup.dispatch.pending_keys()
        # the same positions are deleted with the check on and off
        doomed = [k for i, k in enumerate(queued) if random.Random(f"{seed}-{i}").random() < p]
        if doomed:
            store.delete(doomed)
        started = time.monotonic()
        sup.step_until(sup.finished)
        wall = time.monotonic() - started
    finally:
        sup.shutdown()
    results = list(read_results(cfg.results_path))
    gone = [r for r in results if r.outcome is Outcome.FAILED_MISSING]
    return Case(
        deletion_p=p, check=check, images=images, deleted=len(doomed),
        throughput_per_s=round(len(results) / wall, 2) if wall else 0.0,
        wasted_algo_s=round(sum(r.algo_ms or 0 for r in gone) / 1000, 4),
        wasted_worker_s=round(sum(r.e2e_ms or 0 for r in gone) / 1000, 4),
        check_worker_s=round(sum(r.stat_ms or 0 for r in results) / 1000, 4),
        skipped_missing=sum(r.outcome is Outcome.SKIPPED_MISSING for r in results),
        failed_missing=len(gone), inferences=sum(r.outcome.is_success for r in results),
    )


def summarize(cases: list[Case], stat: dict[str, float], latency_ms: float) -> dict[str, float]:
    """Break-even from measured costs, and for a service that spends full latency on a gone image."""
    gone = [c for c in cases if not c.check and c.failed_missing]
    waste_ms = (sum(c.wasted_worker_s for c in gone) / sum(c.failed_missing for c in gone) * 1000) if gone else 0.0
    checked = [c for c in cases if c.check]
    check_ms = (sum(c.check_worker_s for c in checked) / sum(c.images - c.deleted + c.skipped_missing
                                                             for c in checked) * 1000) if checked else stat["mean_ms"]
    return {"check_ms_per_image": round(check_ms, 3), "waste_ms_per_gone_image": round(waste_ms, 3),
            "break_even_p": round(break_even(check_ms, waste_ms), 5),
            "break_even_p_if_gone_costs_full_latency": round(break_even(check_ms, latency_ms), 5)}


def table(cases: list[Case], stat: dict[str, float], summary: dict[str, float], args: argparse.Namespace) -> str:
    lines = ["| deletion p | check | deleted | skipped_missing | failed_missing | wasted algo s | wasted worker s "
             "| check worker s | throughput/s |", "|" + "---|" * 9]
    for c in cases:
        lines.append(f"| {c.deletion_p:.1%} | {'on' if c.check else 'off'} | {c.deleted} | {c.skipped_missing} "
                     f"| {c.failed_missing} | {c.wasted_algo_s:.3f} | {c.wasted_worker_s:.3f} | {c.check_worker_s:.3f} "
                     f"| {c.throughput_per_s:.1f} |")
    lines += ["", f"StatObject on the embedded store: p50 {stat['p50_ms']:.2f} ms, p99 {stat['p99_ms']:.2f} ms.",
              f"Check cost {summary['check_ms_per_image']:.2f} ms per image; a gone image costs a worker "
              f"{summary['waste_ms_per_gone_image']:.2f} ms without the check (the service answers 404 after its "
              f"fetch). Break-even deletion probability: {summary['break_even_p']:.2%}; if the service spent its full "
              f"latency ({args.latency_ms:g} ms) on a gone image: {summary['break_even_p_if_gone_costs_full_latency']:.2%}.",
              f"{args.images} images per case, {args.workers} workers, algorithm latency {args.latency_ms:g} ms."]
    return "\n".join(lines)


def plot(cases: list[Case], summary: dict[str, float], path: str, latency_ms: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for check, style in ((False, "o-"), (True, "s-")):
        rows = [c for c in cases if c.check is check]
        ax.plot([c.deletion_p * 100 for c in rows],
                [(c.wasted_worker_s + c.check_worker_s) / c.images * 1000 for c in rows], style,
                label=f"check {'on' if check else 'off'}: worker ms per image on checks and gone images")
    ps = sorted({c.deletion_p for c in cases})
    ax.plot([p * 100 for p in ps], [p * latency_ms for p in ps], ":", color="tab:red",
            label=f"check off, if a gone image cost the full {latency_ms:g} ms")
    ax.axvline(summary["break_even_p"] * 100, color="grey", ls="--", label="break-even (measured)")
    ax.axvline(summary["break_even_p_if_gone_costs_full_latency"] * 100, color="tab:red", ls="--", alpha=0.5,
               label="break-even (full latency wasted)")
    ax.set_xlabel("images deleted while queued (%)")
    ax.set_ylabel("worker ms per image")
    ax.legend(fontsize=7)
    ax.set_title("existence check: cost against waste")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--probabilities", default=",".join(str(p) for p in PROBABILITIES))
    parser.add_argument("--name", default="check_vs_waste")
    args = parser.parse_args(argv)
    probabilities = [float(p) for p in args.probabilities.split(",")]
    with embedded(latency_ms=args.latency_ms) as cfg:
        store = Store(cfg.store, cfg.credentials)
        store.put("stat-probe.jpg", b"x" * 1000)
        stat = stat_latency(store, "stat-probe.jpg")
        cases = [run_case(cfg, p=p, check=check, images=args.images, workers=args.workers, seed=i)
                 for i, p in enumerate(probabilities) for check in (False, True)]
    summary = summarize(cases, stat, args.latency_ms)
    text = table(cases, stat, summary, args)
    print(text)
    write_results(args.name, {"stat_latency": stat, "summary": summary, "cases": cases,
                              "params": vars(args)}, text)
    plot(cases, summary, os.path.join(RESULTS, f"{args.name}.png"), args.latency_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
