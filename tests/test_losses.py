"""cai_jax.losses and cai_jax.rl_losses against numbers worked out by hand or in plain Python `math` (never the same jnp code)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import losses, rl_losses

# float32 arithmetic on O(1)-O(10) values: a few ulps relative, so 1e-6 absolute and relative.
TOL = 1e-6
close = functools.partial(np.testing.assert_allclose, rtol=TOL, atol=TOL)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------------------- masked_mean


def test_masked_mean_weights_empty_rows_and_garbage():
    x = jnp.array([[1.0, 2.0, jnp.nan], [4.0, jnp.inf, 6.0]])
    mask = jnp.array([[1, 1, 0], [0, 0, 0]])
    close(losses.masked_mean(x, mask), 1.5)
    close(losses.masked_mean(x, mask, axis=1), [1.5, 0.0])  # an empty row gives 0, not NaN
    close(losses.masked_mean(x, mask.astype(bool)), 1.5)
    weights = jnp.array([[0.5, 1.5, 0.0], [0.0, 0.0, 2.0]])
    close(losses.masked_mean(x, weights), (0.5 * 1 + 1.5 * 2 + 2 * 6) / 4.0)
    grad = jax.grad(lambda x: losses.masked_mean(x, mask))(x)
    close(grad, [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])


# ------------------------------------------------------------------------------------------------- sft


def test_sft_loss_hand_computed_with_masked_token():
    probs = [
        [[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]],
        [[0.2, 0.2, 0.6], [0.25, 0.5, 0.25], [0.3, 0.3, 0.4]],
    ]
    # Per-row offsets: log-softmax must not care about a constant added to the logits.
    logits = jnp.log(jnp.array(probs)) + jnp.array([3.0, -7.0])[:, None, None]
    targets = jnp.array([[0, 2, 1], [2, 0, -100]])  # -100 at the masked position is ignored
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    loss, metrics = losses.sft_loss(logits, targets, mask)
    want = -(math.log(0.5) + math.log(0.7) + math.log(0.3) + math.log(0.6) + math.log(0.25)) / 5
    close(loss, want)
    close(metrics["loss"], want)
    close(metrics["tokens"], 5.0)
    # argmax: row 0 -> 0 (hit), 2 (hit), 0 (miss: target 1); row 1 -> 2 (hit), 1 (miss: target 0).
    close(metrics["accuracy"], 3 / 5)


def test_sft_loss_bfloat16_logits_are_upcast():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]]]))
    loss, _ = losses.sft_loss(logits.astype(jnp.bfloat16), jnp.array([[0, 2]]), jnp.array([[1, 1]]))
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, -math.log(0.5), rtol=1e-2)  # bf16 input rounding only


# -------------------------------------------------------------------------------------------------- pm

R_A = [1.0, 0.0, -1.0]
R_B = [0.0, 0.5, 1.0]  # margins 1.0, -0.5, -2.0


def _bce(m: float, p: float) -> float:
    return -(p * _log_sigmoid(m) + (1 - p) * _log_sigmoid(-m))


def test_pm_loss_soft_targets_hand_computed():
    p = [0.8, 0.5, 0.1]
    loss, metrics = losses.pm_loss(jnp.array(R_A), jnp.array(R_B), jnp.array(p))
    want = (_bce(1.0, 0.8) + _bce(-0.5, 0.5) + _bce(-2.0, 0.1)) / 3
    close(loss, want)
    close(metrics["bce"], want)
    # sign(m) = (+, -, -), sign(p - 0.5) = (+, 0, -): right, half (no preferred side), right.
    close(metrics["accuracy"], 2.5 / 3)
    close(metrics["margin"], -0.5)
    close(metrics["p_mean"], 1.4 / 3)


def test_pm_loss_hard_labels_and_centering_hand_computed():
    p = [1.0, 0.0, 1.0]
    loss, metrics = losses.pm_loss(jnp.array(R_A), jnp.array(R_B), jnp.array(p), centering=0.1)
    bce = (-_log_sigmoid(1.0) - _log_sigmoid(0.5) - _log_sigmoid(-2.0)) / 3
    centering = 0.1 * ((1.0 + 0.0) ** 2 + (0.0 + 0.5) ** 2 + (-1.0 + 1.0) ** 2) / 3
    close(metrics["bce"], bce)
    close(loss, bce + centering)
    close(metrics["accuracy"], 2 / 3)  # pair 3 prefers A but B scored higher


def test_pm_loss_mask_drops_padding_pairs():
    loss, metrics = losses.pm_loss(
        jnp.array(R_A + [100.0]),
        jnp.array(R_B + [-100.0]),
        jnp.array([1.0, 0.0, 1.0, 0.0]),
        mask_B=jnp.array([1, 1, 1, 0]),
    )
    close(loss, (-_log_sigmoid(1.0) - _log_sigmoid(0.5) - _log_sigmoid(-2.0)) / 3)
    close(metrics["margin"], -0.5)


def test_pm_loss_with_p_one_is_the_pairwise_loss_and_stable():
    r_a = [0.3, -1.2, 2.5, -50.0, 50.0, 0.0]
    r_b = [0.1, 0.8, -0.5, 0.0, 0.0, 0.0]
    loss, _ = losses.pm_loss(jnp.array(r_a), jnp.array(r_b), jnp.ones(6))
    # -log sigmoid(rA - rB) = log(1 + exp(rB - rA)): the standard pairwise PM loss.
    per_pair = [math.log1p(math.exp(b - a)) for a, b in zip(r_a, r_b)]
    close(loss, sum(per_pair) / 6)
    assert np.isfinite(loss)


def test_pm_gradient_vanishes_exactly_at_the_target_probability():
    p = [0.1, 0.3, 0.5, 0.9]
    logit_p = [math.log(q / (1 - q)) for q in p]
    grad_fn = jax.grad(lambda ra, rb: losses.pm_loss(ra, rb, jnp.array(p))[0], argnums=(0, 1))
    g_a, g_b = grad_fn(jnp.array(logit_p), jnp.zeros(4))
    close(g_a, np.zeros(4))
    close(g_b, np.zeros(4))
    # Off the target, d loss / d m = (sigmoid(m) - p) / B, nonzero: it vanishes *only* there.
    shifted = [m + 0.5 for m in logit_p]
    g_a, g_b = grad_fn(jnp.array(shifted), jnp.zeros(4))
    want = [(_sigmoid(m) - q) / 4 for m, q in zip(shifted, p)]
    close(g_a, want)
    close(g_b, [-w for w in want])
    assert np.all(np.abs(np.asarray(g_a)) > 1e-3)


# -------------------------------------------------------------------------------------------------- kl

LOGP = [[-1.0, -2.0, -0.5], [-0.1, -3.0, -1.2]]
REF = [[-1.5, -1.0, -0.5], [-0.3, -2.0, -4.0]]
DIFF = [[0.5, -1.0, 0.0], [0.2, -1.0, 2.8]]  # LOGP - REF


def test_kl_estimators_hand_computed():
    logp, ref = jnp.array(LOGP), jnp.array(REF)
    close(rl_losses.kl_penalty(logp, ref, "k1"), DIFF)
    close(rl_losses.kl_penalty(logp, ref, "k2"), [[0.5 * d * d for d in row] for row in DIFF])
    close(rl_losses.kl_penalty(logp, ref, "k3"), [[math.exp(-d) - 1 + d for d in row] for row in DIFF])
    with pytest.raises(ValueError, match="k4"):
        rl_losses.kl_penalty(logp, ref, "k4")


def test_k3_is_nonnegative_and_k1_k3_are_unbiased():
    logp, ref = jax.random.normal(jax.random.key(0), (2, 64, 2)) * 3
    k3 = rl_losses.kl_penalty(logp, ref, "k3")
    assert float(k3.min()) >= 0.0
    # Exact expectation over a discrete pi (weights = pi), not a Monte-Carlo estimate.
    pi, ref_pi = [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.4, 0.1]
    kl = sum(a * math.log(a / b) for a, b in zip(pi, ref_pi))
    logp, ref = jnp.log(jnp.array([pi])), jnp.log(jnp.array([ref_pi]))
    for kind in ("k1", "k3"):
        close(jnp.sum(jnp.array([pi]) * rl_losses.kl_penalty(logp, ref, kind)), kl)


# ------------------------------------------------------------------------------------------ ppo rewards


def test_ppo_rewards_score_at_last_token_minus_kl_and_eos_penalty():
    logp = jnp.array(LOGP)
    ref = jnp.array(REF).at[0, 2].set(-jnp.inf)  # garbage at the masked position
    mask = jnp.array([[1, 1, 0], [1, 1, 1]])
    rewards, kl = rl_losses.ppo_rewards(
        jnp.array([2.0, -1.0]),
        logp,
        ref,
        mask,
        beta=0.1,
        score_mean=0.5,
        score_std=2.0,
        ended_B=jnp.array([True, False]),
        missing_eos_penalty=1.0,
    )
    close(kl, [[0.5, -1.0, 0.0], [0.2, -1.0, 2.8]])
    # normalised scores (2 - 0.5) / 2 = 0.75 and (-1 - 0.5) / 2 = -0.75; row 1 never ended: -1.
    close(rewards, [[-0.05, 0.1 + 0.75, 0.0], [-0.02, 0.1, -0.28 - 0.75 - 1.0]])
    rewards, _ = rl_losses.ppo_rewards(jnp.array([2.0, -1.0]), logp, jnp.array(REF), mask, beta=0.1, kl_kind="k3")
    k3 = [[math.exp(-d) - 1 + d for d in row] for row in DIFF]
    close(
        rewards,
        [[-0.1 * k3[0][0], -0.1 * k3[0][1] + 2.0, 0.0], [-0.1 * k3[1][0], -0.1 * k3[1][1], -0.1 * k3[1][2] - 1.0]],
    )


def test_ppo_rewards_last_valid_token_for_any_padding():
    mask = jnp.array([[0, 1, 1], [1, 0, 1], [0, 1, 0], [0, 0, 0]])  # left pad, gap, middle, empty
    zeros = jnp.zeros((4, 3))
    rewards, _ = rl_losses.ppo_rewards(jnp.array([1.0, 2.0, 3.0, 4.0]), zeros, zeros, mask, beta=0.0)
    close(rewards, [[0, 0, 1.0], [0, 0, 2.0], [0, 3.0, 0], [0, 0, 0]])


# ------------------------------------------------------------------------------------------------- gae


def _gae_by_definition(rewards, values, mask, gamma, lam):
    """Eq. 16 literally: A_t = sum_l (gamma lam)^l delta_{t+l} over the row's valid steps."""
    adv = [[0.0] * len(row) for row in rewards]
    ret = [[0.0] * len(row) for row in rewards]
    for b, (r, v, m) in enumerate(zip(rewards, values, mask)):
        steps = [t for t in range(len(r)) if m[t]]
        next_v = {t: (v[steps[i + 1]] if i + 1 < len(steps) else 0.0) for i, t in enumerate(steps)}
        delta = {t: r[t] + gamma * next_v[t] - v[t] for t in steps}
        for i, t in enumerate(steps):
            adv[b][t] = sum((gamma * lam) ** l * delta[s] for l, s in enumerate(steps[i:]))
            ret[b][t] = adv[b][t] + v[t]
    return adv, ret


