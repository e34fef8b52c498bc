"""Command line: argv/env -> Config, logging set-up, subcommands, exit codes.

This is the only module that reads argv and the environment, configures logging and
chooses the exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from .config import Config, Credentials, load_config
from .errors import ExitCode, ImgworkerError
from .logs import LogSettings, setup_logging
from .outcomes import Outcome
from .stats import Report, format_report

if TYPE_CHECKING:
    from .ledger import LedgerState
    from .recorder import Snapshot
    from .retry import Selection
    from .tune import TuneParams

log = logging.getLogger("imgworker")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(LogSettings(level=args.log_level, json=args.log_json))
    try:
        return int(args.func(args))
    except ImgworkerError as exc:
        print(f"imgworker: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)
    except ModuleNotFoundError as exc:
        package, extra = _EXTRA_OF.get((exc.name or "").partition(".")[0], ("", ""))
        if not extra:
            raise
        extra = "bench" if args.command in ("scenario", "tune") else extra  # the extra that has all they need
        print(f"imgworker: error: {args.command} needs {package}, which the base install leaves out: "
              f"pip install 'imgworker[{extra}]'", file=sys.stderr)
        return int(ExitCode.CONFIG)


#: Modules only some commands need: the package that has each, and the extra that installs it (setup.cfg).
_EXTRA_OF = {"aiohttp": ("aiohttp", "demo"), "yarl": ("aiohttp", "demo"), "numpy": ("numpy", "demo"),
             "PIL": ("pillow", "demo"), "skimage": ("scikit-image", "demo"), "matplotlib": ("matplotlib", "bench"),
             "nats": ("nats-py", "nats"), "rich": ("rich", "top")}


# ----- parsing -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="imgworker", description="Image inference over an object store.")
    parser.add_argument("--version", action="version", version=f"imgworker {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="least severe log records shown (default INFO)")
    parser.add_argument("--log-json", action="store_true", help="log JSON lines instead of text")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the main job against your bucket and algorithm service")
    run.add_argument("--config", help="TOML configuration file")
    _add_run_flags(run)
    run.add_argument("--duration", type=float, help="stop after S seconds (default: run until signalled)")
    run.add_argument("--until-idle", action="store_true", help="stop once nothing is left to analyse")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="the main job on embedded defaults (store, face detector, cameras)")
    _add_run_flags(demo)
    demo.add_argument("--duration", type=float, default=30.0, help="seconds the cameras upload (default 30)")
    demo.add_argument("--rate", type=float, default=6.0, help="images per second uploaded (default 6)")
    demo.add_argument("--backend", choices=["face", "synthetic"], default="face",
                      help="the algorithm service: a real face detector (default) or the synthetic one")
    demo.add_argument("--data-dir", default=".imgworker-demo", help="where the demo keeps store data and state")
    demo.add_argument("--scan-mode", choices=["events", "listing"], default="events",
                      help="find new images from the store's change events (default) or by listing it")
    demo.add_argument("--hosts", type=int, default=1,
                      help="supervisors sharing one loopback nats-server (cluster mode; default 1: no NATS)")
    demo.set_defaults(func=cmd_demo)

    store = sub.add_parser("store-serve", help="the embedded S3 store alone (SeaweedFS weed mini on 127.0.0.1)")
    store.add_argument("--data-dir", default=".imgworker-store", help="where the store keeps its data")
    store.add_argument("--port", type=int, default=9000, help="S3 port (default 9000)")
    store.add_argument("--bucket", default="images", help="bucket created at start (default images)")
    store.set_defaults(func=cmd_store_serve)

    algo = sub.add_parser("algo-serve", help="the reference algorithm service")
    algo.add_argument("--backend", choices=["face", "synthetic"], default="synthetic",
                      help="a real face detector or the synthetic model (default)")
    algo.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    algo.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    _add_synthetic_flags(algo)
    algo.set_defaults(func=cmd_algo_serve)

    loadgen = sub.add_parser("loadgen", help="upload camera-like images into the bucket")
    loadgen.add_argument("--config", help="TOML configuration file (store section)")
    loadgen.add_argument("--rate", type=float, required=True, help="images per second")
    loadgen.add_argument("--duration", type=float, default=0.0, help="seconds (default: until Ctrl-C)")
    loadgen.add_argument("--task-types", default="person,vehicle", help="comma-separated task types")
    loadgen.add_argument("--tasks-per-type", type=int, default=2, help="camera directories per task type")
    loadgen.add_argument("--seed", type=int, default=0, help="random seed of the image contents")
    loadgen.set_defaults(func=cmd_loadgen)

    scenario = sub.add_parser("scenario", help="retention policies under the same load (time compressed)")
    scenario.add_argument("--quick", action="store_true", help="a reduced run of about a minute, same ordering")
    scenario.add_argument("--json", help="write the rows as JSON to this path")
    scenario.add_argument("--markdown", help="write the table as Markdown to this path")
    scenario.add_argument("--compression", type=float, help="time compression factor (default 2)")
    _add_metrics_flags(scenario)
    scenario.set_defaults(func=cmd_scenario)

    tune = sub.add_parser(
        "tune", help="measure processes x lanes; recommend both and an initial --adaptive limit",
        description="Measure throughput, latency, CPU per 1,000 images and RSS for a grid of worker processes x "
                    "lanes (N = processes x lanes images in flight), against the embedded store and a synthetic "
                    "service (or your own with --config). Recommended: among the configurations within 95 % of "
                    "the best throughput (meeting --p95-budget-ms, if given), the least CPU per image; within 5 % "
                    "of that counts as a tie, won by the fewest images in flight, then the fewest processes. "
                    "Initial --adaptive limit: the knee, the smallest N whose best configuration reaches 95 % of "
                    "the best throughput.")
    tune.add_argument("--total", help="comma-separated N (images in flight) to measure, each split as processes x "
                                      "lanes for every --lanes value that divides it (default "
                                      "8,16,32,64,128 unless --workers is given)")
    tune.add_argument("--lanes", help="comma-separated lanes per process (default 1,4,8,16 with --total; "
                                      "1 with --workers)")
    tune.add_argument("--workers", help="instead of --total: comma-separated worker process counts, each measured "
                                        "with every --lanes value")
    tune.add_argument("--latency-ms", type=float, default=200.0, help="synthetic algorithm latency L (default 200)")
    tune.add_argument("--sigma", type=float, default=0.0, help="lognormal sigma of the latency (0 = fixed)")
    tune.add_argument("--p95-budget-ms", type=float, default=0.0,
                      help="consider only configurations whose p95 end to end meets this budget (0 = none)")
    tune.add_argument("--images", type=int, default=4000, help="images pre-filled into the embedded store")
    tune.add_argument("--warmup-s", type=float, default=3.0,
                      help="seconds each configuration runs before it is measured (default 3)")
    tune.add_argument("--window-s", type=float, default=2.0,
                      help="shortest measuring window in seconds; longer where N is small (default 2)")
    tune.add_argument("--max-windows", type=int, default=8,
                      help="windows at most per configuration, if three do not agree within 5 %% first (default 8)")
    tune.add_argument("--no-check", action="store_true", help="switch the existence check off")
    tune.add_argument("--config", help="measure against your own store and service instead of embedded ones")
    tune.add_argument("--json", help="write the points and the recommendation as JSON")
    tune.add_argument("--markdown", help="write the table as Markdown")
    tune.add_argument("--plot", help="write throughput and CPU per image against N as PNG")
    tune.set_defaults(func=cmd_tune)

    report = sub.add_parser("report", help="recompute the report from a results file (or the cluster's ledger)")
    report.add_argument("results", nargs="?",
                        help="results JSON-lines file (STATE_DIR/results.jsonl, or run.results_file)")
    report.add_argument("--json", action="store_true", help="print JSON instead of the table")
    report.add_argument("--cluster", action="store_true",
                        help="the cluster-wide report from the outcome ledger ([cluster] of --config or the environment)")
    report.add_argument("--config", help="TOML configuration file (with --cluster)")
    report.set_defaults(func=cmd_report)

    top = sub.add_parser("top", help="a live table of one or more running instances, from their /metrics")
    top.add_argument("urls", nargs="+", metavar="URL",
                     help="a /metrics address (http://host:port/metrics, or host:port); several: one row each")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between polls (default 2)")
    top.add_argument("--once", action="store_true", help="print one table and exit")
    top.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each endpoint (default 2)")
    top.set_defaults(func=cmd_top)

    retry = sub.add_parser("retry", help="re-admit images whose latest outcome matches; the next run analyses them",
                           description="Re-admit images whose latest outcome matches (and whose object still "
                           "exists): the next `imgworker run` analyses each once more, and its new outcome "
                           "supersedes the old one. Refused while a run uses the state directory.")
    retry.add_argument("--config", help="TOML configuration file (the run's store and run.state_dir)")
    retry.add_argument("--state-dir", help="the run's state directory (default: run.state_dir)")
    retry.add_argument("--outcome", required=True, action="append", choices=[o.value for o in Outcome],
                       metavar="OUTCOME", help="re-admit images whose latest outcome is this (repeat for several; "
                       "e.g. failed_algo)")
    retry.add_argument("--cause", default="", help="only those whose cause is exactly this (e.g. http_500, "
                       "no_healthy_endpoint, timeout)")
    retry.add_argument("--since", help="only outcomes recorded since this time (2024-05-01T12:00, local time "
                       "unless a zone is given) or this age (90s, 30m, 2h, 1d)")
    retry.add_argument("--key-prefix", default="", help="only keys that start with this (e.g. cams/person/)")
    retry.add_argument("--dry-run", action="store_true", help="say what would be re-admitted; change nothing")
    retry.set_defaults(func=cmd_retry)

    check = sub.add_parser("check", help="preflight: the store, the credentials, the bucket, every algorithm "
                           "endpoint and route; exit 0 only if all answer")
    check.add_argument("--config", help="TOML configuration file")
    check.set_defaults(func=cmd_check)

    repair = sub.add_parser("repair", help="move corrupt results lines aside; the next run rebuilds its state")
    repair.add_argument("--state-dir", required=True, help="the run's state directory")
    repair.add_argument("--results", help="results file (default: STATE_DIR/results.jsonl)")
    repair.set_defaults(func=cmd_repair)
    return parser


def _add_metrics_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics on this port (default: off)")
    p.add_argument("--metrics-addr", default="127.0.0.1", help="address for /metrics (default 127.0.0.1)")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    _add_metrics_flags(p)
    p.add_argument("--workers", type=int, help="number of worker processes")
    p.add_argument("--threads", type=int, help="lanes (threads) per worker process; images at once = workers x threads")
    p.add_argument("--adaptive", action="store_true",
                   help="adapt each algorithm endpoint's calls in flight to the service (workers x threads is the ceiling)")
    p.add_argument("--report-json", help="also write the final report as JSON to this path")
    p.add_argument("--state-dir", help="where state and results are kept")
    p.add_argument("--no-progress", action="store_true", help="no live progress line")


_SYNTHETIC_HELP = {
    "latency_ms": "mean latency in ms", "sigma": "lognormal sigma of the latency (0 = fixed)",
    "error_rate": "share of calls answered HTTP 500", "timeout_rate": "share of calls that hang for --hang-s",
    "malformed_rate": "share of calls answered with an HTML body", "false_rate": "share answered success=false",
    "detection_rate": "share of images with detections", "hang_s": "how long a hanging call hangs",
    "seed": "random seed", "trickle_s": "for paths containing 'trickle': seconds between bytes of the answer",
    "count_override": "for paths containing 'huge': the count answered (-1: off)",
    "slots": "calls served at once, the others wait in arrival order as in a model server's queue (0: no limit); "
             "POST /shape with {\"slots\": n, \"latency_ms\": x} changes either while it runs",
}


def _add_synthetic_flags(p: argparse.ArgumentParser) -> None:
    from .services.synthetic import SyntheticParams

    for field in msgspec.structs.fields(SyntheticParams):
        kind = int if field.type is int else float
        p.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=field.default,
                       help=f"synthetic backend: {_SYNTHETIC_HELP.get(field.name, field.name)} "
                       f"(default {field.default})")


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if getattr(args, "workers", None) is not None:
        out.setdefault("worker", {})["count"] = args.workers
    if getattr(args, "threads", None) is not None:
        out.setdefault("worker", {})["threads"] = args.threads
    if getattr(args, "adaptive", False):
        out.setdefault("algo", {})["adaptive"] = True
    if getattr(args, "state_dir", None):
        out.setdefault("run", {})["state_dir"] = args.state_dir
    if getattr(args, "duration", None) is not None and args.command == "run":
        out.setdefault("run", {})["duration_s"] = args.duration
    if getattr(args, "until_idle", False):
        out.setdefault("run", {})["until_idle"] = True
    return out


# ----- commands ----------------------------------------------------------------------------


#: The flag each override of ``_overrides`` came from, for error messages.
_FLAG_OF = {"worker.count": "--workers", "worker.threads": "--threads", "run.state_dir": "--state-dir",
            "run.duration_s": "--duration", "run.until_idle": "--until-idle"}


def _load(args: argparse.Namespace) -> Config:
    """The Config from --config, the environment and this command's flags (errors name the flag)."""
    return load_config(path=getattr(args, "config", None), overrides=_overrides(args), flags=_FLAG_OF)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _require_credentials(cfg)
    _warn_unanswered_endpoints(cfg)
    report = _run_pipeline(cfg, args)
    return int(run_exit_code(report))


