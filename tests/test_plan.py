"""experiments.plan: per-stage, per-device bytes against hand counts, "does not fit" verdicts, bad input.

Each case runs the plan as its own process (the fake device count is fixed when JAX starts).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cai_jax.planning import DEVICE_KINDS, PlanError, bytes_per_device, device_kind

ROOT = Path(__file__).resolve().parents[1]
SHAPE_8B = "configs/shapes/llama-3.1-8b"

# configs/tiny.py's random model (model.random_config, vocabulary of the SmolLM2 tokenizer), by hand:
V, E, M, H, K, D, LAYERS = 49152, 64, 128, 4, 2, 16, 2
NORMS = (2 * LAYERS + 1) * E  # input and post-attention RMSNorm of each layer, and the final one
BLOCK = E * H * D * 2 + E * K * D * 2 + 3 * E * M  # q, o; k, v; gate, up, down
P_TINY = V * E + LAYERS * BLOCK + NORMS  # tied embeddings: 3,219,776 parameters
HEAD = E + 1  # a ScalarModel's score head: kernel [E, 1] and bias [1]
FSDP = 8
# On data=1, fsdp=8 every weight's `embed` dimension is split 8 ways; norm scales and the head's
# bias are replicated. fp32: 4 bytes per parameter.
SHARD = 4 * ((P_TINY - NORMS) // FSDP + NORMS)  # a Transformer's params on one device
SHARD_PM = SHARD + 4 * (E // FSDP + 1)  # a ScalarModel's: the head kernel split, its bias not
FULL, FULL_PM = 4 * P_TINY, 4 * (P_TINY + HEAD)  # a loaded model: whole, on device 0
COUNTS = 8  # Adam's and the schedule's int32 step counters, replicated
# Batches that divide over data x fsdp = 8 devices (tiny's own are sized for one CPU device).
TINY_8 = [
    "--config.mesh.data=1",
    "--config.mesh.fsdp=8",
    "--config.sft.batch_size=8",
    "--config.pm.batch_size=8",
    "--config.ppo.rollout_batch_size=8",
    "--config.ppo.minibatch_size=8",
    "--config.ppo.micro_batch_size=8",
]


def _plan(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "experiments.plan", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # ~90 s: 16 compiles of the tiny model (the vocabulary of 49152 dominates)
def test_tiny_plan_on_8_devices_matches_a_hand_count(tmp_path):
    out = tmp_path / "plan.json"
    r = _plan(
        "--config", "configs/tiny.py", "--devices", "8", "--device-kind", "h100-80gb", "--json", str(out), *TINY_8
    )
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads(out.read_text())
    assert set(plan) == {"device_kind", "devices", "stages"}
    assert (plan["device_kind"], plan["devices"]) == ("h100-80gb", 8)
    stages = plan["stages"]
    assert list(stages) == ["revisions", "sft", "feedback", "pm", "ppo", "eval"]
    fields = {
        "params_bytes",
        "opt_state_bytes",
        "kv_cache_bytes",
        "temp_bytes",
        "total_bytes",
        "flops_per_step",
        "fits",
    }
    for name, s in stages.items():
        assert set(s) == fields, name
        assert s["total_bytes"] == s["params_bytes"] + s["opt_state_bytes"] + s["kv_cache_bytes"] + s["temp_bytes"]
        assert s["temp_bytes"] > 0 and s["flops_per_step"] > 0 and s["fits"] is True, name
    adam = lambda shard: 2 * shard + COUNTS  # noqa: E731  (mu and nu, sharded like their params)
    assert stages["revisions"]["params_bytes"] == FULL
    assert stages["sft"]["params_bytes"] == FULL + SHARD
    assert stages["sft"]["opt_state_bytes"] == adam(SHARD)
    assert stages["feedback"]["params_bytes"] == 2 * FULL  # the policy and the feedback model
    assert stages["pm"]["params_bytes"] == FULL + 2 * SHARD_PM  # base, PM and PMP train states
    assert stages["pm"]["opt_state_bytes"] == 2 * adam(SHARD_PM)
    # Loaded policy and PM; policy + value state; reference and PM on the mesh.
    assert stages["ppo"]["params_bytes"] == FULL + FULL_PM + (SHARD + SHARD_PM) + SHARD + SHARD_PM
    assert stages["ppo"]["opt_state_bytes"] == 2 * (SHARD + SHARD_PM) + COUNTS
    # helpful, sl-cai and the PPO snapshots at iterations 1 and 3 (eval.elo_snapshots=(0, 1, -1)), and the PM.
    assert stages["eval"]["params_bytes"] == 4 * FULL + FULL_PM
    # KV cache of the revisions sampler: [B, K, D, S] keys + [B, K, S, D] values per layer, fp32;
    # 4 rows, S = 504-token last-round prompt bucket + 8 new tokens.
    assert stages["revisions"]["kv_cache_bytes"] == LAYERS * 2 * 4 * K * D * (504 + 8) * 4
    assert "Every stage fits on h100-80gb." in r.stdout
    assert "| sft | sft step | 8 x 96 tokens |" in r.stdout


# LoRA adapters at rank 4 per layer, per device on fsdp=8 (the `embed` dimension split 8 ways, the
# rank axis and heads / mlp (tensor = 1) whole): q: A [E, r] / 8 + B [r, H, D]; k, v: A + B [r, K, D];
# o: A [H, D, r] + B [r, E] / 8; gate, up: A + B [r, M]; down: A [M, r] + B / 8.
R = 4
ADAPTERS = 4 * LAYERS * (
    (E * R // 8 + R * H * D) + 2 * (E * R // 8 + R * K * D) + (H * D * R + R * E // 8)
    + 2 * (E * R // 8 + R * M) + (M * R + R * E // 8)
)  # fmt: skip


@pytest.mark.slow  # ~70 s: the PPO stage's 4 compiles of the tiny model
def test_ppo_plan_with_lora_holds_one_base_and_trains_adapters_only(tmp_path):
    out = tmp_path / "plan.json"
    r = _plan(
        "--config", "configs/tiny.py", "--devices", "8", "--device-kind", "h100-80gb", "--json", str(out),
        "--stages", "ppo", f"--config.model.lora.rank={R}", *TINY_8,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    ppo = json.loads(out.read_text())["stages"]["ppo"]
    # Loaded policy and PM; the state: policy base + adapters, the value's PM backbone + adapters
    # + head; no reference copy (the base is it), a merged policy for the sampler; PM on the mesh.
    state = (SHARD + ADAPTERS) + (SHARD_PM + ADAPTERS)
    assert ppo["params_bytes"] == FULL + FULL_PM + state + SHARD + SHARD_PM
    # Adam's moments of the adapters and the value head only (full fine-tuning: 2 * (SHARD + SHARD_PM)).
    assert ppo["opt_state_bytes"] == 2 * (2 * ADAPTERS + 4 * (E // FSDP + 1)) + COUNTS
    assert "merged policy for the sampler" in r.stdout and "reference (sharded)" not in r.stdout


@pytest.mark.slow  # ~40 s: one compile of the 32-layer model
def test_8b_on_one_16gb_device_does_not_fit_by_its_train_state(tmp_path):
    out = tmp_path / "plan.json"
    small = ["--config.mesh.fsdp=1", "--config.sft.batch_size=1", "--config.sft.seq_len=64"]
    args = ["--config", "configs/llama8b_gpu8.py", f"--config.model.name={SHAPE_8B}", *small]
    r = _plan(*args, "--devices", "1", "--device-kind", "v5e-16gb", "--stages", "sft", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    sft = json.loads(out.read_text())["stages"]["sft"]
    assert sft["fits"] is False
    assert sft["params_bytes"] == 2 * 4 * 8_030_261_248  # loaded + train state, fp32, one device
    assert "sft does not fit" in r.stdout
    # Adam's moments (2 x 32 GB) first, then one fp32 copy of the weights (the loaded model's or the state's).
    assert "the largest buffer is train state: optimizer state (59.83 GiB); then " in r.stdout


def test_a_large_batch_does_not_fit_by_its_temporaries(tmp_path):
    big = ["--config.sft.batch_size=256", "--config.sft.seq_len=512"]
    r = _plan("--config", "configs/tiny.py", *big, "--devices", "1", "--device-kind", "v5e-16gb", "--stages", "sft")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sft does not fit" in r.stdout
    assert "the largest buffer is temp of the sft step at 256 x 512 tokens" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "configs/tiny.py", "--devices", "8", "--device-kind", "h9000"], "known kinds: h100-80gb"),
        (["--config", "configs/tiny.py", "--devices", "8", "--config.mesh.fsdp=3"], "cannot fill data=-1"),
        (["--config", "configs/tiny.py", "--devices", "8", "--stages", "sft,rlhf"], "unknown stage(s) ['rlhf']"),
        (["--config", "configs/llama8b_gpu8.py", "--devices", "8", "--config.model.name=MISSING"], "config.json"),
        (["--config", "configs/tiny.py", "--devices", "8", "--target", "tpu:v5e:2x4"], "libtpu"),
        (["--config", "configs/tiny.py", "--devices", "8", "--stages", "sft"], "error: stage sft:"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, args, message):
    args = [a.replace("MISSING", str(tmp_path / "no-such-model")) for a in args]
    r = _plan(*args, timeout=300)
    assert r.returncode == 2, (r.stdout, r.stderr[-2000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr[-2000:]


def test_device_kinds_and_bytes_per_device():
    with pytest.raises(PlanError, match="known kinds: .*h200-141gb"):
        device_kind("h100")
    h100 = device_kind("h100-80gb")
    assert h100.usable_bytes() == int(0.75 * h100.memory_bytes)  # JAX's GPU preallocation
    assert DEVICE_KINDS["v5e-16gb"].usable_bytes() == 16 << 30
    import jax
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct((8, 6), jnp.float32)
    assert bytes_per_device({"a": x, "b": jax.ShapeDtypeStruct((3,), jnp.bfloat16)}) == 8 * 6 * 4 + 3 * 2
