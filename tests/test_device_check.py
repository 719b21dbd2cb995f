"""benchmarks/device_check.py --smoke: every part of the device check runs, reduced, on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~1 to 2.5 min on 2 cores: every part compiles its own small programs
def test_device_check_smoke(tmp_path, smollm2_gguf):
    out = tmp_path / "check.json"
    cmd = [sys.executable, "-m", "benchmarks.device_check", "--smoke", "--json", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    result = json.loads(out.read_text())
    assert result["meta"]["smoke"] is True
    assert not [part for part in ("sft", "decode", "ppo", "tiny") if "error" in result[part]]
    assert result["sft"]["tokens_per_s"] > 0 and result["sft"]["batch"] == 2
    assert [row["batch"] for row in result["decode"]["rows"]] == [1]
    assert result["decode"]["rows"][0]["tokens_per_s"] > 0
    ppo = result["ppo"]
    assert abs(ppo["iteration_s"] - (ppo["rollout_s"] + ppo["scoring_s"] + ppo["train_s"])) < 1e-6
    assert set(result["tiny"]["stages_s"]) == {"revisions"}
    assert "| sft | MFU |" in r.stdout and "| decode | batch 1 |" in r.stdout
