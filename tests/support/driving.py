"""Driving an in-process supervisor from a test, with ``Supervisor.running`` and ``Supervisor.step_until``.

A condition not reached fails with what was awaited and how the run looked then, so a stuck test says
why; the limits (real seconds or steps) only turn a stuck run into a short failure.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from imgworker.config import Config
from imgworker.stats import Report
from imgworker.store import Store
from imgworker.supervisor import Supervisor
from tests.support.store import upload


def state(sup: Supervisor) -> str:
    """How the run looks: queue, lanes, backlog, outcomes so far."""
    counts = {o.value: n for o, n in sup.stats.counts.items() if n}
    return (f"pending {sup.pending}, in flight {sup.in_flight}, backlog {len(sup.intake.backlog)}, "
            f"draining {sup.draining}, outcomes {counts}")


def reach(sup: Supervisor, done: Callable[[], bool], what: str, timeout_s: float = 60.0, *,
          max_steps: int | None = None) -> None:
    """Step until ``done()``; fail naming ``what`` and the run's state if a limit comes first."""
    if not sup.step_until(done, timeout_s=timeout_s, max_steps=max_steps):
        within = f"{max_steps} steps or {timeout_s} s" if max_steps is not None else f"{timeout_s} s"
        raise AssertionError(f"not reached within {within}: {what}; {state(sup)}")


def steps(sup: Supervisor, n: int) -> None:
    """Exactly ``n`` steps, whatever happens in them (for tests of what a given number of steps does)."""
    sup.step_until(lambda: False, max_steps=n)


def step_for(sup: Supervisor, seconds: float) -> None:
    """Step for ``seconds`` of real time."""
    sup.step_until(lambda: False, timeout_s=seconds)


def drive(sup: Supervisor, timeout: float) -> Report:
    """Run an in-process supervisor to its end (until_idle), but never past ``timeout``; always shut down."""
    with sup.running():
        reach(sup, sup.finished, "the run's end", timeout_s=timeout)
    return sup.report()


def drive_after_warm_up(cfg: Config, store: Store, keys: list[str], timeout: float) -> Report:
    """Start the workers with nothing to hold and step 4 s, so item deadlines do not count their start-up;
    then upload ``keys`` and run to the end (never past ``timeout``); always shut down. The report."""
    uploaded = threading.Event()
    sup = Supervisor(cfg, show_progress=False, intake_done=uploaded.is_set)
    with sup.running():
        step_for(sup, 4.0)
        upload(store, keys)
        uploaded.set()
        reach(sup, sup.finished, "the run's end", timeout_s=timeout)
    return sup.report()
