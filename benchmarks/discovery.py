"""Finding new images in a large bucket: change events against re-listing.

    python -m benchmarks.discovery [--retained 100000] [--rate 30] [--duration 30] [--idle-s 20] [--quick] [--out DIR]

One embedded SeaweedFS store and one synthetic algorithm service (fixed latency, default 50 ms).
The bucket is pre-filled with ``--retained`` tiny objects under ``cam/<type>/<id>/<YYYYMMDD-HHMMSS.mmm>.jpg``
(several threads, each with its own ``Store``), and a state directory is written the way imgworker
would have left it after analysing all of them (``ProcessedSet.add_many`` then ``save``, results
offset 0, no results file), so no run analyses them again.

Then, for each mode (``events``: the SeaweedFS filer's metadata tail, a full reconciliation listing
every 10 s; ``events-incremental``: the same, reconciliation from per-directory checkpoints;
``listing``: a full listing every ``interval_s`` = 1 s), on a fresh copy of that
state directory, the real Supervisor with 8 worker processes runs in this process, driven step by
step as ``imgworker tune`` does:

- start-up: the first (full) listing completes and the workers are started and quiet;
- phase A, idle (``--idle-s``): nothing is uploaded. CPU time (user + system) of this process,
  which is the supervisor alone (the uploader is a separate process), and separately of the intake
  children: the lister process, the watcher process and its ``weed filer.meta.tail`` tool; the
  ledger Manager and the store are reported beside them. As % of one core over the window;
- phase B, load (``--duration``): an uploader process puts ``--rate`` new images per second, round
  robin over the task directories, and records when each put completed (wall clock). Discovery
  latency is read from the report (``p50_discovery_ms``/``p99_discovery_ms``: object mtime or event
  time to dispatch) and measured independently: put completion to the worker's ``started_at``
  (the ``on_result`` callback); supervisor CPU % over the upload window;
- drain: until every uploaded image has its outcome, then a normal stop. ``uploaded`` and
  ``analysed`` (uploaded keys with exactly one result) are recorded; the images uploaded are deleted
  again so the next mode sees the same bucket.

``--quick``: 2,000 retained, 5 s of load, 3 s idle. Outputs ``discovery.json``, ``discovery.md``
and ``discovery.png`` in ``--out`` (default benchmarks/results; ``--name`` changes the stem).
Everything shares one machine: compare the modes within one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import msgspec
import psutil

from imgworker.children import CTX, die_with_parent
from imgworker.config import Config, Credentials, StoreConfig, load_config
from imgworker.ledger import ProcessedSet
from imgworker.outcomes import Result
from imgworker.services.algo_server import AlgoService, SyntheticParams
from imgworker.services.store_server import EmbeddedStore
from imgworker.store import Store
from imgworker.supervisor import Supervisor

from ._common import RESULTS, write_results

log = logging.getLogger("benchmarks.discovery")

BUCKET = "discovery"
PREFIX = "cam/"
TASK_TYPES = ("person", "vehicle", "face", "fire")
BODY = b"\xff\xd8\xff\xe0" + b"\x00" * 28  # tiny: the synthetic service fetches it but does not decode it
MODES = ("events", "events-incremental", "listing")
_PREFILL_EPOCH = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


class Params(msgspec.Struct, frozen=True, kw_only=True):
    retained: int
    rate: float
    duration_s: float
    idle_s: float
    workers: int = 8
    latency_ms: float = 50.0
    directories: int = 100
    listing_interval_s: float = 1.0
    reconcile_interval_s: float = 10.0  # short, so reconciliations fall inside the measured windows
    prefill_threads: int = 16
    quick: bool = False


# ----- keys ----------------------------------------------------------------------------------


def directories(count: int) -> list[str]:
    """``cam/<type>/<id>/``: task types in turn, ids numbered within each type."""
    return [f"{PREFIX}{TASK_TYPES[i % len(TASK_TYPES)]}/cam-{i // len(TASK_TYPES):03d}/" for i in range(count)]


def stamp(epoch_s: float) -> str:
    """``YYYYMMDD-HHMMSS.mmm`` (UTC)."""
    when = dt.datetime.fromtimestamp(epoch_s, dt.timezone.utc)
    return when.strftime("%Y%m%d-%H%M%S") + f".{when.microsecond // 1000:03d}"


def retained_keys(count: int, dirs: Sequence[str]) -> list[str]:
    """Old images (2024), one per second of camera time within each directory; all sort before new ones."""
    base = _PREFILL_EPOCH.timestamp()
    return [f"{dirs[i % len(dirs)]}{stamp(base + i // len(dirs))}.jpg" for i in range(count)]


def upload_key(directory: str, now: float, last_ms: dict[str, int]) -> str:
    """A new image named by the time of its upload; unique within its directory."""
    ms = max(int(now * 1000), last_ms.get(directory, 0) + 1)
    last_ms[directory] = ms
    return f"{directory}{stamp(ms / 1000)}.jpg"


# ----- pre-fill --------------------------------------------------------------------------------


def prefill(store_cfg: StoreConfig, creds: Credentials, keys: Sequence[str], threads: int) -> float:
    """Upload ``keys`` with ``threads`` threads, each with its own Store; the seconds it took."""
    chunks = [keys[i::threads] for i in range(threads)]
    errors: list[BaseException] = []

    def upload(chunk: Sequence[str]) -> None:
        store = Store(store_cfg, creds, pool_size=2)
        try:
            for key in chunk:
                store.put(key, BODY)
        except BaseException as exc:  # noqa: BLE001 (reported below, in the main thread)
            errors.append(exc)

    t = time.perf_counter()
    workers = [threading.Thread(target=upload, args=(chunk,), daemon=True) for chunk in chunks]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise RuntimeError(f"pre-fill failed: {errors[0]!r}")
    return time.perf_counter() - t


def write_state(state_dir: str, keys: Sequence[str]) -> None:
    """The state imgworker leaves once every key has its outcome (no results file: offset 0)."""
    os.makedirs(state_dir, exist_ok=True)
    processed = ProcessedSet()
    for start in range(0, len(keys), 10_000):
        processed.add_many(list(keys[start : start + 10_000]))
    processed.save(os.path.join(state_dir, "state.json"), results_offset=0, pending=[])


# ----- the uploader process -------------------------------------------------------------------


def uploader_main(store_cfg: StoreConfig, creds: Credentials, conn: Connection, dirs: list[str], rate: float,
                  duration_s: float) -> None:
    """Say ready, wait for "go", put ``rate`` images a second for ``duration_s``, send back when each put ended."""
    die_with_parent(signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the benchmark process stops it
    store = Store(store_cfg, creds, pool_size=8)
    store.put("warmup/uploader.txt", b"x", content_type="text/plain")  # outside the prefix: never listed
    conn.send("ready")
    if conn.recv() != "go":
        return
    count = max(1, round(rate * duration_s))
    last_ms: dict[str, int] = {}

    def put(key: str) -> tuple[str, float, str]:
        try:
            store.put(key, BODY)
            return key, time.time(), ""
        except Exception as exc:  # noqa: BLE001 (counted: an image that was never uploaded)
            return key, time.time(), repr(exc)

    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:  # a slow put does not hold up the schedule
        futures = []
        for i in range(count):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(put, upload_key(dirs[i % len(dirs)], time.time(), last_ms)))
        records = [f.result() for f in futures]
    conn.send({"records": records, "elapsed_s": time.monotonic() - t0})


class Uploader:
    """The handle on the uploader process; always stopped and reaped."""

    def __init__(self, cfg: Config, dirs: list[str], rate: float, duration_s: float) -> None:
        ours, theirs = CTX.Pipe(duplex=True)
        self.conn = ours
        self.process = CTX.Process(target=uploader_main, name="discovery-uploader", daemon=True,
                                   args=(cfg.store, cfg.credentials, theirs, dirs, rate, duration_s))
        self.process.start()
        theirs.close()
        self.ready = False
        self.reply: dict[str, Any] | None = None

    def poll(self) -> None:
        """Read what it sent, if anything; fail if it died before its reply."""
        while self.reply is None and self.conn.poll():
            message = self.conn.recv()
            if message == "ready":
                self.ready = True
            else:
                self.reply = message
        if self.reply is None and not self.process.is_alive():
            raise RuntimeError(f"the uploader exited (code {self.process.exitcode}) before it finished")

    def go(self) -> None:
        self.conn.send("go")

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


# ----- CPU time by process role -----------------------------------------------------------------

ROLES = ("supervisor", "lister", "watcher", "watcher_tool", "ledger", "workers", "store", "algo", "uploader", "other")
INTAKE = ("lister", "watcher", "watcher_tool")


def _role(proc: psutil.Process, uploader_pid: int) -> str:
    if proc.pid == uploader_pid:
        return "uploader"
    line = " ".join(proc.cmdline())
    for needle, role in (("filer.meta.tail", "watcher_tool"), ("imgworker: watcher", "watcher"),
                         ("imgworker: scanner", "lister"), ("imgworker: ledger", "ledger"),
                         ("imgworker: worker", "workers"), ("algo-serve", "algo")):
        if needle in line:
            return role
    return "store" if "weed" in os.path.basename(proc.cmdline()[0] if proc.cmdline() else "") else "other"


Sample = dict[int, tuple[str, float]]


def sample_cpu(uploader_pid: int) -> Sample:
    """User + system CPU seconds of this process (the supervisor, children excluded) and of each descendant."""
    me = psutil.Process()
    t = me.cpu_times()
    out: Sample = {me.pid: ("supervisor", t.user + t.system)}
    machine = psutil.cpu_times()
    out[-1] = ("machine", sum(machine) - machine.idle - getattr(machine, "iowait", 0.0))
    for proc in me.children(recursive=True):
        try:
            role = _role(proc, uploader_pid)
            t = proc.cpu_times()
        except psutil.Error:
            continue
        out[proc.pid] = (role, t.user + t.system)
    return out


def cpu_percent(before: Sample, after: Sample, wall_s: float) -> dict[str, float]:
    """% of one core per role over the window; a process started inside it counts from zero.

    ``machine`` is every core's busy time (up to 100 x cores), ``outside_this_run`` what processes
    that are not this benchmark's used of it.
    """
    seconds = dict.fromkeys((*ROLES, "machine"), 0.0)
    for pid, (role, cpu) in after.items():
        start = before.get(pid)
        seconds[role] += cpu - (start[1] if start is not None else 0.0)
    out = {role: round(100.0 * s / wall_s, 2) if wall_s > 0 else 0.0 for role, s in seconds.items()}
    out["intake"] = round(sum(out[r] for r in INTAKE), 2)
    # Busy CPU of the whole machine, and what processes outside this benchmark used (noise).
    out["outside_this_run"] = round(max(0.0, out["machine"] - sum(out[r] for r in ROLES)), 2)
    return out


# ----- one mode --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank (the same rule as imgworker's LogHistogram, without its buckets)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(1, math.ceil(len(ordered) * q / 100.0)) - 1]


class Driver:
    """Steps the supervisor and notes every completed sweep's duration."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.sweeps: list[float] = []
        self._seen = sup.intake.scans_completed

    def _note_sweeps(self) -> None:
        done = self.sup.intake.scans_completed
        if done != self._seen:
            self.sweeps.extend([self.sup.intake.last_scan_s] * (done - self._seen))
            self._seen = done

    def until(self, condition: Callable[[], bool], cap_s: float, what: str, *, required: bool = True) -> float:
        """Step until ``condition``; past ``cap_s`` raise (or, not ``required``, log and return)."""
        t0 = time.monotonic()
        if not self._step_until(condition, cap_s):
            if required:
                raise RuntimeError(f"{what}: not reached within {cap_s:.0f} s")
            log.warning("%s: not reached within %.0f s; going on", what, cap_s)
        return time.monotonic() - t0

    def for_seconds(self, seconds: float) -> float:
        t0 = time.monotonic()
        self._step_until(lambda: False, seconds)
        return time.monotonic() - t0

    def _step_until(self, condition: Callable[[], bool], cap_s: float) -> bool:
        def noted() -> bool:
            self._note_sweeps()
            return condition()

        return self.sup.step_until(noted, timeout_s=cap_s)


