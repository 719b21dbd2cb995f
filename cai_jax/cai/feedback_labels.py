"""AI labels for response pairs: the multiple-choice question under sampled principles (paper sec. 4.1).

`label_pairs` asks a judge (`cai.judge`: a loaded LM by default, which may be the policy itself,
or a Python callable) the question of `cai_jax.cai.feedback_question` about each pair and turns
the option log-probs into P(A) (`cai_jax.cai.feedback_probs`). Options (`FeedbackSettings`):

* ensembling: `ensemble` principles are sampled per comparison (distinct ones from the first
  `num_principles`, with replacement only when the ensemble is larger than that pool), one
  question each, and the members' probabilities are averaged;
* A/B order swap (`swap`): every question is also asked with the responses in the other order, and
  p_A is averaged with 1 - p_(A) of the swapped question. The average is taken in log-odds by
  default (`swap_average="logit"`): then a pure position bias, a constant added to the log-prob of
  whichever option is shown first, cancels exactly; `swap_average="prob"` averages probabilities,
  which cancels a bias only to first order;
* chain of thought (`cot`): the feedback model first writes its reasoning after "Let's think step
  by step:" (sampled, at most `cot_max_new_tokens`, ending at `cot_stop_strings`), then the option
  log-probs are read after the reasoning and "\\nThe answer is:"; `cot_samples` reasonings per
  question are ensemble members too. CoT few-shots come from the constitution's `cot_few_shots`;
* `clamp=(lo, hi)`: the final probability is clipped to [lo, hi] (the paper clamps CoT labels to
  40-60 %); `hard`: the final probability is rounded to 0 or 1 (0.5 stays 0.5).

Order of operations: per member p (after swap averaging) -> mean over members -> clamp -> hard.
Rows keep every intermediate (`p_a_members`, `p_a_soft`), so one run serves the label ablations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from cai_jax.cai.constitution import Constitution, FeedbackFewShot, sample_feedback_principles
from cai_jax.cai.feedback_probs import label_probabilities, member_probabilities
from cai_jax.cai.feedback_question import OPTIONS, build_mc_question, conversation_messages, cot_answer_prefix
from cai_jax.cai.feedback_settings import FeedbackSettings
from cai_jax.cai.judge import JudgeError, JudgeQuestion, LMJudge
from cai_jax.sampling import generate

__all__ = ["as_judge", "check_constitution", "draw_principles", "label_pairs", "select_few_shots"]


def select_few_shots(constitution: Constitution, settings: FeedbackSettings) -> list[FeedbackFewShot]:
    """The few-shot examples shown before each question (the CoT ones with `cot`)."""
    pool = constitution.cot_few_shots if settings.cot else constitution.feedback_few_shots
    if settings.num_few_shots > len(pool):
        kind = "chain-of-thought" if settings.cot else "feedback"
        raise ValueError(
            f"feedback.num_few_shots={settings.num_few_shots}, but the constitution has only {len(pool)} "
            f"{kind} few-shot examples"
        )
    return list(pool[: settings.num_few_shots])


def draw_principles(constitution: Constitution, settings: FeedbackSettings, rng: np.random.Generator) -> dict:
    """A comparison's principle ids: {"principle_ids": [ensemble], "few_shot_principle_ids": [ensemble][shots]}.

    Few-shot examples that name their principle keep it; the others get a sampled one.
    """
    drawn = sample_feedback_principles(constitution, settings.ensemble, rng, k=settings.num_principles, distinct=True)
    ids = [p.id for p in drawn]
    shots = select_few_shots(constitution, settings)
    per_member = []
    for _ in ids:
        drawn = sample_feedback_principles(constitution, len(shots), rng, k=settings.num_principles)
        per_member.append([s.principle_id or d.id for s, d in zip(shots, drawn)])
    return {"principle_ids": ids, "few_shot_principle_ids": per_member}


def check_constitution(constitution: Constitution, settings: FeedbackSettings) -> None:
    """Fails early on a constitution the settings cannot use: no principles, a bad k, few few-shots."""
    if not constitution.feedback_principles:
        raise ValueError(
            f"feedback: the constitution {constitution.name!r} has no feedback principles "
            "(feedback_principles is empty)"
        )
    sample_feedback_principles(constitution, 0, 0, k=settings.num_principles)  # a bad k fails here
    select_few_shots(constitution, settings)


def _key_words(rng: jax.Array) -> list[int]:
    return [int(x) for x in np.asarray(jax.random.bits(rng, (2,), np.uint32))]


def as_judge(feedback_model: Any, settings: FeedbackSettings) -> Any:
    """A judge as it is, or a `LoadedModel` wrapped in `LMJudge` with the settings' rendering."""
    if hasattr(feedback_model, "option_logprobs"):
        return feedback_model
    return LMJudge(feedback_model, rendering=settings.rendering, batch_size=settings.scoring_batch_size)


