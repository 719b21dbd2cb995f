"""Sharded vs single-device checks on 8 fake CPU devices; run by tests/test_sharding.py.

Run as a script with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the device count is fixed
when JAX starts, so the pytest process cannot do this itself). Prints one JSON object: per mesh,
whether sharded init is bit-identical to unsharded init and the largest absolute differences of
logits, PM scores and gradients; the test decides the tolerances.
"""

from __future__ import annotations

import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cai_jax import sharding as sh
from cai_jax.models import ScalarModel, Transformer, tiny_config

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2))  # (data, fsdp, tensor)
B, L = 8, 16


def _max_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree.leaves(diffs))


def _identical(a, b) -> bool:
    same = jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)
    return all(jax.tree.leaves(same)) and jax.tree.structure(a) == jax.tree.structure(b)


def _noisy(params, seed):
    """Init values are near-uniform (std 0.02, unit norms); noise makes every tensor matter."""
    leaves, treedef = jax.tree.flatten(jax.device_get(params))
    rs = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [x + 0.1 * rs.standard_normal(x.shape).astype(x.dtype) for x in leaves])


def _nll(logits_BLV, tokens_BL, mask_BL):
    logp_BLV = jax.nn.log_softmax(logits_BLV[:, :-1], axis=-1)
    picked_BL = jnp.take_along_axis(logp_BLV, tokens_BL[:, 1:, None], axis=-1)[..., 0]
    m = mask_BL[:, 1:] & mask_BL[:, :-1]
    return -jnp.sum(picked_BL * m) / jnp.sum(m)


def main() -> None:
    assert jax.device_count() == 8, f"expected 8 fake devices, got {jax.device_count()}"
    rs = np.random.default_rng(0)
    tokens = rs.integers(3, 256, (B, L)).astype(np.int32)
    mask = np.ones((B, L), bool)
    mask[1, :5] = False  # left padding
    mask[2, -4:] = False  # right padding
    batch = {"tokens": tokens, "mask": mask}
    rng = jax.random.key(42)
    out = {"meshes": {}}

    # Untied embeddings + qkv bias (qwen2) exercise lm_head ("embed", "vocab") and the bias axes.
    for family, shapes in (("llama", MESHES), ("qwen2", MESHES[-1:])):
        cfg = tiny_config(family, num_heads=4, num_kv_heads=2, hidden_size=64, intermediate_size=128, vocab_size=256)
        lm = Transformer(cfg)

        def loss_and_logits(params, b, lm=lm):
            logits_BLV = lm.apply({"params": params}, b["tokens"], b["mask"])
            return _nll(logits_BLV, b["tokens"], b["mask"]), logits_BLV

        step = jax.value_and_grad(loss_and_logits, has_aux=True)  # ((loss, logits), grads)
        ref_init = jax.device_get(nn.meta.unbox(jax.jit(lm.init)(rng, tokens)["params"]))
        noisy = _noisy(ref_init, 1)
        (ref_loss, ref_logits), ref_grads = jax.jit(step)(noisy, batch)
        for shape in shapes:
            mesh = sh.make_mesh(dict(zip(sh.MESH_AXES, shape)))
            shardings = sh.param_shardings(lm, tokens, mesh)
            init = sh.sharded_init(lm, rng, tokens, mesh)
            bsh = sh.batch_sharding(mesh)
            with sh.with_rules(mesh):
                sharded_step = jax.jit(step, in_shardings=(shardings, bsh), out_shardings=((None, bsh), shardings))
                args = (sh.shard_params(noisy, shardings), sh.global_batch(batch, mesh))
                lowered = sharded_step.lower(*args).as_text()
                (loss, logits), grads = sharded_step(*args)
            q = init["layers_0"]["self_attn"]["q_proj"]["kernel"]
            out["meshes"][f"{family}-{'x'.join(map(str, shape))}"] = {
                "init_identical": _identical(jax.device_get(init), ref_init),
                "q_proj_spec": str(q.sharding.spec),
                "q_proj_shards": len({str(i) for i in q.sharding.devices_indices_map(q.shape).values()}),
                # with_rules must make the model's nn.with_logical_constraint calls real constraints.
                "constraints_in_hlo": lowered.count("sharding_constraint"),
                "logits_max_abs": float(np.max(np.abs(np.asarray(ref_logits)))),
                "loss_diff": abs(float(loss) - float(ref_loss)),
                "logits_diff": _max_diff(logits, ref_logits),
                "grads_diff": _max_diff(grads, ref_grads),
            }

    # Preference model: the ("embed", "score") head on the full 2x2x2 mesh.
    cfg = tiny_config("llama", num_heads=4, num_kv_heads=2, hidden_size=64, intermediate_size=128, vocab_size=256)
    pm = ScalarModel(cfg)
    score = lambda params, b: pm.apply({"params": params}, b["tokens"], b["mask"])
    ref_init = jax.device_get(nn.meta.unbox(jax.jit(pm.init)(rng, tokens)["params"]))
    noisy = _noisy(ref_init, 2)
    mesh = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = sh.param_shardings(pm, tokens, mesh)
    init = sh.sharded_init(pm, rng, tokens, mesh)
    with sh.with_rules(mesh):
        scores = jax.jit(score, in_shardings=(shardings, sh.batch_sharding(mesh)))(
            sh.shard_params(noisy, shardings), sh.global_batch(batch, mesh)
        )
    out["pm"] = {
        "init_identical": _identical(jax.device_get(init), ref_init),
        "head_spec": str(init["head"]["kernel"].sharding.spec),
        "scores_diff": _max_diff(scores, jax.jit(score)(noisy, batch)),
    }

    # SmolLM2-like heads (9 query, 3 kv) cannot be split two ways.
    bad = tiny_config("llama", num_heads=9, num_kv_heads=3, head_dim=8, hidden_size=64)
    try:
        sh.sharded_init(Transformer(bad), rng, tokens, sh.make_mesh({"data": 4, "fsdp": 1, "tensor": 2}))
        out["indivisible_error"] = None
    except ValueError as e:
        out["indivisible_error"] = str(e)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
