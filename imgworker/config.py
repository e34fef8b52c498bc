"""The one validated, immutable configuration value.

Sources, lowest precedence first: built-in defaults, a TOML file, ``IMGWORKER_<SECTION>_<KEY>``
environment variables, command-line flags. Store credentials never come from a flag or from the
main file: they come from ``IMGWORKER_ACCESS_KEY``/``IMGWORKER_SECRET_KEY`` (or the standard
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``) or from ``store.credentials_file``.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import tomllib
import typing
import urllib.parse
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from .errors import ConfigError

Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
Overflow = Literal["block", "drop_oldest", "drop_newest"]

log = logging.getLogger(__name__)

_STRUCT = {"frozen": True, "forbid_unknown_fields": True, "kw_only": True}


class Credentials(msgspec.Struct, frozen=True):
    """Store credentials; their repr never shows the secret."""

    access_key: str = ""
    secret_key: str = ""
    webhook_token: str = ""  # the bearer token MinIO sends to imgworker's webhook (IMGWORKER_WEBHOOK_TOKEN)

    def __repr__(self) -> str:
        return (f"Credentials(access_key={'***' if self.access_key else ''!r}, secret_key='***', "
                f"webhook_token={'***' if self.webhook_token else ''!r})")

    __str__ = __repr__


class StoreConfig(msgspec.Struct, **_STRUCT):
    """Where the images are and how to reach them."""

    endpoint: str = "127.0.0.1:9000"
    """The store's S3 API as host:port, without scheme or path (``secure`` chooses TLS)."""
    public_endpoint: str = ""
    """host:port the algorithm service reaches the store at, used in presigned URLs (empty: ``endpoint``)."""
    secure: bool = False
    """Talk to the store over TLS (https)."""
    ca_bundle: str = ""
    """PEM file of the CA that signed the store's certificate, for a private CA (empty: the system's)."""
    region: str = "us-east-1"
    """The region requests are signed for; set, so presigning needs no network call."""
    bucket: str = "images"
    """The bucket that holds the images."""
    prefix: str = ""
    """Only keys below this prefix are listed and analysed (empty: the whole bucket)."""
    credentials_file: str = ""
    """TOML file with ``access_key`` and ``secret_key``, read instead of the environment."""
    connect_timeout_s: Positive = 2.0
    """Seconds to wait for a connection to the store."""
    list_timeout_s: Positive = 30.0
    """Seconds the supervisor and the lister wait for one store answer (a listing page, a delete)."""


class EventsConfig(msgspec.Struct, **_STRUCT):
    """``[scan.events]``: where change events come from; the watcher process runs exactly this source.

    ``source``: ``seaweed`` tails the filer's metadata log (``filer`` as host:port.grpcport);
    ``minio_webhook`` serves MinIO's bucket notifications on ``webhook_host:webhook_port`` (0: any
    free port); ``minio_nats`` reads them from a JetStream stream through the durable consumer
    ``nats_durable``. The webhook's and the NATS server's token come from the credentials
    (``IMGWORKER_WEBHOOK_TOKEN``), never from here; a password in ``nats_url`` never shows in the repr.
    """

    source: Literal["seaweed", "minio_webhook", "minio_nats"] = "seaweed"
    """Where change events come from: ``seaweed`` (the filer's metadata log), ``minio_webhook`` or
    ``minio_nats``."""
    filer: str = ""
    """seaweed: the filer as host:port.grpcport."""
    webhook_host: str = "127.0.0.1"
    """minio_webhook: the address imgworker serves MinIO's notifications on."""
    webhook_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    """minio_webhook: the port (0: any free port)."""
    nats_url: str = "nats://127.0.0.1:4222"
    """minio_nats: the NATS server; a password in it never shows in logs. In cluster mode not used: the intake
    leader reads MinIO's stream through ``cluster.url``."""
    nats_subject: str = "minio.events"
    """minio_nats: the subject MinIO publishes to (its ``subject`` setting)."""
    nats_stream: str = ""
    """minio_nats: the JetStream stream (empty: the one holding ``nats_subject``); it must exist (MinIO
    does not create it)."""
    nats_durable: str = "imgworker"
    """minio_nats: the durable consumer, which keeps the position across restarts (in cluster mode, the
    one the intake leader reads through, whichever host leads)."""

    def __repr__(self) -> str:
        url = urllib.parse.urlsplit(self.nats_url)
        nats_url = url._replace(netloc=f"***@{url.hostname}:{url.port}").geturl() if url.password else self.nats_url
        return (f"EventsConfig(source={self.source!r}, filer={self.filer!r}, webhook_host={self.webhook_host!r}, "
                f"webhook_port={self.webhook_port!r}, nats_url={nats_url!r}, nats_subject={self.nats_subject!r}, "
                f"nats_stream={self.nats_stream!r}, nats_durable={self.nats_durable!r})")

    __str__ = __repr__


