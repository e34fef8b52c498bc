"""The README's generated parts: the configuration reference and the table of exit codes.

Both come from the code, so the README cannot drift from it. A configuration key is described by
the docstring line under it in ``config.py`` (its section by the class docstring), an exit code by
the docstring line under its member of ``errors.ExitCode``; defaults and allowed values come from
the types. A key or a code without a docstring stops the generation with a message naming it.
``tests/unit/test_reference.py`` fails when the README's copy differs from what this prints.

    python -m imgworker.reference                     print both parts
    python -m imgworker.reference --write README.md   rewrite them in README.md, between their markers
"""

from __future__ import annotations

import argparse
import ast
import configparser
import inspect
import json
import os
import re
import sys
import textwrap
import typing
from collections.abc import Callable
from typing import Any, Literal

import msgspec

from .config import SECTIONS
from .errors import ExitCode

#: The command that rewrites the README's generated parts; failure messages name it.
REGENERATE = "python -m imgworker.reference --write README.md"

#: The unit file whose restart policy the exit-code table states, relative to the README.
UNIT_FILE = os.path.join("contrib", "imgworker.service")


class Undocumented(ValueError):
    """A configuration key or an exit code has no docstring to describe it."""


def attribute_docs(cls: type) -> dict[str, str]:
    """Each attribute of ``cls`` that has a docstring line under it, with that docstring as one line."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef)).body
    docs = {}
    for node, after in zip(body, body[1:]):
        name = _assigned_name(node)
        if name and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                and isinstance(after.value.value, str):
            docs[name] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _assigned_name(node: ast.stmt) -> str | None:
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.target.id
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    return None


# ----- the configuration reference ---------------------------------------------------------------


def config_reference() -> str:
    """One table per section of the TOML file: key, default, allowed values, meaning."""
    return "\n".join(_section(name, cls) for name, cls in tables())


def tables() -> list[tuple[str, type[msgspec.Struct]]]:
    """Each table of the TOML file by its name, a sub-table (``scan.events``) after its section."""
    found: list[tuple[str, type[msgspec.Struct]]] = []
    for section, cls in SECTIONS.items():
        found.append((section, cls))
        found += [(f"{section}.{f.name}", f.type) for f in msgspec.structs.fields(cls) if _is_table(f.type)]
    return found


def _is_table(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, msgspec.Struct)


def _section(name: str, cls: type[msgspec.Struct]) -> str:
    docs = attribute_docs(cls)
    summary = _markdown((inspect.getdoc(cls) or "").split("\n\n")[0])
    env = "IMGWORKER_" + name.upper().replace(".", "_") + "_<KEY>"
    lines = [f"### `[{name}]`", "", f"{summary} Environment: `{env}`.", "",
             "| key | default | allowed | meaning |", "|---|---|---|---|"]
    for field in msgspec.structs.fields(cls):
        if _is_table(field.type):
            continue
        if field.name not in docs:
            raise Undocumented(f"config key {name}.{field.name} has no description: put a docstring line under it "
                               f"in imgworker/config.py (class {cls.__name__}), then run {REGENERATE}")
        lines.append(f"| `{field.name}` | `{_toml(_default(field))}` | {_cell(_allowed(field.type))} | "
                     f"{_cell(_markdown(docs[field.name]))} |")
    return "\n".join(lines) + "\n"


def _default(field: msgspec.structs.FieldInfo) -> Any:
    return field.default_factory() if field.default is msgspec.NODEFAULT else field.default


def _toml(value: Any) -> str:
    """A default as it would be written in the TOML file; None (a table left unset) as ``unset``."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _allowed(kind: Any) -> str:
    if typing.get_origin(kind) is Literal:  # in the order written, which msgspec does not keep
        return ", ".join(f"`{_toml(v)}`" for v in typing.get_args(kind))
    return _describe(msgspec.inspect.type_info(kind))


def _describe(info: msgspec.inspect.Type) -> str:
    describers: dict[type, Callable[[Any], str]] = {
        msgspec.inspect.BoolType: lambda t: "true, false",
        msgspec.inspect.StrType: lambda t: "string",
        msgspec.inspect.IntType: lambda t: _bounded("integer", t),
        msgspec.inspect.FloatType: lambda t: _bounded("number", t),
        msgspec.inspect.LiteralType: lambda t: ", ".join(f"`{_toml(v)}`" for v in t.values),
        msgspec.inspect.VarTupleType: lambda t: f"list of {_plural(_describe(t.item_type))}",
        msgspec.inspect.ListType: lambda t: f"list of {_plural(_describe(t.item_type))}",
        msgspec.inspect.DictType: lambda t: "table" if isinstance(t.value_type, msgspec.inspect.AnyType)
        else f"table of {_plural(_describe(t.value_type))}",
        msgspec.inspect.UnionType: lambda t: " or ".join(_describe(x) for x in t.types if
                                                          not isinstance(x, msgspec.inspect.NoneType)),
        msgspec.inspect.AnyType: lambda t: "any value",
    }
    describe = describers.get(type(info))
    if describe is None:
        raise Undocumented(f"the reference cannot describe the type {info!r}: teach imgworker/reference.py")
    return describe(info)


