"""The retention scenario: the real pipeline, the embedded store, the synthetic service and
cameras, with time compressed, run once per protection policy under the same seed and load.

Time compression ``C``: algorithm latency is divided by C, camera rates multiplied by C, phase
durations divided by C. Counts (images per directory, backlog) are unchanged, so loss figures
are comparable with an uncompressed run.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec

from .config import Config, Credentials, load_config
from .outcomes import Outcome
from .results import read_results
from .scanner import captured_at
from .services.algo_server import AlgoService, SyntheticParams
from .services.loadgen import Cameras, generated_frames
from .services.store_server import EmbeddedStore
from .store import Store
from .supervisor import Supervisor

log = logging.getLogger(__name__)


class Phase(msgspec.Struct, frozen=True, array_like=True):
    rate_per_s: float  # uncompressed
    duration_s: float  # uncompressed


class ScenarioParams(msgspec.Struct, frozen=True, kw_only=True):
    """Defaults mimic the origin report: 197 ms mean latency, cameras faster than the workers for a while."""

    compression: float = 2.0
    algo_latency_ms: float = 197.0
    algo_sigma: float = 0.5
    workers: int = 4
    task_dirs: int = 4
    phases: tuple[Phase, ...] = (Phase(30.0, 40.0), Phase(10.0, 40.0))
    max_count: int = 108
    external_max_age_s: float = 12.0  # uncompressed, for the external-cleaner rows
    seed: int = 1

    def quick(self) -> ScenarioParams:
        """A quarter of the load: same shape, same ordering, about a minute and a half.

        Retention is set for the backlog a short run really builds (worker start-up weighs more in it).
        """
        phases = tuple(Phase(p.rate_per_s, p.duration_s / 4) for p in self.phases)
        return msgspec.structs.replace(self, phases=phases, max_count=27,
                                       external_max_age_s=self.external_max_age_s / 4)


class Row(msgspec.Struct, frozen=True, kw_only=True):
    """One policy under one load: what came in, what became of it, what storage it took."""

    policy: str
    check: bool
    expiry_aware: bool
    order: str
    produced: int
    scanned: int
    never_seen: int
    outcomes: dict[str, int]
    failures: int
    failure_rate_per_success: float
    failure_rate: float
    coverage: float
    wasted_algo_s: float
    cleanup_losses: int
    deleted: int
    given_up: int
    peak_objects: int
    peak_bytes: int
    storage_limit: int
    storage_limit_held: bool
    conserved: bool
    wall_s: float


class RowSpec(msgspec.Struct, frozen=True, array_like=True):
    policy: str
    check: bool
    aware: bool = False
    order: str = "oldest_first"


ROWS: tuple[RowSpec, ...] = (
    RowSpec("none", False),
    RowSpec("inflight", False),
    RowSpec("inflight", True),
    RowSpec("queued", True),
    RowSpec("lease", True),
    RowSpec("external", True),
    RowSpec("external", True, aware=True),
    RowSpec("external", True, aware=True, order="newest_first"),
)


class Camera(threading.Thread):
    """Uploads on the phase schedule (compressed) from a thread; counts what it produced."""

    def __init__(self, store: Store, prefix: str, params: ScenarioParams) -> None:
        super().__init__(daemon=True, name="scenario-camera")
        self.store = store
        self.cameras = Cameras(prefix, ["person"], params.task_dirs)
        self.params = params
        self.frames = generated_frames(16, params.seed, size=(120, 160))
        self.produced = 0
        self.failed = 0

    def run(self) -> None:
        c = self.params.compression
        for phase in self.params.phases:
            start, rate, duration = time.monotonic(), phase.rate_per_s * c, phase.duration_s / c
            sent = 0
            while time.monotonic() - start < duration:
                due = start + sent / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self._put(self.frames[(self.produced + self.failed) % len(self.frames)])
                sent += 1

    def _put(self, data: bytes) -> None:
        try:
            self.store.put(self.cameras.next_key(time.time()), data)
            self.produced += 1
        except Exception:  # an upload the store refused is not an image that entered the system
            self.failed += 1


class ExternalCleaner(threading.Thread):
    """A cleaner that is not imgworker's: deletes images older than max_age, as a lifecycle rule would."""

    def __init__(self, store: Store, prefix: str, max_age_s: float, stop: threading.Event) -> None:
        super().__init__(daemon=True, name="scenario-external-cleaner")
        self.store, self.prefix, self.max_age_s, self.stop_event = store, prefix, max_age_s, stop
        self.deleted = 0
        self.peak_objects = 0
        self.peak_bytes = 0

    def run(self) -> None:
        while not self.stop_event.wait(0.1):
            refs = [r for page in self.store.list_pages(self.prefix, 1000) for r in page]
            cutoff = time.time() - self.max_age_s
            old = {r.key for r in refs if (captured_at(r.key) or r.mtime) < cutoff}
            if old:
                self.deleted += len(old) - len(self.store.delete(sorted(old)))
            self.peak_objects = max(self.peak_objects, len(refs) - len(old))
            self.peak_bytes = max(self.peak_bytes, sum(r.size for r in refs if r.key not in old))


