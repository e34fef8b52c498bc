"""The live view from outside: the status line on a pseudo-terminal, plain lines through a pipe, worker
records printed by the supervisor, /healthz, ``imgworker top``, and the shipped dashboard and alert rules."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from imgworker.results import read_results
from imgworker.services.algo_server import AlgoService, SyntheticParams
from imgworker.services.netutil import free_port
from imgworker.store import Store
from tests.support.cli import cli_env, reap
from tests.support.store import upload

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
CLEAR = "\r\x1b[K"
RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
PROGRESS = re.compile(r"s \d+ done [\d.]+/s \| queue \d+ .*\| failure rate ")  # the status line


def imgworker_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "imgworker", *args]


def on_a_terminal(args: list[str], env: dict[str, str], patience_s: float = 150.0) -> tuple[int, str]:
    """Run ``imgworker`` with stdout and stderr on a pseudo-terminal; its exit code and everything it drew."""
    master, slave = os.openpty()
    proc = subprocess.Popen(imgworker_cmd(*args), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + patience_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every process holding the terminal has closed it
                break
            if not data:
                break
            out += data
        code = reap(proc, timeout=30)  # type: ignore[arg-type]
    finally:
        os.close(master)
    return code, out.decode("utf-8", "replace").replace("\r\n", "\n")  # the terminal's own newline translation


def pieces(screen: str) -> list[str]:
    """What was written between line ends and status-line clears: each must be a whole line of one kind."""
    return [p for line in screen.split("\n") for p in line.split(CLEAR) if p.strip()]


# ----- the status line on a terminal ---------------------------------------------------------------


def test_on_a_terminal_no_log_line_or_camera_output_is_glued_to_the_progress_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGWORKER_", "AWS_"))}
    code, screen = on_a_terminal(["demo", "--backend", "synthetic", "--duration", "4", "--rate", "5",
                                  "--data-dir", str(tmp_path / "demo")], env)
    assert code == 0, screen[-3000:]
    drawn = [p for p in pieces(screen) if PROGRESS.search(p)]
    assert len(drawn) >= 2, screen[-3000:]  # the status line was drawn, and drawn again
    for piece in drawn:  # a status line ends with its own figure: nothing was appended to it
        assert piece.rstrip().endswith("%"), repr(piece)
    records = [p for p in pieces(screen) if RECORD.search(p)]
    assert any("imgworker.cameras" in p and "loadgen:" in p for p in records), screen[-3000:]
    for piece in records:  # every record starts at column 0, after a clear of the status line
        assert RECORD.match(piece), repr(piece)
    for piece in pieces(screen):  # the camera simulator's output is a log record like any other
        assert "loadgen:" not in piece or RECORD.match(piece), repr(piece)


# ----- plain lines through a pipe; worker records through the supervisor ---------------------------


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory: pytest.TempPathFactory, store_server, creds) -> str:
    """A run whose service fails half the calls (workers log each retry), stderr to a pipe: its stderr."""
    tmp = tmp_path_factory.mktemp("piped")
    prefix = f"t-{uuid.uuid4().hex[:10]}/"
    store = Store(store_server_config(store_server, prefix), creds)
    upload(store, [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(12)])
    params = SyntheticParams(latency_ms=60.0, sigma=0.0, error_rate=0.5, seed=7)
    with AlgoService("synthetic", params) as algo:
        env = cli_env(store_server, creds, IMGWORKER_STORE_PREFIX=prefix, IMGWORKER_ALGO_ENDPOINT=algo.endpoint,
                      IMGWORKER_ALGO_RETRIES="3", IMGWORKER_ALGO_BACKOFF_BASE_S="0.05",
                      IMGWORKER_ALGO_EJECT_AFTER_FAILURES="50", IMGWORKER_RUN_STATE_DIR=str(tmp / "state"),
                      IMGWORKER_RUN_PROGRESS_LOG_INTERVAL_S="0.2")
        proc = subprocess.run(imgworker_cmd("run", "--until-idle", "--workers", "2"), env=env, capture_output=True,
                              text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def store_server_config(store_server: Any, prefix: str) -> Any:
    from imgworker.config import load_config

    return load_config(env={}, overrides={"store": {"endpoint": store_server.endpoint, "bucket": store_server.bucket,
                                                     "prefix": prefix}}).store


def test_piped_stderr_has_no_carriage_return_and_plain_progress_lines(piped_run):
    assert "\r" not in piped_run and "\x1b[" not in piped_run
    progress = [line for line in piped_run.splitlines() if " progress: " in line]
    assert progress and all(RECORD.match(line) and PROGRESS.search(line) for line in progress), piped_run[-3000:]
    for line in piped_run.splitlines():  # one record, one line: nothing continues on the next
        assert RECORD.match(line) or line.startswith(("metrics:", "imgworker: error:")), repr(line)


def test_worker_records_reach_the_supervisors_output_with_the_workers_name(piped_run):
    retries = [line for line in piped_run.splitlines() if "imgworker.worker" in line and " attempt " in line]
    assert retries, piped_run[-3000:]
    assert all(re.search(r"imgworker\.worker \[worker [01]\]: lane \d+: ", line) for line in retries), retries[:3]


# ----- a running supervisor: /healthz, top, and the metrics the dashboards name ---------------------


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def done_at(url: str) -> float:
    try:
        _, text = get(url)
    except OSError:
        return -1.0
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    images = families.get("imgworker_images")
    return sum(s.value for s in images.samples) if images else -1.0


def status_at(port: int) -> str:
    try:
        _, body = get(f"http://127.0.0.1:{port}/healthz")
        return str(json.loads(body).get("status"))
    except (OSError, ValueError):
        return "?"


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory, store_server, creds, algo_server) -> Iterator[dict[str, Any]]:
    """``imgworker run`` with --metrics-port, left running after it analysed its images."""
    tmp = tmp_path_factory.mktemp("serving")
    prefix = f"t-{uuid.uuid4().hex[:10]}/"
    store = Store(store_server_config(store_server, prefix), creds)
    upload(store, [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(6)])
    port = free_port()
    env = cli_env(store_server, creds, IMGWORKER_STORE_PREFIX=prefix, IMGWORKER_ALGO_ENDPOINT=algo_server.endpoint,
                  IMGWORKER_RUN_STATE_DIR=str(tmp / "state"))
    log = open(tmp / "run.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(imgworker_cmd("run", "--workers", "2", "--metrics-port", str(port), "--no-progress"),
                            env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 90
        while done_at(url) < 6 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert done_at(url) == 6, (tmp / "run.log").read_text()[-3000:]
        while status_at(port) != "idle" and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # /healthz looks at the figures about once a second: until it says the run is idle
        yield {"url": url, "port": port, "state": tmp / "state", "proc": proc}
    finally:
        proc.send_signal(signal.SIGTERM)
        reap(proc)
        log.close()


def test_healthz_answers_200_while_the_run_is_alive(serving):
    for _ in range(100):  # the loop looks at its figures about once a second: until it has seen the last outcome
        code, body = get(f"http://127.0.0.1:{serving['port']}/healthz")
        health = json.loads(body)
        if health.get("done") == 6:  # "starting" carries no figures yet
            break
        time.sleep(0.1)
    assert code == 200, health
    assert health["status"] in ("ok", "idle") and health["done"] == 6 and health["lanes"] == 2


def test_top_once_shows_the_running_supervisors_figures_and_a_dead_address_as_down(serving):
    dead = f"127.0.0.1:{free_port()}"
    proc = subprocess.run(imgworker_cmd("top", "--once", "--interval", "0.2", serving["url"], dead),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:2] == ["instance", "state"]
    live = next(line for line in lines if line.startswith(f"127.0.0.1:{serving['port']} "))
    down = next(line for line in lines if line.startswith(dead))
    outcomes = Counter(r.outcome.value for r in read_results(str(serving["state"] / "results.jsonl")))
    assert sum(outcomes.values()) == 6
    assert "up (idle)" in live and " 6 " in live and "0/2" in live and "1/1 up" in live, live
    short = {"inferred": "inf", "no_detection": "no_det"}
    for outcome, n in outcomes.items():
        assert f"{short.get(outcome, outcome)}={n}" in live, live
    assert "down:" in down, down
    assert live.split()[-1] == "n/a", live  # storage: the run has no retention cleaner


def test_top_once_exits_non_zero_when_no_address_answers():
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    proc = subprocess.run(imgworker_cmd("top", "--once", "--interval", "0.1", *dead),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 10, proc.stdout + proc.stderr
    assert sum(1 for line in proc.stdout.splitlines() if "down:" in line) == 2, proc.stdout
    assert proc.stderr == "imgworker: error: no address answered\n"


def test_a_down_row_shortens_its_reason():
    from imgworker.top import Row, cells, plain_table

    reason = "HTTPConnectionPool: [Errno -2] Name or service not known while resolving"
    row = Row(url="http://gpu-host-7.example:9100/metrics", up=False, error=reason)
    assert cells(row)[1] == "down: " + reason[:31] + "…"
    assert len(plain_table([row]).splitlines()[1]) < 80


ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def top_on_a_narrow_terminal(urls: list[str], columns: int, patience_s: float = 60.0) -> tuple[str, int | None]:
    """What ``imgworker top`` draws on a pseudo-terminal ``columns`` wide, until its first table is whole, and
    its exit status after a Ctrl-C (None: it had not left 30 s later, and was killed)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(imgworker_cmd("top", "--interval", "0.3", *urls), stdin=slave, stdout=slave,
                            stderr=slave, env=env)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + patience_s
    try:
        while time.monotonic() < deadline and "└" not in out.decode("utf-8", "replace"):
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    out += os.read(master, 65536)
                except OSError:
                    break
        proc.send_signal(signal.SIGINT)
        # a terminal goes on reading while top leaves: its last frame must not block on a full pty
        stop_by = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < stop_by:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    os.read(master, 65536)
                except OSError:
                    break
        try:  # the pty reads EIO as top closes it, a moment before top has exited: wait for its status
            status = proc.wait(timeout=max(0.1, stop_by - time.monotonic()))
        except subprocess.TimeoutExpired:
            status = None
        if status is None:  # a top that outlives Ctrl-C is not left behind
            proc.kill()
        reap(proc, timeout=30)  # type: ignore[arg-type]
    finally:
        os.close(master)
    return ESCAPE.sub("", out.decode("utf-8", "replace")), status


