"""DPO / IPO (rl_losses' preference section, cai_jax.train.dpo): hand-computed losses and the trainer."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.rl_losses import ipo_loss, preference_log_ratio, soft_dpo_loss

ROOT = Path(__file__).resolve().parents[1]
# Set once: float32 arithmetic against float64 closed forms.
F32_RTOL, F32_ATOL = 1e-5, 1e-6

# Two rows of (log pi(a), log pi(b), log ref(a), log ref(b)), then the targets p_a.
LOGPS = np.array([[-3.0, -5.0, -4.0, -4.5], [-7.0, -2.0, -6.5, -3.0]], np.float64)
P = np.array([0.9, 0.25])
BETA = 0.5


def _d() -> np.ndarray:
    return (LOGPS[:, 0] - LOGPS[:, 2]) - (LOGPS[:, 1] - LOGPS[:, 3])  # [1.5, -1.5]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


# ---------------------------------------------------------------- the losses, by hand


def test_log_ratio_margin_by_hand():
    d = preference_log_ratio(*(jnp.asarray(LOGPS[:, k], jnp.float32) for k in range(4)))
    np.testing.assert_allclose(np.asarray(d), [1.5, -1.5], rtol=F32_RTOL, atol=F32_ATOL)
    assert d.dtype == jnp.float32


def test_soft_dpo_loss_and_stats_by_hand():
    loss, stats = soft_dpo_loss(jnp.asarray(_d(), jnp.float32), jnp.asarray(P, jnp.float32), BETA)
    # row 0: z = 0.75, p = 0.9; row 1: z = -0.75, p = 0.25.
    want = [
        -(0.9 * _log_sigmoid(0.75) + 0.1 * _log_sigmoid(-0.75)),
        -(0.25 * _log_sigmoid(-0.75) + 0.75 * _log_sigmoid(0.75)),
    ]
    np.testing.assert_allclose(np.asarray(loss), want, rtol=F32_RTOL, atol=F32_ATOL)
    np.testing.assert_allclose(np.asarray(stats["margin"]), [0.75, -0.75], rtol=F32_RTOL)
    np.testing.assert_array_equal(np.asarray(stats["accuracy"]), [1.0, 1.0])  # d > 0 with p > 1/2; d < 0 with p < 1/2
    _, wrong = soft_dpo_loss(jnp.asarray([1.0, -1.0, 0.0]), jnp.asarray([0.2, 0.5, 0.9]), BETA)
    np.testing.assert_array_equal(np.asarray(wrong["accuracy"]), [0.0, 0.5, 0.5])  # disagree; tie p; tie d


def test_hard_label_is_standard_dpo():
    d = np.array([[1.5, -1.5, 0.0], [4.0, -0.2, 30.0]])  # a [2, 3] batch
    loss, _ = soft_dpo_loss(jnp.asarray(d, jnp.float32), jnp.ones((2, 3)), BETA)
    want = [[-_log_sigmoid(BETA * x) for x in row] for row in d]
    np.testing.assert_allclose(np.asarray(loss), want, rtol=F32_RTOL, atol=F32_ATOL)
    big, _ = soft_dpo_loss(jnp.asarray([-400.0, 400.0]), jnp.asarray([1.0, 1.0]), BETA)
    np.testing.assert_allclose(np.asarray(big), [200.0, 0.0], rtol=F32_RTOL, atol=F32_ATOL)  # stable log_sigmoid


def test_ipo_loss_by_hand():
    loss, stats = ipo_loss(jnp.asarray(_d(), jnp.float32), jnp.asarray(P, jnp.float32), BETA)
    want = [(1.5 - 0.4 / BETA) ** 2, (-1.5 + 0.25 / BETA) ** 2]
    np.testing.assert_allclose(np.asarray(loss), want, rtol=F32_RTOL, atol=F32_ATOL)
    np.testing.assert_allclose(np.asarray(stats["margin"]), [0.75, -0.75], rtol=F32_RTOL)
    hard, _ = ipo_loss(jnp.asarray([0.0, 1.0]), jnp.asarray([1.0, 1.0]), BETA)
    np.testing.assert_allclose(np.asarray(hard), [(1 / (2 * BETA)) ** 2, (1 - 1 / (2 * BETA)) ** 2], rtol=F32_RTOL)


def test_soft_labels_are_the_expected_hard_label_losses():
    """Linear in p for DPO; IPO up to the constant 4 p (1 - p) c^2, c = 1 / (2 beta) (see ipo_loss)."""
    d = jnp.asarray([[1.5, -1.5, 0.3], [-4.0, 0.0, 2.0]], jnp.float32)
    p = jnp.asarray([[0.9, 0.25, 0.5], [0.0, 0.7, 1.0]], jnp.float32)
    ones = jnp.ones_like(p)
    dpo, _ = soft_dpo_loss(d, p, BETA)
    mix = p * soft_dpo_loss(d, ones, BETA)[0] + (1 - p) * soft_dpo_loss(-d, ones, BETA)[0]
    np.testing.assert_allclose(np.asarray(dpo), np.asarray(mix), rtol=F32_RTOL, atol=F32_ATOL)
    ipo, _ = ipo_loss(d, p, BETA)
    mix = p * ipo_loss(d, ones, BETA)[0] + (1 - p) * ipo_loss(-d, ones, BETA)[0]
    c = 1 / (2 * BETA)
    np.testing.assert_allclose(np.asarray(ipo), np.asarray(mix - 4 * p * (1 - p) * c**2), rtol=F32_RTOL, atol=1e-5)


def test_swapping_the_sides_gives_the_same_loss():
    d, p = jnp.asarray([[1.5, -1.5, 0.3], [-4.0, 0.0, 2.0]]), jnp.asarray([[0.9, 0.25, 0.5], [0.0, 0.7, 1.0]])
    swapped = preference_log_ratio(*(jnp.asarray(LOGPS[:, k]) for k in (1, 0, 3, 2)))
    np.testing.assert_allclose(np.asarray(swapped), -_d(), rtol=F32_RTOL)  # a <-> b negates d
    for fn in (soft_dpo_loss, ipo_loss):
        np.testing.assert_allclose(np.asarray(fn(d, p, BETA)[0]), np.asarray(fn(-d, 1 - p, BETA)[0]), rtol=F32_RTOL)


def _grad(fn, d, p):
    """d loss_i / d d_i, one row at a time (the losses are per example)."""
    return np.asarray(jax.vmap(jax.grad(lambda x, q: fn(x, q, BETA)[0]))(jnp.asarray(d), jnp.asarray(p)))


def test_gradients_match_the_closed_forms_and_vanish_at_the_optimum():
    d = np.array([1.5, -1.5, 0.3, -4.0, 0.0, 2.0], np.float32)
    p = np.array([0.9, 0.25, 0.5, 0.1, 0.7, 1.0], np.float32)
    want = [BETA * (_sigmoid(BETA * x) - q) for x, q in zip(d.tolist(), p.tolist())]
    np.testing.assert_allclose(_grad(soft_dpo_loss, d, p), want, rtol=F32_RTOL, atol=F32_ATOL)
    want = [2 * (x - (q - 0.5) / BETA) for x, q in zip(d.tolist(), p.tolist())]
    np.testing.assert_allclose(_grad(ipo_loss, d, p), want, rtol=F32_RTOL, atol=F32_ATOL)

    soft = np.array([0.9, 0.25, 0.5, 0.1, 0.7], np.float32)
    at_dpo = np.array([_logit(q) / BETA for q in soft.tolist()], np.float32)  # sigmoid(beta d) = p
    np.testing.assert_allclose(_grad(soft_dpo_loss, at_dpo, soft), 0.0, atol=F32_ATOL)
    at_ipo = (soft - 0.5) / BETA
    np.testing.assert_allclose(_grad(ipo_loss, at_ipo, soft), 0.0, atol=F32_ATOL)
    assert np.all(np.abs(_grad(soft_dpo_loss, at_dpo + 0.5, soft)) > 1e-3)  # and only there


def test_an_even_label_is_minimised_at_zero_margin():
    grid = jnp.linspace(-6.0, 6.0, 1201)
    loss, _ = soft_dpo_loss(grid, jnp.full_like(grid, 0.5), BETA)
    assert float(grid[int(jnp.argmin(loss))]) == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(float(loss.min()), math.log(2.0), rtol=F32_RTOL)
    assert float(_grad(soft_dpo_loss, np.zeros(1, np.float32), np.full(1, 0.5, np.float32))[0]) == 0.0


# ---------------------------------------------------------------- the trainer, on a tiny random model

SEQ_LEN, BATCH = 64, 4
TINY_CHAT = ROOT / "tests" / "testdata" / "tiny-chat"
TIMINGS = ("time/", "tokens_per_s", "mfu")


@functools.cache
def _tokenizer():
    from cai_jax.models import load_tokenizer

    return load_tokenizer(str(TINY_CHAT))


@functools.cache
def _cfg():
    from cai_jax.models import ModelConfig

    return ModelConfig.from_hf_file(TINY_CHAT / "config.json")


def _lm(seed: int = 0):
    from cai_jax.models import Transformer
    from tests.conftest import _random_params

    return types.SimpleNamespace(
        model=Transformer(_cfg()), params=_random_params(_cfg(), seed), tokenizer=_tokenizer(), config=_cfg()
    )


def _pm(seed: int = 2):
    """A PM on the policy's own random backbone (its params are already made) with a random head."""
    from cai_jax.models import ScalarModel
    from tests.conftest import _random_params

    head = {"kernel": 0.1 * jax.random.normal(jax.random.key(seed), (_cfg().hidden_size, 1)), "bias": jnp.zeros((1,))}
    return types.SimpleNamespace(
        model=ScalarModel(_cfg()), params={"backbone": _random_params(_cfg(), 0), "head": head},
        tokenizer=_tokenizer(), config=_cfg(), reward_mean=0.1, reward_std=0.5, rendering="chat", seq_len=SEQ_LEN,
    )  # fmt: skip


