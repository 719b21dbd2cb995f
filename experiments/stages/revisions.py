"""Stage 1, revisions: the starting model answers red-team prompts, then critiques and revises its
answer for `num_revisions` rounds under sampled principles (SL-CAI data, paper sec. 3.1); it also
answers the helpful prompts once (the helpful samples mixed into SFT).

Writes `revisions/red_team` and `revisions/helpful` (resumable JSONL shards, one row per prompt with
every round; `cai_jax.cai.revisions`).
"""

from __future__ import annotations

import dataclasses

import jax

from experiments.context import (
    ModelSpec,
    PromptsSpec,
    StageContext,
    load_base_model,
    load_constitution_file,
    load_prompt_split,
    stage_seed,
)
from experiments.typed import take


@dataclasses.dataclass(frozen=True)
class Revisions:
    num_prompts: int  # first N training red-team prompts revised; 0 = all
    num_revisions: int
    num_principles: int  # sample from the first k SL principles; 0 = all
    mode: str  # critique | direct
    num_few_shots: int
    temperature: float
    top_p: float
    max_new_tokens: int
    rendering: str  # chat | transcript
    batch_size: int
    helpful_max_new_tokens: int


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int
    model: ModelSpec
    constitution: str
    prompts: PromptsSpec
    revisions: Revisions

    @classmethod
    def build(cls, cfg) -> Config:
        return take(cls, cfg, "config")

    def preflight(self) -> None:
        """The model, constitution and prompt sources exist and parse (experiments/preflight.py)."""
        from experiments import preflight as pf

        pf.check_model("model.name", self.model.name)
        pf.check_constitution("constitution", self.constitution)
        pf.check_prompts("prompts.red_team", self.prompts.red_team)
        pf.check_prompts("prompts.helpful", self.prompts.helpful)

    def settings(self):
        """The engine's `RevisionSettings` for the red-team prompts."""
        from cai_jax.cai.revisions import RevisionSettings

        r = self.revisions
        return RevisionSettings(
            num_revisions=r.num_revisions,
            num_principles=r.num_principles or None,
            mode=r.mode,
            num_few_shots=r.num_few_shots,
            temperature=r.temperature,
            top_p=r.top_p,
            max_new_tokens=r.max_new_tokens,
            rendering=r.rendering,
            seed=stage_seed(self.seed, "revisions"),
            batch_size=r.batch_size,
        )

    def helpful_settings(self):
        """The helpful samples': the answer alone, no rounds and no few-shots (paper sec. 3.1).
        Without rounds the mode and principles are unread; they stay as earlier folders recorded them."""
        return dataclasses.replace(
            self.settings(),
            num_revisions=0,
            num_principles=None,
            mode="critique",
            num_few_shots=0,
            max_new_tokens=self.revisions.helpful_max_new_tokens,
        )


def run(ctx: StageContext, cfg: Config) -> dict:
    from cai_jax.cai.revisions import load_revisions, run_revisions

    r = cfg.revisions
    lm = load_base_model(ctx, cfg.model, cfg.seed)
    constitution = load_constitution_file(cfg.constitution)
    red_train, _, red_report = load_prompt_split(ctx, cfg.prompts, "red_team", cfg.seed)
    help_train, _, help_report = load_prompt_split(ctx, cfg.prompts, "helpful", cfg.seed)
    if r.num_prompts:
        red_train = red_train[: r.num_prompts]
    kw = dict(process_index=jax.process_index(), process_count=jax.process_count(), progress=ctx.run.log.progress)
    run_revisions(lm, red_train, constitution, cfg.settings(), ctx.dir / "red_team", **kw)
    # Helpful samples: the same model's answers to helpfulness prompts, no revisions (paper sec. 3.1).
    run_revisions(lm, help_train, constitution, cfg.helpful_settings(), ctx.dir / "helpful", **kw)
    return {
        "red_team_rows": len(load_revisions(ctx.dir / "red_team")),
        "helpful_rows": len(load_revisions(ctx.dir / "helpful")),
        "red_team_prompts": red_report,
        "helpful_prompts": help_report,
    }
