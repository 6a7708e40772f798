"""The configuration reference, generated from the config dataclasses: every section's keys with
their type, default, lower bound and the help text each field carries (`typed_values.setting`).
`scripts/gen_docs.py` writes it as the docs page docs/reference/config.md (`make docs` runs
it); a test fails when the committed page differs from what the code generates.
"""

from __future__ import annotations

import dataclasses
import json
import types
from collections.abc import Iterator
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from silotune.config import MINIMUMS_ALL, section_types
from silotune.typed_values import help_of


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key as the reference shows it."""

    section: str
    name: str
    type: str
    default: str
    bound: str
    help: str


def sections() -> Iterator[tuple[str, type[Any]]]:
    """(TOML table name, its dataclass) for every section of a Config, in the Config's order."""
    yield from section_types().items()


def keys() -> Iterator[Key]:
    """Every key of every section."""
    for section, cls in sections():
        hints = get_type_hints(cls)
        for field in dataclasses.fields(cls):
            bound = MINIMUMS_ALL.get((section, field.name))
            yield Key(
                section=section,
                name=field.name,
                type=type_name(hints[field.name]),
                default=toml_value(field.default),
                bound="" if bound is None else f"{'≥' if bound[1] else '>'} {bound[0]:g}",
                help=help_of(field),
            )


def type_name(hint: Any) -> str:
    """A type annotation as a user writes the value: `int`, `"a" | "b"`, `list of "a" | "b"`."""
    origin = get_origin(hint)
    if origin is Literal:
        return " \\| ".join(f"`{json.dumps(choice)}`" for choice in get_args(hint))
    if origin is tuple:
        return f"list of {type_name(get_args(hint)[0])}"
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in get_args(hint) if arg is not type(None))
    return {bool: "bool", int: "int", float: "float", str: "string"}.get(hint, str(hint))


def toml_value(value: Any) -> str:
    """A default as it would be written in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value)


def markdown() -> str:
    """The whole reference as one Markdown page."""
    lines = [
        "# Configuration reference",
        "",
        "Every key a config file (or `--set section.key=value`) can set, generated from the",
        "config dataclasses in `silotune.config*`: its type, its default, its lower bound where",
        "it has one, and what it does. Values are read as TOML; an unknown key, a wrong type or",
        "a value out of range stops the run before any work, naming the key.",
        "",
    ]
    by_section: dict[str, list[Key]] = {}
    for key in keys():
        by_section.setdefault(key.section, []).append(key)
    for section, cls in sections():
        lines += [f"## `[{section}]`", "", _docstring(cls), ""]
        lines += ["| key | type | default | what it does |", "|---|---|---|---|"]
        for key in by_section[section]:
            kind = key.type + (f", {key.bound}" if key.bound else "")
            help_text = key.help.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{key.name}` | {kind} | `{key.default}` | {help_text} |")
        lines.append("")
    return "\n".join(lines)


def _docstring(cls: type[Any]) -> str:
    return " ".join((cls.__doc__ or "").split())
