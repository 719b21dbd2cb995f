"""Train state, optimizer and the SFT / PM train steps on tiny configs.

The frozen-metrics tests recompute tests/testdata/train_step_golden.json with
scripts/make_train_goldens.py's own setup; independent checks (hand-computed losses, accumulation
vs full batch, frozen params, schedules) make sure the golden is not the only thing pinning them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cai_jax.losses import pm_loss
from cai_jax.models import ScalarModel, Transformer, tiny_config
from cai_jax.train.state import OptimConfig, TrainState, decay_mask, make_optimizer, make_schedule, param_paths
from cai_jax.train.steps import check_finite, eval_pm_batch, sft_loss_fn, sft_step
from scripts import make_train_goldens as goldens
from tests.conftest import TESTDATA
from tests.defaults import optim_config

# Set once. The golden was written by the same fp32 code on CPU; XLA's CPU results are
# deterministic for a given program, and 1e-5 leaves room only for summation-order changes across
# XLA versions / CPU instruction sets, far below what any change to the model, loss or optimizer
# math moves these numbers by.
GOLDEN_RTOL = 1e-5
# Same quantity computed two ways in fp32 (different reduction orders): a few ulps of the mean.
SAME_MATH_RTOL = 1e-5
# Accumulated vs full-batch params after two Adam updates (see the test's docstring for eps): the
# gradients agree to fp32 rounding, leaving differences of about one ulp of an O(1) param (1.2e-7).
ACCUM_ATOL = 1e-6


def _jit(step_fn, model, optimizer, **kw):
    return jax.jit(functools.partial(step_fn, model=model, optimizer=optimizer, **kw), donate_argnums=0)


def _copy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _flat(tree) -> dict:
    return dict(zip(jax.tree.leaves(param_paths(tree)), jax.tree.leaves(tree)))


@pytest.fixture(scope="module")
def cfg():
    return goldens.golden_config()


# ---------------------------------------------------------------- frozen reference metrics


def test_frozen_reference_metrics():
    expected = json.loads((TESTDATA / "train_step_golden.json").read_text())
    got = goldens.compute_metrics()
    for objective in ("sft", "pm"):
        for key in ("loss", "grad_norm", "loss_after"):
            np.testing.assert_allclose(
                got[objective][key], expected[objective][key], rtol=GOLDEN_RTOL, err_msg=f"{objective}.{key}"
            )
        assert got[objective]["loss_after"] < got[objective]["loss"]  # one update on the same batch helps


def test_sft_loss_at_init_matches_hand_computation(cfg):
    params = goldens.sft_params()
    batch = goldens.sft_batch()
    logits = Transformer(cfg).apply({"params": params}, batch["tokens"], batch["mask"])
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    tokens, mask, loss_mask = batch["tokens"], batch["mask"], batch["loss_mask"]
    nll, count = 0.0, 0
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - 1):
            if mask[b, t + 1] and loss_mask[b, t + 1]:  # position t predicts response token t + 1
                nll -= float(logp[b, t, tokens[b, t + 1]])
                count += 1
    assert count == int(loss_mask.sum()) - int(loss_mask[:, 0].sum())
    hand = nll / count
    golden = json.loads((TESTDATA / "train_step_golden.json").read_text())["sft"]["loss"]
    np.testing.assert_allclose(golden, hand, rtol=SAME_MATH_RTOL)


def test_pm_loss_at_init_matches_direct_scores(cfg):
    params = goldens.pm_params()
    batch = goldens.pm_batch()
    apply = jax.jit(ScalarModel(cfg).apply)
    r_a = apply({"params": params}, batch["tokens_a"], batch["mask_a"])  # A and B in separate passes
    r_b = apply({"params": params}, batch["tokens_b"], batch["mask_b"])
    direct, _ = pm_loss(r_a, r_b, batch["p"])
    m = np.asarray(r_a, np.float64) - np.asarray(r_b, np.float64)
    p = batch["p"].astype(np.float64)
    bce = np.mean(p * np.log1p(np.exp(-m)) + (1 - p) * np.log1p(np.exp(m)))
    np.testing.assert_allclose(direct, bce, rtol=SAME_MATH_RTOL)
    golden = json.loads((TESTDATA / "train_step_golden.json").read_text())["pm"]["loss"]
    np.testing.assert_allclose(golden, direct, rtol=SAME_MATH_RTOL)

    out = jax.jit(functools.partial(eval_pm_batch, model=ScalarModel(cfg)))(params, batch)
    np.testing.assert_allclose(out["r_a"], r_a, rtol=SAME_MATH_RTOL, atol=1e-7)
    np.testing.assert_allclose(out["r_b"], r_b, rtol=SAME_MATH_RTOL, atol=1e-7)
    np.testing.assert_allclose(out["prob_a"], 1 / (1 + np.exp(-m)), rtol=SAME_MATH_RTOL)


# ---------------------------------------------------------------- optimizer behaviour


def _equal_token_batch(cfg, seed: int) -> dict:
    """[4, 16] full rows with one response length: both halves hold the same number of loss tokens."""
    rng = np.random.default_rng(seed)
    b, l = goldens.B, goldens.L
    tokens = rng.integers(3, cfg.vocab_size, size=(b, l)).astype(np.int32)
    loss_mask = np.broadcast_to(np.arange(l) >= 5, (b, l))
    return {"tokens": tokens, "mask": np.ones((b, l), bool), "loss_mask": loss_mask}


def test_grad_accumulation_matches_full_batch(cfg):
    """Two windows of two half batches (grad_accum_steps=2) == two steps on the full batches.

    Valid because both halves have the same number of loss tokens, so the mean of the two half-batch
    mean losses is the full-batch mean loss. Clipping is active (grad norm ~2.5 > 1): it must act on
    the averaged gradient.

    Adam's eps is 1e-4 here, not 1e-8. The accumulated and full-batch gradients agree to fp32
    rounding (~1e-7 of the largest entry), but Adam divides by sqrt(v) + eps, which multiplies the
    rounding of a near-zero entry by up to lr / eps: 1e5 at eps = 1e-8 (entries of ~1e-8 exist,
    e.g. attention kernels), enough to move single params by ~1e-6. That would test Adam's
    conditioning, not accumulation; at eps = 1e-4 the factor is at most 10.
    """
    batches = [_equal_token_batch(cfg, seed) for seed in (1, 2)]
    params = goldens.sft_params()
    ocfg = dataclasses.replace(goldens.OPTIM, eps=1e-4)
    opt_full = make_optimizer(ocfg, params)
    step_full = _jit(sft_step, Transformer(cfg), opt_full)
    state_full = TrainState.create(goldens.sft_params(), opt_full, jax.random.key(0))
    for batch in batches:
        state_full, _ = step_full(state_full, batch)

    opt_acc = make_optimizer(dataclasses.replace(ocfg, grad_accum_steps=2), params)
    step_acc = _jit(sft_step, Transformer(cfg), opt_acc)
    state_acc = TrainState.create(goldens.sft_params(), opt_acc, jax.random.key(0))
    for i, batch in enumerate(batches):
        for half in (slice(0, 2), slice(2, 4)):
            before = _copy(state_acc.params)
            state_acc, metrics = step_acc(state_acc, {k: v[half] for k, v in batch.items()})
            if half.start == 0:  # first micro-batch of a window: accumulated, nothing applied yet
                jax.tree.map(np.testing.assert_array_equal, _copy(state_acc.params), before)
            assert float(metrics["lr"]) == pytest.approx(goldens.OPTIM.lr)
        assert int(state_acc.step) == 2 * (i + 1)

    assert int(state_full.step) == 2
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, atol=ACCUM_ATOL, rtol=0), state_acc.params, state_full.params
    )
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), state_full.params, params)
    assert max(jax.tree.leaves(moved)) > 100 * ACCUM_ATOL  # the comparison is not vacuous


def test_frozen_params_stay_bitwise_unchanged(cfg):
    params = goldens.sft_params()
    ocfg = optim_config(lr=1e-2, weight_decay=0.1, frozen=(r"^layers_0/", r"^norm/"), schedule="constant", updates=2)
    opt = make_optimizer(ocfg, params)
    before = _flat(_copy(params))
    state = TrainState.create(params, opt, jax.random.key(0))
    step = _jit(sft_step, Transformer(cfg), opt)
    for _ in range(2):
        state, _ = step(state, goldens.sft_batch())
    after = _flat(_copy(state.params))
    frozen = [p for p in after if p.startswith(("layers_0/", "norm/"))]
    assert frozen and len(frozen) < len(after)
    for path in after:
        if path in frozen:
            assert np.array_equal(after[path], before[path]), path
            assert after[path].tobytes() == before[path].tobytes(), path
        else:
            assert not np.array_equal(after[path], before[path]), path


def test_frozen_regex_that_matches_nothing_is_an_error(cfg):
    params = goldens.sft_params()
    with pytest.raises(ValueError, match=re.escape("regex 'layer_0/' matches no parameter")):
        make_optimizer(optim_config(lr=1e-4, frozen=("layer_0/",), updates=1), params)


def test_schedule_values():
    cosine = make_schedule(optim_config(lr=1.0, warmup_steps=10, schedule="cosine", total_steps=110, min_lr_ratio=0.1))
    # Warmup lr * s / 10; then 0.1 + 0.9 * (1 + cos(pi * (s - 10) / 100)) / 2; floor 0.1 after 110.
    hand = {0: 0.0, 5: 0.5, 10: 1.0, 35: 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 60: 0.55, 110: 0.1, 500: 0.1}
    for step, value in hand.items():
        np.testing.assert_allclose(float(cosine(step)), value, rtol=1e-6, atol=1e-7, err_msg=f"step {step}")
    constant = make_schedule(optim_config(lr=2e-3, warmup_steps=4, schedule="constant", updates=10_000))
    for step, value in {0: 0.0, 1: 5e-4, 3: 1.5e-3, 4: 2e-3, 10_000: 2e-3}.items():
        np.testing.assert_allclose(float(constant(step)), value, rtol=1e-6, err_msg=f"step {step}")
    assert float(make_schedule(optim_config(lr=3e-4, schedule="constant", updates=1))(0)) == pytest.approx(
        3e-4
    )  # no warmup: full lr at once
    # Under accumulation the schedule counts optimizer updates: micro-steps 6 and 7 feed update 3.
    params = {"w": jnp.zeros((2, 2))}
    opt = make_optimizer(
        optim_config(lr=1.0, warmup_steps=10, schedule="constant", grad_accum_steps=2, updates=4), params
    )
    assert [float(opt.lr(s)) for s in (0, 1, 6, 7)] == pytest.approx([0.0, 0.0, 0.3, 0.3])


def test_weight_decay_mask_excludes_norms_and_biases():
    cfg = tiny_config("qwen2")  # qkv biases (2-D: [heads, head_dim])
    model = ScalarModel(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    mask = _flat(decay_mask(params))
    assert mask["backbone/layers_0/self_attn/q_proj/bias"] is False
    assert mask["backbone/layers_0/input_layernorm/scale"] is False
    assert mask["backbone/norm/scale"] is False
    assert mask["head/bias"] is False
    assert mask["backbone/layers_0/self_attn/q_proj/kernel"] is True
    assert mask["backbone/embed_tokens/embedding"] is True
    assert mask["head/kernel"] is True
    for path, decays in mask.items():
        assert decays == (path.rsplit("/", 1)[-1] not in ("scale", "bias")), path

    # Behaviour: zero gradients make Adam's step exactly 0, leaving only the decay -lr * wd * p.
    lr, wd = 0.1, 0.5
    opt = make_optimizer(
        optim_config(lr=lr, weight_decay=wd, grad_clip_norm=0.0, schedule="constant", updates=1), params
    )
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(opt.update)(zeros, opt.init(params), params)
    for path, u in _flat(updates).items():
        p = _flat(params)[path]
        expected = -lr * wd * np.asarray(p) if mask[path] else np.zeros_like(p)
        np.testing.assert_allclose(u, expected, rtol=1e-6, atol=0, err_msg=path)


# ---------------------------------------------------------------- SFT masking


class _Bigram(nn.Module):
    """Logits at t depend on token t only: changing one token changes exactly two predictions."""

    vocab: int

    @nn.compact
    def __call__(self, tokens_BL, mask_BL=None, positions_BL=None, segment_ids_BL=None):
        return nn.Embed(self.vocab, self.vocab)(tokens_BL)


def test_sft_loss_ignores_prompt_tokens(cfg):
    model = _Bigram(cfg.vocab_size)
    batch = goldens.sft_batch()
    params = model.init(jax.random.key(0), batch["tokens"])["params"]
    loss_fn = jax.jit(functools.partial(sft_loss_fn, model=model))
    loss, _ = loss_fn(params, batch)
    # Row 0: prompt = positions 0..4. Token 2 is the target of position 1 and the input of position 2,
    # whose target (token 3) is also prompt: neither prediction is trained on.
    assert not batch["loss_mask"][0, :5].any() and batch["loss_mask"][0, 5]
    changed = {**batch, "tokens": batch["tokens"].copy()}
    changed["tokens"][0, 2] = (changed["tokens"][0, 2] + 1) % cfg.vocab_size
    assert float(loss_fn(params, changed)[0]) == float(loss)
    # Token 4 (last prompt token) predicts the first response token: changing it must matter.
    changed["tokens"][0, 4] = (changed["tokens"][0, 4] + 1) % cfg.vocab_size
    assert float(loss_fn(params, changed)[0]) != float(loss)
    # So must a response target.
    changed = {**batch, "tokens": batch["tokens"].copy()}
    changed["tokens"][0, 7] = (changed["tokens"][0, 7] + 1) % cfg.vocab_size
    assert float(loss_fn(params, changed)[0]) != float(loss)


def test_packed_sft_loss_equals_unpacked(cfg):
    """With segment ids, a target in the next segment never counts, even if loss_mask marks it."""
    params = goldens.sft_params()
    rng = np.random.default_rng(3)
    seq1, seq2 = rng.integers(3, cfg.vocab_size, 6), rng.integers(3, cfg.vocab_size, 8)
    packed = {
        "tokens": np.concatenate([seq1, seq2, [0, 0]])[None].astype(np.int32),
        "segment_ids": np.array([[1] * 6 + [2] * 8 + [0] * 2], np.int32),
    }
    packed["mask"] = packed["segment_ids"] != 0
    packed["loss_mask"] = packed["mask"]  # every real token, including seq2's first
    unpacked = {"tokens": np.zeros((2, 8), np.int32), "mask": np.zeros((2, 8), bool)}
    unpacked["tokens"][0, :6], unpacked["tokens"][1] = seq1, seq2
    unpacked["mask"][0, :6], unpacked["mask"][1] = True, True
    unpacked["loss_mask"] = unpacked["mask"]
    loss_fn = jax.jit(functools.partial(sft_loss_fn, model=Transformer(cfg)))
    loss_p, m_p = loss_fn(params, packed)
    loss_u, m_u = loss_fn(params, unpacked)
    assert float(m_p["tokens"]) == float(m_u["tokens"]) == 5 + 7
    np.testing.assert_allclose(loss_p, loss_u, rtol=SAME_MATH_RTOL)


# ---------------------------------------------------------------- PM


def test_pm_step_learns_a_separable_toy_task(cfg):
    """A ends with token 5, B with token 6, p = 1: 20 steps must drive the loss well down."""
    b, l = goldens.B, goldens.L  # the golden PM step's shapes: its compiled step is reused
    rng = np.random.default_rng(4)
    body = rng.integers(10, cfg.vocab_size, size=(2, b, l - 1)).astype(np.int32)
    tokens_a = np.concatenate([body[0], np.full((b, 1), 5, np.int32)], axis=1)
    tokens_b = np.concatenate([body[1], np.full((b, 1), 6, np.int32)], axis=1)
    mask = np.ones((b, l), bool)
    batch = {"tokens_a": tokens_a, "mask_a": mask, "tokens_b": tokens_b, "mask_b": mask, "p": np.ones(b, np.float32)}
    _, optimizer, step = goldens.golden_step("pm")
    state = TrainState.create(goldens.pm_params(), optimizer, jax.random.key(0))
    losses = []
    for _ in range(20):
        state, metrics = step(state, batch)
        check_finite(metrics, int(state.step) - 1)
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(math.log(2), abs=1e-2)  # near-zero scores at init
    assert losses[-1] < 0.25 * losses[0], losses
    assert float(metrics["accuracy"]) == 1.0 and float(metrics["margin"]) > 0
    assert set(metrics) >= {"loss", "accuracy", "margin", "reward_mean", "reward_std", "grad_norm", "lr"}


# ---------------------------------------------------------------- guards and config


def test_check_finite_names_the_step():
    check_finite({"loss": jnp.float32(1.5), "grad_norm": jnp.float32(2.0)}, 3)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 7\b"):
        check_finite({"loss": jnp.float32(jnp.nan)}, 7)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 12 \(batch 40\)"):
        check_finite({"loss": np.float32(np.inf)}, 12, batch_id=40)
    with pytest.raises(FloatingPointError, match=r"non-finite grad_norm at step 9\b"):
        check_finite({"loss": jnp.float32(1.0), "grad_norm": jnp.float32(jnp.inf)}, 9)


def _full_optim_dict() -> dict:
    return {
        "lr": 1e-4,
        "warmup_steps": 100,
        "schedule": "cosine",
        "total_steps": 1000,
        "min_lr_ratio": 0.1,
        "weight_decay": 0.1,
        "b1": 0.9,
        "b2": 0.95,
        "eps": 1e-8,
        "grad_clip_norm": 1.0,
        "grad_accum_steps": 1,
        "frozen": ["^embed_tokens/"],
    }


def test_optim_config_from_config():
    ocfg = OptimConfig.from_config(ml_collections.ConfigDict(_full_optim_dict()))
    assert ocfg.schedule == "cosine" and ocfg.frozen == ("^embed_tokens/",)
    assert OptimConfig.from_config(_full_optim_dict()) == ocfg
    hash(ocfg)  # frozen and hashable

    with pytest.raises(ValueError, match=r"unknown field\(s\) 'learning_rate'"):
        OptimConfig.from_config({**_full_optim_dict(), "learning_rate": 1e-3})
    missing = _full_optim_dict()
    del missing["b2"]
    with pytest.raises(ValueError, match=r"missing field\(s\) 'b2'"):
        OptimConfig.from_config(missing)
    with pytest.raises(ValueError, match="schedule='linear'"):
        OptimConfig.from_config({**_full_optim_dict(), "schedule": "linear"})
