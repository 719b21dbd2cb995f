"""Stage 5, ppo: RL-CAI, the SL-CAI policy optimised against the AI feedback (paper sec. 4) by the
objective `rl.algorithm` names, exporting the policy at each snapshot the evals compare
(`eval.elo_snapshots`):

- `ppo` (section `ppo`): PPO against the PM (`cai_jax.train.ppo`);
- `rloo` (section `rloo`): k samples per prompt, leave-one-out REINFORCE against the PM, no value
  model (`cai_jax.train.rloo`);
- `dpo` / `ipo` (section `dpo`): soft-label DPO or IPO directly on the feedback stage's
  comparisons (`cai_jax.train.dpo`), no PM in the loss; the PM scores evaluation samples every
  `dpo.eval_every` steps with PPO's sampling settings, so the curves read like PPO's.

Every objective writes `ppo/snapshots/iter_<k>` (k: PPO / RLOO iterations, DPO / IPO optimizer
steps), `ppo/metrics.jsonl` with PPO's metric names and `ppo/samples.jsonl`; one training call
exports every snapshot on the way (a checkpoint is forced there, so a resumed run never skips an
export). The stage's config holds only the chosen objective's section, so its hash covers exactly
what it reads. With `model.lora.rank > 0`, PPO and RLOO train fresh adapters on the SL-CAI model
(stored once as the frozen base of policy, reference and value model, `cai_jax.train.rl_lora`);
each snapshot is the merged model, with the adapters alone in PEFT's layout in its `adapter/`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from cai_jax.train.ppo_steps import PPOConfig
from cai_jax.train.rloo_steps import RLOOConfig
from experiments.context import (
    PromptsSpec,
    StageContext,
    TunedModelSpec,
    load_exported,
    load_prompt_split,
    read_jsonl,
    stage_seed,
)
from experiments.typed import ConfigError, inline, take

ALGORITHMS = {"ppo": "ppo", "rloo": "rloo", "dpo": "dpo", "ipo": "dpo"}  # objective -> its config section


def _optimizer(optim: Mapping[str, Any], updates: int):
    from cai_jax.train.state import OptimConfig

    return OptimConfig.from_config(optim, updates=updates)


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

    @property
    def num_steps(self) -> int:
        return self.num_iterations


@dataclasses.dataclass(frozen=True)
class RLOO:
    num_iterations: int
    optim: Mapping[str, Any]
    settings: RLOOConfig = inline()  # the section's other keys

    def optimizer(self):
        return _optimizer(self.optim, self.num_iterations * self.settings.updates_per_iteration)

    @property
    def num_steps(self) -> int:
        return self.num_iterations


@dataclasses.dataclass(frozen=True)
class DPO:
    beta: float  # implied reward per nat of log(pi / ref)
    num_steps: int  # optimizer updates
    batch_size: int  # comparisons per update
    seq_len: int  # tokens per (prompt, response) side
    helpful_fraction: float  # share of the feedback stage's helpfulness pairs in the mix (as pm's)
    eval_every: int  # steps between PM-scored samples of the policy (PPO's metric names)
    optim: Mapping[str, Any]

    def optimizer(self):
        return _optimizer(self.optim, self.num_steps // int(self.optim["grad_accum_steps"]))


@dataclasses.dataclass(frozen=True)
class RL:
    algorithm: str  # ppo | rloo | dpo | ipo

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"rl.algorithm={self.algorithm!r}; expected one of {', '.join(ALGORITHMS)}")


@dataclasses.dataclass(frozen=True)
class Snapshots:
    elo_snapshots: tuple[int, ...]  # PPO iterations exported for the evals; -1 = the last


@dataclasses.dataclass(frozen=True)
class PolicyRendering:
    rendering: str


@dataclasses.dataclass(frozen=True)
class Common:
    seed: int
    model: TunedModelSpec
    prompts: PromptsSpec
    sft: PolicyRendering
    eval: Snapshots


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int
    model: TunedModelSpec
    prompts: PromptsSpec
    sft: PolicyRendering
    eval: Snapshots
    rl: RL
    ppo: PPO | None  # ppo; dpo / ipo (the sampling settings of their evaluation rollouts)
    rloo: RLOO | None
    dpo: DPO | None

    @classmethod
    def build(cls, cfg) -> Config:
        """The common fields, `rl` and the chosen objective's section (others None: unread, unhashed)."""
        rl = take(RL, cfg.rl, "rl")
        common = take(Common, cfg, "config")
        if common.model.lora.rank and ALGORITHMS[rl.algorithm] == "dpo":
            raise ConfigError(
                f"model.lora.rank={common.model.lora.rank} with rl.algorithm={rl.algorithm!r}: DPO / IPO train "
                "every weight; set model.lora.rank=0, or use rl.algorithm=ppo or rloo with LoRA"
            )
        section = ALGORITHMS[rl.algorithm]
        chosen = {
            "ppo": take(PPO, cfg.ppo, "ppo") if section in ("ppo", "dpo") else None,
            "rloo": take(RLOO, cfg.rloo, "rloo") if section == "rloo" else None,
            "dpo": take(DPO, cfg.dpo, "dpo") if section == "dpo" else None,
        }
        return cls(**{f.name: getattr(common, f.name) for f in dataclasses.fields(Common)}, rl=rl, **chosen)

    @property
    def objective(self) -> PPO | RLOO | DPO:
        """The chosen objective's section."""
        return getattr(self, ALGORITHMS[self.rl.algorithm])

    def snapshot_iterations(self) -> list[int]:
        """Iterations (DPO / IPO: steps) whose policy is exported (-1 = the last); the last always is."""
        n = self.objective.num_steps
        steps = {n if k < 0 else k for k in self.eval.elo_snapshots}
        return sorted({k for k in steps if 0 < k <= n} | {n})

    def exports(self) -> list[str]:
        """The model folders this stage writes (the pipeline checks their completion marker on skip)."""
        return [f"snapshots/iter_{k}" for k in self.snapshot_iterations()]


