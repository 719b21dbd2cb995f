"""RL-CAI PPO (cai_jax.train.ppo) on tiny random models: maths, frozen metrics, learning, resume, guards.

The frozen metrics in tests/testdata/ppo_step_golden.json were written from a first run of
`golden_run` (`python -m tests.test_ppo` rewrites them after an intended change) and then frozen;
the hand-computed tests below pin the same maths independently, so the golden is not the only
thing holding them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.checkpoints.train_state import CheckpointConfig, Checkpointer
from cai_jax.models import ScalarModel, Transformer, tiny_config
from cai_jax.sampling import generate
from cai_jax.scoring import sequence_token_logprobs
from cai_jax.train import logs
from cai_jax.train.ppo import train_ppo
from cai_jax.train.ppo_rollout import layout
from cai_jax.train.ppo_steps import compute_advantages, ppo_update, rollout_forward
from cai_jax.train.state import TrainState, make_optimizer
from tests.conftest import TESTDATA, _random_params
from tests.defaults import optim_config, ppo_config

GOLDEN = TESTDATA / "ppo_step_golden.json"
# Set once. Same fp32 program on CPU as the run that wrote the golden; room only for summation
# order changes across XLA versions / instruction sets.
GOLDEN_RTOL, GOLDEN_ATOL = 1e-5, 1e-7
# One quantity computed two ways in fp32 (different reduction orders).
SAME_MATH_RTOL, SAME_MATH_ATOL = 1e-5, 1e-6
# Sampler (KV-cache decode) vs teacher-forced full forward in fp32: observed ~1e-6.
LOGPROB_ATOL = 1e-4
GOLDEN_KEYS = (
    "objective/scores",
    "objective/kl",
    "objective/entropy",
    "objective/rlhf_reward",
    "policy/approxkl",
    "policy/clipfrac",
    "loss/policy",
    "loss/value",
    "val/clipfrac",
    "grad_norm",
    "response/length_mean",
    "response/no_eos_frac",
)


def _lm(cfg, seed=0, tokenizer=None):
    return types.SimpleNamespace(
        model=Transformer(cfg), params=_random_params(cfg, seed), tokenizer=tokenizer, config=cfg
    )


def _pm(cfg, seed=2, tokenizer=None, mean=0.1, std=0.5):
    head = {"kernel": 0.1 * jax.random.normal(jax.random.key(seed), (cfg.hidden_size, 1)), "bias": jnp.zeros((1,))}
    return types.SimpleNamespace(
        model=ScalarModel(cfg),
        params={"backbone": _random_params(cfg, seed), "head": head},
        tokenizer=tokenizer,
        config=cfg,
        reward_mean=mean,
        reward_std=std,
    )


def _prompts(n, seed=0, lo=3, hi=10):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def _rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _ckpt(workdir, every=1):
    return CheckpointConfig(directory=str(workdir / "ckpt"), save_every_steps=every, keep_last=None, async_save=False)


def _constant_lr(lr):
    """The base optimizer at a constant `lr` (the goldens' schedule; a constant one reads no length)."""
    return optim_config(lr=lr, schedule="constant", updates=1)


# ---------------------------------------------------------------- config


def test_config_from_dict_and_validation():
    base = ppo_config()
    d = dataclasses.asdict(base)
    from cai_jax.train.ppo_steps import PPOConfig

    assert PPOConfig.from_config(d) == base
    with pytest.raises(ValueError, match="unknown field.*'lr'.*missing field.*'gamma'"):
        PPOConfig.from_config({**{k: v for k, v in d.items() if k != "gamma"}, "lr": 1.0})
    with pytest.raises(ValueError, match="value_init='policy'"):
        ppo_config(shared_backbone=True, value_init="pm")
    with pytest.raises(ValueError, match="must divide rollout_batch_size"):
        ppo_config(rollout_batch_size=10, minibatch_size=4)
    with pytest.raises(ValueError, match="kl_estimator"):
        ppo_config(kl_estimator="k4")
    with pytest.raises(TypeError, match="missing"):
        PPOConfig(rollout_batch_size=8)  # no defaults of its own: configs/base.py holds them
    assert base.updates_per_iteration == base.ppo_epochs * base.rollout_batch_size // base.minibatch_size


# ---------------------------------------------------------------- hand-computed maths


def test_advantages_match_hand_computation():
    cfg = ppo_config(gamma=0.9, lam=0.8, kl_estimator="k1", missing_eos_penalty=1.0, whiten_advantages=False)
    logp = np.array([[-1.0, -2.0, -0.5], [-1.5, -1.0, -3.0]], np.float32)
    ref = np.array([[-1.2, -1.5, -0.5], [-1.0, -1.0, -2.0]], np.float32)
    values = np.array([[0.1, 0.2, 0.3], [0.5, -0.5, 9.0]], np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 0]], bool)
    out = jax.device_get(
        compute_advantages(
            np.array([1.0, -0.5]), logp, ref, values, mask, np.array([True, False]), 0.1, 0.5, 2.0, cfg=cfg
        )
    )
    # kl = logp - ref; normalised scores (1 - 0.5) / 2 = 0.25 and (-0.5 - 0.5) / 2 - 1 (no EOS) = -1.5.
    rewards = np.array([[-0.02, 0.05, 0.25], [0.05, -1.5, 0.0]])
    np.testing.assert_allclose(out["rewards"], rewards, atol=1e-6)
    np.testing.assert_allclose(out["kl_sum"], [-0.3, -0.5], atol=1e-6)
    adv = np.zeros((2, 3))
    for b, n in ((0, 3), (1, 2)):
        nxt_v, nxt_a = 0.0, 0.0
        for t in reversed(range(n)):
            delta = rewards[b, t] + 0.9 * nxt_v - values[b, t]
            adv[b, t] = nxt_a = delta + 0.9 * 0.8 * nxt_a
            nxt_v = values[b, t]
    np.testing.assert_allclose(out["advantages"], adv, atol=1e-6)
    np.testing.assert_allclose(out["returns"], (adv + values) * mask, atol=1e-6)
    whitened = jax.device_get(
        compute_advantages(np.array([1.0, -0.5]), logp, ref, values, mask, None, 0.1, 0.5, 2.0, cfg=ppo_config())
    )["advantages"]
    assert abs(whitened[mask].mean()) < 1e-6 and abs(whitened[mask].std() - 1) < 1e-3 and whitened[1, 2] == 0


