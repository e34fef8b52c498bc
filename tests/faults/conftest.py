"""Cluster fault tests' shared parts: a real nats-server with JetStream, and hosts always reaped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.cluster import Host, NatsServer


@pytest.fixture()
def nats(tmp_path: Any) -> Iterator[NatsServer]:
    server = NatsServer(str(tmp_path / "nats"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture()
def hosts() -> Iterator[list[Host]]:
    started: list[Host] = []
    try:
        yield started
    finally:
        for host in started:
            host.reap()
