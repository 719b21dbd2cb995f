"""Judges: what answers a multiple-choice question with the log-probs of its options.

The feedback labeller (`cai.feedback`), the Elo comparisons of the eval stage and the
multiple-choice evals (`eval.mc`) all ask a judge the same thing: for each question, the
log-probability of each option string (" (A)", " (B)", ...) as the continuation of the question
(paper sec. 4.1). Two kinds of judge answer it:

* `LMJudge` (the default): a loaded language model, teacher-forced. The question is tokenised
  once and each option is read as the continuation of that exact token prefix: the question and
  the option are encoded together and the option's tokens are what follows the question's, so a
  tokenizer that spells a leading space differently at the start of a string (SentencePiece's
  "▁") gets the same ids it would see in running text.
* `CallableJudge`: any Python callable, named in a config as `feedback_model.name =
  "python:<module>:<callable>"`. Researchers use it for rule-based principles; the tests use it
  for a judge whose preference is known.
* `HTTPJudge` (`cai_jax.cai.judge_http`): an OpenAI-compatible completions server (vLLM, ...)
  named as `feedback_model.name = "http://host:port"`, read through prompt log-probs with `echo`.

`cai_jax.cai.judge_loading.load_judge(name, ...)` picks the kind from the name.

The callable contract (`CallableJudge`):

    def judge(questions: list[JudgeQuestion]) -> array-like [len(questions), num_options]

returns, per question, one number per option in `question.options` order: log-probabilities, or
any log-scores (the labeller normalises them over the options with a softmax, so only their
differences matter). Every question of one call has the same number of options. Values must be
finite. A `JudgeQuestion` carries the rendered `text` (what a language model would read), the
`options`, and for feedback and Elo questions the structured parts: the `conversation` judged,
the `responses` in the order they are shown as options, and the `principle` asked, so a rule
need not parse the text. The callable is called from one process at a time, on batches of the
labeller's size; it must be deterministic for runs to resume identically.

Only `LMJudge` can sample (chain-of-thought labels need reasoning text); a judge without a
tokenizer reads the raw-text rendering of the question (`rendering="raw"`).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "CallableJudge",
    "Judge",
    "JudgeError",
    "JudgeQuestion",
    "LMJudge",
    "PYTHON_PREFIX",
    "load_callable",
    "option_token_ids",
]

PYTHON_PREFIX = "python:"


class JudgeError(ValueError):
    """A judge that cannot be built or that answered wrongly; the message names it."""


@dataclasses.dataclass(frozen=True)
class JudgeQuestion:
    """One multiple-choice question put to a judge.

    text: the rendered question, ending where the answer starts ("... The answer is:").
    options: the continuations whose log-probs are read, e.g. (" (A)", " (B)").
    conversation: the conversation the responses answer, as {"role", "content"} messages
      (feedback and Elo questions; empty for the paper's MC files).
    responses: the response shown as each option, in option order (same length as `options`,
      or empty).
    principle: the principle the question asks about ("" when there is none).
    """

    text: str
    options: tuple[str, ...]
    conversation: tuple[dict, ...] = ()
    responses: tuple[str, ...] = ()
    principle: str = ""


@runtime_checkable
class Judge(Protocol):
    """What the labeller and the evals need of a judge."""

    name: str
    tokenizer: Any  # renders "chat" questions; None for judges that read raw text only

    def option_logprobs(self, questions: Sequence[JudgeQuestion]) -> np.ndarray:
        """float64 [N, K] log-scores of each question's K options."""
        ...


def _adds_bos(tokenizer: Any) -> bool:
    from cai_jax.text.tokenizer import adds_bos as adds

    return adds(tokenizer)


def option_token_ids(
    tokenizer: Any, text: str, options: Sequence[str], *, bos: bool
) -> tuple[list[int], list[list[int]]]:
    """The token ids of a question and of each option read as its continuation.

    Each option is encoded together with the question and its ids are what follows the longest
    prefix shared by the question's ids and every joint encoding, so the result is exactly the
    tokenisation of `text + option` whatever the tokenizer does at string starts. With `bos`, the
    tokenizer's BOS id comes first (raw text for tokenizers that add it to plain text).

    Returns:
      (prefix ids, [option ids]): prefix + option_k is the encoding of `text + options[k]`.

    Raises:
      JudgeError: an option that adds no token after the question.
    """
    from cai_jax.text import encode

    head = [int(tokenizer.bos_token_id)] if bos else []
    question = head + encode(tokenizer, text)
    joint = [head + encode(tokenizer, text + option) for option in options]
    k = len(question)
    for ids in joint:
        n = 0
        while n < min(k, len(ids)) and ids[n] == question[n]:
            n += 1
        k = n
    tails = [ids[k:] for ids in joint]
    for option, tail in zip(options, tails):
        if not tail:
            raise JudgeError(f"option {option!r} adds no token after the question")
    return question[:k], tails


class LMJudge:
    """A loaded language model as judge: teacher-forced option log-probs (module docstring).

    Args:
      lm: a `LoadedModel`.
      rendering: "raw" (BOS first where the tokenizer adds it to plain text) or "chat" (the
        question text is already a rendered chat, its special tokens included).
      batch_size: questions per device call (all of a question's options go in the same call).
      name: how errors and reports name the judge.
    """

    def __init__(self, lm: Any, *, rendering: str = "raw", batch_size: int = 16, name: str | None = None):
        self.lm, self.rendering, self.batch_size = lm, rendering, int(batch_size)
        self.tokenizer = lm.tokenizer
        self.name = name or str(getattr(lm, "path", None) or "language model")

    @property
    def config(self) -> Any:
        return self.lm.config

    def encode(self, text: str) -> list[int]:
        """Token ids of a question (BOS as in `option_token_ids`)."""
        from cai_jax.text import encode

        bos = self.rendering == "raw" and _adds_bos(self.tokenizer)
        return ([int(self.tokenizer.bos_token_id)] if bos else []) + encode(self.tokenizer, text)

    def question_ids(self, question: JudgeQuestion) -> tuple[list[int], list[list[int]]]:
        """(prefix ids, [option ids]) as this judge scores them (`option_token_ids`, BOS as `encode`)."""
        bos = self.rendering == "raw" and _adds_bos(self.tokenizer)
        return option_token_ids(self.tokenizer, question.text, question.options, bos=bos)

    def option_logprobs(self, questions: Sequence[JudgeQuestion]) -> np.ndarray:
        """float64 [N, K]: each question prefilled once, its options read from its KV cache."""
        from cai_jax.scoring import option_logprobs

        if not questions:
            return np.zeros((0, 0), np.float64)
        _num_options(questions, self.name)
        ids = [self.question_ids(q) for q in questions]
        scores = option_logprobs(self.lm, [p for p, _ in ids], [o for _, o in ids], batch_size=self.batch_size)
        return scores.astype(np.float64)


class CallableJudge:
    """A Python callable as judge (the contract is in the module docstring)."""

    tokenizer = None

    def __init__(self, fn: Callable[[list[JudgeQuestion]], Any], name: str):
        self.fn, self.name = fn, name

    def option_logprobs(self, questions: Sequence[JudgeQuestion]) -> np.ndarray:
        if not questions:
            return np.zeros((0, 0), np.float64)
        k = _num_options(questions, self.name)
        try:
            out = np.asarray(self.fn(list(questions)), np.float64)
        except (TypeError, ValueError) as e:
            raise JudgeError(f"judge {self.name}: {type(e).__name__}: {e}") from e
        if out.shape != (len(questions), k):
            raise JudgeError(
                f"judge {self.name}: returned shape {out.shape} for {len(questions)} questions of {k} options "
                f"(expected [{len(questions)}, {k}])"
            )
        if not np.all(np.isfinite(out)):
            bad = int(np.argwhere(~np.isfinite(out))[0][0])
            raise JudgeError(f"judge {self.name}: non-finite option scores {out[bad].tolist()} for question {bad}")
        return out


def _num_options(questions: Sequence[JudgeQuestion], name: str) -> int:
    counts = {len(q.options) for q in questions}
    if len(counts) != 1:
        raise JudgeError(f"judge {name}: one call's questions have different numbers of options {sorted(counts)}")
    (k,) = counts
    if k < 2:
        raise JudgeError(f"judge {name}: a question needs at least two options, got {k}")
    return k


def load_callable(spec: str) -> CallableJudge:
    """`python:<module>:<callable>` (module importable from the working directory) -> a judge.

    Raises:
      JudgeError: a malformed spec, a module that does not import, or a name that is not callable.
    """
    if not spec.startswith(PYTHON_PREFIX):
        raise JudgeError(f"judge {spec!r}: expected python:<module>:<callable>")
    module_name, sep, attr = spec[len(PYTHON_PREFIX) :].rpartition(":")
    if not sep or not module_name or not attr:
        raise JudgeError(f"judge {spec!r}: expected python:<module>:<callable>")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise JudgeError(f"judge {spec!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise JudgeError(f"judge {spec!r}: {module_name}.{attr} is not a callable")
    return CallableJudge(fn, spec)