def workers_quiet(driver: Driver, uploader_pid: int, *, window_s: float = 0.5, cap_s: float = 120.0) -> float:
    """Step until the worker processes (started with the supervisor) stop using CPU: their start-up is over."""
    t0 = time.monotonic()
    previous = sample_cpu(uploader_pid)
    while time.monotonic() - t0 < cap_s:
        driver.for_seconds(window_s)
        current = sample_cpu(uploader_pid)
        used = cpu_percent(previous, current, window_s)["workers"] / 100.0 * window_s
        previous = current
        if used < 0.02 and time.monotonic() - t0 >= 1.0:
            break
    return time.monotonic() - t0


def mode_config(base: Config, mode: str, state_dir: str, server: EmbeddedStore, params: Params) -> Config:
    scan: dict[str, Any] = {"mode": "events" if mode.startswith("events") else mode}
    if mode.startswith("events"):
        scan.update(events={"source": "seaweed", "filer": server.filer_address},
                    reconcile_interval_s=params.reconcile_interval_s,
                    reconcile="incremental" if mode == "events-incremental" else "full")
    else:
        scan.update(interval_s=params.listing_interval_s)
    cfg = load_config(env={}, overrides={
        "store": {"endpoint": base.store.endpoint, "bucket": base.store.bucket, "prefix": PREFIX},
        "algo": {"endpoint": base.algo.endpoint, "timeout_s": 30.0},
        "worker": {"count": params.workers, "threads": 1},
        "scan": scan,
        "run": {"state_dir": state_dir, "grace_s": 30.0},
    })
    return msgspec.structs.replace(cfg, credentials=base.credentials)


