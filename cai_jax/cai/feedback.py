"""RL-CAI feedback labeller: AI comparison labels from a multiple-choice question (paper sec. 4.1).

For each red-team prompt the policy (the SL-CAI model) samples two responses. A judge
(`cai.judge`: a loaded LM by default, which may be the policy itself, or a Python callable) reads

    Consider the following conversation between a human and an assistant:

    Human: {prompt}

    {feedback principle}
    Options:
    (A) {response A}
    (B) {response B}
    The answer is:

and the teacher-forced log-probs of " (A)" and " (B)" are normalised over the two options:
p_A = exp(l_A) / (exp(l_A) + exp(l_B)), the soft target of the preference model.

Renderings (`rendering`):

* "raw" (base models): the text above as is; few-shot examples come first, each one the same block
  followed by its answer (" (A)" or " (B)"), separated by blank lines.
* "chat" (chat models): the question up to the options is the user turn, rendered with the
  tokenizer's chat template, and the assistant turn opens with the answer cue ("The answer is:"),
  so the option is read at the start of the assistant turn. Few-shot examples are earlier user and
  assistant turns of the same chat.

Options (`FeedbackSettings`):

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

Determinism and resume follow `cai_jax.cai.revisions`: prompts are split per process into fixed
batches of `batch_size`; each finished batch is one JSONL shard written atomically; a rerun skips
finished shards, and a `meta.json` fingerprint refuses a folder made with other inputs. A batch's
samples depend only on (seed, process index, batch index); a prompt's principles only on (seed,
the prompt's global index). `load_comparisons_dataset` reads the folder as one `datasets.Dataset`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cai_jax.cai.constitution import Constitution, FeedbackFewShot, sample_feedback_principles
from cai_jax.cai.judge import JudgeError, JudgeQuestion, LMJudge
from cai_jax.cai.prompts import Prompt
from cai_jax.jobs import Batch, ShardedJob, shard_files
from cai_jax.sampling import generate
from cai_jax.text import encode_prompt, render_chat, render_transcript, validate_messages

HEADER = "Consider the following conversation between a human and an assistant:"
ANSWER_CUE = "The answer is:"
COT_CUE = "Let's think step by step:"
OPTIONS = (" (A)", " (B)")  # scored continuations of the answer cue
RENDERINGS = ("raw", "chat")
SWAP_AVERAGES = ("logit", "prob")
RESPONSE_STOPS = ("\n\nHuman:",)  # raw policy rendering: the next human turn ends a response
_RESAMPLES = 3  # extra draws for a sampled response that comes out empty


CLAMPS = {"none": None, "20-80": (0.2, 0.8), "40-60": (0.4, 0.6)}  # config feedback.cot_clamp
LABELS = ("soft", "hard", "cot")  # config feedback.label


@dataclasses.dataclass(frozen=True)
class FeedbackSettings:
    """Knobs of the feedback stage. No defaults here: they live in the config (`configs/base.py`,
    section `feedback`), and `from_config` builds the settings from that section."""

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

    @classmethod
    def from_config(cls, f: Any, *, policy_rendering: str, **overrides: Any) -> FeedbackSettings:
        """Settings from a config's `feedback` section (label = soft | hard | cot, cot_clamp = none |
        20-80 | 40-60, num_principles = ensemble size, principle_limit = pool size, 0 = all).

        Raises:
          ValueError: naming the config field that is wrong.
        """
        if f.label not in LABELS:
            raise ValueError(f"config feedback.label={f.label!r}; expected one of {', '.join(LABELS)}")
        if f.cot_clamp not in CLAMPS:
            raise ValueError(f"config feedback.cot_clamp={f.cot_clamp!r}; expected one of {sorted(CLAMPS)}")
        cot = f.label == "cot"
        fields = dict(
            rendering=f.rendering,
            policy_rendering=policy_rendering,
            temperature=float(f.temperature),
            top_p=float(f.top_p),
            max_new_tokens=int(f.max_new_tokens),
            num_principles=int(f.principle_limit) or None,
            ensemble=int(f.num_principles),
            num_few_shots=int(f.num_few_shots),
            swap=bool(f.swap),
            swap_average=f.swap_average,
            hard=f.label == "hard",
            clamp=CLAMPS[f.cot_clamp] if cot else None,
            cot=cot,
            cot_samples=int(f.cot_samples) if cot else 1,
            cot_max_new_tokens=int(f.cot_max_new_tokens),
            cot_temperature=float(f.cot_temperature),
            cot_stop_strings=tuple(f.cot_stop_strings),
            scoring_batch_size=int(f.scoring_batch_size),
        )
        return cls(**{**fields, **overrides})

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


# ---------------------------------------------------------------- the question


def _check_rendering(rendering: str) -> None:
    if rendering not in RENDERINGS:
        raise ValueError(f"unknown rendering {rendering!r}; expected one of {', '.join(RENDERINGS)}")


def conversation_messages(conversation: str | Sequence[dict]) -> list[dict[str, str]]:
    """A prompt string or a message list ending with a non-empty user turn, as validated messages."""
    messages = validate_messages(
        [{"role": "user", "content": conversation}] if isinstance(conversation, str) else conversation
    )
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise ValueError("feedback: the conversation must end with a non-empty user turn (the responses follow it)")
    return messages


def _block(conversation, response_a: str, response_b: str, principle_text: str) -> str:
    """The question up to the options (no answer cue)."""
    for name, text in (("response_a", response_a), ("response_b", response_b), ("principle", principle_text)):
        if not isinstance(text, str) or (name == "principle" and not text.strip()):
            raise ValueError(f"feedback: {name} is {'empty' if isinstance(text, str) else 'not a string'}")
    shown = render_transcript(conversation_messages(conversation), add_generation_prompt=False).lstrip("\n")
    return (
        f"{HEADER}\n\n{shown}\n\n{principle_text.strip()}\nOptions:\n(A) {response_a.strip()}\n(B) {response_b.strip()}"
    )


def _shot_answer(shot: FeedbackFewShot, cot: bool) -> str:
    if shot.answer not in ("A", "B"):
        raise ValueError(f"feedback few-shot {shot.id!r}: answer {shot.answer!r} is not A or B")
    thought = f"{COT_CUE} {shot.reasoning.strip()}\n" if cot else ""
    return f"{thought}{ANSWER_CUE} ({shot.answer})"


def build_mc_question(
    conversation: str | Sequence[dict],
    response_a: str,
    response_b: str,
    principle_text: str,
    *,
    few_shots: Sequence[tuple[FeedbackFewShot, str]] = (),
    rendering: str = "raw",
    tokenizer: Any = None,
    cot: bool = False,
) -> str:
    """The multiple-choice question text, ending where the model answers (module docstring).

    Args:
      conversation: the prompt (one user turn) or a message list ending with a user turn.
      response_a / response_b: the candidate replies, shown as (A) and (B).
      principle_text: the feedback principle's instruction.
      few_shots: (example, principle text it is shown with) pairs, placed before the question.
      rendering: "raw" or "chat" (needs `tokenizer` with a chat template).
      cot: end with "Let's think step by step:" (and show few-shot reasoning) instead of the answer cue.

    Returns:
      The text after which " (A)" / " (B)" are scored (or the reasoning is sampled, with `cot`).
    """
    _check_rendering(rendering)
    if rendering == "chat" and tokenizer is None:
        raise ValueError("feedback: rendering='chat' needs a tokenizer")
    cue = COT_CUE if cot else ANSWER_CUE
    shots = [(_block(s.conversation, *s.options, text), _shot_answer(s, cot)) for s, text in few_shots]
    body = _block(conversation, response_a, response_b, principle_text)
    if rendering == "raw":
        return "\n\n".join([f"{q}\n{a}" for q, a in shots] + [f"{body}\n{cue}"])
    messages = [m for q, a in shots for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    return render_chat(tokenizer, messages + [{"role": "user", "content": body}], add_generation_prompt=True) + cue


def cot_answer_prefix(question: str, reasoning: str) -> str:
    """A chain-of-thought question with its sampled reasoning and the answer cue appended."""
    reasoning = reasoning.strip()
    return f"{question} {reasoning}\n{ANSWER_CUE}" if reasoning else f"{question}\n{ANSWER_CUE}"


def chat_question(tokenizer: Any, question: str, cue: str = ANSWER_CUE) -> str:
    """A raw MC question text as a chat: the text before `cue` is the user turn, `cue` opens the reply."""
    text = question.rstrip()
    body = text[: -len(cue)] if text.endswith(cue) else text
    opening = cue if text.endswith(cue) else ""
    return render_chat(tokenizer, [{"role": "user", "content": body.strip()}], add_generation_prompt=True) + opening


def score_options(lm: Any, texts: Sequence[str], options: Sequence[Sequence[str]], *, rendering: str, batch_size: int):
    """Total log-prob of each option string after each question text, by `LMJudge`: [N, num_options]."""
    _check_rendering(rendering)
    judge = LMJudge(lm, rendering=rendering, batch_size=batch_size)
    return judge.option_logprobs([JudgeQuestion(t, tuple(o)) for t, o in zip(texts, options)])


# ---------------------------------------------------------------- probabilities


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def member_probabilities(logp_a, logp_b, *, swap_logps=None, swap_average: str = "logit") -> np.ndarray:
    """Per-question P(response A preferred), any shape, before averaging (see `label_probabilities`)."""
    la, lb = np.asarray(logp_a, np.float64), np.asarray(logp_b, np.float64)
    swap = tuple(np.asarray(x, np.float64) for x in swap_logps) if swap_logps is not None else ()
    if not all(np.all(np.isfinite(a)) for a in (la, lb, *swap)):
        raise ValueError("label_probabilities: non-finite log-probs")
    if swap_average not in SWAP_AVERAGES:
        raise ValueError(f"label_probabilities: swap_average={swap_average!r}; expected logit or prob")
    log_p = la - np.logaddexp(la, lb)
    if swap:
        sa, sb = swap
        if swap_average == "logit":
            log_p = _log_sigmoid(0.5 * ((la - lb) + (sb - sa)))
        else:  # response A is option (B) in the swapped question
            log_p = np.logaddexp(log_p, sb - np.logaddexp(sa, sb)) - np.log(2.0)
    return np.exp(log_p)


def label_probabilities(
    logp_a,
    logp_b,
    *,
    swap_logps: tuple[Any, Any] | None = None,
    swap_average: str = "logit",
    clamp: tuple[float, float] | None = None,
    hard: bool = False,
) -> np.ndarray:
    """P(response A preferred) from option log-probs (paper sec. 4.1: normalised " (A)" vs " (B)").

    p = exp(l_A - logaddexp(l_A, l_B)). With `swap_logps = (s_A, s_B)`, the log-probs of " (A)" and
    " (B)" when response B was shown as (A), p is averaged with 1 - exp(s_A - logaddexp(s_A, s_B)):
    in log-odds ("logit": sigmoid(((l_A - l_B) + (s_B - s_A)) / 2), which cancels a constant bonus
    for the first position exactly) or in probability ("prob"). A trailing member axis (shape
    [N, M]: principles or CoT samples) is averaged in probability, then `clamp`, then `hard`.

    Args:
      logp_a, logp_b: [N] or [N, M] log-probs of " (A)" and " (B)".
      swap_logps: the same for the swapped order, or None.
      swap_average: "logit" or "prob".
      clamp: (lo, hi) to clip the averaged p into, or None.
      hard: round to 0 / 1 (exactly 0.5 stays 0.5).

    Returns:
      float64 [N] (or a scalar array for scalar inputs).
    """
    la, lb = np.asarray(logp_a, np.float64), np.asarray(logp_b, np.float64)
    arrays = [la, lb] + ([np.asarray(x, np.float64) for x in swap_logps] if swap_logps is not None else [])
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"label_probabilities: shapes differ: {[a.shape for a in arrays]}")
    if la.ndim > 2:
        raise ValueError(f"label_probabilities: expected [N] or [N, M] log-probs, got shape {la.shape}")
    p = member_probabilities(la, lb, swap_logps=swap_logps, swap_average=swap_average)
    if p.ndim == 2:
        p = p.mean(axis=-1)
    if clamp is not None:
        lo, hi = clamp
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"label_probabilities: clamp={clamp!r}; expected 0 <= lo < hi <= 1")
        p = np.clip(p, lo, hi)
    if hard:
        p = np.where(p > 0.5, 1.0, np.where(p < 0.5, 0.0, 0.5))
    return p


# ---------------------------------------------------------------- responses


def prompt_messages(prompt: Prompt | str) -> list[dict[str, str]]:
    """The conversation a prompt opens: its hh-rlhf `messages` if it has them, else one user turn."""
    if isinstance(prompt, str):
        return conversation_messages(prompt)
    return conversation_messages(list(prompt.meta.get("messages") or [{"role": "user", "content": prompt.text}]))


def _prompt_id(prompt: Prompt | str, i: int) -> str:
    return prompt.id if isinstance(prompt, Prompt) else f"prompt-{i}"


def _cut(text: str, stops: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stops if s in text]
    return (text[: min(cuts)] if cuts else text).strip()


def sample_pairs(policy_lm: Any, prompts: Sequence[Prompt | str], *, rng: jax.Array, settings: FeedbackSettings):
    """Two sampled responses per prompt from the policy: [(response_a, response_b)] in prompt order.

    Row 2i and 2i + 1 of one `generate` call are prompt i's two samples (so they differ by their
    per-row keys). A response that comes out empty is drawn again, up to 3 times, with fresh keys.

    Raises:
      ValueError: naming the prompt whose responses stay empty.
    """
    if not prompts:
        raise ValueError("sample_pairs: no prompts")
    tok = policy_lm.tokenizer
    ids = [encode_prompt(tok, prompt_messages(p), settings.policy_rendering) for p in prompts]
    stops = RESPONSE_STOPS if settings.policy_rendering != "chat" else ()

    def draw(rows: list[int], key) -> list[str]:
        out = generate(
            policy_lm,
            [ids[r // 2] for r in rows],
            rng=key,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            stop_strings=stops,
        )
        return [_cut(t, stops) for t in out.texts(tok)]

    texts = draw(list(range(2 * len(prompts))), rng)
    for attempt in range(1, _RESAMPLES + 1):
        empty = [r for r, t in enumerate(texts) if not t]
        if not empty:
            break
        for r, t in zip(empty, draw(empty, jax.random.fold_in(rng, attempt))):
            texts[r] = t
    for r, t in enumerate(texts):
        if not t:
            raise ValueError(
                f"sample_pairs: prompt {_prompt_id(prompts[r // 2], r // 2)!r} gave an empty response "
                f"{_RESAMPLES + 1} times (raise feedback.max_new_tokens or check the policy's stop tokens)"
            )
    return [(texts[2 * i], texts[2 * i + 1]) for i in range(len(prompts))]


# ---------------------------------------------------------------- labels


def _few_shots(constitution: Constitution, settings: FeedbackSettings) -> list[FeedbackFewShot]:
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
    shots = _few_shots(constitution, settings)
    per_member = []
    for _ in ids:
        drawn = sample_feedback_principles(constitution, len(shots), rng, k=settings.num_principles)
        per_member.append([s.principle_id or d.id for s, d in zip(shots, drawn)])
    return {"principle_ids": ids, "few_shot_principle_ids": per_member}


def _check_constitution(constitution: Constitution, settings: FeedbackSettings) -> None:
    if not constitution.feedback_principles:
        raise ValueError(
            f"feedback: the constitution {constitution.name!r} has no feedback principles "
            "(feedback_principles is empty)"
        )
    sample_feedback_principles(constitution, 0, 0, k=settings.num_principles)  # a bad k fails here
    _few_shots(constitution, settings)


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
    _check_constitution(constitution, settings)
    if settings.rendering == "chat" and judge.tokenizer is None:
        raise JudgeError(f"judge {judge.name} reads raw text only: set feedback.rendering='raw'")
    if settings.cot and not isinstance(judge, LMJudge):
        raise JudgeError(f"judge {judge.name} cannot write chain-of-thought reasoning (feedback.label='cot')")
    tok, shots = judge.tokenizer, _few_shots(constitution, settings)
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


# ---------------------------------------------------------------- the engine


def _model_id(lm: Any) -> list[str]:
    if isinstance(lm, LMJudge):
        lm = lm.lm
    elif not hasattr(lm, "config"):  # a judge that is not a model: its name says which
        return [str(getattr(lm, "name", type(lm).__name__))]
    return [str(getattr(lm, "path", None)), repr(lm.config)]


def _fingerprint_inputs(settings, seed, batch_size, constitution, prompts, policy_lm, judge) -> dict:
    """What the rows depend on: the folder's fingerprint."""
    return {
        "settings": dataclasses.asdict(settings),
        "seed": seed,
        "batch_size": batch_size,
        "policy": _model_id(policy_lm),
        "feedback_model": _model_id(judge),
        "principles": [dataclasses.asdict(p) for p in constitution.feedback_principles],
        "few_shots": [dataclasses.asdict(s) for s in _few_shots(constitution, settings)],
        "prompts": [(_prompt_id(p, i), prompt_messages(p)) for i, p in enumerate(prompts)],
    }


