"""Images put into the bucket under test."""

from __future__ import annotations

from imgworker.store import Store


def upload(store: Store, keys: list[str], data: bytes = b"\xff\xd8\xff\xe0fake-jpeg") -> None:
    for key in keys:
        store.put(key, data)
