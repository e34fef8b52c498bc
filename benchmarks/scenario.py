"""Retention policies under one load: writes benchmarks/results/scenario.{json,md}.

    python benchmarks/scenario.py [--quick]
"""

from __future__ import annotations

import os
import sys

from imgworker.cli import main

if __name__ == "__main__":
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(here, exist_ok=True)
    name = "scenario-quick" if "--quick" in sys.argv else "scenario"
    sys.exit(main(["--log-level", "WARNING", "scenario", *sys.argv[1:], "--json", os.path.join(here, f"{name}.json"),
                   "--markdown", os.path.join(here, f"{name}.md")]))
