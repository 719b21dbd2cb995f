"""LoRA (cai_jax.nn.lora): adapters-only SFT with a bit-identical base, merged export, the
reference as the base alone, target selection, the PEFT layout and sharded adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from cai_jax import sharding as sh
from cai_jax.checkpoints import hf, peft
from cai_jax.models import Transformer, init_params, load_pretrained, tiny_config
from cai_jax.nn import lora as L
from cai_jax.train.sft import train_sft
from tests.defaults import optim_config

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # max abs logit difference, merged export vs the adapted forward (float32)
SEQ_LEN, BATCH, STEPS = 16, 4, 12
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _lora(rank=4, alpha=8.0, targets=L.ATTENTION_AND_MLP):
    return L.LoRAConfig(rank=rank, alpha=alpha, dropout=0.0, target_modules=targets)


def _leaves_equal(a, b) -> bool:
    same = jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(jax.tree.leaves(same))


@pytest.fixture(scope="module")
def cfg():
    return tiny_config("llama", tie_word_embeddings=False)


@pytest.fixture(scope="module")
def base(cfg):
    return jax.device_get(init_params(cfg, jax.random.key(0)))


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(3, 256, (2, 12)), jnp.int32)


def _trained_adapters(cfg, base, seed=3):
    """Non-zero adapters (B drawn too), so a merge or round trip is sensitive to every tensor."""
    adapters = L.init_lora(base, L.logical_specs(Transformer(cfg)), _lora(), jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _sft(cfg, base, workdir):
    rng = np.random.default_rng(1)
    examples = [{"input_ids": rng.integers(3, 256, 16).tolist(), "loss_mask": [0] * 4 + [1] * 12} for _ in range(BATCH)]
    return train_sft(
        cfg,
        base,
        examples,
        optim_cfg=optim_config(lr=1e-2, schedule="constant", warmup_steps=0, updates=STEPS),
        num_steps=STEPS,
        batch_size=BATCH,
        seq_len=SEQ_LEN,
        workdir=workdir,
        export_dir=workdir / "export",
        peak_flops_per_device=None,
        lora=_lora(),
    )


@pytest.fixture(scope="module")
def sft_run(cfg, base, tmp_path_factory):
    """train_sft with LoRA for STEPS steps on one batch of examples seen every step, merged export."""
    workdir = tmp_path_factory.mktemp("lora_sft")
    state = _sft(cfg, base, workdir)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return jax.device_get(state), rows, workdir


# ---- (1) only the adapters train


def test_sft_lora_trains_adapters_only(sft_run, base):
    state, rows, _ = sft_run
    assert set(state.params) == {"base", "lora"}
    assert _leaves_equal(state.params["base"], base), "the frozen base changed"
    pairs = L.flat_adapters(state.params["lora"]).values()
    assert all(np.abs(ab["b"]).max() > 0 for ab in pairs), "some B stayed at its zero init"
    assert rows[-1]["loss"] < 0.9 * rows[0]["loss"], [r["loss"] for r in rows]
    # no optimizer state for the base: Adam's moments hold the adapters' leaves only
    moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert sum(x.size for x in moments) == 2 * L.num_lora_params(state.params["lora"])


def test_sft_lora_checkpoint_restores(sft_run, cfg, base):
    """Called again, train_sft restores the {base, lora} state from its last checkpoint."""
    state, _, workdir = sft_run
    again = jax.device_get(_sft(cfg, base, workdir))
    assert int(again.step) == STEPS and _leaves_equal(again.params, state.params)


# ---- (2) merged export == adapted forward


def test_merged_export_matches_adapted_forward(sft_run, cfg, tokens):
    state, _, workdir = sft_run
    adapted = L.LoRAModel(Transformer(cfg), _lora()).apply({"params": state.params}, tokens)
    loaded = load_pretrained(workdir / "export", with_tokenizer=False)
    assert hf.is_complete_export(workdir / "export")
    exported = loaded.apply(tokens)
    diff = float(jnp.max(jnp.abs(exported - adapted)))
    assert diff <= TOL, diff
    base_logits = Transformer(cfg).apply({"params": state.params["base"]}, tokens)
    assert float(jnp.max(jnp.abs(exported - base_logits))) > 1e-3  # the adapters did change the model


def test_save_merged_checkpoint(cfg, base, tokens, tmp_path):
    adapters = _trained_adapters(cfg, base)
    model = Transformer(cfg)
    peft.save_merged_checkpoint(tmp_path, cfg, base, adapters, _lora())
    loaded = load_pretrained(tmp_path, with_tokenizer=False)
    want = model.apply({"params": L.apply_lora(base, adapters, _lora())}, tokens)
    assert float(jnp.max(jnp.abs(loaded.apply(tokens) - want))) <= TOL


@pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("torch", "transformers")),
    reason="needs torch and transformers",
)
def test_merged_export_loads_in_transformers(sft_run, tokens):
    import torch
    from transformers import AutoModelForCausalLM

    state, _, workdir = sft_run
    model = AutoModelForCausalLM.from_pretrained(workdir / "export", torch_dtype=torch.float32)
    with torch.no_grad():
        got = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
    want = load_pretrained(workdir / "export", with_tokenizer=False).apply(tokens)
    assert np.max(np.abs(got - np.asarray(want))) <= 1e-4


# ---- (3) the reference is the base alone; B = 0 gives the base


def _logp(logits_BLV, tokens_BL):
    logp = jax.nn.log_softmax(logits_BLV[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens_BL[:, 1:, None], axis=-1)[..., 0]


def test_reference_is_the_base_and_init_is_the_base(cfg, base, tokens):
    model = Transformer(cfg)
    lora_model = L.LoRAModel(model, _lora())
    adapters = _trained_adapters(cfg, base)
    shared = {"base": base, "lora": adapters}
    base_logp = _logp(model.apply({"params": base}, tokens), tokens)
    # the reference reads the shared base (adapters off): exactly the base model
    ref_logp = _logp(model.apply({"params": shared["base"]}, tokens), tokens)
    assert np.array_equal(np.asarray(ref_logp), np.asarray(base_logp))
    policy_logp = _logp(lora_model.apply({"params": shared}, tokens), tokens)
    assert float(jnp.max(jnp.abs(policy_logp - base_logp))) > 1e-3
    # fresh adapters (B = 0): the adapted model is the base, bit for bit
    fresh = L.init_lora(base, L.logical_specs(model), _lora(), jax.random.key(1))
    assert _leaves_equal(L.apply_lora(base, fresh, _lora()), base)
    fresh_logp = _logp(lora_model.apply({"params": {"base": base, "lora": fresh}}, tokens), tokens)
    assert np.array_equal(np.asarray(fresh_logp), np.asarray(base_logp))


def test_lora_model_init_matches_the_module(cfg, tokens):
    """LoRAModel.init draws a base of the module's structure and zero B, with logical names on both."""
    model = Transformer(cfg)
    boxed = L.LoRAModel(model, _lora()).init(jax.random.key(0), tokens)["params"]
    params = nn.meta.unbox(boxed)
    plain = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params["base"]) == jax.tree.map(
        lambda x: (x.shape, x.dtype), nn.meta.unbox(plain)
    )
    assert all(not np.asarray(ab["b"]).any() for ab in L.flat_adapters(params["lora"]).values())
    specs = nn.get_partition_spec(boxed)
    assert specs["base"]["layers_0"]["self_attn"]["q_proj"]["kernel"] == sh.P("embed", "q_heads", "head_dim")
    assert specs["lora"]["layers_0"]["self_attn"]["q_proj"]["kernel"]["b"] == sh.P(None, "q_heads", "head_dim")


