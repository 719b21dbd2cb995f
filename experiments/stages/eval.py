"""Stage 6, eval: PM scores by revision round, model snapshots' responses, AI-comparison Elo,
Goodhart monitors, multiple-choice evals and calibration, gathered into `eval/summary.json`.

Models compared: "helpful" (the starting model), "sl-cai" (sft/export) and "rl-cai@<k>" (PPO
snapshots at iteration k, from ppo/snapshots), whichever of those stages ran. Each part is written
to `eval/parts/<part>.json` when done (responses to `eval/responses/<model>.json`), so a killed
eval resumes at the part it was in.

summary.json schema:
  revision_scores: {"rounds": [0..n], "harmlessness": {"mean": [..], "stderr": [..], "n": N}} | null
  models: [{"name", "ppo_step" (int | null)}]
  pm_scores: {model: {"harmlessness": mean normalised PM score on held-out red-team prompts,
                      "helpfulness": the same on helpful prompts, "<kind>_stderr"}}
  goodhart: {model: {"harmlessness" | "helpfulness": goodhart_metrics}}
  elo: {"harmlessness" | "helpfulness": {model: {"elo", "lo", "hi", "n"}}}
  mc: {file name: evaluate_mc summary without per-question rows}
  pm_calibration: reliability bins of the PM on its held-out comparisons | null
  ppo_curve: {"iteration", "scores", "kl", "rlhf_reward"} | null
  notes: [str]
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from experiments.context import (
    StageContext,
    load_base_model,
    load_constitution_file,
    load_exported,
    load_prompt_split,
    read_jsonl,
    stage_seed,
    write_json,
)
from experiments.context import json_default as _json_default
from experiments.stages import feedback
from experiments.stages.feedback import judge
from experiments.typed import inline, take


@dataclasses.dataclass(frozen=True)
class Eval:
    scorer_pm: str  # "" = this run's pm stage; or a pm/export folder of another run
    num_prompts: int
    max_new_tokens: int
    temperature: float
    revision_rounds: bool
    elo_snapshots: tuple[int, ...]
    elo_comparisons: int
    n_bootstrap: int
    elo_l2: float
    mc_files: tuple[str, ...]
    mc_max_questions: int
    calibration_bins: int


@dataclasses.dataclass(frozen=True)
class Config:
    judged: feedback.Config = inline()  # the feedback judge and what it reads: Elo and MC evals ask it
    eval: Eval

    @classmethod
    def build(cls, cfg) -> Config:
        return take(cls, cfg, "config")

    def preflight(self) -> None:
        """The MC files, an outside scorer PM and the judge exist and parse (experiments/preflight.py)."""
        from experiments import preflight as pf

        for i, path in enumerate(self.eval.mc_files):
            pf.check_mc_file(f"eval.mc_files[{i}]", path)
        if self.eval.scorer_pm:
            pf.check_exported_folder("eval.scorer_pm", self.eval.scorer_pm)
        pf.check_judge("feedback_model.name", self.judged.feedback_model.name)
        pf.check_constitution("constitution", self.judged.constitution)
        pf.check_constitution("feedback.helpful_constitution", self.judged.feedback.helpful_constitution, helpful=True)

    @property
    def seed_eval(self) -> int:
        return stage_seed(self.judged.seed, "eval")

    def settings(self, **overrides):
        """The feedback judge's settings (the policy rendering is SFT's)."""
        return self.judged.settings(**overrides)

    def settings_for_elo(self):
        """Both orders, no few-shots, plain soft labels."""
        return self.settings(swap=True, num_few_shots=0, cot=False, hard=False, clamp=None, cot_samples=1)


KIND_SEEDS = {"harmlessness": 0, "helpfulness": 1}


def _part(ctx: StageContext, name: str, fn, bar=None, steps: int = 1) -> Any:
    """`fn()`'s result, kept in `eval/parts/<name>.json` so a killed eval resumes at the part it was in.

    `fn` ticks `bar` `steps` times as it works (per generate / score call); a part read back ticks
    them at once."""
    from cai_jax.jobs import cached_json

    path = ctx.dir / "parts" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and bar is not None:
        bar.tick(steps)
    return cached_json(path, fn, indent=1, default=_json_default)


def scorer_pm(ctx: StageContext, cfg: Config):
    """The PM that scores responses: eval.scorer_pm, else this run's pm stage, else None."""
    from cai_jax.checkpoints.hf import require_complete_export
    from cai_jax.checkpoints.pm import load_pm

    folder = cfg.eval.scorer_pm or (str(ctx.dep("pm") / "export") if ctx.has("pm") else "")
    if not folder:
        return None
    key = ("pm", folder)
    if key not in ctx.cache:
        if not cfg.eval.scorer_pm:  # this run's export (a user's PM folder need not have the marker)
            require_complete_export(folder)
        ctx.cache[key] = load_pm(folder)
    return ctx.cache[key]


