"""The report of one run (figures, report.md and report.html) and the cross-run summary of a sweep.

Reads the run folder through experiments/run_folder.py (`eval/summary.json`, schema in
experiments/eval_stage.py, the DONE records and the stages' rows); draws the paper's figure
analogues with experiments/figures.py; report.md gets every mean and proportion with its n and
95% interval and the generated "what this run shows" list (experiments/findings.py);
report.html is the run explorer (experiments/explorer.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cai_jax import atomic
from experiments import figures, markdown
from experiments import findings as F
from experiments import tables as T
from experiments.explorer import write_explorer
from experiments.pipeline import read_marker
from experiments.run_folder import RunData, load_run

__all__ = ["write_run_report", "sweep_report"]


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "NaN" if math.isnan(x) else f"{x:.4g}"
    return str(x)


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def run_figures(summary: dict, out: Path) -> dict[str, Path]:
    """{caption: png} of the figures one run's eval summary supports."""
    made: dict[str, Path] = {}
    rev = summary.get("revision_scores")
    if rev:
        made["Fig. 5 analogue: harmlessness PM score of the response after each revision round"] = (
            figures.fig_revisions(
                {"harmlessness": rev["harmlessness"]["mean"]},
                out / "fig5_revisions.png",
                errors={"harmlessness": rev["harmlessness"]["stderr"]},
            )
        )
    elo = summary.get("elo") or {}
    steps = [m["ppo_step"] for m in summary.get("models", []) if m.get("ppo_step") is not None]
    names = [m["name"] for m in summary.get("models", []) if m.get("ppo_step") is not None]
    if elo and steps:
        series, ci = {}, {}
        for kind, table in elo.items():
            series[f"{kind} Elo"] = [table[n]["elo"] for n in names]
            ci[f"{kind} Elo"] = ([table[n]["lo"] for n in names], [table[n]["hi"] for n in names])
        made["Fig. 8 analogue: Elo of the RL-CAI policy snapshots (PPO step 0 = SL-CAI) from AI comparisons"] = (
            figures.fig_rl_training(steps, series, out / "fig8_elo.png", ci=ci, ylabel="Elo")
        )
    curve = summary.get("ppo_curve")
    if curve and curve.get("iteration"):
        made["Fig. 8 analogue: raw PM score of rollouts and KL to the reference during PPO"] = figures.fig_rl_training(
            curve["iteration"],
            {"PM score (raw)": curve["scores"], "KL (nats/sequence)": curve["kl"]},
            out / "fig8_ppo_training.png",
            ylabel="value",
        )
    cal = {}
    if summary.get("pm_calibration"):
        cal["PM vs held-out AI labels"] = summary["pm_calibration"]
    for name, result in (summary.get("mc") or {}).items():
        # evaluate_mc's bins hold the confidence of the chosen option and how often it is correct.
        b = result["bins"]
        cal[f"feedback model on {name}"] = {
            "count": b["count"],
            "mean_pred": b["mean_confidence"],
            "mean_target": b["accuracy"],
        }
    if cal:
        made["Fig. 9 analogue: calibration (predicted probability of the preferred answer vs frequency)"] = (
            figures.fig_calibration(cal, out / "fig9_calibration.png", title="Calibration")
        )
    return made


def run_tables(run: RunData) -> dict[str, str]:
    """The report's tables as markdown (built in experiments/tables.py, shared with report.html)."""
    return {title: _md_table(header, rows) for title, (header, rows) in T.run_tables(run).items()}


INTERVAL_NOTE = (
    "Intervals are 95%: Wilson score intervals for proportions (accuracies, rates), Student t intervals "
    "(mean +- t_{0.975, n-1} s / sqrt(n)) for means, and the eval stage's bootstrap percentile intervals for Elo "
    "(experiments/stats.py). Log-loss, Brier score and ECE are shown without intervals (per-pair values are not stored)."
)


