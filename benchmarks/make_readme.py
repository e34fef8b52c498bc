"""Rebuild benchmarks/README.md from the latest tables in benchmarks/results/.

    python -m benchmarks.make_readme
"""

from __future__ import annotations

import os

from ._common import RESULTS

HERE = os.path.dirname(os.path.abspath(__file__))

SECTIONS = [
    ("tune", "Workers against throughput: `imgworker tune`",
     "`python -m benchmarks.tune --latency-ms 200` (the same as `imgworker tune` with its outputs here). "
     "The real pipeline (supervisor, N workers, Manager, scanner process) against the embedded store, "
     "pre-filled, and the synthetic service with a fixed 200 ms latency, all on this one 2-core machine. "
     "Each N is measured after a warm-up, in windows of at least 50 expected completions, until three "
     "agree within 5 % (at most 8). Ideal = N / measured mean algorithm latency. Overhead = end to end "
     "(supervisor send to reply) minus the algorithm call; it includes the StatObject check unless said. "
     "CPU counts the supervisor, workers, scanner and Manager, not the store or the service.", "tune.png"),
    ("check_vs_waste", "The existence check against the inference it saves",
     "`python -m benchmarks.check_vs_waste`. Images are queued, a fraction is deleted just before "
     "dispatch, and the run is repeated with the check on and off.", "check_vs_waste.png"),
    ("scenario", "Retention policies under one load: `imgworker scenario`",
     "`python -m benchmarks.scenario` (`--quick` for the reduced run). `never seen` are images deleted "
     "before the scanner listed them; `fail/success` is the figure the original report used, "
     "`fail/attempted` divides by every image that reached the algorithm step or failed on the way; "
     "`peak objects` is the most objects left after a cleaning pass.", None),
    ("scenario-quick", "The same, reduced (`--quick`)", "", None),
    ("algo_service", "The reference algorithm service", "`python -m benchmarks.algo_service`.", None),
    ("dispatch", "Dispatch capacity", "`python -m benchmarks.dispatch`.", None),
    ("ledger", "The processed set behind its Manager", "`python -m benchmarks.ledger`.", None),
    ("scanner", "Listing and filtering a large bucket", "`python -m benchmarks.scanner`.", None),
]

INTRO = """# imgworker benchmarks

Every figure here was measured on the project's 2-core machine, with every process (store, service,
imgworker) on it. Machines are shared and noisy: compare ratios measured in one run, not absolute
numbers across runs. Each script writes `results/<name>.json` and `results/<name>.md`; plots are PNG.
Rebuild this page with `python -m benchmarks.make_readme`.
"""


def main() -> None:
    parts = [INTRO]
    for name, title, how, image in SECTIONS:
        path = os.path.join(RESULTS, f"{name}.md")
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            table = f.read().strip()
        parts.append(f"## {title}\n\n{how}\n\n{table}\n" if how else f"## {title}\n\n{table}\n")
        if image and os.path.exists(os.path.join(RESULTS, image)):
            parts.append(f"![{name}](results/{image})\n")
    with open(os.path.join(HERE, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(parts))


if __name__ == "__main__":
    main()
