"""``imgworker demo --hosts N``: N supervisors sharing one loopback nats-server, then the cluster report.

Each host is ``imgworker run`` in a process of its own with its own state directory, as on real
hosts; the demo starts nats-server (JetStream, a temporary store directory), waits for the
cameras to stop and for every uploaded image to have an outcome in the ledger, stops the hosts
with SIGTERM, and prints the cluster report built from the ledger.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from ..config import ClusterConfig, Config
from ..services.nats_server import NatsServer
from ..store import Store
from .jetstream import ClusterUnavailable
from .report import cluster_report, report_json

#: How long the demo waits, once the cameras stopped, for every image to have its outcome.
_FINISH_TIMEOUT_S = 300.0


def run_demo(cfg: Config, *, hosts: int, data_dir: str, report_json_path: str | None,
             start_cameras: Callable[[], subprocess.Popen[bytes]],
             metrics: tuple[str, int] | None = None) -> tuple[str, int]:
    """Run the cluster demo; the report as text, and the exit code. ``metrics``: (address, first port), one a host."""
    from ..stats import format_report

    with NatsServer(os.path.join(data_dir, "nats")) as nats:
        cluster = ClusterConfig(url=nats.url, ack_wait_s=10.0, lease_ttl_s=3)
        ports = [metrics[1] + i if metrics else 0 for i in range(hosts)]
        procs = [_start_host(cfg, cluster.url, f"host-{i + 1}", data_dir, metrics=metrics and (metrics[0], ports[i]))
                 for i in range(hosts)]
        logs = ", ".join(os.path.join(data_dir, f"host-{i + 1}.log") for i in range(hosts))
        print(f"demo: nats-server on {nats.url}; {hosts} hosts x {cfg.worker.count} worker processes share its "
              f"work stream; the host that leads intake says so in its log ({logs}: \"this host is now the "
              "intake leader\")", flush=True)
        if metrics:
            print("demo: /metrics of each host: " + ", ".join(f"http://{metrics[0]}:{port}/metrics" for port in ports),
                  flush=True)
        try:
            cameras = start_cameras()
            try:
                cameras.wait()
            finally:
                cameras.terminate()
                cameras.wait()
            _wait_for_every_outcome(cfg, cluster, procs)
        finally:
            codes = [_stop(proc) for proc in procs]
        report, per_host, figures = cluster_report(cluster)
    text = format_report(report) + "\n\n| host | images analysed |\n|---|---|\n" + "\n".join(
        f"| {host} | {count:,} |" for host, count in sorted(per_host.items()))
    if report_json_path:
        with open(report_json_path, "wb") as f:
            f.write(report_json(report, per_host, figures) + b"\n")
    return text, 0 if report.conserved and not any(codes) else 1


def _start_host(cfg: Config, url: str, name: str, data_dir: str, *,
                metrics: tuple[str, int] | None = None) -> subprocess.Popen[bytes]:
    """``imgworker run`` as one host, with what the demo's flags chose (lanes, ``--adaptive``, ``--metrics-port``)."""
    state_dir = os.path.join(data_dir, name)
    os.makedirs(state_dir, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGWORKER_")}
    env.update(IMGWORKER_ACCESS_KEY=cfg.credentials.access_key, IMGWORKER_SECRET_KEY=cfg.credentials.secret_key,
               IMGWORKER_STORE_ENDPOINT=cfg.store.endpoint, IMGWORKER_STORE_BUCKET=cfg.store.bucket,
               IMGWORKER_ALGO_ENDPOINT=cfg.algo.endpoint, IMGWORKER_SCAN_MODE="listing",
               IMGWORKER_SCAN_INTERVAL_S="0.5", IMGWORKER_CLUSTER_URL=url, IMGWORKER_CLUSTER_HOST=name,
               IMGWORKER_CLUSTER_ACK_WAIT_S="10", IMGWORKER_CLUSTER_LEASE_TTL_S="3",
               IMGWORKER_ALGO_ADAPTIVE="true" if cfg.algo.adaptive else "false")
    serve = ["--metrics-addr", metrics[0], "--metrics-port", str(metrics[1])] if metrics else []
    log = open(os.path.join(data_dir, f"{name}.log"), "wb")  # noqa: SIM115 - the child keeps it
    with log:
        return subprocess.Popen([sys.executable, "-m", "imgworker", "run", "--state-dir", state_dir, "--workers",
                                 str(cfg.worker.count), "--threads", str(cfg.worker.threads), "--no-progress", *serve],
                                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _wait_for_every_outcome(cfg: Config, cluster: ClusterConfig, procs: list[subprocess.Popen[bytes]]) -> None:
    """Until the ledger holds as many outcomes as the bucket holds images (or the hosts all ended)."""
    from .jetstream import read_cluster

    store = Store(cfg.store, cfg.credentials)
    uploaded = sum(len(page) for page in store.list_pages("", 1000))
    deadline = time.monotonic() + _FINISH_TIMEOUT_S
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        try:
            values, _ = read_cluster(cluster)
        except ClusterUnavailable:
            values = []
        if len(values) >= uploaded:
            return
        time.sleep(0.5)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
