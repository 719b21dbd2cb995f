"""Checks a launch makes before its first stage runs, so a bad setting fails in seconds.

A stage's config may define `preflight(self)`: it checks the files and names the stage will read
(they exist and parse), using the helpers here, each raising `PreflightError` naming the config
field. The pipeline calls it for every stage that will run in the launch (not for finished ones,
whose inputs may have moved since) after `check_mesh`, and before it writes anything but the lock.

What is checked: the mesh against the devices present; models (presets, .gguf files, HF-format
folders with a readable config.json, cached hub names); constitutions; prompt sources; feedback
judges ("python:" judges are imported, "http(s)://" ones are not contacted: a server may start
later); PMP and helpfulness comparison files; multiple-choice eval files; PM folders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from experiments.typed import ConfigError

__all__ = [
    "PreflightError",
    "check_mesh",
    "check_model",
    "check_constitution",
    "check_prompts",
    "check_judge",
    "check_comparisons",
    "check_pmp_source",
    "check_mc_file",
    "check_exported_folder",
]


class PreflightError(ConfigError):
    """A config field naming an input that is missing or does not parse; the message names the field."""


def _fail(field: str, value: Any, problem: Any) -> PreflightError:
    named = str(value) in str(problem)  # the loaders' messages usually name the file already
    return PreflightError(f"config field {field}{'' if named else f'={value!r}'}: {problem}")


def check_mesh(mesh: Any, n_devices: int) -> None:
    """The `mesh` section fits the devices present (`cai_jax.sharding.mesh_shape`)."""
    from cai_jax.sharding import mesh_shape

    try:
        mesh_shape(mesh, n_devices)
    except ValueError as e:
        raise PreflightError(f"config section mesh: {e} (set --config.mesh.data/fsdp/tensor)") from None


def check_model(field: str, name: str) -> None:
    """A model name the loaders resolve, without loading or converting its weights."""
    from cai_jax.models.loading import PRESETS, resolve_preset

    path = Path(name).expanduser()
    try:
        if name in PRESETS:
            resolve_preset(name)
        elif path.is_dir():
            config = path / "config.json"
            if not config.is_file():
                raise FileNotFoundError(f"{path} has no config.json (expected an HF-format folder)")
            json.loads(config.read_text())
        elif path.is_file():
            if path.suffix != ".gguf":
                raise ValueError(f"{path} is neither an HF-format folder nor a .gguf file")
        else:
            from cai_jax.models.loading import resolve_model_path

            resolve_model_path(name)  # a hub name from the local cache, or its error
    except (OSError, ValueError) as e:
        raise _fail(field, name, e) from None


def check_constitution(field: str, name: str, *, helpful: bool = False) -> None:
    from experiments.context import load_constitution_file

    try:
        load_constitution_file(name, helpful=helpful)
    except (OSError, ValueError) as e:
        raise _fail(field, name, e) from None


def check_prompts(field: str, source: str) -> None:
    from cai_jax.cai.prompts import load_prompts, shipped_prompts

    try:
        prompts = shipped_prompts(source.split(":", 1)[1]) if source.startswith("shipped:") else load_prompts(source)
    except (OSError, ValueError) as e:
        raise _fail(field, source, e) from None
    if not prompts:
        raise _fail(field, source, "no prompts")


def check_judge(field: str, name: str) -> None:
    """A feedback model: "" (the starting model, checked as `model.name`), python:, http(s):// or a model."""
    from cai_jax.cai.judge import PYTHON_PREFIX, load_callable
    from cai_jax.cai.judge_http import HTTP_PREFIXES

    if not name or name.startswith(HTTP_PREFIXES):
        return
    if name.startswith(PYTHON_PREFIX):
        try:
            load_callable(name)
        except (ImportError, AttributeError, ValueError, TypeError) as e:
            raise _fail(field, name, e) from None
        return
    check_model(field, name)


def check_comparisons(field: str, source: str) -> None:
    from cai_jax.train.pm_data import load_comparisons

    try:
        load_comparisons(source)
    except (OSError, ValueError) as e:
        raise _fail(field, source, e) from None


def check_pmp_source(field: str, source: str) -> None:
    from cai_jax.cai.pmp import load_pmp_questions

    try:
        load_pmp_questions(source, max_questions=1000)
    except (OSError, ValueError) as e:
        raise _fail(field, source, e) from None


def check_mc_file(field: str, path: str) -> None:
    from cai_jax.eval.mc import load_mc_eval

    try:
        load_mc_eval(path)
    except (OSError, ValueError) as e:
        raise _fail(field, path, e) from None


def check_exported_folder(field: str, folder: str) -> None:
    """A folder a stage exported (e.g. another run's pm/export): an HF-format folder."""
    check_model(field, folder)
