"""The tables of one run's report, as (header, rows): report.md writes them as markdown, report.html as HTML.

Cells are numbers or preformatted strings; a mean or proportion is written "value [lo, hi]" with
its 95% interval (experiments/stats.py) and its n in a column or cell of its own.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

from cai_jax import profiling
from cai_jax.eval.judge_report import judge_report_tables, mc_table
from experiments import findings as F
from experiments.run_folder import RunData
from experiments.stats import Estimate

__all__ = ["Table", "run_tables", "stage_timings_table"]

Table = tuple[list[str], list[list[Any]]]


def _est_cell(e: Estimate | None, *, signed: bool = False) -> str:
    return "-" if e is None else e.fmt(signed=signed)


def _elo_cell(e: Estimate) -> str:
    return "0 (anchor)" if e.value == e.lo == e.hi == 0.0 else e.fmt(signed=True)


def _metrics_cells(d: dict, keys) -> list:
    return [d.get(k, float("nan")) for k in keys]


def run_tables(run: RunData) -> dict[str, Table]:
    """{title: (header, rows)}: every mean and proportion with its n and 95% interval."""
    tables: dict[str, Table] = {}
    acc = F.pm_accuracy(run)
    e = run.pm_eval.get("eval") or ((run.records.get("pm") or {}).get("summary") or {}).get("eval") or {}
    if acc is not None:
        tables["Preference model on held-out AI-labelled comparisons"] = (
            ["accuracy [95% Wilson]", "n (pairs with p != 0.5)", "pairs with p = 0.5", "log-loss", "Brier", "ECE"],
            [[acc.fmt(), acc.n, e.get("n_p_half", 0)] + _metrics_cells(e, ("log_loss", "brier", "ece"))],
        )
    labels = F.label_estimates(run)
    if labels:
        tables["AI feedback labels (feedback/comparisons)"] = (
            ["statistic", "value [95% interval]", "n", "interval"],
            [[name, est.fmt(), est.n, est.method] for name, est in labels.items()],
        )
    rounds = F.revision_estimates(run)
    if rounds:
        tables["Harmlessness PM score by revision round (Fig. 5; round 0 = the initial answer)"] = (
            ["round", "mean [95% t]", "n (prompts)"],
            [[i, r.fmt(), r.n] for i, r in enumerate(rounds)],
        )
    scores = F.model_score_estimates(run)
    models = [m["name"] for m in run.summary.get("models", [])]
    if scores:
        kinds = sorted({k for v in scores.values() for k in v})
        rows = [[m] + [f"{_est_cell(scores[m].get(k))} (n = {scores[m][k].n})" if k in scores[m] else "-" for k in kinds]
                for m in models if m in scores]  # fmt: skip
        tables["Mean normalised PM score of each model's responses (held-out prompts; 95% t interval)"] = (
            ["model"] + kinds,
            rows,
        )
    for kind, table in F.elo_estimates(run).items():
        tables[f"{kind.capitalize()} Elo (AI comparisons; 95% bootstrap percentile interval)"] = (
            ["model", "Elo [95% interval]", "comparisons"],
            [[m, _elo_cell(est), est.n] for m, est in table.items()],
        )
    gh = F.goodhart_estimates(run)
    if gh:
        rate_keys = sorted({k for by in gh.values() for g in by.values() for k in g if k.endswith("_rate")})
        rows = []
        for m in [m for m in models if m in gh] + sorted(set(gh) - set(models)):
            for kind, g in gh[m].items():
                rows.append(
                    [m, kind, g["mean chars"].n, _est_cell(g.get("mean chars"))]
                    + [_est_cell(g.get(k)) for k in rate_keys]
                )
        tables["Goodhart monitors (held-out prompts; mean chars with 95% t, rates with 95% Wilson)"] = (
            ["model", "prompts", "n", "mean chars"] + [k.replace("_", " ") for k in rate_keys],
            rows,
        )
    for stage in F.rl_stages(run):
        rows = []
        for r in F.ppo_estimates(run, stage):
            s = r["samples"]
            rows.append([
                r["iteration"], r["score"], f"{s.fmt()} (n = {s.n})" if s is not None else "-",
                r["kl"], r["length"], f"{_est_cell(r['no_eos'])} (n = {r['no_eos'].n})" if r["no_eos"] else "-",
            ])  # fmt: skip
        if rows:
            tables[f"{stage} by iteration (batch means of {run.rollout_batch_size(stage) or 'the'} rollouts; intervals from the logged samples)"] = (
                ["iteration", "PM score (batch mean)", "PM score of logged samples [95% t]", "KL (nats/seq)",
                 "mean length (tokens)", "no-EOS fraction [95% Wilson]"], rows,
            )  # fmt: skip
    for name, est in F.mc_estimates(run).items():
        result = (run.summary.get("mc") or {})[name]
        tables[f"Multiple-choice eval: {name}"] = (
            ["n", "accuracy [95% Wilson]", "log-loss", "ECE"],
            [[est.n, est.fmt()] + _metrics_cells(result, ("log_loss", "ece"))],
        )
    report = run.judge_report or {}
    kinds = [k for k, v in report.items() if isinstance(v, dict) and "position" in v]
    for kind in kinds:  # the feedback stage's report (cai_jax/eval/judge_report.py)
        for key, table in judge_report_tables(report[kind]).items():
            tables[f"Judge ({kind} labels, {report.get('judge', 'judge')}): {key}"] = table
    if not kinds:
        for key, table in judge_tables(report).items():
            tables[f"Judge report: {key} (feedback/judge_report.json)"] = table
    mc = run.summary.get("mc") or {}
    if mc:
        tables["Judge on the multiple-choice files, in both option orders (swap-debiased)"] = mc_table(mc)
    return tables


def _seconds(x) -> str:
    return "-" if x is None else f"{float(x):.1f}"


def stage_timings_table(
    stage_timings: Mapping[str, float], stage_profile: Mapping[str, Mapping], resumed: Collection[str] | None = None
) -> Table:
    """Wall time and share of each stage, then "total"; with timings.json's profile columns
    (compile, checkpoint, export, load, run seconds and persistent-cache hits / misses;
    cai_jax/profiling.py) when any stage has a profile ("-" for one without), its peak resident
    memory (GB; the total row: the highest) when any profile has one, and a "resumed" column when
    `resumed` (the names of the resumed stages) is given. Cells are strings."""
    total = float(sum(stage_timings.values()))
    columns = profiling.COLUMNS if stage_profile else ()
    header = ["stage", "wall time (s)", "share"] + (["resumed"] if resumed is not None else [])
    header += [f"{c[:-2]} (s)" for c in columns] + (["cache hits / misses"] if columns else [])
    with_peak = any((p or {}).get("peak_rss_gb") is not None for p in stage_profile.values())
    header += ["peak RSS (GB)"] if with_peak else []
    peaks = []
    sums = dict.fromkeys((*columns, "hits", "misses"), 0.0)
    rows = []
    for name, seconds in stage_timings.items():
        row = [name, _seconds(seconds), f"{100 * seconds / total:.1f}%" if total > 0 else "-"]
        row += [] if resumed is None else ["yes" if name in resumed else ""]
        p = stage_profile.get(name) or {}
        cache = p.get("cache") or {}
        values = {c: p.get(c) for c in columns} | {k: cache.get(k) for k in ("hits", "misses")}
        for key, value in values.items():
            sums[key] += 0.0 if value is None else float(value)
        row += [_seconds(values[c]) for c in columns]
        if columns:
            row.append("-" if not cache else f"{values['hits']} / {values['misses']}")
        if with_peak:
            peak = p.get("peak_rss_gb")
            peaks += [] if peak is None else [float(peak)]
            row.append("-" if peak is None else f"{float(peak):.1f}")
        rows.append(row)
    last = ["total", _seconds(total), ""] + ([""] if resumed is not None else [])
    last += [_seconds(sums[c]) for c in columns] + ([f"{sums['hits']:.0f} / {sums['misses']:.0f}"] if columns else [])
    last += [f"{max(peaks):.1f}"] if with_peak else []
    return header, rows + [last]


def judge_tables(report: dict) -> dict[str, Table]:
    """feedback/judge_report.json (loose schema: scalar metrics, lists of row dicts such as a
    per-principle table, or {name: {metric: value}}) as tables; unknown shapes are shown as JSON."""
    out: dict[str, Table] = {}
    scalars = [[k, v] for k, v in report.items() if v is None or isinstance(v, (int, float, str))]
    if scalars:
        out["metrics"] = (["metric", "value"], scalars)
    for key, value in report.items():
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            value = [{"name": k, **v} for k, v in value.items()]
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            cols = list(dict.fromkeys(c for r in value for c in r))
            out[key] = (cols, [[_cell(r.get(c)) for c in cols] for r in value])
        elif isinstance(value, (dict, list)) and value:
            out[key] = (["value"], [[_cell(value)]])
    return out


def _cell(v):
    return v if v is None or isinstance(v, (int, float, str)) else json.dumps(v, default=str)
