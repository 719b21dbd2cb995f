"""Preference model pre-training (PMP) data: StackExchange-style questions with scored answers,
turned into answer pairs with hard labels.

Askell et al. 2021 ("A General Language Assistant as a Laboratory for Alignment", sec. 4 on
preference model pre-training) score each StackExchange answer as round(log2(1 + upvotes)), plus 1
if the asker accepted it, and -1 when the upvote count is negative; the PM is pre-trained to prefer
the higher-scored of two answers to the same question.

Typical use::

    questions = load_pmp_questions("HuggingFaceH4/stack-exchange-preferences", max_questions=100_000)
    pairs = build_pmp_pairs(questions, max_pairs_per_question=cfg.data.max_pairs_per_question)
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import itertools
import math
import numbers
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cai_jax.cai.row_files import PromptSourceError, read_jsonl, read_rows

# Answer columns, tried in order. "upvotes" is ours, "score" the StackExchange dump / API name.
UPVOTE_FIELDS = ("upvotes", "score")
# "accepted" is ours, "is_accepted" the StackExchange API name, "selected" the HF H4 layout's.
ACCEPTED_FIELDS = ("accepted", "is_accepted", "selected")
# A precomputed score (HuggingFaceH4/stack-exchange-preferences), used only without upvotes.
PM_SCORE_FIELD = "pm_score"
# Question id columns, tried in order; else "<source name>:<row>".
QID_FIELDS = ("qid", "question_id", "id")


@dataclasses.dataclass(frozen=True)
class PMPAnswer:
    """One answer.

    Attributes:
      text: the answer body, surrounding whitespace stripped.
      score: the PMP score (see `pmp_score`), or the row's pm_score when it has no upvotes.
      upvotes: the net vote count, None when the row had only a pm_score.
      accepted: whether the asker accepted it.
      answer_id: the row's "answer_id" when it has one, else "<qid>:<position>" (1-based).
    """

    text: str
    score: int
    upvotes: int | None
    accepted: bool
    answer_id: str


@dataclasses.dataclass(frozen=True)
class PMPQuestion:
    """One question with its answers.

    Attributes:
      qid: the row's qid / question_id / id, else "<source name>:<row>".
      question: the question text (the prompt a PM sees), surrounding whitespace stripped.
      answers: the answers in source order.
      source: where it came from ("shipped:pmp_sample", a path or a hub name).
      meta: "row" (the 1-based line / row number).
    """

    qid: str
    question: str
    answers: tuple[PMPAnswer, ...]
    source: str
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)


class PMPSourceError(PromptSourceError):
    """A PMP source that cannot be read; the message names the file, row and field."""


def _error(source: Any, row: int | None, field: str | None, problem: str) -> PMPSourceError:
    """The error for `source`, row and field (each left out when unknown)."""
    where = [str(source)] + ([f"row {row}"] if row is not None else []) + ([f"field {field!r}"] if field else [])
    return PMPSourceError(f"{': '.join(where)}: {problem}")


def pmp_score(upvotes: int, accepted: bool = False) -> int:
    """The PMP score of an answer (Askell et al. 2021, sec. 4, PMP data).

    Our reading of the paper: score = -1 when upvotes < 0 (whether or not accepted), else
    round(log2(1 + upvotes)) + (1 if accepted else 0). So 0 upvotes -> 0, 1 -> 1, 3 -> 2, 7 -> 3,
    and an accepted answer one more. log2(1 + n) is never exactly k + 0.5 for an integer n, so
    Python's round-half-to-even never comes into play.

    Args:
      upvotes: net votes (up minus down), any integer.
      accepted: whether the asker accepted the answer.

    Returns:
      The integer score, -1 or more.
    """
    if upvotes < 0:
        return -1
    return round(math.log2(1 + upvotes)) + int(bool(accepted))


def _text(source: str, row_no: int, field: str, value: Any) -> str:
    """A non-empty string field, stripped."""
    if not isinstance(value, str):
        raise _error(source, row_no, field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise _error(source, row_no, field, "empty")
    return value.strip()


def _integer(source: str, row_no: int, field: str, value: Any) -> int:
    """An integer field; integral floats (3.0, as pandas writes them) are accepted."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, float)):
        raise _error(source, row_no, field, f"expected an integer, got {type(value).__name__}")
    if isinstance(value, float) and not value.is_integer():
        raise _error(source, row_no, field, f"expected an integer, got {value}")
    return int(value)