def _warn_unanswered_endpoints(cfg: Config) -> None:
    """The endpoint checks of ``imgworker check``, warned about loudly; the run starts anyway (the service
    may come up later: images wait up to algo.no_endpoint_budget_s for it)."""
    from .errors import StoreError
    from .preflight import START_CHECK_TIMEOUT_S, check_endpoints, failed, sample_image
    from .store import Store

    try:
        store = Store(cfg.store, cfg.credentials)
    except (StoreError, ValueError):
        return  # the run's own store check says what is wrong, once
    listed, sample = sample_image(cfg, store)
    if not listed:
        return
    for check in failed(check_endpoints(cfg, store, sample, timeout_s=START_CHECK_TIMEOUT_S)):
        log.warning("%s does not answer: %s. Starting anyway: images wait up to algo.no_endpoint_budget_s = %g s "
                    "for a healthy endpoint (`imgworker check` checks again)", check.what, check.detail,
                    cfg.algo.no_endpoint_budget_s)


def run_exit_code(report: Report) -> ExitCode:
    """ALGO_UNAVAILABLE when images failed for want of a healthy endpoint or no call was answered; else OK."""
    calls = sum(f["requests"] for f in report.endpoints.values())
    failed = sum(f["failures"] for f in report.endpoints.values())
    if report.no_healthy_endpoint or (calls and failed == calls):
        print(f"imgworker: error: the algorithm service was unavailable: {report.no_healthy_endpoint:,} images failed "
              f"for want of a healthy endpoint, {failed:,} of {calls:,} calls failed "
              f"(exit code {int(ExitCode.ALGO_UNAVAILABLE)})", file=sys.stderr)
        return ExitCode.ALGO_UNAVAILABLE
    return ExitCode.OK


