"""Several algorithm services: least-in-flight balancing, per-endpoint limits, ejection and probes.

Plain data owned by the supervisor. ``choose`` gives the endpoints for one item, the least
loaded healthy one first and the other healthy ones as fallbacks for retries. After
``eject_after_failures`` consecutive transient failures an endpoint is ejected for
``eject_cooldown_s``; then one item is let through as a half-open probe, whose success brings it
back and whose failure ejects it again.

An ejection and a recovery are each logged once per outage, at WARNING, naming the endpoint
without credentials or query (``display_url``); a failed probe is logged at INFO. A failed probe
does not restart the outage's clock (``down_since``): images wait for a route from when it went
down, however many probes fail. ``finished`` says whether an item met an outage (every call
failed and left its endpoint ejected): the supervisor puts such an item back to wait instead of
ending it.

With ``algo.adaptive`` each endpoint has an ``adaptive.Controller`` that sets its limit of items in
flight (``limit``); it is fed every call's latency or drop as ``finished`` books it, and a window
that is due closes as an item is dispatched or finished (no calls, nothing to learn). Without it the limit is ``max_in_flight_per_endpoint`` (0: none), as always.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit, urlunsplit

import msgspec

from .adaptive import DROP_CAUSES, Controller, LimitFigures
from .config import AlgoConfig

log = logging.getLogger(__name__)


class Call(msgspec.Struct, frozen=True, array_like=True):
    """One HTTP call a worker made: to which endpoint, whether the service was healthy, and why not."""

    endpoint: str
    healthy: bool
    cause: str = ""
    ms: float = 0.0
    """How long the call took, when the service answered it (0: it did not answer)."""


def display_url(url: str) -> str:
    """``url`` as logs and reports show it: no user, password, query or fragment (they may hold secrets)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable endpoint URL>"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class EndpointState:
    def __init__(self, url: str) -> None:
        self.url = url
        self.in_flight = 0
        self.consecutive_failures = 0
        self.ejected_until = 0.0
        self.down_since = 0.0  # first ejection of the current outage; 0 while healthy
        self.probing = False
        self.requests = 0
        self.failures = 0
        self.ejections = 0

    def figures(self) -> dict[str, int]:
        """Counters; healthy means it answered since its last ejection (a passed cooldown is not health)."""
        return {"requests": self.requests, "failures": self.failures, "ejections": self.ejections,
                "in_flight": self.in_flight, "healthy": int(self.ejected_until <= 0)}


