"""What one listed object costs the lister: minio's parser, imgworker's, and a page remembered unchanged.

    python -m benchmarks.listing [--objects 1000] [--repeat 30]

CPU time (``time.process_time``) per object over a page of ``--objects`` objects in the shape
SeaweedFS's S3 gateway answers ListObjectsV2 with ``encoding-type=url`` (as recorded in
``tests/data/listing/``), keys laid out as ``<prefix>/<task_type>/<task_id>/<frame>.jpg``; no server,
so no transfer: only what the lister's process does with the bytes.

- ``minio``: ``minio.datatypes.parse_list_objects`` and the ImageRefs ``Store.list_pages`` made of
  its objects before imgworker parsed pages itself;
- ``parse_page``: ``imgworker.listing.parse_page`` and its ImageRefs, what a new or changed page costs;
- ``memo hit``: ``AnswerMemo.read`` of bytes it has seen (a digest and a look-up);
- ``select_images``: the filter the lister applies to every page, in either case.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from minio.datatypes import parse_list_objects

from imgworker.config import ScanConfig
from imgworker.listing import AnswerMemo, parse_page
from imgworker.outcomes import ImageRef
from imgworker.scanner import select_images

from ._common import write_results

PREFIX = "imgworker-lanes-listing-n32/"


def page_body(objects: int) -> bytes:
    """One truncated page of ``objects`` objects, as SeaweedFS writes it."""
    parts = ['<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="http://s3.amazonaws.com/doc/'
             f'2006-03-01/"><Name>bench</Name><Prefix>{PREFIX}</Prefix><MaxKeys>{objects}</MaxKeys>'
             '<IsTruncated>true</IsTruncated>']
    for i in range(objects):
        key = f"{PREFIX}person/cam{i % 8}/20261129-13{i // 60 % 60:02d}{i % 60:02d}.{i % 1000:03d}.jpg"
        parts.append(f"<Contents><Key>{key}</Key><ETag>&#34;de59bd9061c93855e3fdd416e26f27a{i % 10}&#34;</ETag>"
                     f"<Size>{40000 + i}</Size><StorageClass>STANDARD</StorageClass>"
                     f"<LastModified>2026-11-29T13:38:{i % 60:02d}Z</LastModified></Contents>")
    parts.append(f"<NextContinuationToken>{key}</NextContinuationToken><EncodingType>url</EncodingType>"
                 f"<KeyCount>{objects}</KeyCount></ListBucketResult>")
    return "".join(parts).encode()


class _Response:
    def __init__(self, data: bytes) -> None:
        self.data = data


def with_minio(body: bytes) -> list[ImageRef]:
    objects, _, _, _ = parse_list_objects(_Response(body))  # type: ignore[arg-type]
    return [ImageRef(key=o.object_name or "", size=int(o.size or 0),
                     mtime=o.last_modified.timestamp() if o.last_modified else 0.0) for o in objects if not o.is_dir]


def with_parse_page(body: bytes) -> list[ImageRef]:
    objects = parse_page(body).objects
    return [ImageRef(key=o.key, size=o.size, mtime=o.mtime) for o in objects if not o.key.endswith("/")]


def us_per_object(run: Callable[[], object], objects: int, repeat: int) -> float:
    run()
    start = time.process_time()
    for _ in range(repeat):
        run()
    return (time.process_time() - start) / repeat / objects * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--name", default="listing")
    args = parser.parse_args(argv)
    body = page_body(args.objects)
    refs = with_minio(body)
    if with_parse_page(body) != refs:
        raise RuntimeError("parse_page and minio disagree on the benchmark page")
    memo = AnswerMemo()
    memo.read(body)
    cfg = ScanConfig()
    rows = {
        "minio": us_per_object(lambda: with_minio(body), args.objects, max(1, args.repeat // 5)),
        "parse_page": us_per_object(lambda: with_parse_page(body), args.objects, args.repeat),
        "memo hit": us_per_object(lambda: memo.read(body), args.objects, args.repeat),
        "select_images": us_per_object(lambda: select_images(refs, prefix=PREFIX, cfg=cfg), args.objects, args.repeat),
    }
    lines = ["| step | CPU us per object |", "|---|---|"] + [f"| {name} | {us:.2f} |" for name, us in rows.items()]
    lines += ["", f"One page of {args.objects:,} objects ({len(body):,} bytes) in SeaweedFS's shape, no transfer; "
              f"parse_page is {rows['minio'] / rows['parse_page']:.1f}x cheaper than minio's parser, a remembered "
              f"page {rows['minio'] / rows['memo hit']:.0f}x."]
    text = "\n".join(lines)
    print(text)
    write_results(args.name, {"objects": args.objects, "bytes": len(body), "us_per_object": rows}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