def write_run_report(workdir: Path) -> dict:
    """figures/, report.md and report.html of the run in `workdir`, from its files alone."""
    run = load_run(workdir)
    made = run_figures(run.summary, workdir / "figures")
    tables = run_tables(run)
    stage_timings = {name: seconds for name, seconds, _ in run.timings if name != "report"}
    notes = [f"Stages run: {', '.join(s for s in run.records if s != 'report')} (hashes in each stage's DONE file)."]
    for name, rec in run.records.items():
        if rec.get("resumed"):
            notes.append(f"Stage {name} was resumed after an interruption; its time counts the last attempt only.")
    notes += run.summary.get("notes", [])
    notes.append(INTERVAL_NOTE)
    markdown.write_report(
        workdir / "report.md",
        config=run.config,
        stage_timings=stage_timings,
        figures=made,
        tables=tables,
        notes=notes,
        findings=F.findings(run),
        stage_profile={name: p for name, p in run.profile.items() if name in stage_timings},
    )
    # The captions travel with the figures, so report.html (rewritten from the folder alone) has them.
    if made:
        atomic.write_json(workdir / "figures" / "captions.json", {p.name: c for c, p in made.items()}, indent=1)
    html = write_explorer(workdir)
    return {"figures": sorted(p.name for p in made.values()), "tables": sorted(tables), "html": html.name}


# ---------------------------------------------------------------- sweeps


def _summary(root: Path, name: str) -> dict:
    return _load(root / name / "eval" / "summary.json") or {}


def sweep_report(root: Path, runs: list[tuple[str, Any]], kind: str | None) -> Path:
    """`<root>/sweep_report.md` with the cross-run figure of `kind` and a table of every run's key numbers."""
    root = Path(root)
    out = root / "figures"
    made: dict[str, Path] = {}
    sums = {name: _summary(root, name) for name, _ in runs}

    def rounds(name):
        rev = sums[name].get("revision_scores")
        return rev["harmlessness"]["mean"] if rev else []

    if kind == "principles":
        data = {int(cfg.revisions.num_principles) or 16: {"harmlessness": rounds(name)} for name, cfg in runs}
        made["Fig. 6 analogue: harmlessness PM score vs revision round, by number of principles"] = (
            figures.fig_principles(data, out / "fig6_principles.png")
        )
    elif kind == "critique":
        data = {cfg.revisions.mode: rounds(name) for name, cfg in runs}
        made["Fig. 7 analogue: critiqued vs direct revisions"] = figures.fig_critique_vs_direct(
            data, out / "fig7_critique_vs_direct.png"
        )
    elif kind == "revisions":
        series: dict[str, list] = {}
        for name, _ in runs:
            for k, v in (sums[name].get("pm_scores", {}).get("sl-cai") or {}).items():
                if not k.endswith("_stderr"):
                    series.setdefault(k, []).append(v)
        made["Fig. 5 analogue: PM scores of SL-CAI-n models (trained on revisions 1..n) vs n"] = figures.fig_revisions(
            series, out / "fig5_sl_cai_n.png"
        )
    elif kind == "kl":
        curves = {name: sums[name].get("ppo_curve") or {} for name, _ in runs}
        steps = max((c.get("iteration", []) for c in curves.values()), key=len, default=[])
        series = {
            f"{name} PM score": c.get("scores", [])
            for name, c in curves.items()
            if len(c.get("scores", [])) == len(steps)
        }
        if steps:
            made["PM score of rollouts during PPO, by KL coefficient"] = figures.fig_rl_training(
                steps, series, out / "fig8_kl.png", ylabel="PM score (normalised)"
            )
    elif kind == "rl":
        curves = {
            str(cfg.rl.algorithm): ((c := sums[name].get("ppo_curve") or {}).get("iteration", []), c.get("scores", []))
            for name, cfg in runs
        }
        made["Fig. 8 analogue per RL-CAI objective: PM score of the policy's samples over training"] = (
            figures.fig_rl_objectives(curves, out / "fig8_objectives.png")
        )
    table_rows = {}
    for name, _ in runs:
        rec = read_marker(root / name / "pm", "DONE") or {}
        pm_eval = (rec.get("summary") or {}).get("eval") or {}
        s = sums[name]
        row = {k: pm_eval[k] for k in ("accuracy", "log_loss", "ece") if k in pm_eval}
        for model, scores in (s.get("pm_scores") or {}).items():
            for k, v in scores.items():
                if not k.endswith("_stderr") and model != "helpful":
                    row[f"{model} {k}"] = v
        table_rows[name] = row
    tables = {
        "Runs of the sweep (PM held-out metrics and mean PM scores of each model)": markdown.label_ablation_table(
            table_rows
        )
    }
    return markdown.write_report(
        root / "sweep_report.md",
        config={"runs": [name for name, _ in runs], "figure": kind},
        stage_timings={},
        figures=made,
        tables=tables,
        title=f"Sweep report ({kind or 'runs'})",
    )
