"""Config files: `configs/<name>.py[:arg]` -> ConfigDict, `--config.a.b=v` overrides, hashing.

A config file defines `get_config(arg=None) -> ml_collections.ConfigDict` and optionally
`sweep(arg=None) -> list[dict]`, each dict mapping dotted field names to values for one run (plus
an optional "name"). Overrides and sweep entries may only name fields the config already has, and
a value is cast to the field's type, so a typo or a wrong type is an error naming the field.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ml_collections

from experiments.typed import ConfigError, plain

__all__ = [
    "ConfigError",
    "apply_overrides",
    "parse_known_overrides",
    "load_config",
    "load_config_module",
    "parse_override",
    "select",
]


def load_config_module(spec: str):
    """Imports `path/to/config.py` (the part of `spec` before an optional ':arg')."""
    path, _, _ = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {spec!r}: no such file {file}")
    mod_spec = importlib.util.spec_from_file_location(f"_cai_config_{file.stem}", file)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # a syntax or import error inside the user's file
        raise ConfigError(f"--config {spec!r}: importing {file} failed: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config {spec!r}: {file} defines no get_config(arg=None)")
    return module


def load_config(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """`configs/demo.py[:arg]` -> its `get_config(arg)`, with `a.b=v` overrides applied."""
    _, _, arg = spec.partition(":")
    cfg = load_config_module(spec).get_config(arg or None)
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"--config {spec!r}: get_config returned {type(cfg).__name__}, not a ConfigDict")
    return resolve_auto(apply_overrides(cfg, [parse_override(o) for o in overrides]))


def resolve_auto(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`model.dtype = "auto"` replaced by the dtype this machine runs fast (`cai_jax.nn.precision`):
    resolved once, here, so the workdir's config.json and the stage hashes hold what ran."""
    if "model" in cfg and cfg.model.get("dtype") == "auto":
        from cai_jax.nn.precision import resolve_dtype

        cfg.model.dtype = resolve_dtype("auto")
    return cfg


def parse_known_overrides(parser, argv=None) -> tuple[Any, list[str]]:
    """`parser.parse_known_args(argv)` plus the `--config.a.b=v` overrides as "a.b=v" (for
    `load_config`); any other unknown argument is the parser's usage error."""
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--config."):
            parser.error(f"unrecognized argument {item!r} (overrides look like --config.sft.num_steps=10)")
        overrides.append(item[len("--config.") :])
    return args, overrides


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=v' (from `--config.a.b=v`) -> ("a.b", value); the value is a Python literal or a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected --config.<field>=<value>")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


def select(cfg: ml_collections.ConfigDict, dotted: str) -> tuple[ml_collections.ConfigDict, str]:
    """The ConfigDict holding the field `dotted` and the field's own name; a missing one is an error."""
    *parents, leaf = dotted.split(".")
    node, walked = cfg, []
    for name in parents:
        walked.append(name)
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            raise ConfigError(f"config has no field {'.'.join(walked)!r} (while setting {dotted!r})")
        node = node[name]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        have = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else "none"
        raise ConfigError(f"config has no field {dotted!r} (fields there: {have})")
    return node, leaf


def _cast(old: Any, value: Any, dotted: str) -> Any:
    if old is None or value is None or isinstance(old, ml_collections.ConfigDict):
        return value
    if isinstance(old, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif isinstance(old, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif isinstance(old, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(old, str):
        return value if isinstance(value, str) else str(value)
    elif isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(old)(value)
    elif type(old) is type(value):
        return value
    raise ConfigError(f"config field {dotted!r} is {type(old).__name__} ({old!r}); cannot set it to {value!r}")


def apply_overrides(cfg: ml_collections.ConfigDict, items: Iterable[tuple[str, Any]]) -> ml_collections.ConfigDict:
    """A copy of `cfg` with each (dotted field, value) set; unknown fields and bad types are errors."""
    cfg = ml_collections.ConfigDict(cfg.to_dict(), type_safe=False)
    for dotted, value in items:
        node, leaf = select(cfg, dotted)
        node[leaf] = _cast(node[leaf], value, dotted)
    return cfg


def to_json(cfg: Any) -> str:
    """Canonical JSON of a config or a part of it (sorted keys): what `config.json` holds."""
    return json.dumps(plain(cfg), sort_keys=True, indent=1)
