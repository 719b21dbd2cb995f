"""Every shipped ablation sweep (`configs/ablate_*.py:tiny`) runs to its `sweep_report.md`.

Each sweep runs as a user would run it (`python -m experiments.sweep`), on the tiny config: the
runs share the stages their configs have in common, and the cross-run figure and table are drawn.
Sweeps over revision settings train no preference model of their own; as the README says, they
are given one to score with (`--config.eval.scorer_pm`), here a tiny run's. Every sweep also
links that run's finished stages where their hashes match (`--reuse-from`), as a researcher reuses
a baseline: the label and KL sweeps then start at feedback and ppo, and the test stays within CI's
time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.config_util import load_config, load_config_module
from experiments.pipeline import stage_hashes
from experiments.stages import REGISTRY
from experiments.sweep import expand

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted(p.name for p in (ROOT / "configs").glob("ablate_*.py"))
BASELINE_STAGES = ("revisions", "sft", "feedback", "pm")
pytestmark = pytest.mark.slow


def _run(args: list[str], timeout: float = 1500) -> str:
    env = {**os.environ, "PYTHONHASHSEED": "0", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", *args, "--config.log.progress=False"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """A tiny run up to its preference model: the scorer of the sweeps that train none, and the
    finished stages every sweep may reuse."""
    workdir = tmp_path_factory.mktemp("scorer") / "run"
    _run(
        [
            "experiments.launch",
            "--config",
            "configs/tiny.py",
            "--workdir",
            str(workdir),
            "--stages",
            ",".join(BASELINE_STAGES),
        ]
    )
    return workdir


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_runs_to_its_report(name, baseline, tmp_path):
    spec = f"configs/{name}:tiny"
    module = load_config_module(spec)
    stages = getattr(module, "SWEEP_STAGES", "all")
    extra = ["--reuse-from", str(baseline)]
    if "pm" not in stages.split(","):
        extra.append(f"--config.eval.scorer_pm={baseline / 'pm' / 'export'}")
    out = _run(["experiments.sweep", "--config", spec, "--root", str(tmp_path), *extra])
    expanded = expand(spec)
    runs = [run for run, _, _ in expanded]
    # Every stage a run shares with the baseline (same hash) is the baseline's, linked, not rerun.
    shared = stage_hashes(load_config("configs/tiny.py"), REGISTRY)
    for run, cfg, _ in expanded:
        for stage, h in stage_hashes(cfg, REGISTRY).items():
            if stage in BASELINE_STAGES and h == shared[stage]:
                assert (tmp_path / run / stage).resolve() == (baseline / stage).resolve(), (run, stage)
    report = (tmp_path / "sweep_report.md").read_text()
    assert f"{len(runs)} runs done" in out
    for run in runs:
        assert run in report
        assert (tmp_path / run / "report.md").is_file(), run
    figures = sorted((tmp_path / "figures").glob("*.png"))
    if getattr(module, "SWEEP_FIGURE", None) in ("principles", "critique", "revisions", "kl", "rl"):
        assert figures, "the sweep's cross-run figure is missing"
    else:  # labels, pmp: a table of the runs
        assert "| " in report.split("Runs of the sweep")[1]
    assert all(f.stat().st_size > 1000 and f.name in report for f in figures), figures