def run(ctx: StageContext, cfg: Config) -> dict:
    from cai_jax.checkpoints.hf import require_complete_export
    from cai_jax.checkpoints.pm import load_pm

    policy = load_exported(ctx, ctx.dep("sft") / "export", cfg.model)
    pm = load_pm(require_complete_export(ctx.dep("pm") / "export"))
    # RL prompts: the training red-team and helpfulness prompts (paper sec. 4.1 uses both).
    red, _, _ = load_prompt_split(ctx, cfg.prompts, "red_team", cfg.seed)
    helpful, _, _ = load_prompt_split(ctx, cfg.prompts, "helpful", cfg.seed)
    prompts = [p.text for p in red + helpful]
    common = dict(
        ckpt_cfg=ctx.checkpoints(),
        mesh_cfg=ctx.run.mesh,
        seed=stage_seed(cfg.seed, "ppo"),
        workdir=ctx.dir,
        export_at={k: ctx.dir / "snapshots" / f"iter_{k}" for k in cfg.snapshot_iterations()},
        rendering=cfg.sft.rendering,
    )
    o = cfg.objective
    if cfg.rl.algorithm == "ppo":
        from cai_jax.train.ppo import train_ppo

        train_ppo(
            policy, policy, pm, prompts, ppo_cfg=o.settings, optim_cfg=o.optimizer(),
            num_iterations=o.num_iterations, lora=cfg.model.lora.config(), **common,
        )  # fmt: skip
    elif cfg.rl.algorithm == "rloo":
        from cai_jax.train.rloo import train_rloo

        train_rloo(
            policy, policy, pm, prompts, rloo_cfg=o.settings, optim_cfg=o.optimizer(),
            num_iterations=o.num_iterations, lora=cfg.model.lora.config(), **common,
        )  # fmt: skip
    else:
        from cai_jax.train.dpo import DPOConfig, train_dpo

        pairs = dpo_pairs(ctx, o, stage_seed(cfg.seed, "ppo"))
        train_dpo(
            policy, policy, pairs, dpo_cfg=DPOConfig(loss=cfg.rl.algorithm, beta=o.beta), optim_cfg=o.optimizer(),
            num_steps=o.num_steps, batch_size=min(o.batch_size, len(pairs)), seq_len=o.seq_len,
            eval_prompts=prompts, pm=pm, rollout_cfg=cfg.ppo.settings, eval_every=o.eval_every, **common,
        )  # fmt: skip
    rows = read_jsonl(ctx.dir / "metrics.jsonl")
    last = next((r for r in reversed(rows) if "objective/scores" in r), rows[-1] if rows else {})
    keys = ("objective/scores", "objective/kl", "objective/rlhf_reward", "response/length_mean", "response/no_eos_frac")
    return {
        "algorithm": cfg.rl.algorithm,
        "iterations": o.num_steps,
        "prompts": len(prompts),
        **{k: last.get(k) for k in keys},
    }


def dpo_pairs(ctx: StageContext, o: DPO, seed: int) -> list[dict]:
    """DPO / IPO's data: the feedback stage's red-team comparisons, with its helpfulness comparisons
    (when it labelled them) mixed in at `dpo.helpful_fraction`, as the PM mixes them."""
    from cai_jax.train.pm import mix_comparisons
    from experiments.stages.pm import feedback_comparisons

    rows = feedback_comparisons(ctx.dep("feedback") / "comparisons")
    helpful_dir = ctx.dep("feedback") / "helpful"
    if helpful_dir.is_dir() and o.helpful_fraction > 0:
        rows = mix_comparisons(rows, feedback_comparisons(helpful_dir), o.helpful_fraction, seed=seed)
    if not rows:
        raise ValueError(f"dpo: no comparisons in {ctx.dep('feedback')} (feedback.num_prompts too small?)")
    return rows
