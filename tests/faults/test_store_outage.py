"""The store goes away mid-run (the embedded SeaweedFS is stopped, then started on the same data)."""

from __future__ import annotations

import json
import time

import msgspec
import pytest

from imgworker.config import load_config
from imgworker.results import read_results
from imgworker.services.algo_server import AlgoService, SyntheticParams
from imgworker.services.store_server import EmbeddedStore
from imgworker.store import Store
from tests.support.cli import cli_env, reap, start_run
from tests.support.results import read_outcomes
from tests.support.store import upload

pytestmark = pytest.mark.timeout(240)


@pytest.fixture()
def own_store(tmp_path, creds):
    server = EmbeddedStore(str(tmp_path / "weed"), creds, bucket="outage")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def algo():
    with AlgoService("synthetic", SyntheticParams(latency_ms=100.0, sigma=0.0)) as service:
        yield service


OUTAGE_S = 6.0
MARGIN_S = 2.5  # stop() returning -> a worker's next existence check begins (an in-flight item ends first)


def test_outage_mid_run_loses_nothing(tmp_path, own_store, creds, algo):
    cfg = load_config(env={}, overrides={"store": {"endpoint": own_store.endpoint, "bucket": "outage"},
                                         "run": {"state_dir": str(tmp_path / "s")}})
    keys = [f"p/t/20240101-120000.{i:03d}.jpg" for i in range(60)]
    upload(Store(cfg.store, creds), keys)
    env = cli_env(own_store, creds, IMGWORKER_ALGO_ENDPOINT=algo.endpoint, IMGWORKER_RUN_STATE_DIR=str(tmp_path / "s"),
                  IMGWORKER_WORKER_STORE_RETRY_BUDGET_S="60")
    report_path = tmp_path / "r.json"
    proc = start_run(env, "run", "--workers", "2", "--until-idle", "--no-progress", "--report-json", str(report_path),
                     log_path=str(tmp_path / "log"))
    try:
        deadline = time.monotonic() + 60
        while not read_outcomes_safe(cfg) and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "log").read_text()[-3000:]
            time.sleep(0.05)
        done_at_stop = len(read_outcomes_safe(cfg))
        own_store.stop()
        down_since = time.monotonic()
        time.sleep(OUTAGE_S)
        assert proc.poll() is None, "the run must not end while the store is down"
        done_during_outage = len(read_outcomes_safe(cfg))
        down_for = time.monotonic() - down_since  # the store was down at least this long
        own_store.start()
        assert reap(proc, 150) == 0, (tmp_path / "log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            reap(proc, 1)
    report = json.loads(report_path.read_text())
    outcomes = read_outcomes(cfg)
    results = list(read_results(cfg.results_path))
    assert sorted(outcomes) == sorted(keys)
    assert all(len(v) == 1 for v in outcomes.values())
    not_analysed = [r for r in results if r.outcome.value not in ("inferred", "no_detection")]
    assert not not_analysed, f"images the outage cost (not inferred/no_detection): {not_analysed}"
    assert report["outcomes"]["failed_store"] == 0 and report["failures"] == 0
    assert report["conserved"] and report["scanned"] == 60
    # images were still queued when the store went away, and the outage held them up
    assert 0 < done_at_stop < 60 and done_during_outage < 60 and down_for >= OUTAGE_S
    # a worker waited through the outage, retrying rather than failing: in its existence check, or in
    # reading the image back after the service could not fetch it (which of the two depends on where
    # in its work the outage found it)
    longest_stat = max(r.stat_ms or 0.0 for r in results)
    longest_e2e = max(r.e2e_ms or 0.0 for r in results)
    assert longest_e2e >= (down_for - MARGIN_S) * 1000, (longest_stat, longest_e2e, down_for)
    assert longest_e2e >= longest_stat
    log_text = (tmp_path / "log").read_text()
    assert "store unreachable" in log_text or "scan failed" in log_text


def test_outage_beyond_budget_ends_as_failed_store(tmp_path, own_store, creds, algo):
    cfg = load_config(env={}, overrides={"store": {"endpoint": own_store.endpoint, "bucket": "outage"},
                                         "run": {"state_dir": str(tmp_path / "s")},
                                         "worker": {"count": 1, "store_retry_budget_s": 0.5}})
    cfg = msgspec.structs.replace(cfg, credentials=creds)
    keys = [f"p/t/20240101-120000.{i:03d}.jpg" for i in range(3)]
    upload(Store(cfg.store, creds), keys)
    from imgworker.supervisor import Supervisor

    sup = Supervisor(cfg, show_progress=False)
    with sup.running(drain=False):
        while sup.dispatch.pending < 3:
            sup.intake_step()
        own_store.stop()
        sup.step_until(lambda: sup.stats.finished >= 3, timeout_s=60)  # the report below says what ended
    report = sup.report()
    assert report.outcomes["failed_store"] == 3 and report.conserved
    assert {r[0] for r in read_outcomes(cfg).values()} == {"failed_store"}


def read_outcomes_safe(cfg):
    try:
        return read_outcomes(cfg)
    except FileNotFoundError:
        return {}