def run_mode(mode: str, base: Config, server: EmbeddedStore, pristine_state: str, workdir: str, dirs: list[str],
             params: Params, progress: Callable[[str], None]) -> tuple[dict[str, Any], list[str]]:
    """One mode on a fresh copy of the pre-filled state; its figures and the keys it uploaded."""
    state_dir = os.path.join(workdir, f"state-{mode}")
    shutil.copytree(pristine_state, state_dir)
    cfg = mode_config(base, mode, state_dir, server, params)
    results: dict[str, list[Result]] = {}

    def record(result: Result) -> None:
        results.setdefault(result.key, []).append(result)

    uploader = Uploader(cfg, dirs, params.rate, params.duration_s)
    try:
        sup = Supervisor(cfg, show_progress=False, on_result=record)
        t_start = time.monotonic()
        with sup.running():  # drained at the end, forced on an error, always shut down
            figures = _phases(mode, sup, uploader, results, params, progress, t_start)
        report = sup.report()
    finally:
        uploader.stop()
    uploaded = figures.pop("_uploaded")
    figures.update(_outcomes(uploaded, results))
    figures.update(report_p50_discovery_ms=report.p50_discovery_ms, report_p99_discovery_ms=report.p99_discovery_ms,
                   report=msgspec.to_builtins(report))
    return figures, list(uploaded)