def _require_credentials(cfg: Config) -> None:
    if not cfg.credentials.access_key or not cfg.credentials.secret_key:
        from .errors import ConfigError

        raise ConfigError(
            "store credentials missing: set IMGWORKER_ACCESS_KEY and IMGWORKER_SECRET_KEY "
            "(or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), or store.credentials_file"
        )


def _run_pipeline(cfg: Config, args: argparse.Namespace, **kwargs: Any) -> Report:
    from .supervisor import Supervisor

    supervisor = Supervisor(cfg, show_progress=not args.no_progress, **kwargs)
    cluster = supervisor.cluster
    with _metrics(args, supervisor.snapshot, supervisor.healthz, host=cluster.name if cluster else "",
                  extra=[cluster.collector()] if cluster else None):
        report = supervisor.run()
    print(format_report(report))
    if args.report_json:
        with open(args.report_json, "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(report)) + b"\n")
    return report


@contextlib.contextmanager
def _metrics(args: argparse.Namespace, current: Callable[[], Snapshot | None],
             health: Callable[[], tuple[int, dict[str, Any]]] | None = None, *, host: str = "",
             extra: list[Any] | None = None) -> Iterator[None]:
    """Serve /metrics (and /healthz) while the body runs, if --metrics-port was given (cluster mode: with a
    ``host`` label)."""
    if not args.metrics_port:
        yield
        return
    from .metrics import serve_metrics

    try:
        server = serve_metrics(current, args.metrics_port, args.metrics_addr, health, host=host, extra=extra)
    except OSError as exc:
        from .errors import ConfigError

        raise ConfigError(f"--metrics-port: cannot listen on {args.metrics_addr}:{args.metrics_port} ({exc})") from None
    print(f"metrics: http://{args.metrics_addr}:{args.metrics_port}/metrics", file=sys.stderr, flush=True)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def cmd_demo(args: argparse.Namespace) -> int:
    from .services.algo_server import AlgoService
    from .services.netutil import stop_process
    from .services.store_server import EmbeddedStore

    if args.hosts > 1:
        _cluster_demo_needs()
    data_dir = os.path.abspath(args.data_dir)
    shutil.rmtree(data_dir, ignore_errors=True)
    creds = Credentials(access_key="demo-" + secrets.token_hex(4), secret_key=secrets.token_urlsafe(24))
    store = EmbeddedStore(os.path.join(data_dir, "store"), creds, bucket="imgworker-demo")
    algo = AlgoService(args.backend)
    print(f"demo: starting the embedded store and the {args.backend} algorithm service on 127.0.0.1 ...", flush=True)
    with store, algo:
        cfg = _demo_config(args, store, algo.endpoint, creds, data_dir)
        if args.hosts > 1:
            from .cluster.demo import run_demo

            text, code = run_demo(cfg, hosts=args.hosts, data_dir=data_dir, report_json_path=args.report_json,
                                  start_cameras=lambda: _start_cameras(args, cfg, creds),
                                  metrics=(args.metrics_addr, args.metrics_port) if args.metrics_port else None)
            print(text)
            return code
        cameras = _start_cameras(args, cfg, creds)
        print(f"demo: cameras upload {args.rate:g} img/s for {args.duration:g} s; {cfg.worker.count} worker processes"
              f" x {cfg.worker.threads} lanes analyse; "
              f"new images found by {'change events' if args.scan_mode == 'events' else 'listing the bucket'}",
              flush=True)
        try:
            _run_pipeline(cfg, args, intake_done=lambda: cameras.poll() is not None)
        finally:
            stop_process(cameras)
    print(f"demo: stopped everything it started; results in {cfg.results_path}")
    return int(ExitCode.OK)


def _cluster_demo_needs() -> None:
    """``demo --hosts``: nats-py and the nats-server binary, checked before anything starts (the hosts need both)."""
    import nats  # noqa: F401  - missing: main() names the extra that has it

    from .errors import ConfigError
    from .services.nats_server import nats_server_binary

    try:
        nats_server_binary()
    except RuntimeError as exc:
        raise ConfigError(f"demo --hosts: {exc}") from None


def _demo_config(args: argparse.Namespace, store: Any, algo: str, creds: Credentials, data_dir: str) -> Config:
    overrides = _overrides(args)
    overrides.setdefault("worker", {}).setdefault("count", 4)
    overrides["store"] = {"endpoint": store.endpoint, "bucket": "imgworker-demo"}
    overrides.setdefault("algo", {}).update({"endpoint": algo, "timeout_s": 30.0})  # keeps --adaptive
    overrides["scan"] = {"interval_s": 0.5, "mode": args.scan_mode, "reconcile_interval_s": 10.0,
                         "events": {"source": "seaweed", "filer": store.filer_address}}
    overrides.setdefault("run", {}).update(
        {"state_dir": os.path.join(data_dir, "state"), "until_idle": True, "grace_s": 30.0}
    )
    cfg = load_config(env={}, overrides=overrides)
    return msgspec.structs.replace(cfg, credentials=creds)


def _start_cameras(args: argparse.Namespace, cfg: Config, creds: Credentials) -> subprocess.Popen[bytes]:
    env = dict(os.environ, IMGWORKER_ACCESS_KEY=creds.access_key, IMGWORKER_SECRET_KEY=creds.secret_key,
               IMGWORKER_STORE_ENDPOINT=cfg.store.endpoint, IMGWORKER_STORE_BUCKET=cfg.store.bucket)
    cmd = [sys.executable, "-m", "imgworker", "--log-level", "WARNING", "loadgen", "--rate", str(args.rate),
           "--duration", str(args.duration)]
    from .logs import forward_output
    from .services.netutil import die_with_parent

    # its output goes through the console, like a log record: never into the status line
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=die_with_parent)
    forward_output(proc, "imgworker.cameras")
    return proc