def _comparisons(n: int, p_a: float = 1.0, seed: int = 0) -> list[dict]:
    """Response A always carries the marker "!", B never does; otherwise random lowercase words."""
    rng = np.random.default_rng(seed)
    word = lambda: "".join(rng.choice(list("abcdefgh"), int(rng.integers(2, 5))))  # noqa: E731
    return [
        {"prompt": f"q{i} {word()}?", "response_a": f"{word()}!", "response_b": word(), "p_a": p_a} for i in range(n)
    ]


def _train(workdir, num_steps, comparisons, *, loss="dpo", beta=0.5, lr=1e-3, save_every=None, **kw):
    from cai_jax.checkpoints.train_state import CheckpointConfig
    from cai_jax.train.dpo import DPOConfig, train_dpo
    from tests.defaults import optim_config

    policy = _lm()
    ckpt = CheckpointConfig(
        directory=str(workdir / "ckpt"), save_every_steps=save_every or num_steps, keep_last=None, async_save=False
    )
    return train_dpo(
        policy, policy, comparisons, dpo_cfg=DPOConfig(loss=loss, beta=beta),
        optim_cfg=optim_config(lr=lr, schedule="constant", updates=num_steps), ckpt_cfg=ckpt, mesh_cfg=None,
        num_steps=num_steps, batch_size=BATCH, seq_len=SEQ_LEN, seed=0, workdir=workdir, rendering="chat", **kw,
    )  # fmt: skip


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _untimed(path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMINGS)} for r in _rows(path)]


