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
    """`PPOConfig` of configs/base.py's `ppo` section, with `overrides`."""
    from cai_jax.train.ppo_steps import PPOConfig

    section = {k: v for k, v in base_config().ppo.items() if k not in ("num_iterations", "optim")}
    return PPOConfig.from_config({**section, **overrides})


def feedback_settings(**overrides):
    """`FeedbackSettings` of configs/base.py's `feedback` section, with `overrides` (settings fields)."""
    from cai_jax.cai.feedback_settings import FeedbackSettings

    cfg = base_config()
    overrides.setdefault("policy_rendering", cfg.sft.rendering)
    return FeedbackSettings.from_config(cfg.feedback, **overrides)
