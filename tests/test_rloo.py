"""RLOO (cai_jax.train.rloo) on tiny random models: the leave-one-out maths, resume, learning."""

from __future__ import annotations

import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.checkpoints.hf import EXPORT_MARKER
from cai_jax.checkpoints.train_state import CheckpointConfig
from cai_jax.models import ScalarModel, Transformer, init_params, tiny_config
from cai_jax.rl_losses import rloo_advantages
from cai_jax.train import logs
from cai_jax.train.rloo import METRIC_NAMES, RLOOConfig, rloo_rewards, train_rloo
from tests.conftest import _random_params
from tests.defaults import optim_config, ppo_config

# One quantity computed two ways in fp32.
SAME_MATH_ATOL = 1e-6
TIMINGS = ("time/", "tokens_per_s", "mfu")


def rloo_config(**overrides) -> RLOOConfig:
    """An `RLOOConfig` sharing configs/base.py's `ppo` values (configs/base.py has no `rloo` section
    yet), with RLOO's own fields (k, epochs) and `overrides`."""
    base = dataclasses.asdict(ppo_config())
    shared = {f.name: base[f.name] for f in dataclasses.fields(RLOOConfig) if f.name in base}
    return RLOOConfig(**{**shared, "k": 4, "epochs": 1, **overrides})


def _rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _untimed(path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [json.dumps({k: v for k, v in r.items() if not k.startswith(TIMINGS)}) for r in rows]


def _prompts(n, seed=0, lo=3, hi=10):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def cfg():
    return tiny_config("llama")


# ---------------------------------------------------------------- maths


def test_rloo_advantages_match_hand_computation():
    rewards = np.array([[1.0, 2.0, 6.0], [0.5, -0.5, 0.0]], np.float32)
    adv = np.asarray(rloo_advantages(rewards))
    # Row 0: 1 - (2 + 6) / 2 = -3, 2 - (1 + 6) / 2 = -1.5, 6 - (1 + 2) / 2 = 4.5; row 1 likewise.
    np.testing.assert_allclose(adv, [[-3.0, -1.5, 4.5], [0.75, -0.75, 0.0]], atol=SAME_MATH_ATOL)
    np.testing.assert_allclose(adv.sum(axis=1), 0.0, atol=SAME_MATH_ATOL)
    np.testing.assert_allclose(adv, 3 / 2 * (rewards - rewards.mean(1, keepdims=True)), atol=SAME_MATH_ATOL)
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(np.ones((2, 1)))
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(np.ones(6))


def test_sequence_rewards_are_ppos_summed_then_left_one_out():
    """R = (score - mean) / std - missing-EOS penalty - beta sum KL (k1), then A per group of k = 2."""
    cfg = rloo_config(k=2, rollout_batch_size=1, minibatch_size=2, micro_batch_size=2, kl_estimator="k1",
                      missing_eos_penalty=1.0)  # fmt: skip
    logp = np.array([[-1.0, -2.0, -0.5], [-1.5, -1.0, -3.0]], np.float32)
    ref = np.array([[-1.2, -1.5, -0.5], [-1.0, -1.0, -2.0]], np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 0]], bool)
    out = jax.device_get(
        rloo_rewards(np.array([1.0, -0.5]), logp, ref, mask, np.array([True, False]), 0.1, 0.5, 2.0, cfg=cfg)
    )
    # KL sums: 0.2 - 0.5 + 0 = -0.3 and -0.5 + 0 = -0.5 (the masked third token does not count).
    np.testing.assert_allclose(out["kl_sum"], [-0.3, -0.5], atol=SAME_MATH_ATOL)
    reward = [0.25 + 0.03, -1.5 + 0.05]  # (1 - 0.5) / 2 and (-0.5 - 0.5) / 2 - 1 (no EOS), minus 0.1 KL
    np.testing.assert_allclose(out["reward"], reward, atol=SAME_MATH_ATOL)
    np.testing.assert_allclose(out["advantages"], [reward[0] - reward[1], reward[1] - reward[0]], atol=SAME_MATH_ATOL)