# ---- (4) target selection


def test_targets_select_attention_and_mlp_kernels(cfg, base):
    paths = L.lora_targets(base, _lora())
    block = {p: "self_attn" for p in PROJECTIONS[:4]} | {p: "mlp" for p in PROJECTIONS[4:]}
    want = {f"layers_{i}/{block[p]}/{p}/kernel" for i in (0, 1) for p in PROJECTIONS}
    assert set(paths) == want and len(paths) == 14
    only_qv = L.lora_targets(base, _lora(targets=(r"(q|v)_proj/kernel$",)))
    assert only_qv == [f"layers_{i}/self_attn/{p}_proj/kernel" for i in (0, 1) for p in "qv"]


def test_adapter_shapes_follow_the_kernel_layout(cfg, base):
    ad = L.init_lora(base, L.logical_specs(Transformer(cfg)), _lora(), jax.random.key(0))["layers_0"]
    e, h, k, d, m, r = 64, 4, 2, 16, 128, 4
    shapes = jax.tree.map(lambda x: x.shape, ad)
    assert shapes["self_attn"]["q_proj"]["kernel"] == {"a": (e, r), "b": (r, h, d)}
    assert shapes["self_attn"]["k_proj"]["kernel"] == {"a": (e, r), "b": (r, k, d)}
    assert shapes["self_attn"]["o_proj"]["kernel"] == {"a": (h, d, r), "b": (r, e)}
    assert shapes["mlp"]["down_proj"]["kernel"] == {"a": (m, r), "b": (r, e)}
    # W' - W is (alpha / r) * A @ B in the kernel's own layout
    ad = _trained_adapters(cfg, base)
    w = L.apply_lora(base, ad, _lora())["layers_0"]["self_attn"]["o_proj"]["kernel"]
    ab = ad["layers_0"]["self_attn"]["o_proj"]["kernel"]
    want = base["layers_0"]["self_attn"]["o_proj"]["kernel"] + 2.0 * np.einsum("hdr,re->hde", ab["a"], ab["b"])
    np.testing.assert_allclose(w, want, atol=1e-6)


