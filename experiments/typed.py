"""Config sections -> frozen dataclasses: the one place where config values are cast and checked.

A stage declares what it reads as frozen dataclasses whose fields are named like the config keys
they come from (a field marked `inline()` is a dataclass built from the keys of the same section,
e.g. a library config that shares the section with a stage's own keys); `take(cls, section, path)` builds one from a ConfigDict section, casting each
value by the field's annotation (int, float, bool, str, tuples, `X | None`, nested dataclasses,
mappings) and naming the field on error. Because a stage's config object holds exactly the keys
it took, its hash (`hash_of`) covers exactly what the stage reads, and `covered_paths` lists them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping
from typing import Any

__all__ = ["ConfigError", "take", "inline", "covered_paths", "hash_of", "plain"]


class ConfigError(ValueError):
    """A config field that cannot be used; the message names it."""


def _cast(value: Any, tp: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return plain(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        return _cast(value, rest[0], path)
    if dataclasses.is_dataclass(tp):
        return take(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config field {path!r} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config field {path!r} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config field {path!r} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config field {path!r} must be a string, got {value!r}")
    if origin is Mapping or tp is dict:
        if not isinstance(value, Mapping) and not hasattr(value, "to_dict"):
            raise ConfigError(f"config field {path!r} must be a section (mapping), got {value!r}")
        return plain(value)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field {path!r} must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_cast(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"unsupported field type {tp!r} for {path!r}")


def take(cls: type, section: Any, path: str) -> Any:
    """An instance of dataclass `cls` from the keys of `section` named like its fields.

    Args:
      cls: a frozen dataclass; its fields' annotations say how each value is cast.
      section: a ConfigDict section (or mapping).
      path: the section's dotted name, for errors ("sft", "pm.pmp").

    Raises:
      ConfigError: a missing key or a value of the wrong type, naming `path.key`.
    """
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.metadata.get("inline"):  # a dataclass built from the same section's keys
            values[f.name] = take(hints[f.name], section, path)
            continue
        try:
            raw = section[f.name]
        except (KeyError, AttributeError):
            raise ConfigError(f"config has no field {path}.{f.name!r}, which this stage reads") from None
        values[f.name] = _cast(raw, hints[f.name], f"{path}.{f.name}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config section {path!r}: {e}") from e


def inline() -> Any:
    """A dataclass field built from the same config section as its parent (see `take`)."""
    return dataclasses.field(metadata={"inline": True})


def plain(x: Any) -> Any:
    """JSON-able plain data of a config value (ConfigDicts, mappings, tuples, dataclasses)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {str(k): plain(v) for k, v in sorted(x.items())}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def covered_paths(obj: Any, prefix: str = "") -> set[str]:
    """Dotted paths of every leaf field of a (nested) dataclass: what its hash covers."""
    out: set[str] = set()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = prefix.rstrip(".") if f.metadata.get("inline") else f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out |= covered_paths(value, f"{name}." if name else "")
        elif isinstance(value, Mapping):
            out |= _mapping_paths(value, f"{name}." if name else "")
        else:
            out.add(name)
    return out


def _mapping_paths(m: Mapping, prefix: str) -> set[str]:
    out: set[str] = set()
    for k, v in m.items():
        path = f"{prefix}{k}"
        out |= _mapping_paths(v, path + ".") if isinstance(v, Mapping) else {path}
    return out


def hash_of(*parts: Any) -> str:
    """A 16-hex-digit sha256 of the canonical JSON of `parts` (dataclasses and configs alike)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(plain(part), sort_keys=True).encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:16]
