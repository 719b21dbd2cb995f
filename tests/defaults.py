"""The library's settings built from `configs/base.py`, the one home of every default.

Library settings dataclasses (`PPOConfig`, `FeedbackSettings`, `OptimConfig`, `RevisionSettings`, ...)
hold no defaults of their own; tests build them from the base config and override only what they are
about.
"""

from __future__ import annotations

import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def base_config():
    from experiments.config_util import load_config

    return load_config(str(ROOT / "configs" / "base.py"))


def ppo_config(**overrides):
    """`PPOConfig` of configs/base.py's `ppo` section (as the ppo stage builds it), with `overrides`."""
    import dataclasses

    from experiments.stages import ppo

    return dataclasses.replace(ppo.Config.build(base_config()).ppo.settings, **overrides)


def feedback_settings(**overrides):
    """`FeedbackSettings` of configs/base.py's `feedback` section (as the feedback stage builds it),
    with `overrides` (settings fields)."""
    from experiments.stages import feedback

    return feedback.Config.build(base_config()).settings(**overrides)


def revision_settings(**overrides):
    """`RevisionSettings` of configs/base.py's `revisions` section (as the revisions stage builds it
    for the red-team prompts), with `overrides`."""
    import dataclasses

    from experiments.stages import revisions

    return dataclasses.replace(revisions.Config.build(base_config()).settings(), **overrides)


def checkpoint_config(directory, **overrides):
    """`CheckpointConfig` of configs/base.py's `checkpoint` section (as a stage builds it), saving in
    `directory`, with `overrides`."""
    import dataclasses

    from experiments.context import RunSettings

    spec = RunSettings.from_config(base_config()).checkpoint
    return dataclasses.replace(spec.config(directory), **overrides)


def optim_config(*, updates=None, **overrides):
    """`OptimConfig` of configs/base.py's `optim(lr)` sub-dict with `overrides` (OptimConfig fields;
    `lr` is required, as every stage sets its own), built as the stages build it (`from_config`).

    The base schedule is cosine with `total_steps=0`, i.e. derived: pass the schedule's length in
    optimizer updates as `updates`, or a positive `total_steps`.
    """
    from cai_jax.train.state import OptimConfig
    from configs.base import optim

    section = optim(overrides.pop("lr")).to_dict()
    return OptimConfig.from_config({**section, **overrides}, updates=updates)
