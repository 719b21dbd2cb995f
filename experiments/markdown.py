"""report.md and its tables: the markdown half of a run's (or a sweep's) report.

`write_report` writes the file (what the run shows, stage timings in pipeline order, figures by
relative path, tables, notes and the config); `label_ablation_table` is the sec. 4.3 table of a
label sweep. The figures themselves are drawn by `experiments/figures.py`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cai_jax import atomic
from experiments.figures import _mapping
from experiments.tables import stage_timings_table

__all__ = ["label_ablation_table", "write_report"]


def _fmt(v, precision: int) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
        return str(v)
    v = float(v)
    return "NaN" if math.isnan(v) else f"{v:.{precision}f}"


def label_ablation_table(results: Mapping[str, Mapping[str, float]], *, metrics=None, precision: int = 3) -> str:
    """Sec. 4.3 label ablation as a markdown table: one row per label type, one column per metric.

    Args:
      results: {label type: {metric: value}}, e.g. {"soft": {"pm_accuracy": 0.71, "ece": 0.03},
        "hard": {...}, "cot clamped 40-60": {...}}.
      metrics: the columns, in order; default the metrics in order of first appearance.
      precision: decimals of float values. Missing values print as "-", NaN as "NaN".
    """
    _mapping("results", results)
    if not results:
        raise ValueError("results is empty")
    for name, row in results.items():
        _mapping(f"results[{name!r}]", row)
    if metrics is None:
        metrics = list(dict.fromkeys(m for row in results.values() for m in row))
    lines = ["| label type | " + " | ".join(map(str, metrics)) + " |", "|---|" + "---:|" * len(metrics)]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(m), precision) for m in metrics) + " |")
    return "\n".join(lines)


def _timings_table(stage_timings: Mapping[str, float], stage_profile: Mapping[str, Mapping]) -> list[str]:
    header, rows = stage_timings_table(stage_timings, stage_profile)
    rows[-1][0] = f"**{rows[-1][0]}**"
    row = lambda cells: "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"
    return [row(header), "|---|" + "---:|" * (len(header) - 1)] + [row(r) for r in rows]


def write_report(
    path,
    *,
    config: Mapping,
    stage_timings: Mapping[str, float],
    figures: Mapping[str, str],
    tables: Mapping[str, str],
    notes: Sequence[str] = (),
    title: str = "Constitutional AI run report",
    findings: Sequence[str] = (),
    stage_profile: Mapping[str, Mapping] | None = None,
):
    """Writes report.md: what the run shows, stage wall times (and where they went), figures (by
    relative path), tables, notes and the config.

    Args:
      path: the .md file to write (parent folders are created).
      config: the resolved config (JSON-serialisable; other values are written with str()).
      stage_timings: {stage: wall-clock seconds}, in pipeline order.
      figures: {caption: png path}; a relative path is taken relative to the report's folder, or
        to the working directory when only that resolves; links are written relative to the
        report's folder. A missing file is listed as missing.
      tables: {title: markdown table}.
      notes: free-text lines, written as a list.
      findings: generated statements ("what this run shows"), written as a list first.
      stage_profile: {stage: timings.json's profile of it} ("compile_s", "checkpoint_s",
        "export_s", "load_s", "run_s", "cache": {"hits", "misses"}, "peak_rss_gb";
        cai_jax/profiling.py): one column each beside the wall time; a stage without one shows "-".
    """
    path = Path(path)
    if path.suffix.lower() != ".md":
        raise ValueError(f"path must end in .md, got {str(path)!r}")
    _mapping("config", config)
    for name, seconds in _mapping("stage_timings", stage_timings).items():
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float, np.number)):
            raise ValueError(f"stage_timings[{name!r}] must be seconds (a number), got {seconds!r}")
    for arg, lines in (("notes", notes), ("findings", findings)):
        if isinstance(lines, (str, bytes)):
            raise ValueError(f"{arg} must be a list of str, not one str")
    path.parent.mkdir(parents=True, exist_ok=True)
    out = [f"# {title}", ""]
    if findings:
        out += ["## What this run shows", ""] + [f"- {f}" for f in findings] + [""]
    out += ["## Stage timings (pipeline order)", ""]
    if stage_timings:
        out += _timings_table(stage_timings, _mapping("stage_profile", stage_profile or {}))
    else:
        out.append("No stage ran.")
    out += ["", "## Figures", ""]
    for caption, fig_path in _mapping("figures", figures).items():
        if not isinstance(fig_path, (str, os.PathLike)):
            raise ValueError(f"figures[{caption!r}] must be a path, got {fig_path!r}")
        fig = Path(fig_path)
        if not fig.is_absolute() and not (path.parent / fig).exists() and fig.exists():
            fig = fig.absolute()  # a path relative to the working directory (e.g. runs/demo/figures/x.png)
        rel = Path(os.path.relpath(fig, path.parent)) if fig.is_absolute() else fig
        if (path.parent / rel).exists():
            out += [f"### {caption}", "", f"![{caption}]({rel.as_posix()})", ""]
        else:
            out += [f"### {caption}", "", f"(missing: `{rel.as_posix()}`)", ""]
    if not figures:
        out += ["No figures.", ""]
    out += ["## Tables", ""]
    for table_title, table in _mapping("tables", tables).items():
        if not isinstance(table, str):
            raise ValueError(f"tables[{table_title!r}] must be a markdown str, got {type(table).__name__}")
        out += [f"### {table_title}", "", table.rstrip(), ""]
    if not tables:
        out += ["No tables.", ""]
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    out += ["## Config", "", "```json", json.dumps(config, indent=2, default=str), "```", ""]
    atomic.write_text(path, "\n".join(out), fsync=False)
    return path