def _accepted(source: str, row_no: int, field: str, value: Any) -> bool:
    """A bool field; 0/1 and null (not accepted) are accepted too."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise _error(source, row_no, field, f"expected a bool, got {value!r}")


def _to_answer(source: str, row_no: int, pos: int, qid: str, answer: Any) -> PMPAnswer:
    """One validated answer; `pos` is its 0-based position in the row's answers."""
    where = f"answers[{pos}]"
    if not isinstance(answer, Mapping):
        raise _error(source, row_no, where, f"expected an object, got {type(answer).__name__}")
    if "text" not in answer:
        raise _error(source, row_no, f"{where}.text", "missing")
    text = _text(source, row_no, f"{where}.text", answer["text"])
    acc_field = next((f for f in ACCEPTED_FIELDS if f in answer), None)
    accepted = _accepted(source, row_no, f"{where}.{acc_field}", answer[acc_field]) if acc_field else False
    # Upvotes win over a precomputed pm_score: the score is then ours, not the dataset's.
    up_field = next((f for f in UPVOTE_FIELDS if answer.get(f) is not None), None)
    if up_field is not None:
        upvotes = _integer(source, row_no, f"{where}.{up_field}", answer[up_field])
        score = pmp_score(upvotes, accepted)
    elif answer.get(PM_SCORE_FIELD) is not None:
        upvotes = None
        score = _integer(source, row_no, f"{where}.{PM_SCORE_FIELD}", answer[PM_SCORE_FIELD])
    else:
        fields = ", ".join(UPVOTE_FIELDS + (PM_SCORE_FIELD,))
        raise _error(source, row_no, f"{where}.upvotes", f"missing (need one of {fields})")
    aid = answer.get("answer_id")
    aid = str(aid) if isinstance(aid, (str, int)) and not isinstance(aid, bool) else f"{qid}:{pos + 1}"
    return PMPAnswer(text=text, score=score, upvotes=upvotes, accepted=accepted, answer_id=aid)


def _to_questions(
    source: str, rows: Iterable[tuple[int, Any]], source_label: str, max_questions: int | None
) -> list[PMPQuestion]:
    """Questions from (row number, row) pairs, checking every field."""
    out = []
    stem = Path(source).name if Path(source).exists() else source
    for row_no, row in itertools.islice(rows, max_questions):
        if not isinstance(row, Mapping):
            raise _error(source, row_no, None, f"expected an object, got {type(row).__name__}")
        for field in ("question", "answers"):
            if field not in row:
                raise _error(source, row_no, field, "missing")
        question = _text(source, row_no, "question", row["question"])
        qid_field = next((f for f in QID_FIELDS if isinstance(row.get(f), (str, int))), None)
        qid = str(row[qid_field]) if qid_field else f"{stem}:{row_no}"
        answers = row["answers"]
        if not isinstance(answers, Sequence) or isinstance(answers, str):
            raise _error(source, row_no, "answers", f"expected a list, got {type(answers).__name__}")
        parsed = tuple(_to_answer(source, row_no, i, qid, a) for i, a in enumerate(answers))
        out.append(PMPQuestion(qid=qid, question=question, answers=parsed, source=source_label, meta={"row": row_no}))
    if not out:
        raise _error(source, None, None, "empty: no questions")
    return out


def shipped_pmp_sample() -> list[PMPQuestion]:
    """The small sample written for this project (package data), in the raw upvotes layout.

    Twelve everyday questions with two to five answers each, votes and acceptances invented to
    cover every score rule (negative votes, zero, accepted); for tests and smoke runs, not training.
    """
    resource = importlib.resources.files("cai_jax.cai") / "data" / "pmp_sample.jsonl"
    with importlib.resources.as_file(resource) as path:
        return _to_questions(str(path), read_jsonl(path), "shipped:pmp_sample", None)