class EndpointPool:
    """Which endpoint each item goes to, and which endpoints are healthy."""

    def __init__(self, cfg: AlgoConfig, clock: Callable[[], float] = time.monotonic, *, lanes: int = 0) -> None:
        """``lanes``: items the run can work on at once, the ceiling of an adaptive limit (0: unknown)."""
        self.cfg = cfg
        self.clock = clock
        urls = list(cfg.endpoints) or [cfg.endpoint]
        for route in cfg.routes.values():
            urls += [u for u in route if u not in urls]
        self.states = {url: EndpointState(url) for url in dict.fromkeys(urls)}
        self._default = list(cfg.endpoints) or [cfg.endpoint]
        caps = [x for x in (lanes, cfg.max_in_flight_per_endpoint) if x]
        self.ceiling = min(caps) if caps else 0
        self.controllers: dict[str, Controller] = {}
        if cfg.adaptive:
            ceiling = max(self.ceiling, cfg.adaptive_min)
            budget_s = cfg.latency_budget_ms / 1000.0 if cfg.latency_budget_ms is not None else None
            self.controllers = {url: Controller(floor=cfg.adaptive_min, ceiling=ceiling, budget_s=budget_s,
                                                clock=clock, name=display_url(url)) for url in self.states}

    def candidates(self, task_type: str) -> list[str]:
        return list(self.cfg.routes.get(task_type, self._default))

    def choose(self, task_type: str) -> tuple[str, ...] | None:
        """Endpoints for one item (first = primary), or None if none can take it now."""
        now = self.clock()
        usable = [self.states[u] for u in self.candidates(task_type) if self._usable(self.states[u], now)]
        if not usable:
            return None
        usable.sort(key=lambda s: s.in_flight)
        primary = usable[0]
        if primary.ejected_until > 0 and primary.ejected_until <= now:
            primary.probing = True  # half-open: this item is the probe
        fallbacks = [s.url for s in usable[1:] if s.ejected_until <= 0]
        return (primary.url, *fallbacks)

    def down_since(self, task_type: str) -> float:
        """When the task type's route lost its last healthy endpoint (0 if one is healthy).

        A route is down while every endpoint of it is ejected; a probe let through after a
        cooldown does not bring it back, only a healthy answer does.
        """
        states = [self.states[u] for u in self.candidates(task_type)]
        if any(s.ejected_until <= 0 for s in states):
            return 0.0
        return max(s.down_since for s in states)

    def is_probe(self, endpoints: Sequence[str]) -> bool:
        """Whether an item sent to ``endpoints`` is its primary's half-open probe (ask before ``finished``)."""
        return bool(endpoints) and endpoints[0] in self.states and self.states[endpoints[0]].probing

    def limit(self, url: str) -> int:
        """How many items ``url`` may have in flight now (0: no limit)."""
        controller = self.controllers.get(url)
        return controller.limit if controller is not None else self.cfg.max_in_flight_per_endpoint

    def _usable(self, state: EndpointState, now: float) -> bool:
        limit = self.limit(state.url)
        if limit and state.in_flight >= limit:
            return False
        if state.ejected_until <= 0:
            return True
        return state.ejected_until <= now and not state.probing

    def dispatched(self, endpoints: Sequence[str]) -> None:
        if endpoints:
            state = self.states[endpoints[0]]
            state.in_flight += 1
            self._in_flight(state)

    def finished(self, endpoints: Sequence[str], calls: Sequence[Call], *, sent_at: float | None = None,
                 probe: bool = False) -> bool:
        """Book the item's calls; True if the item met an outage: every call failed and left its endpoint ejected.

        An item that ended without calls still frees its slot; if it was the half-open ``probe``, another
        item may be the probe (one sent before the ejection that ends so leaves the probe out there).
        ``sent_at`` (this pool's clock) is when the item was sent: a healthy answer to an item sent
        before its endpoint's ejection is a late one (a service finishing its last requests as it
        stops), counted but no sign of recovery; only an item sent since, the probe, can bring the
        endpoint back.
        """
        if endpoints:
            state = self.states[endpoints[0]]
            state.in_flight = max(0, state.in_flight - 1)
            self._in_flight(state)
            if not calls and probe and state.probing:
                state.probing = False  # the probe never reached the service: let another try
        for call in calls:
            self._record(call, sent_at)
            self._feed(call, sent_at)
        return bool(calls) and all(not c.healthy and self._ejected(c.endpoint) for c in calls)

    def _in_flight(self, state: EndpointState) -> None:
        """An adaptive limit follows the calls in flight, and closes a window that is due as they change."""
        controller = self.controllers.get(state.url)
        if controller is not None:
            controller.in_flight(state.in_flight)
            controller.tick()

    def _feed(self, call: Call, sent_at: float | None) -> None:
        """An adaptive limit learns from each answered call's time, and from each overload drop."""
        controller = self.controllers.get(call.endpoint)
        if controller is None:
            return
        sent = -math.inf if sent_at is None else sent_at  # unknown: as if sent before any probe
        if call.ms > 0:
            controller.record(sent_at=sent, latency_s=call.ms / 1000.0)
        elif not call.healthy and call.cause in DROP_CAUSES:
            controller.record(sent_at=sent, drop=True)

    def limit_figures(self) -> dict[str, LimitFigures]:
        """Each endpoint's limit as metrics show it; without ``adaptive``, the fixed one (the ceiling)."""
        out: dict[str, LimitFigures] = {}
        for url in self.states:
            controller = self.controllers.get(url)
            out[display_url(url)] = controller.figures() if controller is not None else \
                LimitFigures(limit=self.ceiling, mean_limit=self.ceiling, min_limit=self.ceiling,
                             max_limit=self.ceiling)
        return out

    def _ejected(self, url: str) -> bool:
        state = self.states.get(url)
        return state is not None and state.ejected_until > 0

    def _record(self, call: Call, sent_at: float | None = None) -> None:
        state = self.states.get(call.endpoint)
        if state is None:
            return
        state.requests += 1
        if call.healthy and state.ejected_until > 0 and sent_at is not None and sent_at < state.down_since:
            return  # a late answer from before the outage
        if call.healthy:
            if state.ejected_until > 0:
                log.warning("algorithm endpoint %s answers again after %.0f s down; images for it go on",
                            display_url(state.url), self.clock() - state.down_since)
            state.consecutive_failures = 0
            state.ejected_until = 0.0
            state.down_since = 0.0
            state.probing = False
            return
        state.failures += 1
        state.consecutive_failures += 1
        if state.probing or state.consecutive_failures >= self.cfg.eject_after_failures:
            self._eject(state, call.cause or "unhealthy")

    def _eject(self, state: EndpointState, cause: str) -> None:
        """Eject (or, after a failed probe, keep ejected) for a cooldown; the outage's clock is not restarted."""
        now = self.clock()
        if state.ejected_until <= 0:
            state.down_since = now
            log.warning("algorithm endpoint %s ejected after %d consecutive failed calls (last: %s); "
                        "one probe every %g s until it answers", display_url(state.url),
                        state.consecutive_failures, cause, self.cfg.eject_cooldown_s)
        elif state.probing:
            log.info("algorithm endpoint %s: probe failed (%s), down for %.0f s", display_url(state.url), cause,
                     now - state.down_since)
        if state.ejected_until <= 0 or state.probing:
            state.ejections += 1
        state.ejected_until = now + self.cfg.eject_cooldown_s
        state.probing = False

    def figures(self) -> dict[str, dict[str, int]]:
        """Each endpoint's counters, keyed as reports and metrics show it (``display_url``: no credentials)."""
        return {display_url(url): state.figures() for url, state in self.states.items()}