def test_config_is_strict_and_has_no_defaults():
    from cai_jax.train.dpo import DPOConfig

    assert DPOConfig.from_config({"loss": "ipo", "beta": 0.1}) == DPOConfig("ipo", 0.1)
    with pytest.raises(ValueError, match=r"unknown field\(s\) 'lr'.*missing field\(s\) 'beta'"):
        DPOConfig.from_config({"loss": "dpo", "lr": 1.0})
    with pytest.raises(ValueError, match="loss='kto'"):
        DPOConfig("kto", 0.1)
    with pytest.raises(ValueError, match="beta=0"):
        DPOConfig("dpo", 0.0)
    for f in dataclasses.fields(DPOConfig):
        assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, f.name


def test_pairs_are_encoded_as_sft_examples_and_cut_like_pm_pairs():
    from cai_jax.cai.sft_data import tokenize_pair
    from cai_jax.train.dpo import tokenize_dpo_pair
    from cai_jax.train.pm_data import tokenize_comparison

    tok, row = _tokenizer(), _comparisons(1)[0]
    pair, cut = tokenize_dpo_pair(tok, row, seq_len=SEQ_LEN, rendering="chat")
    assert cut == 0 and pair["p_a"] == 1.0
    pm_pair, _ = tokenize_comparison(tok, row, seq_len=SEQ_LEN, rendering="chat")
    for side in ("a", "b"):
        ids, mask = tokenize_pair(tok, row["prompt"], row[f"response_{side}"], "chat")
        assert (pair[f"input_ids_{side}"], pair[f"loss_mask_{side}"]) == (ids, mask)
        assert pair[f"input_ids_{side}"] == pm_pair[f"input_ids_{side}"]
    short, cut = tokenize_dpo_pair(tok, row, seq_len=12, rendering="chat")  # the prompt loses its start
    ids, mask = tokenize_pair(tok, row["prompt"], row["response_a"], "chat")
    assert cut == 1 and short["input_ids_a"] == ids[-12:] and short["loss_mask_a"] == mask[-12:]


