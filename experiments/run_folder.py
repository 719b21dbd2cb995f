"""Reads a finished (or partly finished) run folder into plain Python data, for the report and explorer.

Only the files of the run folder are read (the layout is in README.md, "Run folder"); nothing is
imported from the stages, so this works on a copied folder, on another machine, without jax. Every
artifact is optional: a stage that did not run, or a future artifact that is absent, reads as empty.

Artifacts read (paths relative to the workdir):
  config.json, <stage>/DONE
  timings.json                           {stage: {seconds, resumed, compile_s, checkpoint_s,
                                         export_s, load_s, run_s, cache: {hits, misses},
                                         peak_rss_gb}}
  revisions/<kind>/rows-p*-b*.jsonl      one row per prompt: id, prompt, initial_response,
                                         rounds [{principle_id, critique_request, critique,
                                         revision_request, revision}]
  feedback/comparisons/rows-p*-b*.jsonl  prompt, response_a/b, principle_ids, p_a_first,
                                         p_a_swapped, p_a_members, p_a, cot_texts, ...
  feedback/judge_report.json             optional, loose schema: {metric: scalar, ...,
                                         <table name>: [{column: value}]} (e.g. position bias,
                                         flip rate, and a per-principle table)
  <stage>/metrics.jsonl (any depth)      one row per step; a resumed run repeats steps, the last wins
  <stage>/samples.jsonl                  RL samples: iteration, prompt, response, score (+ any
                                         other fields, e.g. a per-sample kl, shown when present)
  pm/eval.json, eval/summary.json        (schemas: cai_jax/eval/pm.py, experiments/eval_stage.py)
  eval/parts/responses-<model>.json      {kind: [response per held-out prompt]}
  figures/*.png, figures/captions.json  {png name: caption}
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

# Pipeline order for display (experiments/stages REGISTRY; tests/test_stage_configs.py checks they agree).
# The explorer reads a run folder without importing the stages (no jax), hence a copy here.
ORDER = ("revisions", "sft", "feedback", "pm", "ppo", "eval", "report")

__all__ = ["RunData", "load_run", "read_jsonl_capped"]

# Folders whose files are listed as one row (model weights, checkpoints, event files).
_BULK_DIRS = {"export", "checkpoints", "tensorboard", "wandb", "snapshots"}


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def read_jsonl_capped(paths: list[Path], limit: int | None, keep=None) -> tuple[list[dict], int, list]:
    """(the first `limit` rows of the JSONL files in order, the total number of rows, [keep(row)
    for every row]) (`keep` None: an empty list). A last line without its newline is a row still
    being written (a run in progress) and is left out."""
    rows, total, kept = [], 0, []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip() or not line.endswith("\n"):
                    continue
                total += 1
                if keep is not None or limit is None or len(rows) < limit:
                    row = json.loads(line)
                    if keep is not None:
                        kept.append(keep(row))
                    if limit is None or len(rows) < limit:
                        rows.append(row)
    return rows, total, kept


def _shards(folder: Path) -> list[Path]:
    # The revision and feedback engines write rows-p<process>-b<batch>.jsonl; sorted = batch order.
    return sorted(folder.glob("rows-p*-b*.jsonl"))


@dataclasses.dataclass
class RunData:
    workdir: Path
    config: dict
    timings: list[tuple[str, float, bool]]  # (stage, seconds, resumed) in pipeline order
    profile: dict[str, dict]  # stage -> compile_s, checkpoint_s, ..., run_s, cache (stages timed with them)
    records: dict[str, dict]  # stage -> DONE record, pipeline order
    revisions: dict[str, list[dict]]  # kind (red_team, helpful) -> rows
    comparisons: list[dict]
    label_p_a: list[float]  # p_a of every comparison on disk (`comparisons` may be capped)
    metrics: dict[str, list[dict]]  # "sft", "pm", "pm/pmp", "ppo", ... -> rows by step
    samples: dict[str, list[dict]]  # RL stage -> sample rows
    summary: dict  # eval/summary.json
    eval_responses: dict[str, dict[str, list[str]]]  # model -> kind -> responses
    pm_eval: dict
    judge_report: dict | None
    figures: list[Path]
    captions: dict[str, str]  # figures/captions.json (written by the report stage): png name -> caption
    files: list[tuple[str, int, int]]  # (path relative to the workdir, bytes, files in it)
    totals: dict[str, int]  # section -> rows on disk, where the loader kept only the first `limit`

    def rollout_batch_size(self, stage: str = "ppo") -> int | None:
        value = (self.config.get(stage) or {}).get("rollout_batch_size")
        return int(value) if isinstance(value, (int, float)) else None


def _stage_order(names) -> list[str]:
    known = [s for s in ORDER if s in names]
    return known + sorted(n for n in names if n not in ORDER)


def _metrics_files(workdir: Path) -> dict[str, Path]:
    """{"sft": sft/metrics.jsonl, "pm/pmp": ..., "pm": ...} in pipeline order (a sub-run first)."""
    out = {}
    for path in workdir.glob("**/metrics.jsonl"):
        rel = path.parent.relative_to(workdir)
        if rel.parts and not set(rel.parts) & _BULK_DIRS:
            out[rel.as_posix()] = path
    rank = {s: i for i, s in enumerate(ORDER)}
    key = lambda name: (rank.get(name.split("/")[0], len(rank)), -name.count("/"), name)  # noqa: E731
    return {name: out[name] for name in sorted(out, key=key)}


def _by_step(rows: list[dict]) -> list[dict]:
    by = {}
    for row in rows:
        by[int(row.get("step", len(by)))] = row
    return [by[k] for k in sorted(by)]


def _files(workdir: Path) -> list[tuple[str, int, int]]:
    out = []
    for root, dirs, names in os.walk(workdir, followlinks=True):
        rel_root = Path(root).relative_to(workdir)
        bulk = [d for d in dirs if d in _BULK_DIRS]
        for d in bulk:
            size = count = 0
            for r, _, fs in os.walk(Path(root) / d, followlinks=True):
                for f in fs:
                    size += (Path(r) / f).stat().st_size
                    count += 1
            out.append(((rel_root / d).as_posix() + "/", size, count))
        dirs[:] = sorted(d for d in dirs if d not in _BULK_DIRS)
        for name in sorted(names):
            if name.endswith(".tmp"):
                continue
            out.append(((rel_root / name).as_posix(), (Path(root) / name).stat().st_size, 1))
    # Top-level files first, then each stage's folder in pipeline order.
    rank = {s: i for i, s in enumerate(ORDER)}
    key = lambda row: ("/" in row[0], rank.get(row[0].split("/")[0], len(rank)), row[0])  # noqa: E731
    return sorted(out, key=key)


def load_run(workdir: str | os.PathLike, *, limit: int | None = None) -> RunData:
    """Everything the report and explorer show; `limit` caps the rows kept per section."""
    workdir = Path(workdir)
    config = _json(workdir / "config.json") or {}
    raw_timings = _json(workdir / "timings.json") or {}
    timings, profile = [], {}
    for name in _stage_order(raw_timings):
        t = raw_timings[name]
        seconds, resumed = (t.get("seconds"), bool(t.get("resumed"))) if isinstance(t, dict) else (t, False)
        timings.append((name, float(seconds), resumed))
        if isinstance(t, dict) and "run_s" in t:  # written before the launcher profiled stages: none
            profile[name] = {k: v for k, v in t.items() if k not in ("seconds", "resumed")}
    stage_dirs = [p.name for p in workdir.iterdir() if (p / "DONE").is_file()] if workdir.is_dir() else []
    records = {name: _json(workdir / name / "DONE") or {} for name in _stage_order(stage_dirs)}
    totals: dict[str, int] = {}
    revisions = {}
    # red_team (the SL-CAI data) before helpful, then any other kind.
    kinds = sorted(
        (p for p in (workdir / "revisions").glob("*") if p.is_dir()), key=lambda p: (p.name != "red_team", p.name)
    )
    for folder in kinds:
        if _shards(folder):
            revisions[folder.name], totals[f"revisions/{folder.name}"], _ = read_jsonl_capped(_shards(folder), limit)
    comparisons, totals["comparisons"], label_p_a = read_jsonl_capped(
        _shards(workdir / "feedback" / "comparisons"), limit, keep=lambda r: r.get("p_a")
    )
    metrics = {name: _by_step(read_jsonl_capped([p], None)[0]) for name, p in _metrics_files(workdir).items()}
    samples = {}
    for path in sorted(workdir.glob("*/samples.jsonl")):
        samples[path.parent.name], totals[f"samples/{path.parent.name}"], _ = read_jsonl_capped([path], limit)
    summary = _json(workdir / "eval" / "summary.json") or {}
    models = [m["name"] for m in summary.get("models", [])]
    eval_responses = {}
    for path in sorted((workdir / "eval" / "parts").glob("responses-*.json")):
        eval_responses[path.stem[len("responses-") :]] = _json(path) or {}
    order = {m: i for i, m in enumerate(models)}
    eval_responses = dict(sorted(eval_responses.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
    return RunData(
        workdir=workdir,
        config=config,
        timings=timings,
        profile=profile,
        records=records,
        revisions=revisions,
        comparisons=comparisons,
        label_p_a=[float(p) for p in label_p_a if p is not None],
        metrics=metrics,
        samples=samples,
        summary=summary,
        eval_responses=eval_responses,
        pm_eval=_json(workdir / "pm" / "eval.json") or {},
        judge_report=_json(workdir / "feedback" / "judge_report.json"),
        figures=sorted((workdir / "figures").glob("*.png")),
        captions=_json(workdir / "figures" / "captions.json") or {},
        files=_files(workdir) if workdir.is_dir() else [],
        totals=totals,
    )
