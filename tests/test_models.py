"""Tests for cai_jax.models: goldens from transformers, masking, packing, decode, heads, errors."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.models import (
    ModelConfig,
    ScalarModel,
    Transformer,
    UnsupportedModelError,
    init_cache,
    init_params,
    last_token_index,
    load_pretrained,
    stack_layers,
    tiny_config,
)

TESTDATA = Path(__file__).resolve().parent / "testdata"
TINY_FAMILIES = ("llama", "qwen2", "mistral")

# transformers' fp32 tiny models agree with ours to ~1e-6; 1e-4 leaves room for summation order.
TINY_GOLDEN_ATOL = 1e-4
# SmolLM2 agrees to ~1e-4 (30 layers of fp32 matmuls summed in a different order than torch).
SMOLLM2_ATOL = 2e-3
# The same fp32 math on differently shaped inputs (padding, packing, remat): only reassociation noise.
SAME_MATH_ATOL = 1e-5
# KV-cache decode multiplies in a different order (one query at a time against the cache).
DECODE_ATOL = 1e-4
# bf16 activations keep ~3 significant digits; log-probs of the tiny model move by ~1e-2.
BF16_ATOL = 0.1


def _logp(logits):
    return np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1))


def _tokens(shape, seed, low=3, high=256):
    return np.random.default_rng(seed).integers(low, high, shape).astype(np.int32)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_lm(request, random_params):
    """(config, Transformer, random params) of a tiny random model; llama is tied, qwen2 has qkv bias."""
    cfg = tiny_config(request.param)
    return cfg, Transformer(cfg), random_params(cfg)


def _influence(model, params, tokens_BL, **kwargs) -> np.ndarray:
    """[L, L] norms of d(logits of row 0 at query t) / d(input embedding at s).

    The embedding output is intercepted and offset by a zero delta, so the Jacobian is taken with
    respect to the embeddings actually fed to the first layer (tied output embeddings are not).
    """
    b, l = tokens_BL.shape
    w_V = jnp.asarray(np.random.default_rng(0).normal(size=(model.cfg.vocab_size,)), jnp.float32)

    def f(delta_BLE):
        def add_delta(next_fun, args, kw, context):
            out = next_fun(*args, **kw)
            if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
                out = out + delta_BLE
            return out

        with nn.intercept_methods(add_delta):
            logits = model.apply({"params": params}, tokens_BL, **kwargs)
        return logits[0] @ w_V  # [L]

    jac_LBLE = jax.jit(jax.jacrev(f))(jnp.zeros((b, l, model.cfg.hidden_size), jnp.float32))
    return np.linalg.norm(np.asarray(jac_LBLE[:, 0]), axis=-1)


# ---------------------------------------------------------------- goldens from transformers


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_goldens_match_transformers(family, tiny_checkpoints):
    ckpt = tiny_checkpoints[family]
    lm = load_pretrained(ckpt.folder, with_tokenizer=False)
    g = ckpt.golden
    logits = jax.jit(lm.apply)(g["ids"], g["mask"])
    assert logits.dtype == jnp.float32 and logits.shape == g["logp"].shape
    real = g["mask"].astype(bool)
    np.testing.assert_allclose(_logp(logits)[real], g["logp"][real], atol=TINY_GOLDEN_ATOL, rtol=0)


def test_tiny_configs_parse_family_options(tiny_checkpoints):
    cfgs = {f: ModelConfig.from_hf_file(tiny_checkpoints[f].folder / "config.json") for f in TINY_FAMILIES}
    assert cfgs["llama"].rope_scaling.rope_type == "llama3" and cfgs["llama"].rope_scaling.factor == 8.0
    assert cfgs["llama"].rope_scaling.original_max_position_embeddings == 64
    assert cfgs["llama"].tie_word_embeddings and not cfgs["qwen2"].tie_word_embeddings
    assert cfgs["qwen2"].attention_bias and cfgs["qwen2"].sliding_window is None
    assert cfgs["mistral"].sliding_window == 4 and not cfgs["mistral"].attention_bias


@pytest.mark.slow
def test_smollm2_tokenizer_matches_golden_ids(smollm2):
    meta = json.loads((TESTDATA / "smollm2_golden.json").read_text())
    tok = smollm2.tokenizer
    seqs = [
        tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
        for c in meta["conversations"]
    ]
    seqs += [tok(t, add_special_tokens=False)["input_ids"] for t in meta["transcripts"]]
    with np.load(TESTDATA / "smollm2_golden.npz") as g:
        assert len(seqs) == int(g["num_seqs"])
        for i, ids in enumerate(seqs):
            assert list(ids) == g[f"ids_{i}"].tolist(), f"sequence {i} tokenizes differently"


@pytest.mark.slow
def test_smollm2_splits_digits(smollm2):
    # SmolLM2's original tokenizer.json splits digits one by one (tokenizer.ggml.pre = "smollm").
    ids = smollm2.tokenizer("2024", add_special_tokens=False)["input_ids"]
    assert len(ids) == 4
    assert smollm2.tokenizer.decode(ids) == "2024"


@pytest.mark.slow
def test_smollm2_logprobs_match_transformers(smollm2):
    with np.load(TESTDATA / "smollm2_golden.npz") as npz:
        g = {k: npz[k] for k in npz.files}
    n = int(g["num_seqs"])
    lengths = [len(g[f"ids_{i}"]) for i in range(n)]
    tokens = np.full((n, max(lengths)), smollm2.config.pad_token_id, np.int32)
    mask = np.zeros(tokens.shape, bool)
    for i, length in enumerate(lengths):  # right-padded: real positions see exactly the golden prefix
        tokens[i, :length] = g[f"ids_{i}"]
        mask[i, :length] = True
    logits = smollm2.apply(tokens, mask)  # eager: compiling 30 unrolled layers costs more than it saves
    assert logits.dtype == jnp.float32
    logp = _logp(logits)
    for i, length in enumerate(lengths):
        top = np.take_along_axis(logp[i, :length], g[f"top_ids_{i}"], axis=-1)
        np.testing.assert_allclose(top, g[f"top_logp_{i}"], atol=SMOLLM2_ATOL, rtol=0, err_msg=f"seq {i} top-64")
        sub = logp[i, :length][:, g["subset_ids"]]
        np.testing.assert_allclose(sub, g[f"subset_logp_{i}"], atol=SMOLLM2_ATOL, rtol=0, err_msg=f"seq {i} subset")


# ---------------------------------------------------------------- attention masking


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_causal_gradients(family, random_params):
    cfg = tiny_config(family)
    model = Transformer(cfg)
    params = random_params(cfg)
    l = 8
    infl = _influence(model, params, jnp.asarray(_tokens((1, l), 0)))
    future = np.triu(np.ones((l, l), bool), k=1)  # [t, s] with s > t
    assert np.all(infl[future] == 0.0), "a position's logits depend on a later input"
    assert np.all(infl[~future] > 0.0), "a position's logits ignore an earlier (or its own) input"


@pytest.mark.parametrize("num_layers", [1, 2])
def test_sliding_window_gradients(num_layers, random_params):
    window = 4
    cfg = tiny_config("mistral", sliding_window=window, num_layers=num_layers)
    model = Transformer(cfg)
    params = random_params(cfg)
    l = 12
    infl = _influence(model, params, jnp.asarray(_tokens((1, l), 1)))
    t, s = np.meshgrid(np.arange(l), np.arange(l), indexing="ij")
    # Each layer sees window - 1 tokens back, so the receptive field grows by that per layer.
    reach = num_layers * (window - 1)
    visible = (s <= t) & (t - s <= reach)
    assert np.all(infl[~visible] == 0.0), "influence from outside the sliding window"
    assert np.all(infl[visible] > 0.0)


def test_left_and_right_padding_invariance(tiny_lm):
    cfg, model, params = tiny_lm
    apply = jax.jit(lambda tok, mask=None: model.apply({"params": params}, tok, mask))
    seq = _tokens((6,), 2)
    alone = np.asarray(apply(seq[None]))[0]
    long = _tokens((10,), 3)
    garbage = _tokens((4,), 4)  # pad slots hold arbitrary ids: they must never be attended to
    left = np.stack([long, np.concatenate([garbage, seq])])
    right = np.stack([long, np.concatenate([seq, garbage])])
    mask_left = np.ones((2, 10), bool)
    mask_left[1, :4] = False
    mask_right = np.ones((2, 10), bool)
    mask_right[1, 6:] = False
    out_left = np.asarray(apply(left, mask_left))
    out_right = np.asarray(apply(right, mask_right))
    assert np.all(np.isfinite(out_left)) and np.all(np.isfinite(out_right))
    np.testing.assert_allclose(out_left[1, 4:], alone, atol=SAME_MATH_ATOL, rtol=0)
    np.testing.assert_allclose(out_right[1, :6], alone, atol=SAME_MATH_ATOL, rtol=0)
    long_alone = np.asarray(apply(long[None]))[0]
    np.testing.assert_allclose(out_left[0], long_alone, atol=SAME_MATH_ATOL, rtol=0)


def test_packed_segments_equal_separate_runs(tiny_lm):
    cfg, model, params = tiny_lm
    apply = jax.jit(lambda tok, seg=None: model.apply({"params": params}, tok, segment_ids_BL=seg))
    tokens = _tokens((2, 14), 5)
    segments = np.array([[1] * 5 + [2] * 7 + [0] * 2, [1] * 8 + [2] * 6], np.int32)
    packed = np.asarray(apply(tokens, segments))
    for row, spans in ((0, [(0, 5), (5, 12)]), (1, [(0, 8), (8, 14)])):
        for a, b in spans:
            alone = np.asarray(apply(tokens[row : row + 1, a:b]))[0]
            np.testing.assert_allclose(packed[row, a:b], alone, atol=SAME_MATH_ATOL, rtol=0, err_msg=f"{row} {a}:{b}")


def test_remat_matches_no_remat(random_params):
    cfg = tiny_config("llama")
    params = random_params(cfg)
    tokens = jnp.asarray(_tokens((2, 10), 6))

    def loss_and_logits(p, c):
        logits = Transformer(c).apply({"params": p}, tokens)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], axis=-1)
        return nll.mean(), logits

    run = jax.jit(jax.value_and_grad(loss_and_logits, has_aux=True), static_argnums=1)
    (loss0, logits0), grads0 = run(params, cfg)
    for remat in ("full", "dots"):
        (loss1, logits1), grads1 = run(params, cfg.replace(remat=remat))
        np.testing.assert_allclose(logits1, logits0, atol=SAME_MATH_ATOL, rtol=0, err_msg=remat)
        np.testing.assert_allclose(loss1, loss0, atol=SAME_MATH_ATOL, rtol=0, err_msg=remat)
        assert jax.tree.structure(grads1) == jax.tree.structure(grads0)
        for g1, g0 in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads0)):
            np.testing.assert_allclose(g1, g0, atol=SAME_MATH_ATOL, rtol=0, err_msg=remat)


# ---------------------------------------------------------------- KV-cache decode


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_decode_matches_full_forward(family, random_params):
    # mistral runs with a sliding window of 4 so that the window also applies inside the cache.
    cfg = tiny_config(family, sliding_window=4) if family == "mistral" else tiny_config(family)
    model = Transformer(cfg)
    params = random_params(cfg)
    b, prompt, total = 2, 7, 12
    tokens = _tokens((b, total), 7)
    mask = np.ones((b, total), bool)
    mask[1, :3] = False  # row 1: a 4-token prompt left-padded by 3
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    full = np.asarray(jax.jit(model.apply)({"params": params}, tokens, mask))

    @jax.jit
    def decode(tok, pos, cache, index):
        return model.apply(
            {"params": params}, tok, pos, cache, index, mask, kv_positions_BS=positions, method=Transformer.decode
        )

    cache = init_cache(cfg, b, total)
    logits, cache = decode(tokens[:, :prompt], positions[:, :prompt], cache, 0)
    assert logits.dtype == jnp.float32 and logits.shape == (b, prompt, cfg.vocab_size)
    real = mask[:, :prompt]
    np.testing.assert_allclose(np.asarray(logits)[real], full[:, :prompt][real], atol=DECODE_ATOL, rtol=0)
    for t in range(prompt, total):
        logits, cache = decode(tokens[:, t : t + 1], positions[:, t : t + 1], cache, t)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=DECODE_ATOL, rtol=0, err_msg=f"step {t}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_with_stacked_or_unrolled_layers_is_exact(dtype, random_params):
    # stack_layers casts the stacked kernels to the matmul dtype ahead: the same numbers as
    # casting them inside every matmul. Norm scales (used in fp32) must not be cast.
    cfg = tiny_config("qwen2", dtype=dtype)
    model = Transformer(cfg)
    params = random_params(cfg)
    stacked = stack_layers(params, cfg)
    assert not any(k.startswith("layers_") for k in stacked)
    assert stacked["layers"]["self_attn"]["q_proj"]["kernel"].dtype == cfg.jnp_dtype
    assert stacked["layers"]["input_layernorm"]["scale"].dtype == jnp.float32
    assert stacked["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == cfg.num_layers
    b, t = 2, 6
    tokens, mask = _tokens((b, t), 3), np.ones((b, t + 2), bool)
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))

    def decode(p):
        out = jax.jit(functools.partial(model.apply, method=Transformer.decode))(
            {"params": p}, tokens, positions, init_cache(cfg, b, t + 2), 0, mask
        )
        return jax.tree.map(np.asarray, out)

    (want, want_cache), (got, got_cache) = decode(params), decode(stacked)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_cache["k"], want_cache["k"])
    assert got_cache["k"].shape == (cfg.num_layers, b, cfg.num_kv_heads, cfg.head_dim, t + 2)
    # The blocks unrolled over a per-layer cache (the sampler's path for large batches), with the
    # kernels cast per layer or stacked: the same numbers, and each layer's cache where the scan put it.
    for p in (stack_layers(params, cfg, stack=False), stacked):
        per_layer = init_cache(cfg, b, t + 2, per_layer=True)
        out, caches = jax.jit(functools.partial(model.apply, method=Transformer.decode))(
            {"params": p}, tokens, positions, per_layer, 0, mask
        )
        np.testing.assert_array_equal(np.asarray(out), want)
        assert len(caches) == cfg.num_layers
        for i, kv in enumerate(caches):
            np.testing.assert_array_equal(np.asarray(kv["k"]), want_cache["k"][i])
            np.testing.assert_array_equal(np.asarray(kv["v"]), want_cache["v"][i])


def test_decode_keeps_stacked_bf16_weights_in_bf16():
    # Scanned over as bf16, the stacked kernels were converted by XLA's CPU backend to one f32 copy
    # of every layer before the loop (twice the bytes each decode step reads, and the copy held in
    # memory). The compiled program must hold no f32 array of a stacked kernel's shape.
    cfg = tiny_config("llama", dtype="bfloat16")
    model = Transformer(cfg)
    stacked = stack_layers(init_params(cfg, jax.random.PRNGKey(0)), cfg)
    b, s = 2, 8

    def step(p, cache, tok):
        mask = jnp.ones((b, s), bool)
        return model.apply({"params": p}, tok, jnp.zeros((b, 1), jnp.int32), cache, 0, mask, method="decode")

    hlo = jax.jit(step).lower(stacked, init_cache(cfg, b, s), jnp.zeros((b, 1), jnp.int32)).compile().as_text()
    for path, kernel in jax.tree_util.tree_leaves_with_path(stacked["layers"]):
        if kernel.dtype == jnp.bfloat16:
            f32 = "f32[" + ",".join(map(str, kernel.shape)) + "]"
            assert f32 not in hlo, jax.tree_util.keystr(path)


# ---------------------------------------------------------------- scalar heads


def test_last_token_index():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(last_token_index(jnp.asarray(mask)), [4, 2, 1, 0])


def test_scalar_model_reads_last_real_token(random_params):
    cfg = tiny_config("llama")
    model = ScalarModel(cfg)
    init = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))))
    rng = np.random.default_rng(8)
    head = {
        "kernel": jnp.asarray(rng.normal(size=(cfg.hidden_size, 1)), jnp.float32),
        "bias": jnp.asarray([0.3], jnp.float32),
    }
    params = {"backbone": random_params(cfg), "head": head}
    assert jax.tree.structure(params) == jax.tree.structure(init["params"])  # an LM's params drop in
    apply = jax.jit(model.apply, static_argnames="per_token")

    seq = _tokens((6,), 9)
    pads = _tokens((3,), 10)
    tokens = np.stack([np.concatenate([pads, seq]), np.concatenate([seq, pads])])
    mask = np.stack([np.arange(9) >= 3, np.arange(9) < 6])
    scores = apply({"params": params}, tokens, mask)
    assert scores.shape == (2,) and scores.dtype == jnp.float32
    np.testing.assert_allclose(scores[0], scores[1], atol=SAME_MATH_ATOL, rtol=0)

    hidden = jax.jit(Transformer(cfg).apply, static_argnames="return_hidden")(
        {"params": params["backbone"]}, seq[None], return_hidden=True
    )
    expected = hidden[0, -1] @ head["kernel"][:, 0] + head["bias"][0]
    np.testing.assert_allclose(scores, [expected, expected], atol=SAME_MATH_ATOL, rtol=0)

    per_token = apply({"params": params}, tokens, mask, per_token=True)
    assert per_token.shape == (2, 9) and per_token.dtype == jnp.float32
    np.testing.assert_allclose([per_token[0, 8], per_token[1, 5]], scores, atol=SAME_MATH_ATOL, rtol=0)
    no_mask = apply({"params": params}, seq[None])  # no mask: the last position
    np.testing.assert_allclose(no_mask, [expected], atol=SAME_MATH_ATOL, rtol=0)


# ---------------------------------------------------------------- dtypes and sizes


def test_bf16_compute_close_to_fp32(tiny_lm):
    cfg, model, params = tiny_lm
    tokens = _tokens((2, 10), 11)
    fp32 = jax.jit(model.apply)({"params": params}, tokens)
    bf16 = jax.jit(Transformer(cfg.replace(dtype="bfloat16")).apply)({"params": params}, tokens)
    assert fp32.dtype == jnp.float32 and bf16.dtype == jnp.float32
    assert np.all(np.isfinite(bf16))
    np.testing.assert_allclose(_logp(bf16), _logp(fp32), atol=BF16_ATOL, rtol=0)
    assert not np.array_equal(bf16, fp32)  # the compute dtype did take effect


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_num_params_counts_init_params(family):
    cfg = tiny_config(family)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(params))


# ---------------------------------------------------------------- errors


@pytest.fixture
def llama_hf_dict(tiny_checkpoints):
    return json.loads((tiny_checkpoints["llama"].folder / "config.json").read_text())


def test_unsupported_architecture_is_named(llama_hf_dict):
    hf = dict(llama_hf_dict, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        ModelConfig.from_hf_dict(hf)


def test_missing_field_is_named(llama_hf_dict):
    del llama_hf_dict["hidden_size"]
    with pytest.raises(UnsupportedModelError, match="hidden_size"):
        ModelConfig.from_hf_dict(llama_hf_dict, source="some/config.json")


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_unsupported_rope_type(llama_hf_dict, key):
    llama_hf_dict.pop("rope_parameters")
    llama_hf_dict[key] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_hf_dict(llama_hf_dict)


@pytest.mark.parametrize(("field", "value"), [("hidden_act", "gelu"), ("mlp_bias", True)])
def test_unsupported_options(llama_hf_dict, field, value):
    with pytest.raises(UnsupportedModelError, match=field):
        ModelConfig.from_hf_dict(dict(llama_hf_dict, **{field: value}))


def test_load_pretrained_missing_path(tmp_path):
    missing = tmp_path / "nonexistent" / "path"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_pretrained(missing)


def test_load_pretrained_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)


def test_hub_name_not_cached_is_not_downloaded(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the default is offline
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=0"):
        load_pretrained("cai-jax-tests/not-a-cached-model")
