"""Preflight checks (``imgworker check``, and the endpoint check ``run`` makes at start).

Each check is one ``Check``: what was checked, whether it passed, and what was seen. The store
checks go in order (reachable, credentials, bucket, one listing page), each only once the one
before passed. Then every algorithm endpoint and route gets one request, for a real image of the
listing when there is one (its presigned URL is sent, never shown). The request names itself:
``task_id`` ``imgworker-check`` and ``image_path`` ``imgworker-check/<key>``, so the service's
logs and counters tell it from work. With no image, an answer of 2xx or 4xx means the service
answers (it could not fetch a made-up image); a 5xx means it, or a proxy in front of it, fails.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import msgspec

from .algo_client import AlgoAnswer, AlgoClient, AlgoRequest
from .config import Config
from .endpoints import display_url
from .errors import AlgoPermanent, AlgoTransient, ExitCode, ImageGone, StoreError, StoreFatal
from .outcomes import ImageRef
from .ports import ObjectStore
from .scanner import select_images

#: The longest one endpoint check of ``imgworker check`` waits for its answer (the configured timeout, if shorter).
CHECK_TIMEOUT_S = 15.0
#: The same for the check ``run`` makes at start: it only warns, and it holds up the start.
START_CHECK_TIMEOUT_S = 5.0
CHECK_TASK_ID = "imgworker-check"


class Check(msgspec.Struct, frozen=True):
    """One line of the preflight: what was checked, the result, and the exit code a failure means."""

    what: str
    ok: bool
    detail: str
    code: ExitCode = ExitCode.OK

    def line(self) -> str:
        return f"check: {'ok  ' if self.ok else 'FAIL'} {self.what}: {self.detail}"


def check_store(cfg: Config, store: ObjectStore) -> tuple[list[Check], ImageRef | None]:
    """Reachable, credentials, bucket, one listing page; the checks, and an image of that page (if any)."""
    where = cfg.store.endpoint
    reach = f"store reachable at {where}"
    creds = "store accepts the credentials"
    bucket = f"bucket {cfg.store.bucket!r} exists"
    try:
        store.check()
    except StoreFatal as exc:
        code = ExitCode(exc.exit_code)
        if code in (ExitCode.STORE_UNREACHABLE, ExitCode.STORE_TLS):
            return [Check(reach, False, str(exc), code)], None
        if code == ExitCode.STORE_CREDENTIALS:
            return [Check(reach, True, "it answered"), Check(creds, False, str(exc), code)], None
        return [Check(reach, True, "it answered"), Check(creds, True, "accepted"),
                Check(bucket, False, str(exc), code)], None
    checks = [Check(reach, True, "it answered"), Check(creds, True, "accepted"), Check(bucket, True, "yes")]
    listing, sample = _list_one_page(cfg, store)
    return checks + [listing], sample


def _list_one_page(cfg: Config, store: ObjectStore) -> tuple[Check, ImageRef | None]:
    what = f"list one page under prefix {cfg.store.prefix!r}"
    try:
        page = next(iter(store.list_pages(cfg.store.prefix, cfg.scan.page_size)), [])
    except StoreError as exc:
        return Check(what, False, str(exc), ExitCode.STORE_UNREACHABLE), None
    images = select_images(page, prefix=cfg.store.prefix, cfg=cfg.scan)
    detail = f"{len(page):,} objects, {len(images):,} of them images"
    return Check(what, True, detail), images[0] if images else None


def check_cluster(cfg: Config) -> list[Check]:
    """Cluster mode: one connection to ``cluster.url``, and JetStream answers on it; no check without ``[cluster]``."""
    if not cfg.cluster.enabled:
        return []
    from .cluster.jetstream import ClusterUnavailable, probe

    where = ", ".join(display_url(u.strip()) for u in cfg.cluster.url.split(","))
    what = f"NATS server with JetStream at {where}"
    try:
        return [Check(what, True, probe(cfg.cluster))]
    except ClusterUnavailable as exc:
        cause = re.sub(r"//[^/@\s]*@", "//", str(exc))  # never a user:password of the URL
        return [Check(what, False, cause, ExitCode.STORE_UNREACHABLE)]


def sample_image(cfg: Config, store: ObjectStore) -> tuple[bool, ImageRef | None]:
    """(whether the store could be listed, an image of its first listing page or None)."""
    try:
        page = next(iter(store.list_pages(cfg.store.prefix, cfg.scan.page_size)), [])
    except StoreError:
        return False, None
    images = select_images(page, prefix=cfg.store.prefix, cfg=cfg.scan)
    return True, images[0] if images else None


def targets(cfg: Config, sample: ImageRef | None) -> list[tuple[str, str]]:
    """(endpoint URL, task type) for every default endpoint and every route, once each."""
    default_type = sample.task_type if sample is not None else ""
    pairs = [(url, default_type) for url in (cfg.algo.endpoints or (cfg.algo.endpoint,))]
    pairs += [(url, task_type) for task_type, route in cfg.algo.routes.items() for url in route]
    return list(dict.fromkeys(pairs))


def check_endpoints(cfg: Config, store: ObjectStore | None, sample: ImageRef | None, *,
                    timeout_s: float = CHECK_TIMEOUT_S) -> list[Check]:
    """One request to each endpoint and route, at the same time; one Check each, in ``targets`` order."""
    url = ""
    if store is not None and sample is not None:
        try:
            url = store.presign(sample.key, cfg.worker.presign_expiry_s)
        except StoreError:
            url = ""
    timeout = min(cfg.algo.timeout_s, timeout_s)
    client = AlgoClient(msgspec.structs.replace(cfg.algo, timeout_s=timeout))
    pairs = targets(cfg, sample)
    key = sample.key if url and sample is not None else ""
    try:
        with ThreadPoolExecutor(max_workers=min(8, len(pairs)), thread_name_prefix="check") as pool:
            calls = [pool.submit(_one, client, endpoint, task_type, key, url, cfg) for endpoint, task_type in pairs]
            return [call.result() for call in calls]
    finally:
        client.close()


def _one(client: AlgoClient, endpoint: str, task_type: str, key: str, url: str, cfg: Config) -> Check:
    route = f" (route {task_type!r})" if task_type and task_type in cfg.algo.routes else ""
    what = f"algorithm endpoint {display_url(endpoint)}{route}"
    sent = f"image {key}" if key else "no image (none found under the prefix; image_url was empty)"
    request = AlgoRequest(image_url=url, task_id=CHECK_TASK_ID, task_type=task_type,
                          image_path=f"{CHECK_TASK_ID}/{key}" if key else CHECK_TASK_ID,
                          algo_config=cfg.algo.algo_config)
    try:
        answer = client.infer(request, endpoint)
    except ImageGone:
        if not key:
            return Check(what, True, f"it answers (HTTP 404 to a request with {sent})")
        return Check(what, False, f"HTTP 404 for {sent}: the service could not fetch it through the presigned "
                     "URL (is store.public_endpoint the address the service reaches the store at?)",
                     ExitCode.ALGO_UNAVAILABLE)
    except AlgoPermanent as exc:
        if not key:
            return Check(what, True, f"it answers ({exc.cause} to a request with {sent})")
        return Check(what, False, f"{exc} for {sent}", ExitCode.ALGO_UNAVAILABLE)
    except AlgoTransient as exc:
        if not key and exc.cause.startswith("http_") and not _server_error(exc.cause):
            return Check(what, True, f"it answers ({exc.cause} to a request with {sent}; a real call was not tried)")
        if not key and exc.cause.startswith("http_"):
            return Check(what, False, f"it fails: {exc.cause} to a request with {sent}: the service, or a proxy in "
                         "front of it, is failing (an image under the prefix would make a real call)",
                         ExitCode.ALGO_UNAVAILABLE)
        return Check(what, False, f"{_transient(exc)} (sent {sent}, waited at most {client.cfg.timeout_s:g} s)",
                     ExitCode.ALGO_UNAVAILABLE)
    return Check(what, True, _answered(answer, sent))


def _server_error(cause: str) -> bool:
    """A 5xx: the service (or a proxy in front of a dead one) fails, whatever the request named."""
    return cause.startswith("http_5")


def _transient(exc: AlgoTransient) -> str:
    if exc.cause == "connection_error":
        return "nothing answers: connection refused or reset (is the service running at that address?)"
    if exc.cause == "timeout":
        return "no answer within the timeout"
    return f"it fails: {exc}"


def _answered(answer: AlgoAnswer, sent: str) -> str:
    if answer.success:
        return f"answered success=true, {answer.detections} detections, in {answer.elapsed_ms:.0f} ms for {sent}"
    error = f" (error: {answer.error!r})" if answer.error else ""
    return f"answered success=false{error} in {answer.elapsed_ms:.0f} ms for {sent}"


def failed(checks: list[Check]) -> list[Check]:
    return [c for c in checks if not c.ok]

