"""What a run left at the far end, counted independently of imgworker's own figures: the lines of the
results file, and the calls the algorithm service received."""

from __future__ import annotations

from collections import Counter
from typing import Any

from imgworker.config import Config
from imgworker.results import read_results
from imgworker.services.algo_server import AlgoService

SUCCESS = ("inferred", "no_detection")


def read_outcomes(cfg: Config) -> dict[str, list[str]]:
    """key -> outcomes recorded for it in the results file."""
    out: dict[str, list[str]] = {}
    for result in read_results(cfg.results_path):
        out.setdefault(result.key, []).append(result.outcome.value)
    return out


def outcomes(cfg: Config) -> dict[str, str]:
    """key -> the last outcome recorded for it."""
    return {r.key: r.outcome.value for r in read_results(cfg.results_path)}


def lines(cfg: Config) -> Counter[str]:
    """key -> how many result lines it has (none before the results file exists)."""
    try:
        return Counter(r.key for r in read_results(cfg.results_path))
    except FileNotFoundError:
        return Counter()


def results_of(cfg: Config) -> list[Any]:
    return list(read_results(cfg.results_path))


def count_results(cfg: Config) -> int:
    try:
        return sum(1 for _ in read_results(cfg.results_path))
    except FileNotFoundError:
        return 0


def calls_under(service: AlgoService, prefix: str) -> dict[str, int]:
    """image_path -> POSTs the service received for it, for the images under ``prefix``."""
    return {k: v for k, v in service.calls().items() if k.startswith(prefix)}
