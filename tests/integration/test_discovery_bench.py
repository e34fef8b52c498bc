"""The discovery benchmark (events against listing) runs end to end on its quick sizes; timings are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_discovery_benchmark_quick_run_accounts_for_every_upload(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.discovery", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"discovery.{ext}").is_file(), ext
    assert (tmp_path / "discovery.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "discovery.json").read_text())
    assert data["params"]["quick"] is True
    modes = {m["mode"]: m for m in data["modes"]}
    assert set(modes) == {"events", "events-incremental", "listing"}
    for name, m in modes.items():
        assert m["uploaded"] > 0, name
        assert m["analysed"] == m["uploaded"], (name, m["missing"], m["duplicates"])  # exactly one result each
        assert m["duplicates"] == 0 and m["unexpected"] == 0, name
        for field in ("report_p50_discovery_ms", "report_p99_discovery_ms", "put_to_start_p50_ms",
                      "put_to_start_p99_ms", "supervisor_cpu_idle_pct", "supervisor_cpu_load_pct",
                      "intake_cpu_idle_pct"):
            assert isinstance(m[field], (int, float)), (name, field)
        assert len(m["latencies_ms"]) == m["uploaded"], name
    table = (tmp_path / "discovery.md").read_text()
    assert "| events |" in table and "| listing |" in table
