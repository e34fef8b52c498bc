"""Retention policies under one load: writes benchmarks/results/scenario.{json,md}.

    python -m benchmarks.scenario [--quick]
"""

from __future__ import annotations

import os
import sys

from imgworker.cli import main

from ._common import RESULTS

if __name__ == "__main__":
    os.makedirs(RESULTS, exist_ok=True)
    name = "scenario-quick" if "--quick" in sys.argv else "scenario"
    sys.exit(main(["--log-level", "WARNING", "scenario", *sys.argv[1:], "--json", os.path.join(RESULTS, f"{name}.json"),
                   "--markdown", os.path.join(RESULTS, f"{name}.md")]))