class ScanConfig(msgspec.Struct, **_STRUCT):
    """How the supervisor finds new images: by listing the bucket, or from change events.

    With ``mode = "events"`` new images arrive as the store reports them (``[scan.events]``:
    SeaweedFS's filer metadata subscription, or MinIO bucket notifications to imgworker's webhook
    or through NATS), and a reconciliation listing every ``reconcile_interval_s`` finds whatever the
    events missed.
    """

    mode: Literal["listing", "events"] = "listing"
    """How new images are found: ``listing`` the bucket, or change ``events`` plus a reconciliation listing."""
    interval_s: Positive = 1.0
    """listing: seconds between two listings of the bucket."""
    reconcile_interval_s: Positive = 60.0
    """events: seconds between two reconciliation listings, which find what the events missed."""
    reconcile: Literal["full", "incremental"] = "full"
    """``full`` lists the whole prefix; ``incremental`` lists each task directory from a checkpoint."""
    full_every: PositiveInt = 60
    """incremental: every Nth reconciliation lists everything (it alone prunes and forgets)."""
    events: EventsConfig = EventsConfig()
    """The ``[scan.events]`` table."""
    page_size: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1000
    """Keys per listing page."""
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
    """Only keys ending in one of these (any case) are images."""
    exclude_prefixes: tuple[str, ...] = ("alerts/", "results/")
    """Keys below these prefixes (under ``store.prefix``) are never analysed; ``preview_*`` and hidden keys never
    are either."""


class DispatchConfig(msgspec.Struct, **_STRUCT):
    """The supervisor's bounded pending queue."""

    queue_capacity: PositiveInt = 10_000
    """Images queued for the workers at most; the rest wait in the backlog."""
    overflow: Overflow = "block"
    """A full queue: ``block`` keeps new images in the backlog; ``drop_oldest``/``drop_newest`` end one as
    ``dropped_backlog``."""
    order: Literal["oldest_first", "newest_first"] = "oldest_first"
    """Which queued images go first: ``oldest_first`` or ``newest_first`` (the freshest, when images expire
    elsewhere)."""


Protect = Literal["none", "inflight", "queued", "lease"]


class RetentionConfig(msgspec.Struct, **_STRUCT):
    """imgworker's own cleaner (enabled), and what it knows of a cleaner that is not its own."""

    enabled: bool = False
    """Run imgworker's own cleaner (needs at least one of max_count, max_age_s, max_bytes)."""
    max_count: NonNegativeInt = 0
    """Images kept per task directory, oldest deleted first (0: no limit)."""
    max_count_overrides: dict[str, NonNegativeInt] = {}
    """Per task type or task directory, a max_count of its own: ``{ person = 500, "vehicle/cam-7" = 100 }``."""
    max_age_s: NonNegative = 0.0
    """Images older than this are deleted (0: no limit)."""
    max_bytes: NonNegativeInt = 0
    """Bytes kept below ``store.prefix``, oldest deleted first (0: no limit)."""
    protect: Protect = "lease"
    """What a rule may delete: ``none``, ``inflight``, ``queued`` or ``lease`` (see "Retention without losing
    images"). In cluster mode only ``queued`` and ``lease`` (the intake leader cleans; see "More than one host")."""
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100
    """Keys per batch delete request."""
    external_max_age_s: NonNegative = 0.0
    """Images expire elsewhere after this age (S3 lifecycle, another program); queued ones that would expire first
    are dropped (0: no such rule)."""
    external_max_count: NonNegativeInt = 0
    """Another program keeps only the newest N per task directory; queued images it would delete first are dropped
    (0: no such rule)."""


class WorkerConfig(msgspec.Struct, **_STRUCT):
    """How many worker processes, how many lanes (threads) each, and what a lane does with one image.

    ``count`` processes of ``threads`` lanes each: ``count * threads`` images are analysed at once.
    A lane is a thread with its own minio client and ``requests`` session. More lanes per process
    cost less CPU per image; a process that dies takes every image its lanes held (each is retried).
    ``max_tasks`` and ``max_memory_mb`` recycle a whole process.

    ``threads`` defaults to 8, chosen with ``imgworker tune`` over processes x lanes
    (benchmarks/lanes.py): 8 lanes cost 8-39 % less CPU per image than one process per image and a
    fraction of the memory (each process is an interpreter of about 52 MB). 16 lanes saved little
    more, and would put 64 images in flight by default and 16 in one process's crash.
    """

    count: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 4
    """Worker processes."""
    threads: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8
    """Lanes (threads) per worker process: images analysed at once = count x threads."""
    stat_check: bool = True
    """Check that the image still exists (StatObject) before inference."""
    stat_timeout_s: Positive = 2.0
    """Seconds a lane waits for one store answer (the existence check, presigning)."""
    presign_expiry_s: Annotated[int, msgspec.Meta(ge=1, le=604800)] = 900
    """Lifetime of the presigned GET URL the algorithm service receives."""
    store_retry_budget_s: NonNegative = 30.0
    """Seconds of store outage tolerated per image before it ends ``failed_store``."""
    max_attempts: PositiveInt = 3
    """Worker deaths on one image before it ends ``failed_worker``."""
    max_tasks: NonNegativeInt = 0
    """Recycle a worker process after this many images (0: never)."""
    max_memory_mb: NonNegativeInt = 0
    """Recycle a worker process above this resident memory (0: never)."""
    item_deadline_s: NonNegative = 0.0
    """Seconds a worker may hold one image before it is killed, cause ``deadline`` (0: derived from the store and
    algorithm timeouts and retries)."""


