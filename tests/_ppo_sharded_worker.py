"""One PPO iteration on 8 fake CPU devices, per mesh; run by tests/test_ppo_sharded.py.

Run as a script with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the device count is fixed
when JAX starts, so the pytest process cannot do this itself): `python _ppo_sharded_worker.py OUT`.

`train_ppo` builds its mesh from all devices, so the single-device reference swaps `cai_jax.train.rl_common`'s
`make_mesh` for one over the first device only (a real 1x1x1 mesh, the path a 1-device machine
takes). Each run's metrics row and final train-state params go to OUT/<mesh>.npz (the initial
params to OUT/init.npz); stdout is one JSON object with, per mesh, the sampled responses, how a
sharded parameter was actually split and, for a quick look, the largest absolute differences to
the reference. The test decides the tolerances.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import types
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's `tests` package

from cai_jax import sharding as sh  # noqa: E402
from cai_jax.models import ScalarModel, Transformer, init_params, tiny_config  # noqa: E402
from cai_jax.train import rl_common  # noqa: E402
from cai_jax.train.ppo import train_ppo, value_head_params  # noqa: E402
from tests.defaults import optim_config, ppo_config  # noqa: E402

MESHES = ((1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2))  # (data, fsdp, tensor); the first is the reference
# Micro-batches of 8 rows split over data * fsdp <= 8; two of them per minibatch (accumulation),
# two epochs: two optimizer updates, so Adam's sharded moments are used as well as created.
PPO = ppo_config(
    rollout_batch_size=16,
    minibatch_size=16,
    micro_batch_size=8,
    ppo_epochs=2,
    max_new_tokens=8,
    kl_coef=0.1,
    kl_estimator="k3",
    missing_eos_penalty=0.5,
    value_init="pm",  # the value model is the PM: PMReward and the value backbone are sharded too
    sample_every=1,  # samples.jsonl of the (only) iteration holds every response and its score
    num_samples_logged=16,
)
# Adam divides each coordinate by its own gradient scale, so with the default eps=1e-8 a coordinate
# whose gradient is rounding noise (terms that cancel) moves by about +-lr either way: one run of
# the same maths with 4 micro-batches instead of 2 on one device moved an o_proj entry 1e-5 apart,
# 2x2x2 1e-4. eps=1e-5 (well under the typical |gradient|) keeps such coordinates linear in g.
OPTIM = optim_config(lr=1e-3, eps=1e-5, schedule="constant", updates=2)
SKIP = ("time/",)  # wall-clock times differ by nature


def _flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(x) for k, x in leaves}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(shape, policy, reference, pm, prompts):
    devices = jax.devices()[: int(np.prod(shape))]
    make_mesh = rl_common.make_mesh
    rl_common.make_mesh = lambda cfg: make_mesh(cfg, devices)
    try:
        with tempfile.TemporaryDirectory() as workdir:
            state = train_ppo(
                policy,
                reference,
                pm,
                prompts,
                ppo_cfg=PPO,
                optim_cfg=OPTIM,
                ckpt_cfg=False,
                mesh_cfg=dict(zip(sh.MESH_AXES, shape)),
                num_iterations=1,
                seed=0,
                workdir=workdir,
            )
            (row,) = _jsonl(Path(workdir) / "metrics.jsonl")
            samples = _jsonl(Path(workdir) / "samples.jsonl")
    finally:
        rl_common.make_mesh = make_mesh
    q = state.params["policy"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    info = {
        "devices": len(q.sharding.device_set),
        "q_proj_spec": str(q.sharding.spec),
        "q_proj_shards": len({str(i) for i in q.sharding.devices_indices_map(q.shape).values()}),
        "mesh": dict(q.sharding.mesh.shape),
        "responses": [s["response"] for s in samples],
    }
    metrics = {k: np.float64(v) for k, v in row.items() if isinstance(v, (int, float)) and not k.startswith(SKIP)}
    return metrics, _flat(state.params), info


def main() -> None:
    assert jax.device_count() == 8, f"expected 8 fake devices, got {jax.device_count()}"
    out_dir = Path(sys.argv[1])
    # 4 query / 2 kv heads, hidden 64, mlp 128, vocab 256: all split 2 or 4 ways. One layer: the
    # second shards like the first and would only add compile time.
    cfg = tiny_config("llama", num_layers=1)
    base = jax.device_get(init_params(cfg, jax.random.key(0)))
    rs = np.random.default_rng(0)

    def noisy():  # as tests/conftest.py's random_params: init values are near-uniform, noise makes them matter
        return jax.tree.map(lambda x: x + 0.1 * rs.standard_normal(x.shape).astype(x.dtype), base)

    def lm(params):
        return types.SimpleNamespace(model=Transformer(cfg), params=params, tokenizer=None, config=cfg)

    policy, reference = lm(noisy()), lm(noisy())  # a reference apart from the policy: KL terms are non-zero
    head = {
        "kernel": 0.1 * rs.standard_normal((cfg.hidden_size, 1)).astype(np.float32),
        "bias": np.zeros(1, np.float32),
    }
    pm = types.SimpleNamespace(
        model=ScalarModel(cfg),
        params={"backbone": noisy(), "head": head},
        tokenizer=None,
        config=cfg,
        reward_mean=0.1,
        reward_std=0.5,
    )
    prompts = [rs.integers(3, 256, int(rs.integers(3, 11))).tolist() for _ in range(PPO.rollout_batch_size)]

    value = {"backbone": pm.params["backbone"], "head": value_head_params(head, pm.reward_mean, pm.reward_std)}
    np.savez(out_dir / "init.npz", **_flat({"policy": policy.params, "value": value}))
    out = {"meshes": {}}
    ref = None
    for shape in MESHES:
        name = "x".join(map(str, shape))
        t = time.perf_counter()
        metrics, params, info = _run(shape, policy, reference, pm, prompts)
        info["seconds"] = time.perf_counter() - t
        np.savez(out_dir / f"{name}.npz", **{f"metric:{k}": v for k, v in metrics.items()}, **params)
        if ref is None:
            ref, ref_responses = (metrics, params), info["responses"]
        diffs = {k: abs(float(metrics[k]) - float(ref[0][k])) for k in ref[0]}
        out["meshes"][name] = {
            **info,
            "metric_keys_match": sorted(metrics) == sorted(ref[0]),
            "metrics_max_abs": max(diffs.values()),
            "worst_metric": max(diffs, key=diffs.get),
            "params_max_abs": max(float(np.max(np.abs(params[k] - ref[1][k]))) for k in ref[1]),
            "same_responses": info["responses"] == ref_responses,
        }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
