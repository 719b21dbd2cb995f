"""One PPO iteration (cai_jax.train.ppo.train_ppo) on 8 fake CPU devices == on a 1-device mesh.

The worker (tests/_ppo_sharded_worker.py, in a subprocess: the device count is fixed at JAX start)
runs one iteration with a tiny policy, a different tiny reference and a tiny PM (also the value
model), two accumulated micro-batches of 8 rows per update and two updates, on meshes (data, fsdp,
tensor) = (1, 1, 1), (8, 1, 1), (2, 4, 1) and (2, 2, 2). Every path is sharded: the sampler on the
sharded policy, the PM scores, the rollout forward, the update (params, Adam moments, batch rows).

Tolerance, set once: rtol 1e-4, atol 1e-5 on every metric and every final parameter. The runs are
the same float32 maths in different reduction orders (per-shard partial sums, tensor-split
matmuls), observed to differ by at most ~4e-6 on metrics (on param_norm ~ 39) and ~8e-7 on params, so
this leaves ~10x room for XLA/CPU variation; a sharding bug (a gradient summed over the wrong
shards, a mis-split batch or moment) moves an Adam coordinate by up to lr = 1e-3, 100x atol, and
the metrics by far more than rtol. The worker uses Adam eps=1e-5 (see its OPTIM comment): with
eps=1e-8 a coordinate whose gradient is pure rounding noise moves by ~+-lr whichever way the noise
falls, which made even the same maths on one device with 4 micro-batches instead of 2 differ by
1e-5 (2x2x2: 1e-4) at single entries; that is Adam, not sharding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-4, 1e-5
MESHES = ("8x1x1", "2x4x1", "2x2x2")

pytestmark = pytest.mark.slow  # ~80 s: four train_ppo runs, each compiling sampler, forward and update


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_sharded")
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_ppo_sharded_worker.py"), str(out)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"PPO sharding worker failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)["meshes"], out


def _load(out: Path, mesh: str) -> tuple[dict, dict]:
    with np.load(out / f"{mesh}.npz") as f:
        metrics = {k.removeprefix("metric:"): f[k] for k in f.files if k.startswith("metric:")}
        params = {k: f[k] for k in f.files if not k.startswith("metric:")}
    return metrics, params


def test_reference_is_a_real_single_device_iteration(worker):
    info, out = worker
    r = info["1x1x1"]
    assert r["devices"] == 1 and r["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    metrics, _ = _load(out, "1x1x1")
    assert metrics["step"] == 1 and metrics["grad_norm"] > 0 and metrics["lr"] > 0
    assert metrics["objective/kl"] != 0  # reference != policy: the KL terms enter the rewards
    assert len(r["responses"]) == 16 and all(r["responses"])
    # Non-vacuous: the two Adam updates moved most entries by ~lr, 100x ATOL (a sharded update
    # that went wrong would stand out by that much).
    _, params = _load(out, "1x1x1")
    with np.load(out / "init.npz") as init:
        moved = np.concatenate([np.abs(params[k] - init[k]).ravel() for k in init.files])
    assert np.median(moved) > 0.5 * metrics["lr"], np.median(moved)


@pytest.mark.parametrize("mesh", MESHES)
def test_ppo_iteration_sharded_matches_single_device(worker, mesh):
    info, out = worker
    r = info[mesh]
    data, fsdp, tensor = map(int, mesh.split("x"))
    assert r["devices"] == 8 and r["mesh"] == {"data": data, "fsdp": fsdp, "tensor": tensor}
    assert r["q_proj_spec"] == "P('fsdp', 'tensor', None)" and r["q_proj_shards"] == fsdp * tensor
    # Sampling is discrete: the rest is only comparable if float noise flipped no sampled token.
    assert r["responses"] == info["1x1x1"]["responses"], "sharded sampler drew different responses"
    ref_metrics, ref_params = _load(out, "1x1x1")
    metrics, params = _load(out, mesh)
    assert sorted(metrics) == sorted(ref_metrics) and sorted(params) == sorted(ref_params)
    for key, want in ref_metrics.items():
        np.testing.assert_allclose(metrics[key], want, rtol=RTOL, atol=ATOL, err_msg=f"{mesh}: metric {key}")
    for key, want in ref_params.items():
        np.testing.assert_allclose(params[key], want, rtol=RTOL, atol=ATOL, err_msg=f"{mesh}: param {key}")
