"""The operator's commands as a user meets them: `imgworker retry` after a real outage, `imgworker check`,
the reports' labels, and the messages of bad input. Each through the CLI in a child process; counted at
the far end (the calls the algorithm service received, the lines of the results file)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from imgworker.services.algo_server import AlgoService, SyntheticParams
from imgworker.services.netutil import free_port
from tests.support.cli import cli_env
from tests.support.results import SUCCESS, calls_under
from tests.support.store import upload

pytestmark = pytest.mark.timeout(240)


def imgworker(*args: str, env: dict[str, str], timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imgworker", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def write_config(tmp_path: Any, prefix: str, endpoint: str, **extra: str) -> str:
    path = tmp_path / "imgworker.toml"
    algo = "\n".join(f"{k} = {v}" for k, v in extra.items())
    path.write_text(f'[store]\nprefix = "{prefix}"\n[algo]\nendpoint = "{endpoint}"\nretries = 1\n'
                    f'backoff_base_s = 0.01\neject_after_failures = 1000\n{algo}\n'
                    f'[run]\nstate_dir = "{tmp_path / "state"}"\n[worker]\ncount = 2\n')
    return str(path)


def latest(path: str) -> dict[str, dict[str, Any]]:
    """key -> its last result line (re-admission lines are not results)."""
    out: dict[str, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if "key" in record:
                out[record["key"]] = record
    return out


def test_retry_after_a_real_outage_analyses_each_failed_image_once_more(tmp_path, store_server, creds, store,
                                                                        prefix):
    keys = [f"{prefix}cam/person/20240101-120000.{i:03d}.jpg" for i in range(7)]
    upload(store, keys)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}/infer"
    config = write_config(tmp_path, prefix, endpoint)
    env = cli_env(store_server, creds)
    results = str(tmp_path / "state" / "results.jsonl")
    with AlgoService("synthetic", SyntheticParams(latency_ms=5.0, sigma=0.0, error_rate=1.0), port=port) as broken:
        first = imgworker("run", "--config", config, "--until-idle", "--no-progress", "--report-json",
                          str(tmp_path / "first.json"), env=env)
        broken_calls = calls_under(broken, prefix)
    assert first.returncode == 9, first.stderr[-3000:]
    # the start-up endpoint check warned, and the run started anyway
    assert f"algorithm endpoint {endpoint} does not answer: it fails: http_500" in first.stderr
    assert "Starting anyway" in first.stderr
    assert {k: r["outcome"] for k, r in latest(results).items()} == {k: "failed_algo" for k in keys}
    assert broken_calls == {k: 2 for k in keys}  # one call and one HTTP retry each
    report = json.loads((tmp_path / "first.json").read_text())
    assert (report["http_retries"], report["retries"]) == (7, 0)  # counted apart from re-dispatches
    assert f"| {endpoint} | 14 | 14 |" in first.stdout  # endpoint health with one endpoint
    assert "| HTTP retries (calls beyond an image's first) | 7 |" in first.stdout

    store.delete([keys[0]])  # gone before the retry: not re-admitted
    proc = imgworker("retry", "--config", config, "--outcome", "failed_algo", "--cause", "http_500", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "retry: 7 images whose latest outcome is failed_algo with cause 'http_500'" in proc.stdout
    assert f"retry: 1 not re-admitted: the object is gone from bucket {store_server.bucket!r}: {keys[0]}" in proc.stdout
    assert "retry: 6 re-admitted: the next `imgworker run`" in proc.stdout

    with AlgoService("synthetic", SyntheticParams(latency_ms=5.0, sigma=0.0), port=port) as healthy:
        second = imgworker("run", "--config", config, "--until-idle", "--no-progress", "--report-json",
                           str(tmp_path / "second.json"), env=env)
        healthy_calls = calls_under(healthy, prefix)
    assert second.returncode == 0, second.stderr[-3000:]
    assert healthy_calls == {k: 1 for k in keys[1:]}
    final = latest(results)
    assert final[keys[0]]["outcome"] == "failed_algo"
    assert all(final[k]["outcome"] in SUCCESS for k in keys[1:])
    report = json.loads((tmp_path / "second.json").read_text())
    assert (report["readmitted"], report["scanned"], report["conserved"]) == (6, 6, True)
    assert "| re-admitted by `imgworker retry` | 6 |" in second.stdout

    proc = imgworker("report", "--json", results, env=env)
    from_file = json.loads(proc.stdout)
    assert (from_file["scanned"], from_file["duplicates"], from_file["readmitted"], from_file["conserved"]) == (
        7, 0, 6, True)
    assert from_file["outcomes"]["failed_algo"] == 1
    proc = imgworker("retry", "--config", config, "--outcome", "failed_algo", "--cause", "http_500",
                     "--key-prefix", f"{prefix}cam/person/", env=env)
    assert "retry: 1 image whose latest outcome is failed_algo" in proc.stdout
    assert "retry: 1 not re-admitted: the object is gone" in proc.stdout
    assert "retry: nothing re-admitted: no selected image is still in the bucket" in proc.stdout
    assert "0 re-admitted" not in proc.stdout and "images whose" not in proc.stdout


def results_line(key: str, outcome: str, finished_at: float = 2.0, **extra: Any) -> str:
    return json.dumps({"key": key, "outcome": outcome, "finished_at": finished_at, "started_at": 1.0, **extra}) + "\n"


def offline_env(tmp_path: Any, **extra: str) -> dict[str, str]:
    """Credentials and a state directory, and a store nobody listens at: these commands must not need it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGWORKER_", "AWS_"))}
    env.update(IMGWORKER_ACCESS_KEY="ak", IMGWORKER_SECRET_KEY="sk-not-shown", IMGWORKER_STORE_ENDPOINT="127.0.0.1:9",
               IMGWORKER_RUN_STATE_DIR=str(tmp_path / "state"))
    env.update(extra)
    return env


