"""How biased, consistent and calibrated a labelling run's judge was, from its comparison rows.

Input: the rows `cai_jax.cai.feedback.label_pairs` returns (one per comparison; M members =
principles x chain-of-thought samples): `p_a_first` [M] (P(response A preferred) with A shown
as option (A)), `p_a_swapped` [M] (the same read from the question with B shown first; empty
without swap), `p_a_members` [M], `principle_ids` [M], `response_a`, `response_b`, `p_a` (the
final label). Nothing is scored again: the report reads what the labeller already computed.

A "question" below is one member of one comparison. Measures (`judge_report`):

* position bias = mean over swapped questions of P((A) | A, B) + P((A) | B, A) - 1, the
  probability of choosing the first-shown option, in excess of 1/2, counted over both orders:
  p_a_first - p_a_swapped per question. 0 for an unbiased judge, +1 when it always picks (A).
  The 95 % interval is normal (mean +- 1.96 standard errors) over comparisons, each comparison's
  questions averaged first, since the questions on one pair are not independent.
  `position_bias_first_order` estimates the same quantity without swapping, as
  2 mean(p_a_first) - 1: valid only when responses A and B are exchangeable (the feedback stage's
  two samples of one policy are; given chosen/rejected pairs are not).
* flip rate: the share of swapped questions whose preferred response changes with the order,
  (p_a_first - 1/2)(p_a_swapped - 1/2) < 0 (an exact 1/2 on either side is not a flip).
* length preference: the Pearson correlation, over comparisons, of the label p_a with the length
  difference len(response_a) - len(response_b) in characters of the stripped responses (what the
  question shows; characters need no tokenizer, so every kind of judge is measured alike), and
  the share of comparisons with unequal lengths and a non-tie label that prefer the longer one.
* principle agreement (ensembles): over pairs of members with different principles on the same
  comparison, the share that prefer the same response (a tie agrees only with a tie), and the
  share of comparisons whose members are unanimous.
* label distribution: a histogram of p_a over equal-width bins of [0, 1] (the last one closed),
  counts preferring A, B or neither, and the share of confident labels, max(p, 1 - p) >= 0.8.
* per principle: the same measures over each principle's questions (members' p_a_members for
  the label, questions as the units of the interval).

`mc` (optional) adds `cai_jax.eval.mc.evaluate_mc` results on the paper's multiple-choice files
(accuracy, log-loss, ECE, and their swap-debiased variants). `judge_report_markdown` renders the
report as the run report's tables. Every number is a plain float, int or None (JSON-able).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "CONFIDENT",
    "Z95",
    "judge_report",
    "judge_report_markdown",
    "judge_report_tables",
    "mc_table",
    "mean_interval",
]

Z95 = 1.959963984540054  # standard normal 97.5 % quantile
CONFIDENT = 0.8  # a label is confident when max(p, 1 - p) >= this


def _float(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def mean_interval(values: Sequence[float]) -> dict:
    """{"mean", "lo", "hi", "n"}: the mean and its normal 95 % interval (None where undefined)."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    mean = float(v.mean())
    if v.size < 2:
        return {"mean": mean, "lo": None, "hi": None, "n": 1}
    half = Z95 * float(v.std(ddof=1)) / math.sqrt(v.size)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": int(v.size)}


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(np.sum(dx * dx)) * float(np.sum(dy * dy)))
    return float(np.sum(dx * dy)) / denom if x.size >= 2 and denom > 0 else None


def _side(p: np.ndarray) -> np.ndarray:
    """+1 prefers A, -1 prefers B, 0 a tie."""
    return np.sign(np.asarray(p, np.float64) - 0.5)


def _length_preference(diff: np.ndarray, p: np.ndarray) -> dict:
    decided = (diff != 0) & (_side(p) != 0)
    longer = np.sign(diff[decided]) == _side(p[decided])
    return {
        "correlation": _pearson(diff.astype(np.float64), p),
        "longer_preferred": float(longer.mean()) if longer.size else None,
        "n_decided": int(decided.sum()),
    }


def _distribution(p: np.ndarray, n_bins: int) -> dict:
    idx = np.clip(np.floor(p * n_bins).astype(np.int64), 0, n_bins - 1)
    side = _side(p)
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "count": np.bincount(idx, minlength=n_bins).tolist(),
        "prefer_a": int((side > 0).sum()),
        "prefer_b": int((side < 0).sum()),
        "ties": int((side == 0).sum()),
        "confident_share": float(np.mean(np.maximum(p, 1 - p) >= CONFIDENT)),
        "mean_confidence": float(np.mean(np.maximum(p, 1 - p))),
    }