def _check_prompts(prompts: Sequence[Prompt | str], policy_lm: Any, settings: FeedbackSettings) -> None:
    """Empty prompts, and prompts too long to answer within the policy's context, name their id."""
    if not prompts:
        raise ValueError("feedback: the prompt list is empty")
    context = policy_lm.config.max_position_embeddings
    for i, p in enumerate(prompts):
        text = p.text if isinstance(p, Prompt) else p
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"feedback: prompt {_prompt_id(p, i)!r} is empty")
        n = len(encode_prompt(policy_lm.tokenizer, prompt_messages(p), settings.policy_rendering))
        if n + settings.max_new_tokens > context:
            raise ValueError(
                f"feedback: prompt {_prompt_id(p, i)!r} renders to {n} tokens; with max_new_tokens="
                f"{settings.max_new_tokens} it exceeds the policy's context of {context}"
            )


def feedback_batch(
    policy_lm, judge, constitution, prompts, indices, key, settings, seed, tick: Callable[[], None] = lambda: None
) -> list[dict]:
    """Samples and labels one batch: responses from `fold_in(key, 0)`, CoT from `fold_in(key, 1)`.
    `tick()` follows the sampling (the progress bar; the labelling is the batch's second step)."""
    pairs = sample_pairs(policy_lm, prompts, rng=jax.random.fold_in(key, 0), settings=settings)
    tick()
    rows = [
        {
            "prompt_id": _prompt_id(p, i),
            "index": int(i),
            "prompt": p.text if isinstance(p, Prompt) else p,
            "messages": prompt_messages(p),
            "response_a": a,
            "response_b": b,
            # A prompt's principles depend on (seed, its global index) only.
            **draw_principles(constitution, settings, np.random.default_rng([seed, int(i)])),
            "seed": seed,
        }
        for p, i, (a, b) in zip(prompts, indices, pairs)
    ]
    return label_pairs(judge, rows, constitution, settings=settings, rng=jax.random.fold_in(key, 1))


