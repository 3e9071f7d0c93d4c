"""Typed config sections with validation: fields that carry their limits (`option`), and
dataclasses built from nested dicts (`build`) with a one-line `BoatrayError` that names the key
and what is allowed."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from typing import Any, Union

from boatray.errors import BoatrayError


def option(default: Any, *, choices: tuple | None = None, min: float | None = None,
         max: float | None = None, each_choices: tuple | None = None,
         above: float | None = None, folder_name: bool = False,
         words: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with validation metadata (`above`: an exclusive lower bound;
    `folder_name`: a plain folder name, no path; `words`: the strings allowed among numbers)."""
    meta = {"choices": choices, "min": min, "max": max, "each_choices": each_choices,
            "above": above, "folder_name": folder_name, "words": words}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set `raw[a][b][c] = value` for the key `a.b.c`, making sections as needed."""
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise BoatrayError(f"override {key}: {part!r} is not a section")
        node = child
    node[leaf] = value


def build(cls: type, raw: Any, prefix: str = "") -> Any:
    """An instance of the dataclass `cls` from a nested dict, every value checked."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BoatrayError(f"{prefix.rstrip('.') or 'config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise BoatrayError(
            f"unknown key '{prefix}{unknown[0]}' (allowed in "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)})")
    values = {}
    for name, value in raw.items():
        key = prefix + name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = build(hint, value, key + ".")
        elif typing.get_origin(hint) is dict:
            values[name] = _mapping(key, typing.get_args(hint)[1], value, fields[name].metadata)
        else:
            values[name] = _check(key, _coerce(key, hint, value), fields[name].metadata)
    return cls(**values)


def _mapping(key: str, hint: Any, raw: Any, meta: typing.Mapping) -> dict:
    """A mapping of names (each among `each_choices`, when given) to sections of type `hint`."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BoatrayError(f"{key} must be a mapping")
    allowed = meta.get("each_choices")
    for name in raw:
        if allowed is not None and name not in allowed:
            raise BoatrayError(f"{key} keys must be among {', '.join(allowed)}; got {name!r}")
    return {name: build(hint, value, f"{key}.{name}.") for name, value in raw.items()}


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin in (list, tuple):
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number",
            str: "a string"}.get(hint, str(hint))


def _coerce(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        for arg in sorted(args, key=lambda a: a is str):  # try str last: "1e-3" is a number
            try:
                return _coerce(key, arg, value)
            except BoatrayError:
                continue
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(key, a, v) for a, v in zip(args, value))
        raise BoatrayError(f"{key} must be a list of {len(args)} numbers, got {value!r}")
    elif origin is list:
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(key, args[0], v) for v in items]
    elif hint is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str and isinstance(value, str):
        return value
    raise BoatrayError(f"{key} must be {_type_name(hint)}, got {value!r}")


def _shown(choice: Any) -> str:
    """A choice as it is written in YAML."""
    return "null" if choice is None else str(choice).lower() if isinstance(choice, bool) else str(
        choice)


def _check(key: str, value: Any, meta: typing.Mapping) -> Any:
    choices, each = meta.get("choices"), meta.get("each_choices")
    if choices is not None and value not in choices:
        allowed = ", ".join(_shown(c) for c in choices)
        raise BoatrayError(f"{key} must be one of {allowed}; got {value!r}")
    for item in value if each is not None else ():
        if item not in each:
            raise BoatrayError(f"{key} entries must be among {', '.join(each)}; got {item!r}")
    words = meta.get("words")
    for item in (value if isinstance(value, list) else [value]) if words is not None else ():
        if isinstance(item, str) and item not in words:
            what = "entries must be numbers" if isinstance(value, list) else "must be a number"
            raise BoatrayError(f"{key} {what} or {', '.join(words)}; got {item!r}")
    if meta.get("folder_name") and (not value or value in (".", "..")
                                    or any(c in value for c in "/\\\0")):
        raise BoatrayError(f"{key} must be a plain folder name (no '/', not '.' or '..'), "
                           f"got {value!r}")
    low, high, above = meta.get("min"), meta.get("max"), meta.get("above")
    for number in (value if isinstance(value, (list, tuple)) else [value]):
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if not math.isfinite(number):
                raise BoatrayError(f"{key} must be a finite number, got {number}")
            if above is not None and number <= above:
                raise BoatrayError(f"{key} must be > {above}, got {number}")
            if low is not None and number < low:
                raise BoatrayError(f"{key} must be >= {low}, got {number}")
            if high is not None and number > high:
                raise BoatrayError(f"{key} must be <= {high}, got {number}")
    if isinstance(value, list) and not value:
        raise BoatrayError(f"{key} must not be empty")
    return value