def _bounded(noun: str, t: Any) -> str:
    low = f"≥ {t.ge}" if t.ge is not None else f"> {t.gt}" if t.gt is not None else ""
    high = f"≤ {t.le}" if t.le is not None else f"< {t.lt}" if t.lt is not None else ""
    if t.ge is not None and t.le is not None:
        return f"{noun} {t.ge} to {t.le}"
    return " ".join(part for part in (noun, low, high) if part)


def _plural(text: str) -> str:
    return re.sub(r"^(integer|number|string|list|table)\b", r"\1s", text)


def _markdown(text: str) -> str:
    return text.replace("``", "`")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


# ----- the exit codes ------------------------------------------------------------------------------


def exit_code_table(unit_file: str) -> str:
    """Code, name, meaning, and whether the unit file in ``unit_file`` restarts the service after it."""
    docs = attribute_docs(ExitCode)
    restarts = _restarts(unit_file)
    lines = ["| code | name | meaning | restarted by the unit file |", "|---|---|---|---|"]
    for code in ExitCode:
        if code.name not in docs:
            raise Undocumented(f"exit code {int(code)} ({code.name}) has no description: put a docstring line under "
                               f"it in imgworker/errors.py (class ExitCode), then run {REGENERATE}")
        lines.append(f"| {int(code)} | `{code.name}` | {_cell(_markdown(docs[code.name]))} | "
                     f"{'yes' if restarts(int(code)) else 'no'} |")
    return "\n".join(lines) + "\n"


def _restarts(unit_file: str) -> Callable[[int], bool]:
    """Whether systemd restarts the unit after the main process exits with a code (``Restart=``, its exceptions)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    with open(unit_file, encoding="utf-8") as f:
        parser.read_string(f.read())
    service = parser["Service"]
    policy = service.get("Restart", "no")
    spared = {int(code) for code in service.get("RestartPreventExitStatus", "").split() if code.isdigit()}
    if policy == "always":
        return lambda code: code not in spared
    if policy == "on-failure":
        return lambda code: code != 0 and code not in spared
    return lambda code: False


# ----- the README ----------------------------------------------------------------------------------


#: Each generated part of the README by its marker name, made from the README's directory.
PARTS: dict[str, Callable[[str], str]] = {
    "config-reference": lambda readme_dir: config_reference(),
    "exit-codes": lambda readme_dir: exit_code_table(os.path.join(readme_dir, UNIT_FILE)),
}


def generated_parts(readme_dir: str) -> dict[str, str]:
    """Each generated part of the README, by its marker name."""
    return {name: make(readme_dir) for name, make in PARTS.items()}


def _markers(name: str) -> tuple[str, str]:
    return (f"<!-- generated: {name} ({REGENERATE}); edit the code, not this -->", f"<!-- end generated: {name} -->")


def current_parts(readme: str) -> dict[str, str | None]:
    """The README's copy of each generated part (None where its markers are missing)."""
    found: dict[str, str | None] = {}
    for name in PARTS:
        begin, end = _markers(name)
        match = re.search(re.escape(begin) + r"\n(.*?)" + re.escape(end), readme, re.S)
        found[name] = match.group(1) if match else None
    return found


def rewrite(readme: str, parts: dict[str, str]) -> str:
    """``readme`` with each generated part replaced between its markers."""
    for name, text in parts.items():
        begin, end = _markers(name)
        pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.S)
        if not pattern.search(readme):
            raise ValueError(f"the README has no markers for {name}: add the lines\n{begin}\n{end}")
        readme = pattern.sub(lambda _: f"{begin}\n{text}{end}", readme)
    return readme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgworker.reference", description=__doc__.split("\n")[0])
    parser.add_argument("--write", metavar="README", help="rewrite the generated parts of this file in place")
    args = parser.parse_args(argv)
    if not args.write:
        parts = generated_parts(os.getcwd())
        print("\n".join(parts.values()), end="")
        return 0
    with open(args.write, encoding="utf-8") as f:
        readme = f.read()
    new = rewrite(readme, generated_parts(os.path.dirname(os.path.abspath(args.write))))
    if new != readme:
        with open(args.write, "w", encoding="utf-8") as f:
            f.write(new)
    print(f"{args.write}: generated parts {'rewritten' if new != readme else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
