"""The benchmark harness runs end to end on tiny sizes (its timings are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.check_vs_waste import run_case, summarize
from benchmarks.dispatch import bench_pipes, bench_pool, bench_queue, items
from tests.support.cli import cli_env
from tests.support.store import upload

pytestmark = pytest.mark.timeout(240)


def test_tune_command_writes_points_table_and_plot(tmp_path):
    out = tmp_path / "tune.json"
    proc = subprocess.run(
        [sys.executable, "-m", "imgworker", "--log-level", "WARNING", "tune", "--workers", "1,2", "--latency-ms",
         "20", "--images", "300", "--warmup-s", "0.5", "--window-s", "0.5", "--max-windows", "3", "--json", str(out),
         "--markdown", str(tmp_path / "tune.md"), "--plot", str(tmp_path / "tune.png")],
        capture_output=True, text=True, timeout=200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    measured = [p["workers"] for p in data["points"]]
    assert measured == [1, 2]
    for p in data["points"]:
        for field in ("throughput_per_s", "ideal_per_s", "efficiency", "efficiency_nominal", "p50_ms", "p95_ms",
                      "p99_ms", "overhead_p50_ms", "cpu_s_per_1000"):
            assert field in p
        for field in ("throughput_per_s", "ideal_per_s", "efficiency", "p50_ms"):
            assert p[field] > 0, field
        assert p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"]
        # both are rounded before they are written: compare as arithmetic, not as a measurement
        assert p["efficiency"] == pytest.approx(p["throughput_per_s"] / p["ideal_per_s"], rel=0.01, abs=1e-3)
        # against the nominal --latency-ms 20, whatever the service really took
        nominal = p["workers"] / 0.020
        assert p["efficiency_nominal"] == pytest.approx(p["throughput_per_s"] / nominal, rel=0.01, abs=1e-3)
    assert data["recommended_workers"] in measured
    assert data["reason"]
    table = (tmp_path / "tune.md").read_text()
    assert "Recommended:" in table and "efficiency vs nominal L" in table
    assert all(f"\n| {n} |" in table for n in measured)
    assert (tmp_path / "tune.png").read_bytes()[:4] == b"\x89PNG"


def test_tune_says_when_the_images_ran_out_while_measuring(tmp_path):
    # 40 images at about 100 a second are gone before the first window closes: the point's throughput
    # is what the lanes got, not what they could do, and tune must say so rather than recommend from it.
    out = tmp_path / "tune.json"
    proc = subprocess.run(
        [sys.executable, "-m", "imgworker", "--log-level", "WARNING", "tune", "--workers", "2", "--latency-ms",
         "20", "--images", "40", "--warmup-s", "0.5", "--window-s", "0.5", "--max-windows", "3", "--json", str(out),
         "--markdown", str(tmp_path / "tune.md")],
        capture_output=True, text=True, timeout=200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [p["ran_out"] for p in data["points"]] == [True]
    assert "ran out of images while measured: raise --images" in proc.stdout
    assert "N = 2 ran out of images" in data["reason"] and "--images" in data["reason"]
    assert "(ran out of images)" in (tmp_path / "tune.md").read_text()


def test_tune_measures_processes_x_lanes_and_recommends_both(tmp_path, store_server, algo_server, creds, store,
                                                             prefix):
    """A 2-point grid (2 x 1, 1 x 2) against the fixtures' store and synthetic service, through --config."""
    keys = [f"{prefix}cam/t/20240101-120000.{i:03d}.jpg" for i in range(400)]
    upload(store, keys)
    config = tmp_path / "imgworker.toml"
    config.write_text(f'[store]\nprefix = "{prefix}"\n[algo]\nendpoint = "{algo_server.endpoint}"\n')
    out = tmp_path / "tune.json"
    proc = subprocess.run(
        [sys.executable, "-m", "imgworker", "--log-level", "WARNING", "tune", "--config", str(config), "--total", "2",
         "--lanes", "1,2", "--latency-ms", "20", "--warmup-s", "0.3", "--window-s", "0.3", "--max-windows", "3",
         "--json", str(out)],
        capture_output=True, text=True, timeout=200, env=cli_env(store_server, creds),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [(p["workers"], p["lanes"], p["in_flight"]) for p in data["points"]] == [(2, 1, 2), (1, 2, 2)]
    assert [p["lanes_answered"] for p in data["points"]] == [2, 2]  # the run really had N lanes
    for p in data["points"]:
        for field in ("throughput_per_s", "efficiency", "cpu_s_per_1000", "rss_total_peak_mb", "rss_worker_mb",
                      "images"):
            assert p[field] > 0, field
    chosen = (data["recommended_workers"], data["recommended_lanes"])
    assert chosen in [(2, 1), (1, 2)]
    assert data["initial_limit"] == 2 and data["knee_reached"] is False and data["reason"]
    # stdout names both numbers, as flags to copy, and the limit for --adaptive
    assert f"`--workers {chosen[0]} --threads {chosen[1]}`" in proc.stdout
    assert "Initial limit for `--adaptive`: **2**" in proc.stdout
    assert "| 2 | 1 | 2 |" in proc.stdout and "| 1 | 2 | 2 |" in proc.stdout
    # every measured image was a call the service answered, under this test's prefix only
    calls = sum(n for key, n in algo_server.calls().items() if key.startswith(prefix))
    assert calls >= sum(p["images"] for p in data["points"])
    assert creds.secret_key not in proc.stdout + proc.stderr


def test_tune_rejects_bad_worker_list():
    proc = subprocess.run([sys.executable, "-m", "imgworker", "tune", "--workers", "1,x"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--workers: value '1,x' is not allowed" in proc.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--total", "8", "--lanes", "0"], "--lanes: value 0 is not allowed (each from 1 to 256)"),
    (["--total", "8", "--lanes", "4,x"], "--lanes: value '4,x' is not allowed (comma-separated integers)"),
    (["--total", "6", "--lanes", "4,8"], "--total 6: no --lanes value (4, 8) divides it"),
    (["--total", "8", "--workers", "2"], "give either --total or --workers, not both"),
    (["--total", ","], "--total: value ',' is not allowed"),
    (["--workers", "2", "--images", "0"], "--images: value 0 is not allowed"),
])
def test_tune_bad_grid_is_a_clear_error(args, message):
    proc = subprocess.run([sys.executable, "-m", "imgworker", "tune", *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"imgworker: error: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr and "tune: uploading" not in proc.stdout


def test_check_vs_waste_cases(make_config):
    cfg = make_config(worker={"count": 2})
    off = run_case(cfg, p=0.5, check=False, images=20, workers=2, seed=1)
    on = run_case(cfg, p=0.5, check=True, images=20, workers=2, seed=1)
    assert off.deleted == on.deleted > 0
    assert off.failed_missing == off.deleted and off.skipped_missing == 0
    assert on.skipped_missing == on.deleted and on.failed_missing == 0
    assert on.check_worker_s > 0 and off.check_worker_s == 0
    summary = summarize([off, on], {"mean_ms": 1.0}, 20.0)
    assert 0 < summary["break_even_p"] <= 1
    assert summary["break_even_p_if_gone_costs_full_latency"] == pytest.approx(
        min(1.0, summary["check_ms_per_image"] / 20.0), rel=1e-3)


def test_dispatch_benchmarks_run():
    work = items(200)
    for bench in (bench_pipes, bench_queue, bench_pool):
        assert bench(work, 2) > 0
