"""The feedback labeller's settings (`FeedbackSettings`); the feedback stage builds them from the
config's `feedback` section (experiments/stages/feedback.py: label -> hard / cot / clamp).

What each option does to a label is described in `cai_jax.cai.feedback_labels`.
"""

from __future__ import annotations

import dataclasses

from cai_jax.cai.feedback_probs import SWAP_AVERAGES
from cai_jax.cai.feedback_question import RENDERINGS

__all__ = ["FeedbackSettings"]


@dataclasses.dataclass(frozen=True)
class FeedbackSettings:
    """Knobs of the feedback labeller. No defaults here: they live in the config (`configs/base.py`,
    section `feedback`), which the feedback stage turns into these settings."""

    rendering: str  # feedback question: raw (base models) | chat (chat template)
    policy_rendering: str  # how the policy sees the prompt: chat | transcript (or its other name, raw)
    temperature: float  # response sampling; paper: T = 1
    top_p: float
    max_new_tokens: int  # per sampled response
    num_principles: int | None  # sample from the first k feedback principles; None = all
    ensemble: int  # principles per comparison; members' p are averaged
    num_few_shots: int  # constitution few-shots before the question (cot_few_shots when cot)
    swap: bool  # also ask with B shown first and average (position bias)
    swap_average: str  # logit (cancels a constant position bias exactly) | prob
    hard: bool  # round the final p to 0 / 1
    clamp: tuple[float, float] | None  # clip the final p to [lo, hi]; e.g. (0.4, 0.6)
    cot: bool  # reason after "Let's think step by step:" before answering
    cot_samples: int  # reasonings per question, each an ensemble member
    cot_max_new_tokens: int  # tokens of reasoning at most
    cot_temperature: float
    cot_stop_strings: tuple[str, ...]
    scoring_batch_size: int  # option sequences per device call

    def __post_init__(self):
        if self.rendering not in RENDERINGS:
            raise ValueError(f"feedback.rendering={self.rendering!r}; expected raw or chat")
        if self.policy_rendering not in ("chat", "transcript", "raw"):
            raise ValueError(f"feedback.policy_rendering={self.policy_rendering!r}; expected chat or transcript")
        if self.swap_average not in SWAP_AVERAGES:
            raise ValueError(f"feedback.swap_average={self.swap_average!r}; expected logit or prob")
        ints = ("max_new_tokens", "ensemble", "cot_samples", "cot_max_new_tokens", "scoring_batch_size")
        for name in ints:
            if getattr(self, name) < 1:
                raise ValueError(f"feedback.{name}={getattr(self, name)!r} must be >= 1")
        if self.num_few_shots < 0:
            raise ValueError(f"feedback.num_few_shots={self.num_few_shots!r} must be >= 0")
        if self.num_principles is not None and self.num_principles < 1:
            raise ValueError(f"feedback.num_principles={self.num_principles!r} must be >= 1 or None")
        if self.temperature < 0 or self.cot_temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("feedback: temperatures must be >= 0 and top_p in (0, 1]")
        if self.cot_samples > 1 and not self.cot:
            raise ValueError(f"feedback.cot_samples={self.cot_samples} needs cot=True")
        object.__setattr__(self, "cot_stop_strings", tuple(self.cot_stop_strings))
        if self.clamp is not None:
            clamp = tuple(float(x) for x in self.clamp)
            if len(clamp) != 2 or not 0.0 <= clamp[0] < clamp[1] <= 1.0 or not clamp[0] <= 0.5 <= clamp[1]:
                raise ValueError(
                    f"feedback.clamp={self.clamp!r}; expected (lo, hi) with 0 <= lo <= 0.5 <= hi <= 1, lo < hi"
                )
            if self.hard:
                raise ValueError("feedback: hard=True rounds p to 0/1, so clamp must be None")
            object.__setattr__(self, "clamp", clamp)