def test_config_is_strict_and_checked():
    base = rloo_config()
    d = dataclasses.asdict(base)
    assert RLOOConfig.from_config(d) == base
    assert base.rows == base.rollout_batch_size * base.k
    assert base.updates_per_iteration == base.epochs * base.rows // base.minibatch_size
    with pytest.raises(ValueError, match="unknown field.*'gamma'.*missing field.*'k'"):
        RLOOConfig.from_config({**{n: v for n, v in d.items() if n != "k"}, "gamma": 1.0})
    with pytest.raises(TypeError, match="missing"):
        RLOOConfig(k=4)  # no defaults of its own
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(RLOOConfig))
    with pytest.raises(ValueError, match="k=1 must be >= 2"):
        rloo_config(k=1)
    with pytest.raises(ValueError, match="must divide rollout_batch_size \\* k"):
        rloo_config(rollout_batch_size=3, k=3, minibatch_size=4, micro_batch_size=4)
    with pytest.raises(ValueError, match="multiple of k=4"):
        rloo_config(generation_batch_size=6)


# ---------------------------------------------------------------- with a PM


def test_pm_rewards_every_sample_and_logs_ppos_metric_names(cfg, tmp_path):
    """A tiny PM scores each of the k samples of a prompt; the rows carry every name of METRIC_NAMES."""
    head = {"kernel": 0.1 * jax.random.normal(jax.random.key(2), (cfg.hidden_size, 1)), "bias": jnp.zeros((1,))}
    pm = types.SimpleNamespace(
        model=ScalarModel(cfg), params={"backbone": _random_params(cfg, 2), "head": head}, tokenizer=None,
        config=cfg, reward_mean=0.1, reward_std=0.5,
    )  # fmt: skip
    lm = types.SimpleNamespace(model=Transformer(cfg), params=_random_params(cfg, 0), tokenizer=None, config=cfg)
    rloo = rloo_config(rollout_batch_size=2, k=3, minibatch_size=6, micro_batch_size=3, max_new_tokens=6,
                       sample_every=1, num_samples_logged=6)  # fmt: skip
    train_rloo(
        lm, lm, pm, _prompts(4), rloo_cfg=rloo, optim_cfg=optim_config(lr=1e-3, schedule="constant", updates=1),
        num_iterations=2, seed=0, workdir=tmp_path, export_dir=tmp_path / "final",
    )  # fmt: skip
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and all(set(METRIC_NAMES) <= set(r) for r in rows)
    samples = [json.loads(s) for s in (tmp_path / "samples.jsonl").read_text().splitlines()]
    first = samples[:6]
    assert [s["prompt"] for s in first[:3]] == [first[0]["prompt"]] * 3 and first[3]["prompt"] != first[0]["prompt"]
    assert len({s["score"] for s in first}) == 6  # each sample scored on its own response
    np.testing.assert_allclose(rows[0]["objective/scores"], np.mean([s["score"] for s in first]), rtol=1e-6)
    assert (tmp_path / "final" / EXPORT_MARKER).is_file()


# ---------------------------------------------------------------- resume


class Killed(BaseException):
    """Stands in for kill -9 (nothing catches it; only `finally` blocks run): raised by a metrics sink."""


RESUME = dict(rollout_batch_size=4, k=2, minibatch_size=4, micro_batch_size=2, epochs=2, max_new_tokens=6,
              kl_coef=0.1, kl_estimator="k3", sample_every=1, num_samples_logged=2)  # fmt: skip


def _reward_first(prompts, responses, lengths):
    return (np.asarray(responses)[:, 0] % 7).astype(np.float32) / 7.0


def _resume_run(cfg, workdir, n, every=3):
    lm = types.SimpleNamespace(model=Transformer(cfg), params=_random_params(cfg, 0), tokenizer=None, config=cfg)
    return train_rloo(
        lm, lm, None, _prompts(6, seed=1), rloo_cfg=rloo_config(**RESUME),
        optim_cfg=optim_config(lr=1e-3, schedule="constant", updates=1),
        ckpt_cfg=CheckpointConfig(directory=str(workdir / "ckpt"), save_every_steps=every, keep_last=None, async_save=False),
        num_iterations=n, seed=0, workdir=workdir, reward_fn=_reward_first, export_at={2: workdir / "iter_2"},
    )  # fmt: skip