def test_top_on_an_80_column_terminal_shows_every_figure_whole(serving):
    dead = f"127.0.0.1:{free_port()}"
    screen, status = top_on_a_narrow_terminal([serving["url"], dead], 80)
    assert status == 0, f"imgworker top after Ctrl-C: status {status} (None: still running 30 s later)"
    lines = [line for part in screen.split("\n") for line in part.split("\r")]
    assert max(len(line) for line in lines) <= 80, screen
    for figure in ("done 6", "lanes busy 0/2", "endpoints 1/1 up", "storage n/a", "up (idle)"):
        assert figure in screen, screen
    down = next(line for line in lines if "down:" in line)
    assert len(down.split("down:", 1)[1]) <= 60, down  # the reason is shortened, not the whole width


METRIC = re.compile(r"\bimgworker_[a-z0-9_]+\b")
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def rule_expressions(text: str) -> list[str]:
    """Every ``expr:`` of a Prometheus rules file (one line each, or a block below ``expr: |``)."""
    exprs, lines = [], text.splitlines()
    for n, line in enumerate(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not m:
            continue
        if m.group(2) not in ("|", ">", "|-", ">-"):
            exprs.append(m.group(2))
            continue
        indent, block = len(m.group(1)), []
        for follow in lines[n + 1:]:
            if follow.strip() and len(follow) - len(follow.lstrip()) <= indent:
                break
            block.append(follow.strip())
        exprs.append(" ".join(block))
    return exprs


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        exprs.append(query.get("query", "") if isinstance(query, dict) else "")
    return exprs


def test_dashboard_and_alert_rules_name_only_metrics_a_supervisor_exports(serving):
    _, text = get(serving["url"])
    exported = {s.name for f in text_string_to_metric_families(text.decode()) for s in f.samples}
    exported |= {name.removesuffix(suffix) for name in exported for suffix in SUFFIXES if name.endswith(suffix)}
    rules_text = (ROOT / "contrib/prometheus/imgworker-rules.yml").read_text()
    rules = rule_expressions(rules_text)
    alerts = re.findall(r"^\s*- alert:\s*(\S+)", rules_text, re.M)
    assert len(rules) == len(alerts) >= 5
    dashboard = json.loads((ROOT / "contrib/grafana/imgworker.json").read_text())
    panels = dashboard_expressions(dashboard)
    named = {name for expr in rules + panels for name in METRIC.findall(expr)}
    assert named and not named - exported, sorted(named - exported)
    for needed in ("imgworker_images_total", "imgworker_queue_depth", "imgworker_backlog",
                   "imgworker_discovery_latency_seconds_bucket", "imgworker_algorithm_endpoint_healthy",
                   "imgworker_cleaner_passes_over_limit_total", "imgworker_algorithm_budget_infeasible"):
        assert any(needed in expr for expr in rules), needed  # each alert of the operator's list is there


# ----- a stalled run ----------------------------------------------------------------------------------


def test_healthz_answers_503_when_images_wait_with_lanes_free_and_no_outcome(tmp_path, store_server, creds, store,
                                                                            prefix):
    upload(store, [f"{prefix}p/t/20240101-120000.{i:03d}.jpg" for i in range(4)])
    port = free_port()
    refusing = f"http://127.0.0.1:{free_port()}/infer"  # nothing listens: every call is refused
    env = cli_env(store_server, creds, IMGWORKER_STORE_PREFIX=prefix, IMGWORKER_ALGO_ENDPOINT=refusing,
                  IMGWORKER_ALGO_RETRIES="0", IMGWORKER_ALGO_EJECT_AFTER_FAILURES="1",
                  IMGWORKER_ALGO_NO_ENDPOINT_BUDGET_S="3600", IMGWORKER_RUN_STALL_AFTER_S="1",
                  IMGWORKER_RUN_STATE_DIR=str(tmp_path / "state"))
    proc = subprocess.Popen(imgworker_cmd("run", "--workers", "2", "--metrics-port", str(port), "--no-progress"),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    seen: list[tuple[int, dict[str, Any]]] = []
    try:
        for _ in range(600):  # patience, not a timing claim: the verdict is looked at until it turns
            try:
                code, body = get(f"http://127.0.0.1:{port}/healthz")
                seen.append((code, json.loads(body)))
            except OSError:
                pass
            if seen and seen[-1][1]["status"] == "stalled" or proc.poll() is not None:
                break
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        reap(proc)
    assert seen and seen[-1][0] == 503, seen[-3:]
    health = seen[-1][1]
    assert health["status"] == "stalled" and health["waiting"] == 4 and health["done"] == 0, health


# ----- the relay: a child that dies mid-write ---------------------------------------------------------


def test_a_child_that_dies_mid_record_neither_wedges_the_relay_nor_loses_another_childs_records():
    import logging
    import pickle
    import struct

    from imgworker.children import CTX
    from imgworker.logs import LogRelay

    got: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record.getMessage())

    logger = logging.getLogger("imgworker.test_relay")
    keep = Keep()
    logger.addHandler(keep)
    relay = LogRelay()
    try:
        dying_ours, dying_theirs = CTX.Pipe(duplex=False)
        alive_ours, alive_theirs = CTX.Pipe(duplex=False)
        relay.adopt(dying_ours)
        relay.adopt(alive_ours)
        os.write(dying_theirs.fileno(), struct.pack("!i", 10_000) + b"half a record")
        dying_theirs.close()  # the child died in the middle of its record
        record = logging.LogRecord("imgworker.test_relay", logging.WARNING, __file__, 1, "from the other child",
                                   None, None)
        alive_theirs.send_bytes(pickle.dumps(record.__dict__))
        assert relay.drain(10.0)
        assert got == ["from the other child"]
        alive_theirs.close()
        assert relay.drain(10.0)  # still reading after both ends closed
    finally:
        logger.removeHandler(keep)


def test_off_a_terminal_a_record_with_newlines_and_a_traceback_is_one_line(monkeypatch):
    import io
    import logging

    from imgworker.logs import LogSettings, setup_logging

    root = logging.getLogger()
    before = (root.handlers[:], root.level)
    stream = io.StringIO()  # not a terminal, like journald or a pipe
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        setup_logging(LogSettings(level="INFO"))
        log = logging.getLogger("imgworker.test_one_line")
        log.warning("a key with a newline: %s", "p/t/a\nb.jpg")
        try:
            raise ValueError("first line\nsecond line")
        except ValueError:
            log.exception("it failed")
    finally:
        root.handlers[:], _ = before
        root.setLevel(before[1])
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and all(RECORD.match(line) for line in lines), lines
    assert "p/t/a\\nb.jpg" in lines[0]
    assert "Traceback" in lines[1] and "ValueError: first line\\nsecond line" in lines[1]


def test_top_on_a_terminal_without_rich_says_which_extra_to_install(tmp_path):
    shadow = tmp_path / "no-rich" / "rich"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('rich is not installed here')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMGWORKER_", "AWS_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(shadow.parent), str(ROOT)])
    code, screen = on_a_terminal(["top", f"127.0.0.1:{free_port()}"], env, patience_s=60)
    assert code != 0, screen
    assert "pip install 'imgworker[top]'" in screen and "Traceback" not in screen, screen
