"""The constitution's frozen dataclasses and its error type (see `cai_jax.cai.constitution`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

# Conversations use the roles of `cai_jax.text.render` so they can be rendered without conversion.
ROLES = ("user", "assistant", "system")
ANSWERS = ("A", "B")


class ConstitutionError(ValueError):
    """A constitution file, entry or argument is invalid.

    The message reads "<file>: <entry>, field '<field>': <problem>", leaving out the parts that do
    not apply. The parts are also kept as attributes so callers and tests can check them.

    Attributes:
      problem: what is wrong, in words.
      path: the file (or folder) being read, or None.
      entry: the entry, e.g. "sl_principles[3] (id 'privacy')", or None.
      field: the field of that entry, e.g. "critique_request", or None.
    """

    def __init__(
        self, problem: str, *, path: str | Path | None = None, entry: str | None = None, field: str | None = None
    ):
        self.problem, self.path, self.entry, self.field = problem, path, entry, field
        where = ", ".join(p for p in (entry, f"field '{field}'" if field else None) if p)
        message = f"{where}: {problem}" if where else problem
        super().__init__(f"{path}: {message}" if path is not None else message)


@dataclasses.dataclass(frozen=True)
class SLPrinciple:
    """A supervised-stage principle: a critique request and its matching revision request.

    Both are plain instructions (no "CritiqueRequest:" framing; the renderer adds it).
    """

    id: str
    critique_request: str
    revision_request: str


@dataclasses.dataclass(frozen=True)
class FeedbackPrinciple:
    """An RL-stage principle: the multiple-choice instruction shown before the (A)/(B) options."""

    id: str
    text: str


@dataclasses.dataclass(frozen=True)
class SLRound:
    """One critique -> revision round of a few-shot transcript.

    The request texts are always filled in (resolved from the named principle when the file gave
    only its id); `principle_id` records which principle the round used, or None for inline text.
    """

    critique_request: str
    critique: str
    revision_request: str
    revision: str
    principle_id: str | None = None


@dataclasses.dataclass(frozen=True)
class SLFewShot:
    """A critique/revision few-shot: a conversation ending in an assistant reply, then its rounds.

    `conversation` is a list of {"role": "user" | "assistant" | "system", "content": str} dicts.
    `rounds` may be empty only for imported chat transcripts with no detectable critique turns.
    """

    id: str
    conversation: list[dict[str, str]]
    rounds: list[SLRound]


@dataclasses.dataclass(frozen=True)
class FeedbackFewShot:
    """A multiple-choice feedback few-shot (plain, or chain-of-thought when `reasoning` is set).

    `conversation` ends with a user turn; `options` are the two candidate assistant replies shown
    as (A) and (B); `answer` is "A" or "B"; `principle_id` optionally names the feedback principle
    the example is shown with; `reasoning` is the step-by-step text of a chain-of-thought example
    (empty for plain feedback few-shots).
    """

    id: str
    conversation: list[dict[str, str]]
    options: list[str]
    answer: str
    principle_id: str | None = None
    reasoning: str = ""


@dataclasses.dataclass(frozen=True)
class Constitution:
    """Principles and few-shot examples for both stages of Constitutional AI.

    Attributes:
      name: a short name, e.g. "cai-jax-default".
      version: free-form version string.
      sl_principles: critique/revision pairs, sampled per revision round.
      feedback_principles: multiple-choice instructions, sampled per comparison.
      sl_few_shots: critique/revision transcripts shown before the model's own.
      feedback_few_shots: multiple-choice examples with their answer.
      cot_few_shots: chain-of-thought multiple-choice examples (with `reasoning`).
      description: free text about the constitution.
      source: where it was loaded from (not part of equality).
    """

    name: str
    version: str
    sl_principles: list[SLPrinciple]
    feedback_principles: list[FeedbackPrinciple]
    sl_few_shots: list[SLFewShot] = dataclasses.field(default_factory=list)
    feedback_few_shots: list[FeedbackFewShot] = dataclasses.field(default_factory=list)
    cot_few_shots: list[FeedbackFewShot] = dataclasses.field(default_factory=list)
    description: str = ""
    source: str = dataclasses.field(default="", compare=False)

    def sl_principle(self, principle_id: str) -> SLPrinciple:
        """Returns the SL principle with this id; raises ConstitutionError naming an unknown id."""
        for p in self.sl_principles:
            if p.id == principle_id:
                return p
        known = ", ".join(p.id for p in self.sl_principles) or "none"
        raise ConstitutionError(f"unknown SL principle id {principle_id!r} (known: {known})", path=self.source or None)

    def feedback_principle(self, principle_id: str) -> FeedbackPrinciple:
        """Returns the feedback principle with this id; raises ConstitutionError naming an unknown id."""
        for p in self.feedback_principles:
            if p.id == principle_id:
                return p
        known = ", ".join(p.id for p in self.feedback_principles) or "none"
        raise ConstitutionError(
            f"unknown feedback principle id {principle_id!r} (known: {known})", path=self.source or None
        )

    def restrict(self, k: int) -> Constitution:
        """The first k SL principles and the first k feedback principles (number-of-principles ablation).

        Few-shots are kept, since they are demonstrations rather than the principles being sampled;
        their request texts are already resolved, so a round or example that named a dropped
        principle only loses the id, which keeps the restricted constitution self-consistent.

        Raises:
          ConstitutionError: if k < 1, or k exceeds the size of a non-empty principle list (an empty
            list, e.g. the feedback principles of an SL-only import, stays empty).
        """
        counts = {"SL": len(self.sl_principles), "feedback": len(self.feedback_principles)}
        too_many = [f"{n} {kind}" for kind, n in counts.items() if 0 < n < k] if isinstance(k, int) else []
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or too_many:
            have = " and ".join(f"{n} {kind}" for kind, n in counts.items())
            raise ConstitutionError(
                f"restrict: k={k!r} must be a positive int no larger than each non-empty principle list "
                f"(this constitution has {have} principles)",
                path=self.source or None,
            )
        sl, fb = self.sl_principles[:k], self.feedback_principles[:k]
        sl_ids, fb_ids = {p.id for p in sl}, {p.id for p in fb}

        def keep_sl(r: SLRound) -> SLRound:
            return r if r.principle_id in sl_ids else dataclasses.replace(r, principle_id=None)

        def keep_fb(x: FeedbackFewShot) -> FeedbackFewShot:
            return x if x.principle_id in fb_ids else dataclasses.replace(x, principle_id=None)

        return dataclasses.replace(
            self,
            sl_principles=list(sl),
            feedback_principles=list(fb),
            sl_few_shots=[dataclasses.replace(s, rounds=[keep_sl(r) for r in s.rounds]) for s in self.sl_few_shots],
            feedback_few_shots=[keep_fb(x) for x in self.feedback_few_shots],
            cot_few_shots=[keep_fb(x) for x in self.cot_few_shots],
        )
