"""One set of defaults: the library's settings dataclasses hold none that can disagree with
`configs/base.py`. Each mirrors a config section; the stages build it from that section, and tests
build it from the base config (tests/defaults.py)."""

from __future__ import annotations

import dataclasses

import pytest

from cai_jax.cai.feedback_settings import FeedbackSettings
from cai_jax.cai.revisions import RevisionSettings
from cai_jax.checkpoints.train_state import CheckpointConfig
from cai_jax.sharding import MeshConfig
from cai_jax.train.dpo_steps import DPOConfig
from cai_jax.train.ppo_steps import PPOConfig
from cai_jax.train.rloo_steps import RLOOConfig
from cai_jax.train.state import OptimConfig
from tests.defaults import base_config

# Each settings class, the base section it mirrors, and the fields that no config sets (those may
# keep a default of their own, as long as the section does not name them).
SETTINGS = {
    PPOConfig: ("ppo", ()),
    RLOOConfig: ("rloo", ()),
    DPOConfig: ("dpo", ()),  # its loss is rl.algorithm (dpo | ipo)
    FeedbackSettings: ("feedback", ()),
    OptimConfig: ("sft.optim", ()),
    RevisionSettings: ("revisions", ()),
    MeshConfig: ("mesh", ()),
    CheckpointConfig: ("checkpoint", ()),
}


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda cls: cls.__name__)
def test_settings_fields_have_no_default(cls):
    section, unset = SETTINGS[cls]
    for f in dataclasses.fields(cls):
        if f.name in unset:
            continue
        assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, (
            f"{cls.__name__}.{f.name} has a default of its own; configs/base.py's `{section}` is its home"
        )
    node = base_config()
    for key in section.split("."):
        node = node[key]
    assert not set(unset) & set(node), f"configs/base.py's `{section}` sets {set(unset) & set(node)}: drop the default"
