"""One ListObjectsV2 answer page, parsed for what imgworker uses: key, size, ETag and last-modified.

minio's ``list_objects`` builds a full ``Object`` per key (a namespaced ``find`` per field, owner,
metadata, tags, a ``strptime`` per date): about 70 us per object, paid again for every object at
every listing in listing mode. ``parse_page`` reads the same XML in one ElementTree pass over the
page's children and parses dates with ``datetime.fromisoformat``: about a seventh of that. It reads
what minio reads, the same way: keys URL-decoded when the page says ``EncodingType`` url (with
``unquote_plus``, as minio does), quotes stripped from ETags, and the next page's token taken from
``NextContinuationToken``, else ``NextMarker``, else the last key of a truncated page.

A body that is not such a page raises ``MalformedListing`` (a ``ValueError``); ``store.translate``
classifies it as the store being unavailable, as it does minio's own parse errors.

Listing mode lists the whole prefix again every ``scan.interval_s``, and most pages of a bucket
that keeps its images come back byte for byte the same. ``AnswerMemo`` remembers the answers of
the latest listings by a digest of their bytes, so such a page costs its transfer and one hash,
not its parsing: the same bytes can only parse to the same objects.
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from datetime import datetime
from typing import NamedTuple
from urllib.parse import unquote_plus

from .outcomes import ImageRef

#: Answers an ``AnswerMemo`` keeps (of up to 1,000 objects each, about 250 bytes per object):
#: buckets of up to about this many thousand objects are listed again without parsing.
MEMO_PAGES = 100


class MalformedListing(ValueError):
    """The store's answer to a listing request is not a ListObjectsV2 page."""


class Listed(NamedTuple):
    """One object of a listing page."""

    key: str
    size: int
    etag: str
    mtime: float
    """Last-modified as UTC epoch seconds; 0.0 when the page gives none."""


class Page(NamedTuple):
    """One ListObjectsV2 page: its objects in key order, its common prefixes, and how to go on."""

    objects: list[Listed]
    prefixes: list[str]
    truncated: bool
    next_token: str | None
    """The continuation token of the next page; None when the page gives none and is not truncated."""


def parse_page(body: bytes) -> Page:
    """The objects, common prefixes and continuation of one ListObjectsV2 answer body."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise MalformedListing(f"not XML: {exc}") from None
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    if root.tag != ns + "ListBucketResult":
        raise MalformedListing(f"unexpected document <{root.tag[len(ns):]}>")
    fields: dict[str, str] = {}
    contents: list[ET.Element] = []
    prefixes: list[str] = []
    contents_tag, prefixes_tag = ns + "Contents", ns + "CommonPrefixes"
    for child in root:
        if child.tag == contents_tag:
            contents.append(child)
        elif child.tag == prefixes_tag:
            prefixes.append(_text(child, ns + "Prefix"))
        else:
            fields[child.tag[len(ns):]] = child.text or ""
    url = fields.get("EncodingType") == "url"
    objects = _objects(contents, ns, url=url)
    if url:
        prefixes = [unquote_plus(p) for p in prefixes]
    truncated = fields.get("IsTruncated", "").lower() == "true"
    return Page(objects, prefixes, truncated, _next_token(fields, objects, truncated=truncated, url=url))


def _objects(contents: list[ET.Element], ns: str, *, url: bool) -> list[Listed]:
    key_tag, size_tag, etag_tag, date_tag = ns + "Key", ns + "Size", ns + "ETag", ns + "LastModified"
    objects = []
    for element in contents:
        key = size = etag = date = None
        for field in element:
            tag = field.tag
            if tag == key_tag:
                key = field.text or ""
            elif tag == size_tag:
                size = field.text
            elif tag == etag_tag:
                etag = field.text
            elif tag == date_tag:
                date = field.text
        if key is None:
            raise MalformedListing("an object without <Key>")
        try:
            objects.append(Listed(
                unquote_plus(key) if url else key,
                int(size) if size is not None else 0,
                etag.replace('"', "") if etag else "",
                _epoch(date) if date is not None else 0.0,
            ))
        except ValueError as exc:
            raise MalformedListing(f"object {key!r}: {exc}") from None
    return objects


def _epoch(value: str) -> float:
    """``2024-01-31T12:00:00.123Z`` (or without fraction) as epoch seconds; S3 gives UTC with a ``Z``."""
    if not value.endswith("Z"):
        raise ValueError(f"last-modified {value!r} is not UTC")
    return datetime.fromisoformat(value).timestamp()


def _next_token(fields: dict[str, str], objects: list[Listed], *, truncated: bool, url: bool) -> str | None:
    """The continuation token the way minio's ``parse_list_objects`` picks it."""
    token = fields.get("NextContinuationToken")
    if token is None:
        token = fields.get("NextMarker")
        if token and url:
            token = unquote_plus(token)
    if token is None and truncated and objects:
        token = objects[-1].key
    if truncated and not token:
        raise MalformedListing("a truncated page without a way to the next one")
    return token


def _text(element: ET.Element, tag: str) -> str:
    found = element.find(tag)
    if found is None:
        raise MalformedListing(f"<{element.tag}> without <{tag}>")
    return found.text or ""


class Answer(NamedTuple):
    """One page as the store's listing yields it: its objects less directory markers, and how to go on."""

    refs: list[ImageRef]
    truncated: bool
    next_token: str | None


class AnswerMemo:
    """Parsed answers of the latest listings by a digest of their bytes: an unchanged page is not parsed again.

    ``begin`` starts a listing. When the memo is full, answers no listing used since the previous
    one began make room; failing that the new answer is not kept (a bucket larger than the memo
    keeps its first pages remembered rather than evicting each page just before it is asked again).
    """

    def __init__(self, capacity: int = MEMO_PAGES) -> None:
        self.capacity = capacity
        self._answers: dict[bytes, tuple[Answer, int]] = {}  # digest -> (answer, listing that last used it)
        self._listing = 0
        self.parsed = 0
        self.reused = 0

    def begin(self) -> None:
        """A listing starts."""
        self._listing += 1

    def read(self, body: bytes) -> Answer:
        """The answer in ``body``, parsed, or remembered from the same bytes; ``MalformedListing`` if it is none."""
        digest = hashlib.blake2b(body, digest_size=16).digest()
        known = self._answers.get(digest)
        if known is not None:
            self._answers[digest] = (known[0], self._listing)
            self.reused += 1
            return known[0]
        page = parse_page(body)
        answer = Answer([ImageRef(key=o.key, size=o.size, mtime=o.mtime, etag=o.etag) for o in page.objects
                         if not o.key.endswith("/")], page.truncated, page.next_token)
        self.parsed += 1
        self._keep(digest, answer)
        return answer

    def _keep(self, digest: bytes, answer: Answer) -> None:
        if len(self._answers) >= self.capacity:
            recent = self._listing - 1
            self._answers = {d: kept for d, kept in self._answers.items() if kept[1] >= recent}
        if len(self._answers) < self.capacity:
            self._answers[digest] = (answer, self._listing)