class AlgoConfig(msgspec.Struct, **_STRUCT):
    """The HTTP algorithm service and how it is called."""

    endpoint: str = "http://127.0.0.1:8000/infer"
    """The algorithm service's URL, used when ``endpoints`` is empty."""
    timeout_s: Positive = 60.0
    """Seconds to wait for the service's answer to one call."""
    connect_timeout_s: Positive = 3.0
    """Seconds to wait for a connection to the service."""
    retries: NonNegativeInt = 2
    """Retries of a transient failure (5xx, 429, timeout, refused, malformed answer), each on another healthy
    endpoint if there is one."""
    backoff_base_s: NonNegative = 0.2
    """First backoff between retries; it doubles, jittered."""
    backoff_cap_s: NonNegative = 5.0
    """Longest backoff between retries."""
    max_body_bytes: PositiveInt = 1 << 20
    """Answers longer than this end ``failed_algo`` (``body_too_large``)."""
    algo_config: dict[str, Any] | None = None
    """A table sent as ``algo_config`` with every request (unset: null)."""
    endpoints: tuple[str, ...] = ()
    """Several services: each image goes to the healthy one with the fewest requests in flight."""
    routes: dict[str, tuple[str, ...]] = {}
    """Per task type, its own endpoints: ``{ vehicle = ["http://gpu-3:8000/infer"] }``; other task types use
    ``endpoints``."""
    max_in_flight_per_endpoint: NonNegativeInt = 0
    """Requests in flight per endpoint at most (0: no limit)."""
    eject_after_failures: PositiveInt = 3
    """Consecutive transient failures before an endpoint is ejected."""
    eject_cooldown_s: NonNegative = 10.0
    """Seconds before an ejected endpoint is probed with one image."""
    no_endpoint_budget_s: NonNegative = 300.0
    """Seconds images wait in the queue while no endpoint is healthy, before ``failed_algo``
    (``no_healthy_endpoint``)."""
    trust_env: bool = False
    """Read proxy settings (HTTP(S)_PROXY, NO_PROXY), ~/.netrc and REQUESTS_CA_BUNDLE from the environment."""
    ca_bundle: str = ""
    """CA certificates to verify an https service with (default: certifi's); used whatever trust_env says."""
    adaptive: bool = False
    """A controller sets each endpoint's limit of calls in flight (``adaptive.py``); ``count x threads``
    (and ``max_in_flight_per_endpoint``, if set) is the ceiling."""
    latency_budget_ms: Annotated[float, msgspec.Meta(gt=0)] | None = None
    """With ``adaptive``: keep each endpoint's p95 call latency under this (unset: no budget)."""
    adaptive_min: PositiveInt = 1
    """With ``adaptive``: the lowest limit (for a batching server, at least its preferred batch size)."""


class ActionsConfig(msgspec.Struct, **_STRUCT):
    """Optional result actions, off by default; each failure is counted."""

    delete_no_detection: bool = False
    """Delete images the service found nothing in."""
    copy_alerts: bool = False
    """Copy images with detections below ``alerts_prefix``."""
    alerts_prefix: str = "alerts/"
    """Where copy_alerts writes, below ``store.prefix``; it must be one of ``scan.exclude_prefixes``."""
    write_results: bool = False
    """Write one JSON object per result below ``results_prefix``."""
    results_prefix: str = "results/"
    """Where write_results writes, below ``store.prefix``; it must be one of ``scan.exclude_prefixes``."""