def test_killed_run_resumes_to_the_uninterrupted_run(cfg, tmp_path, monkeypatch):
    """Killed after iteration 5's row (checkpoint 3): metrics, samples, snapshot and state equal an uninterrupted run's."""
    a, b = tmp_path / "a", tmp_path / "b"
    state_a = _resume_run(cfg, a, 5)

    def kill_at_5(path, row):
        if row["step"] == 5:
            raise Killed

    monkeypatch.setattr(logs, "METRICS_SINKS", [kill_at_5])
    with pytest.raises(Killed):
        _resume_run(cfg, b, 5)
    monkeypatch.setattr(logs, "METRICS_SINKS", [])
    state_b = _resume_run(cfg, b, 5)

    rows = _rows(a)
    assert [r["step"] for r in rows] == [r["step"] for r in _rows(b)] == [1, 2, 3, 4, 5]
    assert rows[1]["batch_id"] == "epoch 1 index 0"  # 6 prompts / 4 per batch: the stream position matters
    assert _untimed(b / "metrics.jsonl") == _untimed(a / "metrics.jsonl")
    assert (b / "samples.jsonl").read_bytes() == (a / "samples.jsonl").read_bytes()
    samples = [json.loads(s) for s in (a / "samples.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in samples] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert samples[0]["prompt"] == samples[1]["prompt"]  # the first rows are one prompt's k samples
    for name in ("model.safetensors", EXPORT_MARKER):
        assert (a / "iter_2" / name).read_bytes() == (b / "iter_2" / name).read_bytes()
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert rows[0]["objective/kl"] == 0.0 and rows[1]["objective/kl"] > 0  # policy == reference at first
    assert all(r["rollout/logprob_diff"] < 1e-4 for r in rows)  # sampler vs teacher-forced, fp32
    assert rows[0]["policy/approxkl"] > 0  # epochs=2: the second pass is off the rollout policy


# ---------------------------------------------------------------- learning


def test_rloo_raises_a_known_reward_with_bounded_kl(cfg, tmp_path):
    """Reward = fraction of response tokens in a quarter of the vocabulary; starts near 0.25."""
    good = np.arange(3, 67)

    def reward_fn(prompts, responses, lengths):
        live = np.arange(responses.shape[1])[None] < lengths[:, None]
        return (np.isin(responses, good) & live).sum(1) / lengths

    lm = types.SimpleNamespace(model=Transformer(cfg), params=_init(cfg), tokenizer=None, config=cfg)
    rloo = rloo_config(rollout_batch_size=8, k=4, minibatch_size=32, micro_batch_size=16, epochs=1,
                       max_new_tokens=8, kl_coef=0.05, missing_eos_penalty=0.0, sample_every=0)  # fmt: skip
    train_rloo(
        lm, lm, None, _prompts(64), rloo_cfg=rloo, optim_cfg=optim_config(lr=3e-3, schedule="constant", updates=1),
        num_iterations=60, seed=0, workdir=tmp_path, reward_fn=reward_fn,
    )  # fmt: skip
    rows = _rows(tmp_path)
    scores = np.array([r["objective/scores"] for r in rows])
    kl = np.array([r["objective/kl"] for r in rows])
    start, end = scores[:5].mean(), scores[-10:].mean()
    # The optimum of reward - 0.05 KL tilts each token by exp((1/8) / 0.05): a good token's probability
    # 0.25 -> 0.80, so reward 0.80 at a KL of 8 x 0.67 = 5.3 nats. Measured (fp32 CPU): start 0.25,
    # end 0.79, KL of the last 10 iterations 5.4 nats. The margins allow for another XLA's summation order.
    assert start < 0.35 and end > 0.6 and end > start + 0.3, scores.round(2)
    # 2 nats/token (16 nats) would be a blow-up past the optimum.
    assert kl.max() < 16 and kl[-10:].mean() < 10, kl.round(2)


def _init(cfg):
    return jax.device_get(init_params(cfg, jax.random.key(0)))