def test_retry_with_nothing_matching_says_so_and_changes_nothing(tmp_path):
    (tmp_path / "state").mkdir()
    path = tmp_path / "state" / "results.jsonl"
    path.write_text(results_line("a", "inferred") + results_line("b", "failed_store"))
    proc = imgworker("retry", "--outcome", "failed_algo", env=offline_env(tmp_path), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"retry: nothing to re-admit: no image's latest outcome is failed_algo in {path}" in proc.stdout
    assert path.read_text() == results_line("a", "inferred") + results_line("b", "failed_store")


def test_retry_refuses_cluster_mode_and_re_admits_nothing(tmp_path, store_server, creds, store, prefix):
    # the cluster's ledger keeps the first outcome for good: a re-admitted image would be acked as counted
    key = f"{prefix}cam/person/20240101-120000.000.jpg"
    upload(store, [key])
    (tmp_path / "state").mkdir()
    path = tmp_path / "state" / "results.jsonl"
    path.write_text(results_line(key, "failed_algo"))
    env = cli_env(store_server, creds, IMGWORKER_RUN_STATE_DIR=str(tmp_path / "state"),
                  IMGWORKER_CLUSTER_URL="nats://127.0.0.1:9")
    proc = imgworker("retry", "--outcome", "failed_algo", env=env, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("imgworker: error: retry: not in cluster mode ([cluster] url is set)")
    assert "re-admitted:" not in proc.stdout
    assert path.read_text() == results_line(key, "failed_algo")


def test_retry_refuses_a_bad_since_and_names_the_flag(tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "results.jsonl").write_text(results_line("a", "failed_algo"))
    proc = imgworker("retry", "--outcome", "failed_algo", "--since", "yesterday", env=offline_env(tmp_path),
                     timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("imgworker: error: --since: value 'yesterday' is not allowed (a time such as")
    assert "an age such as 90s, 30m, 2h, 1d" in proc.stderr


def test_retry_since_keeps_older_outcomes_out(tmp_path):
    (tmp_path / "state").mkdir()
    import time

    (tmp_path / "state" / "results.jsonl").write_text(results_line("old", "failed_algo", finished_at=1000.0)
                                                      + results_line("new", "failed_algo", finished_at=time.time()))
    proc = imgworker("retry", "--outcome", "failed_algo", "--since", "2h", "--dry-run", env=offline_env(tmp_path),
                     timeout=60)
    assert proc.returncode == 5  # one matches, so the store is asked; nobody listens at 127.0.0.1:9
    assert proc.stderr.count("store unreachable") == 1


def test_retry_dry_run_looks_the_images_up_and_changes_nothing(tmp_path, store_server, creds, store, prefix):
    keys = [f"{prefix}cam/person/20240101-120000.{i:03d}.jpg" for i in range(2)]
    upload(store, keys[:1])  # the second is gone
    config = write_config(tmp_path, prefix, f"http://127.0.0.1:{free_port()}/infer")
    (tmp_path / "state").mkdir()
    path = tmp_path / "state" / "results.jsonl"
    path.write_text("".join(results_line(k, "failed_algo") for k in keys))
    before = path.read_bytes()
    proc = imgworker("retry", "--config", config, "--outcome", "failed_algo", "--dry-run",
                     env=cli_env(store_server, creds), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "retry: 1 not re-admitted: the object is gone" in proc.stdout
    assert "retry: --dry-run: 1 would be re-admitted; nothing was changed" in proc.stdout
    assert path.read_bytes() == before


def test_retry_refuses_while_a_run_holds_the_state_directory(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    path = state / "results.jsonl"
    path.write_text(results_line("a", "failed_algo"))
    with open(state / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        proc = imgworker("retry", "--outcome", "failed_algo", env=offline_env(tmp_path), timeout=60)
    assert proc.returncode == 8
    assert (f"imgworker: error: a run (pid 4242) is using the state directory {state}: stop it before "
            "`imgworker retry`") in proc.stderr
    assert path.read_text() == results_line("a", "failed_algo")


# ----- check ------------------------------------------------------------------------------------


def test_check_passes_with_one_line_per_check_and_shows_no_secret(tmp_path, store_server, creds, store, prefix,
                                                                   algo_server):
    key = f"{prefix}cam/person/20240101-120000.000.jpg"
    upload(store, [key])
    config = write_config(tmp_path, prefix, algo_server.endpoint)
    proc = imgworker("check", "--config", config, env=cli_env(store_server, creds), timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:4] == [f"check: ok   store reachable at {store_server.endpoint}: it answered",
                         "check: ok   store accepts the credentials: accepted",
                         f"check: ok   bucket {store_server.bucket!r} exists: yes",
                         f"check: ok   list one page under prefix {prefix!r}: 1 objects, 1 of them images"]
    assert lines[4].startswith(f"check: ok   algorithm endpoint {algo_server.endpoint}: answered success=true")
    assert lines[4].endswith(f"for image {key}")
    assert lines[5] == "check: all 5 checks passed"
    assert algo_server.calls().get(f"imgworker-check/{key}") == 1  # a real call, for a real image
    out = proc.stdout + proc.stderr
    assert "X-Amz-Signature" not in out and creds.secret_key not in out and "X-Amz-Credential" not in out


def test_check_fails_naming_a_refusing_route(tmp_path, store_server, creds, store, prefix, algo_server):
    dead = f"http://127.0.0.1:{free_port()}/infer"
    config = write_config(tmp_path, prefix, algo_server.endpoint, routes=f'{{ vehicle = ["{dead}"] }}')
    proc = imgworker("check", "--config", config, env=cli_env(store_server, creds), timeout=60)
    assert proc.returncode == 9
    assert (f"check: FAIL algorithm endpoint {dead} (route 'vehicle'): nothing answers: connection refused"
            in proc.stdout)
    assert f"check: ok   algorithm endpoint {algo_server.endpoint}: it answers" in proc.stdout  # no image: said so
    assert "no image (none found under the prefix; image_url was empty)" in proc.stdout
    assert proc.stderr == f"imgworker: error: 1 of 6 checks failed: algorithm endpoint {dead} (route 'vehicle')\n"


def test_check_with_no_image_fails_a_service_that_fails_every_call(tmp_path, store_server, creds, prefix):
    with AlgoService("synthetic", SyntheticParams(latency_ms=1.0, sigma=0.0, error_rate=1.0)) as broken:
        config = write_config(tmp_path, prefix, broken.endpoint)  # nothing under the prefix: no real image
        proc = imgworker("check", "--config", config, env=cli_env(store_server, creds), timeout=60)
        received = broken.calls().get("imgworker-check")
    assert received == 1  # it was asked, and answered 500
    assert proc.returncode == 9, proc.stdout + proc.stderr
    assert f"check: FAIL algorithm endpoint {broken.endpoint}: it fails: http_500 to a request with no image" in proc.stdout
    assert proc.stderr == f"imgworker: error: 1 of 5 checks failed: algorithm endpoint {broken.endpoint}\n"


def test_check_against_an_unreachable_store_says_it_once(tmp_path, store_server, creds, algo_server, prefix):
    config = write_config(tmp_path, prefix, algo_server.endpoint)
    env = cli_env(store_server, creds, IMGWORKER_STORE_ENDPOINT="127.0.0.1:9")
    proc = imgworker("check", "--config", config, env=env, timeout=60)
    assert proc.returncode == 5
    assert proc.stdout.splitlines()[0].startswith("check: FAIL store reachable at 127.0.0.1:9: store unreachable at "
                                                  "127.0.0.1:9 (")
    assert proc.stdout.count("store unreachable") == 1


# ----- messages ---------------------------------------------------------------------------------


def test_a_bad_value_names_the_environment_variable_or_flag_it_came_from(tmp_path):
    proc = imgworker("run", "--until-idle", env=offline_env(tmp_path, IMGWORKER_WORKER_COUNT="abc"), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == ("imgworker: error: invalid config key worker.count: value 'abc' is not allowed (a whole "
                           "number); it came from the environment variable IMGWORKER_WORKER_COUNT\n")
    proc = imgworker("run", "--threads", "0", env=offline_env(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert ("worker.threads: value 0 is not allowed (a whole number >= 1); it came from the flag --threads"
            in proc.stderr)


def test_unknown_keys_and_sections_get_the_nearest_valid_one(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[worker]\nthread = 4\n")
    proc = imgworker("run", "--config", str(config), env=offline_env(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == (f"imgworker: error: unknown config key worker.thread (from the config file {config}) in "
                           "[worker]: did you mean `threads`?\n")
    config.write_text("[stor]\nbucket = 'x'\n")
    proc = imgworker("check", "--config", str(config), env=offline_env(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert ("unknown config section [stor] (from the config file " in proc.stderr
            and "did you mean [store]? the sections are [store], [scan], [dispatch], [worker], [algo], [run], "
            "[retention], [actions]" in proc.stderr)
    proc = imgworker("run", env=offline_env(tmp_path, IMGWORKER_WORKER_THREDS="2"), timeout=60)
    assert "unknown config key worker.threds (from the environment variable IMGWORKER_WORKER_THREDS)" in proc.stderr


def test_tls_against_a_plain_http_store_gets_a_hint(tmp_path, store_server, creds):
    env = cli_env(store_server, creds, IMGWORKER_STORE_SECURE="true", IMGWORKER_RUN_STATE_DIR=str(tmp_path))
    proc = imgworker("run", "--until-idle", "--no-progress", env=env, timeout=60)
    assert proc.returncode == 6
    assert "the store there speaks plain HTTP, not TLS: set store.secure = false" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_report_on_a_file_that_is_not_a_results_file_does_not_advise_repair(tmp_path):
    config = tmp_path / "imgworker.toml"
    config.write_text('[store]\nbucket = "frames"\n')
    proc = imgworker("report", str(config), env=offline_env(tmp_path), timeout=60)
    assert proc.returncode == 7
    assert proc.stderr.startswith(f"imgworker: error: {config} is not an imgworker results file")
    assert "repair" not in proc.stderr


def test_report_cluster_with_a_results_file_is_an_error_not_ignored(tmp_path):
    results = tmp_path / "results.jsonl"
    results.write_text(results_line("p/t/a.jpg", "no_detection"))
    proc = imgworker("report", "--cluster", str(results), env=offline_env(tmp_path), timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"imgworker: error: report --cluster reads the cluster's outcome ledger, not a results "
                           f"file: drop {results}, or drop --cluster\n")


def test_version(tmp_path):
    from imgworker import __version__

    proc = imgworker("--version", env=offline_env(tmp_path), timeout=60)
    assert (proc.returncode, proc.stdout) == (0, f"imgworker {__version__}\n")


@pytest.mark.parametrize("command", ["run", "demo", "report", "retry", "check", "repair", "store-serve", "algo-serve",
                                     "loadgen", "scenario"])
def test_every_option_has_help_text(command):
    import argparse

    from imgworker.cli import _parser

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    missing = [a.option_strings or [a.dest] for a in parser._actions if not a.help]
    assert missing == []


def test_algo_serve_slots_are_explained_and_its_shape_changes_while_it_runs(tmp_path):
    # An operator watching --adaptive follow a slower service: --help says what --slots does and how
    # to change the speed while a run goes on, and that step works against `imgworker algo-serve`.
    import requests

    from imgworker.services.netutil import port_open, wait_until

    help_text = " ".join(imgworker("algo-serve", "--help", env=offline_env(tmp_path), timeout=60).stdout.split())
    assert "--slots SLOTS synthetic backend: calls served at once" in help_text
    assert 'POST /shape with {"slots": n, "latency_ms": x}' in help_text
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "imgworker", "algo-serve", "--backend", "synthetic", "--port",
                             str(port), "--slots", "2", "--latency-ms", "50"], env=offline_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open("127.0.0.1", port), timeout_s=60, what="algo-serve",
                   alive=lambda: proc.poll() is None)
        answer = requests.post(f"http://127.0.0.1:{port}/shape", json={"latency_ms": 400}, timeout=10)
        assert (answer.status_code, answer.json()) == (200, {"slots": 2, "latency_ms": 400.0})
        answer = requests.post(f"http://127.0.0.1:{port}/shape", json={"slots": 1}, timeout=10)
        assert answer.json() == {"slots": 1, "latency_ms": 400.0}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ----- a report that reads true ------------------------------------------------------------------


def test_a_report_of_failures_only_reads_n_a_not_zero(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(results_line("a", "failed_algo") + results_line("b", "failed_algo"))
    proc = imgworker("report", str(path), env=offline_env(tmp_path), timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "| failure rate | 100.00% of 2 attempted |" in out
    assert "| success rate | 0.00% |" in out  # true: none of the 2 attempted succeeded
    assert "per success" not in out and "the old way" not in out
    assert "| mean inference time | n/a |" in out
    assert "| p50 / p95 / p99 inference | n/a |" in out
    assert "| analysed (inferred + no_detection) | 0 |" in out
    assert f"figures of: every line of {path} (all runs that wrote it)" in out
    assert "| input-bound | n/a (not kept per image: see the run's own report) |" in out
    assert "| n/a (endpoint health is not kept per image: see the run's own report) |" in out


def test_success_false_answers_keep_the_service_error_and_are_counted(make_config, store, prefix):
    from imgworker.supervisor import Supervisor
    from tests.support.results import results_of

    keys = [f"{prefix}cam/person/20240101-120000.{i:03d}.jpg" for i in range(4)]
    upload(store, keys)
    with AlgoService("synthetic", SyntheticParams(latency_ms=5.0, sigma=0.0, false_rate=1.0)) as service:
        cfg = make_config(algo={"endpoint": service.endpoint})
        report = Supervisor(cfg, show_progress=False).run()
    assert [(r.outcome.value, r.cause, r.error) for r in results_of(cfg)] == [
        ("no_detection", "success_false", "nothing detected")] * 4
    assert (report.answered_false, report.false_errors) == (4, {"nothing detected": 4})
    from imgworker.stats import format_report

    text = format_report(report)
    assert "| answered success=false (counted as no_detection) | 4 |" in text
    assert "success=false errors: 'nothing detected' x4" in text
    assert report.input_starved_share is not None and 0.0 <= report.input_starved_share <= 1.0
    assert "figures of: this run:" in text


@pytest.mark.parametrize("answer", ["go", "tls-close"])
def test_plain_http_against_a_tls_store_gets_a_hint(tmp_path, answer):
    """A TLS port answers plain HTTP as Go's server (MinIO) does, or by closing the failed handshake."""
    import socket
    import ssl
    import threading

    import trustme

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(context)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            try:
                if answer == "go":
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                                 b"Connection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
                else:
                    context.wrap_socket(conn, server_side=True)
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        env = offline_env(tmp_path, IMGWORKER_STORE_ENDPOINT=f"127.0.0.1:{server.getsockname()[1]}")
        proc = imgworker("run", "--until-idle", "--no-progress", env=env, timeout=60)
    finally:
        server.close()
        thread.join(5)
    assert proc.returncode == 5
    assert "set store.secure = true (IMGWORKER_STORE_SECURE=true)" in proc.stderr
    assert proc.stderr.count("store unreachable") == 1 and proc.stderr.strip().count("\n") == 0