class RunConfig(msgspec.Struct, **_STRUCT):
    """Where state and results go, and when a run ends."""

    state_dir: str = ".imgworker"
    """Where state.json (processed set, queue), results.jsonl and the run lock are kept."""
    results_file: str = ""
    """The results file, if not ``<state_dir>/results.jsonl``."""
    checkpoint_interval_s: Positive = 5.0
    """Seconds between two checkpoints of the state."""
    duration_s: NonNegative = 0.0
    """Stop after this many seconds (0: run until signalled); ``--duration``."""
    until_idle: bool = False
    """Stop once nothing is left to analyse; ``--until-idle``."""
    grace_s: NonNegative = 30.0
    """On SIGTERM, seconds in-flight images may take to finish before their workers are stopped."""
    progress_interval_s: Positive = 1.0
    """Seconds between two progress updates."""
    progress_log_interval_s: Positive = 10.0
    """When stderr is not a terminal, seconds between two plain ``progress:`` log lines."""
    stall_after_s: Positive = 120.0
    """``/healthz`` answers 503 ``stalled`` when images wait, a lane is free and no outcome came for this long."""


class ClusterConfig(msgspec.Struct, **_STRUCT):
    """``[cluster]``: several hosts share one NATS JetStream queue and one outcome ledger (see ``imgworker.cluster``).

    Off while ``url`` is empty: one host, no NATS. Every host of a cluster uses the same names; each
    has its own ``host`` and its own ``run.state_dir``. The NATS credentials come from a ``.creds``
    file (``credentials_file``), never from the main file; a password in ``url`` never shows in the repr.
    """

    url: str = ""
    """The NATS server(s), comma-separated (``nats://`` or ``tls://``); empty: cluster mode off."""
    host: str = ""
    """This host's name in the ledger, the report and the ``host`` metrics label (default: the host name)."""
    stream: str = "IMGWORKER_WORK"
    """The work-queue stream every new image is published to (created if missing)."""
    subject: str = "imgworker.work"
    """The subject of the work stream."""
    consumer: str = "imgworker-lanes"
    """The one durable pull consumer every host fetches from."""
    ledger_bucket: str = "imgworker-outcomes"
    """The KV bucket of outcomes: one key per image, written create-if-absent, never expired."""
    lease_bucket: str = "imgworker-lease"
    """The KV bucket holding the intake leader's lease."""
    ack_wait_s: Annotated[float, msgspec.Meta(ge=1.0)] = 30.0
    """How long a fetched message may go without an ack or a progress note before another host gets it."""
    lease_ttl_s: Annotated[int, msgspec.Meta(ge=1)] = 10
    """How long the intake leader's lease lives unless renewed (renewed every third of it)."""
    max_msgs: PositiveInt = 100_000
    """The work stream's bound; when it is full, intake waits (the backpressure), nothing is dropped."""
    duplicate_window_s: Positive = 120.0
    """Publishes of the same image (``Nats-Msg-Id``) within this window are stored once."""
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    """Copies of the stream and the KV buckets in a JetStream cluster (3 survives one node lost)."""
    credentials_file: str = ""
    """A NATS ``.creds`` file (user JWT and NKey seed); empty: no credentials (or a user:password URL)."""
    ca_bundle: str = ""
    """CA certificates to verify a ``tls://`` server with (default: the system's)."""

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def __repr__(self) -> str:
        urls = []
        for one in self.url.split(","):
            parts = urllib.parse.urlsplit(one.strip())
            urls.append(parts._replace(netloc=f"***@{parts.hostname}:{parts.port}").geturl() if parts.password
                        else one.strip())
        shown = {f: getattr(self, f) for f in self.__struct_fields__ if f != "url"}
        return f"ClusterConfig(url={','.join(urls)!r}, " + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    __str__ = __repr__


class Config(msgspec.Struct, **_STRUCT):
    """Everything imgworker needs, validated once, passed explicitly to every process."""

    store: StoreConfig = StoreConfig()
    scan: ScanConfig = ScanConfig()
    dispatch: DispatchConfig = DispatchConfig()
    worker: WorkerConfig = WorkerConfig()
    algo: AlgoConfig = AlgoConfig()
    run: RunConfig = RunConfig()
    retention: RetentionConfig = RetentionConfig()
    actions: ActionsConfig = ActionsConfig()
    cluster: ClusterConfig = ClusterConfig()
    credentials: Credentials = Credentials()

    @property
    def results_path(self) -> str:
        return self.run.results_file or os.path.join(self.run.state_dir, "results.jsonl")

    @property
    def concurrency(self) -> int:
        """Images analysed at once: worker processes times lanes per process."""
        return self.worker.count * self.worker.threads

    @property
    def item_deadline_s(self) -> float:
        """How long a worker may hold one item before the supervisor kills it (cause ``deadline``).

        Unless set, the longest a healthy worker can legitimately take: the store retries of the
        stat and the presign, every algorithm attempt at its full connect and read timeouts, the
        backoffs between them, and 10 s of slack.
        """
        if self.worker.item_deadline_s:
            return self.worker.item_deadline_s
        w, a = self.worker, self.algo
        store_s = 2 * w.store_retry_budget_s + (w.stat_timeout_s if w.stat_check else 0.0)
        algo_s = (a.retries + 1) * (a.connect_timeout_s + a.timeout_s) + a.retries * a.backoff_cap_s
        return store_s + algo_s + 10.0


