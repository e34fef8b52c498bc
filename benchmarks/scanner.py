"""Listing and filtering a large bucket: imgworker's scanner against the raw minio listing.

    python -m benchmarks.scanner [--objects 100000]
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from minio import Minio

from imgworker.scanner import select_images
from imgworker.store import Store

from ._common import embedded, write_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--objects", type=int, default=100000)
    parser.add_argument("--name", default="scanner")
    args = parser.parse_args(argv)
    with embedded() as cfg:
        store = Store(cfg.store, cfg.credentials, pool_size=32)
        keys = [f"scan/person/task-{i % 50:02d}/20240101-{i // 1000:06d}.{i % 1000:03d}.jpg" for i in range(args.objects)]
        keys += [f"scan/person/task-{i % 50:02d}/meta-{i}.json" for i in range(args.objects // 20)]
        t = time.perf_counter()
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda k: store.put(k, b"x"), keys))
        upload_s = time.perf_counter() - t
        raw = Minio(cfg.store.endpoint, access_key=cfg.credentials.access_key,
                    secret_key=cfg.credentials.secret_key, secure=False, region="us-east-1")
        t = time.perf_counter()
        raw_count = sum(1 for _ in raw.list_objects(cfg.store.bucket, prefix="scan/", recursive=True))
        raw_s = time.perf_counter() - t
        t = time.perf_counter()
        ours = sum(len(select_images(page, prefix="", cfg=cfg.scan)) for page in store.list_pages("scan/", 1000))
        ours_s = time.perf_counter() - t
    lines = ["| listing | objects | seconds | objects/s |", "|---|---|---|---|",
             f"| raw minio list_objects | {raw_count:,} | {raw_s:.2f} | {raw_count / raw_s:,.0f} |",
             f"| imgworker list_pages + select_images | {raw_count:,} listed, {ours:,} images | {ours_s:.2f} "
             f"| {raw_count / ours_s:,.0f} |",
             "", f"Ratio imgworker / raw: {ours_s / raw_s:.2f} (1.00 = no cost beyond the listing itself). "
             f"Upload of the {len(keys):,} objects took {upload_s:.0f} s."]
    text = "\n".join(lines)
    print(text)
    write_results(args.name, {"objects": raw_count, "images": ours, "raw_s": raw_s, "imgworker_s": ours_s,
                              "ratio": ours_s / raw_s}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
