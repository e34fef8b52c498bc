"""``imgworker check``'s call to each algorithm endpoint, against a local service that answers one status."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from imgworker.config import load_config
from imgworker.errors import ExitCode
from imgworker.outcomes import ImageRef
from imgworker.preflight import check_endpoints
from tests.support.httpd import Handler, serving

pytestmark = pytest.mark.timeout(60)


class _Status(Handler):
    status = 200

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.answer(type(self).status, b'{"detail": "no"}', "application/json")


@pytest.fixture()
def service() -> Iterator[str]:
    with serving(_Status) as port:
        yield f"http://127.0.0.1:{port}/infer"


class Signer:
    def presign(self, key: str, expiry_s: int) -> str:
        return f"http://store.invalid/b/{key}?X-Amz-Signature=secret"


@pytest.mark.parametrize(("status", "with_image", "ok"), [(404, True, False), (404, False, True), (400, True, False),
                                                        (400, False, True)])
def test_a_refusal_fails_the_check_only_when_a_real_image_was_sent(service, status, with_image, ok):
    _Status.status = status
    cfg = load_config(env={}, overrides={"algo": {"endpoint": service}})
    sample = ImageRef(key="cam/person/t1/a.jpg", task_type="person", task_id="t1") if with_image else None
    [check] = check_endpoints(cfg, Signer(), sample)  # type: ignore[arg-type]
    assert check.ok is ok, check.line()
    assert (check.code == ExitCode.ALGO_UNAVAILABLE) is not ok
    assert "X-Amz-Signature" not in check.line()
    if status == 404 and with_image:
        assert "could not fetch it through the presigned URL" in check.detail
