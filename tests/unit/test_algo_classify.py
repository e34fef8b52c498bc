from __future__ import annotations

import pytest

from imgworker.algo_client import classify_status, decode_answer, detection_count
from imgworker.errors import AlgoPermanent, AlgoTransient, ImageGone


@pytest.mark.parametrize(
    ("result", "count"),
    [
        ({"total_count": 3}, 3),
        ({"count": 2, "detections": [1]}, 2),
        ({"num": 1}, 1),
        ({"detections": [{}, {}]}, 2),
        ({"objects": [{}]}, 1),
        ([{}, {}, {}], 3),
        ({}, 0),
        (None, 0),
        ("text", 0),
        ({"total_count": True, "objects": [1]}, 1),
        ({"total_count": -4}, 0),
    ],
)
def test_detection_count(result, count):
    assert detection_count(result) == count


def test_status_classes():
    classify_status(200, b"")
    with pytest.raises(ImageGone):
        classify_status(404, b"")
    for status in (429, 500, 502, 503, 504):
        with pytest.raises(AlgoTransient) as err:
            classify_status(status, b"")
        assert err.value.cause == f"http_{status}"
    with pytest.raises(AlgoPermanent) as err:
        classify_status(422, b"cannot decode")
    assert err.value.cause == "http_422"


def test_decode_success_and_false():
    answer = decode_answer(b'{"success": true, "result": {"total_count": 2}, "inference_time_ms": 12.5}', 20.0)
    assert (answer.success, answer.detections, answer.inference_time_ms) == (True, 2, 12.5)
    answer = decode_answer(b'{"success": false, "result": {"total_count": 2}, "error": "nothing"}', 20.0)
    assert (answer.success, answer.detections) == (False, 0)


@pytest.mark.parametrize(
    "body",
    [b"<html>502 Bad Gateway</html>", b"{", b'{"result": 1}', b'{"success": "yes"}', b"", b"[]"],
)
def test_malformed_bodies_are_transient(body):
    with pytest.raises(AlgoTransient) as err:
        decode_answer(body, 1.0)
    assert err.value.cause == "malformed"


@pytest.mark.parametrize(
    "body",
    [
        b'{"success": true, "result": {"count": 1e30}}',
        b'{"success": true, "result": {"total_count": 10000000000000000000000000000000000000000}}',
        b'{"success": true, "result": {"num": 1000001}}',
        b'{"success": true, "result": {"count": 1000000.5}}',
    ],
)
def test_absurd_counts_are_permanent_malformed_result(body):
    with pytest.raises(AlgoPermanent) as err:
        decode_answer(body, 1.0)
    assert err.value.cause == "malformed_result"
    assert len(str(err.value)) < 200


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_counts_are_permanent_malformed_result(value):
    with pytest.raises(AlgoPermanent) as err:
        detection_count({"count": value})
    assert err.value.cause == "malformed_result"


@pytest.mark.parametrize(
    ("body", "count"),
    [
        (b'{"success": true, "result": {"count": 1000000}}', 1_000_000),
        (b'{"success": true, "result": {"count": -1e30}}', 0),
        (b'{"success": true, "result": {"count": -10000000000000000000000000000000000000000}}', 0),
        (b'{"success": false, "result": {"count": 1e30}}', 0),
    ],
)
def test_counts_at_the_limit_negative_or_unsuccessful_are_accepted(body, count):
    assert decode_answer(body, 1.0).detections == count
