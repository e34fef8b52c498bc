"""Processes x lanes: ``imgworker tune`` over a grid, outputs in benchmarks/results/ (lanes.json, .md, .png).

    python -m benchmarks.lanes [imgworker tune flags, which replace the defaults below]

By default N = 8, 16, 32, 64 images in flight, each as N processes of 1 lane and N / 4, N / 8,
N / 16 processes of 4, 8, 16 lanes, against a synthetic service of 100 ms: short enough that this
machine's CPU sets a knee inside the grid, so both the recommendation and the initial ``--adaptive``
limit come from measured points.
"""

from __future__ import annotations

import os
import sys

from imgworker.cli import main

from ._common import RESULTS

DEFAULTS = {"--total": "8,16,32,64", "--lanes": "1,4,8,16", "--latency-ms": "100", "--images": "8000",
            "--max-windows": "5"}


def argv(extra: list[str]) -> list[str]:
    """The tune command line: the defaults, each replaced where ``extra`` gives the same flag."""
    given = {a for a in extra if a.startswith("--")}
    base = [x for flag, value in DEFAULTS.items() if flag not in given for x in (flag, value)]
    return ["--log-level", "WARNING", "tune", *base, *extra, "--json", os.path.join(RESULTS, "lanes.json"),
            "--markdown", os.path.join(RESULTS, "lanes.md"), "--plot", os.path.join(RESULTS, "lanes.png")]


def note_load(before: float) -> None:
    """Append the machine's load to lanes.md: shared cores move every throughput figure."""
    with open(os.path.join(RESULTS, "lanes.md"), "a", encoding="utf-8") as f:
        f.write(f"\nMachine: {os.cpu_count()} cores; 1-minute load average {before:.1f} at the start, "
                f"{os.getloadavg()[0]:.1f} at the end (other work shared the machine).\n")


if __name__ == "__main__":
    os.makedirs(RESULTS, exist_ok=True)
    load = os.getloadavg()[0]
    code = main(argv(sys.argv[1:]))
    if code == 0:
        note_load(load)
    sys.exit(code)