REWARDS = [[1.0, 2.0, 3.0], [0.5, -1.0, 9.0]]
VALUES = [[0.5, 1.0, 1.5], [0.2, 0.3, 7.0]]
MASK = [[1, 1, 1], [1, 1, 0]]


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    adv, ret = rl_losses.gae(jnp.array(REWARDS), jnp.array(VALUES), jnp.array(MASK), 1.0, 1.0)
    close(ret, [[6.0, 5.0, 3.0], [-0.5, -1.0, 0.0]])
    close(adv, [[5.5, 4.0, 1.5], [-0.7, -1.3, 0.0]])


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.95), (1.0, 0.5), (0.99, 0.0), (0.5, 1.0)])
@pytest.mark.parametrize("mask", [MASK, [[1, 0, 1], [0, 1, 1]]], ids=["right_pad", "gap_left_pad"])
def test_gae_against_the_definition(gamma, lam, mask):
    want_adv, want_ret = _gae_by_definition(REWARDS, VALUES, mask, gamma, lam)
    adv, ret = jax.jit(rl_losses.gae)(jnp.array(REWARDS), jnp.array(VALUES), jnp.array(mask), gamma, lam)
    close(adv, want_adv)
    close(ret, want_ret)


# ---------------------------------------------------------------------------------------------- whiten


