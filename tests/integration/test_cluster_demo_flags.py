"""``imgworker demo --adaptive`` runs the adaptive controller; with ``--hosts 2``, on each host, with its /metrics.

Before, ``--adaptive`` was taken and silently dropped (the demo's own algorithm settings replaced
it), and the hosts of ``--hosts``, ``imgworker run`` processes of their own, got only the lanes:
no ``--adaptive``, no ``--metrics-port``. Now the report has the adaptive limit table (one host),
and each host runs the controller and serves /metrics on the port given plus its index.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest


def two_free_ports() -> int:
    """A port P with P + 1 also free (the second host's)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise AssertionError("no two consecutive free ports")


@pytest.mark.timeout(240)
def test_demo_hosts_run_adaptive_and_serve_metrics_each(tmp_path):
    port = two_free_ports()
    data = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "imgworker", "demo", "--hosts", "2", "--adaptive", "--metrics-port",
                           str(port), "--duration", "4", "--rate", "3", "--backend", "synthetic", "--workers", "1",
                           "--threads", "2", "--no-progress", "--data-dir", str(data)],
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (f"demo: /metrics of each host: http://127.0.0.1:{port}/metrics, http://127.0.0.1:{port + 1}/metrics"
            in proc.stdout)
    for i in range(2):
        log = (data / f"host-{i + 1}.log").read_text()
        assert f"metrics: http://127.0.0.1:{port + i}/metrics" in log, log[-3000:]
        assert "| endpoint | adaptive limit:" in log, log[-3000:]


@pytest.mark.timeout(240)
def test_demo_adaptive_runs_the_controller(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "imgworker", "demo", "--adaptive", "--duration", "3", "--rate", "3",
                           "--backend", "synthetic", "--workers", "1", "--threads", "2", "--no-progress", "--data-dir",
                           str(tmp_path / "demo")], capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| endpoint | adaptive limit:" in proc.stdout, proc.stdout[-3000:]
