from __future__ import annotations

import logging

from imgworker.config import load_config
from imgworker.endpoints import Call, EndpointPool, display_url

A, B, C = "http://a/infer", "http://b/infer", "http://c/infer"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pool(**algo) -> tuple[EndpointPool, Clock]:
    clock = Clock()
    cfg = load_config(env={}, overrides={"algo": {"endpoints": [A, B], "eject_after_failures": 2,
                                                  "eject_cooldown_s": 5.0, **algo}})
    return EndpointPool(cfg.algo, clock=clock), clock


def test_least_in_flight_first_with_fallbacks():
    p, _ = pool()
    first = p.choose("")
    p.dispatched(first)
    second = p.choose("")
    assert first == (A, B) and second == (B, A)


def test_per_endpoint_limit():
    p, _ = pool(max_in_flight_per_endpoint=1)
    p.dispatched(p.choose(""))
    p.dispatched(p.choose(""))
    assert p.choose("") is None
    p.finished((A,), [Call(A, True)])
    assert p.choose("") == (A,)


def test_ejection_cooldown_and_half_open_probe():
    p, clock = pool()
    p.finished((), [Call(A, False), Call(A, False)])
    assert p.choose("") == (B,)
    assert p.figures()[A]["healthy"] == 0 and p.figures()[A]["ejections"] == 1
    clock.now += 6
    probe = p.choose("")
    assert probe[0] in (A, B)
    if probe[0] != A:  # least in flight may pick B first; load B so A is the probe
        p.dispatched(probe)
        probe = p.choose("")
    assert probe == (A, B) or probe[0] == A
    p.dispatched(probe)
    assert all(c is None or c[0] != A for c in [p.choose("")])  # one probe at a time
    p.finished(probe, [Call(A, False)])
    assert p.figures()[A]["ejections"] == 2 and p.figures()[A]["healthy"] == 0
    clock.now += 6
    assert p.figures()[A]["healthy"] == 0  # a passed cooldown is not health: only an answer is
    probe = p.choose("")
    while probe[0] != A:
        p.dispatched(probe)
        probe = p.choose("")
    p.dispatched(probe)
    p.finished(probe, [Call(A, True)])
    assert p.figures()[A]["healthy"] == 1


def test_routes_per_task_type():
    p, _ = pool(routes={"vehicle": [C]})
    assert p.choose("vehicle") == (C,)
    assert p.choose("person") == (A, B)


def test_no_endpoint_when_all_ejected():
    p, _ = pool()
    p.finished((), [Call(A, False)] * 2 + [Call(B, False)] * 2)
    assert p.choose("") is None


SECRET_URL = "http://user:pw-s3cret@d:8000/infer?token=tok-s3cret"


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_ejection_and_recovery_are_each_logged_once_naming_the_endpoint_without_secrets(caplog):
    p, clock = pool(endpoints=[SECRET_URL])
    with caplog.at_level(logging.INFO, logger="imgworker.endpoints"):
        p.finished((SECRET_URL,), [Call(SECRET_URL, False, "connection_error")] * 5)  # ejected at 2, then 3 more
        for _ in range(3):  # three failed probes: the same outage
            clock.now += 6
            probe = p.choose("")
            p.dispatched(probe)
            p.finished(probe, [Call(SECRET_URL, False, "timeout")])
        clock.now += 6
        probe = p.choose("")
        p.dispatched(probe)
        p.finished(probe, [Call(SECRET_URL, True)])
        p.finished((SECRET_URL,), [Call(SECRET_URL, True)])  # healthy again: nothing more to say
    warned = warnings_of(caplog)
    assert len(warned) == 2, warned
    ejected, back = warned
    assert "http://d:8000/infer ejected" in ejected and "connection_error" in ejected
    assert "http://d:8000/infer answers again after 24 s down" in back
    assert not any("s3cret" in r.getMessage() for r in caplog.records)
    assert p.figures()["http://d:8000/infer"]["ejections"] == 4
    assert "s3cret" not in repr(p.figures())  # the figures go to --report-json and /metrics labels


def test_a_second_outage_is_logged_again(caplog):
    p, clock = pool()
    with caplog.at_level(logging.WARNING, logger="imgworker.endpoints"):
        for _ in range(2):
            p.finished((A,), [Call(A, False, "http_503")] * 2)
            clock.now += 6
            probe = p.choose("")
            while probe[0] != A:
                p.dispatched(probe)
                probe = p.choose("")
            p.dispatched(probe)
            p.finished(probe, [Call(A, True)])
    assert [m.split(" after")[0] for m in warnings_of(caplog)] == [f"algorithm endpoint {A} ejected",
                                                                  f"algorithm endpoint {A} answers again"] * 2


def test_a_failed_probe_keeps_the_outage_clock():
    p, clock = pool(endpoints=[A])
    p.finished((A,), [Call(A, False)] * 2)
    went_down = clock.now
    assert p.down_since("") == went_down
    for _ in range(3):
        clock.now += 6
        probe = p.choose("")
        assert probe == (A,) and p.is_probe(probe)
        p.dispatched(probe)
        assert p.finished(probe, [Call(A, False)])  # the probe met the outage
        assert p.down_since("") == went_down
    assert p.figures()[A]["ejections"] == 4


def test_finished_says_whether_the_item_met_an_outage():
    p, _ = pool()
    assert not p.finished((A,), [Call(A, True)])
    assert not p.finished((A,), [])
    assert not p.finished((A,), [Call(A, False)])  # one failure of a healthy endpoint: the image's own
    assert not p.finished((A, B), [Call(A, False), Call(B, False)])  # A is ejected, but B still counts healthy
    assert p.finished((B,), [Call(B, False)])  # every endpoint it called is ejected now
    assert not p.finished((B,), [Call(B, False), Call(B, True)])  # an answer is not an outage


def test_display_url_drops_credentials_and_query():
    assert display_url(SECRET_URL) == "http://d:8000/infer"
    assert display_url(A) == A


def test_a_late_answer_from_before_the_ejection_does_not_end_the_outage(caplog):
    """A service that stops finishes its last requests: their answers are no sign it is back."""
    p, clock = pool(endpoints=[A])
    early = clock.now
    p.dispatched((A,))
    clock.now += 1
    with caplog.at_level(logging.WARNING, logger="imgworker.endpoints"):
        p.finished((A,), [Call(A, False), Call(A, False)], sent_at=clock.now)  # ejected now
        p.finished((A,), [Call(A, True)], sent_at=early)  # sent before: a late answer
    assert p.figures()[A]["healthy"] == 0 and p.down_since("") > 0
    assert p.choose("") is None  # still in its cooldown
    assert [r.getMessage() for r in caplog.records if "answers again" in r.getMessage()] == []
    clock.now += 6
    probe = p.choose("")
    assert probe == (A,)
    p.dispatched(probe)
    p.finished(probe, [Call(A, True)], sent_at=clock.now)  # the probe, sent after the ejection
    assert p.figures()[A]["healthy"] == 1
