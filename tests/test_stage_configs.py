"""Stages as typed units: each receives only its frozen config, and its hash covers every field it reads.

A stage's `run(ctx, cfg)` gets its config object and a `StageContext` (folders, run settings, the
model cache); neither holds the ConfigDict, so every config read of a stage happens in its
`Config.build(cfg)`. These tests build every stage's config of every shipped config and sweep run
from a config that records each field read, and check that each read is a field of the object the
stage is hashed by; and that a changed field reruns exactly the stages that read it.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import ml_collections
import pytest

from experiments.config_util import apply_overrides, load_config, load_config_module
from experiments.context import StageContext
from experiments.pipeline import stage_hashes
from experiments.run_folder import ORDER
from experiments.stages import REGISTRY
from experiments.sweep import expand
from experiments.typed import covered_paths

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.py") if not p.name.startswith("_"))


class Recorder:
    """A read-only view of a ConfigDict that records the dotted path of every leaf read."""

    def __init__(self, node: ml_collections.ConfigDict, reads: set, prefix: str = ""):
        self._node, self._reads, self._prefix = node, reads, prefix

    def _get(self, key: str):
        value = self._node[key]
        path = f"{self._prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            return Recorder(value, self._reads, path + ".")
        self._reads.add(path)
        return value

    __getitem__ = _get

    def __getattr__(self, key: str):
        if key.startswith("_"):
            raise AttributeError(key)
        return self._get(key)

    def keys(self):
        return self._node.keys()

    def __contains__(self, key) -> bool:
        return key in self._node

    def to_dict(self):
        return {k: (v.to_dict() if isinstance(v := self._get(k), Recorder) else v) for k in self._node.keys()}


def _runs():
    for path in CONFIGS:
        module = load_config_module(str(path))
        specs = [f"{path}:{a}" for a in ("demo", "base", "tiny")] if hasattr(module, "sweep") else [str(path)]
        for spec in specs:
            yield spec, load_config(spec)
            for name, cfg, _ in expand(spec) if hasattr(module, "sweep") else ():
                yield f"{spec} {name}", cfg


def test_every_field_a_stage_reads_is_covered_by_its_hash():
    checked = 0
    for name, cfg in _runs():
        for stage in REGISTRY:
            reads: set[str] = set()
            config = stage.Config.build(Recorder(cfg, reads))
            covered = covered_paths(config)
            assert reads, (name, stage.name)
            assert reads <= covered, (name, stage.name, sorted(reads - covered))
            checked += 1
    assert checked > 100


def test_stages_receive_no_config_dict():
    fields = {f.name for f in dataclasses.fields(StageContext)}
    assert fields == {"workdir", "name", "run", "cache", "deps"}  # no ConfigDict anywhere
    for stage in REGISTRY:
        assert list(inspect.signature(stage.run).parameters) == ["ctx", "cfg"], stage.name
        assert dataclasses.is_dataclass(stage.Config) and stage.Config.__dataclass_params__.frozen, stage.name
    assert tuple(s.name for s in REGISTRY) == ORDER  # the explorer's display order is the pipeline's


@pytest.mark.parametrize(
    "override, reruns",
    [
        # The judge: feedback labels, and every Elo comparison and MC eval of the eval stage.
        (("feedback_model.name", "python:tests.judges:prefers_property"), {"feedback", "eval"}),
        (("eval.calibration_bins", 5), {"pm", "eval"}),  # the PM's reliability bins too
        (("sft.rendering", "transcript"), {"sft", "feedback", "ppo", "eval"}),  # how every policy prompt reads
        (("eval.elo_snapshots", (0, 1)), {"ppo", "eval"}),  # which PPO policies are exported
        (("feedback.num_prompts", 3), {"feedback", "eval"}),
        (("mesh.data", 2), set()),
        (("rl.algorithm", "rloo"), {"ppo"}),  # the RL objective: only the stage that trains with it
        (("model.lora.rank", 4), {"sft", "ppo"}),  # LoRA: only the stages that fine-tune the policy
    ],
)
def test_a_changed_field_changes_the_hash_of_exactly_the_stages_that_read_it(override, reruns):
    cfg = load_config("configs/tiny.py")
    before = stage_hashes(cfg, REGISTRY)
    after = stage_hashes(apply_overrides(cfg, [override]), REGISTRY)
    # Downstream stages change with their inputs' hashes; `reruns` are the ones that read the field.
    changed = {s for s in before if before[s] != after[s]}
    downstream = {s.name for s in REGISTRY if set(s.deps + s.optional) & changed} | changed
    assert reruns <= changed
    direct = {s.name for s in REGISTRY if dataclasses.asdict(s.Config.build(cfg)) != dataclasses.asdict(
        s.Config.build(apply_overrides(cfg, [override])))}  # fmt: skip
    assert direct - {"report"} == reruns
    assert ("report" in direct) == bool(reruns)  # the report shows the whole config: it reads every hashed field
    assert changed <= downstream | {"report"}


def test_only_the_chosen_objectives_section_is_in_the_rl_stages_hash():
    """The ppo stage reads the section of `rl.algorithm` only (PPO's too for DPO / IPO: the sampling
    settings of their evaluation rollouts): another objective's settings do not rerun it."""
    cfg = load_config("configs/tiny.py")
    for algorithm, unread, read in [
        ("ppo", [("dpo.beta", 0.5), ("rloo.kl_coef", 0.1)], ("ppo.kl_coef", 0.1)),
        ("rloo", [("dpo.beta", 0.5), ("ppo.kl_coef", 0.1)], ("rloo.kl_coef", 0.1)),
        ("dpo", [("rloo.kl_coef", 0.1)], ("dpo.beta", 0.5)),
        ("ipo", [("rloo.kl_coef", 0.1)], ("ppo.max_new_tokens", 4)),
    ]:
        chosen = apply_overrides(cfg, [("rl.algorithm", algorithm)])
        before = stage_hashes(chosen, REGISTRY)["ppo"]
        for override in unread:
            assert stage_hashes(apply_overrides(chosen, [override]), REGISTRY)["ppo"] == before, (algorithm, override)
        assert stage_hashes(apply_overrides(chosen, [read]), REGISTRY)["ppo"] != before, (algorithm, read)


def test_lora_config_reaches_sft_and_ppo_and_dpo_refuses_it():
    from experiments.stages import ppo, sft
    from experiments.typed import ConfigError

    cfg = load_config("configs/tiny.py")
    assert sft.Config.build(cfg).model.lora.config() is None and sft.Config.build(cfg).exports() == ["export"]
    on = apply_overrides(cfg, [("model.lora.rank", 4)])
    lora = ppo.Config.build(on).model.lora.config()
    assert (lora.rank, lora.alpha, len(lora.target_modules)) == (4, 16.0, 2)
    assert sft.Config.build(on).exports() == ["export", "adapter"]  # the PEFT folder is checked on skip too
    for algorithm in ("dpo", "ipo"):
        with pytest.raises(ConfigError, match=f"model.lora.rank=4 with rl.algorithm='{algorithm}'"):
            ppo.Config.build(apply_overrides(on, [("rl.algorithm", algorithm)]))
    with pytest.raises(ConfigError, match="model.lora.rank=-1"):
        sft.Config.build(apply_overrides(cfg, [("model.lora.rank", -1)]))
