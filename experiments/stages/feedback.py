"""Stage 3, feedback: the SL-CAI model samples two responses per prompt and a judge labels which is
better under sampled principles (RL-CAI's AI feedback, paper sec. 4.1).

Red-team prompts are labelled under the constitution's feedback principles (`feedback/comparisons`);
with `label_helpful`, helpful prompts under the helpfulness questions (`feedback/helpful`), the
helpfulness half of the PM's data. Both are resumable JSONL shards (`cai_jax.cai.feedback`).
`feedback/judge_report.json` says how biased, consistent and calibrated the judge was on each
(position bias, flip rate, length preference, principle agreement, label distribution, per
principle: `cai_jax.eval.judge_report`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments.context import (
    ModelSpec,
    PromptsSpec,
    StageContext,
    load_constitution_file,
    load_exported,
    load_judge,
    load_prompt_split,
    stage_seed,
)
from experiments.typed import take

CLAMPS = {"none": None, "20-80": (0.2, 0.8), "40-60": (0.4, 0.6)}
LABELS = ("soft", "hard", "cot")


@dataclasses.dataclass(frozen=True)
class Feedback:
    num_prompts: int  # red-team prompts labelled; 0 = all training prompts
    label_helpful: bool
    num_helpful_prompts: int
    helpful_constitution: str
    label: str  # soft | hard | cot
    cot_clamp: str  # none | 20-80 | 40-60
    cot_samples: int
    cot_max_new_tokens: int
    ensemble: int  # principles per comparison
    num_principles: int  # sample from the first k feedback principles; 0 = all
    swap: bool
    swap_average: str
    num_few_shots: int
    rendering: str  # chat | transcript: how the judge sees the question
    temperature: float
    top_p: float
    max_new_tokens: int
    batch_size: int
    scoring_batch_size: int
    cot_temperature: float
    cot_stop_strings: tuple[str, ...]

    def __post_init__(self):
        if self.label not in LABELS:
            raise ValueError(f"feedback.label={self.label!r}; expected one of {', '.join(LABELS)}")
        if self.cot_clamp not in CLAMPS:
            raise ValueError(f"feedback.cot_clamp={self.cot_clamp!r}; expected one of {sorted(CLAMPS)}")
        if self.rendering not in ("chat", "transcript"):
            raise ValueError(f"feedback.rendering={self.rendering!r}; expected chat or transcript")

    @property
    def judge_rendering(self) -> str:
        """The labeller's name for this rendering ("raw" is the transcript framing)."""
        return "chat" if self.rendering == "chat" else "raw"

    def settings(self, *, policy_rendering: str, **overrides):
        """The labeller's `FeedbackSettings` (label -> hard / cot / clamp)."""
        from cai_jax.cai.feedback_settings import FeedbackSettings

        cot = self.label == "cot"
        fields = dict(
            rendering=self.judge_rendering,
            policy_rendering=policy_rendering,
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            num_principles=self.num_principles or None,
            ensemble=self.ensemble,
            num_few_shots=self.num_few_shots,
            swap=self.swap,
            swap_average=self.swap_average,
            hard=self.label == "hard",
            clamp=CLAMPS[self.cot_clamp] if cot else None,
            cot=cot,
            cot_samples=self.cot_samples if cot else 1,
            cot_max_new_tokens=self.cot_max_new_tokens,
            cot_temperature=self.cot_temperature,
            cot_stop_strings=self.cot_stop_strings,
            scoring_batch_size=self.scoring_batch_size,
        )
        return FeedbackSettings(**{**fields, **overrides})


@dataclasses.dataclass(frozen=True)
class Judge:
    name: str  # "" = the starting model; a model; or python:<module>:<callable>


