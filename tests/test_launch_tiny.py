"""configs/tiny.py end to end through `python -m experiments.launch`: every stage, the report and
every figure; then a run killed mid-stage (SIGKILL) and relaunched ends identical to the
uninterrupted one."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _launch(workdir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "experiments.launch", "--config", "configs/tiny.py", "--workdir", str(workdir), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _finite(x) -> bool:
    if isinstance(x, float):
        return math.isfinite(x)
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    return True


def _metrics(path: Path) -> dict[int, dict]:
    rows = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        row = {k: v for k, v in row.items() if not k.startswith("time") and "per_s" not in k and k != "mfu"}
        rows[int(row["step"])] = row  # a resumed run repeats the steps after its last checkpoint
    return rows


def _outcome(workdir: Path) -> dict:
    """What must not depend on an interruption: artifacts and metrics (not timings)."""
    out = {"summary": json.loads((workdir / "eval" / "summary.json").read_text())}
    for stage in ("sft", "pm", "ppo"):
        out[f"{stage}_metrics"] = _metrics(workdir / stage / "metrics.jsonl")
    for stage in ("revisions", "feedback"):
        done = json.loads((workdir / stage / "DONE").read_text())
        out[f"{stage}_summary"] = done["summary"]
    rows = []
    for f in sorted((workdir / "feedback" / "comparisons").glob("rows-*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines()]
    out["comparisons"] = rows
    return out


_OUTPUT: dict[str, str] = {}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny") / "run"
    t0 = time.perf_counter()
    out = _finish(_launch(workdir))
    _OUTPUT["first launch"] = out  # for the quiet-logging check
    return workdir, time.perf_counter() - t0


def test_tiny_config_runs_every_stage(tiny_run):
    workdir, seconds = tiny_run
    for stage in ("revisions", "sft", "feedback", "pm", "ppo", "eval", "report"):
        assert (workdir / stage / "DONE").is_file(), stage
    report = (workdir / "report.md").read_text()
    figures = sorted(p.name for p in (workdir / "figures").glob("*.png"))
    assert figures == ["fig5_revisions.png", "fig8_elo.png", "fig8_ppo_training.png", "fig9_calibration.png"]
    for name in figures:
        assert (workdir / "figures" / name).stat().st_size > 1000
        assert name in report
    summary = json.loads((workdir / "eval" / "summary.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["helpful", "sl-cai", "rl-cai@1", "rl-cai@3"]
    assert _finite(summary["pm_scores"]) and _finite(summary["elo"]) and _finite(summary["revision_scores"])
    for stage in ("sft", "pm", "ppo"):
        for row in _metrics(workdir / stage / "metrics.jsonl").values():
            assert _finite({k: v for k, v in row.items() if isinstance(v, float)}), (stage, row)
    assert (workdir / "sft" / "export" / "config.json").is_file()
    assert (workdir / "pm" / "export" / "pm.json").is_file()
    # Finished: a relaunch skips every stage.
    out = _finish(_launch(workdir))
    assert "starting" not in out and "resuming" not in out


def test_tiny_run_report_html_shows_every_row(tiny_run):
    """The report stage's report.html holds every revision round, comparison and PPO sample of the
    run, read back by parsing the page (rows found through the engines' own shard lists)."""
    from cai_jax.cai.feedback import comparison_files
    from cai_jax.cai.revisions import revision_files
    from experiments.explorer import display_text
    from tests._html import Page

    workdir, _ = tiny_run
    page = Page((workdir / "report.html").read_text(encoding="utf-8"))
    read = lambda files: [json.loads(line) for f in files for line in Path(f).read_text().splitlines()]  # noqa: E731
    chains = {(r["attrs"]["data-kind"], r["attrs"]["data-id"]): r for r in page.of("revision")}
    n_rounds = 0
    for kind in ("red_team", "helpful"):
        for row in read(revision_files(workdir / "revisions" / kind)):
            shown = chains.pop((kind, row["id"]))
            assert shown["fields"]["initial_response"] == display_text(row["initial_response"])
            assert [r["fields"]["revision"] for r in shown["rounds"]] == [
                display_text(r["revision"]) for r in row["rounds"]
            ]
            assert [r["fields"]["critique"] for r in shown["rounds"]] == [
                display_text(r["critique"]) for r in row["rounds"]
            ]
            assert [r["fields"]["principle_id"] for r in shown["rounds"]] == [r["principle_id"] for r in row["rounds"]]
            n_rounds += len(row["rounds"])
    assert not chains and n_rounds == 10  # 5 red-team prompts x 2 rounds
    comparisons = read(comparison_files(workdir / "feedback" / "comparisons"))
    shown = sorted(
        (r["fields"]["response_a"], r["fields"]["response_b"], r["values"]["p_a"]) for r in page.of("comparison")
    )
    assert shown == sorted(
        (display_text(c["response_a"]), display_text(c["response_b"]), c["p_a"]) for c in comparisons
    )
    samples = read([workdir / "ppo" / "samples.jsonl"])
    shown = sorted(
        (int(r["attrs"]["data-iteration"]), r["fields"]["response"], r["values"]["score"]) for r in page.of("sample")
    )
    assert shown == sorted((s["iteration"], display_text(s["response"]), s["score"]) for s in samples)
    assert len(samples) == 12  # 3 iterations x 4 samples
    report = (workdir / "report.md").read_text()
    assert "## What this run shows" in report and "without EOS" in report
    # Quiet by default (experiments/quiet.py): no third-party advisories or progress bars.
    out = _OUTPUT["first launch"]
    assert "PyTorch was not found" not in out and "Generating train split" not in out


def test_killed_mid_stage_and_relaunched_ends_identical(tiny_run, tmp_path):
    reference, _ = tiny_run
    workdir = tmp_path / "run"
    proc = _launch(workdir)
    marker = workdir / "ppo" / "checkpoints" / "2"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "ppo" / "DONE").exists()
    out = _finish(_launch(workdir))
    assert "stage ppo (resuming" in out
    assert _outcome(workdir) == _outcome(reference)