def _phases(mode: str, sup: Supervisor, uploader: Uploader, results: dict[str, list[Result]], params: Params,
            progress: Callable[[str], None], t_start: float) -> dict[str, Any]:
    driver = Driver(sup)
    pid = uploader.process.pid or 0
    driver.until(lambda: sup.intake.scans_completed >= 1, 900.0, "the first listing")
    first_sweep_s, first_listed, startup_s = sup.intake.last_scan_s, sup.intake.peak_listed, time.monotonic() - t_start
    settle_s = workers_quiet(driver, pid)

    def uploader_ready() -> bool:
        uploader.poll()
        return uploader.ready

    driver.until(uploader_ready, 120.0, "the uploader start-up")
    progress(f"discovery: {mode}: started in {startup_s:.1f} s (first listing {first_sweep_s:.1f} s, "
             f"{first_listed:,} objects), workers quiet after {settle_s:.1f} s more")

    # Phase A: idle
    sweeps0 = len(driver.sweeps)
    before, t0 = sample_cpu(pid), time.monotonic()
    driver.for_seconds(params.idle_s)
    idle_wall = time.monotonic() - t0
    idle = cpu_percent(before, sample_cpu(pid), idle_wall)
    idle_sweeps = driver.sweeps[sweeps0:]
    progress(f"discovery: {mode}: idle {idle_wall:.1f} s: supervisor {idle['supervisor']:.1f} % CPU, "
             f"lister/watcher {idle['intake']:.1f} %, ledger {idle['ledger']:.1f} %, store {idle['store']:.1f} %")

    # Phase B: load
    sweeps0 = len(driver.sweeps)
    before, t0 = sample_cpu(pid), time.monotonic()
    uploader.go()

    def uploaded_all() -> bool:
        uploader.poll()
        return uploader.reply is not None

    driver.until(uploaded_all, params.duration_s * 3 + 120.0, "the uploads")
    load_wall = time.monotonic() - t0
    load = cpu_percent(before, sample_cpu(pid), load_wall)
    load_sweeps = driver.sweeps[sweeps0:]
    assert uploader.reply is not None
    records = [(str(key), float(done), str(error)) for key, done, error in uploader.reply["records"]]
    put_errors = [r for r in records if r[2]]
    uploaded = {key: done for key, done, error in records if not error}

    # Drain: every uploaded image gets its outcome (a listing may need a full sweep or two more)
    slowest = max(driver.sweeps, default=first_sweep_s)
    drain_s = driver.until(lambda: all(k in results for k in uploaded), 60.0 + 3 * (slowest + params.listing_interval_s),
                           "every uploaded image analysed", required=False)  # what is missing is counted
    done = sum(1 for k in uploaded if k in results)
    progress(f"discovery: {mode}: {len(uploaded)} uploaded in {uploader.reply['elapsed_s']:.1f} s, {done} with an "
             f"outcome {drain_s:.1f} s after the last put; supervisor {load['supervisor']:.1f} % CPU under load")
    latencies = [(rs[0].started_at - uploaded[k]) * 1000.0 for k, rs in results.items()
                 if k in uploaded and rs[0].started_at > 0]  # 0: no worker started it (none expected)
    return {
        "mode": mode, "retained": params.retained, "rate": params.rate,
        "_uploaded": uploaded,
        "put_errors": len(put_errors),
        "upload_elapsed_s": round(uploader.reply["elapsed_s"], 3),
        "put_to_start_p50_ms": round(percentile(latencies, 50), 2),
        "put_to_start_p99_ms": round(percentile(latencies, 99), 2),
        "put_to_start_max_ms": round(max(latencies, default=0.0), 2),
        "put_to_start_min_ms": round(min(latencies, default=0.0), 2),
        "supervisor_cpu_idle_pct": idle["supervisor"], "supervisor_cpu_load_pct": load["supervisor"],
        "intake_cpu_idle_pct": idle["intake"], "intake_cpu_load_pct": load["intake"],
        "cpu_idle_pct": idle, "cpu_load_pct": load,
        "idle_s": round(idle_wall, 2), "load_s": round(load_wall, 2), "drain_s": round(drain_s, 2),
        "sweeps_idle": len(idle_sweeps), "sweeps_load": len(load_sweeps),
        "sweep_mean_s": round(sum(driver.sweeps) / len(driver.sweeps), 3) if driver.sweeps else 0.0,
        "first_sweep_s": round(first_sweep_s, 3), "first_sweep_listed": first_listed,
        "startup_s": round(startup_s, 2), "settle_s": round(settle_s, 2),
        "events_received": getattr(sup.intake, "events_received", 0),
        "latencies_ms": [round(v, 2) for v in sorted(latencies)],
    }