def test_sequence_logprobs_sum_the_response_tokens_and_start_at_log_two():
    from cai_jax.scoring import sequence_token_logprobs
    from cai_jax.text import pad_id
    from cai_jax.train.dpo import DPOBatcher, DPOConfig, dpo_loss_fn, sequence_logprobs, tokenize_dpo_pair

    lm = _lm()
    pairs = [tokenize_dpo_pair(lm.tokenizer, r, seq_len=SEQ_LEN, rendering="chat")[0] for r in _comparisons(3)]
    batch, _ = DPOBatcher(pairs, batch_size=3, seq_len=SEQ_LEN, seed=0, pad_id=pad_id(lm.tokenizer)).next()
    got = sequence_logprobs(lm.params, batch["tokens_a"], batch["mask_a"], batch["loss_mask_a"], model=lm.model)
    per_token = sequence_token_logprobs(lm.params, batch["tokens_a"], batch["mask_a"].astype(bool), cfg=lm.config)
    want = np.sum(np.asarray(per_token) * batch["loss_mask_a"][:, 1:], axis=1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=F32_RTOL, atol=1e-4)

    # The policy is its own reference at the start: d = 0, so soft DPO's loss is log 2 whatever p.
    b = batch["tokens_b"]
    ref_b = sequence_logprobs(lm.params, b, batch["mask_b"], batch["loss_mask_b"], model=lm.model)
    full = {**batch, "p": np.array([1.0, 0.9, 0.3], np.float32), "ref_logp_a": got, "ref_logp_b": ref_b}
    loss, metrics = dpo_loss_fn(lm.params, full, model=lm.model, cfg=DPOConfig("dpo", 0.5))
    assert float(loss) == pytest.approx(math.log(2.0), rel=F32_RTOL)
    assert float(metrics["log_ratio"]) == pytest.approx(0.0, abs=1e-5)
    assert float(metrics["accuracy"]) == 0.5 and float(metrics["margin"]) == pytest.approx(0.0, abs=1e-5)


# (loss, p_a, beta, lr): where the margin d should settle is logit(p) / beta (DPO) or (p - 1/2) / beta
# (IPO); a hard label has no finite optimum. IPO's squared loss takes a smaller step to stay stable.
LEARNING = [("dpo", 1.0, 0.5, 3e-3), ("dpo", 0.9, 0.5, 3e-3), ("ipo", 0.9, 0.1, 3e-4)]


