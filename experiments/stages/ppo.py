"""Stage 5, ppo: RL-CAI, PPO of the SL-CAI policy against the PM (paper sec. 4), exporting the
policy at each snapshot iteration the evals compare (`eval.elo_snapshots`).

One `train_ppo` call exports the policy at every snapshot iteration on the way (a checkpoint is
forced there, so a resumed run never skips an export).
Writes `ppo/snapshots/iter_<k>`, `ppo/metrics.jsonl` and `ppo/samples.jsonl`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from cai_jax.train.ppo_steps import PPOConfig
from experiments.context import (
    ModelSpec,
    PromptsSpec,
    StageContext,
    load_exported,
    load_prompt_split,
    read_jsonl,
    stage_seed,
)
from experiments.typed import inline, take


@dataclasses.dataclass(frozen=True)
class PPO:
    num_iterations: int
    optim: Mapping[str, Any]
    settings: PPOConfig = inline()  # the section's other keys

    def optimizer(self):
        """The `OptimConfig`, its schedule ending at the last update (iterations x updates per iteration)."""
        from cai_jax.train.state import OptimConfig

        updates = self.num_iterations * self.settings.updates_per_iteration
        return OptimConfig.from_config(self.optim, updates=updates)


@dataclasses.dataclass(frozen=True)
class Snapshots:
    elo_snapshots: tuple[int, ...]  # PPO iterations exported for the evals; -1 = the last


@dataclasses.dataclass(frozen=True)
class PolicyRendering:
    rendering: str


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int
    model: ModelSpec
    prompts: PromptsSpec
    sft: PolicyRendering
    ppo: PPO
    eval: Snapshots

    @classmethod
    def build(cls, cfg) -> Config:
        return take(cls, cfg, "config")

    def snapshot_iterations(self) -> list[int]:
        """Iterations whose policy is exported (-1 = the last); the last is always among them."""
        n = self.ppo.num_iterations
        steps = {n if k < 0 else k for k in self.eval.elo_snapshots}
        return sorted({k for k in steps if 0 < k <= n} | {n})

    def exports(self) -> list[str]:
        """The model folders this stage writes (the pipeline checks their completion marker on skip)."""
        return [f"snapshots/iter_{k}" for k in self.snapshot_iterations()]


def run(ctx: StageContext, cfg: Config) -> dict:
    from cai_jax.checkpoints.hf import require_complete_export
    from cai_jax.checkpoints.pm import load_pm
    from cai_jax.train.ppo import train_ppo

    policy = load_exported(ctx, ctx.dep("sft") / "export", cfg.model)
    pm = load_pm(require_complete_export(ctx.dep("pm") / "export"))
    # RL prompts: the training red-team and helpfulness prompts (paper sec. 4.1 uses both).
    red, _, _ = load_prompt_split(ctx, cfg.prompts, "red_team", cfg.seed)
    helpful, _, _ = load_prompt_split(ctx, cfg.prompts, "helpful", cfg.seed)
    prompts = [p.text for p in red + helpful]
    snapshots = {k: ctx.dir / "snapshots" / f"iter_{k}" for k in cfg.snapshot_iterations()}
    train_ppo(
        policy,
        policy,
        pm,
        prompts,
        ppo_cfg=cfg.ppo.settings,
        optim_cfg=cfg.ppo.optimizer(),
        ckpt_cfg=ctx.checkpoints(),
        mesh_cfg=ctx.run.mesh,
        num_iterations=cfg.ppo.num_iterations,
        seed=stage_seed(cfg.seed, "ppo"),
        workdir=ctx.dir,
        export_at=snapshots,
        rendering=cfg.sft.rendering,
    )
    rows = read_jsonl(ctx.dir / "metrics.jsonl")
    last = rows[-1] if rows else {}
    keys = ("objective/scores", "objective/kl", "objective/rlhf_reward", "response/length_mean", "response/no_eos_frac")
    return {"iterations": cfg.ppo.num_iterations, "prompts": len(prompts), **{k: last.get(k) for k in keys}}