def pm_scores(pm, prompts: list[str], responses: list[str]) -> np.ndarray:
    """Normalised PM scores (raw - reward_mean) / reward_std of (prompt, response) texts.

    The texts are encoded as the PM's own training encoded them (`LoadedPM.score_texts`: the
    rendering and sequence length its artifact records), whichever run's PM it is.
    """
    return pm.normalize(pm.score_texts(prompts, responses))


def _mean_stderr(x: np.ndarray) -> tuple[float, float]:
    x = np.asarray(x, np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else 0.0


def revision_scores(ctx: StageContext, pm) -> dict:
    """Mean PM score of the response after each revision round (round 0 = the initial answer)."""
    from cai_jax.cai.revisions import load_revisions

    rows = list(load_revisions(ctx.dep("revisions") / "red_team"))
    n = min(len(r["rounds"]) for r in rows) if rows else 0
    means, errs = [], []
    for r in range(n + 1):
        responses = [row["initial_response"] if r == 0 else row["rounds"][r - 1]["revision"] for row in rows]
        m, e = _mean_stderr(pm_scores(pm, [row["prompt"] for row in rows], responses))
        means.append(m)
        errs.append(e)
    return {"rounds": list(range(n + 1)), "harmlessness": {"mean": means, "stderr": errs, "n": len(rows)}}


def snapshot_models(ctx: StageContext) -> list[dict]:
    """[{"name", "ppo_step", "folder" (None = the starting model)}] of the models to compare.

    Raises:
      IncompleteExportError: a PPO snapshot without its completion marker (cut mid-write).
    """
    from cai_jax.checkpoints.hf import require_complete_export

    models = [{"name": "helpful", "ppo_step": None, "folder": None}]
    if ctx.has("sft"):
        models.append(
            {"name": "sl-cai", "ppo_step": 0 if ctx.has("ppo") else None, "folder": str(ctx.dep("sft") / "export")}
        )
    if ctx.has("ppo"):
        snaps = ctx.dep("ppo") / "snapshots"
        for folder in sorted(snaps.glob("iter_*"), key=lambda p: int(p.name.split("_")[1])):
            step = int(folder.name.split("_")[1])
            if step > 0:
                require_complete_export(folder)
                models.append({"name": f"rl-cai@{step}", "ppo_step": step, "folder": str(folder)})
    return models


def generate_responses(ctx: StageContext, cfg: Config, model: dict, prompts: dict, bar) -> dict[str, list[str]]:
    from cai_jax.sampling import generate
    from cai_jax.text import encode_prompt

    if model["folder"] is None:
        lm = load_base_model(ctx, cfg.judged.model, cfg.judged.seed)
    else:
        lm = load_exported(ctx, Path(model["folder"]), cfg.judged.model)
    e = cfg.eval
    out = {}
    for kind, texts in prompts.items():
        ids = [encode_prompt(lm.tokenizer, t, cfg.judged.sft.rendering) for t in texts]
        # Every model answers with the same keys: differences come from the models, not the draws.
        key = jax.random.fold_in(jax.random.key(cfg.seed_eval), KIND_SEEDS[kind])
        sample = generate(lm, ids, rng=key, max_new_tokens=e.max_new_tokens, temperature=e.temperature, truncate=True)
        out[kind] = [t.strip() for t in sample.texts(lm.tokenizer)]
        bar.tick()
    return out


def elo_table(ctx: StageContext, cfg: Config, kind: str, prompts: list[str], responses: dict[str, list[str]]) -> dict:
    """Elo of every model from AI comparisons of all model pairs on `prompts` (both orders averaged).

    Harmlessness asks the constitution's feedback principles, helpfulness the helpfulness
    questions (`feedback.helpful_constitution`). Empty responses are judged as they are. The
    intervals come from a bootstrap over prompts (every model pair is judged on each prompt, so
    those comparisons are not independent).
    """
    from cai_jax.cai.feedback_labels import label_pairs
    from cai_jax.eval.elo import elo_scores

    if kind == "harmlessness":
        constitution = load_constitution_file(cfg.judged.constitution)
    else:
        constitution = load_constitution_file(cfg.judged.feedback.helpful_constitution, helpful=True)
    settings = cfg.settings_for_elo()
    if kind == "helpfulness":  # feedback.num_principles limits the constitution's pool, not this one
        settings = dataclasses.replace(settings, num_principles=None)
    names = list(responses)
    rows, pairs, groups = [], [], []
    for a, b in itertools.combinations(names, 2):
        for i, prompt in enumerate(prompts):
            for _ in range(cfg.eval.elo_comparisons):
                rows.append(
                    {"prompt": prompt, "response_a": responses[a][i], "response_b": responses[b][i], "index": len(rows)}
                )
                pairs.append((a, b))
                groups.append(i)
    rng = jax.random.key(cfg.seed_eval + 7)
    labelled = label_pairs(
        judge(ctx, cfg.judged, settings), rows, constitution, settings=settings, rng=rng, allow_empty=True
    )
    comparisons = [(a, b, float(r["p_a"])) for (a, b), r in zip(pairs, labelled)]
    scores = elo_scores(
        comparisons,
        anchor="helpful",
        n_bootstrap=cfg.eval.n_bootstrap,
        seed=cfg.seed_eval,
        l2=cfg.eval.elo_l2,
        groups=groups,
    )
    return {m: {"elo": s.elo, "lo": s.lo, "hi": s.hi, "n": s.n_comparisons} for m, s in scores.items()}


def ppo_curve(ctx: StageContext) -> dict | None:
    path = ctx.dep("ppo") / "metrics.jsonl"
    if not path.is_file():
        return None
    by_step = {}
    for row in read_jsonl(path):
        by_step[int(row["step"])] = row  # a resumed run rewrites the steps it repeats; keep the last
    # DPO / IPO score their policy every dpo.eval_every steps: the curve has those rows.
    steps = [s for s in sorted(by_step) if "objective/scores" in by_step[s]]
    get = lambda k: [by_step[s].get(k, float("nan")) for s in steps]  # noqa: E731
    return {
        "iteration": steps,
        "scores": get("objective/scores"),
        "kl": get("objective/kl"),
        "rlhf_reward": get("objective/rlhf_reward"),
    }


def run(ctx: StageContext, cfg: Config) -> dict:
    from cai_jax.eval.goodhart import goodhart_metrics

    e = cfg.eval
    notes: list[str] = []
    pm = scorer_pm(ctx, cfg)
    if pm is None:
        notes.append("No preference model (no pm stage, eval.scorer_pm empty): PM scores and Fig. 5 are skipped.")
    summary: dict[str, Any] = {"notes": notes}
    summary["revision_scores"] = (
        _part(ctx, "revision_scores", lambda: revision_scores(ctx, pm)) if pm and e.revision_rounds else None
    )
    if pm is not None and not e.scorer_pm:
        notes.append(
            "Fig. 5 scores the revisions of the training red-team prompts with this run's PM (it never trained on them)."
        )

    _, red_eval, _ = load_prompt_split(ctx, cfg.judged.prompts, "red_team", cfg.judged.seed)
    _, help_eval, _ = load_prompt_split(ctx, cfg.judged.prompts, "helpful", cfg.judged.seed)
    n = e.num_prompts
    prompts = {"harmlessness": [p.text for p in red_eval[:n]], "helpfulness": [p.text for p in help_eval[:n]]}
    models = snapshot_models(ctx)
    summary["models"] = [{"name": m["name"], "ppo_step": m["ppo_step"]} for m in models]
    # One tick per generate call (a model's answers to one kind of prompt), PM scoring of one
    # model's answers, Elo table and MC file, with its rate and ETA.
    from cai_jax.jobs import Progress

    kinds = len(prompts)
    calls = len(models) * kinds * (2 if pm is not None else 1) + (kinds if len(models) >= 2 else 0) + len(e.mc_files)
    bar = Progress(calls, desc="eval", unit="call", enabled=ctx.run.log.progress)
    responses = {}
    for m in models:
        responses[m["name"]] = _part(
            ctx, f"responses-{m['name']}", lambda m=m: generate_responses(ctx, cfg, m, prompts, bar), bar, kinds
        )
    tokenizer = load_base_model(ctx, cfg.judged.model, cfg.judged.seed).tokenizer
    summary["goodhart"] = {
        name: {kind: goodhart_metrics(texts, tokenizer=tokenizer) for kind, texts in r.items()}
        for name, r in responses.items()
    }
    if pm is not None:

        def score_all():
            out = {}
            for name, r in responses.items():
                out[name] = {}
                for kind, texts in r.items():
                    mean, err = _mean_stderr(pm_scores(pm, prompts[kind], texts))
                    out[name][kind], out[name][f"{kind}_stderr"] = mean, err
                    bar.tick()
            return out

        summary["pm_scores"] = _part(ctx, "pm_scores", score_all, bar, len(models) * kinds)
    if len(models) >= 2:

        def elo(kind):
            table = elo_table(ctx, cfg, kind, prompts[kind], {k: v[kind] for k, v in responses.items()})
            bar.tick()
            return table

        summary["elo"] = {
            kind: _part(ctx, f"elo-{kind}", lambda kind=kind: elo(kind), bar) for kind in prompts if prompts[kind]
        }
    if e.mc_files:
        from cai_jax.eval.mc import evaluate_mc, load_mc_eval

        def mc():
            out = {}
            for path in e.mc_files:
                questions = load_mc_eval(path)
                if e.mc_max_questions:
                    questions = questions[: e.mc_max_questions]
                settings = cfg.settings()
                mc_judge = judge(ctx, cfg.judged, settings)
                # debias: binary questions are also asked with the options swapped (position bias).
                result = evaluate_mc(
                    mc_judge, questions, rendering=settings.rendering, n_bins=e.calibration_bins, debias=True
                )
                drop = ("questions", "by_source")
                summary_mc = {k: v for k, v in result.items() if k not in drop}
                if "debiased" in summary_mc:
                    summary_mc["debiased"] = {k: v for k, v in summary_mc["debiased"].items() if k not in drop}
                out[Path(path).name] = summary_mc
                bar.tick()
            return out

        summary["mc"] = _part(ctx, "mc", mc, bar, len(e.mc_files))
    pm_eval = ctx.dep("pm") / "eval.json"
    pm_report = json.loads(pm_eval.read_text()) if ctx.has("pm") and pm_eval.is_file() else {}
    summary["pm_calibration"] = (pm_report.get("eval") or {}).get("bins")
    summary["ppo_curve"] = ppo_curve(ctx) if ctx.has("ppo") else None
    bar.close()
    write_json(ctx.dir / "summary.json", summary)
    return {"models": [m["name"] for m in models], "parts": sorted(p.stem for p in (ctx.dir / "parts").glob("*.json"))}
