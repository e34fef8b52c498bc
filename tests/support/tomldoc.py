"""Reading TOML shown to users (README blocks, the sample config) line by line, against the config's defaults."""

from __future__ import annotations

import re
import tomllib
from typing import Any

import msgspec

from imgworker import reference

_KEY = re.compile(r"\s*\w+\s*=")
_COMMENTED_KEY = re.compile(r"# ([a-z_]+ = .*)$")
_HEADER = re.compile(r"\s*\[([\w.]+)\]")


def key_lines(text: str, *, commented: bool = False) -> list[tuple[int, str, str]]:
    """(line number, section, ``key = value`` line) for each key set in ``text``.

    ``commented``: the commented-out keys (``# key = value``) instead, as they would read uncommented.
    """
    out = []
    section = ""
    for lineno, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            section = header.group(1)
            continue
        if commented:
            match = _COMMENTED_KEY.match(line)
            if match:
                out.append((lineno, section, match.group(1)))
        elif _KEY.match(line):
            out.append((lineno, section, line))
    return out


def toml_blocks(markdown: str) -> list[tuple[int, str]]:
    """(first line number, text) of each ```toml block of a Markdown text."""
    blocks, start, lines = [], 0, markdown.splitlines()
    for lineno, line in enumerate(lines, 1):
        if line.strip() == "```toml":
            start = lineno
        elif line.startswith("```") and start:
            blocks.append((start, "\n".join(lines[start:lineno - 1])))
            start = 0
    return blocks


def value_and_default(section: str, line: str) -> tuple[Any, Any]:
    """The value ``line`` sets in ``[section]`` as the config reads it, and that key's default.

    Raises KeyError for an unknown section, msgspec.ValidationError for an unknown key or a bad value.
    """
    (key, value), = tomllib.loads(line).items()
    cls = dict(reference.tables())[section]
    return getattr(msgspec.convert({key: value}, cls, strict=False), key), getattr(cls(), key)
