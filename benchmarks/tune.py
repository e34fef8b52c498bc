"""imgworker tune with its outputs in benchmarks/results/ (tune.json, tune.md, tune.png).

    python -m benchmarks.tune [imgworker tune flags]
"""

from __future__ import annotations

import os
import sys

from imgworker.cli import main

from ._common import RESULTS

if __name__ == "__main__":
    os.makedirs(RESULTS, exist_ok=True)
    sys.exit(main(["--log-level", "WARNING", "tune", *sys.argv[1:], "--json", os.path.join(RESULTS, "tune.json"),
                   "--markdown", os.path.join(RESULTS, "tune.md"), "--plot", os.path.join(RESULTS, "tune.png")]))
