"""The numbers of one run with their n and 95% intervals, and the "what this run shows" sentences.

Everything here is computed from a `RunData` (experiments/run_folder.py); the sentences are
generated from the estimates by fixed rules, never written by hand:

* a proportion or mean is "not distinguishable" from a reference value (chance, the starting
  model's Elo of 0) when its interval contains it, else "above" / "below" it;
* two estimates are compared by their intervals: overlapping intervals are reported as "this run
  does not tell them apart" (conservative: overlapping 95% intervals can still hide a difference,
  but disjoint ones never do).

Intervals: Wilson for proportions, Student t for means, the eval stage's bootstrap percentiles for
Elo (experiments/stats.py).
"""

from __future__ import annotations

import math

from experiments.run_folder import RunData
from experiments.stats import Estimate, mean_estimate, mean_from_stderr, wilson

__all__ = [
    "elo_estimates",
    "findings",
    "goodhart_estimates",
    "label_estimates",
    "mc_estimates",
    "model_score_estimates",
    "pm_accuracy",
    "ppo_estimates",
    "revision_estimates",
    "rl_stages",
]

CONFIDENT = 0.8  # a label counts as confident at max(p, 1 - p) >= this (as the feedback stage's summary)


def _nan(n: int = 0, method: str = "") -> Estimate:
    return Estimate(math.nan, math.nan, math.nan, n, method)


def pm_accuracy(run: RunData) -> Estimate | None:
    """Held-out PM accuracy over the pairs with p != 0.5 (a tied score counts half), Wilson."""
    e = run.pm_eval.get("eval") or ((run.records.get("pm") or {}).get("summary") or {}).get("eval")
    if not e or "accuracy" not in e or "n" not in e:
        return None
    decided = int(e["n"]) - int(e.get("n_p_half", 0))
    acc = float(e["accuracy"])
    if decided <= 0 or not math.isfinite(acc):
        return _nan(decided, "Wilson")
    return wilson(acc * decided, decided)


def _eval_n(run: RunData, model: str, kind: str) -> int:
    responses = (run.eval_responses.get(model) or {}).get(kind)
    if responses is not None:
        return len(responses)
    return int(((run.summary.get("goodhart") or {}).get(model) or {}).get(kind, {}).get("n", 0))


def model_score_estimates(run: RunData) -> dict[str, dict[str, Estimate]]:
    """{model: {kind: mean normalised PM score of its held-out responses, t interval}}."""
    out: dict[str, dict[str, Estimate]] = {}
    for model, scores in (run.summary.get("pm_scores") or {}).items():
        for kind, mean in scores.items():
            if kind.endswith("_stderr"):
                continue
            err = scores.get(f"{kind}_stderr", math.nan)
            out.setdefault(model, {})[kind] = mean_from_stderr(float(mean), float(err), _eval_n(run, model, kind))
    return out


def revision_estimates(run: RunData) -> list[Estimate]:
    """Mean harmlessness PM score after each revision round (round 0 = the initial answer), t."""
    rev = run.summary.get("revision_scores") or {}
    h = rev.get("harmlessness") or {}
    return [
        mean_from_stderr(float(m), float(e), int(h.get("n", 0))) for m, e in zip(h.get("mean", []), h.get("stderr", []))
    ]


def elo_estimates(run: RunData) -> dict[str, dict[str, Estimate]]:
    """{kind: {model: Elo with the eval stage's bootstrap percentile interval; n = comparisons}}."""
    return {
        kind: {
            m: Estimate(float(v["elo"]), float(v["lo"]), float(v["hi"]), int(v["n"]), "bootstrap") for m, v in t.items()
        }
        for kind, t in (run.summary.get("elo") or {}).items()
    }


def label_estimates(run: RunData) -> dict[str, Estimate]:
    """AI feedback labels: mean p_a, mean confidence max(p, 1 - p) (t), confident fraction (Wilson)."""
    p = run.label_p_a
    if not p:
        return {}
    conf = [max(x, 1.0 - x) for x in p]
    return {
        "mean p(A)": mean_estimate(p),
        "mean confidence max(p, 1-p)": mean_estimate(conf),
        f"fraction with confidence >= {CONFIDENT}": wilson(sum(c >= CONFIDENT for c in conf), len(conf)),
    }


