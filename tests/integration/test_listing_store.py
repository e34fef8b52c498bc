"""Store.list_pages against a real SeaweedFS bucket, checked against minio's own list_objects on the same keys."""

from __future__ import annotations

from imgworker.outcomes import ImageRef
from imgworker.store import Store

ODD = ["a b.jpg", "plus+sign.jpg", "pct%20x.jpg", "amp&lt<gt>.jpg", "ünïcødé-東京.jpg", "quote\"apos'.jpg",
       "tab\there.jpg", "~tilde=eq;semi,comma.jpg", "#hash?q.jpg", "sub/dir/x.jpg", "dir-marker/"]


def minio_listing(store: Store, prefix: str, start_after: str = "") -> list[ImageRef]:
    objects = store._client.list_objects(store.bucket, prefix=prefix, recursive=True, start_after=start_after or None)
    return [ImageRef(key=o.object_name or "", size=int(o.size or 0),
                     mtime=o.last_modified.timestamp() if o.last_modified else 0.0, etag=(o.etag or "").replace('"', ""))
            for o in objects if not o.is_dir]


def ours(store: Store, prefix: str, start_after: str = "", *, page_size: int = 1000, max_keys: int = 1000):
    return [ref for page in store.list_pages(prefix, page_size, start_after, max_keys=max_keys) for ref in page]


def test_odd_keys_over_many_pages_list_as_minio_lists_them(store: Store, prefix: str):
    frames = [f"{prefix}person/cam{i % 3}/2024010{i % 9 + 1}-120000.{i:03d}.jpg" for i in range(14)]
    keys = [prefix + k for k in ODD] + frames
    for n, key in enumerate(keys):
        store.put(key, b"x" * n)
    expected = minio_listing(store, prefix)
    assert sorted(r.key for r in expected) == sorted(k for k in keys if not k.endswith("/"))
    assert ours(store, prefix, max_keys=3) == expected  # 9 pages of 3, each continuing from the last
    assert ours(store, prefix, max_keys=1000) == expected
    assert ours(store, prefix, max_keys=3) == expected  # a second listing, from remembered pages
    pages = list(store.list_pages(prefix, 4, max_keys=3))
    assert [len(p) for p in pages] == [4] * 6  # 24 objects less the directory marker
    middle = expected[10].key
    assert ours(store, prefix, middle, max_keys=3) == minio_listing(store, prefix, middle)


def test_a_prefix_with_nothing_under_it_lists_nothing(store: Store, prefix: str):
    store.put(prefix + "elsewhere.jpg", b"x")
    assert list(store.list_pages(prefix + "nothing/", 1000, max_keys=3)) == []


def test_a_listing_after_a_change_sees_the_change_not_the_remembered_page(store: Store, prefix: str):
    for i in range(7):
        store.put(f"{prefix}k{i}.jpg", b"x")
    assert [r.key for r in ours(store, prefix, max_keys=3)] == [f"{prefix}k{i}.jpg" for i in range(7)]
    store.put(f"{prefix}k1.jpg", b"bigger")  # same key, new size and date
    store.delete([f"{prefix}k4.jpg"])
    store.put(f"{prefix}k9.jpg", b"x")
    after = ours(store, prefix, max_keys=3)
    assert after == minio_listing(store, prefix)
    assert [r.key for r in after] == [f"{prefix}k{i}.jpg" for i in (0, 1, 2, 3, 5, 6, 9)]
    assert after[1].size == len(b"bigger")
