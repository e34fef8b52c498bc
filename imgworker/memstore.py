"""An in-memory object store and algorithm service, so the supervisor can be tested without servers.

``MemoryStore`` has the public interface of ``store.Store`` and raises the same errors for the
same reasons; ``MemoryAlgo`` implements the worker's ``AlgoOps`` and fetches images through the
store's presigned URLs, the way the reference algorithm service does. Together they let a test
drive the worker and the supervisor's interleavings (deletes on a background thread, images
vanishing mid-run, outages) fast and deterministically. They replace no real-server test: the
integration tests against the embedded store and the HTTP algorithm service stay.

Faults a test can switch on::

    store.set_outage(True)          every store call raises StoreUnavailable (check: StoreFatal)
    store.refuse_deletes({"k"})     delete() returns "k" among the refused keys
    algo.down.add(endpoint)         calls to that endpoint raise AlgoTransient("connection_error")
    MemoryAlgo(..., fail=hook)      hook(image_path) returns an exception to raise, or None

What a test can assert on: ``store.calls`` and ``store.deletes``; ``algo.calls`` and ``algo.endpoints``.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .algo_client import AlgoAnswer, AlgoRequest
from .errors import AlgoTransient, ExitCode, ImageGone, ObjectMissing, StoreFatal, StoreUnavailable
from .outcomes import ImageRef

__all__ = ["MemoryAlgo", "MemoryStore"]

_SCHEME = "mem"
_OUTAGE_MESSAGE = "store unreachable: ConnectionRefusedError"  # what store.translate says for a refused connection


class MemoryStore:
    """A bucket kept in a dict ``key -> (data, mtime)``; thread-safe, with switchable faults."""

    def __init__(self, bucket: str = "images", *, clock: Callable[[], float] = time.time) -> None:
        self._bucket = bucket
        self._clock = clock
        self._lock = threading.Lock()
        self._objects: dict[str, tuple[bytes, float]] = {}
        self._outage = False
        self._refused: frozenset[str] = frozenset()
        # Every key delete() did not refuse, in order; S3 counts an absent key as deleted too.
        self.deletes: list[str] = []
        # Calls per method name, counted even when the call raises.
        self.calls: Counter[str] = Counter()

    @property
    def bucket(self) -> str:
        return self._bucket

    # -- faults ---------------------------------------------------------------------------------

    def set_outage(self, on: bool) -> None:
        """While on, every call raises StoreUnavailable, and check() raises StoreFatal."""
        with self._lock:
            self._outage = on

    def refuse_deletes(self, keys: set[str]) -> None:
        """Make delete() refuse these keys from now on (replaces the previous set)."""
        with self._lock:
            self._refused = frozenset(keys)

    # -- the Store interface --------------------------------------------------------------------

    def check(self) -> None:
        """Fail fast at start, like Store.check: StoreFatal(STORE_UNREACHABLE) during an outage."""
        with self._lock:
            self.calls["check"] += 1
            if self._outage:
                raise StoreFatal(f"store unreachable at {self._url_base()}: {_OUTAGE_MESSAGE}", ExitCode.STORE_UNREACHABLE)

    def stat(self, key: str) -> int:
        """Size of the object; ObjectMissing if it is gone."""
        with self._lock:
            self._enter("stat")
            return len(self._get(key)[0])

    def probe(self, key: str) -> None:
        """Read the object's first byte; ObjectMissing if it is gone."""
        with self._lock:
            self._enter("probe")
            self._get(key)

    def presign(self, key: str, expiry_s: int) -> str:
        """A fake presigned GET URL that resolve() understands; like S3, the object need not exist."""
        with self._lock:
            self._enter("presign")
        query = f"X-Amz-Expires={expiry_s}&X-Amz-Signature={self._signature(key, expiry_s)}"
        return f"{self._url_base()}/{quote(key, safe='/')}?{query}"

    def put(self, key: str, data: bytes, content_type: str = "image/jpeg") -> None:
        with self._lock:
            self._enter("put")
            self._objects[key] = (bytes(data), self._clock())

    def copy(self, source: str, target: str) -> None:
        """Copy within the bucket; the copy gets a fresh mtime, like a server-side copy."""
        with self._lock:
            self._enter("copy")
            self._objects[target] = (self._get(source)[0], self._clock())

    def delete(self, keys: Iterable[str]) -> list[str]:
        """Batch delete; returns the refused keys. An absent key is not refused (S3 semantics)."""
        wanted = list(keys)
        with self._lock:
            self._enter("delete")
            refused = [k for k in wanted if k in self._refused]
            for key in wanted:
                if key not in self._refused:
                    self._objects.pop(key, None)
                    self.deletes.append(key)
            return refused

    def list_dirs(self, prefix: str) -> list[str]:
        """Common prefixes (ending in /) directly below ``prefix``, like a delimiter listing."""
        with self._lock:
            self._enter("list_dirs")
            below = (k[len(prefix):] for k in self._objects if k.startswith(prefix))
            return sorted({prefix + rest.split("/", 1)[0] + "/" for rest in below if "/" in rest})

    def list_pages(self, prefix: str, page_size: int, start_after: str = "") -> Iterator[list[ImageRef]]:
        """Lazily list keys under prefix in lexicographic order, page_size ImageRefs at a time.

        Each page is read like an S3 continuation (keys after the last one seen), so objects
        put or deleted between pages show up or vanish the way they would on a real store.
        Like Store.list_pages, an outage raises while iterating, not at the call.
        """
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, not {page_size}")
        with self._lock:
            self.calls["list_pages"] += 1
        return self._pages(prefix, page_size, start_after or None)

    # -- test helpers ---------------------------------------------------------------------------

    def resolve(self, url: str) -> bytes | None:
        """The object data a presigned URL of this store points at; None if the object is gone.

        Raises StoreUnavailable during an outage, and ValueError for a URL this store did not sign.
        """
        key, expiry_s, signature = self._parse(url)
        with self._lock:
            self._enter("resolve")
            if signature != self._signature(key, expiry_s):
                raise ValueError(f"bad signature in {url.split('?', 1)[0]}")
            found = self._objects.get(key)
            return found[0] if found is not None else None

    def touch(self, key: str, mtime: float) -> None:
        """Set an object's mtime (for retention tests); ObjectMissing if it is gone."""
        with self._lock:
            self._objects[key] = (self._get(key)[0], mtime)

    def keys(self) -> list[str]:
        """Every key, sorted; not counted in ``calls`` and unaffected by an outage."""
        with self._lock:
            return sorted(self._objects)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._objects

    def __len__(self) -> int:
        with self._lock:
            return len(self._objects)

    # -- internals (callers hold the lock where noted) ------------------------------------------

    def _enter(self, method: str) -> None:
        """Count the call and raise during an outage; caller holds the lock."""
        self.calls[method] += 1
        if self._outage:
            raise StoreUnavailable(_OUTAGE_MESSAGE)

    def _get(self, key: str) -> tuple[bytes, float]:
        """Caller holds the lock."""
        try:
            return self._objects[key]
        except KeyError:
            raise ObjectMissing(f"NoSuchKey: {key}") from None

    def _pages(self, prefix: str, page_size: int, after: str | None) -> Iterator[list[ImageRef]]:
        while True:
            page = self._page(prefix, page_size, after)
            if not page:
                return
            yield page
            if len(page) < page_size:
                return
            after = page[-1].key

    def _page(self, prefix: str, page_size: int, after: str | None) -> list[ImageRef]:
        with self._lock:
            if self._outage:
                raise StoreUnavailable(_OUTAGE_MESSAGE)
            keys = sorted(k for k in self._objects if k.startswith(prefix) and (after is None or k > after))
            chosen = keys[:page_size]
            return [ImageRef(key=k, size=len(self._objects[k][0]), mtime=self._objects[k][1]) for k in chosen]

    def _url_base(self) -> str:
        return f"{_SCHEME}://{self._bucket}"

    def _signature(self, key: str, expiry_s: int) -> str:
        return hashlib.sha256(f"{self._bucket}\n{key}\n{expiry_s}".encode()).hexdigest()[:32]

    def _parse(self, url: str) -> tuple[str, int, str]:
        """Key, expiry and signature of a presigned URL of this bucket."""
        parts = urlsplit(url)
        if parts.scheme != _SCHEME or parts.netloc != self._bucket:
            raise ValueError(f"not a URL of {self._url_base()}: {parts.scheme}://{parts.netloc}")
        query = parse_qs(parts.query)
        try:
            expiry_s = int(query["X-Amz-Expires"][0])
            signature = query["X-Amz-Signature"][0]
        except (KeyError, ValueError):
            raise ValueError(f"not a presigned URL: {parts.scheme}://{parts.netloc}{parts.path}") from None
        return unquote(parts.path[1:]), expiry_s, signature


