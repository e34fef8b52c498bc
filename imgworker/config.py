"""The one validated, immutable configuration value.

Sources, lowest precedence first: built-in defaults, a TOML file, ``IMGWORKER_<SECTION>_<KEY>``
environment variables, command-line flags. Store credentials never come from a flag or from the
main file: they come from ``IMGWORKER_ACCESS_KEY``/``IMGWORKER_SECRET_KEY`` (or the standard
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``) or from ``store.credentials_file``.
"""

from __future__ import annotations

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
    public_endpoint: str = ""
    secure: bool = False
    ca_bundle: str = ""
    region: str = "us-east-1"
    bucket: str = "images"
    prefix: str = ""
    credentials_file: str = ""
    connect_timeout_s: Positive = 2.0
    list_timeout_s: Positive = 30.0


class EventsConfig(msgspec.Struct, **_STRUCT):
    """``[scan.events]``: where change events come from; the watcher process runs exactly this source.

    ``source``: ``seaweed`` tails the filer's metadata log (``filer`` as host:port.grpcport);
    ``minio_webhook`` serves MinIO's bucket notifications on ``webhook_host:webhook_port`` (0: any
    free port); ``minio_nats`` reads them from a JetStream stream through the durable consumer
    ``nats_durable``. The webhook's and the NATS server's token come from the credentials
    (``IMGWORKER_WEBHOOK_TOKEN``), never from here; a password in ``nats_url`` never shows in the repr.
    """

    source: Literal["seaweed", "minio_webhook", "minio_nats"] = "seaweed"
    filer: str = ""
    webhook_host: str = "127.0.0.1"
    webhook_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    nats_url: str = "nats://127.0.0.1:4222"
    nats_subject: str = "minio.events"  # the subject MinIO publishes to (its ``subject`` setting)
    nats_stream: str = ""  # the JetStream stream; empty = the one holding ``nats_subject``
    nats_durable: str = "imgworker"  # the durable consumer, which keeps the position

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
    interval_s: Positive = 1.0
    reconcile_interval_s: Positive = 60.0
    reconcile: Literal["full", "incremental"] = "full"
    full_every: PositiveInt = 60  # incremental: every Nth reconciliation lists everything (prunes, forgets)
    events: EventsConfig = EventsConfig()
    page_size: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1000
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
    exclude_prefixes: tuple[str, ...] = ("alerts/", "results/")


class DispatchConfig(msgspec.Struct, **_STRUCT):
    """The supervisor's bounded pending queue."""

    queue_capacity: PositiveInt = 10_000
    overflow: Overflow = "block"
    order: Literal["oldest_first", "newest_first"] = "oldest_first"


Protect = Literal["none", "inflight", "queued", "lease"]


class RetentionConfig(msgspec.Struct, **_STRUCT):
    """imgworker's own cleaner (enabled), and what it knows of a cleaner that is not its own."""

    enabled: bool = False
    max_count: NonNegativeInt = 0
    max_count_overrides: dict[str, NonNegativeInt] = {}
    max_age_s: NonNegative = 0.0
    max_bytes: NonNegativeInt = 0
    protect: Protect = "lease"
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100
    external_max_age_s: NonNegative = 0.0
    external_max_count: NonNegativeInt = 0


class WorkerConfig(msgspec.Struct, **_STRUCT):
    """How many worker processes, how many lanes (threads) each, and what a lane does with one image.

    ``count`` processes of ``threads`` lanes each: ``count * threads`` images are analysed at once.
    A lane is a thread with its own minio client and ``requests`` session. More lanes per process
    cost less CPU per image; a process that dies takes every image its lanes held (each is retried).
    ``max_tasks`` and ``max_memory_mb`` recycle a whole process.
    """

    count: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 4
    threads: Annotated[int, msgspec.Meta(ge=1, le=256)] = 1
    stat_check: bool = True
    stat_timeout_s: Positive = 2.0
    presign_expiry_s: Annotated[int, msgspec.Meta(ge=1, le=604800)] = 900
    store_retry_budget_s: NonNegative = 30.0
    max_attempts: PositiveInt = 3
    max_tasks: NonNegativeInt = 0
    max_memory_mb: NonNegativeInt = 0
    item_deadline_s: NonNegative = 0.0  # 0: derived from the store and algorithm timeouts (Config.item_deadline_s)


