"""The feedback question: the multiple-choice text a judge answers (paper sec. 4.1).

For two responses to a conversation and a feedback principle, the judge reads

    Consider the following conversation between a human and an assistant:

    Human: {prompt}

    {feedback principle}
    Options:
    (A) {response A}
    (B) {response B}
    The answer is:

and the teacher-forced log-probs of " (A)" and " (B)" (`OPTIONS`) after it are the label's raw
material (`cai_jax.cai.feedback_probs`).

Renderings (`rendering`):

* "raw" (base models): the text above as is; few-shot examples come first, each one the same block
  followed by its answer (" (A)" or " (B)"), separated by blank lines.
* "chat" (chat models): the question up to the options is the user turn, rendered with the
  tokenizer's chat template, and the assistant turn opens with the answer cue ("The answer is:"),
  so the option is read at the start of the assistant turn. Few-shot examples are earlier user and
  assistant turns of the same chat.

With chain of thought the question ends with "Let's think step by step:" instead, and
`cot_answer_prefix` appends the sampled reasoning and the answer cue.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cai_jax.cai.constitution import FeedbackFewShot
from cai_jax.text import render_chat, render_transcript, validate_messages

__all__ = [
    "ANSWER_CUE",
    "COT_CUE",
    "HEADER",
    "OPTIONS",
    "RENDERINGS",
    "build_mc_question",
    "chat_question",
    "conversation_messages",
    "cot_answer_prefix",
]

HEADER = "Consider the following conversation between a human and an assistant:"
ANSWER_CUE = "The answer is:"
COT_CUE = "Let's think step by step:"
OPTIONS = (" (A)", " (B)")  # scored continuations of the answer cue
RENDERINGS = ("raw", "chat")


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
