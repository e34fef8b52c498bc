from __future__ import annotations

from imgworker.config import load_config
from imgworker.endpoints import Call, EndpointPool

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