@dataclasses.dataclass(frozen=True)
class PolicyRendering:
    rendering: str  # how SFT rendered prompts: the policy answers them the same way


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int
    model: ModelSpec
    feedback_model: Judge
    constitution: str
    prompts: PromptsSpec
    sft: PolicyRendering
    feedback: Feedback

    @classmethod
    def build(cls, cfg) -> Config:
        return take(cls, cfg, "config")

    def preflight(self) -> None:
        """The judge, constitutions and prompt sources exist and parse (experiments/preflight.py)."""
        from experiments import preflight as pf

        pf.check_judge("feedback_model.name", self.feedback_model.name)
        pf.check_model("model.name", self.model.name)
        pf.check_constitution("constitution", self.constitution)
        if self.feedback.label_helpful:
            pf.check_constitution("feedback.helpful_constitution", self.feedback.helpful_constitution, helpful=True)
        pf.check_prompts("prompts.red_team", self.prompts.red_team)
        if self.feedback.label_helpful:
            pf.check_prompts("prompts.helpful", self.prompts.helpful)

    def settings(self, **overrides):
        """The labeller's settings; the policy reads prompts as SFT rendered them."""
        overrides.setdefault("policy_rendering", self.sft.rendering)
        return self.feedback.settings(**overrides)


def judge(ctx: StageContext, cfg, settings):
    """The configured judge (`feedback_model.name`), reading `settings`' rendering and batch size."""
    return load_judge(
        ctx, cfg.feedback_model.name, cfg.model, cfg.seed, rendering=settings.rendering,
        batch_size=settings.scoring_batch_size,
    )  # fmt: skip


def label_summary(ds) -> dict:
    p = np.asarray(ds["p_a"], np.float64)
    return {
        "comparisons": len(ds),
        "mean_p_a": float(p.mean()),
        "mean_confidence": float(np.abs(p - 0.5).mean() + 0.5),
        "frac_confident_0.8": float(np.mean(np.maximum(p, 1 - p) >= 0.8)),
    }


def run(ctx: StageContext, cfg: Config) -> dict:
    from cai_jax import atomic
    from cai_jax.cai.feedback import load_comparisons_dataset, run_feedback
    from cai_jax.eval.judge_report import judge_report

    f = cfg.feedback
    settings = cfg.settings()
    policy = load_exported(ctx, ctx.dep("sft") / "export", cfg.model)
    labeller = judge(ctx, cfg, settings)
    common = dict(settings=settings, batch_size=f.batch_size, progress=ctx.run.log.progress)
    red_train, _, _ = load_prompt_split(ctx, cfg.prompts, "red_team", cfg.seed)
    prompts = red_train[: f.num_prompts] if f.num_prompts else red_train
    constitution = load_constitution_file(cfg.constitution)
    seed = stage_seed(cfg.seed, "feedback")
    run_feedback(policy, labeller, prompts, constitution, ctx.dir / "comparisons", seed=seed, **common)
    red_rows = load_comparisons_dataset(ctx.dir / "comparisons")
    summary = label_summary(red_rows)
    reports = {"harmlessness": judge_report(red_rows.to_list())}
    if f.label_helpful:
        help_train, _, _ = load_prompt_split(ctx, cfg.prompts, "helpful", cfg.seed)
        helpful = help_train[: f.num_helpful_prompts] if f.num_helpful_prompts else help_train
        questions = load_constitution_file(f.helpful_constitution, helpful=True)
        seed = stage_seed(cfg.seed, "feedback_helpful")
        run_feedback(policy, labeller, helpful, questions, ctx.dir / "helpful", seed=seed, **common)
        help_rows = load_comparisons_dataset(ctx.dir / "helpful")
        summary["helpful"] = label_summary(help_rows)
        reports["helpfulness"] = judge_report(help_rows.to_list())
    # How biased, consistent and calibrated the judge was (cai_jax/eval/judge_report.py), per kind.
    atomic.write_json(ctx.dir / "judge_report.json", {"judge": labeller.name, **reports}, indent=1, allow_nan=False)
    summary["judge"] = {
        kind: {
            "position_bias": (r["position"]["bias"] or {}).get("mean"),
            "flip_rate": r["position"]["flip_rate"],
            "length_correlation": r["length"]["correlation"],
        }
        for kind, r in reports.items()
    }
    return summary