def _row_config(base: Config, params: ScenarioParams, spec: RowSpec, prefix: str) -> Config:
    c = params.compression
    policy, check, aware = spec.policy, spec.check, spec.aware
    retention: dict[str, object] = {"enabled": True, "max_count": params.max_count, "protect": policy}
    if policy == "external":  # imgworker's cleaner is off; it only knows (or not) what the other one does
        retention = {"enabled": False, "external_max_age_s": params.external_max_age_s / c if aware else 0.0}
    overrides = {
        "store": msgspec.structs.asdict(base.store) | {"prefix": prefix},
        "algo": msgspec.structs.asdict(base.algo),
        "worker": {"count": params.workers, "threads": 1, "stat_check": check, "max_attempts": 3},
        "dispatch": {"order": spec.order},
        "scan": {"interval_s": 0.25 / c * 2},
        "retention": retention,
        "run": {"state_dir": os.path.join(base.run.state_dir, prefix.strip("/")), "until_idle": True, "grace_s": 30.0,
                "checkpoint_interval_s": 2.0},
    }
    return msgspec.structs.replace(load_config(env={}, overrides=overrides), credentials=base.credentials)


def run_row(base: Config, params: ScenarioParams, spec: RowSpec,
            progress: Callable[[str], None] = lambda _: None,
            on_supervisor: Callable[[int, Any], None] = lambda _i, _s: None) -> Row:
    """One row, with its own algorithm service so every row sees the same latency sequence."""
    synthetic = SyntheticParams(latency_ms=params.algo_latency_ms / params.compression, sigma=params.algo_sigma,
                                detection_rate=0.3, seed=params.seed)
    with AlgoService("synthetic", synthetic) as algo:
        algo_cfg = msgspec.structs.replace(base.algo, endpoint=algo.endpoint)
        return _run_row(msgspec.structs.replace(base, algo=algo_cfg), params, spec, progress, on_supervisor)