def run_feedback(
    policy_lm: Any,
    judge: Any,
    prompts: Sequence[Prompt | str],
    constitution: Constitution,
    out_dir: str | os.PathLike,
    *,
    settings: FeedbackSettings,
    seed: int,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    progress: bool = True,
) -> Path:
    """Samples response pairs and AI labels for `prompts` into `out_dir` (resumable; module doc).

    Args:
      policy_lm: the model that answers (the SL-CAI model).
      judge: what labels (`cai.judge`), or a `LoadedModel` (an `LMJudge` in the settings'
        rendering); may be the same model as `policy_lm`.
      prompts: red-team prompts (`Prompt` or plain strings), the same list on every process.
      constitution: supplies the feedback principles and few-shots.
      out_dir: output folder; rows go to `rows-p<process>-b<batch>.jsonl`.
      settings: FeedbackSettings.
      seed: seeds the responses, the principles and the reasoning samples.
      batch_size: prompts per sampling call and per shard (per process).
      process_index / process_count: this host's strided shard of the prompts (default: jax's).
      progress: a bar that ticks per step of a batch (sampling, labelling).

    Returns:
      out_dir. A `DONE-p<process>` file holding the fingerprint marks this process's shard finished.
    """
    if batch_size < 1:
        raise ValueError(f"feedback: batch_size={batch_size} must be >= 1")
    judge = as_judge(judge, settings)
    _check_constitution(constitution, settings)
    _check_prompts(prompts, policy_lm, settings)
    job = ShardedJob(
        out_dir,
        kind="comparison",
        inputs=_fingerprint_inputs(settings, seed, batch_size, constitution, prompts, policy_lm, judge),
        meta={
            "settings": dataclasses.asdict(settings),
            "seed": seed,
            "batch_size": batch_size,
            "num_prompts": len(prompts),
        },
        num_items=len(prompts),
        batch_size=batch_size,
        seed=seed,
        process_index=jax.process_index() if process_index is None else process_index,
        process_count=jax.process_count() if process_count is None else process_count,
        steps_per_item=2,
        progress=progress,
    )

    def batch_rows(batch: Batch) -> list[dict]:
        ps = [prompts[i] for i in batch.indices]
        return feedback_batch(policy_lm, judge, constitution, ps, batch.indices, batch.key, settings, seed, batch.tick)

    return job.run(batch_rows)


def comparison_files(out_dir: str | os.PathLike) -> list[str]:
    """The JSONL shards of a feedback folder, every process's, in (process, batch) order."""
    return shard_files(out_dir, "comparison")


def load_comparisons_dataset(out_dir: str | os.PathLike):
    """The comparison rows of every process as one `datasets.Dataset` (schema: `label_pairs`)."""
    import datasets

    return datasets.load_dataset("json", data_files=comparison_files(out_dir), split="train")