@pytest.fixture(scope="module")
def cfg():
    return tiny_config("llama")


def _update_batch(cfg, ppo, seed=0):
    """A rollout-shaped batch whose old log-probs, values, advantages and returns are random."""
    rng = np.random.default_rng(seed)
    b, n, width = 4, ppo.max_new_tokens, 16
    prompts = _prompts(b, seed)
    responses = rng.integers(3, 256, (b, n)).astype(np.int32)
    lengths = np.array([6, 3, 1, 5])
    tokens, mask, resp_mask = layout(prompts, responses, lengths, width, 0)
    noise = lambda s: rng.normal(0, s, (b, n)).astype(np.float32) * resp_mask  # noqa: E731
    return tokens, mask, resp_mask, noise, width


def test_update_step_losses_match_hand_computation(cfg):
    """Clipped policy and value losses of the jitted update == numpy on independently computed logp / values."""
    ppo = ppo_config(max_new_tokens=6, minibatch_size=4, micro_batch_size=2, rollout_batch_size=4, value_init="policy")
    tokens, mask, resp_mask, noise, width = _update_batch(cfg, ppo)
    policy_params = _random_params(cfg, 0)
    value_params = _pm(cfg).params  # value model initialised from the PM
    # Independent paths: scoring's teacher-forced log-probs and the ScalarModel's per-token values.
    logp_full = np.asarray(sequence_token_logprobs(policy_params, tokens, mask, cfg=cfg))
    logp = logp_full[:, width - 1 : width - 1 + 6] * resp_mask
    values = np.asarray(ScalarModel(cfg).apply({"params": value_params}, tokens, mask, per_token=True))
    values = values[:, width - 1 : width - 1 + 6] * resp_mask
    batch = {
        "tokens": tokens,
        "mask": mask,
        "resp_mask": resp_mask,
        "old_logp": logp + noise(0.3),
        "old_values": values + noise(0.3),
        "advantages": noise(1.0),
        "returns": noise(1.0),
    }
    ratio = np.exp(logp - batch["old_logp"])
    a = batch["advantages"]
    pg = np.maximum(-a * ratio, -a * np.clip(ratio, 0.8, 1.2))
    v_clip = np.clip(values, batch["old_values"] - 0.2, batch["old_values"] + 0.2)
    vf = 0.5 * np.maximum((values - batch["returns"]) ** 2, (v_clip - batch["returns"]) ** 2)
    expect = {"loss/policy": pg[resp_mask].mean(), "loss/value": vf[resp_mask].mean()}
    expect["loss"] = expect["loss/policy"] + 0.1 * expect["loss/value"]
    expect["policy/clipfrac"] = (pg > -a * ratio)[resp_mask].mean()

    params = {"policy": policy_params, "value": value_params}
    optimizer = make_optimizer(_constant_lr(1e-3), params)
    got = {}
    for k in (1, 2):  # one pass of 4 rows, or 2 accumulated micro-batches of 2
        p = dataclasses.replace(ppo, micro_batch_size=4 // k)
        step = jax.jit(
            functools.partial(
                ppo_update, policy_model=Transformer(cfg), value_model=ScalarModel(cfg), optimizer=optimizer, cfg=p
            )
        )
        state = TrainState.create(jax.tree.map(jnp.array, params), optimizer, jax.random.key(0))
        mb = {name: v.reshape(k, 4 // k, *v.shape[1:]) for name, v in batch.items()}
        got[k] = jax.device_get(step(state, mb)[1])
    for name, value in expect.items():
        np.testing.assert_allclose(got[2][name], value, rtol=SAME_MATH_RTOL, atol=SAME_MATH_ATOL, err_msg=name)
    assert 0 < expect["policy/clipfrac"] < 1  # both branches of the clip are exercised
    for name in (*expect, "grad_norm", "val/clipfrac", "policy/approxkl"):
        np.testing.assert_allclose(got[1][name], got[2][name], rtol=SAME_MATH_RTOL, atol=SAME_MATH_ATOL, err_msg=name)


def test_sampler_logprobs_match_teacher_forced(cfg):
    ppo = ppo_config(max_new_tokens=8, temperature=0.7, value_init="policy")
    lm = _lm(cfg)
    prompts = _prompts(4, seed=5)
    out = generate(lm, prompts, rng=jax.random.key(3), max_new_tokens=8, temperature=0.7)
    tokens, mask, resp_mask = layout(prompts, np.asarray(out.tokens), np.asarray(out.lengths), 16, 0)
    params = {"policy": lm.params, "value": {"backbone": lm.params, "head": _pm(cfg).params["head"]}}
    fwd = jax.jit(
        functools.partial(
            rollout_forward, policy_model=lm.model, value_model=ScalarModel(cfg), ref_model=lm.model, cfg=ppo
        )
    )(params, lm.params, tokens, mask, resp_mask)
    diff = np.abs(np.asarray(fwd["logp"]) - np.asarray(out.logprobs)) * resp_mask
    assert diff.max() < LOGPROB_ATOL, diff.max()
    np.testing.assert_array_equal(np.asarray(fwd["ref_logp"]), np.asarray(fwd["logp"]))  # same params: KL 0


# ---------------------------------------------------------------- one iteration against frozen metrics


GOLDEN_PPO = ppo_config(
    rollout_batch_size=8,
    minibatch_size=4,
    micro_batch_size=2,
    ppo_epochs=2,
    max_new_tokens=8,
    kl_coef=0.1,
    kl_estimator="k3",
    missing_eos_penalty=0.5,
    value_init="pm",
    sample_every=1,
    num_samples_logged=2,
)


def golden_run(workdir) -> list[dict]:
    """Two PPO iterations with a tiny PM (value model from the PM), fp32 on CPU."""
    cfg = tiny_config("llama")
    lm = _lm(cfg)
    train_ppo(
        lm,
        lm,
        _pm(cfg),
        _prompts(16),
        ppo_cfg=GOLDEN_PPO,
        optim_cfg=_constant_lr(1e-3),
        num_iterations=2,
        seed=0,
        workdir=workdir,
    )
    return _rows(workdir)


def test_two_iterations_match_frozen_metrics(tmp_path):
    rows = golden_run(tmp_path)
    expected = json.loads(GOLDEN.read_text())["rows"]
    assert [r["step"] for r in rows] == [1, 2]
    for row, exp in zip(rows, expected, strict=True):
        for key in GOLDEN_KEYS:
            np.testing.assert_allclose(row[key], exp[key], rtol=GOLDEN_RTOL, atol=GOLDEN_ATOL, err_msg=key)
    assert rows[0]["objective/kl"] == 0.0 and rows[1]["objective/kl"] > 0  # policy == reference at first
    assert all(r["rollout/logprob_diff"] < LOGPROB_ATOL for r in rows)
    assert all(r[f"time/{p}"] > 0 for r in rows for p in ("rollout", "scoring", "train"))
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in samples] == [1, 1, 2, 2]
    assert set(samples[0]) == {"iteration", "prompt", "response", "score", "kl", "ended", "length"}


# ---------------------------------------------------------------- learning


def test_ppo_raises_a_known_reward_with_bounded_kl(cfg, tmp_path):
    """Reward = fraction of response tokens in a quarter of the vocabulary; starts near 0.25."""
    good = np.arange(3, 67)

    def reward_fn(prompts, responses, lengths):
        live = np.arange(responses.shape[1])[None] < lengths[:, None]
        return (np.isin(responses, good) & live).sum(1) / lengths

    lm = types.SimpleNamespace(model=Transformer(cfg), params=_init(cfg), tokenizer=None, config=cfg)
    ppo = ppo_config(
        rollout_batch_size=16,
        minibatch_size=8,
        micro_batch_size=4,
        ppo_epochs=4,
        max_new_tokens=8,
        kl_coef=0.05,
        missing_eos_penalty=0.0,
        value_init="policy",
        sample_every=0,
    )
    train_ppo(
        lm,
        lm,
        None,
        _prompts(64),
        ppo_cfg=ppo,
        optim_cfg=_constant_lr(3e-3),
        num_iterations=60,
        seed=0,
        workdir=tmp_path,
        reward_fn=reward_fn,
    )
    rows = _rows(tmp_path)
    scores = np.array([r["objective/scores"] for r in rows])
    kl = np.array([r["objective/kl"] for r in rows])
    start, end = scores[:5].mean(), scores[-10:].mean()
    assert start < 0.35 and end > 0.5 and end > start + 0.2, scores.round(2)
    # The optimum of reward - 0.05 KL keeps KL near 8 tokens x ~0.5 nats; 2 nats/token would be a blow-up.
    assert kl.max() < 16 and kl[-10:].mean() < 10, kl.round(2)


@functools.cache
def _init(cfg):
    from cai_jax.models import init_params

    return jax.device_get(init_params(cfg, jax.random.key(0)))


# ---------------------------------------------------------------- resume, NaN guard


def _reward_len(prompts, responses, lengths):
    return (np.asarray(responses)[:, 0] % 7).astype(np.float32) / 7.0


RESUME_PPO = ppo_config(
    rollout_batch_size=8,
    minibatch_size=4,
    micro_batch_size=4,
    ppo_epochs=2,
    max_new_tokens=6,
    adaptive_kl=True,
    kl_target=0.05,
    kl_horizon=16,
    value_init="policy",
    sample_every=2,
)


def _resume_run(cfg, workdir, n, reward_fn=_reward_len, ppo=RESUME_PPO, every=2, **kw):
    lm = _lm(cfg)
    return train_ppo(
        lm,
        lm,
        None,
        _prompts(12, seed=1),
        ppo_cfg=ppo,
        optim_cfg=_constant_lr(1e-3),
        ckpt_cfg=_ckpt(workdir, every=every),
        num_iterations=n,
        seed=0,
        workdir=workdir,
        reward_fn=reward_fn,
        **kw,
    )


class Killed(BaseException):
    """Stands in for kill -9 (nothing catches it; only `finally` blocks run): raised by a metrics sink."""


TIMINGS = ("time/", "tokens_per_s", "mfu")


def _untimed(path) -> list[str]:
    """The file's rows without timing fields, each re-serialised in its own key order."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [json.dumps({k: v for k, v in r.items() if not k.startswith(TIMINGS)}) for r in rows]


def test_killed_run_resumes_to_the_uninterrupted_files(cfg, tmp_path, monkeypatch):
    """Killed after iteration 5's row (checkpoint 3): the rerun's metrics and samples are an uninterrupted run's."""
    ppo = dataclasses.replace(RESUME_PPO, sample_every=1, num_samples_logged=2)
    a, b = tmp_path / "a", tmp_path / "b"
    _resume_run(cfg, a, 5, ppo=ppo, every=3)

    def kill_at_5(path, row):
        if row["step"] == 5:
            raise Killed

    monkeypatch.setattr(logs, "METRICS_SINKS", [kill_at_5])
    with pytest.raises(Killed):
        _resume_run(cfg, b, 5, ppo=ppo, every=3)
    monkeypatch.setattr(logs, "METRICS_SINKS", [])
    assert [r["step"] for r in _rows(b)] == [1, 2, 3, 4, 5]
    samples = (b / "samples.jsonl").read_text().splitlines()
    assert [json.loads(s)["iteration"] for s in samples] == [1, 1, 2, 2, 3, 3, 4, 4]  # 5's: not yet written
    _resume_run(cfg, b, 5, ppo=ppo, every=3)
    assert _untimed(b / "metrics.jsonl") == _untimed(a / "metrics.jsonl")
    assert [r["step"] for r in _rows(b)] == [1, 2, 3, 4, 5]
    assert (b / "samples.jsonl").read_bytes() == (a / "samples.jsonl").read_bytes()
    assert len((a / "samples.jsonl").read_text().splitlines()) == 10


def test_export_at_in_one_call_equals_the_per_snapshot_exports(cfg, tmp_path, caplog):
    """One call exporting at iterations 1 and 3 == the old way: a call per snapshot, each resuming the last."""
    a, b = tmp_path / "a", tmp_path / "b"
    with caplog.at_level(logging.INFO, logger="cai_jax.train.fit"):
        _resume_run(cfg, a, 3, export_at={1: a / "iter_1", 3: a / "iter_3"})
        assert "resumed" not in caplog.text
        for k in (1, 3):
            _resume_run(cfg, b, k, export_dir=b / f"iter_{k}")
        assert "PPO: resumed from iteration 1" in caplog.text
    for k in (1, 3):
        files = sorted(p.name for p in (a / f"iter_{k}").iterdir())
        assert "model.safetensors" in files and files == sorted(p.name for p in (b / f"iter_{k}").iterdir())
        for name in files:
            assert (a / f"iter_{k}" / name).read_bytes() == (b / f"iter_{k}" / name).read_bytes(), (k, name)
    assert (a / "iter_1" / "model.safetensors").read_bytes() != (a / "iter_3" / "model.safetensors").read_bytes()
    assert _untimed(a / "metrics.jsonl") == _untimed(b / "metrics.jsonl")
    with Checkpointer(_ckpt(a)) as ckpt:
        assert ckpt.all_steps() == [1, 2, 3]  # 1 forced by its export, 2 by the interval, 3 the last


def test_resume_matches_uninterrupted(cfg, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    state_a = _resume_run(cfg, a, 4)
    _resume_run(cfg, b, 2)  # a run killed after its iteration-2 checkpoint
    state_b = _resume_run(cfg, b, 4)
    rows_a, rows_b = _rows(a), _rows(b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2, 3, 4]
    # 12 prompts / batch 8: iteration 2 starts epoch 1, so the stream position matters.
    assert [r["batch_id"] for r in rows_a] == [r["batch_id"] for r in rows_b]
    assert rows_a[1]["batch_id"] == "epoch 1 index 0"
    kl_coefs = [r["objective/kl_coef"] for r in rows_a]
    assert len(set(kl_coefs)) > 1  # the adaptive controller moved beta, and its state was restored
    for ra, rb in zip(rows_a, rows_b):
        for key in ra:
            if not key.startswith("time/"):
                assert ra[key] == rb[key], key
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nan_reward_stops_and_keeps_last_good_checkpoint(cfg, tmp_path):
    """Also runs the shared-backbone value head (value head on the policy's hidden states)."""
    calls = []

    def reward_fn(prompts, responses, lengths):
        calls.append(1)
        r = _reward_len(prompts, responses, lengths)
        return r * np.nan if len(calls) == 3 else r

    ppo = dataclasses.replace(RESUME_PPO, shared_backbone=True, adaptive_kl=False)
    lm = _lm(cfg)
    with pytest.raises(FloatingPointError, match="iteration 3.*Last good checkpoint: iteration 2"):
        train_ppo(
            lm,
            lm,
            None,
            _prompts(12, seed=1),
            ppo_cfg=ppo,
            optim_cfg=_constant_lr(1e-3),
            ckpt_cfg=_ckpt(tmp_path, every=1),
            num_iterations=5,
            seed=0,
            workdir=tmp_path,
            reward_fn=reward_fn,
        )
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2]
    assert all(np.isfinite(r["loss/value"]) for r in _rows(tmp_path))
    with Checkpointer(_ckpt(tmp_path)) as ckpt:
        assert ckpt.all_steps() == [1, 2]
        state, data = ckpt.restore()
    assert set(state["params"]["value"]) == {"head"} and data["iteration"] == 2


def test_non_finite_loss_stops_with_the_iteration(cfg, tmp_path):
    """Finite but huge rewards: returns of 1e20 overflow the squared value error to inf in fp32."""
    with pytest.raises(FloatingPointError, match="non-finite loss at iteration 1.*none yet"):
        _resume_run(cfg, tmp_path, 2, reward_fn=lambda p, r, n: np.full(len(p), 1e20, np.float32))
    assert not (tmp_path / "metrics.jsonl").read_text()


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        from pathlib import Path

        rows = golden_run(Path(d))
    GOLDEN.write_text(
        json.dumps(
            {
                "_about": "tests/test_ppo.py golden_run: two PPO iterations on tiny_config('llama'), fp32 on CPU; "
                "written from a first run (python -m tests.test_ppo) and frozen",
                "jax_version": jax.__version__,
                "rows": [{k: r[k] for k in GOLDEN_KEYS} for r in rows],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {GOLDEN}")


def test_a_snapshot_without_its_completion_marker_is_redone_on_resume(cfg, tmp_path):
    """A snapshot cut after its config.json (no weights, no marker) is not counted as exported."""
    from cai_jax.checkpoints.hf import EXPORT_MARKER

    snaps = {1: tmp_path / "iter_1", 2: tmp_path / "iter_2"}
    _resume_run(cfg, tmp_path, 2, export_at=snaps)
    done = {k: {p.name: p.read_bytes() for p in folder.iterdir()} for k, folder in snaps.items()}
    assert all(EXPORT_MARKER in files and "config.json" in files for files in done.values())
    (snaps[1] / EXPORT_MARKER).unlink()
    (snaps[1] / "model.safetensors").unlink()  # killed mid-export: only config.json is left
    (snaps[2] / EXPORT_MARKER).unlink()  # killed just before the marker
    _resume_run(cfg, tmp_path, 2, export_at=snaps)  # restored at iteration 2: nothing to train
    for k, folder in snaps.items():
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == done[k], k