def test_whiten_masked_moments():
    x = jnp.array([[1.0, 2.0, 3.0], [4.0, 100.0, 6.0]])
    mask = jnp.array([[1, 1, 1], [1, 0, 1]])
    # valid [1, 2, 3, 4, 6]: mean 3.2, population variance 14.8 / 5 = 2.96
    scale = 1 / math.sqrt(2.96 + 1e-8)
    want = [[-2.2 * scale, -1.2 * scale, -0.2 * scale], [0.8 * scale, 0.0, 2.8 * scale]]
    out = rl_losses.whiten(x, mask)
    close(out, want)
    close(losses.masked_mean(out, mask), 0.0)
    close(losses.masked_mean(jnp.square(out), mask), 1.0)
    kept = rl_losses.whiten(x, mask, shift_mean=False)
    close(kept, [[w + 3.2 if m else 0.0 for w, m in zip(rw, rm)] for rw, rm in zip(want, mask.tolist())])


# ----------------------------------------------------------------------------------------- policy loss


def test_ppo_policy_loss_clipping_cases():
    # ratio / advantage per token, clip 0.2:
    #  1.1, +1: inside            -> -1.1           | 1.5, +1: above, clipped   -> -1.2 (clipped)
    #  0.5, +1: below, unclipped  -> -0.5           | 0.5, -1: below, clipped   -> +0.8 (clipped)
    #  1.5, -2: above, unclipped  -> +3.0           | masked (ratio e^50)
    logp = jnp.array([[math.log(1.1), math.log(1.5), math.log(0.5)], [math.log(0.5), math.log(1.5), 50.0]])
    old = jnp.zeros((2, 3))
    adv = jnp.array([[1.0, 1.0, 1.0], [-1.0, -2.0, -1.0]])
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    loss_fn = lambda lp: rl_losses.ppo_policy_loss(lp, old, adv, mask, 0.2)
    loss, metrics = loss_fn(logp)
    close(loss, (-1.1 - 1.2 - 0.5 + 0.8 + 3.0) / 5)
    close(metrics["clipfrac"], 2 / 5)
    close(metrics["ratio_mean"], (1.1 + 1.5 + 0.5 + 0.5 + 1.5) / 5)
    logs = [math.log(r) for r in (1.1, 1.5, 0.5, 0.5, 1.5)]
    close(metrics["approxkl"], 0.5 * sum(x * x for x in logs) / 5)
    # d/d logp of -A * ratio is -A * ratio / N where unclipped, 0 where the clipped term is active.
    grad = jax.grad(lambda lp: loss_fn(lp)[0])(logp)
    close(grad, [[-1.1 / 5, 0.0, -0.5 / 5], [0.0, 2 * 1.5 / 5, 0.0]])


