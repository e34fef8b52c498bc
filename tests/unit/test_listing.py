"""The ListObjectsV2 page parser against recorded answers, minio's own parser, and bodies that are not pages.

The ``seaweed-*`` pages were recorded from SeaweedFS's S3 gateway listing odd keys with max-keys 4,
with ``encoding-type=url`` (as imgworker asks) and without; ``aws-pretty.xml`` is in the shape AWS
documents (indented, Owner, checksum, opaque token, a directory marker).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from minio.datatypes import parse_list_objects

from imgworker.config import Credentials, StoreConfig
from imgworker.errors import StoreUnavailable
from imgworker.listing import AnswerMemo, Listed, MalformedListing, parse_page
from imgworker.outcomes import ImageRef
from imgworker.store import Store
from tests.support.httpd import Handler, serving

DATA = Path(__file__).parent.parent / "data" / "listing"
PAGES = sorted(p.name for p in DATA.glob("*.xml"))

ODD_KEYS = ["odd/#hash?q.jpg", "odd/a b.jpg", "odd/amp&lt<gt>.jpg", "odd/pct%20x.jpg", "odd/plus+sign.jpg",
            "odd/quote\"apos'.jpg", "odd/sub/dir/x.jpg", "odd/tab\there.jpg", "odd/~tilde=eq;semi,comma.jpg",
            "odd/ünïcødé-東京.jpg"]
RECORDED_AT = 1795959519.0  # 2026-11-29T13:38:39Z, every object's LastModified in the seaweed pages


def body(name: str) -> bytes:
    return (DATA / name).read_bytes()


class _Answer:
    def __init__(self, data: bytes) -> None:
        self.data = data


def minio_view(data: bytes) -> tuple[list[Listed], bool, str | None]:
    """What minio's own parser makes of the same page, in the parser's terms."""
    objects, truncated, token, _ = parse_list_objects(_Answer(data))  # type: ignore[arg-type]
    listed = [Listed(o.object_name or "", int(o.size or 0), o.etag or "",
                     o.last_modified.timestamp() if o.last_modified else 0.0) for o in objects]
    return listed, truncated, token


@pytest.mark.parametrize("name", PAGES)
def test_each_recorded_page_parses_as_minio_parses_it(name):
    page = parse_page(body(name))
    assert (page.objects, page.truncated, page.next_token) == minio_view(body(name))


@pytest.mark.parametrize("encoding", ["url", "raw"])
def test_odd_keys_come_back_whole_across_pages_with_their_size_and_date(encoding):
    pages = [parse_page(body(f"seaweed-page-{encoding}-{n}.xml")) for n in range(3)]
    assert [o.key for p in pages for o in p.objects] == ODD_KEYS
    assert [o.size for p in pages for o in p.objects] == [len(k) for k in ODD_KEYS]  # each was put as len(key) bytes
    assert {o.mtime for p in pages for o in p.objects} == {RECORDED_AT}
    assert all(len(o.etag) == 32 and '"' not in o.etag for p in pages for o in p.objects)


def test_truncated_pages_carry_the_token_verbatim_and_the_last_page_none():
    first, second, last = (parse_page(body(f"seaweed-page-url-{n}.xml")) for n in range(3))
    assert (first.truncated, first.next_token) == (True, "odd/pct%20x.jpg")  # a token is never URL-decoded
    assert (second.truncated, second.next_token) == (True, "odd/tab\there.jpg")  # XML-unescaped (&#x9;)
    assert (last.truncated, last.next_token) == (False, None)


def test_an_empty_listing_is_an_empty_complete_page():
    page = parse_page(body("seaweed-empty.xml"))
    assert (page.objects, page.prefixes, page.truncated, page.next_token) == ([], [], False, None)


def test_aws_shaped_page_url_decoding_entities_fraction_and_opaque_token():
    page = parse_page(body("aws-pretty.xml"))
    assert [o.key for o in page.objects] == ["cam/person/t1/a b+c.jpg", "cam/person/t1/x&y<z>.jpg", "cam/person/t2/"]
    assert page.objects[0] == Listed("cam/person/t1/a b+c.jpg", 434234, "9b2cf535f27731c974343645a3985328",
                                     1706702400.123)
    assert page.objects[1].mtime == pytest.approx(1706702401.000456, abs=1e-6)
    assert page.objects[1].etag == "599bab3ed2c697f1d26842727561fd94-3"
    assert page.next_token == "1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM="


def test_dates_are_utc_whatever_the_local_zone(monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        page = parse_page(body("no-namespace-last.xml"))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert page.objects[0].mtime == 1709251199.999  # 2024-02-29T23:59:59.999Z
    assert page.objects[1] == Listed("no-date.jpg", 1, "", 0.0)  # no ETag, no date: as minio leaves them
    assert page.objects[0].key == 'a&b <c> "d" 中.jpg'


MALFORMED = {
    "cut short": body("seaweed-page-url-0.xml")[:700],
    "not XML": b"<html><body>502 Bad Gateway</body>",
    "an error document": b"<?xml version='1.0'?><Error><Code>SlowDown</Code></Error>",
    "an object without a key": b"<ListBucketResult><Contents><Size>1</Size></Contents></ListBucketResult>",
    "a size that is no number": b"<ListBucketResult><Contents><Key>a</Key><Size>x</Size></Contents></ListBucketResult>",
    "a date without a zone": (b"<ListBucketResult><Contents><Key>a</Key><LastModified>2024-01-01T00:00:00"
                              b"</LastModified></Contents></ListBucketResult>"),
    "truncated with no way on": b"<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>",
    "an undefined entity": b"<ListBucketResult><Contents><Key>a&nbsp;b</Key></Contents></ListBucketResult>",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_body_that_is_not_a_page_is_a_malformed_listing(case):
    with pytest.raises(MalformedListing):
        parse_page(MALFORMED[case])


# ----- the memo --------------------------------------------------------------------------------------


def test_the_same_bytes_are_parsed_once_and_changed_bytes_again():
    memo = AnswerMemo()
    memo.begin()
    first = memo.read(body("aws-pretty.xml"))
    memo.begin()
    again = memo.read(body("aws-pretty.xml"))
    assert again == first and (memo.parsed, memo.reused) == (1, 1)
    assert first.refs == [ImageRef("cam/person/t1/a b+c.jpg", size=434234, mtime=1706702400.123,
                                   etag="9b2cf535f27731c974343645a3985328"),
                          ImageRef("cam/person/t1/x&y<z>.jpg", size=0, mtime=first.refs[1].mtime,
                                   etag="599bab3ed2c697f1d26842727561fd94-3")]  # no marker; ETags unquoted
    changed = body("aws-pretty.xml").replace(b"<Size>434234</Size>", b"<Size>434235</Size>")  # same length
    assert memo.read(changed).refs[0].size == 434235
    assert memo.parsed == 2


def test_a_listing_larger_than_the_memo_keeps_its_first_pages_and_forgets_unused_ones():
    pages = [body(f"seaweed-page-raw-{n}.xml") for n in range(3)]
    memo = AnswerMemo(capacity=2)
    for _ in range(3):
        memo.begin()
        for page in pages:
            memo.read(page)
    assert (memo.parsed, memo.reused) == (3 + 1 + 1, 2 + 2)  # pages 0 and 1 kept; page 2 never
    memo.begin()
    memo.begin()  # two listings that used nothing: the kept pages make room for new ones
    memo.read(pages[2])
    memo.read(pages[2])
    assert memo.reused == 5


# ----- a malformed answer from a server, through the store ---------------------------------------------


class _Garbage(Handler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.answer(200, b"<ListBucketResult><Contents><Key>a</Key>", "application/xml")  # a proxy cut the answer


@pytest.fixture()
def garbage_server() -> Iterator[str]:
    with serving(_Garbage) as port:
        yield f"127.0.0.1:{port}"


def test_a_malformed_answer_is_the_store_being_unavailable_not_a_crash(garbage_server):
    store = Store(StoreConfig(endpoint=garbage_server, bucket="images", secure=False, region="us-east-1"),
                  Credentials(access_key="k", secret_key="s"))
    with pytest.raises(StoreUnavailable, match="malformed listing"):
        list(store.list_pages("cam/", 1000))


# ----- the filter the lister applies to every page ------------------------------------------------------

KEYS = ["cam/person/t1/20240101-120000.123.jpg", "cam/person/t1/A.JPEG", "cam/x.jpg", "cam/a/x.jpg",
        "cam/a/b/c/x.jpg", "cam//b/x.jpg", "cam/a//x.jpg", "cam/person/t1/meta.json", "cam/person/t1/preview_1.jpg",
        "cam/person/.t1/a.jpg", "cam/.person/t1/a.jpg", "cam/person/t1/.a.jpg", "cam/alerts/p/t/a.jpg",
        "cam/results/a.jpg", "cam/person/t1/", "cam/中文 类型/任务 1/a %+#.jpg", "cam/person/t1/a.b.c.png",
        "other/person/t1/a.jpg", "cam", "cam/", "cam/p/t/preview_/x.jpg", "cam/p/t/x.jpg.json"]


@pytest.mark.parametrize("prefix", ["cam/", "cam", ""])
def test_select_images_keeps_what_is_image_keeps_with_parse_task_fields(prefix):
    from imgworker.config import ScanConfig
    from imgworker.scanner import is_image, parse_task, select_images

    cfg = ScanConfig()
    page = [ImageRef(key, size=n, mtime=float(n)) for n, key in enumerate(KEYS)]
    expected = [ImageRef(r.key, *parse_task(r.key, prefix), size=r.size, mtime=r.mtime)
                for r in page if is_image(r.key, prefix=prefix, cfg=cfg)]
    assert select_images(page, prefix=prefix, cfg=cfg) == expected
    assert len(expected) >= 5


def test_a_truncated_page_without_a_token_goes_on_after_its_last_key():
    page = parse_page(b"<ListBucketResult><IsTruncated>true</IsTruncated><Contents><Key>a.jpg</Key></Contents>"
                      b"<Contents><Key>b.jpg</Key></Contents></ListBucketResult>")
    assert (page.truncated, page.next_token) == (True, "b.jpg")


class _SameToken(Handler):
    """Every answer is the same truncated page with the same token: a store that never moves on."""

    requests = 0

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).requests += 1
        self.answer(200, b"<ListBucketResult><IsTruncated>true</IsTruncated><NextContinuationToken>t"
                         b"</NextContinuationToken><Contents><Key>cam/a.jpg</Key></Contents></ListBucketResult>",
                    "application/xml")


@pytest.mark.timeout(30)
def test_a_store_that_repeats_its_continuation_token_is_unavailable_not_listed_forever():
    with serving(_SameToken) as port:
        store = Store(StoreConfig(endpoint=f"127.0.0.1:{port}", bucket="images", secure=False,
                                  region="us-east-1"), Credentials(access_key="k", secret_key="s"))
        pages = store.list_pages("cam/", 1)  # a page per object: a loop would yield, not hang
        with pytest.raises(StoreUnavailable, match="continuation token"):
            for _ in range(50):
                next(pages)
        assert _SameToken.requests == 2  # the first page, then the same token once more