def cmd_store_serve(args: argparse.Namespace) -> int:
    from .services.store_server import EmbeddedStore

    cfg = load_config(overrides={})
    _require_credentials(cfg)
    stopping: list[int] = []  # signals only set a flag: a Ctrl-C at any instant still stops the store
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: stopping.append(s))
    store = EmbeddedStore(args.data_dir, cfg.credentials, bucket=args.bucket, s3_port=args.port)
    try:
        store.start()
        print(f"embedded store ready: endpoint {store.endpoint}, bucket {args.bucket}, data in {store.data_dir}")
        print(f"use it with: IMGWORKER_STORE_ENDPOINT={store.endpoint} IMGWORKER_STORE_BUCKET={args.bucket} "
              "and the same IMGWORKER_ACCESS_KEY / IMGWORKER_SECRET_KEY; Ctrl-C stops it")
        print(f"change events: IMGWORKER_SCAN_MODE=events IMGWORKER_SCAN_EVENTS_SOURCE=seaweed "
              f"IMGWORKER_SCAN_EVENTS_FILER={store.filer_address}", flush=True)
        while store.alive() and not stopping:
            time.sleep(0.2)
    finally:
        store.stop()
    print("embedded store stopped")
    return int(ExitCode.OK)


def cmd_algo_serve(args: argparse.Namespace) -> int:
    from .services.algo_server import serve
    from .services.synthetic import SyntheticParams

    params = SyntheticParams(**{f.name: getattr(args, f.name) for f in msgspec.structs.fields(SyntheticParams)})
    print(f"algorithm service ({args.backend}) on http://{args.host}:{args.port}/infer", flush=True)
    serve(backend=args.backend, host=args.host, port=args.port, params=params)
    return int(ExitCode.OK)