class AlgoConfig(msgspec.Struct, **_STRUCT):
    """The HTTP algorithm service and how it is called."""

    endpoint: str = "http://127.0.0.1:8000/infer"
    timeout_s: Positive = 60.0
    connect_timeout_s: Positive = 3.0
    retries: NonNegativeInt = 2
    backoff_base_s: NonNegative = 0.2
    backoff_cap_s: NonNegative = 5.0
    max_body_bytes: PositiveInt = 1 << 20
    algo_config: dict[str, Any] | None = None
    endpoints: tuple[str, ...] = ()
    routes: dict[str, tuple[str, ...]] = {}
    max_in_flight_per_endpoint: NonNegativeInt = 0
    eject_after_failures: PositiveInt = 3
    eject_cooldown_s: NonNegative = 10.0
    no_endpoint_budget_s: NonNegative = 300.0
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
    copy_alerts: bool = False
    alerts_prefix: str = "alerts/"
    write_results: bool = False
    results_prefix: str = "results/"


class RunConfig(msgspec.Struct, **_STRUCT):
    """Where state and results go, and when a run ends."""

    state_dir: str = ".imgworker"
    results_file: str = ""
    checkpoint_interval_s: Positive = 5.0
    duration_s: NonNegative = 0.0
    until_idle: bool = False
    grace_s: NonNegative = 30.0
    progress_interval_s: Positive = 1.0


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
) -> Config:
    """Build the Config from file, environment and flag overrides, or raise ConfigError."""
    env = os.environ if env is None else env
    written: dict[str, str] = {}  # a key set through an old alias -> the alias, for error messages
    raw = _nest_aliases(_read_toml(path) if path else {}, written)
    _merge(raw, _nest_aliases(env_overrides(env), written))
    _merge(raw, _nest_aliases({k: dict(v) for k, v in (overrides or {}).items()}, written))
    config = _convert(raw, written)
    creds = load_credentials(env=env, credentials_file=config.store.credentials_file)
    if config.scan.mode == "events" and config.scan.events.source == "minio_webhook" and not creds.webhook_token:
        raise ConfigError(f"{written.get('scan.events.source', 'scan.events.source')} = 'minio_webhook' needs a "
                          "token: set IMGWORKER_WEBHOOK_TOKEN (the auth_token of MinIO's webhook target)")
    return msgspec.structs.replace(config, credentials=creds)


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
            continue
        key = rest[len(section) + 1:]
        table = next((t for t in _subtables(section) if key.startswith(t + "_")), None)
        if table is None:
            out.setdefault(section, {})[key] = _env_value(f"{section}.{key}", value)
        else:
            sub = key[len(table) + 1:]
            out.setdefault(section, {}).setdefault(table, {})[sub] = _env_value(f"{section}.{table}.{sub}", value)
    return out


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


def _convert(raw: dict[str, Any], written: Mapping[str, str] | None = None) -> Config:
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
        raise ConfigError(_explain(exc, raw, written or {})) from None
    _check_semantics(config, written or {})
    return config


_PATH = re.compile(r"at `\$\.([\w.]+)`")


def _explain(exc: msgspec.ValidationError, raw: dict[str, Any], written: Mapping[str, str]) -> str:
    """Turn msgspec's message into one naming the key (as the user wrote it), the value and what is allowed."""
    text = str(exc)
    match = _PATH.search(text)
    if not match:
        return f"invalid config: {text}"
    key = match.group(1)
    value: Any = raw
    for part in key.split("."):
        value = value.get(part, "<missing>") if isinstance(value, dict) else "<missing>"
    allowed = text[: match.start()].rstrip(" -")
    if allowed.startswith("Object contains unknown field"):
        return f"invalid config: {allowed} in [{key}]"
    choices = _choices(key)
    if choices:
        allowed = "one of " + ", ".join(choices)
    return f"invalid config key {written.get(key, key)}: value {value!r} is not allowed ({allowed})"


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
    _check_adaptive(config)


def _check_adaptive(config: Config) -> None:
    """The adaptive limit's floor must fit under its ceiling; a budget without the controller does nothing."""
    algo = config.algo
    if algo.latency_budget_ms is not None and not algo.adaptive:
        raise ConfigError(f"invalid config key algo.latency_budget_ms: value {algo.latency_budget_ms!r} is not allowed "
                          "without algo.adaptive = true (only the adaptive controller holds a budget)")
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
