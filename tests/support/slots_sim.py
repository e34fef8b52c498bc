"""A virtual-clock simulation of a server of ``c`` slots, driven by an adaptive ``Controller`` (or a fixed limit).

Deterministic: one seeded ``random.Random`` draws every service time (lognormal jitter around the
phase's mean), events run in virtual time, so a run gives the same figures every time and takes
no wall-clock time to speak of. Demand never runs out: the client sends whenever fewer calls than
the limit are in flight. The server serves ``slots`` calls at a time in arrival order; a call
that waits past ``timeout_s`` (queue plus service) is a drop for the client, and its slot stays
busy until the server finishes it, as a real server's would.

A server may also shed load (``shed_above``): a call that finds a full queue is refused at once.

Figures are kept per one-second window of virtual time (``Second``), so tests can assert ranges
per phase and per window.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from imgworker.adaptive import Controller, percentile


#: How long a refused call takes to come back.
SHED_S = 0.01


@dataclass(frozen=True)
class Phase:
    """``duration_s`` of virtual time at ``slots`` slots and a mean service time of ``service_s``."""

    duration_s: float
    slots: int
    service_s: float


@dataclass
class Second:
    """What one second of virtual time showed."""

    start: float
    phase: int
    limit_area: float = 0.0  # limit x seconds
    completed: int = 0
    drops: int = 0
    latencies: list[float] = field(default_factory=list)
    infeasible: bool = False
    min_limit: int = 1 << 30

    @property
    def mean_limit(self) -> float:
        return self.limit_area

    @property
    def p95(self) -> float:
        return percentile(self.latencies, 95.0)


@dataclass
class Run:
    phases: list[Phase]
    seconds: list[Second]

    def of_phase(self, index: int, skip_s: float = 0.0) -> list[Second]:
        start = sum(p.duration_s for p in self.phases[:index])
        return [s for s in self.seconds if s.phase == index and s.start >= start + skip_s]

    @staticmethod
    def mean_limit(seconds: list[Second]) -> float:
        return sum(s.limit_area for s in seconds) / len(seconds)

    @staticmethod
    def throughput(seconds: list[Second]) -> float:
        return sum(s.completed for s in seconds) / len(seconds)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(phases: list[Phase], *, sigma: float = 0.2, seed: int = 1, timeout_s: float = math.inf,
             make: Callable[[Callable[[], float]], Controller] | None = None, fixed: int = 0,
             tick_s: float = 0.05, shed_above: int = -1) -> Run:
    """Run ``phases`` back to back against a controller built by ``make(clock)``, or a fixed limit.

    ``shed_above`` >= 0: a call that finds that many already waiting is refused at once (a 503/429).
    """
    clock = _Clock()
    controller = make(clock) if make is not None else None
    rng = random.Random(seed)
    mu_shift = sigma * sigma / 2.0
    ends = [sum(p.duration_s for p in phases[: i + 1]) for i in range(len(phases))]
    total = ends[-1]
    events: list[tuple[float, int, str, int]] = []  # (time, seq, kind, call)
    seq = 0

    def push(at: float, kind: str, call: int) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, seq, kind, call))

    phase = 0
    busy = 0
    queue: deque[int] = deque()
    sent_at: dict[int, float] = {}  # calls the client still waits for
    in_flight = 0
    next_call = 0
    seconds = [Second(start=0.0, phase=0)]
    last = 0.0

    def limit() -> int:
        return controller.limit if controller is not None else fixed

    def start_service(call: int) -> None:
        nonlocal busy
        busy += 1
        mean = phases[phase].service_s
        service = rng.lognormvariate(math.log(mean) - mu_shift, sigma) if sigma > 0 else mean
        push(clock.now + service, "done", call)

    def advance(to: float) -> None:
        nonlocal last
        while to > last:
            current = seconds[-1]
            edge = min(to, current.start + 1.0)
            current.limit_area += limit() * (edge - last)
            current.min_limit = min(current.min_limit, limit())
            last = edge
            if edge >= current.start + 1.0 and edge < total:
                if controller is not None:
                    current.infeasible = controller.infeasible
                new_phase = next(i for i, end in enumerate(ends) if edge < end)
                seconds.append(Second(start=edge, phase=new_phase))

    def feed() -> None:
        nonlocal in_flight, next_call
        while in_flight < limit():
            call = next_call
            next_call += 1
            in_flight += 1
            sent_at[call] = clock.now
            if timeout_s < math.inf:
                push(clock.now + timeout_s, "timeout", call)
            if busy < phases[phase].slots:
                start_service(call)
            elif 0 <= shed_above <= len(queue):
                push(clock.now + SHED_S, "shed", call)
            else:
                queue.append(call)
        if controller is not None:
            controller.in_flight(in_flight)

    def client_done(call: int, *, drop: bool) -> None:
        nonlocal in_flight
        sent = sent_at.pop(call)
        in_flight -= 1
        if controller is not None:
            controller.in_flight(in_flight)
            controller.record(sent_at=sent, latency_s=None if drop else clock.now - sent, drop=drop)
        second = seconds[-1]
        if drop:
            second.drops += 1
        else:
            second.completed += 1
            second.latencies.append(clock.now - sent)

    def server_free() -> None:
        while queue and busy < phases[phase].slots:
            call = queue.popleft()
            if call in sent_at:  # a call the client gave up on while it queued is not served
                start_service(call)

    for end in ends[:-1]:
        push(end, "phase", -1)
    t = 0.0
    while t < total:
        t += tick_s
        push(t, "tick", -1)
    feed()
    while events:
        at, _, kind, call = heapq.heappop(events)
        if at >= total:
            break
        advance(at)
        clock.now = at
        if kind == "done":
            busy -= 1
            if call in sent_at:
                client_done(call, drop=False)
            server_free()
        elif kind in ("timeout", "shed"):
            if call in sent_at:
                client_done(call, drop=True)
        elif kind == "phase":
            phase += 1
            server_free()
        elif controller is not None:
            controller.tick()
        feed()
    advance(total)
    if controller is not None:
        seconds[-1].infeasible = controller.infeasible
    return Run(phases=phases, seconds=seconds)
