"""The whole graph learns: revisions -> sft -> feedback -> pm -> ppo -> eval with a judge of known taste.

The embedded 135M model is at chance as a judge, so nothing in a demo run shows whether the
stages agree where they meet. Here the judge is `tests.judges.prefers_property` (a Python judge,
`feedback_model.name = "python:..."`): it prefers, whatever the principle, the response that
contains "!" (`tests.judges.has_property`). The models are random 2-layer Llamas over the
character-level tokenizer of tests/testdata/tiny-chat (about 100 tokens), so "!" is neither rare
nor common in a random model's samples and a model this small can learn to read and write it.

What must come out:
- the PM, trained on the judge's labels, agrees with the preference on held-out comparisons;
- PPO against that PM raises the property's rate on held-out prompts well above SL-CAI's;
- so does every other RL-CAI objective (`rl.algorithm`): RLOO against the same PM, and DPO and IPO
  on the judge's comparisons, each run as a fork of the PPO run (the stages before ppo linked).

Measured with this configuration (seeds 0, 1, 2; 80 held-out prompts, 40 red-team and 40
helpful, one sample per prompt and model at T = 1; 130-140 s per run on 2 cores with a warm
compilation cache):
- PM held-out accuracy on the pairs the judge does not tie: 1.00, 1.00, 1.00 (n = 18, 24, 12);
- property rate, SL-CAI -> RL-CAI after 30 PPO iterations: 0.125 -> 0.963, 0.163 -> 0.938,
  0.138 -> 0.963 (differences 0.84, 0.78, 0.83).
The other objectives, measured on seed 0 with the settings of `OBJECTIVES` (about 30 s each):
SL-CAI 0.125 -> RLOO 0.912, DPO 0.875, IPO 0.938 (differences 0.79, 0.75, 0.81). Their seed spread
was not measured; the same 0.5 bar stays more than five binomial standard errors below each.
The thresholds: accuracy >= 0.9 (the issue's bar) on at least 10 untied held-out pairs; rate
difference >= 0.5, far below the smallest measured 0.78: the binomial standard error of a
difference of two rates near 0.15 and 0.95 over 80 prompts is about 0.045, and the seeds' spread
(0.78-0.84) is small against the gap, so 0.5 fails when the learning signal is lost, not by chance.
Reading the PM one token away from where it was trained (the seam bug this test was written
for) is caught by `tests/test_seams.py` as well.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.judges import has_property

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

ITERATIONS = 30
OVERRIDES = {
    "model.name": "tests/testdata/tiny-chat",
    "model.init": "random",
    "model.random_config.max_position_embeddings": 2048,
    "feedback_model.name": "python:tests.judges:prefers_property",
    "prompts.num_red_team": 0,
    "prompts.num_helpful": 0,
    "prompts.max_chars": 160,
    "revisions.num_prompts": 32,
    "revisions.num_revisions": 1,
    "revisions.max_new_tokens": 24,
    "revisions.helpful_max_new_tokens": 24,
    "revisions.batch_size": 32,
    "sft.num_steps": 20,
    "sft.batch_size": 8,
    "sft.seq_len": 256,
    "feedback.max_new_tokens": 16,
    "feedback.batch_size": 40,
    "pm.pmp.enabled": False,
    "pm.num_steps": 60,
    "pm.batch_size": 16,
    "pm.seq_len": 192,
    "pm.eval_fraction": 0.3,
    "pm.helpful_fraction": 0.3,
    "pm.optim.lr": 1e-3,
    "ppo.num_iterations": ITERATIONS,
    "ppo.rollout_batch_size": 16,
    "ppo.minibatch_size": 8,
    "ppo.micro_batch_size": 8,
    "ppo.ppo_epochs": 2,
    "ppo.max_new_tokens": 16,
    "ppo.kl_coef": 0.02,
    "ppo.optim.lr": 3e-3,
    "eval.num_prompts": 40,
    "eval.max_new_tokens": 16,
    "eval.elo_snapshots": (-1,),
    "eval.n_bootstrap": 20,
    "eval.revision_rounds": False,
    "log.progress": False,
}


# Per objective: its section's settings, sized like PPO's run (30 iterations of 16 rollouts; DPO /
# IPO 60 updates of 16 of the judge's comparisons). IPO's beta is small because its target margin is
# (p - 1/2) / beta: with beta = 0.1 it reached 0.64, with 0.02 0.94.
OBJECTIVES = {
    "rloo": {
        "rloo.num_iterations": ITERATIONS, "rloo.rollout_batch_size": 8, "rloo.k": 2, "rloo.minibatch_size": 8,
        "rloo.micro_batch_size": 8, "rloo.epochs": 2, "rloo.max_new_tokens": 16, "rloo.kl_coef": 0.02,
        "rloo.optim.lr": 3e-3,
    },
    "dpo": {"dpo.num_steps": 60, "dpo.beta": 0.1},
    "ipo": {"dpo.num_steps": 60, "dpo.beta": 0.02},
}  # fmt: skip
DPO_COMMON = {"dpo.batch_size": 16, "dpo.seq_len": 192, "dpo.eval_every": 10, "dpo.optim.lr": 3e-3}


def _launch(workdir: Path, overrides: dict, *extra: str) -> None:
    cmd = [sys.executable, "-m", "experiments.launch", "--config", "configs/tiny.py", "--workdir", str(workdir)]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()] + list(extra)
    env = {**os.environ, "PYTHONHASHSEED": "0", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def _rate(run: Path, model: str) -> tuple[float, int]:
    responses = json.loads((run / "eval" / "parts" / f"responses-{model}.json").read_text())
    texts = [t for kind in ("harmlessness", "helpfulness") for t in responses[kind]]
    return sum(map(has_property, texts)) / len(texts), len(texts)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("learning") / "run"
    _launch(workdir, OVERRIDES)
    return workdir


def test_pm_agrees_with_the_judge_on_held_out_pairs(run):
    report = json.loads((run / "pm" / "eval.json").read_text())["eval"]
    # accuracy counts the pairs whose label is not 0.5 (the judge ties pairs where both or neither
    # response has the property).
    assert report["n"] - report["n_p_half"] >= 10, report
    assert report["accuracy"] >= 0.9, report


def test_ppo_raises_the_preferred_property_above_sl_cai(run):
    sl, n = _rate(run, "sl-cai")
    rl, n_rl = _rate(run, f"rl-cai@{ITERATIONS}")
    assert n == n_rl >= 70
    assert rl - sl >= 0.5, (sl, rl)
    # The reward PPO saw rose with it (normalised PM scores of the rollouts).
    rows = [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[:5], rows[-5:]
    mean = lambda rs: sum(r["objective/scores"] for r in rs) / len(rs)  # noqa: E731
    assert mean(last) > mean(first)


@pytest.mark.parametrize("algorithm", sorted(OBJECTIVES))
def test_every_rl_objective_raises_the_preferred_property_above_sl_cai(run, algorithm, tmp_path):
    fork = tmp_path / algorithm
    settings = {"rl.algorithm": algorithm, **OBJECTIVES[algorithm], **(DPO_COMMON if algorithm != "rloo" else {})}
    _launch(run, {**OVERRIDES, **settings}, "--fork", str(fork))
    assert (fork / "pm").resolve() == (run / "pm").resolve()  # the same SL-CAI model, labels and PM
    steps = settings.get("rloo.num_iterations") or settings["dpo.num_steps"]
    sl, n = _rate(fork, "sl-cai")
    rl, n_rl = _rate(fork, f"rl-cai@{steps}")
    assert n == n_rl >= 70
    assert rl - sl >= 0.5, (algorithm, sl, rl)
    # PPO's metric names, so the objectives' curves compare (Fig. 8 per objective).
    rows = [json.loads(line) for line in (fork / "ppo" / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "objective/scores" in r]
    assert scored and all("objective/kl" in r and "response/no_eos_frac" in r for r in scored)