def _run_row(base: Config, params: ScenarioParams, spec: RowSpec, progress: Callable[[str], None],
             on_supervisor: Callable[[int, Any], None]) -> Row:
    policy, check, aware = spec.policy, spec.check, spec.aware
    prefix = f"scn-{policy}-{secrets.token_hex(4)}/"
    cfg = _row_config(base, params, spec, prefix)
    store = Store(cfg.store, cfg.credentials)
    camera = Camera(store, prefix, params)
    stop = threading.Event()
    external = ExternalCleaner(store, prefix, params.external_max_age_s / params.compression, stop)
    supervisor = Supervisor(cfg, intake_done=lambda: not camera.is_alive(), show_progress=False)
    on_supervisor(0, supervisor)
    started = time.monotonic()
    camera.start()
    if policy == "external":
        external.start()
    try:
        report = supervisor.run()
    finally:
        stop.set()
        camera.join()
        if external.is_alive():
            external.join()
    results = list(read_results(cfg.results_path))
    wasted = sum((r.algo_ms or 0.0) for r in results if r.outcome is Outcome.FAILED_MISSING) / 1000.0
    o = report.outcomes
    successes = o["inferred"] + o["no_detection"]
    cleaner = report.cleaner or {}
    limit = params.max_count * params.task_dirs
    peak = cleaner.get("peak_objects", 0) if policy != "external" else external.peak_objects
    row = Row(
        policy=policy, check=check, expiry_aware=aware, order=spec.order, produced=camera.produced, scanned=report.scanned,
        never_seen=camera.produced - report.scanned, outcomes=o, failures=report.failures,
        failure_rate_per_success=report.failure_rate_per_success, failure_rate=report.failure_rate,
        coverage=round(successes / camera.produced, 4) if camera.produced else 0.0,
        wasted_algo_s=round(wasted, 3),
        cleanup_losses=o["failed_missing"] + o["skipped_missing"] + (camera.produced - report.scanned),
        deleted=cleaner.get("deleted", external.deleted), given_up=o["dropped_expired"],
        peak_objects=peak, peak_bytes=cleaner.get("peak_bytes", external.peak_bytes),
        storage_limit=limit if policy != "external" else 0,
        storage_limit_held=peak <= limit if policy != "external" else True,
        conserved=report.conserved, wall_s=round(time.monotonic() - started, 2),
    )
    progress(f"{policy:9s} check={'on ' if check else 'off'} aware={'on ' if aware else 'off'} {spec.order}: "
             f"failure rate {row.failure_rate:.2%}, coverage {row.coverage:.2%}, lost {row.cleanup_losses}, "
             f"peak {row.peak_objects}/{row.storage_limit or '-'}")
    return row


def run_scenario(params: ScenarioParams, *, rows: tuple[RowSpec, ...] = ROWS,
                 progress: Callable[[str], None] = print,
                 on_supervisor: Callable[[int, Any], None] = lambda _i, _s: None) -> list[Row]:
    """Start the embedded store and the synthetic service, run every row, stop everything."""
    workdir = tempfile.mkdtemp(prefix="imgworker-scenario-")
    creds = Credentials(access_key="scn-" + secrets.token_hex(4), secret_key=secrets.token_urlsafe(24))
    try:
        with EmbeddedStore(os.path.join(workdir, "store"), creds, bucket="scenario") as server:
            base = load_config(env={}, overrides={
                "store": {"endpoint": server.endpoint, "bucket": "scenario"},
                "algo": {"timeout_s": 30.0, "retries": 1},
                "run": {"state_dir": os.path.join(workdir, "state")},
            })
            base = msgspec.structs.replace(base, credentials=creds)
            return [run_row(base, params, spec, progress, on_supervisor) for spec in rows]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def markdown_table(rows: list[Row], params: ScenarioParams) -> str:
    head = ("| policy | check | aware | order | produced | scanned | never seen | inferred | no_det | skipped_missing "
            "| failed_missing | failed_algo | dropped_expired | fail/success | fail/attempted | coverage "
            "| wasted algo s | peak objects | limit | held | deleted |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        o = r.outcomes
        lines.append(
            f"| {r.policy} | {'on' if r.check else 'off'} | {'on' if r.expiry_aware else 'off'} "
            f"| {r.order.replace('_first', '')} | {r.produced} "
            f"| {r.scanned} | {r.never_seen} | {o['inferred']} | {o['no_detection']} | {o['skipped_missing']} "
            f"| {o['failed_missing']} | {o['failed_algo']} | {o['dropped_expired']} "
            f"| {r.failure_rate_per_success:.2%} | {r.failure_rate:.2%} | {r.coverage:.2%} | {r.wasted_algo_s:.2f} "
            f"| {r.peak_objects} | {r.storage_limit or '-'} | {'yes' if r.storage_limit_held else 'NO'} "
            f"| {r.deleted} |"
        )
    c = params.compression
    phases = ", ".join(f"{p.rate_per_s:g} img/s for {p.duration_s:g} s" for p in params.phases)
    lines += [
        "",
        f"Parameters (uncompressed): {params.workers} workers, lognormal algorithm latency mean "
        f"{params.algo_latency_ms:g} ms (sigma {params.algo_sigma}), cameras {phases} over {params.task_dirs} task "
        f"directories, retention max_count {params.max_count} per directory (limit {params.max_count * params.task_dirs}"
        f" objects), external cleaner max age {params.external_max_age_s:g} s. Time compression x{c:g}.",
    ]
    return "\n".join(lines)
