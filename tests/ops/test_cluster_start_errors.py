"""Cluster mode whose NATS server is not there at start: the host waits, saying why, and a stop ends it.

An operator who mistypes ``cluster.url``, or starts the hosts before nats-server, sees a WARNING
that names the client's own error (``Connect call failed``, not a bare ``TimeoutError``) and never
the URL's password; SIGTERM then ends the wait with exit code 130 and no traceback. No image
reaches the algorithm service.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from imgworker.errors import ExitCode
from imgworker.services.netutil import free_port
from tests.support.cli import cli_env
from tests.support.results import calls_under
from tests.support.store import upload


def start_env(store_server, creds, algo_server, prefix, url: str) -> dict[str, str]:
    return cli_env(store_server, creds, IMGWORKER_STORE_PREFIX=prefix, IMGWORKER_ALGO_ENDPOINT=algo_server.endpoint,
                   IMGWORKER_CLUSTER_URL=url, IMGWORKER_CLUSTER_HOST="h1", IMGWORKER_WORKER_COUNT="1")


def wait_then_stop(env: dict[str, str], state_dir: str, seen: str, log_path: str) -> tuple[int, str]:
    """Start a host, wait until its log says ``seen``, SIGTERM it; its exit code and log."""
    with open(log_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "imgworker", "run", "--state-dir", state_dir, "--no-progress"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while seen not in open(log_path).read() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, open(log_path).read()


@pytest.mark.timeout(150)
def test_nothing_listening_at_start_is_waited_for_naming_why_and_a_stop_ends_it(tmp_path, store_server, creds,
                                                                                algo_server, store, prefix):
    upload(store, [f"{prefix}person/cam0/20260101-120000.000.jpg"])
    port = free_port()
    env = start_env(store_server, creds, algo_server, prefix, f"nats://imgworker:s3cret-pw@127.0.0.1:{port}")
    code, log = wait_then_stop(env, str(tmp_path / "state"), "does not answer yet (", str(tmp_path / "host.log"))
    assert "does not answer yet ([Errno 111] Connect call failed" in log, log[-3000:]
    assert code == ExitCode.INTERRUPTED, log[-3000:]
    assert "Traceback" not in log and "s3cret-pw" not in log, log[-3000:]
    assert calls_under(algo_server, prefix) == {}