def label_pairs(
    judge: Any,
    rows: Sequence[dict],
    constitution: Constitution,
    *,
    settings: FeedbackSettings,
    rng: jax.Array,
    allow_empty: bool = False,
) -> list[dict]:
    """AI labels for given response pairs (no response sampling); see the module docstring.

    Args:
      judge: a `cai.judge` judge (an `LMJudge`, a `CallableJudge`, ...) or a `LoadedModel`
        (wrapped in an `LMJudge` reading the settings' rendering).
      rows: dicts with "prompt" (str) or "messages" (ending with a user turn), "response_a" and
        "response_b"; optional "prompt_id", "index" (seeds the principle draw; default: position)
        and "principle_ids" / "few_shot_principle_ids" (as `draw_principles` returns) to fix them.
      constitution: supplies the feedback principles and few-shots.
      settings: FeedbackSettings.
      rng: a jax key; principles are drawn from numpy generators seeded by (rng, index), the
        CoT reasonings from `fold_in(rng, 1)`.
      allow_empty: judge empty responses as they are (evals compare whatever the models said);
        the feedback stage refuses them (its sampler redraws empty samples).

    Returns:
      One dict per row: the row's fields plus principle_ids [M], few_shot_principle_ids [M][S],
      logp_a, logp_b [M], swap_logp_a, swap_logp_b [M] (empty without swap), cot_texts and
      swap_cot_texts [M] (empty without CoT), p_a_first, p_a_swapped, p_a_members [M], p_a_soft
      and p_a. M = ensemble * cot_samples members, principle-major.
    """
    if not rows:
        raise ValueError("label_pairs: no rows")
    judge = as_judge(judge, settings)
    check_constitution(constitution, settings)
    if settings.rendering == "chat" and judge.tokenizer is None:
        raise JudgeError(f"judge {judge.name} reads raw text only: set feedback.rendering='raw'")
    if settings.cot and not isinstance(judge, LMJudge):
        raise JudgeError(f"judge {judge.name} cannot write chain-of-thought reasoning (feedback.label='cot')")
    tok, shots = judge.tokenizer, select_few_shots(constitution, settings)
    words, reps = _key_words(jax.random.fold_in(rng, 0)), settings.cot_samples
    orders = (False, True) if settings.swap else (False,)
    questions, drawn = [], []
    for j, row in enumerate(rows):
        name = row.get("prompt_id", j)
        for field in ("response_a", "response_b"):
            if not isinstance(row.get(field), str) or not (allow_empty or row[field].strip()):
                raise ValueError(f"label_pairs: row {name!r} has an empty {field}")
        convo = row.get("messages") or row.get("prompt")
        if not convo:
            raise ValueError(f"label_pairs: row {name!r} has no prompt")
        d = draw_principles(constitution, settings, np.random.default_rng([*words, int(row.get("index", j))]))
        d = {k: row.get(k, v) for k, v in d.items()}
        if len(d["principle_ids"]) != settings.ensemble:
            raise ValueError(
                f"label_pairs: row {name!r} gives {len(d['principle_ids'])} principle_ids, ensemble={settings.ensemble}"
            )
        drawn.append(d)
        messages = tuple(conversation_messages(convo))
        for m, pid in enumerate(d["principle_ids"]):
            few = [(s, constitution.feedback_principle(i).text) for s, i in zip(shots, d["few_shot_principle_ids"][m])]
            principle = constitution.feedback_principle(pid).text
            for swapped in orders:
                pair = (row["response_b"], row["response_a"]) if swapped else (row["response_a"], row["response_b"])
                q = build_mc_question(
                    convo, *pair, principle, few_shots=few, rendering=settings.rendering, tokenizer=tok,
                    cot=settings.cot,
                )  # fmt: skip
                questions += [JudgeQuestion(q, OPTIONS, messages, pair, principle)] * reps
    reasoning = [""] * len(questions)
    if settings.cot:
        _check_length(judge, [q.text for q in questions], rows, settings)
        out = generate(
            judge.lm,
            [judge.encode(q.text) for q in questions],
            rng=jax.random.fold_in(rng, 1),
            max_new_tokens=settings.cot_max_new_tokens,
            temperature=settings.cot_temperature,
            stop_strings=settings.cot_stop_strings,
        )
        reasoning = [t.strip() for t in out.texts(tok)]
        questions = [dataclasses.replace(q, text=cot_answer_prefix(q.text, r)) for q, r in zip(questions, reasoning)]
    elif isinstance(judge, LMJudge):
        _check_length(judge, [q.text for q in questions], rows, settings)
    logps = judge.option_logprobs(questions)
    members = settings.ensemble * reps
    # [rows, ensemble, orders, reps, ...] -> [rows, orders, members, ...] (members principle-major).
    logps = logps.astype(np.float64).reshape(len(rows), settings.ensemble, len(orders), reps, 2)
    logps = logps.transpose(0, 2, 1, 3, 4).reshape(len(rows), len(orders), members, 2)
    cots = np.array(reasoning, dtype=object).reshape(len(rows), settings.ensemble, len(orders), reps)
    cots = cots.transpose(0, 2, 1, 3).reshape(len(rows), len(orders), members)
    la, lb = logps[:, 0, :, 0], logps[:, 0, :, 1]
    swap = (logps[:, 1, :, 0], logps[:, 1, :, 1]) if settings.swap else None
    how = dict(swap_logps=swap, swap_average=settings.swap_average)
    p_first = member_probabilities(la, lb)
    p_members = member_probabilities(la, lb, **how)
    p_soft = label_probabilities(la, lb, **how)
    p_final = label_probabilities(la, lb, **how, clamp=settings.clamp, hard=settings.hard)
    out = []
    for j, row in enumerate(rows):
        repeat = lambda xs: [x for x in xs for _ in range(reps)]  # noqa: E731
        out.append(
            {
                **row,
                "principle_ids": repeat(drawn[j]["principle_ids"]),
                "few_shot_principle_ids": repeat(drawn[j]["few_shot_principle_ids"]),
                "logp_a": la[j].tolist(),
                "logp_b": lb[j].tolist(),
                "swap_logp_a": swap[0][j].tolist() if swap else [],
                "swap_logp_b": swap[1][j].tolist() if swap else [],
                "cot_texts": cots[j, 0].tolist() if settings.cot else [],
                "swap_cot_texts": cots[j, 1].tolist() if settings.cot and swap else [],
                "p_a_first": p_first[j].tolist(),
                "p_a_swapped": (1.0 - member_probabilities(swap[0][j], swap[1][j])).tolist() if swap else [],
                "p_a_members": p_members[j].tolist(),
                "p_a_soft": float(p_soft[j]),
                "p_a": float(p_final[j]),
            }
        )
    return out


def _check_length(judge: LMJudge, texts: Sequence[str], rows: Sequence[dict], settings: FeedbackSettings) -> None:
    """A question (plus room for reasoning and the option) longer than the context names its row."""
    context, per_row = judge.config.max_position_embeddings, len(texts) // len(rows)
    room = 8 + (settings.cot_max_new_tokens + 8 if settings.cot else 0)
    for i, t in enumerate(texts):
        if i % settings.cot_samples:
            continue  # the other samples of one question share its text
        n = len(judge.encode(t))
        if n + room > context:
            row = rows[i // per_row]
            raise ValueError(
                f"feedback: the question for row {row.get('prompt_id', i // per_row)!r} has {n} tokens; with "
                f"{room} tokens for the answer{' and reasoning' if settings.cot else ''} it exceeds the feedback "
                f"model's context of {context}"
            )
