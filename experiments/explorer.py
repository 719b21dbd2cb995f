"""`<workdir>/report.html`: one self-contained page to read a run by (no server, no network).

    python -m experiments.explorer runs/demo          # writes runs/demo/report.html

    from experiments.explorer import write_explorer
    write_explorer("runs/demo")                        # -> Path("runs/demo/report.html")

The page shows what Constitutional AI is checked by reading: every revision chain (initial answer,
then each round's principle, critique and revision; filter by principle, search), every AI-labelled
comparison (both responses, principles, p(A) in each order and the final label; sortable by
confidence), the RL samples by iteration side by side with their score (and any per-sample field a
stage logs, e.g. a KL), small plots of every training metric, the eval's tables and figures, the
generated "what this run shows" list, the config, stage timings in pipeline order and where each
artifact lives. Any `feedback/judge_report.json` and any stage's `samples.jsonl` are shown when
present.

How it is built, and why: the run folder is read by experiments/run_folder.py; one Jinja2 template
(jinja2 is already a dependency) with autoescaping renders it, so every model output, prompt and
config value is HTML-escaped, and control characters are made visible (`display_text`); the page's
only script is ~60 lines of vanilla JavaScript inlined from templates/explorer.js (filters, search,
sorting) that reads data attributes, never HTML strings; figures are embedded as base64 data URIs
and training curves are inline SVG drawn here, so the file opens from disk, offline, anywhere. No
front-end framework or plotting library: the page has to outlive the environment that wrote it.
"""

from __future__ import annotations

import base64
import datetime
import fnmatch
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import jinja2
from markupsafe import Markup

from cai_jax import atomic
from experiments import findings as F
from experiments import tables as T
from experiments.run_folder import RunData, load_run

__all__ = ["display_text", "render_explorer", "write_explorer"]

TEMPLATES = Path(__file__).resolve().parent / "templates"
MAX_ROWS = 2000  # rows per section (revisions of one kind, comparisons, samples of one stage)

# Where each artifact lives (first matching pattern wins); README.md "Run folder" and "The stages".
ARTIFACTS = (
    ("config.json", "the resolved config of the run"),
    ("timings.json", "wall time of each stage and where it went (compile, checkpoints, exports, loads)"),
    ("report.md", "the report: what the run shows, figures, tables with intervals"),
    ("report.html", "this page"),
    ("*/DONE", "stage finished: its config hash, wall time and summary"),
    ("*/STARTED", "stage started under this hash (resume marker)"),
    ("revisions/*/rows-*.jsonl", "revision chains, one row per prompt with every round"),
    ("revisions/*/cleanup-*.json", "counts of cleaned-up generated text (echoed labels, boilerplate)"),
    ("*/meta.json", "settings and fingerprint the shards were made with (resume check)"),
    ("*/DONE-p*", "a process finished its shards"),
    ("sft/export/", "the SL-CAI model, HF-format safetensors folder"),
    ("feedback/comparisons/rows-*.jsonl", "AI-labelled comparisons: two responses, principles, p(A)"),
    ("feedback/judge_report.json", "judge diagnostics: position bias, flip rate, per-principle table"),
    ("pm/export/", "the preference model (backbone, score head, reward mean/std)"),
    ("pm/eval.json", "PM held-out accuracy, calibration bins, reward statistics"),
    ("pm/pmp/*", "preference-model pretraining run"),
    ("*/snapshots/", "policy exports at the eval's PPO iterations"),
    ("*/samples.jsonl", "RL samples: iteration, prompt, response, score"),
    ("*/metrics.jsonl", "one row of training metrics per step"),
    ("*/checkpoints/", "train-state checkpoints (only needed to resume)"),
    ("eval/summary.json", "everything the eval measured (schema in experiments/eval_stage.py)"),
    ("eval/parts/responses-*.json", "each model's responses to the held-out prompts"),
    ("eval/parts/*.json", "one finished part of the eval (resume unit)"),
    ("figures/*.png", "the paper's figure analogues"),
    ("figures/captions.json", "each figure's caption"),
    ("tensorboard/", "TensorBoard event files"),
    ("wandb/", "Weights & Biases run files (offline: `wandb sync` uploads them)"),
)