def load_pmp_questions(
    source: str | os.PathLike, *, split: str | None = None, max_questions: int | None = None
) -> list[PMPQuestion]:
    """Loads StackExchange-style questions from the shipped sample, a file, a folder or the hub.

    Sources, as in `cai_jax.cai.prompts.load_prompts`: "shipped" (the project sample); a .jsonl(.gz)
    or .json(.gz) file; a .parquet, .arrow or .csv file, a `save_to_disk` folder or a data-files
    folder (read with `datasets`); an "org/name" hub dataset such as
    HuggingFaceH4/stack-exchange-preferences, from the local cache only unless HF_HUB_OFFLINE=0.

    Row layout: {"qid"?, "question": str, "answers": [answer, ...]}, the id also read from
    "question_id" or "id". Each answer has "text" and either votes in "upvotes" or "score" (the
    score is then computed with `pmp_score`) or, failing both, a precomputed "pm_score" (the H4
    layout's, used as is: it already includes the acceptance bonus). Acceptance is read from
    "accepted", "is_accepted" or "selected" (H4), the first present; absent or null is False.
    Other columns ("date", "metadata", "author", ...) are ignored.

    Args:
      source: see above.
      split: the `datasets` split ("train" for single files when not given).
      max_questions: stop after this many rows (the H4 set has millions), None for all.

    Returns:
      The questions in source order.

    Raises:
      PMPSourceError: naming the file, the 1-based row (line number for .jsonl) and the field
        (e.g. "answers[2].upvotes"), for a missing or mistyped field, an invalid JSON line or an
        empty source.
    """
    name = str(source)
    if name in ("shipped", "shipped:pmp_sample"):
        return shipped_pmp_sample()
    if name.endswith((".txt", ".txt.gz")):
        raise _error(name, None, None, "a text file has no answers; expected .jsonl, .json or a datasets source")
    try:
        rows = read_rows(name, split)
        return _to_questions(name, rows, name, max_questions)
    except PMPSourceError:
        raise
    except PromptSourceError as e:  # raised by the shared readers: same message, our type
        raise PMPSourceError(str(e)) from None


def _pair_rng(seed: int, qid: str) -> random.Random:
    """A per-question generator: a question's pairs depend only on it and the seed, not on order."""
    return random.Random(f"{seed}\x00{qid}")  # str seeds are hashed with sha512, stable across runs


def build_pmp_pairs(
    questions: Iterable[PMPQuestion],
    *,
    max_pairs_per_question: int | None = None,
    seed: int = 0,
    min_score_gap: int = 1,
) -> list[dict[str, Any]]:
    """Pairs of answers to the same question with different scores, hard-labelled.

    Every pair (i < j) of a question's answers whose scores differ by at least `min_score_gap` is a
    candidate, so there are never ties; with a cap, a seeded sample of them is kept (in candidate
    order), so a question with many answers does not dominate the data. Which side holds the
    better answer is a seeded coin flip per pair, so p is 1 about half the time and a PM cannot
    learn a position bias.

    Args:
      questions: loaded questions.
      max_pairs_per_question: most pairs kept per question, None for all.
      seed: pair sampling and side seed; each question's draws depend only on the seed and its qid.
      min_score_gap: smallest score difference for a pair, at least 1.

    Returns:
      One dict per pair, questions in input order: "prompt" (the question), "response_a",
      "response_b", "p" (1.0 when a has the higher score, else 0.0), "score_a", "score_b", "qid".
    """
    if min_score_gap < 1:
        raise ValueError(f"min_score_gap must be at least 1 (0 would allow ties), got {min_score_gap}")
    if max_pairs_per_question is not None and max_pairs_per_question < 1:
        raise ValueError(f"max_pairs_per_question must be at least 1 or None, got {max_pairs_per_question}")
    pairs = []
    for q in questions:
        rng = _pair_rng(seed, q.qid)
        candidates = [
            (a, b) for a, b in itertools.combinations(q.answers, 2) if abs(a.score - b.score) >= min_score_gap
        ]
        if max_pairs_per_question is not None and len(candidates) > max_pairs_per_question:
            keep = sorted(rng.sample(range(len(candidates)), max_pairs_per_question))
            candidates = [candidates[i] for i in keep]
        for x, y in candidates:
            better, worse = (x, y) if x.score > y.score else (y, x)
            a, b = (better, worse) if rng.random() < 0.5 else (worse, better)
            pairs.append(
                {
                    "prompt": q.question,
                    "response_a": a.text,
                    "response_b": b.text,
                    "p": 1.0 if a.score > b.score else 0.0,
                    "score_a": a.score,
                    "score_b": b.score,
                    "qid": q.qid,
                }
            )
    return pairs
