"""The library's settings built from `configs/base.py`, the one home of every default.

Library dataclasses (`PPOConfig`, `FeedbackSettings`) hold no defaults of their own; tests build
them from the base config and override only what they are about.
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
