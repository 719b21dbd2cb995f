"""LoRA in PPO and RLOO (cai_jax.train.rl_lora) on tiny random models: only the adapters train, the
reference is the base, merged exports equal the adapted model, resume is exact."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.checkpoints import peft
from cai_jax.checkpoints.hf import is_complete_export
from cai_jax.models import ScalarModel, Transformer, load_pretrained, tiny_config
from cai_jax.nn import lora as L
from cai_jax.train import rl_lora
from cai_jax.train.ppo import train_ppo
from cai_jax.train.ppo_rollout import layout
from cai_jax.train.ppo_steps import rollout_forward
from cai_jax.train.rloo import train_rloo
from cai_jax.train.state import make_optimizer
from cai_jax.train.steps import accumulated_grads
from tests.conftest import _random_params
from tests.defaults import optim_config
from tests.test_ppo import RESUME_PPO, _ckpt, _constant_lr, _lm, _pm, _prompts, _reward_len
from tests.test_rloo import RESUME, rloo_config

LORA = L.LoRAConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=L.ATTENTION_AND_MLP)
TOL = 1e-5  # one fp32 model computed two ways (merged weights vs W + A B at each forward)


@pytest.fixture(scope="module")
def cfg():
    return tiny_config("llama")


def _equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _state_leaves(state):
    out = []
    for x in jax.tree.leaves(state):
        out.append(np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x))
    return out


def _ppo(cfg, workdir, n, lm, **kw):
    return train_ppo(
        lm, lm, None, _prompts(12, seed=1), ppo_cfg=RESUME_PPO, optim_cfg=_constant_lr(1e-2),
        ckpt_cfg=_ckpt(workdir, every=1), num_iterations=n, seed=0, workdir=workdir, reward_fn=_reward_len,
        lora=LORA, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ppo_runs(cfg, tmp_path_factory):
    """PPO with LoRA (value_init="policy": the value model's adapters sit on the policy's base):
    3 iterations uninterrupted, and 1 then resumed to 3."""
    lm = _lm(cfg)
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    state_a = _ppo(cfg, a, 3, lm, export_dir=a / "final")
    _ppo(cfg, b, 1, lm)
    state_b = _ppo(cfg, b, 3, lm)
    return lm, state_a, state_b, a


def test_ppo_lora_trains_the_adapters_only(ppo_runs):
    lm, state, _, _ = ppo_runs
    p = jax.device_get(state.params)
    assert set(p["policy"]) == {"base", "lora"} and set(p["value"]) == {"lora", "head"}
    assert _equal(p["policy"]["base"], lm.params)  # bit-identical after 3 iterations of updates
    bs = [ab["b"] for ab in L.flat_adapters(p["policy"]["lora"]).values()]
    assert len(bs) == 7 * lm.config.num_layers and all(np.abs(b).max() > 0 for b in bs)  # B started at 0
    assert any(np.abs(ab["b"]).max() > 0 for ab in L.flat_adapters(p["value"]["lora"]).values())
    # No optimizer state for the base: Adam's two moments of the trainable leaves only.
    trainable = L.num_lora_params(p["policy"]["lora"]) + L.num_lora_params(p["value"])
    moments = sum(int(np.size(x)) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
    assert moments == 2 * trainable, (moments, trainable)


def test_ppo_lora_resume_equals_uninterrupted(ppo_runs):
    _, state_a, state_b, _ = ppo_runs
    for x, y in zip(_state_leaves(state_a), _state_leaves(state_b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_ppo_lora_export_is_the_adapted_model(ppo_runs, cfg):
    _, state, _, workdir = ppo_runs
    folder = workdir / "final"
    assert is_complete_export(folder) and is_complete_export(folder / "adapter")
    p = jax.device_get(state.params["policy"])
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 256, (2, 12)), jnp.int32)
    adapted = Transformer(cfg).apply({"params": L.apply_lora(p["base"], p["lora"], LORA)}, tokens)
    exported = load_pretrained(folder, with_tokenizer=False).apply(tokens)
    assert float(jnp.max(jnp.abs(exported - adapted))) <= TOL
    base_logits = Transformer(cfg).apply({"params": p["base"]}, tokens)
    assert float(jnp.max(jnp.abs(exported - base_logits))) > 1e-3  # the adapters did change the policy
    adapters, lora = peft.load_peft_adapters(folder / "adapter", cfg)
    assert (lora.rank, lora.alpha) == (LORA.rank, LORA.alpha)
    for path, ab in L.flat_adapters(p["lora"]).items():
        got = L.flat_adapters(adapters)[path]
        np.testing.assert_array_equal(np.asarray(got["a"]), np.asarray(ab["a"]))
        np.testing.assert_array_equal(np.asarray(got["b"]), np.asarray(ab["b"]))


def test_reference_is_the_base_and_the_policy_its_adapted_weights(cfg):
    """rollout_forward on a LoRA state: ref log-probs are exactly the base model's; policy
    log-probs and values are those of the merged weights (adapters perturbed so they differ)."""
    lm = _lm(cfg)
    head = {"kernel": 0.1 * jax.random.normal(jax.random.key(5), (cfg.hidden_size, 1)), "bias": jnp.zeros((1,))}
    full = {"policy": lm.params, "value": {"backbone": lm.params, "head": head}}
    state = rl_lora.lora_state(full["policy"], full["value"], cfg, cfg, LORA, jax.random.key(1))
    key = iter(jax.random.split(jax.random.key(2), 64))
    state = jax.tree_util.tree_map_with_path(
        lambda path, x: 0.05 * jax.random.normal(next(key), x.shape) if path[-1].key == "b" else x, state
    )
    n, width = RESUME_PPO.max_new_tokens, 16
    responses = np.random.default_rng(3).integers(3, 256, (4, n)).astype(np.int32)
    tokens, mask, resp_mask = layout(_prompts(4, 7), responses, np.array([6, 3, 1, 5]), width, 0)
    models = dict(
        policy_model=Transformer(cfg), value_model=ScalarModel(cfg), ref_model=Transformer(cfg), cfg=RESUME_PPO
    )
    got = rollout_forward(state, None, tokens, mask, resp_mask, lora=LORA, **models)
    merged = {
        "policy": L.merge_lora(state["policy"]["base"], state["policy"]["lora"], LORA),
        "value": {"backbone": L.merge_lora(lm.params, state["value"]["lora"], LORA), "head": head},
    }
    want = rollout_forward(merged, lm.params, tokens, mask, resp_mask, **models)
    np.testing.assert_array_equal(np.asarray(got["ref_logp"]), np.asarray(want["ref_logp"]))
    for k in ("logp", "values"):
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), atol=TOL, rtol=0)
    assert float(jnp.max(jnp.abs(got["logp"] - got["ref_logp"]))) > 1e-3  # the policy is not the base here


def test_value_from_the_pm_keeps_its_backbone_frozen(cfg, tmp_path):
    lm, pm = _lm(cfg), _pm(cfg)
    ppo = RESUME_PPO.__class__(**{**RESUME_PPO.__dict__, "value_init": "pm", "adaptive_kl": False})
    state = train_ppo(
        lm, lm, pm, _prompts(8, seed=1), ppo_cfg=ppo, optim_cfg=_constant_lr(1e-2), ckpt_cfg=False,
        num_iterations=1, seed=0, workdir=tmp_path, lora=LORA,
    )  # fmt: skip
    v = jax.device_get(state.params["value"])
    assert set(v) == {"base", "lora", "head"}
    assert _equal(v["base"], pm.params["backbone"]) and _equal(state.params["policy"]["base"], lm.params)
    assert any(np.abs(ab["b"]).max() > 0 for ab in L.flat_adapters(v["lora"]).values())


def test_rloo_lora_trains_the_adapters_only(cfg, tmp_path):
    lm = types.SimpleNamespace(model=Transformer(cfg), params=_random_params(cfg, 0), tokenizer=None, config=cfg)
    state = train_rloo(
        lm, lm, None, _prompts(6, seed=1), rloo_cfg=rloo_config(**RESUME), optim_cfg=_constant_lr(1e-2),
        ckpt_cfg=False, num_iterations=2, seed=0, workdir=tmp_path, export_dir=tmp_path / "final",
        reward_fn=_reward_len, lora=LORA,
    )  # fmt: skip
    p = jax.device_get(state.params)
    assert set(p) == {"policy"} and set(p["policy"]) == {"base", "lora"}
    assert _equal(p["policy"]["base"], lm.params)
    assert all(np.abs(ab["b"]).max() > 0 for ab in L.flat_adapters(p["policy"]["lora"]).values())
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 256, (2, 12)), jnp.int32)
    adapted = Transformer(cfg).apply({"params": L.apply_lora(p["policy"]["base"], p["policy"]["lora"], LORA)}, tokens)
    exported = load_pretrained(tmp_path / "final", with_tokenizer=False).apply(tokens)
    assert float(jnp.max(jnp.abs(exported - adapted))) <= TOL


def test_lora_needs_the_policy_as_its_reference(cfg, tmp_path):
    lm, other = _lm(cfg), _lm(cfg, seed=1)
    with pytest.raises(ValueError, match="reference is the policy's frozen base"):
        train_ppo(
            lm, other, None, _prompts(8), ppo_cfg=RESUME_PPO, optim_cfg=_constant_lr(1e-3), ckpt_cfg=False,
            num_iterations=1, workdir=tmp_path, reward_fn=_reward_len, lora=LORA,
        )  # fmt: skip


def test_accumulated_grads_skip_frozen_leaves():
    """Trainable leaves get jax.grad's sum over micro-batches; frozen ones exactly zero."""
    rng = np.random.default_rng(0)
    params = {
        "base": {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
        "lora": jnp.asarray(rng.normal(size=(2,))),
    }
    trainable = make_optimizer(optim_config(lr=1e-3, updates=1, frozen=["^base/"]), params).trainable
    mb = {"x": jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)}  # 2 micro-batches of 4 rows

    def loss_fn(p, m):
        y = m["x"] @ p["base"]["w"] * p["lora"]
        return jnp.sum(y**2), {"n": jnp.float32(m["x"].shape[0])}

    grads, metrics = accumulated_grads(loss_fn, params, mb, trainable)
    want = jax.grad(lambda p: sum(loss_fn(p, {"x": mb["x"][i]})[0] for i in range(2)))(params)
    np.testing.assert_allclose(np.asarray(grads["lora"]), np.asarray(want["lora"]), rtol=1e-6)
    assert not np.any(np.asarray(grads["base"]["w"])) and np.any(np.asarray(want["base"]["w"]))
    assert float(metrics["n"]) == 8.0
