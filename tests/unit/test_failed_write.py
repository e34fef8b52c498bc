"""An image whose result line could not be written is never stranded: the checkpoint still saves it.

A failed journal write ends the run (StateError). Whatever was ending the image (no healthy
endpoint, expiry, a full queue) must leave it queued, or in the backlog, so the next run gets it
back; counted at the far end: no line in the results file, and the next run's queue at start.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from imgworker.errors import StateError
from imgworker.memstore import MemoryAlgo, MemoryStore
from imgworker.outcomes import ImageRef, WorkItem
from imgworker.supervisor import Supervisor
from tests.support.driving import steps
from tests.support.memory import config, fill, supervisor
from tests.support.results import lines

pytestmark = pytest.mark.timeout(60)

OLD = "p/a/20240101-000000.000.jpg"  # its capture time is long past
YOUNG = "p/a/20991231-000000.000.jpg"  # queued after it, and not about to expire


def break_journal(sup: Supervisor) -> None:
    """Every later write of a result line fails with an OSError, as on a failing disk."""
    journal = sup.journal
    assert journal is not None and journal._fd is not None
    os.close(journal._fd)
    journal._fd = os.open(journal.path, os.O_RDONLY)  # os.write raises EBADF


def waits_out(sup: Supervisor) -> None:
    """The route has been down for longer than the image may wait."""
    state = sup.endpoints.states[sup.cfg.algo.endpoint]
    state.ejected_until, state.down_since = 1e18, 1000.0
    sup.dispatch._queues["p"][OLD].queued_at = 900.0
    sup._fail_waited_out(1065.0)


def would_expire(sup: Supervisor) -> None:
    """A cleaner elsewhere deletes images older than a minute: this one is doomed."""
    sup.expiry.drop_doomed()


def saved_for_next_run(cfg: Any, store: MemoryStore) -> set[str]:
    """What the next run has, right after its start, in its queue and its backlog."""
    nxt = supervisor(cfg, store, MemoryAlgo(store))
    nxt.start()
    try:
        return set(nxt.dispatch.pending_keys()) | nxt.intake.backlog.keys()
    finally:
        nxt.request_stop("test", force=True)
        nxt.shutdown()


@pytest.mark.parametrize("drop", [waits_out, would_expire], ids=["no_healthy_endpoint", "would_expire"])
def test_a_drop_whose_line_cannot_be_written_leaves_the_image_queued(tmp_path, drop: Callable[[Supervisor], None]):
    cfg = config(tmp_path, run={"until_idle": False}, retention={"external_max_age_s": 60.0},
                 algo={"no_endpoint_budget_s": 60.0, "eject_after_failures": 1, "retries": 0})
    store = MemoryStore()  # empty: a listing cannot find the image again, only the saved queue can
    sup = supervisor(cfg, store, MemoryAlgo(store))
    sup.start()
    try:
        for key in (OLD, YOUNG):
            sup.dispatch.append(WorkItem(ref=ImageRef(key=key, task_type="p", task_id="a")))
        break_journal(sup)
        with pytest.raises(StateError):
            drop(sup)
        assert sup.dispatch.pending_keys() == [OLD, YOUNG]  # still queued, in its place
    finally:
        sup.shutdown()  # what run() does after a failed step: stop, then checkpoint
    assert OLD not in lines(cfg)
    assert saved_for_next_run(cfg, store) == {OLD, YOUNG}, "the image got no line and was not saved either"


def test_a_full_queue_whose_drop_cannot_be_written_loses_neither_the_victim_nor_those_after_it(tmp_path):
    cfg = config(tmp_path, run={"until_idle": False}, worker={"count": 1},
                 dispatch={"queue_capacity": 1, "overflow": "drop_newest"})
    store = MemoryStore()
    keys = fill(store, ["p/a"], 3)
    sup = supervisor(cfg, store, MemoryAlgo(store))
    with sup.running(drain=False):
        break_journal(sup)
        with pytest.raises(StateError):
            steps(sup, 20)  # the first sweep finds all three; the second does not fit
    assert not lines(cfg)
    assert saved_for_next_run(cfg, store) == set(keys)
