"""The reference algorithm service: fetches the image through the presigned URL it is given.

Backends:
- ``face``: scikit-image's LBP frontal-face cascade (shipped inside scikit-image) on the decoded image.
- ``synthetic``: no model; lognormal latency and configurable fault rates, for benchmarks and tests.

Every POST /infer is counted per image_path once its body decodes; GET /calls returns the counts,
so a test can tell how often the far end was really called.

``slots`` > 0 makes the synthetic service a server of that many slots: at most ``slots`` calls are
served at once, the others wait in arrival order (a model server's queue). POST /shape with
``{"slots": n, "latency_ms": x}`` changes either while it runs (benchmarks step the capacity).

Built on aiohttp: one event loop holds hundreds of slow requests, and aiohttp sets TCP_NODELAY,
so a response is not held back by Nagle's algorithm.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import requests
import yarl
from aiohttp import ClientError, ClientSession, ClientTimeout, web

from .netutil import die_with_parent, free_port, port_open, stop_process, wait_until
from .synthetic import SyntheticParams

log = logging.getLogger(__name__)


class Shape(msgspec.Struct, frozen=True):
    """The body of POST /shape: what to change of a running synthetic service (unset: unchanged)."""

    slots: int | None = None
    latency_ms: float | None = None


class InferRequest(msgspec.Struct):
    image_url: str
    task_id: str = ""
    task_type: str = ""
    image_path: str = ""
    algo_config: dict[str, Any] | None = None


class CallCounts(msgspec.Struct, frozen=True):
    """The answer of GET /calls."""

    calls: dict[str, int]
    total: int
    peak: int = 0
    """The most calls the service held at once (served or waiting for a slot)."""


def lognormal_ms(rng: random.Random, mean_ms: float, sigma: float) -> float:
    """A lognormal draw whose mean is ``mean_ms`` (sigma 0 gives exactly mean_ms)."""
    if sigma <= 0:
        return mean_ms
    mu = math.log(mean_ms) - sigma * sigma / 2.0
    return rng.lognormvariate(mu, sigma)


class FaceDetector:
    """LBP cascade per thread (the cascade object is not shared between threads)."""

    def __init__(self) -> None:
        from skimage import data

        self._path = data.lbp_frontal_face_cascade_filename()
        self._local = threading.local()

    def detect(self, image_bytes: bytes) -> list[dict[str, int]]:
        import numpy as np
        from PIL import Image
        from skimage.feature import Cascade

        cascade = getattr(self._local, "cascade", None)
        if cascade is None:
            cascade = self._local.cascade = Cascade(self._path)
        with Image.open(io.BytesIO(image_bytes)) as img:
            img.thumbnail((640, 640))
            gray = np.asarray(img.convert("L"), dtype=np.float64) / 255.0
        found = cascade.detect_multi_scale(img=gray, scale_factor=1.2, step_ratio=1, min_size=(40, 40),
                                           max_size=(400, 400))
        return [{"x": int(d["c"]), "y": int(d["r"]), "w": int(d["width"]), "h": int(d["height"])} for d in found]


class AlgoApp:
    """The aiohttp application: POST /infer, GET /health, GET /calls."""

    def __init__(self, backend: str, params: SyntheticParams) -> None:
        self.backend = backend
        self.params = params
        self.rng = random.Random(params.seed)
        self.detector = FaceDetector() if backend == "face" else None
        self.pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1))
        self.session: ClientSession | None = None
        self.served = 0
        self.calls: dict[str, int] = {}
        self.busy = 0  # calls holding one of ``params.slots``
        self.held = 0  # calls in the service now, served or waiting
        self.peak = 0
        self._slot_free: asyncio.Condition | None = None

    def build(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/infer", self.infer)
        app.router.add_get("/health", self.health)
        app.router.add_get("/calls", self.call_counts)
        app.router.add_post("/shape", self.shape)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, app: web.Application) -> None:
        self.session = ClientSession(timeout=ClientTimeout(total=30), auto_decompress=False)

    async def _close(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "backend": self.backend, "served": self.served})

    async def call_counts(self, request: web.Request) -> web.Response:
        counts = CallCounts(calls=dict(self.calls), total=sum(self.calls.values()), peak=self.peak)
        return web.Response(body=msgspec.json.encode(counts), content_type="application/json")

    async def shape(self, request: web.Request) -> web.Response:
        try:
            change = msgspec.json.decode(await request.read(), type=Shape)
        except msgspec.DecodeError as exc:
            return _answer(400, {"error": f"bad shape: {exc}"})
        if change.slots is not None:
            self.params = msgspec.structs.replace(self.params, slots=max(0, change.slots))
        if change.latency_ms is not None:
            self.params = msgspec.structs.replace(self.params, latency_ms=max(0.0, change.latency_ms))
        async with self._slots():
            self._slots().notify_all()
        return _answer(200, {"slots": self.params.slots, "latency_ms": self.params.latency_ms})

    def _slots(self) -> asyncio.Condition:
        if self._slot_free is None:
            self._slot_free = asyncio.Condition()
        return self._slot_free

    async def infer(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        self.held += 1
        self.peak = max(self.peak, self.held)
        try:
            return await self._infer(request, started)
        finally:
            self.held -= 1

    async def _infer(self, request: web.Request, started: float) -> web.StreamResponse:
        try:
            req = msgspec.json.decode(await request.read(), type=InferRequest)
        except msgspec.DecodeError as exc:
            return _answer(400, {"success": False, "error": f"bad request: {exc}"})
        self.calls[req.image_path] = self.calls.get(req.image_path, 0) + 1
        if not req.image_url:  # names no image (a preflight's request): refused, unless every call fails
            if self.backend != "face" and self.rng.random() < self.params.error_rate:
                return _answer(500, {"success": False, "error": "synthetic internal error"})
            return _answer(400, {"success": False, "error": "bad request: image_url is empty"})
        status, image = await self._fetch(req.image_url)
        if image is None:
            return _answer(404 if status == 404 else 502, {"success": False, "error": f"image fetch failed ({status})"})
        response: web.StreamResponse
        if self.backend == "face":
            response = await self._face(image, started)
        else:
            free = self._slots()
            async with free:
                await free.wait_for(lambda: not self.params.slots or self.busy < self.params.slots)
                self.busy += 1
            try:
                response = await self._synthetic(request, req.image_path, started)
            finally:
                async with free:
                    self.busy -= 1
                    free.notify()
        self.served += 1
        return response

    async def _fetch(self, url: str) -> tuple[int, bytes | None]:
        assert self.session is not None
        try:
            # encoded=True: the presigned URL is already encoded; re-quoting would break its signature.
            async with self.session.get(yarl.URL(url, encoded=True)) as resp:
                if resp.status != 200:
                    return resp.status, None
                return 200, await resp.read()
        except (ClientError, asyncio.TimeoutError, ValueError):
            return 0, None

    async def _face(self, image: bytes, started: float) -> web.Response:
        assert self.detector is not None
        loop = asyncio.get_running_loop()
        try:
            faces = await loop.run_in_executor(self.pool, self.detector.detect, image)
        except Exception as exc:  # undecodable input is the caller's problem, said in the answer
            return _answer(422, {"success": False, "error": f"cannot decode image: {type(exc).__name__}"})
        elapsed = (time.perf_counter() - started) * 1000.0
        return _answer(200, {"success": True, "result": {"total_count": len(faces), "detections": faces},
                             "confidence": 0.9 if faces else 0.0, "inference_time_ms": round(elapsed, 2)})

    async def _synthetic(self, request: web.Request, image_path: str, started: float) -> web.StreamResponse:
        p, rng = self.params, self.rng
        roll = rng.random()
        await asyncio.sleep(lognormal_ms(rng, p.latency_ms, p.sigma) / 1000.0)
        if roll < p.error_rate:
            return _answer(500, {"success": False, "error": "synthetic internal error"})
        roll -= p.error_rate
        if roll < p.timeout_rate:
            await asyncio.sleep(p.hang_s)
        roll -= p.timeout_rate
        if roll < p.malformed_rate:
            return web.Response(status=200, body=b"<html>502 Bad Gateway</html>", content_type="text/html")
        roll -= p.malformed_rate
        if roll < p.false_rate:
            return _answer(200, {"success": False, "error": "nothing detected"})
        count = 1 + int(rng.random() * 3) if rng.random() < p.detection_rate else 0
        result: dict[str, float] = {"total_count": count}
        if p.count_override >= 0 and "huge" in image_path:
            result = {"count": p.count_override}
        elapsed = (time.perf_counter() - started) * 1000.0
        body = {"success": True, "result": result, "confidence": 0.8, "inference_time_ms": round(elapsed, 2)}
        if p.trickle_s > 0 and "trickle" in image_path:
            return await self._trickle(request, msgspec.json.encode(body))
        return _answer(200, body)

    async def _trickle(self, request: web.Request, body: bytes) -> web.StreamResponse:
        """200 and headers now, then one byte of leading whitespace per trickle_s for hang_s, then ``body``."""
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        deadline = time.monotonic() + self.params.hang_s
        try:
            while time.monotonic() < deadline:
                await response.write(b" ")
                await asyncio.sleep(self.params.trickle_s)
            await response.write(body)
            await response.write_eof()
        except ConnectionResetError:  # the client gave up, as it should
            pass
        return response


def _answer(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=msgspec.json.encode(body), content_type="application/json")


def serve(*, backend: str, host: str, port: int, params: SyntheticParams) -> None:
    """Run the service until SIGTERM/SIGINT (blocking)."""
    from ..proctitle import set_title

    set_title(f"algo-serve {backend} {host}:{port}")
    app = AlgoApp(backend, params).build()
    web.run_app(app, host=host, port=port, print=None, access_log=None, backlog=1024,
                handle_signals=True, shutdown_timeout=1.0)


class AlgoService:
    """Starts ``imgworker algo-serve`` as a child process on loopback; always reaps it."""

    def __init__(self, backend: str = "synthetic", params: SyntheticParams | None = None, port: int = 0) -> None:
        self.backend = backend
        self.params = params or SyntheticParams()
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/infer"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "imgworker", "algo-serve", "--backend", self.backend, "--port", str(self.port)]
        for field in msgspec.structs.fields(SyntheticParams):
            cmd += [f"--{field.name.replace('_', '-')}", str(getattr(self.params, field.name))]
        return cmd

    def calls(self) -> dict[str, int]:
        """How many POST /infer each image_path got at the service, since it started."""
        return self.counts().calls

    def counts(self) -> CallCounts:
        """GET /calls: the calls per image_path, and the most the service held at once."""
        resp = requests.get(f"http://127.0.0.1:{self.port}/calls", timeout=5)
        resp.raise_for_status()
        return msgspec.json.decode(resp.content, type=CallCounts)

    def start(self, timeout_s: float = 60.0) -> AlgoService:
        # Its own session: a stop signal to imgworker's process group (Ctrl-C on the demo) must not
        # take the service away from the items still in flight; it still dies with its parent.
        self._proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
                                      start_new_session=True)
        wait_until(lambda: port_open("127.0.0.1", self.port), timeout_s=timeout_s, what="the algorithm service",
                   alive=self.alive)
        return self

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc)

    def __enter__(self) -> AlgoService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
