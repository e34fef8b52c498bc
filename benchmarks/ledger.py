"""The processed set behind its Manager: batched filter and insert rates at 10k, 100k and 1M
entries, and the Manager's memory.

    python -m benchmarks.ledger [--sizes 10000,100000,1000000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import sys
import time

import psutil

from imgworker.ledger import ManagerBackend

from ._common import write_results


def key(i: int) -> str:
    return f"video/person/task-{i % 64:03d}/20240101-{i // 1000:06d}.{i % 1000:03d}.jpg"


def measure(size: int, batch: int, rounds: int) -> dict[str, float]:
    backend = ManagerBackend()
    ledger = backend.start()
    try:
        for start in range(0, size, 10000):
            ledger.add_many([key(i) for i in range(start, min(size, start + 10000))])
        batches = [[key(i) for i in range(size - batch // 2 + r * batch, size + batch // 2 + r * batch)]
                   for r in range(rounds)]
        t = time.perf_counter()
        for b in batches:
            ledger.filter_new(b)
        filter_rate = rounds * batch / (time.perf_counter() - t)
        t = time.perf_counter()
        for b in batches:
            ledger.add_many(b)
        add_rate = rounds * batch / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(rounds):
            ledger.contains(key(0))
        single_rate = rounds / (time.perf_counter() - t)
        rss = psutil.Process(backend._manager._process.pid).memory_info().rss / 2**20  # type: ignore[attr-defined]
        return {"entries": size, "filter_keys_per_s": round(filter_rate), "add_keys_per_s": round(add_rate),
                "single_key_calls_per_s": round(single_rate), "manager_rss_mb": round(rss, 1)}
    finally:
        backend.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--name", default="ledger")
    args = parser.parse_args(argv)
    rows = [measure(int(s), args.batch, args.rounds) for s in args.sizes.split(",")]
    lines = ["| entries | filter keys/s (batched) | add keys/s (batched) | one key per call, calls/s | Manager RSS MB |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['entries']:,} | {r['filter_keys_per_s']:,} | {r['add_keys_per_s']:,} "
              f"| {r['single_key_calls_per_s']:,} | {r['manager_rss_mb']:.0f} |" for r in rows]
    lines += ["", f"Batches of {args.batch} keys, half of them already present. A round trip per key would cap the "
              "scanner at the single-key rate; batching per listing page is what keeps it off the hot path."]
    text = "\n".join(lines)
    print(text)
    write_results(args.name, {"batch": args.batch, "rows": rows}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
