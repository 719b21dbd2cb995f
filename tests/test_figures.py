"""Figures and report: each figure writes a valid PNG (also with NaN / empty series), inputs are validated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cai_jax.eval.pm import pm_metrics
from experiments.figures import (
    fig_calibration,
    fig_critique_vs_direct,
    fig_principles,
    fig_revisions,
    fig_rl_training,
)
from experiments.markdown import label_ablation_table, write_report

NAN = float("nan")


def _assert_png(path):
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
        assert im.size[0] > 100 and im.size[1] > 100


def test_fig_revisions(tmp_path):
    scores = {"harmlessness": [-1.0, 0.2, 0.5, 0.6, 0.65], "helpfulness": [0.3, 0.1, 0.0, -0.05, -0.1]}
    errors = {"harmlessness": [0.1] * 5}
    _assert_png(fig_revisions(scores, tmp_path / "sub" / "fig5.png", errors=errors))
    # NaN points, an all-NaN series, an empty series and an empty dict all still draw.
    _assert_png(fig_revisions({"a": [1.0, NAN, 2.0], "b": [NAN, None], "c": []}, tmp_path / "nan.png"))
    _assert_png(fig_revisions({}, tmp_path / "empty.png"))
    with pytest.raises(ValueError, match=r"errors\['x'\] has no series in scores_by_round"):
        fig_revisions(scores, tmp_path / "bad.png", errors={"x": [0.1]})
    with pytest.raises(ValueError, match=r"errors\['harmlessness'\] has 2 values"):
        fig_revisions(scores, tmp_path / "bad.png", errors={"harmlessness": [0.1, 0.1]})
    with pytest.raises(ValueError, match="scores_by_round must be a dict"):
        fig_revisions([1.0, 2.0], tmp_path / "bad.png")


def test_fig_principles(tmp_path):
    per_round = {n: {"harmlessness": [0.0, 0.4 + 0.01 * n, 0.6 + 0.01 * n]} for n in (1, 2, 4, 8, 16)}
    _assert_png(fig_principles(per_round, tmp_path / "fig6.png"))
    final = {n: {"harmlessness": 0.5 + 0.01 * n, "helpfulness": NAN} for n in (1, 4, 16)}
    _assert_png(fig_principles(final, tmp_path / "fig6_final.png"))
    _assert_png(fig_principles({}, tmp_path / "fig6_empty.png"))
    with pytest.raises(ValueError, match="mixes floats"):
        fig_principles({1: {"h": 0.5}, 2: {"h": [0.1, 0.2]}}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="scores keys must be numbers of principles"):
        fig_principles({"four": {"h": 0.5}}, tmp_path / "bad.png")


def test_fig_critique_vs_direct(tmp_path):
    scores = {"critique": [0.0, 0.5, 0.7], "direct": [0.0, 0.4, 0.6]}
    _assert_png(fig_critique_vs_direct(scores, tmp_path / "fig7.png", errors={"direct": [0.0, 0.1, 0.1]}))
    _assert_png(fig_critique_vs_direct({"direct": [NAN]}, tmp_path / "fig7_nan.png"))
    with pytest.raises(ValueError, match="'critique' and/or 'direct'"):
        fig_critique_vs_direct({"critiques": [0.1]}, tmp_path / "bad.png")


def test_fig_rl_training(tmp_path):
    steps = [0, 100, 200, 300]
    series = {"harmlessness Elo": [0.0, 60.0, 110.0, 130.0], "helpfulness Elo": [0.0, 20.0, NAN, 10.0]}
    ci = {"harmlessness Elo": ([0.0, 40.0, 90.0, 100.0], [0.0, 80.0, 130.0, 160.0])}
    _assert_png(fig_rl_training(steps, series, tmp_path / "fig8.png", ci=ci))
    _assert_png(fig_rl_training([], {}, tmp_path / "fig8_empty.png"))
    with pytest.raises(ValueError, match=r"series\['x'\] has 2 values for 4 steps"):
        fig_rl_training(steps, {"x": [1.0, 2.0]}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"ci\['y'\] has no series"):
        fig_rl_training(steps, series, tmp_path / "bad.png", ci={"y": ([0] * 4, [1] * 4)})
    with pytest.raises(ValueError, match=r"series\['x'\] must be a list of numbers"):
        fig_rl_training(steps, {"x": "abcd"}, tmp_path / "bad.png")


def test_fig_calibration(tmp_path):
    rng = np.random.default_rng(0)
    margin = rng.normal(0.0, 2.0, 500)
    p = (rng.random(500) < 1.0 / (1.0 + np.exp(-margin))).astype(float)
    metrics = pm_metrics(margin, np.zeros(500), p, n_bins=5)
    _assert_png(fig_calibration(metrics, tmp_path / "fig9.png", label="AI feedback"))
    # The "bins" dict after a JSON round trip (lists, NaN in an empty bin), and a list of bin dicts.
    as_lists = {k: [float(v) for v in np.asarray(val)] for k, val in metrics["bins"].items()}
    as_lists["count"][0], as_lists["mean_pred"][0], as_lists["mean_target"][0] = 0, NAN, NAN
    rows = [{"count": 10, "mean_pred": 0.2, "mean_target": 0.25}, {"count": 0, "mean_pred": NAN, "mean_target": NAN}]
    _assert_png(fig_calibration({"soft": as_lists, "hard": rows, "cot": []}, tmp_path / "fig9_multi.png"))
    with pytest.raises(ValueError, match="lacks"):
        fig_calibration({"count": [1]}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="path must end in .png"):
        fig_calibration(rows, tmp_path / "fig9.jpg")


def test_label_ablation_table():
    results = {
        "soft": {"pm_accuracy": 0.7123, "ece": 0.031},
        "hard": {"pm_accuracy": 0.70, "ece": NAN},
        "cot 40-60": {"pm_accuracy": 0.69, "harmlessness_elo": 12.5},
    }
    assert label_ablation_table(results).splitlines() == [
        "| label type | pm_accuracy | ece | harmlessness_elo |",
        "|---|---:|---:|---:|",
        "| soft | 0.712 | 0.031 | - |",
        "| hard | 0.700 | NaN | - |",
        "| cot 40-60 | 0.690 | - | 12.500 |",
    ]
    assert label_ablation_table(results, metrics=["ece"], precision=1).splitlines()[2] == "| soft | 0.0 |"
    with pytest.raises(ValueError, match="results is empty"):
        label_ablation_table({})
    with pytest.raises(ValueError, match=r"results\['soft'\] must be a dict"):
        label_ablation_table({"soft": 0.7})


def test_write_report(tmp_path, monkeypatch):
    fig = fig_revisions({"harmlessness": [0.0, 1.0]}, tmp_path / "figures" / "fig5.png")
    table = label_ablation_table({"soft": {"acc": 0.7}})
    report = write_report(
        tmp_path / "report.md",
        config={"model": {"name": "tiny"}, "seed": 0, "path": tmp_path},
        stage_timings={"revisions": 30.0, "sft": 90.0},
        figures={"PM score vs revisions": fig, "Calibration": "figures/fig9.png"},
        tables={"Label ablation": table},
        notes=["demo run on CPU"],
    )
    text = report.read_text()
    assert text.startswith("# Constitutional AI run report")
    assert "| revisions | 30.0 | 25.0% |" in text and "| sft | 90.0 | 75.0% |" in text
    assert "| **total** | 120.0 | |" in text
    assert "![PM score vs revisions](figures/fig5.png)" in text  # absolute path made relative
    assert "(missing: `figures/fig9.png`)" in text
    assert "### Label ablation\n\n" + table in text
    assert "- demo run on CPU" in text
    assert '"name": "tiny"' in text and '"seed": 0' in text
    # A workdir given relative to the working directory (runs/demo): the figure path the report
    # stage passes is relative to the cwd, not to the report's folder; the link must still resolve.
    monkeypatch.chdir(tmp_path)
    fig_revisions({"harmlessness": [0.0, 1.0]}, Path("runs/demo/figures/fig5.png"))
    rel = write_report(
        Path("runs/demo/report.md"),
        config={},
        stage_timings={},
        figures={"Fig 5": Path("runs/demo/figures/fig5.png"), "Fig 9": "figures/fig9.png"},
        tables={},
    ).read_text()
    assert "![Fig 5](figures/fig5.png)" in rel and "(missing: `figures/fig9.png`)" in rel
    empty = write_report(tmp_path / "r2.md", config={}, stage_timings={}, figures={}, tables={}).read_text()
    assert "No stage ran." in empty and "No figures." in empty and "No tables." in empty
    with pytest.raises(ValueError, match=r"stage_timings\['sft'\] must be seconds"):
        write_report(tmp_path / "r3.md", config={}, stage_timings={"sft": "slow"}, figures={}, tables={})
    with pytest.raises(ValueError, match="path must end in .md"):
        write_report(tmp_path / "r.txt", config={}, stage_timings={}, figures={}, tables={})


def test_run_figures_draws_mc_calibration(tmp_path):
    """The eval's multiple-choice bins (mean_confidence / accuracy, cai_jax.eval.mc.calibration)
    feed the Fig. 9 panel beside the PM's bins (mean_pred / mean_target)."""
    from cai_jax.eval.mc import calibration
    from experiments.report import run_figures

    mc = calibration([0.9, 0.8, 0.6, 0.95], [1, 0, 1, 1], n_bins=5)
    bins = {k: [float(x) for x in v] for k, v in mc["bins"].items()}  # as summary.json holds them
    made = run_figures({"mc": {"hhh.jsonl": {"n": 4, "accuracy": 0.75, "bins": bins}}}, tmp_path)
    (caption,) = made
    assert caption.startswith("Fig. 9 analogue")
    _assert_png(made[caption])