def _outcomes(uploaded: dict[str, float], results: dict[str, list[Result]]) -> dict[str, Any]:
    """Every uploaded image has exactly one outcome, and nothing else got one."""
    outcomes: dict[str, int] = {}
    for rs in results.values():
        for r in rs:
            outcomes[r.outcome.value] = outcomes.get(r.outcome.value, 0) + 1
    return {
        "uploaded": len(uploaded),
        "analysed": sum(1 for k in uploaded if len(results.get(k, ())) == 1),
        "missing": sum(1 for k in uploaded if k not in results),
        "duplicates": sum(1 for rs in results.values() if len(rs) > 1),
        "unexpected": sum(1 for k in results if k not in uploaded),
        "results": sum(len(rs) for rs in results.values()),
        "outcomes": outcomes,
    }


# ----- the whole run ---------------------------------------------------------------------------


def run(params: Params, progress: Callable[[str], None] = print) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="imgworker-discovery-")
    creds = Credentials(access_key="disc-" + secrets.token_hex(4), secret_key=secrets.token_urlsafe(24))
    try:
        with EmbeddedStore(os.path.join(workdir, "store"), creds, bucket=BUCKET) as server, \
                AlgoService("synthetic", SyntheticParams(latency_ms=params.latency_ms, sigma=0.0)) as algo:
            base = load_config(env={}, overrides={
                "store": {"endpoint": server.endpoint, "bucket": BUCKET, "prefix": PREFIX},
                "algo": {"endpoint": algo.endpoint},
            })
            base = msgspec.structs.replace(base, credentials=creds)
            dirs = directories(params.directories)
            keys = retained_keys(params.retained, dirs)
            progress(f"discovery: uploading {len(keys):,} retained objects with {params.prefill_threads} threads ...")
            prefill_s = max(prefill(base.store, creds, keys, params.prefill_threads), 1e-6)
            t = time.perf_counter()
            pristine = os.path.join(workdir, "state-pristine")
            write_state(pristine, keys)
            state_s = time.perf_counter() - t
            progress(f"discovery: pre-fill took {prefill_s:.1f} s ({len(keys) / prefill_s:,.0f} objects/s); "
                     f"state written in {state_s:.2f} s")
            store = Store(base.store, creds, pool_size=8)
            modes = []
            for mode in MODES:
                figures, uploaded = run_mode(mode, base, server, pristine, workdir, dirs, params, progress)
                modes.append(figures)
                for start in range(0, len(uploaded), 500):  # the next mode starts from the same bucket
                    store.delete(uploaded[start : start + 500])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"params": msgspec.structs.asdict(params),
            "prefill": {"objects": params.retained, "seconds": round(prefill_s, 2), "threads": params.prefill_threads,
                        "objects_per_s": round(params.retained / prefill_s, 1), "state_write_s": round(state_s, 3)},
            "modes": modes}