def goodhart_estimates(run: RunData) -> dict[str, dict[str, dict[str, Estimate]]]:
    """{model: {kind: {"mean chars" (t, from the responses), "<x>_rate" (Wilson)}}}."""
    out: dict = {}
    for model, by_kind in (run.summary.get("goodhart") or {}).items():
        for kind, g in by_kind.items():
            n = int(g.get("n", 0))
            row = {}
            responses = (run.eval_responses.get(model) or {}).get(kind)
            # Same definition as cai_jax.eval.goodhart (len of the text), with the spread it omits.
            row["mean chars"] = mean_estimate([len(t) for t in responses]) if responses else _nan(n, "t")
            for key, value in g.items():
                if key.endswith("_rate") and isinstance(value, (int, float)) and math.isfinite(value):
                    row[key] = wilson(round(float(value) * n), n)
            out.setdefault(model, {})[kind] = row
    return out


def mc_estimates(run: RunData) -> dict[str, Estimate]:
    return {
        name: wilson(float(r["accuracy"]) * int(r["n"]), int(r["n"]))
        for name, r in (run.summary.get("mc") or {}).items()
        if "accuracy" in r and "n" in r
    }


def ppo_estimates(run: RunData, stage: str = "ppo") -> list[dict]:
    """Per logged iteration: batch means from metrics.jsonl, the logged samples' mean score (t) and
    the no-EOS fraction of the rollout batch (Wilson, n = rollout_batch_size)."""
    batch = run.rollout_batch_size(stage)
    samples: dict[int, list[float]] = {}
    for s in run.samples.get(stage, []):
        if isinstance(s.get("score"), (int, float)):
            samples.setdefault(int(s.get("iteration", -1)), []).append(float(s["score"]))
    rows = []
    for m in run.metrics.get(stage, []):
        step = int(m["step"])
        no_eos = m.get("response/no_eos_frac")
        rows.append(
            {
                "iteration": step,
                "score": m.get("objective/scores"),
                "kl": m.get("objective/kl"),
                "length": m.get("response/length_mean"),
                "no_eos": wilson(round(no_eos * batch), batch) if batch and no_eos is not None else None,
                "samples": mean_estimate(samples[step]) if step in samples else None,
            }
        )
    return rows


def rl_stages(run: RunData) -> list[str]:
    """Stages with RL samples or PPO metrics, in pipeline order (PPO and any other RL objective)."""
    names = set(run.samples) | ({"ppo"} & set(run.metrics))
    return [s for s in run.records if s in names] + sorted(names - set(run.records))


def _num(x) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else "n/a"


def _verdict_vs(est: Estimate, ref: float, what: str, words=("above", "below")) -> str:
    if est.contains(ref):
        return f"not distinguishable from {what} at this size"
    if not (math.isfinite(est.lo) and math.isfinite(est.hi)):
        return "no interval"
    return f"{words[0] if est.lo > ref else words[1]} {what} (its interval excludes {ref:g})"


def _compare(a: Estimate, b: Estimate, name_a: str, name_b: str) -> str:
    if a.overlaps(b):
        return "their intervals overlap, so this run does not tell them apart"
    return f"{name_a} is {'higher' if a.value > b.value else 'lower'} than {name_b} (disjoint intervals)"


def _final_models(run: RunData) -> tuple[str | None, str | None]:
    """(the SL-CAI model, the last RL-CAI snapshot) among the eval's models."""
    models = run.summary.get("models") or []
    sl = next((m["name"] for m in models if m["name"] == "sl-cai"), None)
    rl = [m for m in models if m.get("ppo_step") and m["name"] != sl]
    return sl, (max(rl, key=lambda m: m["ppo_step"])["name"] if rl else None)


def _elo_lines(run: RunData) -> list[str]:
    lines = []
    sl, rl = _final_models(run)
    for kind, table in elo_estimates(run).items():
        # The eval anchors one model (the starting one) at exactly 0 with a zero-width interval.
        anchor = next((m for m, e in table.items() if e.value == e.lo == e.hi == 0.0), None)
        for model in [m for m in (sl, rl) if m in table]:
            e = table[model]
            line = f"{kind} Elo of {model}"
            if anchor:
                line += f" relative to {anchor} (fixed at 0): {e.fmt(signed=True)} (bootstrap, {e.n} comparisons)"
                line += f": {_verdict_vs(e, 0.0, anchor, ('higher than', 'lower than'))}"
            else:
                line += f": {e.fmt(signed=True)} (bootstrap, {e.n} comparisons)"
            lines.append(line + ".")
        if sl in table and rl in table:
            a, b = table[rl], table[sl]
            lines.append(
                f"{kind} Elo of {rl} vs {sl}: {a.fmt(signed=True)} vs {b.fmt(signed=True)}; {_compare(a, b, rl, sl)}."
            )
    return lines