SECTIONS: dict[str, type[msgspec.Struct]] = {
    "store": StoreConfig,
    "scan": ScanConfig,
    "dispatch": DispatchConfig,
    "worker": WorkerConfig,
    "algo": AlgoConfig,
    "run": RunConfig,
    "retention": RetentionConfig,
    "actions": ActionsConfig,
    "cluster": ClusterConfig,
}

#: ``[scan]`` keys of earlier versions, still read (with a warning): each is the ``[scan.events]`` key named here.
SCAN_EVENTS_ALIASES = {
    "events_source": "source",
    "events_filer": "filer",
    "webhook_host": "webhook_host",
    "webhook_port": "webhook_port",
    "nats_url": "nats_url",
    "nats_subject": "nats_subject",
    "nats_stream": "nats_stream",
    "nats_durable": "nats_durable",
}

_ENV_PREFIX = "IMGWORKER_"
_CREDENTIAL_ENV = {
    "access_key": ("IMGWORKER_ACCESS_KEY", "AWS_ACCESS_KEY_ID"),
    "secret_key": ("IMGWORKER_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"),
    "webhook_token": ("IMGWORKER_WEBHOOK_TOKEN",),
}


def load_config(
    *,
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    flags: Mapping[str, str] | None = None,
) -> Config:
    """Build the Config from file, environment and flag overrides, or raise ConfigError.

    ``flags`` names the command-line flag of each dotted override key, so an error can say where a
    bad value came from (the file, an ``IMGWORKER_*`` variable, or a flag).
    """
    env = os.environ if env is None else env
    written: dict[str, str] = {}  # a key set through an old alias -> the alias, for error messages
    origins: dict[str, str] = {}  # dotted key -> where its value came from (the last layer that set it)
    layer = _read_toml(path) if path else {}
    _note_origins(origins, layer, lambda key: f"config file {path}")
    raw = _nest_aliases(layer, written)
    env_layer = env_overrides(env)
    _note_origins(origins, env_layer, lambda key: f"environment variable {_env_name(key)}")
    _merge(raw, _nest_aliases(env_layer, written))
    flag_layer = {k: dict(v) for k, v in (overrides or {}).items()}
    _note_origins(origins, flag_layer, lambda key: f"flag {flags[key]}" if flags and key in flags else "")
    _merge(raw, _nest_aliases(flag_layer, written))
    config = _convert(raw, written, origins)
    creds = load_credentials(env=env, credentials_file=config.store.credentials_file)
    if config.scan.mode == "events" and config.scan.events.source == "minio_webhook" and not creds.webhook_token:
        raise ConfigError(f"{written.get('scan.events.source', 'scan.events.source')} = 'minio_webhook' needs a "
                          "token: set IMGWORKER_WEBHOOK_TOKEN (the auth_token of MinIO's webhook target)")
    return msgspec.structs.replace(config, credentials=creds)


def _note_origins(origins: dict[str, str], layer: Mapping[str, Any], where: Any, above: str = "") -> None:
    """Record ``where(key)`` for each dotted key ``layer`` sets (a later layer overwrites an earlier one)."""
    for name, value in layer.items():
        key = f"{above}.{name}" if above else name
        if isinstance(value, Mapping) and (not above or name in _subtables(above)):
            origins.setdefault(key, where(key))  # the table itself, for an unknown key in it
            _note_origins(origins, value, where, key)
        else:
            origins[key] = where(key)


def _env_name(key: str) -> str:
    """The ``IMGWORKER_*`` variable that sets a dotted key."""
    return _ENV_PREFIX + key.replace(".", "_").upper()


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _merge(into: dict[str, Any], extra: Mapping[str, Mapping[str, Any]]) -> None:
    """Later values win; a sub-table (``scan.events``) is merged key by key, other tables replaced whole."""
    for section, values in extra.items():
        current = into.setdefault(section, {})
        if not isinstance(current, dict):
            raise ConfigError(f"config key {section!r} must be a table, got {current!r}")
        for key, value in values.items():
            below = current.get(key)
            if key in _subtables(section) and isinstance(below, dict) and isinstance(value, dict):
                value = {**below, **value}
            current[key] = value


