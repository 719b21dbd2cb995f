"""Multiple-choice evals in the CAI paper's released file format (438 HHH, harmful-vs-ethical, harm
classification; Bai et al. 2022, sec. 4.4 and fig. 4, 9).

Each file is JSONL, one question per line::

    {"prompt": "...Options:\\n (A) ...\\n (B) ...\\nThe answer is:",
     "corrects": [" (B)"], "incorrects": [" (A)"],
     "text_correct": ..., "text_incorrect": ...}          # optional (438 HHH only)

The evaluated model is a judge (`cai_jax.cai.judge`: the feedback labeller's in-process LM, a
callable, or an HTTP server), asked for the log-prob of every option string after the prompt;
they are normalised over the question's options. In "raw" rendering the prompt is fed as is; in
"chat" rendering the text before the trailing "The answer is:" is the user turn and the cue opens
the assistant turn (the judge needs a tokenizer for that).

Metrics: accuracy (the most likely option is a correct one), mean log-loss (-log of the normalised
probability of the correct options) and top-label calibration: questions are binned by the
probability of their most likely option into equal-width bins over [0, 1], and

    ECE = sum_bins (count_b / N) * |mean confidence_b - accuracy_b|.

Swap-debiased variant (`debias=True`): every two-option question is also asked with its two
option texts exchanged in the prompt (`swap_options`: the "\n (A) ..." and "\n (B) ..." lines),
and the log-odds of the first text are averaged over the two orders,

    d = ((l_A - l_B) - (s_A - s_B)) / 2,   P(first text) = sigmoid(d),

with l the option log-probs of the original prompt and s those of the swapped one, as the
feedback labeller's `swap_average="logit"`: a constant bonus for the first position cancels
exactly. Questions with more options keep their plain probabilities in the debiased summary. The
judge's position bias on the two-option questions, mean P((A) | original) + P((A) | swapped) - 1,
comes with it (normal 95 % interval over questions).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cai_jax.cai import feedback_question
from cai_jax.cai.judge import Judge, JudgeQuestion, LMJudge
from cai_jax.eval.judge_report import mean_interval

__all__ = ["MCQuestion", "MCEvalError", "calibration", "evaluate_mc", "load_mc_eval", "mc_report", "swap_options"]


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


def swap_options(q: MCQuestion) -> MCQuestion:
    """A two-option question with its option texts exchanged in the prompt (module docstring).

    The options are the prompt's last "\n (A) " and "\n (B) " lines; option (B)'s text ends
    where the whitespace before the trailing answer cue (or the prompt's end) begins. The
    correct letter is exchanged with them.

    Raises:
      MCEvalError: naming the question when it has other options or its prompt lacks the lines.
    """
    if q.options != (" (A)", " (B)"):
        raise MCEvalError(f"{q.id}: only questions with options ' (A)' and ' (B)' can be swapped, not {q.options!r}")
    text, tag_a, tag_b = q.prompt, "\n (A) ", "\n (B) "
    b = text.rfind(tag_b)
    a = text.rfind(tag_a, 0, max(b, 0))
    if a < 0 or b < 0:
        raise MCEvalError(f"{q.id}: the prompt has no '\\n (A) ' and '\\n (B) ' option lines to swap")
    cue = text.rfind(feedback_question.ANSWER_CUE)
    end = cue if cue > b else len(text)
    text_a = text[a + len(tag_a) : b]
    text_b = text[b + len(tag_b) : end].rstrip()
    tail = text[b + len(tag_b) + len(text_b) :]
    swapped = text[:a] + tag_a + text_b + tag_b + text_a + tail
    flip = {" (A)": " (B)", " (B)": " (A)"}
    return dataclasses.replace(
        q, prompt=swapped, corrects=tuple(flip[o] for o in q.corrects), incorrects=tuple(flip[o] for o in q.incorrects)
    )


def _question_text(judge: Judge, q: MCQuestion, rendering: str) -> str:
    if rendering == "raw":
        return q.prompt
    if judge.tokenizer is None:
        raise ValueError(f"evaluate_mc: rendering='chat' needs a judge with a tokenizer; judge {judge.name} has none")
    return feedback_question.chat_question(judge.tokenizer, q.prompt)


def _summary(rows: list[dict], n_bins: int) -> dict:
    cal = calibration([r["confidence"] for r in rows], [r["correct"] for r in rows], n_bins)
    return {
        "n": len(rows),
        "accuracy": float(np.mean([r["correct"] for r in rows])),
        "log_loss": float(np.mean([r["log_loss"] for r in rows])),
        "mean_p_correct": float(np.mean([r["p_correct"] for r in rows])),
        **cal,
    }


def _scored(q: MCQuestion, log_probs: np.ndarray) -> dict:
    """One question's metrics from its normalised option log-probs (in `q.options` order)."""
    is_correct = np.array([o in q.corrects for o in q.options])
    best = int(np.argmax(log_probs))
    log_p_correct = float(np.logaddexp.reduce(log_probs[is_correct]))
    return {
        "probs": {o: float(np.exp(x)) for o, x in zip(q.options, log_probs)},
        "chosen": q.options[best],
        "correct": bool(is_correct[best]),
        "confidence": float(np.exp(log_probs[best])),
        "p_correct": float(np.exp(log_p_correct)),
        "log_loss": -log_p_correct,
    }


def _option_logprobs(judge: Judge, questions: Sequence[MCQuestion], rendering: str) -> list[np.ndarray]:
    """Raw option log-probs per question, asked in one judge call per option count."""
    groups: dict[int, list[int]] = {}
    for i, q in enumerate(questions):
        groups.setdefault(len(q.options), []).append(i)
    out: list[np.ndarray] = [None] * len(questions)  # type: ignore[list-item]
    for idx in groups.values():
        asked = [JudgeQuestion(_question_text(judge, questions[i], rendering), questions[i].options) for i in idx]
        for i, row in zip(idx, np.asarray(judge.option_logprobs(asked), np.float64)):
            out[i] = row
    return out


def evaluate_mc(
    judge: Any,
    questions: Sequence[MCQuestion],
    *,
    rendering: str = "raw",
    batch_size: int = 16,
    n_bins: int = 10,
    debias: bool = False,
) -> dict:
    """Accuracy, log-loss and calibration of a judge on multiple-choice questions.

    Args:
      judge: a `Judge` (`LMJudge`, `CallableJudge`, `HTTPJudge`), or a `LoadedModel`, which is
        wrapped in `LMJudge(lm, rendering=rendering, batch_size=batch_size)`.
      questions: from `load_mc_eval` (one file or several).
      rendering: "raw" (the prompt as is) or "chat" (module docstring).
      batch_size: questions per device call (a `LoadedModel` only).
      n_bins: reliability bins.
      debias: also ask the two-option questions with their options swapped (module docstring).

    Returns:
      {"n", "accuracy", "log_loss", "mean_p_correct", "ece", "bins" (see `calibration`),
       "by_source": {file: the same summary}, "questions": [{"id", "source", "probs" {option: p},
       "chosen", "correct", "confidence", "p_correct", "log_loss"}]}; with `debias` also
       "debiased" (the same summary, with "by_source"), "position_bias" {"mean", "lo", "hi", "n"}
       and per question "debiased" (its metrics) and "p_first_swapped" (two-option questions).
    """
    feedback_question._check_rendering(rendering)
    if not questions:
        raise ValueError("evaluate_mc: no questions")
    if not isinstance(judge, Judge):
        judge = LMJudge(judge, rendering=rendering, batch_size=batch_size)
    elif getattr(judge, "rendering", rendering) != rendering:
        raise ValueError(f"evaluate_mc: rendering={rendering!r} but judge {judge.name} renders {judge.rendering!r}")
    logps = _option_logprobs(judge, questions, rendering)
    binary = [i for i, q in enumerate(questions) if q.options == (" (A)", " (B)")] if debias else []
    swapped = _option_logprobs(judge, [swap_options(questions[i]) for i in binary], rendering) if binary else []
    rows, bias = [], []
    for q, lp in zip(questions, logps):
        rows.append({"id": q.id, "source": q.source, **_scored(q, lp - np.logaddexp.reduce(lp))})
    if debias:
        for r in rows:
            r["debiased"] = {k: v for k, v in r.items() if k not in ("id", "source")}
        for i, s in zip(binary, swapped):
            d = 0.5 * ((logps[i][0] - logps[i][1]) - (s[0] - s[1]))
            rows[i]["debiased"] = _scored(questions[i], -np.logaddexp(0.0, np.array([-d, d])))
            rows[i]["p_first_swapped"] = float(np.exp(s[0] - np.logaddexp(s[0], s[1])))
            bias.append(rows[i]["probs"][" (A)"] + rows[i]["p_first_swapped"] - 1.0)
    out = _summary(rows, n_bins)
    sources = sorted({r["source"] for r in rows})
    out["by_source"] = {s: _summary([r for r in rows if r["source"] == s], n_bins) for s in sources}
    if debias:
        deb = [{**r["debiased"], "source": r["source"]} for r in rows]
        out["debiased"] = _summary(deb, n_bins)
        out["debiased"]["by_source"] = {s: _summary([r for r in deb if r["source"] == s], n_bins) for s in sources}
        out["position_bias"] = mean_interval(bias)
    out["questions"] = rows
    return out


def mc_report(result: dict) -> str:
    """A markdown table of `evaluate_mc` output: one row per source file, then the total (with the
    swap-debiased columns when the result has them)."""
    deb = "debiased" in result
    head = "| eval | N | accuracy | log-loss | ECE |" + (
        " debiased accuracy | debiased log-loss | debiased ECE |" * deb
    )
    lines = [head, "|---|---:|---:|---:|---:|" + "---:|---:|---:|" * deb]
    items = [
        (Path(s).name, m, result["debiased"]["by_source"][s] if deb else None) for s, m in result["by_source"].items()
    ]
    for name, m, d in items + [("all", result, result.get("debiased"))]:
        line = f"| {name} | {m['n']} | {m['accuracy']:.3f} | {m['log_loss']:.4f} | {m['ece']:.4f} |"
        lines.append(line + (f" {d['accuracy']:.3f} | {d['log_loss']:.4f} | {d['ece']:.4f} |" if deb else ""))
    return "\n".join(lines)