@pytest.mark.parametrize("loss, p_a, beta, lr", LEARNING)
def test_the_policy_learns_to_prefer_the_marked_response(tmp_path, loss, p_a, beta, lr):
    """A few dozen steps raise log pi(a) - log pi(b) against the reference and lower the loss."""
    steps = 24
    _train(tmp_path, steps, _comparisons(16, p_a=p_a), loss=loss, beta=beta, lr=lr)
    rows = _rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    # The policy starts as its own reference: d = 0.
    assert rows[0]["log_ratio"] == pytest.approx(0.0, abs=1e-4)
    start = math.log(2.0) if loss == "dpo" else ((p_a - 0.5) / beta) ** 2
    assert rows[0]["loss"] == pytest.approx(start, rel=1e-4)
    last = rows[-8:]
    mean = lambda k: sum(r[k] for r in last) / len(last)  # noqa: E731
    trace = [(round(r["loss"], 3), round(r["log_ratio"], 2)) for r in rows]
    assert mean("log_ratio") > 2.0 and mean("loss") < 0.6 * start, trace
    if p_a < 1:  # a soft label is met, not overshot
        optimum = math.log(p_a / (1 - p_a)) / beta if loss == "dpo" else (p_a - 0.5) / beta
        assert abs(mean("log_ratio") - optimum) < 1.5, (optimum, trace)
    assert mean("accuracy") >= 0.75 and mean("margin") > 0.5 * beta
    assert mean("rewards/chosen") > mean("rewards/rejected")
    assert all(r["grad_norm"] > 0 and r["lr"] == pytest.approx(lr) and r["tokens_in_batch"] > 0 for r in rows)


def _eval_kw(workdir, every=2):
    from tests.defaults import ppo_config

    rollout = ppo_config(max_new_tokens=8, micro_batch_size=4, generation_batch_size=0, num_samples_logged=2)
    snapshots = {k: str(workdir / "snapshots" / f"step_{k}") for k in (2, 4)}
    prompts = [f"question {i}?" for i in range(6)]
    return dict(eval_prompts=prompts, pm=_pm(), rollout_cfg=rollout, eval_every=every, export_at=snapshots)


def test_resume_is_exact_with_evaluation_and_snapshots(tmp_path):
    """Stopped at step 2 and rerun to 4: the files equal an uninterrupted run's, snapshots included."""
    from cai_jax.checkpoints.hf import is_complete_export

    a, b = tmp_path / "a", tmp_path / "b"
    rows = _comparisons(8)
    _train(a, 4, rows, save_every=2, **_eval_kw(a))
    _train(b, 2, rows, save_every=2, **{**_eval_kw(b), "export_at": {2: str(b / "snapshots" / "step_2")}})
    assert [r["step"] for r in _rows(b / "metrics.jsonl")] == [1, 2]
    _train(b, 4, rows, save_every=2, **_eval_kw(b))

    got, want = _untimed(b / "metrics.jsonl"), _untimed(a / "metrics.jsonl")
    assert got == want and [r["step"] for r in want] == [1, 2, 3, 4]
    assert [r["batch_id"] for r in want] == ["epoch 0 index 0", "epoch 0 index 4", "epoch 1 index 0", "epoch 1 index 4"]
    # PPO's names on rows 1 and 3 (eval_every = 2): the policy before steps 1 and 3.
    for r in want:
        assert all((k in r) == (r["step"] in (1, 3)) for k in EVAL_KEYS), r
    assert want[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # the untrained policy is the reference
    assert 0 < want[0]["response/length_mean"] <= 8 and 0 <= want[0]["response/no_eos_frac"] <= 1
    assert _rows(b / "samples.jsonl") == _rows(a / "samples.jsonl")
    assert [s["step"] for s in _rows(a / "samples.jsonl")] == [1, 1, 3, 3]
    final = json.loads((a / "eval.json").read_text())
    assert final["step"] == 4 and set(EVAL_KEYS) <= set(final) and final == json.loads((b / "eval.json").read_text())
    for k in (2, 4):
        assert is_complete_export(a / "snapshots" / f"step_{k}") and is_complete_export(b / "snapshots" / f"step_{k}")
        for name in ("config.json", "model.safetensors"):
            assert (a / "snapshots" / f"step_{k}" / name).read_bytes() == (
                b / "snapshots" / f"step_{k}" / name
            ).read_bytes()


EVAL_KEYS = ("objective/scores", "objective/kl", "objective/entropy", "response/length_mean", "response/no_eos_frac")


def test_evaluation_needs_all_its_inputs(tmp_path):
    with pytest.raises(ValueError, match="eval_prompts, pm, rollout_cfg and eval_every"):
        _train(tmp_path, 2, _comparisons(8), pm=_pm())