def _nest_aliases(layer: dict[str, Any], written: dict[str, str]) -> dict[str, Any]:
    """``layer`` with the old flat ``[scan]`` event keys moved into ``[scan.events]``; ``written`` notes each move.

    ``written`` maps ``scan.events.<key>`` to the alias it was set through, so that an error names the
    key the user wrote; a later layer that sets the key the new way takes it out again.
    """
    scan = layer.get("scan")
    events = scan.get("events", {}) if isinstance(scan, dict) else None
    if not isinstance(scan, dict) or not isinstance(events, dict):
        return layer  # not tables: the conversion names the mistake
    for key in events:
        written.pop(f"scan.events.{key}", None)
    moved = {}
    for old, new in SCAN_EVENTS_ALIASES.items():
        if old not in scan:
            continue
        if new in events:
            raise ConfigError(f"config keys scan.{old} and scan.events.{new} are both set: keep scan.events.{new}")
        moved[new] = scan[old]
        written[f"scan.events.{new}"] = f"scan.{old}"
        log.warning("config key scan.%s is deprecated: set %s in [scan.events] (IMGWORKER_SCAN_EVENTS_%s)",
                    old, new, new.upper())
    if not moved:
        return layer
    scan = {k: v for k, v in scan.items() if k not in SCAN_EVENTS_ALIASES}
    return {**layer, "scan": {**scan, "events": {**events, **moved}}}


def env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Map ``IMGWORKER_SECTION_KEY=value`` variables onto config sections.

    A sub-table's keys are ``IMGWORKER_SECTION_TABLE_KEY``: ``IMGWORKER_SCAN_EVENTS_FILER`` is
    ``filer`` in ``[scan.events]``.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, value in env.items():
        if not name.startswith(_ENV_PREFIX) or name in ("IMGWORKER_ACCESS_KEY", "IMGWORKER_SECRET_KEY",
                                                          "IMGWORKER_WEBHOOK_TOKEN"):
            continue
        rest = name[len(_ENV_PREFIX):].lower()
        section = next((s for s in SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            near = difflib.get_close_matches(name, _env_names(), n=1)
            hint = f"did you mean {near[0]}?" if near else "the sections are " + ", ".join(f"[{s}]" for s in SECTIONS)
            raise ConfigError(f"environment variable {name} names no config key: {hint}")
        key = rest[len(section) + 1:]
        table = next((t for t in _subtables(section) if key.startswith(t + "_")), None)
        if table is None:
            out.setdefault(section, {})[key] = _env_value(f"{section}.{key}", value)
        else:
            sub = key[len(table) + 1:]
            out.setdefault(section, {}).setdefault(table, {})[sub] = _env_value(f"{section}.{table}.{sub}", value)
    return out


def _env_names() -> list[str]:
    """Every ``IMGWORKER_*`` variable that sets a config key."""
    names = []
    for section, cls in SECTIONS.items():
        tables = _subtables(section)
        for f in msgspec.structs.fields(cls):
            sub = tables.get(f.name)
            keys = [f"{f.name}.{g.name}" for g in msgspec.structs.fields(sub)] if sub else [f.name]
            names += [_env_name(f"{section}.{key}") for key in keys]
    return names


def _subtables(section: str) -> dict[str, type[msgspec.Struct]]:
    """The keys of ``[section]`` that are tables of their own, such as ``events`` in ``[scan]``."""
    cls = SECTIONS.get(section)
    fields = msgspec.structs.fields(cls) if cls is not None else ()
    return {f.name: f.type for f in fields if isinstance(f.type, type) and issubclass(f.type, msgspec.Struct)}


def _field_type(key: str) -> Any:
    """The declared type of a dotted config key (``scan.events.source``); None if there is no such key."""
    section, *path = key.split(".")
    kind: Any = SECTIONS.get(section)
    for name in path:
        if not (isinstance(kind, type) and issubclass(kind, msgspec.Struct)):
            return None
        kind = {f.name: f.type for f in msgspec.structs.fields(kind)}.get(name)
    return kind if path else None


def _env_value(key: str, value: str) -> Any:
    """Environment values are strings; lists are comma-separated, tables are JSON."""
    kind = _field_type(key)
    if kind is not None and "tuple" in str(kind):
        return [part.strip() for part in value.split(",") if part.strip()]
    if kind is not None and "dict" in str(kind):
        try:
            return msgspec.json.decode(value)
        except msgspec.DecodeError:
            raise ConfigError(f"config key {key}: value {value!r} is not a JSON object") from None
    return value


def _convert(raw: dict[str, Any], written: Mapping[str, str] | None = None,
             origins: Mapping[str, str] | None = None) -> Config:
    if "credentials" in raw:
        raise ConfigError("credentials are not read from the config: use the environment or store.credentials_file")
    for section in ("store",):
        for secret in ("access_key", "secret_key"):
            if secret in raw.get(section, {}):
                raise ConfigError(
                    f"config key {section}.{secret} is not allowed: put credentials in the environment "
                    "(IMGWORKER_ACCESS_KEY, IMGWORKER_SECRET_KEY) or in store.credentials_file"
                )
    try:
        config = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc, raw, written or {}, origins or {})) from None
    _check_semantics(config, written or {})
    return config