_CONTROL = {c: chr(0x2400 + c) for c in range(32) if c not in (9, 10)} | {0x7F: "\u2421"}


def display_text(text) -> str:
    """Model output as shown: C0 controls (but tab and newline) as their Unicode control pictures,
    C1 controls and lone surrogates as \\x.. / \\u.... escapes; everything else unchanged."""
    s = "" if text is None else str(text)
    out = []
    for ch in s:
        c = ord(ch)
        if c in _CONTROL:
            out.append(_CONTROL[c])
        elif 0x80 <= c <= 0x9F:
            out.append(f"\\x{c:02x}")
        elif 0xD800 <= c <= 0xDFFF:
            out.append(f"\\u{c:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _num(x, digits: int = 4) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "" if x is None else str(x)
    if isinstance(x, int):
        return str(x)
    return "NaN" if math.isnan(x) else f"{x:.{digits}g}"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def svg_curve(steps: Sequence[float], values: Sequence[float], *, width: int = 260, height: int = 110) -> Markup:
    """An inline SVG line plot of values against steps (non-finite values break the line)."""
    pts = [(float(s), float(v)) for s, v in zip(steps, values) if _finite(v) and _finite(s)]
    if not pts:
        return Markup('<svg class="curve" width="0" height="0"></svg>')
    pad_l, pad_r, pad_t, pad_b = 62, 8, 8, 20
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    sx = (width - pad_l - pad_r) / ((x1 - x0) or 1.0)
    sy = (height - pad_t - pad_b) / ((y1 - y0) or 1.0)
    X = lambda x: pad_l + (x - x0) * sx  # noqa: E731
    Y = lambda y: height - pad_b - (y - y0) * sy if y1 > y0 else (height - pad_b + pad_t) / 2  # noqa: E731
    segments, cur = [], []
    for s, v in zip(steps, values):
        if _finite(v) and _finite(s):
            cur.append(f"{X(float(s)):.1f},{Y(float(v)):.1f}")
        elif cur:
            segments.append(cur)
            cur = []
    if cur:
        segments.append(cur)
    lines = "".join(
        f'<polyline points="{" ".join(seg)}"/>'
        if len(seg) > 1
        else f'<circle cx="{seg[0].split(",")[0]}" cy="{seg[0].split(",")[1]}" r="2"/>'
        for seg in segments
    )
    labels = (
        f'<text x="{pad_l - 4}" y="{pad_t + 8}" text-anchor="end">{_num(y1, 3)}</text>'
        f'<text x="{pad_l - 4}" y="{height - pad_b}" text-anchor="end">{_num(y0, 3)}</text>'
        f'<text x="{pad_l}" y="{height - 4}">{_num(x0)}</text>'
        f'<text x="{width - pad_r}" y="{height - 4}" text-anchor="end">{_num(x1)}</text>'
    )
    box = f'<rect x="{pad_l}" y="{pad_t}" width="{width - pad_l - pad_r}" height="{height - pad_t - pad_b}"/>'
    return Markup(f'<svg class="curve" width="{width}" height="{height}" role="img">{box}{lines}{labels}</svg>')


def _curves(run: RunData) -> list[dict]:
    """[{"name": metrics file, "plots": [{"key", "svg", "last"}]}] of every numeric metric."""
    out = []
    for name, rows in run.metrics.items():
        steps = [r.get("step") for r in rows]
        keys = list(
            dict.fromkeys(k for r in rows for k, v in r.items() if _finite(v) and k not in ("step", "iteration"))
        )
        plots = []
        for key in keys:
            values = [r.get(key) for r in rows]
            last = next((v for v in reversed(values) if _finite(v)), None)
            plots.append({"key": key, "svg": svg_curve(steps, values), "last": _num(last)})
        out.append({"name": name, "path": f"{name}/metrics.jsonl", "plots": plots})
    return out


def _label(p_a) -> str:
    if not _finite(p_a):
        return "?"
    return "A" if p_a > 0.5 else "B" if p_a < 0.5 else "tie"


def _comparisons(run: RunData) -> list[dict]:
    out = []
    for i, r in enumerate(run.comparisons):
        p = r.get("p_a")
        out.append(
            {
                "i": i,
                "row": r,
                "principles": list(r.get("principle_ids") or []),
                "confidence": max(p, 1.0 - p) if _finite(p) else float("nan"),
                "label": _label(p),
                "cots": [t for t in (r.get("cot_texts") or []) + (r.get("swap_cot_texts") or []) if t],
            }
        )
    return out


def _samples(run: RunData) -> list[dict]:
    """[{"stage", "iterations": [{"iteration", "metrics": {..}, "samples": [..]}]}]."""
    out = []
    for stage in F.rl_stages(run):
        by_step = {int(m["step"]): m for m in run.metrics.get(stage, []) if "step" in m}
        groups: dict[int, list[dict]] = {}
        for s in run.samples.get(stage, []):
            groups.setdefault(int(s.get("iteration", -1)), []).append(s)
        iters = []
        for it in sorted(groups):
            m = by_step.get(it, {})
            head = {k: m[k] for k in ("objective/scores", "objective/kl", "response/no_eos_frac") if k in m}
            iters.append({"iteration": it, "metrics": head, "samples": groups[it]})
        if iters:
            extra = sorted({k for g in groups.values() for s in g for k in s} - {"iteration", "prompt", "response"})
            out.append({"stage": stage, "iterations": iters, "fields": extra})
    return out


def _artifacts(run: RunData) -> list[dict]:
    rows = []
    for path, size, count in run.files:
        what = next((d for pat, d in ARTIFACTS if fnmatch.fnmatch(path, pat) or path == pat), "")
        rows.append({"path": path, "size": size, "count": count, "what": what})
    return rows


def _figures(run: RunData) -> list[dict]:
    out = []
    for png in run.figures:
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        out.append(
            {"name": png.name, "caption": run.captions.get(png.name, png.stem), "uri": f"data:image/png;base64,{data}"}
        )
    return out


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,  # every {{ value }} is HTML-escaped, in text and in attributes
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["t"] = display_text
    env.filters["num"] = _num
    env.filters["prob"] = lambda x: f"{x:.3f}" if _finite(x) else _num(x)
    env.filters["tojson_attr"] = lambda v: json.dumps(v, ensure_ascii=True)
    return env


def render_explorer(run: RunData) -> str:
    """The page's HTML for a loaded run (see `write_explorer`)."""
    principles = sorted({r["principle_id"] for rows in run.revisions.values() for row in rows for r in row["rounds"]})
    comparisons = _comparisons(run)
    timings = T.stage_timings_table(
        {n: t for n, t, _ in run.timings}, run.profile, resumed={n for n, _, r in run.timings if r}
    )
    return (
        _environment()
        .get_template("explorer.html")
        .render(
            run=run,
            title=run.workdir.resolve().name,
            generated=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            findings=F.findings(run),
            principles=principles,
            feedback_principles=sorted({p for c in comparisons for p in c["principles"]}),
            comparisons=comparisons,
            rl=_samples(run),
            curves=_curves(run),
            tables=T.run_tables(run),
            figures=_figures(run),
            eval_kinds=sorted({k for r in run.eval_responses.values() for k in r}),
            timings=timings if run.timings else None,
            artifacts=_artifacts(run),
            config_json=json.dumps(run.config, indent=2, sort_keys=False, default=str),
            records_json={k: json.dumps(v.get("summary", {}), indent=1, default=str) for k, v in run.records.items()},
            max_rows=MAX_ROWS,
            script=Markup((TEMPLATES / "explorer.js").read_text()),
            style=Markup((TEMPLATES / "explorer.css").read_text()),
        )
    )


def write_explorer(workdir, *, max_rows: int = MAX_ROWS) -> Path:
    """Writes `<workdir>/report.html` from the run folder's files alone and returns its path.

    Args:
      workdir: the run folder (any subset of stages may have run).
      max_rows: rows kept per section; the page says how many more the files hold.
    """
    workdir = Path(workdir)
    run = load_run(workdir, limit=max_rows)
    html = render_explorer(run)
    out = workdir / "report.html"
    atomic.write_text(out, html, fsync=False)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m experiments.explorer WORKDIR")
    print(write_explorer(sys.argv[1]))