class MemoryAlgo:
    """The worker's AlgoOps over a MemoryStore: fetches the image, answers with a detection count."""

    def __init__(
        self,
        store: MemoryStore,
        *,
        detections: Callable[[str], int] = lambda image_path: 0,
        fail: Callable[[str], BaseException | None] = lambda image_path: None,
        elapsed_ms: float = 0.0,
    ) -> None:
        self.store = store
        self.detections = detections
        self.fail = fail
        self.elapsed_ms = elapsed_ms
        self.down: set[str] = set()  # endpoints that refuse connections
        self._lock = threading.Lock()
        # Every call is counted, failed ones included: per image_path, and per endpoint.
        self.calls: Counter[str] = Counter()
        self.endpoints: Counter[str] = Counter()

    def infer(self, request: AlgoRequest, endpoint: str = "") -> AlgoAnswer:
        """One call, failing the way the reference service and AlgoClient would."""
        self._count(request.image_path, endpoint)
        if endpoint in self.down:
            raise AlgoTransient("connection_error")
        injected = self.fail(request.image_path)
        if injected is not None:
            raise injected
        self._fetch(request.image_url)
        count = max(0, self.detections(request.image_path))
        return AlgoAnswer(success=True, detections=count, elapsed_ms=self.elapsed_ms, inference_time_ms=self.elapsed_ms)

    def _count(self, image_path: str, endpoint: str) -> None:
        with self._lock:
            self.calls[image_path] += 1
            self.endpoints[endpoint] += 1

    def _fetch(self, url: str) -> bytes:
        """The image; a gone image is the service's 404, an unreachable store its 502."""
        try:
            image = self.store.resolve(url)
        except StoreUnavailable:
            raise AlgoTransient("http_502") from None
        if image is None:
            raise ImageGone("http_404", "the algorithm service could not fetch the image")
        return image
