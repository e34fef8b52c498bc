"""Adaptive concurrency: how many calls each algorithm endpoint may have in flight (plain data, no I/O).

One ``Controller`` per endpoint. It is fed what the endpoint did (``record``: a call's latency, or
a drop: a timeout, 429, 503/504, a connection error) and how many calls were in flight
(``in_flight``), and closes a *window* on its injected clock (``tick``). At the end of each window
``update`` decides the limit from the window's figures alone, so table tests can feed it windows
and assert exact limits.

The model (Little's law at a server of ``c`` slots): with ``L`` calls in flight and the server
busy, a call waits ``mean/baseline`` times its no-load time, so ``L x (1 - baseline/mean)`` calls
are queued at the server and ``L - queue`` is the knee ``c``. Both sides are window *means*.
The controller keeps that queue estimate inside a small band (``BAND``, wider for a large knee:
``BAND_SHARE``) above the knee:

- above the band: jump to ``knee + middle of the band`` (one step, the estimate is exact in the mean); a window
  that shows ``FLOODED`` times the widest band queued closes after ``EARLY_S`` with ``MIN_SAMPLES`` calls, not
  after its second (after a step to fewer slots every call sent meanwhile waits behind the others);
- below it (and the endpoint had the calls to use it): grow, doubling while nothing queues at all;
- a drop in the window: cut to ``limit x CUT`` (drops say overload whatever the estimate says), and
  for ``PROBE_EVERY`` windows do not grow back to the limit that dropped (a server that sheds load
  with 429/503 keeps its queue short, so the queue estimate alone would not see the overload);
- p95 over ``latency_budget_ms`` with calls queued (the window's mean over the baseline by more than its
  own noise, and the limit above the knee): cut, and narrow the band by one more call (its ``margin``, given
  back after ``CALM_WINDOWS`` windows under the budget). Over it with nothing queued (at the knee, or a heavy
  tail's jitter) the limit neither cuts nor grows, and does not grow for ``OVER_HOLD`` windows (at most as
  many ``WINDOW_S``), a hold that jitter alone does not renew: under the knee the estimate cannot tell the
  knee from the limit, so the limit tries one call more after each hold. The band is also capped at the queue the
  budget allows: ``knee x (BUDGET_AIM x budget/baseline_p95 - 1)``. Neither this cut nor the band
  takes the limit under the knee (busy slots, throughput x baseline by Little's law, smoothed; at
  least the highest limit lately used in full with no queue): under it no call queues, so the p95
  cannot get lower and only throughput is lost; only drops cut under it. For ``OVER_HOLD`` windows
  the limit does not grow past where the p95 went over; past the knee (not past one call under it), or where
  the budget allows less than a call queued, for ``OVER_HOLD_PAST_KNEE`` times as long; a try past a hold
  that goes over again doubles the next
  (up to ``OVER_HOLD_MAX`` times ``OVER_HOLD``): where the budget allows less than one call queued, each try at
  one call more costs windows over the budget, and tries that keep finding the same knee come ever less often;
- the window right after a cut cuts at most to the knee unless it drops calls (its calls were sent
  under the higher limit, so its queue is the old one);
- a budget that even no queueing misses (``baseline_p95 > budget``) is *infeasible*: hold at the
  knee (``KNEE_BAND``), set the flag, warn once, and do not cut on latency (that would collapse).

The baseline (no-load mean latency, and its p95) comes from *probe windows*: the limit drops to
``PROBE_DEPTH`` of the knee (half the starting limit for the first; at least a third of the limit
before the server changed; it ends after ``PROBE_SAMPLES`` calls, or after ``PROBE_S`` with ``MIN_SAMPLES``
that agree to within ``PROBE_NOISE``, so a slower server costs no long probe), and only calls sent
since the probe began count (calls sent before it queued behind the old limit and would raise the
baseline). A probe runs at the start, every ``PROBE_EVERY`` windows, and at once when the estimate
looks wrong (two windows in a row with more queued than the widest band, or over the budget with
more queued than the band allows: at the knee, a p95 over the budget is the server's own jitter, or
a settled window with fewer calls in flight than the last one over the band whose mean did not fall as the
estimate says: a saturated server's would, so the server was not saturated and the "queue" is a stale
baseline's, which the queue rule would follow down to the floor), which is how a slower server is noticed.
A live window that measured the baseline again (enough calls, its mean within its noise of the baseline, its
p95 within the budget) puts the scheduled probe off: it was a probe's measurement already. A probe that finds
the server slower measures again once, under the knee its own figures allow if its calls only queued
(``limit x baseline / mean``): one depth cannot tell a slower server from one of fewer slots at which the probe's
calls queued (after a step from 24 to 6 slots, a third of the settled limit is over the new knee), and the
queue would raise the baseline; a slower server is slower at any depth. If the second depth finds the same
speed, the server has fewer slots, and the knee is no more than the first depth's figures gave. After it the
limit is what the last live window calls for, seen with the new baseline. When the probe finds the server's speed changed, the knee is the most
calls the server kept busy (throughput x the new baseline, Little's law) in that window or in the
windows that called for the probe, so after a slower server cut the limit it goes straight back to
the new knee instead of growing a call a window. A live window clearly faster than the baseline
(``LOWER``, and by more than its own noise: a heavy tail would ratchet it down) lowers it at once, and a much faster one (``FASTER``) also starts a probe. The limit stays within
``[floor, ceiling]``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import msgspec

log = logging.getLogger(__name__)

#: The queue (calls waiting at the server) the limit is kept at: low and high end of the band (the least;
#: ``BAND_SHARE`` widens it for a large knee).
BAND = (3.0, 6.0)
#: The high end of the band is at least this share of the knee (the low end half of it): with many calls in
#: flight the client's own time per call (scheduling, its CPU) also reads as queueing, in proportion to them.
BAND_SHARE = 1.0 / 3.0
#: The band while holding at the knee (a budget no queueing can meet).
KNEE_BAND = (0.5, 1.5)
#: The multiplicative cut on a drop or a p95 over the budget.
CUT = 0.9
#: The shortest live window (seconds), and the fewest completed calls that close one.
WINDOW_S = 1.0
MIN_SAMPLES = 10
#: A window with too few calls closes anyway after this long (seconds).
MAX_WINDOW_S = 30.0
#: A live window closes early, after this long (seconds), if it already shows ``FLOODED`` times the widest band queued.
EARLY_S = 0.25
FLOODED = 2.0
#: Completed calls (sent since the probe began) that end a probe window.
PROBE_SAMPLES = 20
#: A probe that has run this long (seconds) ends with ``MIN_SAMPLES`` calls (at a low limit against a slow
#: server, ``PROBE_SAMPLES`` would take seconds of lost throughput).
PROBE_S = 2.0
#: ... if the mean of its calls is known that well (two standard errors, as a share of it).
PROBE_NOISE = 0.25
#: Completed calls that end the first probe (a run should not start at the floor for long; the next
#: probes measure with ``PROBE_SAMPLES``).
FIRST_PROBE_SAMPLES = 5
#: Live windows between two scheduled probes.
PROBE_EVERY = 30
#: A window used the limit when its mean in-flight reached this share of it (else it does not grow).
SATURATED = 0.8
#: The share of the latency budget the band aims the p95 at (a window's p95 is noisy).
BUDGET_AIM = 0.9
#: A live window whose mean is under this share of the baseline lowers it at once (noise alone would
#: ratchet it down if any faster window did).
LOWER = 0.9
#: A live window whose mean is under this share of the baseline starts a probe (the server got faster).
FASTER = 0.8
#: Windows in a row under the budget after which the band gets back one call of its budget margin.
CALM_WINDOWS = 20

#: The weight of a window's knee in the smoothed knee (``knee_mean``).
KNEE_EWMA = 0.3
#: Live windows after a p95 over the budget in which the limit does not grow back to where it was.
OVER_HOLD = 30
#: A hold after calls over the knee went over the budget is this many ``OVER_HOLD``; a try past it that goes over
#: again doubles the next, up to ``OVER_HOLD_MAX`` of them (the knee has not moved: where the budget allows less
#: than a call queued, each try costs two windows over it).
OVER_HOLD_PAST_KNEE = 2
OVER_HOLD_MAX = 8
#: A probe runs at this share of the knee (under it, no call queues).
PROBE_DEPTH = 0.75
#: The least depth a probe that found the server slower measures again at (see ``_knee_if_queued``).
MIN_AGAIN = 2

#: Call causes that mean "the endpoint is overloaded": each cuts the limit.
DROP_CAUSES = frozenset({"timeout", "http_429", "http_503", "http_504", "connection_error"})


class Window(msgspec.Struct, frozen=True, kw_only=True):
    """What one endpoint did in one window: latencies (seconds) of answered calls, drops, mean in flight."""

    latencies: tuple[float, ...] = ()
    drops: int = 0
    in_flight: float = 0.0
    """Time-weighted mean of the calls in flight over the window."""
    duration_s: float = 0.0
    """How long the window lasted (0: not known)."""

    @property
    def mean(self) -> float:
        return sum(self.latencies) / len(self.latencies) if self.latencies else 0.0

    @property
    def p95(self) -> float:
        return percentile(self.latencies, 95.0)


class LimitFigures(msgspec.Struct, frozen=True, kw_only=True):
    """One endpoint's controller as metrics and the report show it."""

    limit: int
    baseline_s: float = 0.0
    queue_estimate: float = 0.0
    budget_infeasible: bool = False
    probes: int = 0
    mean_limit: float = 0.0
    """Time-weighted mean of the limit since the run started."""
    min_limit: int = 0
    max_limit: int = 0


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile ``q`` (0..100) of ``values`` (0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * q / 100.0) - 1)]


