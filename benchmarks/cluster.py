"""What JetStream costs per image: one host on local pipes, one host through JetStream, two hosts through it.

    python -m benchmarks.cluster [--images 400] [--lanes 16] [--latency-ms 200]

The same number of images (each way under its own prefix, uploaded before the run) through:

- ``local``: one ``imgworker run --until-idle`` with N lanes, no NATS;
- ``jetstream-1``: one host with N lanes in cluster mode (intake leader and consumer alike);
- ``jetstream-2``: two hosts with N/2 lanes each, sharing one nats-server.

All on this one machine, side by side in one run, with the embedded store and the synthetic
service (fixed latency L). CPU is each host's process tree (``wait4``: the supervisor and every
child it reaped) and nats-server's own, per 1,000 images. Efficiency = images/s over N / L, from
the first outcome to the last (start-up excluded). Added latency = mean end to end (dispatch to
outcome) over the mean algorithm call, and the mean time from upload to dispatch (discovery, which
now includes the publish, the stream and the fetch). Writes results/cluster.json and cluster.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil

from imgworker.cluster.jetstream import ClusterUnavailable, read_cluster
from imgworker.config import ClusterConfig, Config
from imgworker.results import read_results
from imgworker.services.nats_server import NatsServer
from imgworker.store import Store

from ._common import embedded, write_results


def _env(cfg: Config, prefix: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGWORKER_")}
    env.update(IMGWORKER_ACCESS_KEY=cfg.credentials.access_key, IMGWORKER_SECRET_KEY=cfg.credentials.secret_key,
               IMGWORKER_STORE_ENDPOINT=cfg.store.endpoint, IMGWORKER_STORE_BUCKET=cfg.store.bucket,
               IMGWORKER_STORE_PREFIX=prefix, IMGWORKER_ALGO_ENDPOINT=cfg.algo.endpoint,
               IMGWORKER_SCAN_INTERVAL_S="0.2", IMGWORKER_WORKER_STAT_CHECK="true")
    env.update(extra)
    return env


def _start(env: dict[str, str], state_dir: str, lanes: int, *extra: str) -> subprocess.Popen[bytes]:
    processes = max(1, lanes // 8)
    return subprocess.Popen([sys.executable, "-m", "imgworker", "--log-level", "WARNING", "run", "--state-dir",
                             state_dir, "--workers", str(processes), "--threads", str(lanes // processes),
                             "--no-progress", *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _reap(proc: subprocess.Popen[bytes]) -> float:
    """Wait for a host; its process tree's CPU seconds."""
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return usage.ru_utime + usage.ru_stime


def _figures(name: str, lanes: int, latency_ms: float, images: int, state_dirs: list[str], cpu_hosts: float,
             cpu_nats: float) -> dict[str, Any]:
    results = [r for d in state_dirs for r in read_results(os.path.join(d, "results.jsonl"))]
    first = min(r.started_at for r in results if r.started_at)
    last = max(r.finished_at for r in results)
    rate = len(results) / (last - first) if last > first else 0.0
    algo = [r.algo_ms for r in results if r.algo_ms]
    e2e = [r.e2e_ms for r in results if r.e2e_ms]
    return {"way": name, "lanes": lanes, "hosts": len(state_dirs), "images": images, "outcomes": len(results),
            "images_per_s": round(rate, 2), "efficiency": round(rate / (lanes / (latency_ms / 1000.0)), 3),
            "cpu_s_per_1000_hosts": round(1000 * cpu_hosts / images, 2),
            "cpu_s_per_1000_nats": round(1000 * cpu_nats / images, 2),
            "mean_algo_ms": round(statistics.fmean(algo), 1) if algo else 0.0,
            "mean_e2e_ms": round(statistics.fmean(e2e), 1) if e2e else 0.0}


def _upload(store: Store, prefix: str, n: int) -> None:
    for i in range(n):
        store.put(f"{prefix}person/cam{i % 4}/{i:05d}.jpg", b"\xff\xd8\xff\xe0bench-image")


def run_local(cfg: Config, work: str, n: int, lanes: int, latency_ms: float) -> dict[str, Any]:
    prefix = "local/"
    _upload(Store(cfg.store, cfg.credentials), prefix, n)
    state = os.path.join(work, "local")
    cpu = _reap(_start(_env(cfg, prefix), state, lanes, "--until-idle"))
    return _figures("local", lanes, latency_ms, n, [state], cpu, 0.0)


def run_cluster(cfg: Config, work: str, n: int, lanes: int, hosts: int, latency_ms: float) -> dict[str, Any]:
    name = f"jetstream-{hosts}"
    prefix = f"{name}/"
    with NatsServer(os.path.join(work, name, "nats")) as nats:
        assert nats.proc is not None
        nats_cpu = psutil.Process(nats.proc.pid)
        cpu0 = sum(nats_cpu.cpu_times()[:2])
        env = _env(cfg, prefix, IMGWORKER_CLUSTER_URL=nats.url, IMGWORKER_CLUSTER_ACK_WAIT_S="30")
        states = [os.path.join(work, name, f"h{i}") for i in range(hosts)]
        procs = [_start({**env, "IMGWORKER_CLUSTER_HOST": f"h{i}"}, s, lanes // hosts) for i, s in enumerate(states)]
        time.sleep(3.0)  # the hosts are up (the local way's start-up is not measured either)
        _upload(Store(cfg.store, cfg.credentials), prefix, n)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if len(read_cluster(ClusterConfig(url=nats.url))[0]) >= n:
                    break
            except ClusterUnavailable:
                pass
            time.sleep(0.5)
        cpu_nats = sum(nats_cpu.cpu_times()[:2]) - cpu0
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        cpu_hosts = sum(_reap(p) for p in procs)
    return _figures(name, lanes, latency_ms, n, states, cpu_hosts, cpu_nats)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| way | hosts x lanes | images/s | efficiency | CPU-s / 1,000 (hosts) | CPU-s / 1,000 (nats-server) "
            "| mean algo ms | mean e2e ms |\n|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['way']} | {r['hosts']} x {r['lanes'] // r['hosts']} | {r['images_per_s']} | {r['efficiency']} "
             f"| {r['cpu_s_per_1000_hosts']} | {r['cpu_s_per_1000_nats']} | {r['mean_algo_ms']} "
             f"| {r['mean_e2e_ms']} |" for r in rows]
    return "\n".join([head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--lanes", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    args = parser.parse_args()
    rows = []
    with embedded(latency_ms=args.latency_ms) as cfg, tempfile.TemporaryDirectory(prefix="imgworker-cluster-") as work:
        rows.append(run_local(cfg, work, args.images, args.lanes, args.latency_ms))
        rows.append(run_cluster(cfg, work, args.images, args.lanes, 1, args.latency_ms))
        rows.append(run_cluster(cfg, work, args.images, args.lanes, 2, args.latency_ms))
    text = table(rows)
    print(text)
    write_results("cluster", {"latency_ms": args.latency_ms, "rows": rows}, text)


if __name__ == "__main__":
    main()