_PATH = re.compile(r"at `\$\.([\w.]+)`")
_UNKNOWN = re.compile(r"Object contains unknown field `([^`]*)`")
_EXPECTED = re.compile(r"Expected `(\w+)`(?:, got `\w+`)?")
_KINDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "a string",
          "array": "a list", "object": "a table"}


def _explain(exc: msgspec.ValidationError, raw: dict[str, Any], written: Mapping[str, str],
             origins: Mapping[str, str] | None = None) -> str:
    """A message naming the key (as the user wrote it), where its value came from, the value and what is allowed."""
    origins = origins or {}
    text = str(exc)
    unknown = _UNKNOWN.match(text)
    match = _PATH.search(text)
    if unknown:
        return _unknown_key(unknown.group(1), match.group(1) if match else "", origins)
    if not match:
        return f"invalid config: {text}"
    key = match.group(1)
    value: Any = raw
    for part in key.split("."):
        value = value.get(part, "<missing>") if isinstance(value, dict) else "<missing>"
    allowed = _EXPECTED.sub(lambda m: _KINDS.get(m.group(1), m.group(1)), text[: match.start()].rstrip(" -"))
    choices = _choices(key)
    if choices:
        allowed = "one of " + ", ".join(choices)
    source = f"; it came from the {origins[key]}" if origins.get(key) else ""
    return f"invalid config key {written.get(key, key)}: value {value!r} is not allowed ({allowed}){source}"


def _unknown_key(name: str, table: str, origins: Mapping[str, str]) -> str:
    """An unknown section or key: the nearest valid one, or the valid ones, and where it was written."""
    key = f"{table}.{name}" if table else name
    source = f" (from the {origins[key]})" if origins.get(key) else ""
    if not table:
        valid = list(SECTIONS)
        near = difflib.get_close_matches(name, valid, n=1)
        hint = f"did you mean [{near[0]}]? " if near else ""
        return f"unknown config section [{name}]{source}: {hint}the sections are " + ", ".join(f"[{v}]" for v in valid)
    kind = _field_type(table) if "." in table else SECTIONS.get(table)
    valid = [f.name for f in msgspec.structs.fields(kind)] if isinstance(kind, type) else []
    near = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean `{near[0]}`?" if near else "the keys of [" + table + "] are " + ", ".join(valid)
    return f"unknown config key {key}{source} in [{table}]: {hint}"


def _choices(key: str) -> tuple[str, ...]:
    """The allowed values of a Literal-typed field, if it is one."""
    kind = _field_type(key)
    return tuple(str(a) for a in typing.get_args(kind)) if typing.get_origin(kind) is Literal else ()


def _check_semantics(config: Config, written: Mapping[str, str]) -> None:
    """Rules a type cannot express."""
    if not config.store.bucket:
        raise ConfigError("invalid config key store.bucket: value '' is not allowed (a bucket name is required)")
    urls = [("algo.endpoint", config.algo.endpoint)] + [("algo.endpoints", u) for u in config.algo.endpoints]
    urls += [(f"algo.routes.{t}", u) for t, route in config.algo.routes.items() for u in route]
    for key, url in urls:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"invalid config key {key}: value {url!r} is not allowed (an http:// or https:// URL)")
    _check_readable("algo.ca_bundle", config.algo.ca_bundle)
    empty = [t for t, route in config.algo.routes.items() if not route]
    if empty:
        raise ConfigError(f"invalid config key algo.routes.{empty[0]}: value [] is not allowed (at least one URL)")
    for key in (config.store.endpoint, config.store.public_endpoint):
        if "://" in key or "/" in key:
            raise ConfigError(
                f"invalid config key store.endpoint: value {key!r} is not allowed (host:port, without scheme or path;"
                " use store.secure for TLS)"
            )
    retention = config.retention
    if retention.enabled and not (retention.max_count or retention.max_age_s or retention.max_bytes):
        raise ConfigError(
            "invalid config key retention.enabled: value True is not allowed without a rule "
            "(set retention.max_count, retention.max_age_s or retention.max_bytes)"
        )
    scan = config.scan
    if scan.mode == "events" and scan.events.source == "seaweed" and not scan.events.filer:
        filer, source = (written.get(k, k) for k in ("scan.events.filer", "scan.events.source"))
        raise ConfigError(f"invalid config key {filer}: value '' is not allowed with scan.mode = 'events' and "
                          f"{source} = 'seaweed' (the filer as host:port.grpcport, e.g. 127.0.0.1:8888.18888)")
    if scan.reconcile == "incremental" and config.retention.enabled:
        raise ConfigError("invalid config key scan.reconcile: value 'incremental' is not allowed with "
                          "retention.enabled (the cleaner needs a complete listing every pass)")
    bad = [e for e in config.scan.extensions if not e.startswith(".")]
    if bad:
        raise ConfigError(f"invalid config key scan.extensions: value {bad!r} is not allowed (each starts with '.')")
    _check_action_prefixes(config)
    _check_cluster(config)
    _check_adaptive(config)


