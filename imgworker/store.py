"""The only module that talks to the object store (minio); every error is translated here."""

from __future__ import annotations

import http.client
import io
import ssl
from collections.abc import Iterable, Iterator
from datetime import timedelta

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError

from .config import Credentials, StoreConfig
from .errors import ExitCode, ObjectMissing, StoreError, StoreFatal, StoreUnavailable
from .listing import Answer, AnswerMemo, MalformedListing
from .outcomes import ImageRef

_MISSING = {"NoSuchKey", "NoSuchObject", "ResourceNotFound", "NoSuchVersion"}
_AUTH = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidSecurity"}


def _http_client(cfg: StoreConfig, read_timeout_s: float, pool_size: int) -> urllib3.PoolManager:
    """urllib3 pool with imgworker's timeouts and no hidden retries (imgworker retries itself)."""
    kwargs: dict[str, object] = {
        "timeout": urllib3.Timeout(connect=cfg.connect_timeout_s, read=read_timeout_s),
        "maxsize": pool_size,
        "retries": False,
    }
    if cfg.secure:
        kwargs["cert_reqs"] = "CERT_REQUIRED"
        if cfg.ca_bundle:
            kwargs["ca_certs"] = cfg.ca_bundle
    return urllib3.PoolManager(**kwargs)  # type: ignore[arg-type]


class Store:
    """Stat, presign, list pages, put and batch delete, with imgworker's own errors."""

    def __init__(
        self, cfg: StoreConfig, creds: Credentials, *, read_timeout_s: float | None = None, pool_size: int = 4
    ) -> None:
        self.cfg = cfg
        timeout = read_timeout_s if read_timeout_s is not None else cfg.list_timeout_s
        self._client = Minio(
            cfg.endpoint,
            access_key=creds.access_key,
            secret_key=creds.secret_key,
            secure=cfg.secure,
            region=cfg.region,
            http_client=_http_client(cfg, timeout, pool_size),
        )
        self._answers = AnswerMemo()
        # Presigned URLs are signed over the host the algorithm service will use.
        self._signer = self._client
        if cfg.public_endpoint and cfg.public_endpoint != cfg.endpoint:
            self._signer = Minio(
                cfg.public_endpoint,
                access_key=creds.access_key,
                secret_key=creds.secret_key,
                secure=cfg.secure,
                region=cfg.region,
            )

    @property
    def bucket(self) -> str:
        return self.cfg.bucket

    def check(self) -> None:
        """Fail fast at start: endpoint, credentials, TLS and bucket."""
        try:
            exists = self._client.bucket_exists(self.bucket)
        except Exception as exc:
            raise _startup_error(exc, self.cfg) from None
        if not exists:
            raise StoreFatal(f"bucket {self.bucket!r} does not exist at {self.cfg.endpoint}", ExitCode.STORE_BUCKET)

    def stat(self, key: str) -> int:
        """Size of the object; ObjectMissing if it is gone, StoreUnavailable if unreachable."""
        try:
            return int(self._client.stat_object(self.bucket, key).size or 0)
        except Exception as exc:
            raise translate(exc) from exc

    def probe(self, key: str) -> None:
        """Read the first byte, as the algorithm service's GET would: is the data path up?"""
        try:
            response = self._client.get_object(self.bucket, key, offset=0, length=1)
            try:
                response.read()
            finally:
                response.close()
                response.release_conn()
        except Exception as exc:
            raise translate(exc) from exc

    def presign(self, key: str, expiry_s: int) -> str:
        """A presigned GET URL; needs no network call since the region is configured."""
        try:
            return self._signer.presigned_get_object(self.bucket, key, expires=timedelta(seconds=expiry_s))
        except Exception as exc:
            raise translate(exc) from exc

    def put(self, key: str, data: bytes, content_type: str = "image/jpeg") -> None:
        try:
            self._client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)
        except Exception as exc:
            raise translate(exc) from exc

    def copy(self, source: str, target: str) -> None:
        """Server-side copy within the bucket."""
        from minio.commonconfig import CopySource

        try:
            self._client.copy_object(self.bucket, target, CopySource(self.bucket, source))
        except Exception as exc:
            raise translate(exc) from exc

    def delete(self, keys: Iterable[str]) -> list[str]:
        """Batch delete; returns the keys the store refused to delete."""
        try:
            errors = self._client.remove_objects(self.bucket, (DeleteObject(k) for k in keys))
            return [e.name or "" for e in errors]
        except Exception as exc:
            raise translate(exc) from exc

    def list_dirs(self, prefix: str) -> list[str]:
        """The "directories" (common prefixes, ending in /) directly below ``prefix``."""
        try:
            return [o.object_name or "" for o in self._client.list_objects(self.bucket, prefix=prefix or None)
                    if o.is_dir]
        except Exception as exc:
            raise translate(exc) from exc

    def list_pages(
        self, prefix: str, page_size: int, start_after: str = "", *, max_keys: int = 1000
    ) -> Iterator[list[ImageRef]]:
        """Lazily list objects under prefix (after ``start_after``), one page of ImageRefs at a time.

        ``max_keys`` is how many objects each request asks the store for; ``page_size`` how many
        go in each page yielded.
        """
        page: list[ImageRef] = []
        try:
            for answer in self._list_v2(prefix, start_after, max_keys):
                for ref in answer.refs:
                    page.append(ref)
                    if len(page) >= page_size:
                        yield page
                        page = []
        except Exception as exc:
            raise translate(exc) from exc
        if page:
            yield page

    def _list_v2(self, prefix: str, start_after: str, max_keys: int) -> Iterator[Answer]:
        """ListObjectsV2 pages, each requested as minio's ``list_objects`` requests it and read by ``listing``.

        minio signs and sends each request (its credentials, region and HTTP pool); only the parsing
        is imgworker's, because minio's costs about 70 us per object, and an unchanged page is not
        parsed again (``AnswerMemo``). Like minio, a later page sends its continuation token as
        ``start-after`` too (a store that honours the token ignores it).
        """
        self._answers.begin()
        token = ""
        while True:
            query: dict[str, str | list[str] | tuple[str]] = {
                "list-type": "2", "delimiter": "", "encoding-type": "url", "max-keys": str(max_keys),
                "prefix": prefix,
            }
            if token:
                query["continuation-token"] = token
            if start_after:
                query["start-after"] = start_after
            response = self._client._execute("GET", self.bucket, query_params=query)
            answer = self._answers.read(response.data)
            yield answer
            if not answer.truncated:
                return
            if answer.next_token == token:
                raise MalformedListing(f"the store sent the continuation token {token!r} twice")
            token = start_after = answer.next_token or ""


