"""Multiple-choice evals in the CAI paper's released file format (438 HHH, harmful-vs-ethical, harm
classification; Bai et al. 2022, sec. 4.4 and fig. 4, 9).

Each file is JSONL, one question per line::

    {"prompt": "...Options:\\n (A) ...\\n (B) ...\\nThe answer is:",
     "corrects": [" (B)"], "incorrects": [" (A)"],
     "text_correct": ..., "text_incorrect": ...}          # optional (438 HHH only)

The model is the feedback labeller used as an evaluator: the log-prob of every option string after
the prompt is read with the same machinery (`cai_jax.cai.feedback.score_options`) and normalised
over the question's options. In "raw" rendering the prompt is fed as is; in "chat" rendering the
text before the trailing "The answer is:" is the user turn and the cue opens the assistant turn.

Metrics: accuracy (the most likely option is a correct one), mean log-loss (-log of the normalised
probability of the correct options) and top-label calibration: questions are binned by the
probability of their most likely option into equal-width bins over [0, 1], and

    ECE = sum_bins (count_b / N) * |mean confidence_b - accuracy_b|.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cai_jax.cai import feedback

__all__ = ["MCQuestion", "MCEvalError", "calibration", "evaluate_mc", "load_mc_eval", "mc_report"]


class MCEvalError(ValueError):
    """A multiple-choice eval file or row that cannot be read; names the file, line and field."""


@dataclasses.dataclass(frozen=True)
class MCQuestion:
    """One question: the prompt ends where the answer goes; options are " (A)"-style strings."""

    id: str  # "<file stem>:<line>"
    prompt: str
    corrects: tuple[str, ...]
    incorrects: tuple[str, ...]
    source: str = ""  # the file it came from
    extras: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)

    @property
    def options(self) -> tuple[str, ...]:
        """All options, sorted (so " (A)" comes first whichever options are correct)."""
        return tuple(sorted(self.corrects + self.incorrects))


def _fail(path: Path, line: int, field: str | None, problem: str) -> MCEvalError:
    where = f"{path}: line {line}" + (f", field {field!r}" if field else "")
    return MCEvalError(f"{where}: {problem}")


def _options(path: Path, line: int, row: dict, field: str) -> tuple[str, ...]:
    value = row.get(field)
    if not isinstance(value, list) or not value or not all(isinstance(x, str) and x.strip() for x in value):
        raise _fail(path, line, field, f"expected a non-empty list of non-empty strings, got {value!r}")
    if len(set(value)) != len(value):
        raise _fail(path, line, field, f"repeats an option: {value!r}")
    return tuple(value)


def load_mc_eval(path: str | os.PathLike) -> list[MCQuestion]:
    """Reads a multiple-choice eval JSONL file (format in the module docstring).

    Returns:
      The questions in file order; blank lines are skipped.

    Raises:
      MCEvalError: naming the file, line and field of the first bad row (invalid JSON, a missing or
        empty prompt, empty or repeated options, an option both correct and incorrect).
    """
    p = Path(path)
    if not p.is_file():
        raise MCEvalError(f"{p}: no such file")
    out = []
    with open(p, encoding="utf-8") as f:
        for line, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise _fail(p, line, None, f"invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise _fail(p, line, None, f"expected a JSON object, got {type(row).__name__}")
            prompt = row.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise _fail(p, line, "prompt", f"expected a non-empty string, got {prompt!r}")
            corrects, incorrects = _options(p, line, row, "corrects"), _options(p, line, row, "incorrects")
            both = sorted(set(corrects) & set(incorrects))
            if both:
                raise _fail(p, line, "incorrects", f"options {both!r} are also listed as correct")
            extras = {k: v for k, v in row.items() if k not in ("prompt", "corrects", "incorrects")}
            out.append(MCQuestion(f"{p.name.split('.')[0]}:{line}", prompt, corrects, incorrects, str(p), extras))
    if not out:
        raise MCEvalError(f"{p}: no questions")
    return out


def calibration(confidence, correct, n_bins: int = 10) -> dict:
    """Top-label reliability bins and ECE over [0, 1].

    Args:
      confidence: [N] probability of each question's chosen option.
      correct: [N] 1 where the chosen option is correct, else 0.
      n_bins: K equal-width bins; the last one is closed.

    Returns:
      {"ece": float, "bins": {"edges" [K+1], "count" [K], "mean_confidence" [K], "accuracy" [K]}}
      (means NaN in empty bins).
    """
    conf, hit = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    if conf.ndim != 1 or conf.shape != hit.shape or conf.size == 0:
        raise ValueError(f"calibration: confidence {conf.shape} and correct {hit.shape} must be one non-empty [N]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.floor(conf * n_bins).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    sum_hit = np.bincount(idx, weights=hit, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, sum_conf / count, np.nan)
        acc = np.where(count > 0, sum_hit / count, np.nan)
    ece = float(np.sum(np.abs(sum_conf - sum_hit)) / conf.size)
    return {"ece": ece, "bins": {"edges": edges, "count": count, "mean_confidence": mean_conf, "accuracy": acc}}


def _question_text(lm: Any, q: MCQuestion, rendering: str) -> str:
    return q.prompt if rendering == "raw" else feedback.chat_question(lm.tokenizer, q.prompt)


def _summary(rows: list[dict], n_bins: int) -> dict:
    cal = calibration([r["confidence"] for r in rows], [r["correct"] for r in rows], n_bins)
    return {
        "n": len(rows),
        "accuracy": float(np.mean([r["correct"] for r in rows])),
        "log_loss": float(np.mean([r["log_loss"] for r in rows])),
        "mean_p_correct": float(np.mean([r["p_correct"] for r in rows])),
        **cal,
    }


def evaluate_mc(
    lm: Any, questions: Sequence[MCQuestion], *, rendering: str = "raw", batch_size: int = 16, n_bins: int = 10
) -> dict:
    """Accuracy, log-loss and calibration of `lm` on multiple-choice questions.

    Args:
      lm: a `LoadedModel` (the feedback model under evaluation).
      questions: from `load_mc_eval` (one file or several).
      rendering: "raw" (the prompt as is) or "chat" (module docstring).
      batch_size: option sequences per device call.
      n_bins: reliability bins.

    Returns:
      {"n", "accuracy", "log_loss", "mean_p_correct", "ece", "bins" (see `calibration`),
       "by_source": {file: the same summary}, "questions": [{"id", "probs" {option: p}, "chosen",
       "correct", "confidence", "p_correct", "log_loss"}]}.
    """
    feedback._check_rendering(rendering)
    if not questions:
        raise ValueError("evaluate_mc: no questions")
    # option_logprobs needs one option count per call: group the questions by it.
    groups: dict[int, list[int]] = {}
    for i, q in enumerate(questions):
        groups.setdefault(len(q.options), []).append(i)
    logps: list[np.ndarray] = [None] * len(questions)  # type: ignore[list-item]
    for idx in groups.values():
        texts = [_question_text(lm, questions[i], rendering) for i in idx]
        scores = feedback.score_options(
            lm, texts, [questions[i].options for i in idx], rendering=rendering, batch_size=batch_size
        )
        for i, row in zip(idx, np.asarray(scores, np.float64)):
            logps[i] = row
    rows = []
    for q, lp in zip(questions, logps):
        log_probs = lp - np.logaddexp.reduce(lp)
        is_correct = np.array([o in q.corrects for o in q.options])
        best = int(np.argmax(log_probs))
        log_p_correct = float(np.logaddexp.reduce(log_probs[is_correct]))
        rows.append(
            {
                "id": q.id,
                "source": q.source,
                "probs": {o: float(np.exp(x)) for o, x in zip(q.options, log_probs)},
                "chosen": q.options[best],
                "correct": bool(is_correct[best]),
                "confidence": float(np.exp(log_probs[best])),
                "p_correct": float(np.exp(log_p_correct)),
                "log_loss": -log_p_correct,
            }
        )
    out = _summary(rows, n_bins)
    sources = sorted({r["source"] for r in rows})
    out["by_source"] = {s: _summary([r for r in rows if r["source"] == s], n_bins) for s in sources}
    out["questions"] = rows
    return out


def mc_report(result: dict) -> str:
    """A markdown table of `evaluate_mc` output: one row per source file, then the total."""
    lines = ["| eval | N | accuracy | log-loss | ECE |", "|---|---:|---:|---:|---:|"]
    items = [(Path(s).name, m) for s, m in result["by_source"].items()] + [("all", result)]
    for name, m in items:
        lines.append(f"| {name} | {m['n']} | {m['accuracy']:.3f} | {m['log_loss']:.4f} | {m['ece']:.4f} |")
    return "\n".join(lines)
