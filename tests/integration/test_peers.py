"""benchmarks.peers runs end to end in its quick form (its timings and ratios are not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WAYS = {"imgworker", "imgworker-lanes", "imgworker-lanes-env", "imgworker-listing", "imgworker-lanes-listing", "floor",
        "celery"}


@pytest.mark.timeout(300)
def test_peers_quick_writes_every_way_for_every_n(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH", "")])))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.peers", "--quick", "--out", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "peers.json").read_text())
    workers = data["params"]["workers"]
    assert workers == [4, 8]
    rows = {(r["way"], r["workers"]): r for r in data["rows"]}
    assert set(rows) == {(way, n) for way in WAYS for n in workers}
    for (way, n), row in rows.items():
        assert row["images"] > 0 and row["failed"] == 0, (way, n)
        for field in ("throughput_per_s", "efficiency", "cpu_s_per_1000", "p50_ms"):
            assert row[field] > 0, (way, n, field)
        for field in ("efficiency_vs_floor", "cpu_vs_floor", "efficiency_vs_celery", "cpu_vs_celery"):
            assert field in row, (way, n, field)
    assert rows[("imgworker", 4)]["images"] == rows[("floor", 4)]["images"] == rows[("celery", 4)]["images"]
    table = (tmp_path / "peers.md").read_text()
    assert "efficiency" in table and "CPU-s/1000" in table
    assert all(f"| {n} | {way} |" in table for way in WAYS for n in workers)
    assert (tmp_path / "peers.png").read_bytes()[:4] == b"\x89PNG"