def noise(window: Window) -> float:
    """Two standard errors of the window's mean latency, as a share of it (0 with fewer than two calls)."""
    n = len(window.latencies)
    mean = window.mean
    if n < 2 or mean <= 0:
        return 0.0
    spread = math.sqrt(sum((x - mean) ** 2 for x in window.latencies) / (n - 1))
    return 2.0 * spread / mean / math.sqrt(n)


class Controller:
    """The limit of one endpoint; ``update`` is the decision, ``record``/``in_flight``/``tick`` feed it."""

    def __init__(self, *, floor: int, ceiling: int, budget_s: float | None = None, initial: int = 0,
                 clock: Callable[[], float] = time.monotonic, name: str = "") -> None:
        """``initial``: the limit to start from once the first probe measured the baseline (0: ``floor``)."""
        if not 1 <= floor <= ceiling:
            raise ValueError(f"need 1 <= floor <= ceiling, got {floor} and {ceiling}")
        self.floor, self.ceiling, self.budget_s = floor, ceiling, budget_s
        self.clock = clock
        self.name = name
        self.limit = max(floor, min(ceiling, initial or floor))
        self.baseline_s = 0.0  # 0: not measured yet
        self.baseline_p95_s = 0.0
        self.queue = 0.0
        self.knee = float(self.limit)
        self.knee_mean = 0.0  # busy slots (throughput x baseline), smoothed over windows (0: none yet)
        self.infeasible = False
        self.probes = 0
        self.margin = 0  # calls taken off the band after p95 went over the budget
        self._calm = 0
        self._high = 0  # windows in a row above the band
        self._over = 0  # windows in a row over the budget
        self._since_probe = 0
        self._warned = False
        self._faster = False  # a live window was much faster than the baseline
        self._dropped_at = 0  # the limit at which calls were last dropped (0: none lately)
        self._since_drop = 0
        self._over_cap = 0  # the limit not to grow past after p95 was over the budget (0: none lately)
        self._since_over = 0
        self._over_at = 0.0  # when (on the clock) the p95 was last over the budget
        self._hold = OVER_HOLD  # windows the hold lasts now
        self._cut = False  # the last window lowered the limit
        self._moved = True  # the last window (or probe) changed the limit: this one's calls were sent under another
        self._clear_at = 0  # the highest limit fully used lately with no queue: the knee is at least this
        self._since_clear = 0
        # the last settled window with more queued than the band: (in flight, mean, noise, limit, rate)
        self._ref: tuple[float, float, float, int, float] | None = None
        self._again_knee = 0.0  # measuring again: the knee if the first depth's calls only queued (0: not)
        self._unsaturated = False  # a lower limit did not lower the mean: nothing queued, the baseline is stale
        now = clock()
        self._window_start = now
        self._samples: list[float] = []
        self._drops = 0
        self._area = 0.0  # calls in flight x seconds, this window
        self._current = 0  # calls in flight now
        self._changed_at = now
        self._probing = False
        self._restore = floor  # the limit to go back to after a probe
        self._settled = self.limit  # the limit before the windows that called for this probe
        self._previous = (0.0, 0.0)  # the last live window's mean in flight and mean latency
        self._rates: list[float] = []  # answered calls a second in the windows that called for a probe
        self._started = now
        self._last = now
        self._limit_area = 0.0
        self.min_limit = self.max_limit = self.limit
        self._start_probe(now)

    # ----- feeding ---------------------------------------------------------------------

    def in_flight(self, count: int) -> None:
        """The endpoint has ``count`` calls in flight from now on."""
        now = self.clock()
        self._area += self._current * (now - max(self._changed_at, self._window_start))
        self._current, self._changed_at = count, now

    def record(self, *, sent_at: float, latency_s: float | None = None, drop: bool = False) -> None:
        """One call ended: answered after ``latency_s``, or dropped. ``sent_at`` on this clock."""
        if self._probing and sent_at < self._window_start:
            return  # queued behind the limit before the probe: not the no-load latency
        if drop:
            self._drops += 1
        elif latency_s is not None:
            self._samples.append(latency_s)

    def tick(self) -> bool:
        """Close the window if it is due; True if the limit changed."""
        now = self.clock()
        self._limit_area += self.limit * (now - self._last)
        self._last = now
        elapsed = now - self._window_start
        if self._probing:
            enough = PROBE_SAMPLES if self.baseline_s else FIRST_PROBE_SAMPLES  # the first: soon a rough baseline
            # a slow server: end on time, unless the calls so far are too spread to give a baseline
            timely = elapsed >= PROBE_S and len(self._samples) >= min(enough, MIN_SAMPLES) \
                and noise(Window(latencies=tuple(self._samples))) <= PROBE_NOISE
            if self._drops or len(self._samples) >= enough or timely or (elapsed >= MAX_WINDOW_S and self._samples):
                return self._end_probe(now)
            return False
        if (elapsed < WINDOW_S and not self._flooded(elapsed)) \
                or (len(self._samples) < MIN_SAMPLES and not self._drops and elapsed < MAX_WINDOW_S):
            return False
        self.in_flight(self._current)
        window = Window(latencies=tuple(self._samples), drops=self._drops, in_flight=self._area / elapsed,
                        duration_s=elapsed)
        self._new_window(now)
        old = self.limit
        self.update(window)
        if self._wants_probe():
            self._start_probe(now)
        return self.limit != old

    def _flooded(self, elapsed: float) -> bool:
        """This window, not yet over, already shows far more queued than the widest band: close it now (after a
        step to fewer slots every call sent while the limit stays high waits behind the others)."""
        if elapsed < EARLY_S or len(self._samples) < MIN_SAMPLES or not self.baseline_s:
            return False
        mean = sum(self._samples) / len(self._samples)
        return self._current * (1.0 - self.baseline_s / mean) > FLOODED * self._widest()

    # ----- deciding --------------------------------------------------------------------

    def update(self, window: Window) -> int:
        """The limit after a live window (pure: the window's figures and this controller's state)."""
        if not window.latencies and not window.drops:
            return self.limit
        if window.latencies:
            self._estimate(window)
        if not self._confirms_baseline(window):
            self._since_probe += 1  # a window that measured the baseline again puts the next probe off
        old = self.limit
        if not self._high and not self._over:
            self._settled = old  # the limit before any sign of a change at the server
        new = self._toward_band(window) if window.latencies else self.limit
        self._since_drop += 1
        self._since_over += 1
        if window.drops:
            new = min(new, math.floor(self.limit * CUT))
            self._dropped_at, self._since_drop = self.limit, 0
        elif self._over_budget(window):
            knee = self._knee_floor()
            if self.limit <= knee or not self._queued(window):
                # at the knee, or less queued than the window's own noise: the p95 is the server's jitter,
                # which a lower limit cannot lower. Do not cut; grow no further for a while, but only if no
                # such hold is on already: renewed by jitter alone, a hold under the knee would never end (a
                # heavy tail puts windows over the budget at any limit, and at a low limit the knee estimate
                # cannot exceed it), so the limit tries one call more after each hold
                new = min(new, self.limit)
                # over the knee the calls over it queued, if too few to tell from the noise: not that many again
                self._hold_under(min(self.limit, max(knee, self.limit - 1)), renew=False)
            else:
                # above the knee the calls over it queued: cut, but not under the knee (only drops do)
                new = min(new, max(math.floor(self.limit * CUT), knee))
                self._hold_under(max(knee, self.limit - 1), renew=True)
                if self.band()[1] > 0.5:
                    self.margin += 1
        if (self._high or self._over) and window.duration_s:  # a sign of change: what the server did then counts
            self._rates.append(len(window.latencies) / window.duration_s)
        elif not self._high and not self._over:
            self._rates = []
        if window.latencies:
            self._unsaturated = self._unsaturated or self._not_saturated(window)
        if self._cut and not window.drops:  # its calls were sent under the limit before the cut: wait a window
            new = max(new, min(old, self._knee_floor()))
        self._cut = new < old
        self._set(new, old)
        self._moved = self.limit != old
        return self.limit

    def _estimate(self, window: Window) -> None:
        mean = window.mean
        if not self.baseline_s or mean < self._lower(window) * self.baseline_s:
            self._faster = mean < FASTER * self.baseline_s  # much faster: measure it cleanly
            # a live window faster than the baseline: the baseline was stale; its p95 scales with it (a
            # loaded window's own p95 is not a no-load figure)
            self.baseline_p95_s = self.baseline_p95_s * mean / self.baseline_s if self.baseline_s else window.p95
            self.baseline_s = mean
            self._check_feasible()
        used = window.in_flight
        self._previous = (used, mean)
        self.queue = max(0.0, used * (1.0 - self.baseline_s / mean)) if mean > 0 else 0.0
        self.knee = max(1.0, used - self.queue)
        # busy slots by Little's law: unlike ``knee``, not thrown off by calls still queued from a higher limit
        busy = len(window.latencies) / window.duration_s * self.baseline_s if window.duration_s else self.knee
        self.knee_mean = busy if not self.knee_mean else KNEE_EWMA * busy + (1.0 - KNEE_EWMA) * self.knee_mean
        self._since_clear += 1
        if self.queue > self._widest():
            self._clear_at = 0  # far more queued than any band: the server may have fewer slots now
        elif not self._moved and used >= self.limit - 0.5 and self.queue < self.band()[0] and self.limit >= self._clear_at:
            self._clear_at, self._since_clear = self.limit, 0

    def _not_saturated(self, window: Window) -> bool:
        """This settled window ran fewer calls than the busiest one over the band lately, and its mean did not
        fall as the queue estimate says it would (a saturated server's mean falls with the calls in flight,
        down to the baseline): the server was not saturated, the calls read as queued are a stale baseline's
        (a slower server), and the queue rule would cut the limit down to the floor. Keeps that reference."""
        used, mean, spread = window.in_flight, window.mean, noise(window)
        ref = self._ref
        if self.queue <= self.band()[1]:
            self._ref = None  # the estimate and the limit agree
            return False
        if ref is None or used > ref[0]:  # the window over the band with the most calls in flight
            rate = len(window.latencies) / window.duration_s if window.duration_s else 0.0
            self._ref = (used, mean, spread, self.limit, rate)
            return False
        if self._moved or used > ref[0] - 1.0 or not self.baseline_s:
            return False  # its calls were sent under another limit, or no fewer of them
        ref_used, ref_mean, ref_noise, ref_limit, ref_rate = ref
        expected = max(self.baseline_s, ref_mean * used / ref_used)
        fall = ref_mean - expected
        if fall <= (spread + ref_noise) * ref_mean or mean <= ref_mean - fall / 2.0:
            return False
        self._rates.append(ref_rate)  # what the server kept busy then is its knee at its new speed
        self._settled = max(self._settled, ref_limit)
        return True

    def _confirms_baseline(self, window: Window) -> bool:
        """This window measured the no-load latency as a probe would: enough calls, none dropped, its mean within
        its own noise of the baseline (nothing queued) and its p95 within the budget. A faster mean lowers the
        baseline at once and a slower one reads as queued, so only a baseline that is still right is confirmed."""
        return len(window.latencies) >= MIN_SAMPLES and not window.drops and not self._queued(window) \
            and (self.budget_s is None or window.p95 <= self.budget_s)

    def _queued(self, window: Window) -> bool:
        """Calls queued in this window: its mean over the baseline by more than its own noise (with a heavy
        latency tail, one slow call in a window of ten reads as a queue)."""
        return bool(self.baseline_s) and window.mean * (1.0 - noise(window)) > self.baseline_s

    def _lower(self, window: Window) -> float:
        """The share of the baseline under which this window's mean lowers it: ``LOWER``, or less when the
        window's own noise could put its mean there (a heavy latency tail would otherwise ratchet the
        baseline down window by window, and every call would read as queued)."""
        return min(LOWER, 1.0 - noise(window))

    def _hold_under(self, cap: int, *, renew: bool) -> None:
        """Do not grow past ``cap`` for a while (``renew``: start again a hold that is on; else leave it be).

        Calls past the knee that went over the budget hold ``OVER_HOLD_PAST_KNEE`` times longer than over it at the
        knee, and the first try past a hold that goes over again doubles the next (the knee has not moved).
        """
        holding = self._holding_over()
        if holding and not renew:
            return
        first = OVER_HOLD * (OVER_HOLD_PAST_KNEE if cap < self.limit or self.band()[1] < 1.0 else 1)
        if holding:
            self._hold = max(self._hold, first)
        elif self._over_cap and self.limit > self._over_cap:
            self._hold = min(OVER_HOLD * OVER_HOLD_MAX, max(first, self._hold * 2))
        else:
            self._hold = first
        self._over_cap, self._since_over, self._over_at = cap, 0, self.clock()

    def _holding_over(self) -> bool:
        """The limit is held under ``_over_cap``: for ``OVER_HOLD`` windows, and no longer than as many
        shortest windows (at a low limit, windows wait for their calls and would stretch the hold)."""
        return bool(self._over_cap) and self._since_over < self._hold \
            and self.clock() - self._over_at < self._hold * WINDOW_S

    def _knee_floor(self) -> int:
        """The knee as whole calls: smoothed (one window's knee is noisy), but not over this window's.

        Neither a p95 over the budget nor the queue rule takes the limit under it (only drops do).
        """
        clear = self._clear_at if self._since_clear < OVER_HOLD else 0
        return max(self.floor, clear, min(round(self.knee_mean or self.knee), math.ceil(self.knee)))

    def _over_budget(self, window: Window) -> bool:
        over = self.budget_s is not None and bool(window.latencies) and window.p95 > self.budget_s
        if self.infeasible:
            self._over = 0
            return False  # hold at the knee, do not collapse (a probe tells when the budget is met again)
        # over the budget with more queued than the band allows, twice in a row: the baseline may be stale
        # (at the knee, over the budget is the server's own jitter, which a probe would measure again)
        self._over = self._over + 1 if over and self.queue > self.band()[1] + 1.0 else 0
        if over:
            self._calm = 0
            return True
        self._calm += 1
        if self._calm >= CALM_WINDOWS and self.margin:
            self.margin -= 1
            self._calm = 0
        return False

    def band(self) -> tuple[float, float]:
        """The queue the limit is kept at now: ``BAND``, narrowed by the budget, or the knee's."""
        if self.infeasible:
            return KNEE_BAND
        hi = self._widest()
        lo = hi / 2.0
        if self.budget_s is not None and self.baseline_p95_s:
            allowed = self.knee * (BUDGET_AIM * self.budget_s / self.baseline_p95_s - 1.0) - self.margin
            hi = max(0.5, min(hi, allowed))
            lo = min(lo, hi / 2.0)
        return lo, hi

    def _widest(self) -> float:
        """The high end of the band with no budget: ``BAND``, or ``BAND_SHARE`` of the knee if that is more."""
        return max(BAND[1], BAND_SHARE * self.knee)

    def _toward_band(self, window: Window) -> int:
        lo, hi = self.band()
        q = self.queue
        # far above even the widest band twice in a row, after a jump that should have landed in it: the
        # baseline is stale (the server got slower)
        self._high = self._high + 1 if q > self._widest() else 0
        if q > hi:
            return max(min(self.limit - 1, round(self.knee + (lo + hi) / 2.0)), min(self.limit, self._knee_floor()))
        if q >= lo or window.in_flight < SATURATED * self.limit:
            return self.limit
        grown = self.limit + max(1, math.ceil((lo + hi) / 2.0 - q))
        if q < 0.5 and not self.infeasible:
            grown = max(grown, 2 * self.limit)  # nothing queues: the knee is further up
        if self._dropped_at and self._since_drop < PROBE_EVERY:
            grown = min(grown, max(self.limit, self._dropped_at - 1))  # stay under where calls were dropped
        if self._holding_over():
            grown = min(grown, max(self.limit, self._over_cap))  # nor past where p95 went over the budget
        if self.budget_s is not None and self.baseline_p95_s and not self.infeasible:
            # even if the knee were the calls in flight now, the p95 would stay within the budget
            aim = BUDGET_AIM * self.budget_s / self.baseline_p95_s
            grown = min(grown, max(self.limit + 1, math.floor(window.in_flight * aim)))
        return grown

    def _set(self, new: int, old: int) -> None:
        self.limit = max(self.floor, min(self.ceiling, new))
        self.min_limit = min(self.min_limit, self.limit)
        self.max_limit = max(self.max_limit, self.limit)
        if abs(self.limit - old) > 1:
            log.info("algorithm endpoint %s: concurrency limit %d -> %d (queue estimate %.1f, baseline %.0f ms)",
                     self.name, old, self.limit, self.queue, self.baseline_s * 1000.0)

    def _check_feasible(self) -> None:
        was = self.infeasible
        self.infeasible = self.budget_s is not None and self.baseline_p95_s > self.budget_s
        if self.infeasible and not was and not self._warned:
            self._warned = True
            log.warning("algorithm endpoint %s: p95 %.0f ms with no queueing is over the latency budget of %.0f ms; "
                        "holding the concurrency limit at the knee", self.name, self.baseline_p95_s * 1000.0,
                        (self.budget_s or 0.0) * 1000.0)

    # ----- probes ----------------------------------------------------------------------

    def _wants_probe(self) -> bool:
        return self._since_probe >= PROBE_EVERY or self._high >= 2 or self._over >= 2 or self._faster \
            or self._unsaturated

    def _start_probe(self, now: float) -> None:
        """Measure the no-load latency: under the knee in flight, only calls sent from now on count."""
        self._probing = True
        self._restore = self.limit
        self.probes += 1
        self._high = self._over = 0
        self._faster = self._unsaturated = False
        self._ref = None
        # under the knee even when the knee was taken from a stale baseline: a third of the settled limit
        depth = PROBE_DEPTH if self.baseline_s else 0.5  # the first: the knee is only the starting limit
        low = max(self.floor, math.floor(self.knee * depth))  # under the knee if the baseline is right
        self._set(min(max(self.limit, self._settled), max(low, self._settled // 3)), self.limit)
        self._again_knee = 0.0
        self._new_window(now)

    def _end_probe(self, now: float) -> bool:
        old = self.limit
        probe = Window(latencies=tuple(self._samples))
        knee = self._knee_if_queued(probe)
        again = max(self.floor, math.floor(knee * PROBE_DEPTH))
        if knee and MIN_AGAIN <= again < self.limit:
            # slower: the server may have fewer slots and the probe's calls queued (the baseline would climb);
            # measure again under the knee that would be (a slower server is slower at any depth)
            self._set(again, old)
            self._again_knee = knee
            self._new_window(now)
            return True
        self._probing = False
        self._moved = True
        self._since_probe = 0
        if self._drops:
            self._restore = math.floor(self._restore * CUT)
        elif self._samples:
            before = self.baseline_s
            self.baseline_s = sum(self._samples) / len(self._samples)
            changed = not FASTER * before <= self.baseline_s <= before / FASTER
            if changed:
                self._over_cap = self._clear_at = 0  # the server changed: what was seen before says nothing now
            self.baseline_p95_s = percentile(self._samples, 95.0)
            self._check_feasible()
            self._restore = self._limit_for_last_window(changed=changed)
            if self._dropped_at and self._since_drop < PROBE_EVERY:
                self._restore = min(self._restore, max(self.floor, self._dropped_at - 1))
            if self._holding_over():
                self._restore = min(self._restore, max(self._knee_floor(), self._over_cap))
        self._set(self._restore, old)
        self._new_window(now)
        return self.limit != old

    def _knee_if_queued(self, probe: Window) -> float:
        """The knee if this probe's calls were slower only because they queued, or 0: it is measured as it stands.

        A probe slower than the baseline, at ``limit`` calls, is either a slower server or a server of fewer slots
        at which its calls queued: then the knee is ``limit x baseline / mean``. The figures of one depth cannot
        tell the two apart; another depth under that knee can (not under ``MIN_AGAIN``: at a call or two a probe
        against a slow server takes seconds). A probe that measures again stands.
        """
        if not self._samples or self._drops or not self.baseline_s or probe.mean <= self.baseline_s / FASTER \
                or self._again_knee:
            return 0.0
        return self.limit * self.baseline_s / probe.mean

    def _limit_for_last_window(self, *, changed: bool) -> int:
        """The limit the last live window calls for, seen with the new baseline (the restore if none).

        ``changed``: the probe found the server's speed changed; then the knee is also at least what it
        kept busy in the windows that called for the probe (before a cut took the limit under it). When
        it did not change, those windows were over the budget by jitter, and their noise would only
        push the limit past the knee.
        """
        used, mean = self._previous
        rates, self._rates = (self._rates if changed else []), []
        if not mean:
            return self._restore
        # busy slots: throughput x no-load time, the most the server kept busy since the signs of a change
        self.knee = max(1.0, used * self.baseline_s / mean, max(rates, default=0.0) * self.baseline_s)
        if self._again_knee and not changed:  # the server is not slower: its first probe's calls queued at the knee
            self.knee = max(1.0, min(self.knee, self._again_knee))
        self.knee_mean = self.knee
        self.queue = max(0.0, used - self.knee)
        lo, hi = self.band()
        return round(self.knee + (lo + hi) / 2.0)

    def _new_window(self, now: float) -> None:
        self._window_start = now
        self._samples = []
        self._drops = 0
        self._area = 0.0
        self._changed_at = now

    @property
    def probing(self) -> bool:
        return self._probing

    def figures(self) -> LimitFigures:
        wall = self._last - self._started
        return LimitFigures(limit=self.limit, baseline_s=self.baseline_s, queue_estimate=round(self.queue, 3),
                            budget_infeasible=self.infeasible, probes=self.probes,
                            mean_limit=round(self._limit_area / wall, 3) if wall > 0 else float(self.limit),
                            min_limit=self.min_limit, max_limit=self.max_limit)
