"""Cluster mode whose NATS server is not there: what ``run``, ``check`` and ``report --cluster`` tell the operator.

An operator who mistypes ``cluster.url``, or starts the hosts before nats-server, sees a WARNING
that names the client's own error (``Connect call failed``, not a bare ``TimeoutError``) and never
the URL's password; SIGTERM then ends the wait with exit code 130 and no traceback. No image
reaches the algorithm service. Without nats-py the CLI names the extra. ``imgworker check`` has a
line for the NATS server; ``report --cluster`` tells "no cluster there yet" from "no server".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from imgworker.errors import ExitCode
from imgworker.services.netutil import free_port
from tests.support.cli import cli_env
from tests.support.cluster import NatsServer
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


@pytest.mark.timeout(150)
def test_cluster_mode_without_nats_py_names_the_extra(tmp_path, store_server, creds, algo_server, prefix):
    """A base install (no ``nats`` extra) with a ``[cluster]`` section: what to install, exit 2, not a wait."""
    program = textwrap.dedent(f"""
        import sys

        class NotInstalled:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] == "nats":
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, NotInstalled())
        from imgworker.cli import main
        sys.exit(main(["run", "--state-dir", {str(tmp_path / "state")!r}, "--no-progress", "--until-idle"]))
    """)
    env = start_env(store_server, creds, algo_server, prefix, "nats://127.0.0.1:4222")
    proc = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == ExitCode.CONFIG, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("imgworker: error: run needs nats-py, which the base install "
                                                   "leaves out: pip install 'imgworker[nats]'"), proc.stderr


def check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imgworker", "check"], env=env, capture_output=True, text=True,
                          timeout=90)


@pytest.mark.timeout(150)
def test_check_in_cluster_mode_asks_the_nats_server_for_jetstream(tmp_path, store_server, creds, algo_server, prefix):
    server = NatsServer(str(tmp_path / "nats"))
    try:
        server.start()
        proc = check(start_env(store_server, creds, algo_server, prefix, server.url))
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"check: ok   NATS server with JetStream at {server.url}: JetStream answers (" in proc.stdout
    assert "check: all 6 checks passed" in proc.stdout


@pytest.mark.timeout(150)
def test_check_in_cluster_mode_fails_where_nothing_listens(store_server, creds, algo_server, prefix):
    port = free_port()
    proc = check(start_env(store_server, creds, algo_server, prefix, f"nats://imgworker:s3cret-pw@127.0.0.1:{port}"))
    assert proc.returncode == ExitCode.STORE_UNREACHABLE, proc.stdout + proc.stderr
    assert f"check: FAIL NATS server with JetStream at nats://127.0.0.1:{port}: " in proc.stdout
    assert "Connect call failed" in proc.stdout
    assert "s3cret-pw" not in proc.stdout + proc.stderr
    assert proc.stderr.strip() == (f"imgworker: error: 1 of 6 checks failed: NATS server with JetStream at "
                                   f"nats://127.0.0.1:{port}")


@pytest.mark.timeout(120)
def test_report_cluster_where_no_host_ever_ran_says_so_not_that_nothing_answered(tmp_path):
    server = NatsServer(str(tmp_path / "nats"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGWORKER_", "AWS_"))}
    try:
        server.start()
        proc = subprocess.run([sys.executable, "-m", "imgworker", "report", "--cluster"],
                              env={**env, "IMGWORKER_CLUSTER_URL": server.url}, capture_output=True, text=True,
                              timeout=60)
    finally:
        server.stop()
    assert proc.returncode == ExitCode.STORE_UNREACHABLE, proc.stderr
    assert "Traceback" not in proc.stderr and "no NATS server answered" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (
        f"imgworker: error: report --cluster: no cluster at {server.url}: its ledger bucket 'imgworker-outcomes', "
        "work stream 'IMGWORKER_WORK' or consumer 'imgworker-lanes' does not exist (stream not found); no host has "
        "run there with this [cluster] section yet, or its names differ")


@pytest.mark.timeout(150)
def test_a_server_that_refuses_the_stream_is_named_as_refusing_not_as_silent(tmp_path, store_server, creds,
                                                                             algo_server, store, prefix):
    """One nats-server asked for three replicas: it answers, and refuses; the warning says so and what to check."""
    upload(store, [f"{prefix}person/cam0/20260101-120000.000.jpg"])
    nats = NatsServer(str(tmp_path / "nats"))
    nats.start()
    try:
        env = {**start_env(store_server, creds, algo_server, prefix, nats.url), "IMGWORKER_CLUSTER_REPLICAS": "3"}
        code, log = wait_then_stop(env, str(tmp_path / "state"), "refused to set up", str(tmp_path / "host.log"))
    finally:
        nats.stop()
    assert "answered but refused to set up the work stream" in log and "cluster.replicas" in log, log[-3000:]
    assert "does not answer yet" not in log, log[-3000:]
    assert code == ExitCode.INTERRUPTED and "Traceback" not in log, log[-3000:]
    assert calls_under(algo_server, prefix) == {}