def cmd_loadgen(args: argparse.Namespace) -> int:
    from .errors import StoreError
    from .proctitle import set_title
    from .services.loadgen import Cameras, run_loadgen
    from .store import Store

    set_title("loadgen")
    cfg = load_config(path=args.config, overrides={})
    _require_credentials(cfg)
    store = Store(cfg.store, cfg.credentials)
    store.check()
    failed: list[str] = []

    def put(key: str, data: bytes) -> None:
        try:
            store.put(key, data)
        except StoreError as exc:
            failed.append(key)
            log.warning("loadgen: upload failed: %s", exc)

    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
    cameras = Cameras(cfg.store.prefix, [t for t in args.task_types.split(",") if t], args.tasks_per_type)
    try:
        sent = run_loadgen(put, rate=args.rate, duration_s=args.duration, cameras=cameras, seed=args.seed,
                           should_stop=lambda: bool(stop))
    except KeyboardInterrupt:
        return int(ExitCode.OK)
    print(f"loadgen: {sent - len(failed)} uploaded, {len(failed)} failed")
    return int(ExitCode.OK)


def cmd_scenario(args: argparse.Namespace) -> int:
    from .scenario import ScenarioParams, markdown_table, run_scenario

    params = ScenarioParams()
    if args.compression:
        params = msgspec.structs.replace(params, compression=args.compression)
    if args.quick:
        params = params.quick()
    logging.getLogger("imgworker").setLevel(max(logging.WARNING, logging.getLogger().level))
    holder: list[Any] = [None]
    with _metrics(args, lambda: holder[0].snapshot() if holder[0] is not None else None):
        rows = run_scenario(params, progress=lambda line: print(line, flush=True), on_supervisor=holder.__setitem__)
    table = markdown_table(rows, params)
    print(table)
    if args.json:
        payload = {"params": msgspec.to_builtins(params), "rows": msgspec.to_builtins(rows)}
        with open(args.json, "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(payload)) + b"\n")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    return int(ExitCode.OK)


def cmd_tune(args: argparse.Namespace) -> int:
    from .tune import markdown, plot, run_tune, sweep

    params = _tune_params(args)
    progress = lambda line: print(line, flush=True)  # noqa: E731
    if args.config:
        cfg = load_config(path=args.config, overrides={})
        _require_credentials(cfg)
        result = sweep(cfg, params, progress)
    else:
        result = run_tune(params, progress=progress)
    table = markdown(result)
    print(table)
    _write(args.json, msgspec.json.format(msgspec.json.encode(result)) + b"\n")
    _write(args.markdown, table.encode() + b"\n")
    if args.plot:
        plot(result, args.plot)
    return int(ExitCode.OK)


def _tune_params(args: argparse.Namespace) -> TuneParams:
    """The tune flags checked, with the (processes, lanes) grid they name; a ConfigError names a bad flag."""
    from .errors import ConfigError
    from .tune import DEFAULT_LANES, DEFAULT_TOTALS, TuneParams, build_grid

    processes = _int_list("--workers", args.workers)
    lanes = _int_list("--lanes", args.lanes) if args.lanes is not None else ((1,) if processes else DEFAULT_LANES)
    totals = _int_list("--total", args.total) if args.total is not None else (() if processes else DEFAULT_TOTALS)
    try:
        grid = build_grid(totals=totals, lanes=lanes, processes=processes)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for flag, value in (("--images", args.images), ("--max-windows", args.max_windows)):
        if value < 1:
            raise ConfigError(f"{flag}: value {value} is not allowed (at least 1)")
    for flag, seconds in (("--latency-ms", args.latency_ms), ("--window-s", args.window_s)):
        if not seconds > 0:
            raise ConfigError(f"{flag}: value {seconds:g} is not allowed (more than 0)")
    return TuneParams(grid=grid, latency_ms=args.latency_ms, sigma=args.sigma, images=args.images,
                      warmup_s=args.warmup_s, window_s=args.window_s, max_windows=args.max_windows,
                      p95_budget_ms=args.p95_budget_ms, stat_check=not args.no_check)


def _int_list(flag: str, text: str | None) -> tuple[int, ...]:
    """``"1,2,4"`` -> (1, 2, 4); None -> (); anything else a ConfigError naming the flag."""
    from .errors import ConfigError

    if text is None:
        return ()
    try:
        values = tuple(int(n) for n in text.split(",") if n.strip())
    except ValueError:
        raise ConfigError(f"{flag}: value {text!r} is not allowed (comma-separated integers)") from None
    if not values:
        raise ConfigError(f"{flag}: value {text!r} is not allowed (comma-separated integers)")
    return values


def _write(path: str | None, data: bytes) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


#: What ``imgworker report FILE`` covers (a run's own report covers that run only).
FILE_SCOPE = ("every line of {path} (all runs that wrote it): each image once, by its latest outcome; rates over "
              "the time from the first image started to the last outcome. Lanes, re-dispatches, worker restarts "
              "and endpoint health are not in the file")


def cmd_report(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .results import read_entries_at
    from .stats import stats_from_results

    if args.cluster and args.results:
        raise ConfigError(f"report --cluster reads the cluster's outcome ledger, not a results file: drop "
                          f"{args.results}, or drop --cluster")
    if args.cluster:
        return _cluster_report(args)
    if not args.results:
        raise ConfigError("report: name a results file, or use --cluster")
    if not os.path.isfile(args.results):
        raise ConfigError(f"results file {args.results} does not exist")
    entries = [entry for _, entry in read_entries_at(args.results)]
    stats = stats_from_results(entries)
    report = stats.report(pending=0, in_flight=0, wall_s=stats.busy_s)
    report = msgspec.structs.replace(report, scope=FILE_SCOPE.format(path=args.results))
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(report)).decode())
    else:
        print(format_report(report))
    return int(ExitCode.OK)


