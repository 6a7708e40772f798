"""Checking plain values (as parsed from TOML) against dataclass annotations and lower bounds.

Supports the annotations configs use: bool, int, float (ints accepted; NaN and infinities refused,
since NaN passes every range check), str, Literal[...] and tuple[X, ...] (from lists). Every
failure is a ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from silotune.errors import ConfigError

T = TypeVar("T")


def setting(default: T, help: str) -> T:
    """A config field with its default and its help text: one sentence or two on what it does,
    its units and what its special values (0, empty) mean. The configuration reference in the
    docs is generated from these (silotune.config_reference)."""
    return dataclasses.field(default=default, metadata={"help": help})


def help_of(field: dataclasses.Field[Any]) -> str:
    """The help text a config field carries ("" when it has none)."""
    return str(field.metadata.get("help", ""))


def build_section(
    section: str,
    cls: type[Any],
    values: dict[str, Any],
    minimums: dict[tuple[str, str], tuple[float, bool]],
) -> Any:
    """An instance of the dataclass `cls` from `values`, each checked and converted."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    reject_unknown(values, fields, where=f"[{section}]")
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        kwargs[key] = _coerce(f"{section}.{key}", hints[key], value)
        bound = minimums.get((section, key))
        if bound is not None:
            minimum, inclusive = bound
            if kwargs[key] < minimum or (not inclusive and kwargs[key] == minimum):
                relation = ">=" if inclusive else ">"
                raise ConfigError(f"{section}.{key} must be {relation} {minimum}, got {value!r}")
    return cls(**kwargs)


def reject_unknown(values: dict[str, Any], known: dict[str, Any], where: str) -> None:
    """Raise a ConfigError naming the first unknown key, with the closest known one."""
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {key!r} in {where}{hint} (known: {', '.join(known)})")


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Check `value` against the annotation `hint`; convert lists to tuples and ints to floats."""
    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(
                f"{key} must be one of {', '.join(map(repr, choices))}; got {value!r}"
            )
        return value
    if origin is tuple:
        item_hint = get_args(hint)[0]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", item_hint, v) for i, v in enumerate(value))
    if origin in (Union, types.UnionType):
        raise TypeError(f"unsupported annotation for {key}: {hint}")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        # An int too large for a float (a JSON config may hold one) counts as infinite.
        number = float(value) if abs(value) < 2**1023 else math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation for {key}: {hint}")