# ----- outputs ---------------------------------------------------------------------------------


def table(data: dict[str, Any]) -> str:
    p = data["params"]
    lines = [
        "| mode | retained | rate img/s | discovery p50 / p99 ms (report) | put to worker start p50 / p99 ms "
        "| supervisor CPU % idle | supervisor CPU % load | lister/watcher CPU % idle | lister/watcher CPU % load "
        "| ledger CPU % idle | store CPU % idle | uploaded | analysed |",
        "|" + "---|" * 13,
    ]
    for m in data["modes"]:
        lines.append(
            f"| {m['mode']} | {m['retained']:,} | {m['rate']:g} | {m['report_p50_discovery_ms']:.0f} / "
            f"{m['report_p99_discovery_ms']:.0f} | {m['put_to_start_p50_ms']:.0f} / {m['put_to_start_p99_ms']:.0f} "
            f"| {m['supervisor_cpu_idle_pct']:.1f} | {m['supervisor_cpu_load_pct']:.1f} | {m['intake_cpu_idle_pct']:.1f} "
            f"| {m['intake_cpu_load_pct']:.1f} | {m['cpu_idle_pct']['ledger']:.1f} | {m['cpu_idle_pct']['store']:.1f} "
            f"| {m['uploaded']} | {m['analysed']} |")
    pre = data["prefill"]
    lines += ["", f"{p['workers']} workers, synthetic service {p['latency_ms']:g} ms (sigma 0), {p['directories']} "
              f"task directories; load {p['rate']:g} img/s for {p['duration_s']:g} s, idle window {p['idle_s']:g} s. "
              f"Events: SeaweedFS filer metadata tail, reconciliation listing every {p['reconcile_interval_s']:g} s; "
              f"listing: a full listing every {p['listing_interval_s']:g} s. CPU is % of one core: the supervisor "
              "process alone; lister/watcher = the lister process, the watcher process and its "
              "`weed filer.meta.tail`; ledger = the processed set's Manager; store = `weed mini`.",
              "Discovery (report) runs from the object's time to dispatch: in events mode the filer event's time, "
              "in listing mode S3 LastModified, which SeaweedFS gives in whole seconds (truncated), so the listing "
              "figure reads up to 1 s (0.5 s on average) high; put to worker start needs no object time: it runs "
              "from the uploader's put returning to the worker's `started_at`.",
              f"Pre-fill of {pre['objects']:,} objects: {pre['seconds']:.0f} s with {pre['threads']} threads "
              f"({pre['objects_per_s']:,.0f}/s); state written in {pre['state_write_s']:.2f} s."]
    for m in data["modes"]:
        lines.append(f"{m['mode']}: one full listing of {m['first_sweep_listed']:,} objects took "
                     f"{m['first_sweep_s']:.1f} s at start-up; listings completed in the idle / load windows: "
                     f"{m['sweeps_idle']} / {m['sweeps_load']} (mean {m['sweep_mean_s']:.1f} s); put to worker "
                     f"start max {m['put_to_start_max_ms']:.0f} ms; outcomes {m['outcomes']}; whole machine busy "
                     f"{m['cpu_idle_pct']['machine']:.0f} / {m['cpu_load_pct']['machine']:.0f} % of one core "
                     f"(idle / load), of which outside this benchmark {m['cpu_idle_pct']['outside_this_run']:.0f} / "
                     f"{m['cpu_load_pct']['outside_this_run']:.0f} %.")
    return "\n".join(lines)