@pytest.mark.parametrize(
    "targets, match",
    [
        ((r"self_attn/q_proj/kernel$", r"attn/qq_proj"), r"regex 'attn/qq_proj' matches no parameter"),
        ((r"input_layernorm",), r"regex 'input_layernorm' matches non-kernel leaves"),
    ],
)
def test_bad_targets_are_errors_naming_the_regex(base, targets, match):
    with pytest.raises(ValueError, match=match):
        L.lora_targets(base, _lora(targets=targets))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dropout": 0.1}, r"dropout=0.1: only 0 is supported"),
        ({"rank": 0}, r"rank=0 must be a positive integer"),
        ({"target_modules": "q_proj"}, r"sequence of regexes"),
        ({"target_modules": ("(",)}, r"bad regex '\('"),
    ],
)
def test_config_errors(kwargs, match):
    fields = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ("q_proj",), **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        L.LoRAConfig(**fields)


# ---- (5) PEFT layout


def test_peft_files_names_shapes_and_round_trip(cfg, base, tmp_path):
    adapters = _trained_adapters(cfg, base)
    peft.save_peft_adapters(tmp_path, cfg, adapters, _lora(), base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.0)
    assert config["target_modules"] == sorted(PROJECTIONS)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 14
    pre = "base_model.model.model.layers.1."
    e, r = cfg.hidden_size, 4
    assert tensors[pre + "self_attn.q_proj.lora_A.weight"].shape == (r, e)
    assert tensors[pre + "self_attn.q_proj.lora_B.weight"].shape == (cfg.num_heads * cfg.head_dim, r)
    assert tensors[pre + "self_attn.k_proj.lora_B.weight"].shape == (cfg.num_kv_heads * cfg.head_dim, r)
    assert tensors[pre + "self_attn.o_proj.lora_A.weight"].shape == (r, cfg.num_heads * cfg.head_dim)
    assert tensors[pre + "mlp.down_proj.lora_A.weight"].shape == (r, cfg.intermediate_size)
    # PEFT's update B @ A * alpha / r, added to HF's [out, in] weight, is the merged weight
    merged = hf.params_to_hf_tensors(cfg, L.apply_lora(base, adapters, _lora()))
    plain = hf.params_to_hf_tensors(cfg, base)
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj"):
        a, b = tensors[pre + name + ".lora_A.weight"], tensors[pre + name + ".lora_B.weight"]
        hf_name = f"model.layers.1.{name}.weight"
        np.testing.assert_allclose(plain[hf_name] + 2.0 * b @ a, merged[hf_name], atol=1e-6)
    back, lora_back = peft.load_peft_adapters(tmp_path, cfg)
    assert _leaves_equal(back, jax.device_get(adapters))
    assert (lora_back.rank, lora_back.alpha, lora_back.dropout) == (4, 8.0, 0.0)
    assert L.lora_targets(base, lora_back) == L.lora_targets(base, _lora())
    assert hf.is_complete_export(tmp_path)