# ------------------------------------------------------------------------------------------ value loss


def test_ppo_value_loss_clipping_cases():
    old = jnp.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    values = jnp.array([[0.1, 0.5, -0.5], [1.5, 0.9, 1.0]])
    returns = jnp.array([[0.0, 1.0, 0.0], [0.0, 1.0, 9.0]])
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    # per token max((v - R)^2, (clip(v, old +- 0.2) - R)^2):
    #  0.1 inside: 0.01 | 0.5 -> 0.2: max(0.25, 0.64) = 0.64 clipped | -0.5 -> -0.2: max(0.25, 0.04)
    #  1.5 -> 1.2: max(2.25, 1.44)   | 0.9 inside: 0.01                 | masked
    loss_fn = lambda v: rl_losses.ppo_value_loss(v, old, returns, mask, 0.2)
    loss, metrics = loss_fn(values)
    close(loss, 0.5 * (0.01 + 0.64 + 0.25 + 2.25 + 0.01) / 5)
    close(metrics["clipfrac"], 1 / 5)
    grad = jax.grad(lambda v: loss_fn(v)[0])(values)
    close(grad, [[0.1 / 5, 0.0, -0.5 / 5], [1.5 / 5, -0.1 / 5, 0.0]])


# --------------------------------------------------------------------------------------------- entropy


def test_entropy_uniform_is_log_v_and_hand_values():
    v = 7
    close(rl_losses.entropy_from_logits(jnp.full((2, 3, v), 3.0), jnp.ones((2, 3))), math.log(v))
    ninf = -jnp.inf
    logits = jnp.array(
        [
            [[0.0, 0.0, 0.0, 0.0], [math.log(0.5), math.log(0.25), math.log(0.25), ninf], [0.0, 0.0, ninf, ninf]],
            [[7.0, 7.0, 7.0, 7.0], [0.0, ninf, ninf, ninf], [jnp.nan] * 4],
        ]
    )
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    # ln 4, 1.5 ln 2, ln 2, ln 4, 0 (one token certain); the NaN row is masked out.
    close(rl_losses.entropy_from_logits(logits, mask), (2 + 1.5 + 1 + 2 + 0) * math.log(2) / 5)


# ------------------------------------------------------------------------------------------ adaptive kl


@pytest.mark.parametrize(
    "current_kl,want",
    [
        (6.6, 0.1 * (1 + 0.1 * 256 / 10000)),  # 10% over target
        (12.0, 0.1 * (1 + 0.2 * 256 / 10000)),  # error +1 clipped to +0.2
        (0.0, 0.1 * (1 - 0.2 * 256 / 10000)),  # error -1 clipped to -0.2
        (6.0, 0.1),  # on target
    ],
)
def test_adaptive_kl_update(current_kl, want):
    close(rl_losses.adaptive_kl_update(0.1, current_kl, 6.0, 10000, 256), want)
    close(jax.jit(rl_losses.adaptive_kl_update)(0.1, current_kl, 6.0, 10000, 256), want)