def _row_arrays(rows: Sequence[dict]):
    """Per-comparison arrays, validated: members [C, M] and lengths [C]."""
    fields = ("p_a_first", "p_a_members", "principle_ids")
    first, swapped, members, principles, diff, label = [], [], [], [], [], []
    for c, row in enumerate(rows):
        name = row.get("prompt_id", c)
        for f in (*fields, "p_a", "response_a", "response_b"):
            if f not in row:
                raise ValueError(f"judge_report: row {name!r} has no field {f!r}")
        m = len(row["p_a_first"])
        if m == 0 or len(row["p_a_members"]) != m or len(row["principle_ids"]) != m:
            raise ValueError(
                f"judge_report: row {name!r}: p_a_first, p_a_members and principle_ids must have one entry per "
                f"member, got {m}, {len(row['p_a_members'])}, {len(row['principle_ids'])}"
            )
        sw = list(row.get("p_a_swapped") or [])
        if sw and len(sw) != m:
            raise ValueError(f"judge_report: row {name!r}: p_a_swapped has {len(sw)} entries for {m} members")
        first.append(np.asarray(row["p_a_first"], np.float64))
        swapped.append(np.asarray(sw, np.float64))
        members.append(np.asarray(row["p_a_members"], np.float64))
        principles.append([str(p) for p in row["principle_ids"]])
        diff.append(len(row["response_a"].strip()) - len(row["response_b"].strip()))
        label.append(float(row["p_a"]))
    n_swapped = sum(1 for s in swapped if s.size)
    if n_swapped not in (0, len(rows)):
        raise ValueError(f"judge_report: {n_swapped} of {len(rows)} rows are swapped; expected all or none")
    return first, swapped, members, principles, np.asarray(diff, np.int64), np.asarray(label, np.float64)


def _position(first: list[np.ndarray], swapped: list[np.ndarray]) -> dict:
    """Position bias (interval over the given units), first-order estimate and flip rate."""
    out = {"first_order": mean_interval([2.0 * f.mean() - 1.0 for f in first])}
    if not swapped or not swapped[0].size:
        return {**out, "bias": None, "flip_rate": None, "n_flips": None, "n_questions": 0}
    flips = np.concatenate([(f - 0.5) * (s - 0.5) < 0 for f, s in zip(first, swapped)])
    return {
        **out,
        "bias": mean_interval([float(np.mean(f - s)) for f, s in zip(first, swapped)]),
        "flip_rate": float(flips.mean()),
        "n_flips": int(flips.sum()),
        "n_questions": int(flips.size),
    }


def _agreement(members: list[np.ndarray], principles: list[list[str]]) -> dict:
    agree, pairs, unanimous, ensembled = 0, 0, 0, 0
    for p, ids in zip(members, principles):
        if p.size < 2:
            continue
        side = _side(p)
        ensembled += 1
        unanimous += int(np.all(side == side[0]))
        for i in range(p.size):
            for j in range(i + 1, p.size):
                if ids[i] != ids[j]:
                    pairs += 1
                    agree += int(side[i] == side[j])
    return {
        "pairwise": agree / pairs if pairs else None,
        "n_pairs": pairs,
        "unanimous": unanimous / ensembled if ensembled else None,
        "n_comparisons": ensembled,
    }


def judge_report(rows: Sequence[dict], *, mc: Mapping[str, dict] | None = None, n_bins: int = 10) -> dict:
    """Position bias, flip rate, length preference, agreement and label distribution (module doc).

    Args:
      rows: comparison rows as `cai_jax.cai.feedback.label_pairs` returns them (or as read back
        from the feedback folder's shards); all swapped or none.
      mc: optional {file name: `evaluate_mc` result} on the paper's multiple-choice files.
      n_bins: histogram bins of the label distribution.

    Returns:
      {"n_comparisons", "members", "swapped", "position": {"bias": {"mean", "lo", "hi", "n"} | None,
       "first_order": {...}, "flip_rate", "n_flips", "n_questions"}, "length": {"correlation",
       "longer_preferred", "n_decided"}, "agreement": {"pairwise", "n_pairs", "unanimous",
       "n_comparisons"}, "labels": {"edges", "count", "prefer_a", "prefer_b", "ties",
       "confident_share", "mean_confidence"}, "principles": {id: {"n", "mean_p", "position",
       "length", "labels"}}, "mc": {file: {...}} (when given)}.

    Raises:
      ValueError: no rows, or a row missing a field or with inconsistent member counts (named).
    """
    if not rows:
        raise ValueError("judge_report: no comparison rows")
    first, swapped, members, principles, diff, label = _row_arrays(rows)
    report = {
        "n_comparisons": len(rows),
        "members": sorted({len(f) for f in first}),
        "swapped": bool(swapped[0].size),
        "position": _position(first, swapped),
        "length": _length_preference(diff, label),
        "agreement": _agreement(members, principles),
        "labels": _distribution(label, n_bins),
        "principles": {},
    }
    # Per principle: every (comparison, member) question asked under it is one unit.
    units: dict[str, list[tuple[int, int]]] = {}
    for c, ids in enumerate(principles):
        for m, pid in enumerate(ids):
            units.setdefault(pid, []).append((c, m))
    for pid in sorted(units):
        cs = [c for c, _ in units[pid]]
        p = np.array([members[c][m] for c, m in units[pid]])
        first_q = [first[c][m : m + 1] for c, m in units[pid]]
        swapped_q = [swapped[c][m : m + 1] for c, m in units[pid]] if report["swapped"] else []
        report["principles"][pid] = {
            "n": len(cs),
            "mean_p": float(p.mean()),
            "position": _position(first_q, swapped_q),
            "length": _length_preference(diff[cs], p),
            "labels": _distribution(p, n_bins),
        }
    if mc:
        report["mc"] = {name: _mc_summary(result) for name, result in mc.items()}
    return report