def translate(exc: BaseException) -> StoreError:
    """Classify a minio/urllib3 exception as missing, unavailable or fatal."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, S3Error):
        if exc.code in _MISSING:
            return ObjectMissing(f"{exc.code}: {exc.object_name}")
        if exc.code in _AUTH:
            return StoreFatal(f"store refused the credentials ({exc.code})", ExitCode.STORE_CREDENTIALS)
        if exc.code == "NoSuchBucket":
            return StoreFatal(f"bucket {exc.bucket_name!r} does not exist", ExitCode.STORE_BUCKET)
        return StoreUnavailable(f"store error {exc.code}")
    if isinstance(exc, ServerError):
        return StoreUnavailable(f"store answered HTTP {exc.status_code}")
    if isinstance(exc, MalformedListing):
        return StoreUnavailable(f"store sent a malformed listing: {exc}")
    if isinstance(exc, InvalidResponseError):
        return StoreUnavailable("store sent an invalid response")
    if _is_tls(exc):
        return StoreFatal(f"TLS error talking to the store: {_root(exc)}", ExitCode.STORE_TLS)
    if isinstance(exc, (urllib3.exceptions.HTTPError, OSError)):
        return StoreUnavailable(f"store unreachable: {type(_root(exc)).__name__}")
    return StoreUnavailable(f"store error: {type(exc).__name__}")


def _root(exc: BaseException) -> BaseException:
    seen = exc
    while True:
        nxt = getattr(seen, "reason", None) or seen.__cause__
        if not isinstance(nxt, BaseException) or nxt is seen:
            return seen
        seen = nxt


def _is_tls(exc: BaseException) -> bool:
    return isinstance(exc, (ssl.SSLError, urllib3.exceptions.SSLError)) or isinstance(_root(exc), ssl.SSLError)


def _startup_error(exc: BaseException, cfg: StoreConfig) -> StoreFatal:
    """The one error of a failed start: what failed, where, and a hint when TLS is on one side only."""
    err = translate(exc)
    if isinstance(err, StoreFatal):
        if err.exit_code == ExitCode.STORE_TLS and cfg.secure and _plain_http_answered(exc):
            return StoreFatal(f"{err} at {cfg.endpoint}; the store there speaks plain HTTP, not TLS: set "
                              "store.secure = false (IMGWORKER_STORE_SECURE=false), or give the TLS endpoint",
                              ExitCode.STORE_TLS)
        return err
    detail = str(err).removeprefix("store unreachable: ")  # the message names it once, with the endpoint
    hint = ""
    if not cfg.secure and "HTTPS server" in str(exc):  # Go's answer to plain HTTP on a TLS port (MinIO)
        detail = "it serves HTTPS, and plain HTTP was sent"
        hint = "; set store.secure = true (IMGWORKER_STORE_SECURE=true)"
    elif not cfg.secure and (isinstance(_root(exc), (ConnectionResetError, http.client.RemoteDisconnected,
                                                      urllib3.exceptions.ProtocolError))
                             or isinstance(exc, S3Error) and exc.code == "BadRequest"):  # HEAD gets no body
        hint = "; if the store serves HTTPS there, set store.secure = true (IMGWORKER_STORE_SECURE=true)"
    return StoreFatal(f"store unreachable at {cfg.endpoint} ({detail}){hint}", ExitCode.STORE_UNREACHABLE)


def _plain_http_answered(exc: BaseException) -> bool:
    """A TLS handshake that got a plain-HTTP answer (OpenSSL: wrong version number, record layer failure)."""
    text = str(_root(exc)).lower()
    return any(sign in text for sign in ("wrong_version_number", "wrong version number", "record layer failure",
                                         "http_request", "packet length too long"))