def cmd_top(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .top import run_top

    if args.interval <= 0 or args.timeout <= 0:
        raise ConfigError("--interval and --timeout: values must be positive seconds")
    return int(run_top(args.urls, interval_s=args.interval, once=args.once, timeout_s=args.timeout))


def cmd_retry(args: argparse.Namespace) -> int:
    """Re-admit the images whose latest outcome matches (see retry.py): durable before it says so."""
    from .errors import AlreadyRunning, ConfigError
    from .journal import RunLock
    from .retry import Selection, parse_since

    cfg = _load(args)
    if cfg.cluster.enabled:  # the shared ledger keeps the outcome: a host would ack the image as counted
        raise ConfigError("retry: not in cluster mode ([cluster] url is set): the cluster's outcome ledger keeps "
                          "each image's first outcome for good, so no host would analyse a re-admitted image; "
                          "nothing was re-admitted")
    _require_credentials(cfg)
    selection = Selection(outcomes=tuple(Outcome(o) for o in dict.fromkeys(args.outcome)), cause=args.cause,
                          since=parse_since(args.since, now=time.time()) if args.since else 0.0,
                          key_prefix=args.key_prefix)
    path = cfg.results_path
    if not os.path.isfile(path):
        raise ConfigError(f"no results file at {path}: no run has written outcomes with this run.state_dir "
                          "(or run.results_file)")
    lock = RunLock(cfg.run.state_dir)
    try:
        lock.acquire()
    except AlreadyRunning:
        with open(lock.path, errors="replace") as f:
            holder = f.read(32).strip() or "unknown"
        raise AlreadyRunning(f"a run (pid {holder}) is using the state directory {cfg.run.state_dir}: stop it "
                             "before `imgworker retry` (a run reads re-admissions only when it starts)") from None
    try:
        _retry(cfg, selection, dry_run=args.dry_run)
    finally:
        lock.release()
    return int(ExitCode.OK)


def _retry(cfg: Config, selection: Selection, *, dry_run: bool) -> None:
    from .errors import StoreError, StoreFatal
    from .retry import find, readmit, still_stored
    from .store import Store

    found = find(cfg.results_path, selection)
    what = _selection_text(selection)
    if found.awaiting:
        print(f"retry: {_images(found.awaiting)} re-admitted earlier {'is' if found.awaiting == 1 else 'are'} still "
              "waiting for a run; not counted again")
    if not found.selected:
        print(f"retry: nothing to re-admit: no image's latest outcome is {what} in {cfg.results_path}")
        return
    store = Store(cfg.store, cfg.credentials)
    store.check()
    try:
        present, gone = still_stored(found.selected, store.stat)
    except StoreError as exc:
        raise StoreFatal(f"the store failed while looking the images up ({exc}); nothing was re-admitted",
                         ExitCode.STORE_UNREACHABLE) from None
    print(f"retry: {_images(len(found.selected))} whose latest outcome is {what}")
    if gone:
        shown = ", ".join(gone[:10]) + (f" and {len(gone) - 10:,} more" if len(gone) > 10 else "")
        print(f"retry: {len(gone):,} not re-admitted: the object is gone from bucket {cfg.store.bucket!r}: {shown}")
    if dry_run:
        print(f"retry: --dry-run: {len(present):,} would be re-admitted; nothing was changed")
        return
    if not present:
        print("retry: nothing re-admitted: no selected image is still in the bucket; the next run has none to analyse")
        return
    readmit(cfg.results_path, present)
    print(f"retry: {len(present):,} re-admitted: the next `imgworker run` with this state directory analyses "
          f"{'it' if len(present) == 1 else 'each'} once more; its new outcome supersedes the old one")


def _images(count: int) -> str:
    return f"{count:,} image" if count == 1 else f"{count:,} images"


def _selection_text(selection: Selection) -> str:
    from datetime import datetime

    text = " or ".join(o.value for o in selection.outcomes)
    if selection.cause:
        text += f" with cause {selection.cause!r}"
    if selection.since:
        text += f", recorded since {datetime.fromtimestamp(selection.since).isoformat(timespec='seconds')}"
    if selection.key_prefix:
        text += f", key starting with {selection.key_prefix!r}"
    return text


def cmd_check(args: argparse.Namespace) -> int:
    """One line per check; exit 0 only if every check passed, else the exit code of the first failure."""
    from .preflight import check_cluster, check_endpoints, check_store, failed
    from .store import Store

    cfg = _load(args)
    _require_credentials(cfg)
    store = Store(cfg.store, cfg.credentials)
    checks, sample = check_store(cfg, store)
    store_ok = not failed(checks)
    for check in checks:
        print(check.line(), flush=True)
    if store_ok:
        endpoint_checks = check_endpoints(cfg, store, sample)
    else:
        endpoint_checks = check_endpoints(cfg, None, None)
    endpoint_checks += check_cluster(cfg)
    for check in endpoint_checks:
        print(check.line(), flush=True)
    bad = failed(checks + endpoint_checks)
    if not bad:
        print(f"check: all {len(checks) + len(endpoint_checks)} checks passed")
        return int(ExitCode.OK)
    print(f"imgworker: error: {len(bad)} of {len(checks) + len(endpoint_checks)} checks failed: "
          + "; ".join(c.what for c in bad), file=sys.stderr)
    return int(bad[0].code)


def _cluster_report(args: argparse.Namespace) -> int:
    from .cluster.jetstream import ClusterMissing, ClusterUnavailable
    from .cluster.report import cluster_report, report_json
    from .endpoints import display_url
    from .errors import ConfigError

    cfg = load_config(path=args.config)
    if not cfg.cluster.enabled:
        raise ConfigError("report --cluster: set [cluster] url (or IMGWORKER_CLUSTER_URL)")
    try:
        report, hosts, figures = cluster_report(cfg.cluster)
    except ClusterUnavailable as exc:
        where = ", ".join(display_url(u.strip()) for u in cfg.cluster.url.split(","))
        cause = re.sub(r"//[^/@\s]*@", "//", str(exc))  # never a user:password of the URL
        error = ImgworkerError(f"report --cluster: no NATS server answered at {where} ({cause})")
        if isinstance(exc, ClusterMissing):
            error = ImgworkerError(f"report --cluster: no cluster at {where}: {cause}; no host has run there with "
                                   "this [cluster] section yet, or its names differ")
        error.exit_code = ExitCode.STORE_UNREACHABLE  # unreachable, like a store that does not answer
        raise error from None
    if args.json:
        print(report_json(report, hosts, figures).decode())
    else:
        print(format_report(report))
        print("\n| host | images analysed |\n|---|---|")
        print("\n".join(f"| {host} | {count:,} |" for host, count in sorted(hosts.items())))
    return int(ExitCode.OK if report.conserved else ExitCode.UNEXPECTED)


def cmd_repair(args: argparse.Namespace) -> int:
    """Move corrupt results lines to RESULTS.corrupt; replace state.json, whose offsets no longer fit.

    The next run rebuilds the processed set from the whole results file. Result actions are redone only
    for the lines after the last checkpoint's watermark (and those given up), mapped through the
    repair; where the state file is missing or unusable, for every line.
    """
    from .errors import ConfigError
    from .journal import RunLock

    path = args.results or os.path.join(args.state_dir, "results.jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"results file {path} does not exist (check --state-dir / --results)")
    lock = RunLock(args.state_dir)
    if os.path.isdir(args.state_dir):
        lock.acquire()  # a run appending to the file would lose lines to the rewrite
    try:
        _repair(path, args.state_dir)
    finally:
        lock.release()
    return int(ExitCode.OK)


def _repair(path: str, state_dir: str) -> None:
    from .results import offsets_after_repair, repair_results

    state_path = os.path.join(state_dir, "state.json")
    state, why = _read_state(state_path)
    offsets = offsets_after_repair(path)
    kept, moved = repair_results(path)
    print(f"repair: {path}: kept {kept:,} lines, moved {moved:,} corrupt lines to {path}.corrupt")
    if moved:
        print("repair: images whose lines were moved are analysed again if they are still in the bucket")
    for name in os.listdir(state_dir) if os.path.isdir(state_dir) else []:
        if name.endswith(".log") and name.startswith(("processed.", "backlog.")):
            os.unlink(os.path.join(state_dir, name))  # the key and backlog logs the state file named
    if state is not None and state.actions_from not in offsets:
        why = f"its watermark (byte {state.actions_from:,}) is not a line start of {path}, replaced or truncated"
        state = None
    if state is None or (state.actions_from == 0 and not state.owed):
        _drop_state(state_path, why)
        return
    _rewrite_state(state_path, state, offsets)


def _read_state(path: str) -> tuple[LedgerState | None, str]:
    """The state file, or None and why its watermark cannot be used."""
    from .ledger import LedgerState
    from .recorder import Snapshot

    try:
        with open(path, "rb") as f:
            return msgspec.json.decode(f.read(), type=LedgerState), ""
    except FileNotFoundError:
        return None, "there is none"
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None, "it is corrupt"


def _drop_state(path: str, why: str) -> None:
    if not os.path.exists(path):
        print(f"repair: no {path}; the next run builds the processed set from the whole results file")
        return
    os.unlink(path)
    print(f"repair: removed {path}; the next run rebuilds the processed set from the whole results file")
    if why:
        print(f"repair: its watermark cannot be used ({why}): the next run redoes the result actions of every line")


def _rewrite_state(path: str, state: LedgerState, offsets: dict[int, tuple[int, bool]]) -> None:
    """A state file that names no key log: the processed set is rebuilt, actions redone only past the watermark."""
    from .files import write_atomic
    from .ledger import LedgerState
    from .recorder import Snapshot

    mark = offsets[state.actions_from][0]
    kept = [e for e in state.owed if offsets.get(e.line, (0, False))[1]]  # an action of a line moved aside is dropped
    owed = [msgspec.structs.replace(e, line=offsets[e.line][0]) for e in kept]
    write_atomic(path, msgspec.json.encode(LedgerState(results_offset=0, actions_offset=mark, owed=owed)))
    print(f"repair: rewrote {path}; the next run rebuilds the processed set from the whole results file")
    print(f"repair: it redoes only the result actions of lines after byte {mark:,} (the last checkpoint's "
          f"watermark), and {len(owed):,} actions given up earlier")
