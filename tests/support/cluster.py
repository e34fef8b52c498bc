"""Cluster mode's test parts: a real nats-server with JetStream, hosts as ``imgworker run`` processes, the ledger.

Each host is a separate supervisor process with its own state directory; counting happens at the
far end: the ledger bucket (read on a connection of its own) and the algorithm service's calls.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Callable

import msgspec
import psutil

from imgworker.cluster.host import LedgerEntry
from imgworker.cluster.jetstream import ClusterUnavailable, read_cluster
from imgworker.config import ClusterConfig
from imgworker.services.netutil import free_port, port_open, stop_process, wait_until


def nats_server_binary() -> str:
    candidate = os.path.join(sysconfig.get_path("scripts"), "nats-server")
    return candidate if os.access(candidate, os.X_OK) else shutil.which("nats-server") or "nats-server"


class NatsServer:
    """A real nats-server with JetStream on 127.0.0.1; ``restart()`` keeps its port and stored streams."""

    def __init__(self, data_dir: str, *, port: int = 0, extra: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        conf = os.path.join(self.data_dir, "nats.conf")
        with open(conf, "w") as f:  # as the README asks of a production server: the ledger survives a power loss
            f.write("jetstream {\n  sync_interval: always\n}\n")
        with open(os.path.join(self.data_dir, "nats.log"), "ab") as out:
            self.proc = subprocess.Popen([nats_server_binary(), "-c", conf, "-js", "-a", "127.0.0.1", "-p",
                                          str(self.port),
                                          "-sd", os.path.join(self.data_dir, "jetstream"), *self.extra],
                                         stdout=out, stderr=subprocess.STDOUT)
        proc = self.proc
        wait_until(lambda: port_open("127.0.0.1", self.port), timeout_s=30, what="nats-server",
                   alive=lambda: proc.poll() is None)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


class Host:
    """One host: ``imgworker run`` in cluster mode, in its own process group, with its own state directory."""

    def __init__(self, name: str, env: dict[str, str], state_dir: str, *, workers: int = 2,
                 args: tuple[str, ...] = ()) -> None:
        self.name = name
        self.state_dir = state_dir
        self.log_path = os.path.join(state_dir + "-log.txt")
        env = {**env, "IMGWORKER_CLUSTER_HOST": name}
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "imgworker", "run", "--state-dir", state_dir, "--workers", str(workers),
                 "--no-progress", *args], env=env, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole host: supervisor and workers."""
        procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        self.signal_group(signal.SIGKILL)
        self.proc.wait()
        psutil.wait_procs(procs, timeout=10)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM to the supervisor; wait; SIGKILL the group if it does not end."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            self.proc.wait()
            raise

    def reap(self) -> None:
        """Whatever happened, nothing of this host is left running."""
        if self.proc.poll() is None:
            try:
                self.signal_group(signal.SIGCONT)
                self.signal_group(signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        else:
            try:  # its workers, should any outlive it
                self.signal_group(signal.SIGKILL)
            except ProcessLookupError:
                pass


def cluster_env(base: dict[str, str], url: str, *, ack_wait_s: float = 2.0, lease_ttl_s: int = 2,
                **extra: str) -> dict[str, str]:
    env = {**base, "IMGWORKER_CLUSTER_URL": url, "IMGWORKER_CLUSTER_ACK_WAIT_S": str(ack_wait_s),
           "IMGWORKER_CLUSTER_LEASE_TTL_S": str(lease_ttl_s), "IMGWORKER_SCAN_INTERVAL_S": "0.3",
           "IMGWORKER_RUN_CHECKPOINT_INTERVAL_S": "1", "IMGWORKER_RUN_GRACE_S": "20",
           "IMGWORKER_ALGO_TIMEOUT_S": "10", "IMGWORKER_ALGO_BACKOFF_BASE_S": "0.01"}
    env.update(extra)
    return env


def ledger(url: str, cfg: ClusterConfig | None = None) -> list[LedgerEntry]:
    """Every outcome in the cluster ledger (empty while the ledger does not exist yet)."""
    cfg = cfg or ClusterConfig(url=url)
    try:
        values, _ = read_cluster(cfg)
    except ClusterUnavailable:
        return []
    return [msgspec.json.decode(v, type=LedgerEntry) for v in values]


def wait_for_ledger(url: str, n: int, *, hosts: list[Host], timeout: float = 90,
                    also: Callable[[], None] = lambda: None) -> list[LedgerEntry]:
    """Wait until the ledger holds ``n`` outcomes; fail if every host ended first."""
    deadline = time.monotonic() + timeout
    entries: list[LedgerEntry] = []
    while time.monotonic() < deadline:
        entries = ledger(url)
        if len(entries) >= n:
            return entries
        assert any(h.proc.poll() is None for h in hosts), "every host ended before the work was done"
        also()
        time.sleep(0.2)
    raise AssertionError(f"{len(entries)} of {n} outcomes in the ledger after {timeout} s")


def per_key(entries: list[LedgerEntry]) -> Counter[str]:
    return Counter(e.key for e in entries)


def jetstream_cluster(base_dir: str, nodes: int = 3) -> list[NatsServer]:
    """``nodes`` nats-servers on loopback forming one JetStream cluster (not started)."""
    client_ports = [free_port() for _ in range(nodes)]
    route_ports = [free_port() for _ in range(nodes)]
    routes = ",".join(f"nats://127.0.0.1:{p}" for p in route_ports)
    return [NatsServer(os.path.join(base_dir, f"n{i}"), port=client_ports[i],
                       extra=("-n", f"n{i}", "--cluster_name", "imgworker-test", "--cluster",
                              f"nats://127.0.0.1:{route_ports[i]}", "--routes", routes))
            for i in range(nodes)]


def wait_for_jetstream(url: str, timeout: float = 60) -> None:
    """Until the JetStream cluster has a meta leader and answers account requests."""
    import asyncio

    import nats

    async def ready() -> bool:
        try:
            nc = await nats.connect(url, connect_timeout=1, allow_reconnect=False, max_reconnect_attempts=1)
        except Exception:
            return False
        try:
            await nc.jetstream(timeout=1.0).account_info()
            return True
        except Exception:
            return False
        finally:
            await nc.close()

    deadline = time.monotonic() + timeout
    while not asyncio.run(ready()):
        assert time.monotonic() < deadline, "the JetStream cluster did not become ready"
        time.sleep(0.5)
