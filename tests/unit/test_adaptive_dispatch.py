"""The adaptive limit where items are dispatched, and what metrics and the report show of it (in-memory parts)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from prometheus_client.core import CollectorRegistry
from prometheus_client.exposition import generate_latest

from imgworker.errors import ConfigError
from imgworker.memstore import MemoryAlgo, MemoryStore
from imgworker.metrics import SupervisorCollector
from imgworker.pool import InlinePool
from imgworker.supervisor import Supervisor, memory_parts
from tests.support.memory import config, fill
from tests.support.results import lines

pytestmark = pytest.mark.timeout(60)


class FrozenClock:
    """The supervisor's clock, standing still: the controller's windows never close, its limit holds."""

    def __call__(self) -> float:
        return 100.0


def run_counting_batches(cfg: Any, store: MemoryStore, algo: MemoryAlgo) -> tuple[Supervisor, list[int]]:
    """Run to the end; how many calls the algorithm received together, step by step."""
    parts = memory_parts(cfg, store, algo)
    pool = parts.pool
    assert isinstance(pool, InlinePool)
    together: list[int] = []
    wait = pool.wait

    def counting_wait(timeout: float, extra: Any) -> Any:
        before = sum(algo.calls.values())
        out = wait(timeout, extra)
        together.append(sum(algo.calls.values()) - before)
        return out

    pool.wait = counting_wait  # type: ignore[method-assign]
    sup = Supervisor(cfg, show_progress=False, parts=parts, clock=FrozenClock())
    sup.run()
    return sup, together


@pytest.mark.parametrize("adaptive, most", [(False, 8), (True, 3)])
def test_adaptive_limit_bounds_the_calls_an_endpoint_gets_at_once(tmp_path, adaptive, most):
    cfg = config(tmp_path, worker={"count": 8}, algo={"adaptive": adaptive, "adaptive_min": 3})
    store = MemoryStore()
    keys = fill(store, ["p/a", "p/b"], 20)
    algo = MemoryAlgo(store, elapsed_ms=5.0)
    sup, together = run_counting_batches(cfg, store, algo)
    assert max(together) == most
    assert algo.calls == Counter(keys) and lines(cfg) == Counter(keys)


def scrape(sup: Supervisor) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SupervisorCollector(sup.snapshot))
    return generate_latest(registry).decode()


def test_limit_metrics_are_exported_with_adaptive_off_as_the_ceiling(tmp_path):
    cfg = config(tmp_path, worker={"count": 6})
    store = MemoryStore()
    fill(store, ["p/a"], 3)
    sup, _ = run_counting_batches(cfg, store, MemoryAlgo(store, elapsed_ms=5.0))
    text = scrape(sup)
    label = 'endpoint="http://127.0.0.1:8000/infer"'
    assert f"imgworker_algorithm_limit{{{label}}} 6.0" in text
    assert f"imgworker_algorithm_budget_infeasible{{{label}}} 0.0" in text
    for name in ("imgworker_algorithm_baseline_seconds", "imgworker_algorithm_queue_estimate",
                 "imgworker_algorithm_probes_total"):
        assert f"{name}{{{label}}} 0.0" in text
    assert sup.report().limits == {}  # the report speaks of limits only when they adapt


def test_limit_metrics_and_report_with_adaptive_on(tmp_path):
    cfg = config(tmp_path, worker={"count": 6}, algo={"adaptive": True, "adaptive_min": 2,
                                                      "latency_budget_ms": 250.0})
    store = MemoryStore()
    fill(store, ["p/a"], 30)
    sup, _ = run_counting_batches(cfg, store, MemoryAlgo(store, elapsed_ms=5.0))
    text = scrape(sup)
    label = 'endpoint="http://127.0.0.1:8000/infer"'
    assert f"imgworker_algorithm_limit{{{label}}} 2.0" in text
    assert f"imgworker_algorithm_baseline_seconds{{{label}}} 0.005" in text  # the first probe's 20 calls
    assert f"imgworker_algorithm_probes_total{{{label}}} 1.0" in text
    assert sup.report().limits == {"http://127.0.0.1:8000/infer": {"mean": 2.0, "min": 2, "max": 2, "now": 2}}


@pytest.mark.parametrize("algo, message", [
    ({"adaptive": True, "adaptive_min": 9}, "algo.adaptive_min: value 9 is not allowed (at most the ceiling 8"),
    ({"adaptive": True, "adaptive_min": 0}, "algo.adaptive_min: value 0 is not allowed"),
    ({"latency_budget_ms": 300}, "algo.latency_budget_ms: value 300.0 is not allowed without algo.adaptive"),
    ({"adaptive": True, "latency_budget_ms": 0}, "algo.latency_budget_ms: value 0 is not allowed"),
])
def test_adaptive_settings_are_checked_with_clear_errors(tmp_path, algo, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        config(tmp_path, worker={"count": 4, "threads": 2}, algo=algo)