def plot(data: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4.2))
    for m in data["modes"]:
        values = [max(v, 0.1) for v in m["latencies_ms"]]
        if values:
            ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post",
                    label=f"{m['mode']} (p50 {m['put_to_start_p50_ms']:.0f} ms, p99 {m['put_to_start_p99_ms']:.0f} ms)")
    ax.set_xscale("log")
    ax.set_xlabel("put completed to worker start (ms, log)")
    ax.set_ylabel("fraction of uploaded images")
    ax.set_title(f"discovery latency, {data['params']['retained']:,} retained, {data['params']['rate']:g} img/s")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    roles = [("supervisor", "supervisor"), ("intake", "lister/watcher"), ("ledger", "ledger"), ("store", "store")]
    width = 0.8 / max(1, len(data["modes"]))
    for i, m in enumerate(data["modes"]):
        bx.bar([j + i * width for j in range(len(roles))], [m["cpu_idle_pct"][r] for r, _ in roles], width,
               label=m["mode"])
    bx.set_xticks([j + width * (len(data["modes"]) - 1) / 2 for j in range(len(roles))], [n for _, n in roles])
    bx.set_ylabel("% of one core, idle window")
    bx.set_title("CPU with nothing new to find")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: str, name: str, data: dict[str, Any], text: str) -> None:
    """``name``.json and .md as ``_common.write_results`` writes them (into ``out``), and ``name``.png."""
    if os.path.abspath(out) == os.path.abspath(RESULTS):
        write_results(name, data, text)
    else:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{name}.json"), "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(data)) + b"\n")
        with open(os.path.join(out, f"{name}.md"), "w", encoding="utf-8") as f:
            f.write(text + "\n")
    plot(data, os.path.join(out, f"{name}.png"))


def parse_args(argv: Sequence[str]) -> tuple[Params, str, str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--retained", type=int, help="objects already in the bucket (default 100000; quick 2000)")
    parser.add_argument("--rate", type=float, default=30.0, help="new images per second under load")
    parser.add_argument("--duration", type=float, help="seconds of load (default 30; quick 5)")
    parser.add_argument("--idle-s", type=float, help="seconds of the idle window (default 20; quick 3)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--directories", type=int, default=100, help="task directories the images spread over")
    parser.add_argument("--quick", action="store_true", help="2,000 retained, 5 s of load, 3 s idle")
    parser.add_argument("--out", default=RESULTS, help="directory for the .json, .md and .png")
    parser.add_argument("--name", default="discovery", help="file name stem of the outputs")
    args = parser.parse_args(argv)
    quick = args.quick
    params = Params(
        retained=args.retained if args.retained is not None else (2000 if quick else 100_000),
        rate=args.rate,
        duration_s=args.duration if args.duration is not None else (5.0 if quick else 30.0),
        idle_s=args.idle_s if args.idle_s is not None else (3.0 if quick else 20.0),
        workers=args.workers, latency_ms=args.latency_ms, directories=args.directories, quick=quick,
    )
    if params.retained < 0 or params.rate <= 0 or params.duration_s <= 0 or params.idle_s <= 0 or params.workers < 1 \
            or params.directories < 1:
        parser.error("--retained must be >= 0; --rate, --duration, --idle-s, --workers and --directories must be positive")
    return params, args.out, args.name


def main(argv: Sequence[str] | None = None) -> int:
    params, out, name = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t = time.monotonic()
    data = run(params, progress=lambda s: print(s, flush=True))
    data["wall_s"] = round(time.monotonic() - t, 1)
    text = table(data)
    print(text)
    write(out, name, data, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
