"""The command line through subprocesses: the demo, and the errors a user sees at start."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.cli import cli_env
from tests.support.store import upload

pytestmark = pytest.mark.timeout(180)


def imgworker(*args: str, env: dict[str, str], timeout: float = 150, cwd=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imgworker", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def test_demo_runs_end_to_end(tmp_path):
    import os

    report_path = tmp_path / "report.json"
    proc = imgworker("demo", "--duration", "4", "--rate", "5", "--no-progress", "--data-dir", str(tmp_path / "demo"),
                     "--report-json", str(report_path), env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["outcomes"]["inferred"] > 0
    assert report["conserved"] is True
    assert report["failures"] == 0
    assert report["scanned"] >= 15
    assert "| mean inference time |" in proc.stdout
    assert "conserved: True" in proc.stdout


def test_run_until_idle_with_config_file(tmp_path, store_server, algo_server, creds, store, prefix):
    upload(store, [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(4)])
    config = tmp_path / "imgworker.toml"
    config.write_text(f'[store]\nprefix = "{prefix}"\n[algo]\nendpoint = "{algo_server.endpoint}"\n'
                      f'[run]\nstate_dir = "{tmp_path / "state"}"\n')
    report_path = tmp_path / "r.json"
    proc = imgworker("run", "--config", str(config), "--workers", "2", "--until-idle", "--no-progress",
                     "--report-json", str(report_path), env=cli_env(store_server, creds))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert (report["scanned"], report["processes"], report["lanes"], report["conserved"]) == (4, 2, 2, True)
    assert creds.secret_key not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("extra_env", "code", "message"),
    [
        ({"IMGWORKER_SECRET_KEY": "wrong-secret"}, 3, "store refused the credentials"),
        ({"IMGWORKER_STORE_BUCKET": "no-such-bucket"}, 4, "bucket 'no-such-bucket' does not exist"),
        ({"IMGWORKER_STORE_ENDPOINT": "127.0.0.1:9"}, 5, "store unreachable at 127.0.0.1:9"),
        ({"IMGWORKER_WORKER_COUNT": "zero"}, 2, "invalid config key worker.count: value 'zero'"),
        ({"IMGWORKER_SECRET_KEY": "", "AWS_SECRET_ACCESS_KEY": ""}, 2, "store credentials missing"),
        ({"IMGWORKER_ALGO_CA_BUNDLE": "/nonexistent/imgworker-ca.pem"}, 2,
         "invalid config key algo.ca_bundle: file '/nonexistent/imgworker-ca.pem' does not exist"),
    ],
)
def test_start_errors_are_one_clear_line(store_server, creds, extra_env, code, message, tmp_path):
    env = cli_env(store_server, creds, IMGWORKER_RUN_STATE_DIR=str(tmp_path), **extra_env)
    proc = imgworker("run", "--until-idle", "--no-progress", env=env, timeout=60)
    assert proc.returncode == code
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.count(message.split(" at ")[0]) == 1  # the message names its failure once
    assert "wrong-secret" not in proc.stderr and creds.secret_key not in proc.stderr


def test_report_command_recomputes_the_run_report(tmp_path, store_server, algo_server, creds, store, prefix):
    upload(store, [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(3)])
    env = cli_env(store_server, creds, IMGWORKER_STORE_PREFIX=prefix, IMGWORKER_ALGO_ENDPOINT=algo_server.endpoint,
                  IMGWORKER_RUN_STATE_DIR=str(tmp_path / "s"))
    run_report = tmp_path / "r.json"
    assert imgworker("run", "--until-idle", "--no-progress", "--report-json", str(run_report), env=env).returncode == 0
    proc = imgworker("report", "--json", str(tmp_path / "s" / "results.jsonl"), env=env)
    assert proc.returncode == 0, proc.stderr
    again, original = json.loads(proc.stdout), json.loads(run_report.read_text())
    for field in ("scanned", "outcomes", "inferences", "failures", "failure_rate", "avg_inference_ms"):
        assert again[field] == original[field]


def test_store_serve_prints_endpoint_and_stops_cleanly_on_ctrl_c(tmp_path, creds):
    import signal

    from imgworker.services.netutil import free_port

    port = free_port()
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("IMGWORKER_", "AWS_"))}
    env.update(IMGWORKER_ACCESS_KEY=creds.access_key, IMGWORKER_SECRET_KEY=creds.secret_key)
    proc = subprocess.Popen([sys.executable, "-m", "imgworker", "store-serve", "--data-dir", str(tmp_path / "d"),
                             "--port", str(port), "--bucket", "served"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f"endpoint 127.0.0.1:{port}, bucket served" in line
        proc.stdout.readline()
        assert "IMGWORKER_SCAN_EVENTS_FILER=127.0.0.1:" in proc.stdout.readline()  # what events mode needs
        from imgworker.config import load_config
        from imgworker.store import Store

        cfg = load_config(env={}, overrides={"store": {"endpoint": f"127.0.0.1:{port}", "bucket": "served"}})
        Store(cfg.store, creds).check()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert "embedded store stopped" in out
    assert creds.secret_key not in out + err
    import psutil

    assert not [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path / "d") in " ".join(p.info["cmdline"] or [])]


def test_json_logs_on_request(tmp_path, store_server, algo_server, creds, store, prefix):
    upload(store, [f"{prefix}p/t/20240101-120000.000.jpg"])
    env = cli_env(store_server, creds, IMGWORKER_STORE_PREFIX=prefix, IMGWORKER_ALGO_ENDPOINT=algo_server.endpoint,
                  IMGWORKER_RUN_STATE_DIR=str(tmp_path / "s"))
    proc = imgworker("--log-json", "--log-level", "DEBUG", "run", "--until-idle", "--no-progress", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
    assert {"ts", "level", "logger", "message", "pid"} <= set(records[0])
    assert any(r["logger"] == "imgworker.worker" and f"{prefix}p/t/" in r["message"] for r in records)


def results_line(key: str, outcome: str = "inferred") -> str:
    return json.dumps({"key": key, "outcome": outcome, "finished_at": 2.0, "started_at": 1.0}) + "\n"


def plain_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("IMGWORKER_", "AWS_"))}


def test_report_counts_distinct_keys_and_names_duplicates(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(results_line("a") + results_line("b") + results_line("a", "failed_algo"))
    proc = imgworker("report", "--json", str(path), env=plain_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["scanned"], report["duplicates"], report["conserved"]) == (2, 1, False)
    assert sum(report["outcomes"].values()) == 2  # each image once, by its latest line
    proc = imgworker("report", str(path), env=plain_env(), timeout=60)
    assert "conserved: False" in proc.stdout
    assert "keys with more than one outcome: 1" in proc.stdout


def test_cluster_report_with_nats_away_is_one_line_without_the_password():
    from imgworker.services.netutil import free_port

    env = {**plain_env(), "IMGWORKER_CLUSTER_URL": f"nats://ops:s3cret-pw@127.0.0.1:{free_port()}"}
    proc = imgworker("report", "--cluster", env=env, timeout=60)
    assert proc.returncode == 5, proc.stderr
    assert "Traceback" not in proc.stderr and "s3cret-pw" not in proc.stderr
    assert proc.stderr.startswith("imgworker: error: report --cluster: no NATS server answered at "
                                  "nats://127.0.0.1:") and proc.stderr.count("\n") == 1


def test_report_of_a_sound_file_is_conserved_without_a_duplicates_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(results_line("a") + results_line("b"))
    proc = imgworker("report", str(path), env=plain_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "conserved: True" in proc.stdout
    assert "more than one outcome" not in proc.stdout


def test_report_refuses_a_corrupt_line_and_repair_fixes_it(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    path = state_dir / "results.jsonl"
    path.write_text(results_line("a") + "{not json\n" + results_line("b"))
    (state_dir / "state.json").write_text('{"version": 1, "results_offset": 99}')
    proc = imgworker("report", str(path), env=plain_env(), timeout=60)
    assert proc.returncode == 7
    assert proc.stderr.startswith(f"imgworker: error: results file {path}: line 2 (byte offset ")
    assert f"imgworker repair --state-dir {state_dir}" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0

    proc = imgworker("repair", "--state-dir", str(state_dir), env=plain_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "kept 2 lines, moved 1 corrupt lines" in proc.stdout
    assert "rebuilds the processed set from the whole results file" in proc.stdout
    assert not (state_dir / "state.json").exists()
    assert (state_dir / "results.jsonl.corrupt").read_text() == "{not json\n"
    proc = imgworker("report", "--json", str(path), env=plain_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["scanned"] == 2


def test_repair_with_an_explicit_results_file_and_a_missing_one(tmp_path):
    path = tmp_path / "elsewhere.jsonl"
    path.write_text(results_line("a") + "\n")
    proc = imgworker("repair", "--state-dir", str(tmp_path / "none"), "--results", str(path), env=plain_env(),
                     timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert path.read_text() == results_line("a")
    proc = imgworker("repair", "--state-dir", str(tmp_path / "none"), env=plain_env(), timeout=60)
    assert proc.returncode == 2
    assert "results.jsonl does not exist" in proc.stderr


def test_repair_refuses_while_a_run_holds_the_state_directory(tmp_path):
    import fcntl

    path = tmp_path / "results.jsonl"
    path.write_text(results_line("a") + "bad\n")
    with open(tmp_path / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = imgworker("repair", "--state-dir", str(tmp_path), env=plain_env(), timeout=60)
    assert proc.returncode == 8
    assert "another imgworker run" in proc.stderr
    assert path.read_text() == results_line("a") + "bad\n"
