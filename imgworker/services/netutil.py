"""Small helpers for services bound to loopback."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

from ..children import die_with_parent as on_parent_death


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just reported free on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], *, timeout_s: float, what: str, alive: Callable[[], bool]) -> None:
    """Poll ``check`` until true; raise if the process dies or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"{what} exited during start-up")
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not become ready within {timeout_s:.0f} s")


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def die_with_parent() -> None:
    """For ``preexec_fn``: on Linux, the child gets SIGTERM when the process that started it dies."""
    on_parent_death(signal.SIGTERM)


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL; the child is always reaped."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
