"""The only module that does HTTP to the algorithm service: request, decode, classify."""

from __future__ import annotations

import math
import re
import time
from typing import Any

import msgspec
import requests

from .config import AlgoConfig
from .errors import AlgoPermanent, AlgoTransient, ImageGone


class AlgoRequest(msgspec.Struct, frozen=True):
    """The JSON body POSTed for one image."""

    image_url: str
    task_id: str
    task_type: str
    image_path: str
    algo_config: dict[str, Any] | None = None


class AlgoResponse(msgspec.Struct, frozen=True):
    """The fields imgworker reads from the service's answer (others are ignored)."""

    success: bool
    result: Any = None
    confidence: float | None = None
    inference_time_ms: float | None = None
    error: str | None = None


class AlgoAnswer(msgspec.Struct, frozen=True):
    """A decoded answer plus what imgworker derives from it."""

    success: bool
    detections: int
    elapsed_ms: float
    inference_time_ms: float | None = None
    error: str = ""


_request_encoder = msgspec.json.Encoder()
_response_decoder = msgspec.json.Decoder(AlgoResponse)
_COUNT_FIELDS = ("total_count", "count", "num")
_LIST_FIELDS = ("detections", "objects")
_URL_QUERY = re.compile(r"(https?://[^\s?#\"']*)[?#][^\s\"']*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
ERROR_TEXT_CHARS = 200
MAX_DETECTIONS = 1_000_000
"""A count above this is a broken answer, not a busy image (it would also overflow msgpack)."""


def _short(value: int | float) -> str:
    """A short rendering of a number for an error message (no 40-digit integers)."""
    text = repr(value)
    return text if len(text) <= 20 else f"{len(text)}-digit integer"


def _checked_count(name: str, value: int | float) -> int:
    """``value`` as a count: negatives clamp to 0; non-finite or above MAX_DETECTIONS is AlgoPermanent."""
    if isinstance(value, float) and not math.isfinite(value):
        raise AlgoPermanent("malformed_result", f"{name} is not finite: {value!r}")
    if value > MAX_DETECTIONS:
        raise AlgoPermanent("malformed_result", f"{name} {_short(value)} is above {MAX_DETECTIONS}")
    return max(0, int(value))


def detection_count(result: Any) -> int:
    """Detections in ``result``: total_count, count, num, len(detections), len(objects).

    An absurd count (non-finite, or above MAX_DETECTIONS) raises AlgoPermanent('malformed_result').
    """
    if isinstance(result, list):
        return len(result)
    if not isinstance(result, dict):
        return 0
    for name in _COUNT_FIELDS:
        value = result.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _checked_count(name, value)
    for name in _LIST_FIELDS:
        value = result.get(name)
        if isinstance(value, list):
            return len(value)
    return 0


def error_text(text: object) -> str:
    """The service's ``error`` text as kept in a result: one line, no URL query (a presigned signature), short."""
    if not isinstance(text, str):
        return ""
    line = _CONTROL.sub(" ", _URL_QUERY.sub(r"\1?…", text)).strip()
    return line if len(line) <= ERROR_TEXT_CHARS else line[: ERROR_TEXT_CHARS - 1] + "…"


def classify_status(status: int, body_head: bytes) -> None:
    """Raise the error a non-200 status means; return for 200."""
    if status == 200:
        return
    if status == 404:
        raise ImageGone("http_404", "the algorithm service could not fetch the image")
    if status == 429 or status >= 500:
        raise AlgoTransient(f"http_{status}")
    raise AlgoPermanent(f"http_{status}", body_head[:200].decode("utf-8", "replace"))


def decode_answer(body: bytes, elapsed_ms: float) -> AlgoAnswer:
    """Decode a 200 body; malformed JSON, HTML or wrong types are AlgoTransient('malformed').

    An absurd detection count is AlgoPermanent('malformed_result'): asking again will not fix it.
    """
    try:
        resp = _response_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise AlgoTransient("malformed", str(exc)[:120]) from None
    detections = detection_count(resp.result) if resp.success else 0
    return AlgoAnswer(
        success=resp.success, detections=detections, elapsed_ms=elapsed_ms, inference_time_ms=resp.inference_time_ms,
        error="" if resp.success else error_text(resp.error),
    )


class AlgoClient:
    """One keep-alive session to the algorithm service; one call per ``infer``."""

    def __init__(self, cfg: AlgoConfig, session: requests.Session | None = None) -> None:
        self.cfg = cfg
        self.session = session or requests.Session()
        self.session.headers["Content-Type"] = "application/json"
        # Off by default: the service is usually on the local network, a proxy set for internet access
        # should not carry its calls, ~/.netrc credentials should not reach it, and reading the
        # environment on every call costs CPU (see the peers benchmark). A private CA goes in ca_bundle.
        self.session.trust_env = cfg.trust_env
        if cfg.ca_bundle:
            self.session.verify = cfg.ca_bundle

    def infer(self, request: AlgoRequest, endpoint: str = "") -> AlgoAnswer:
        """One call to ``endpoint`` (default: the configured one)."""
        started = time.monotonic()
        deadline = started + self.cfg.timeout_s
        try:
            resp = self.session.post(
                endpoint or self.cfg.endpoint,
                data=_request_encoder.encode(request),
                timeout=(self.cfg.connect_timeout_s, self.cfg.timeout_s),
                stream=True,
            )
        except requests.Timeout:
            raise AlgoTransient("timeout") from None
        except requests.ConnectionError:
            raise AlgoTransient("connection_error") from None
        except requests.RequestException as exc:
            raise AlgoTransient("request_error", type(exc).__name__) from None
        except OSError as exc:
            # Not about this image: a CA bundle gone after start, no file descriptors, ... Every call
            # fails alike, so it counts as the service being unavailable (ejection, images wait).
            raise AlgoTransient("client_error", f"{type(exc).__name__}: {exc}"[:160]) from None
        with resp:
            body = self._read_body(resp, deadline)
        classify_status(resp.status_code, body)
        return decode_answer(body, (time.monotonic() - started) * 1000.0)

    def _read_body(self, resp: requests.Response, deadline: float) -> bytes:
        """Read at most max_body_bytes, and not past the call's deadline."""
        cap = self.cfg.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in resp.iter_content(chunk_size=65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > cap:
                    raise AlgoPermanent("body_too_large", f"over {cap} bytes")
                if time.monotonic() > deadline:
                    raise AlgoTransient("timeout", "body not received within the timeout")
        except requests.RequestException:
            raise AlgoTransient("connection_error", "body interrupted") from None
        return b"".join(chunks)

    def close(self) -> None:
        self.session.close()
