"""A small run folder written file by file, in the layout the stages write (README.md, "Run folder"),
with texts that try to break an HTML page: markup, entities, quotes, control characters.

Used by tests/test_explorer.py and tests/test_explorer_browser.py; the real stages' output is
checked against the same page by tests/test_launch_tiny.py.
"""

from __future__ import annotations

import json
from pathlib import Path

NASTY = (
    '<script>console.error("xss")</script>',
    '<img src=x onerror="console.error(1)">',
    "&amp; &lt;b&gt; \"double\" 'single' `back` </textarea></div></pre>",
    "controls: \x00 \x07 \x1b[31m \r\n end \x7f \x85",
    "unicode: naïve café 漢字 🙂 \u200b zero-width",
    "{{ jinja }} {% raw %} ${js} \\n",
)
STAGES_ALPHABETICAL = ("eval", "feedback", "pm", "ppo", "report", "revisions", "sft")


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")


def revision_rows() -> list[dict]:
    principles = ["harm", "honesty", "privacy"]
    rows = []
    for i in range(5):
        rounds = []
        for r in range(2):
            rounds.append(
                {
                    "principle_id": principles[(i + r) % 3],
                    "critique_request": f"critique request {i}.{r} {NASTY[(i + r) % len(NASTY)]}",
                    "critique": f"critique {i}.{r} uniqueword{i}x{r} {NASTY[(i + 2 * r) % len(NASTY)]}",
                    "revision_request": f"revision request {i}.{r}",
                    "revision": f"revision {i}.{r} {NASTY[(i + r + 1) % len(NASTY)]}",
                }
            )
        rows.append(
            {
                "id": f"rt-{i:04d}",
                "prompt": f"prompt {i} {NASTY[i % len(NASTY)]}",
                "initial_response": f"answer {i} {NASTY[(i + 3) % len(NASTY)]}",
                "rounds": rounds,
                "seed": 0,
            }
        )
    return rows


def comparison_rows() -> list[dict]:
    rows = []
    for i, p in enumerate([0.91, 0.5, 0.23, 0.64]):
        rows.append(
            {
                "prompt_id": f"rt-{i:04d}",
                "index": i,
                "prompt": f"compare {i} {NASTY[i]}",
                "response_a": f"A{i} {NASTY[(i + 1) % len(NASTY)]}",
                "response_b": f"B{i} {NASTY[(i + 2) % len(NASTY)]}",
                "principle_ids": ["fb_harm" if i % 2 else "fb_honest"],
                "p_a_first": [min(1.0, p + 0.05)],
                "p_a_swapped": [max(0.0, p - 0.05)],
                "p_a_members": [p],
                "p_a": p,
                "cot_texts": [],
                "swap_cot_texts": [],
            }
        )
    return rows


def sample_rows() -> list[dict]:
    return [
        {"iteration": it, "prompt": f"ppo prompt {it}.{k} {NASTY[k]}", "response": f"resp {it}.{k} {NASTY[k + 1]}",
         "score": 0.1 * it - 0.03 * k, "kl": 0.01 * k}
        for it in (1, 3) for k in range(3)
    ]  # fmt: skip


def make_run(workdir: Path) -> dict:
    """Writes the run folder; returns the rows it wrote by section."""
    workdir = Path(workdir)
    config = {"seed": 0, "model": {"name": NASTY[0]}, "ppo": {"rollout_batch_size": 4}, "log": {}}
    _json(workdir / "config.json", config)
    # timings.json is written in completion order by the launcher and read back sorted here.
    _json(
        workdir / "timings.json",
        {s: {"seconds": 1.0 + i, "resumed": s == "pm"} for i, s in enumerate(STAGES_ALPHABETICAL)},
    )
    for s in STAGES_ALPHABETICAL:
        _json(
            workdir / s / "DONE",
            {"hash": "0" * 16, "seconds": 1.0, "resumed": s == "pm", "summary": {"note": NASTY[1]}},
        )
    revisions = revision_rows()
    _jsonl(workdir / "revisions/red_team/rows-p000-b000000.jsonl", revisions[:3])
    _jsonl(workdir / "revisions/red_team/rows-p000-b000001.jsonl", revisions[3:])
    helpful = [{"id": "hp-0000", "prompt": "helpful prompt", "initial_response": NASTY[2], "rounds": [], "seed": 0}]
    _jsonl(workdir / "revisions/helpful/rows-p000-b000000.jsonl", helpful)
    comparisons = comparison_rows()
    _jsonl(workdir / "feedback/comparisons/rows-p000-b000000.jsonl", comparisons)
    samples = sample_rows()
    _jsonl(workdir / "ppo/samples.jsonl", samples)
    ppo_metrics = [
        {"step": s, "objective/scores": 0.1 * s, "objective/kl": 0.02 * s, "response/no_eos_frac": nf,
         "response/length_mean": 8.0, "loss": 1.0 / s}
        for s, nf in ((1, 1.0), (2, 0.75), (3, 0.5))
    ]  # fmt: skip
    _jsonl(workdir / "ppo/metrics.jsonl", ppo_metrics)
    _jsonl(workdir / "sft/metrics.jsonl", [{"step": s, "loss": 3.0 - s, "lr": 1e-3} for s in (1, 2, 3)])
    _json(
        workdir / "pm/eval.json",
        {"eval": {"n": 40, "accuracy": 0.9, "n_p_half": 0, "log_loss": 0.4, "brier": 0.1, "ece": 0.05}},
    )
    goodhart = {"n": 3, "mean_chars": 5.0, "refusal_rate": 1 / 3, "evasive_rate": 0.0}
    summary = {
        "models": [
            {"name": "helpful", "ppo_step": None},
            {"name": "sl-cai", "ppo_step": 0},
            {"name": "rl-cai@3", "ppo_step": 3},
        ],
        "elo": {
            "harmlessness": {
                "helpful": {"elo": 0.0, "lo": 0.0, "hi": 0.0, "n": 6},
                "sl-cai": {"elo": 3.0, "lo": -9.0, "hi": 15.0, "n": 6},
                "rl-cai@3": {"elo": 60.0, "lo": 40.0, "hi": 80.0, "n": 6},
            }
        },
        "pm_scores": {m: {"harmlessness": 0.1, "harmlessness_stderr": 0.05} for m in ("helpful", "sl-cai", "rl-cai@3")},
        "revision_scores": {
            "rounds": [0, 1, 2],
            "harmlessness": {"mean": [0.0, 0.5, 1.0], "stderr": [0.1, 0.1, 0.1], "n": 5},
        },
        "goodhart": {m: {"harmlessness": goodhart} for m in ("helpful", "sl-cai", "rl-cai@3")},
        "notes": [],
    }
    _json(workdir / "eval/summary.json", summary)
    for m in ("helpful", "sl-cai", "rl-cai@3"):
        _json(workdir / f"eval/parts/responses-{m}.json", {"harmlessness": ["abcde", "xyz" + NASTY[0], "12345678"]})
    _json(
        workdir / "feedback/judge_report.json",
        {
            "position_bias": 0.12,
            "flip_rate": 0.25,
            "per_principle": [{"principle": "fb_harm", "n": 2, "flip_rate": 0.5}, {"principle": NASTY[0], "n": 2}],
        },
    )
    from experiments.figures import fig_revisions

    fig_revisions({"harmlessness": [0.0, 0.5, 1.0]}, workdir / "figures" / "fig5_revisions.png")
    return {
        "revisions": revisions,
        "helpful": helpful,
        "comparisons": comparisons,
        "samples": samples,
        "config": config,
    }
