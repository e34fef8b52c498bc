"""``imgworker`` as a child process: its environment, its start, its reaping, and its processes."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

from imgworker.config import Credentials
from imgworker.services.store_server import EmbeddedStore


def cli_env(store_server: EmbeddedStore, creds: Credentials, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGWORKER_", "AWS_"))}
    env.update(IMGWORKER_ACCESS_KEY=creds.access_key, IMGWORKER_SECRET_KEY=creds.secret_key,
               IMGWORKER_STORE_ENDPOINT=store_server.endpoint, IMGWORKER_STORE_BUCKET=store_server.bucket,
               IMGWORKER_WORKER_THREADS="1")  # one image per process unless a test gives --threads
    env.update(extra)
    return env


def start_run(env: dict[str, str], *args: str, log_path: str | None = None) -> subprocess.Popen[str]:
    """``imgworker run`` as a child process (the caller reaps it with ``reap``)."""
    out = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "imgworker", *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                            text=True)


def reap(proc: subprocess.Popen[str], timeout: float = 30) -> int:
    """Wait for a child; kill it (and its children) if it does not finish."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()
        raise


def workers_of(pid: int) -> list[psutil.Process]:
    """Worker processes of a supervisor, recognised by their process title."""
    out = []
    for child in psutil.Process(pid).children():
        try:
            if "imgworker: worker" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out


def kill_tree_leftovers(procs: list[psutil.Process]) -> list[str]:
    """SIGKILL whatever of ``procs`` is still alive; return descriptions of those found alive."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
                p.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(procs, timeout=10)
    return alive
