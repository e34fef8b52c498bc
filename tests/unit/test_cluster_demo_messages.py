"""What ``imgworker demo --hosts N`` tells the user about its hosts, with the hosts and nats-server replaced."""

from __future__ import annotations

import inspect
import os
from typing import Any

import pytest

from imgworker.cluster import demo, jetstream
from imgworker.config import load_config
from imgworker.stats import Stats

pytestmark = pytest.mark.timeout(30)


class _Nats:
    url = "nats://127.0.0.1:4222"

    def __init__(self, store_dir: str) -> None:
        pass

    def __enter__(self) -> _Nats:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class _Proc:
    def wait(self, timeout: float | None = None) -> int:
        return 0

    def terminate(self) -> None:
        pass

    def poll(self) -> int:
        return 0


def test_the_demo_names_every_host_log_and_what_the_intake_leader_writes_there(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "NatsServer", _Nats)
    monkeypatch.setattr(demo, "_start_host", lambda cfg, url, name, data_dir, **_: _Proc())
    monkeypatch.setattr(demo, "_wait_for_every_outcome", lambda cfg, cluster, procs: None)
    report = Stats(1).report(pending=0, in_flight=0, wall_s=1.0)
    monkeypatch.setattr(demo, "cluster_report", lambda cluster: (report, {}, {}))
    cfg = load_config(env={}, overrides={"run": {"state_dir": str(tmp_path / "state")}})
    demo.run_demo(cfg, hosts=3, data_dir=str(tmp_path), report_json_path=None, start_cameras=_Proc)
    said = capsys.readouterr().out
    for n in (1, 2, 3):
        assert os.path.join(str(tmp_path), f"host-{n}.log") in said, said
    assert "host-1's log says" not in said
    quoted = said.split('"')[1]  # the words the leader's log line has
    assert quoted in inspect.getsource(jetstream), quoted
