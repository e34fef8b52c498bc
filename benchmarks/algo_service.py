"""The reference algorithm service adds almost nothing of its own and holds many slow requests.

    python -m benchmarks.algo_service [--latency-ms 200] [--concurrent 400]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from imgworker.services.algo_server import AlgoService, SyntheticParams
from imgworker.store import Store

from ._common import embedded, write_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--concurrent", type=int, default=400)
    parser.add_argument("--slow-ms", type=float, default=2000.0)
    parser.add_argument("--name", default="algo_service")
    args = parser.parse_args(argv)
    with embedded(latency_ms=args.latency_ms) as cfg:
        store = Store(cfg.store, cfg.credentials)
        store.put("probe/a.jpg", b"x" * 2000)
        url = store.presign("probe/a.jpg", 600)
        body = {"image_url": url, "task_id": "", "task_type": "", "image_path": "probe/a.jpg"}
        session = requests.Session()
        times = []
        for _ in range(args.calls):
            t = time.perf_counter()
            session.post(cfg.algo.endpoint, json=body, timeout=10).raise_for_status()
            times.append((time.perf_counter() - t) * 1000)
        with AlgoService("synthetic", SyntheticParams(latency_ms=args.slow_ms, sigma=0.0)) as slow:
            def one(_: int) -> int:
                return requests.post(slow.endpoint, json=body, timeout=60).status_code

            t = time.perf_counter()
            with ThreadPoolExecutor(args.concurrent) as pool:
                codes = list(pool.map(one, range(args.concurrent)))
            wall = time.perf_counter() - t
    single = {"mean_ms": round(statistics.mean(times), 2), "p50_ms": round(statistics.median(times), 2),
              "max_ms": round(max(times), 2)}
    ok = sum(c == 200 for c in codes)
    lines = ["| measurement | result |", "|---|---|",
             f"| one client, {args.calls} sequential calls, fixed {args.latency_ms:g} ms | mean {single['mean_ms']:.1f} ms,"
             f" p50 {single['p50_ms']:.1f} ms, max {single['max_ms']:.1f} ms |",
             f"| {args.concurrent} concurrent calls, fixed {args.slow_ms:g} ms | {ok}/{args.concurrent} answered 200 "
             f"in {wall:.2f} s (ideal {args.slow_ms / 1000:.2f} s) |",
             "", "Each call includes the service fetching the image from the embedded store through its presigned URL."]
    text = "\n".join(lines)
    print(text)
    write_results(args.name, {"single_client": single, "concurrent": args.concurrent, "concurrent_ok": ok,
                              "concurrent_wall_s": wall}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
