"""The README's configuration reference and exit codes are the code's, and its TOML examples say they are examples."""

from __future__ import annotations

import difflib
import os

import msgspec
import pytest

from imgworker import reference
from imgworker.config import SECTIONS, Config
from tests.support import tomldoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")


def _readme() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("part", sorted(reference.PARTS))
def test_readme_generated_part_is_what_the_code_says(part):
    expected = reference.PARTS[part](ROOT)
    current = reference.current_parts(_readme())[part]
    assert current is not None, f"README.md lost the markers of its {part}: run {reference.REGENERATE}"
    diff = "\n".join(list(difflib.unified_diff(current.splitlines(), expected.splitlines(), "README.md",
                                                 "generated", lineterm=""))[:30])
    assert current == expected, (f"README.md's {part} is not what the code says: run {reference.REGENERATE} "
                                 f"(from the repository root) and commit README.md\n{diff}")


def test_every_key_of_every_section_is_in_the_reference():
    text = reference.config_reference()
    for section, cls in reference.tables():
        assert f"### `[{section}]`" in text
        for field in msgspec.structs.fields(cls):
            if not isinstance(field.type, type) or not issubclass(field.type, msgspec.Struct):
                assert f"| `{field.name}` |" in text.split(f"### `[{section}]`")[1].split("### ")[0]


def test_every_section_of_the_config_is_a_section_of_the_file():
    """The reference and the environment variables follow SECTIONS: a section missing there is missing in both."""
    sections = {f.name for f in msgspec.structs.fields(Config)} - {"credentials"}
    assert set(SECTIONS) == sections, f"imgworker/config.py: SECTIONS must name every section of Config: {sections}"


class _Half(msgspec.Struct, kw_only=True):
    """A section with one key described and one not."""

    said: int = 1
    """Described."""
    unsaid: int = 2


def test_a_key_without_a_docstring_stops_the_reference_naming_it():
    with pytest.raises(reference.Undocumented, match=r"config key half\.unsaid has no description: put a docstring "
                                                     r"line under it in imgworker/config.py .* python -m imgworker"):
        reference._section("half", _Half)


def test_values_in_readme_toml_blocks_are_defaults_or_marked_as_examples():
    """A value that is not the default must say so (``# example``), or a reader takes it for the default."""
    wrong = []
    for first, block in tomldoc.toml_blocks(_readme()):
        for lineno, section, line in tomldoc.key_lines(block):
            given, default = tomldoc.value_and_default(section, line)
            if given != default and "# example" not in line:
                wrong.append(f"line {first + lineno}: {line.strip()!r} (default {reference._toml(default)})")
    assert not wrong, "README.md shows values that are not the defaults without '# example':\n" + "\n".join(wrong)