def _mc_summary(result: dict) -> dict:
    keys = ("n", "accuracy", "log_loss", "ece")
    out = {k: _float(result[k]) if k != "n" else int(result[k]) for k in keys}
    if "debiased" in result:
        out["debiased"] = {k: _float(result["debiased"][k]) if k != "n" else int(result["debiased"][k]) for k in keys}
        out["position_bias"] = result.get("position_bias")
    return out


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _interval(iv: dict | None) -> str:
    if iv is None or iv["mean"] is None:
        return "-"
    if iv["lo"] is None:
        return f"{iv['mean']:+.3f}"
    return f"{iv['mean']:+.3f} [{iv['lo']:+.3f}, {iv['hi']:+.3f}]"


def judge_report_tables(report: dict) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The report's tables as (header, rows) of strings: a summary, one row per principle, and the
    MC files (when present). `judge_report_markdown` renders them; the run report shows them."""
    pos, length, agree, labels = report["position"], report["length"], report["agreement"], report["labels"]
    tables = {
        "summary": (
            ["measure", "value"],
            [
                ["comparisons", f"{report['n_comparisons']} ({'both orders' if report['swapped'] else 'one order'})"],
                ["position bias [95% normal]", _interval(pos["bias"])],
                ["position bias, first order only", _interval(pos["first_order"])],
                ["flip rate", f"{_fmt(pos['flip_rate'])} ({pos['n_flips'] or 0} of {pos['n_questions']})"],
                ["length correlation (label vs len A - len B)", _fmt(length["correlation"], "+.3f")],
                ["longer response preferred", f"{_fmt(length['longer_preferred'])} (of {length['n_decided']})"],
                ["principle agreement", f"{_fmt(agree['pairwise'])} (of {agree['n_pairs']} pairs)"],
                ["unanimous ensembles", _fmt(agree["unanimous"])],
                ["confident labels (max(p, 1 - p) >= 0.8)", f"{labels['confident_share']:.3f}"],
                ["prefer A / B / tie", f"{labels['prefer_a']} / {labels['prefer_b']} / {labels['ties']}"],
            ],
        ),
        "principles": (
            ["principle", "N", "mean p(A)", "position bias", "flip rate", "length r", "longer preferred", "confident"],
            [
                [
                    pid,
                    str(r["n"]),
                    f"{r['mean_p']:.3f}",
                    _interval(r["position"]["bias"]),
                    _fmt(r["position"]["flip_rate"]),
                    _fmt(r["length"]["correlation"], "+.3f"),
                    _fmt(r["length"]["longer_preferred"]),
                    f"{r['labels']['confident_share']:.3f}",
                ]
                for pid, r in report["principles"].items()
            ],  # fmt: skip
        ),
    }
    if report.get("mc"):
        tables["multiple-choice files"] = mc_table(report["mc"])
    return tables


def mc_table(mc: Mapping[str, dict]) -> tuple[list[str], list[list[str]]]:
    """The MC files as (header, rows): accuracy, log-loss, ECE, and their swap-debiased variants."""
    header = ["eval", "N", "accuracy", "log-loss", "ECE", "debiased accuracy", "debiased log-loss", "debiased ECE",
              "position bias"]  # fmt: skip
    rows = []
    for name, result in mc.items():
        m = _mc_summary(result) if "debiased" in result or "bins" in result else result
        d = m.get("debiased") or {}
        rows.append([
            name, str(m["n"]), _fmt(m["accuracy"]), _fmt(m["log_loss"], ".4f"), _fmt(m["ece"], ".4f"),
            _fmt(d.get("accuracy")), _fmt(d.get("log_loss"), ".4f"), _fmt(d.get("ece"), ".4f"),
            _interval(m.get("position_bias")),
        ])  # fmt: skip
    return header, rows


def judge_report_markdown(report: dict) -> str:
    """The report's tables (`judge_report_tables`) as markdown."""
    lines = [
        f"Judge on {report['n_comparisons']} comparisons (members per comparison: "
        f"{', '.join(map(str, report['members']))}). Position bias: P((A) | A, B) + P((A) | B, A) - 1 with a "
        "normal 95 % interval over comparisons; length: Pearson r of the label with len(A) - len(B) in "
        "characters; confident: max(p, 1 - p) >= 0.8.",
    ]
    for header, rows in judge_report_tables(report).values():
        lines += ["", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