def test_peft_partial_selection_writes_a_module_regex(cfg, base, tmp_path):
    lora = _lora(targets=(r"layers_1/self_attn/v_proj/kernel$",))
    adapters = L.init_lora(base, L.logical_specs(Transformer(cfg)), lora, jax.random.key(0))
    peft.save_peft_adapters(tmp_path, cfg, adapters, lora)
    target = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert target == r"(model\.layers\.1\.self_attn\.v_proj)"
    back, _ = peft.load_peft_adapters(tmp_path, cfg)
    assert _leaves_equal(back, jax.device_get(adapters))


# ---- (6) adapters shard


def test_adapter_logical_specs_map_through_the_rules(cfg, base):
    logical = L.logical_specs(Transformer(cfg))
    adapters = L.init_lora(base, logical, _lora(), jax.random.key(0))
    specs = L.lora_logical_specs(adapters, logical)
    mesh = jax.sharding.AbstractMesh((1, 2, 2), sh.MESH_AXES)
    shardings = sh.logical_to_sharding(specs, mesh)
    sh.check_divisible(adapters, shardings, mesh)
    q = shardings["layers_0"]["self_attn"]["q_proj"]["kernel"]
    o = shardings["layers_0"]["self_attn"]["o_proj"]["kernel"]
    assert (q["a"].spec, q["b"].spec) == (sh.P("fsdp", None), sh.P(None, "tensor", None))
    assert (o["a"].spec, o["b"].spec) == (sh.P("tensor", None, None), sh.P(None, "fsdp"))


_WORKER = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from cai_jax import sharding as sh
    from cai_jax.models import Transformer, init_params, tiny_config
    from cai_jax.nn import lora as L
    from cai_jax.train.steps import sft_loss_fn

    assert jax.device_count() == 8
    cfg = tiny_config("llama")
    lcfg = L.LoRAConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=L.ATTENTION_AND_MLP)
    model = L.LoRAModel(Transformer(cfg), lcfg)
    tokens = np.random.default_rng(0).integers(3, 256, (8, 16)).astype(np.int32)
    batch = {"tokens": tokens, "mask": np.ones_like(tokens), "loss_mask": np.ones_like(tokens)}
    base = init_params(cfg, jax.random.key(0))
    adapters = L.init_lora(base, L.logical_specs(Transformer(cfg)), lcfg, jax.random.key(1))
    adapters = jax.tree.map(lambda x: x + 0.05 * jnp.ones_like(x), adapters)
    params = {"base": base, "lora": adapters}
    grad = jax.jit(jax.grad(lambda p: sft_loss_fn(p, batch, model=model)[0]))
    want = jax.device_get(grad(params)["lora"])
    mesh = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = sh.param_shardings(model, jax.ShapeDtypeStruct((8, 16), jnp.int32), mesh)
    with sh.with_rules(mesh):
        got = grad(sh.shard_params(params, shardings))["lora"]
    q = got["layers_0"]["self_attn"]["q_proj"]["kernel"]
    diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), got, want)))
    print(json.dumps({
        "a_spec": str(q["a"].sharding.spec), "b_spec": str(q["b"].sharding.spec),
        "b_shards": len(q["b"].addressable_shards), "grads_diff": diff,
        "grads_max": max(float(np.abs(x).max()) for x in jax.tree.leaves(want)),
    }))
    """
)


def test_adapters_shard_on_8_fake_devices():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (r["a_spec"], r["b_spec"]) == ("P('fsdp',)", "P(None, 'tensor')")
    assert r["b_shards"] == 8 and r["grads_max"] > 0
    assert r["grads_diff"] <= TOL, r