def _score_lines(run: RunData) -> list[str]:
    lines = []
    rounds = revision_estimates(run)
    if len(rounds) >= 2:
        first, last = rounds[0], rounds[-1]
        lines.append(
            f"harmlessness PM score after {len(rounds) - 1} revision round(s) vs the initial answer: "
            f"{last.fmt()} vs {first.fmt()} (t, n = {first.n} prompts); "
            f"{_compare(last, first, 'the revision', 'the initial answer')}."
        )
    sl, rl = _final_models(run)
    scores = model_score_estimates(run)
    if sl in scores and rl in scores:
        for kind in scores[rl]:
            if kind in scores[sl]:
                a, b = scores[rl][kind], scores[sl][kind]
                lines.append(
                    f"{kind} PM score of {rl} vs {sl} on held-out prompts: {a.fmt()} vs {b.fmt()} "
                    f"(t, n = {a.n} / {b.n}); {_compare(a, b, rl, sl)}."
                )
    return lines


def _label_lines(run: RunData) -> list[str]:
    lines = []
    acc = pm_accuracy(run)
    if acc is not None:
        lines.append(
            f"PM accuracy on held-out AI-labelled pairs: {acc.fmt()} (Wilson, n = {acc.n}): "
            f"{_verdict_vs(acc, 0.5, 'chance (0.5)')}."
        )
    labels = label_estimates(run)
    if labels:
        conf = labels["mean confidence max(p, 1-p)"]
        frac = labels[f"fraction with confidence >= {CONFIDENT}"]
        line = (
            f"AI feedback labels: mean confidence {conf.fmt()} (t, n = {conf.n} comparisons), "
            f"{frac.fmt()} of them at >= {CONFIDENT} (Wilson)"
        )
        if math.isfinite(conf.hi) and conf.hi < 0.55:
            line += "; the labels are within 0.05 of a coin flip, so the PM has little to learn from them"
        lines.append(line + ".")
    for name, e in mc_estimates(run).items():
        lines.append(f"multiple-choice eval {name}: accuracy {e.fmt()} (Wilson, n = {e.n}).")
    return lines


def _ppo_lines(run: RunData) -> list[str]:
    lines = []
    for stage in rl_stages(run):
        rows = ppo_estimates(run, stage)
        if not rows:
            continue
        first, last = rows[0], rows[-1]
        batch = run.rollout_batch_size(stage) or "the"
        line = (
            f"{stage}: mean raw PM score of the rollouts {_num(first['score'])} at iteration {first['iteration']} -> "
            f"{_num(last['score'])} at iteration {last['iteration']} (batch means of {batch} rollouts; their spread "
            f"is not logged)"
        )
        if last.get("kl") is not None:
            line += f"; KL to the reference at the end {_num(last['kl'])} nats/sequence"
        lines.append(line + ".")
        if first["samples"] is not None and last["samples"] is not None and first is not last:
            a, b = last["samples"], first["samples"]
            lines.append(
                f"{stage} logged samples: mean PM score {a.fmt()} at iteration {last['iteration']} vs {b.fmt()} at "
                f"iteration {first['iteration']} (t, n = {a.n} / {b.n}); {_compare(a, b, 'the last', 'the first')}."
            )
        no_eos = [r["no_eos"] for r in rows if r["no_eos"] is not None]
        if no_eos:
            k = sum(round(e.value * e.n) for e in no_eos)
            pooled = wilson(k, sum(e.n for e in no_eos))
            line = (
                f"{stage}: {k} of {pooled.n} rollouts ended at max_new_tokens without EOS, {pooled.fmt()} "
                f"(Wilson, pooled over {len(no_eos)} iterations)"
            )
            if pooled.value > 0.5:
                line += "; most scored responses are truncated"
            lines.append(line + ".")
    return lines


def _goodhart_lines(run: RunData) -> list[str]:
    sl, rl = _final_models(run)
    g = goodhart_estimates(run)
    if sl not in g or rl not in g or "harmlessness" not in g[rl] or "harmlessness" not in g[sl]:
        return []
    a, b = g[rl]["harmlessness"], g[sl]["harmlessness"]
    parts = []
    for key in ("mean chars", "refusal_rate", "evasive_rate"):
        if key in a and key in b:
            method = "t" if key == "mean chars" else "Wilson"
            parts.append(f"{key.replace('_', ' ')} {a[key].fmt()} vs {b[key].fmt()} ({method})")
    if not parts:
        return []
    n = a["mean chars"].n if "mean chars" in a else ""
    return [f"Goodhart monitors of {rl} vs {sl} on held-out red-team prompts (n = {n}): " + "; ".join(parts) + "."]


def findings(run: RunData) -> list[str]:
    """The "what this run shows" list: one generated sentence per comparison the run supports."""
    return _label_lines(run) + _score_lines(run) + _elo_lines(run) + _ppo_lines(run) + _goodhart_lines(run)