def _check_cluster(config: Config) -> None:
    """Cluster mode: NATS URLs, readable credentials, and what it does not run yet (the cleaner; change events
    other than MinIO's through NATS, which the intake leader reads itself)."""
    cluster = config.cluster
    if not cluster.enabled:
        return
    for url in cluster.url.split(","):
        if not url.strip().startswith(("nats://", "tls://")):
            raise ConfigError(f"invalid config key cluster.url: value {url.strip()!r} is not allowed "
                              "(nats://host:port or tls://host:port, comma-separated)")
    _check_readable("cluster.credentials_file", cluster.credentials_file)
    _check_readable("cluster.ca_bundle", cluster.ca_bundle)
    if config.retention.enabled and config.retention.protect in ("none", "inflight"):
        raise ConfigError(f"invalid config key retention.protect: value {config.retention.protect!r} is not allowed "
                          "with cluster.url (in cluster mode the cleaner runs on the intake leader, which cannot "
                          "know which image a lane on another host holds: use 'queued' or 'lease')")
    if config.scan.mode == "events" and config.scan.events.source != "minio_nats":
        raise ConfigError(f"invalid config key scan.events.source: value {config.scan.events.source!r} is not allowed "
                          "with cluster.url (in cluster mode only 'minio_nats': the intake leader reads MinIO's "
                          "stream through cluster.url)")


def _check_adaptive(config: Config) -> None:
    """The adaptive limit's floor must fit under its ceiling; a budget without the controller does nothing."""
    algo = config.algo
    if algo.latency_budget_ms is not None and not algo.adaptive:
        raise ConfigError(f"invalid config key algo.latency_budget_ms: value {algo.latency_budget_ms!r} is not allowed "
                          "without algo.adaptive = true (only the adaptive controller holds a budget): set "
                          "adaptive = true beside it, or remove it (run --adaptive turns the controller on for that "
                          "run only; check, loadgen, retry and report read the file without it)")
    ceiling = config.concurrency
    if algo.max_in_flight_per_endpoint:
        ceiling = min(ceiling, algo.max_in_flight_per_endpoint)
    if algo.adaptive and algo.adaptive_min > ceiling:
        raise ConfigError(f"invalid config key algo.adaptive_min: value {algo.adaptive_min!r} is not allowed (at most "
                          f"the ceiling {ceiling}: worker.count x worker.threads, or max_in_flight_per_endpoint)")


def _check_readable(key: str, path: str) -> None:
    """A file every call needs is checked at start: a missing one would fail every image alike."""
    if not path:
        return
    if not os.path.exists(path):
        raise ConfigError(f"invalid config key {key}: file {path!r} does not exist")
    if not os.access(path, os.R_OK) or not (os.path.isfile(path) or os.path.isdir(path)):
        raise ConfigError(f"invalid config key {key}: file {path!r} cannot be read")


def _check_action_prefixes(config: Config) -> None:
    """An enabled copy action must write below an excluded prefix, or its copies are listed again forever."""
    actions, excluded = config.actions, list(config.scan.exclude_prefixes)
    checks = (
        ("alerts_prefix", actions.copy_alerts, actions.alerts_prefix),
        ("results_prefix", actions.write_results, actions.results_prefix),
    )
    for name, on, prefix in checks:
        if not on:
            continue
        if not prefix:
            raise ConfigError(
                f"invalid config key actions.{name}: value '' is not allowed while the action is on "
                "(a prefix below store.prefix, listed in scan.exclude_prefixes)"
            )
        if not any(prefix.startswith(e) for e in excluded):
            raise ConfigError(
                f"invalid config key actions.{name}: value {prefix!r} is not allowed (it must start with one of "
                f"scan.exclude_prefixes {excluded!r}, or the copies would be analysed again)"
            )


def load_credentials(*, env: Mapping[str, str], credentials_file: str) -> Credentials:
    """Credentials from a TOML file with access_key/secret_key, else from the environment."""
    if credentials_file:
        data = _read_toml(credentials_file)
        try:
            return msgspec.convert(data, Credentials)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"credentials file {credentials_file}: {exc}") from None
    found = {field: next((env[n] for n in names if env.get(n)), "") for field, names in _CREDENTIAL_ENV.items()}
    return Credentials(**found)
