"""RL quantities of RL-CAI (Bai et al. 2022, sec. 4): the KL penalty, per-token rewards, GAE, the
PPO policy and value losses, the entropy bonus and the adaptive KL controller.

The conventions of losses.py hold: pure `jax.numpy`, float32 arithmetic whatever the input dtype,
and a masked-out position never contributes a value or a gradient. Shape letters: B batch,
T response length, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cai_jax.losses import as_f32, keep_mask, masked_mean

__all__ = [
    "kl_penalty",
    "ppo_rewards",
    "gae",
    "whiten",
    "rloo_advantages",
    "ppo_policy_loss",
    "ppo_value_loss",
    "entropy_from_logits",
    "adaptive_kl_update",
]

_WHITEN_EPS = 1e-8  # added to the variance before rsqrt, as in Ziegler et al.'s whiten()


def kl_penalty(logp_BT: jax.Array, ref_logp_BT: jax.Array, kind: str = "k1") -> jax.Array:
    """Per-token estimators of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020).

    From J. Schulman, "Approximating KL Divergence" (joschu.net/blog/kl-approx.html), with
    log r = ref_logp - logp:
      k1 = -log r = logp - ref_logp                (unbiased, can be negative, high variance)
      k2 = 0.5 (log r)^2                           (biased, >= 0, low variance)
      k3 = (r - 1) - log r = exp(ref - logp) - 1 - (ref - logp)   (unbiased, >= 0, low variance)

    Args:
      logp_BT: [B, T] log-probs of the sampled tokens under the policy.
      ref_logp_BT: [B, T] log-probs of the same tokens under the reference.
      kind: "k1", "k2" or "k3".

    Returns:
      [B, T] float32 per-token estimates (no masking; see `ppo_rewards`).
    """
    log_ratio_BT = as_f32(logp_BT) - as_f32(ref_logp_BT)
    if kind == "k1":
        return log_ratio_BT
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio_BT)
    if kind == "k3":
        # expm1 keeps k3 accurate (and >= 0) when the two log-probs are close.
        return jnp.expm1(-log_ratio_BT) + log_ratio_BT
    raise ValueError(f"kl_penalty: kind must be 'k1', 'k2' or 'k3', got {kind!r}")


def _last_valid_onehot(mask_BT: jax.Array) -> jax.Array:
    """[B, T] float32 one-hot of each row's last unmasked position (all zeros for an empty row)."""
    keep_BT = keep_mask(mask_BT)
    t = keep_BT.shape[1]
    last_B = t - 1 - jnp.argmax(keep_BT[:, ::-1], axis=1)
    return jax.nn.one_hot(last_B, t, dtype=jnp.float32) * jnp.any(keep_BT, axis=1, keepdims=True)


def ppo_rewards(
    score_B: jax.Array,
    logp_BT: jax.Array,
    ref_logp_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    beta,
    kl_kind: str = "k1",
    score_mean=0.0,
    score_std=1.0,
    ended_B: jax.Array | None = None,
    missing_eos_penalty: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Per-token RL-CAI rewards: PM score at the end minus a KL penalty (Ziegler et al. 2019, sec. 2.2).

    R_t = -beta * KL_t + [t is the row's last response token] * ((score - mean) / std - penalty),
    the per-token form of R(x, y) = r(x, y) - beta log(pi(y|x) / pi_ref(y|x)) (Ziegler et al.
    2019, eq. 2; Stiennon et al. 2020, sec. 3.4), with the PM score r normalised by the PM's
    training mean/std (Bai et al. 2022, sec. 4.1). `penalty` = `missing_eos_penalty` for rows that
    never emitted EOS (`ended_B` False), else 0; it is subtracted (pass a value >= 0), in units of
    the normalised score.

    Args:
      score_B: [B] raw PM scores of the full responses.
      logp_BT: [B, T] policy log-probs of the sampled response tokens.
      ref_logp_BT: [B, T] reference log-probs of the same tokens.
      mask_BT: [B, T] 1 on response tokens. The score goes to the last 1 of each row, so right-,
        left-padded or gappy masks all work; an all-zero row gets no score.
      beta: KL coefficient (float or scalar array, e.g. from `adaptive_kl_update`).
      kl_kind: estimator for `kl_penalty` ("k1", "k2", "k3").
      score_mean: PM score mean used for normalisation.
      score_std: PM score standard deviation (> 0) used for normalisation.
      ended_B: optional [B] bool, True where the response contains EOS.
      missing_eos_penalty: subtracted from the normalised score of rows with `ended_B` False.

    Returns:
      (rewards_BT, kl_BT): float32 [B, T] rewards and the per-token KL estimates (not scaled by
      beta), both 0 at masked positions.
    """
    keep_BT = keep_mask(mask_BT)
    kl_BT = jnp.where(keep_BT, kl_penalty(logp_BT, ref_logp_BT, kl_kind), 0.0)
    final_B = (as_f32(score_B) - score_mean) / score_std
    if ended_B is not None:
        final_B = final_B - jnp.where(jnp.asarray(ended_B, bool), 0.0, missing_eos_penalty)
    rewards_BT = -as_f32(beta) * kl_BT + _last_valid_onehot(keep_BT) * final_B[:, None]
    return rewards_BT, kl_BT


def gae(
    rewards_BT: jax.Array, values_BT: jax.Array, mask_BT: jax.Array, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16).

    A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, computed backwards
    as A_t = delta_t + gamma lam A_{t+1}. Only unmasked positions are steps of the episode: masked
    ones are skipped (so "t+1" is the next unmasked position, whatever the padding side), and the
    value after a row's last unmasked token is 0 (the response ended; no bootstrap). Returns are
    A_t + V_t, the lambda-return that the value head regresses on. A reverse `lax.scan` over T:
    jit-friendly, O(T) sequential steps on [B]-vectors.

    Args:
      rewards_BT: [B, T] per-token rewards (e.g. from `ppo_rewards`).
      values_BT: [B, T] value estimates V(s_t) of the old policy.
      mask_BT: [B, T] 1 on response tokens.
      gamma: discount.
      lam: GAE lambda (lam = 1: Monte-Carlo returns minus the value; lam = 0: one-step TD).

    Returns:
      (advantages_BT, returns_BT): float32 [B, T], 0 at masked positions. Not whitened (see
      `whiten`); no gradient flows through them.
    """
    sg = jax.lax.stop_gradient
    keep_TB = keep_mask(mask_BT).T
    r_TB, v_TB = sg(as_f32(rewards_BT)).T, sg(as_f32(values_BT)).T

    def step(carry, x):
        next_v_B, next_adv_B = carry
        r_B, v_B, keep_B = x
        delta_B = r_B + gamma * next_v_B - v_B
        adv_B = delta_B + gamma * lam * next_adv_B
        carry = (jnp.where(keep_B, v_B, next_v_B), jnp.where(keep_B, adv_B, next_adv_B))
        return carry, jnp.where(keep_B, adv_B, 0.0)

    zeros_B = jnp.zeros(r_TB.shape[1], jnp.float32)
    _, adv_TB = jax.lax.scan(step, (zeros_B, zeros_B), (r_TB, v_TB, keep_TB), reverse=True)
    advantages_BT = adv_TB.T
    returns_BT = jnp.where(keep_TB.T, advantages_BT + v_TB.T, 0.0)
    return advantages_BT, returns_BT


def whiten(x_BT: jax.Array, mask_BT: jax.Array, shift_mean: bool = True) -> jax.Array:
    """Masked whitening: (x - mean) / sqrt(var + 1e-8) over the unmasked entries.

    Advantage normalisation as in Ziegler et al. 2019's implementation (lm-human-preferences
    `whiten`): the mean and the population (biased) variance are taken over all unmasked entries
    of the batch. With `shift_mean=False` the mean is added back (only the spread is rescaled).

    Args:
      x_BT: [B, T] values (typically advantages).
      mask_BT: [B, T] 1 on the entries that count.
      shift_mean: whether the result has mean 0 (True) or keeps the original mean (False).

    Returns:
      float32 [B, T]; 0 at masked positions.
    """
    x_BT = as_f32(x_BT)
    mean = masked_mean(x_BT, mask_BT)
    var = masked_mean(jnp.square(x_BT - mean), mask_BT)
    out_BT = (x_BT - mean) * jax.lax.rsqrt(var + _WHITEN_EPS)
    if not shift_mean:
        out_BT = out_BT + mean
    return jnp.where(keep_mask(mask_BT), out_BT, 0.0)


def ppo_policy_loss(
    logp_BT: jax.Array, old_logp_BT: jax.Array, adv_BT: jax.Array, mask_BT: jax.Array, clip: float
) -> tuple[jax.Array, dict]:
    """PPO clipped surrogate objective, as a loss (Schulman et al. 2017, eq. 7).

    With ratio rho_t = exp(logp_t - old_logp_t): loss = masked_mean_t max(-A_t rho_t,
    -A_t clip(rho_t, 1 - eps, 1 + eps)), the negative of L^CLIP, averaged over all unmasked tokens
    of the batch. `old_logp_BT` and `adv_BT` are treated as constants.

    Metrics: "approxkl" = 0.5 * masked_mean((logp - old_logp)^2), the k2 estimator of
    KL(pi_old || pi) on tokens sampled from pi_old (see `kl_penalty`; the same estimator as
    lm-human-preferences and TRL); "clipfrac" = fraction of tokens where the clipped term is the
    active one (the gradient is zero there); "ratio_mean" = mean rho.

    Args:
      logp_BT: [B, T] log-probs of the taken tokens under the current policy.
      old_logp_BT: [B, T] log-probs of the same tokens under the rollout policy.
      adv_BT: [B, T] advantages (usually whitened).
      mask_BT: [B, T] 1 on response tokens.
      clip: epsilon of the clip range [1 - eps, 1 + eps].

    Returns:
      (loss, metrics {"approxkl", "clipfrac", "ratio_mean"}).
    """
    sg = jax.lax.stop_gradient
    keep_BT = keep_mask(mask_BT)
    # Zero the log-ratio at masked positions before exp: garbage there must not overflow into NaN grads.
    log_ratio_BT = jnp.where(keep_BT, as_f32(logp_BT) - sg(as_f32(old_logp_BT)), 0.0)
    ratio_BT = jnp.exp(log_ratio_BT)
    adv_BT = sg(as_f32(adv_BT))
    unclipped_BT = -adv_BT * ratio_BT
    clipped_BT = -adv_BT * jnp.clip(ratio_BT, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(unclipped_BT, clipped_BT), mask_BT)
    metrics = {
        "approxkl": 0.5 * masked_mean(jnp.square(sg(log_ratio_BT)), mask_BT),
        "clipfrac": masked_mean(sg(clipped_BT > unclipped_BT), mask_BT),
        "ratio_mean": masked_mean(sg(ratio_BT), mask_BT),
    }
    return loss, metrics


def ppo_value_loss(
    values_BT: jax.Array, old_values_BT: jax.Array, returns_BT: jax.Array, mask_BT: jax.Array, clip: float
) -> tuple[jax.Array, dict]:
    """Clipped value loss of PPO implementations (OpenAI baselines ppo2; Ziegler et al. 2019).

    loss = 0.5 * masked_mean max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2): the value may
    move at most `clip` from its rollout value before the pessimistic term stops its gradient
    (discussed in Engstrom et al. 2020, "Implementation Matters", sec. 3). Not in the PPO paper,
    whose eq. 9 uses the plain squared error.

    Args:
      values_BT: [B, T] current value predictions.
      old_values_BT: [B, T] value predictions at rollout time.
      returns_BT: [B, T] regression targets (from `gae`).
      mask_BT: [B, T] 1 on response tokens.
      clip: largest allowed move c of a value from its rollout value.

    Returns:
      (loss, metrics {"clipfrac": fraction of tokens where the clipped term is the larger}).
    """
    sg = jax.lax.stop_gradient
    v_BT, old_v_BT, ret_BT = as_f32(values_BT), sg(as_f32(old_values_BT)), sg(as_f32(returns_BT))
    v_clipped_BT = jnp.clip(v_BT, old_v_BT - clip, old_v_BT + clip)
    unclipped_BT = jnp.square(v_BT - ret_BT)
    clipped_BT = jnp.square(v_clipped_BT - ret_BT)
    loss = 0.5 * masked_mean(jnp.maximum(unclipped_BT, clipped_BT), mask_BT)
    return loss, {"clipfrac": masked_mean(sg(clipped_BT > unclipped_BT), mask_BT)}


def entropy_from_logits(logits_BTV: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """Mean per-token entropy -sum_v p log p of the policy (the S term of Schulman et al. 2017, eq. 9).

    Args:
      logits_BTV: [B, T, V] logits (float32 softmax); -inf entries (banned tokens) are allowed.
      mask_BT: [B, T] 1 on the positions that count.

    Returns:
      scalar float32 masked mean entropy, in nats.
    """
    logp_BTV = jax.nn.log_softmax(as_f32(logits_BTV), axis=-1)
    p_BTV = jnp.exp(logp_BTV)
    entropy_BT = -jnp.sum(p_BTV * jnp.where(p_BTV > 0, logp_BTV, 0.0), axis=-1)
    return masked_mean(entropy_BT, mask_BT)


def rloo_advantages(rewards_PK: jax.Array) -> jax.Array:
    """REINFORCE leave-one-out advantages of k samples per prompt (Kool et al. 2019; Ahmadian et al. 2024).

    A_i = R_i - 1/(k-1) sum_{j != i} R_j: each sample's baseline is the mean reward of the other
    samples of its prompt, so it does not depend on the sample it scores and the gradient stays
    unbiased. Equivalently A_i = k/(k-1) (R_i - mean_j R_j); the advantages of a prompt sum to 0.

    Args:
      rewards_PK: [P, K] sequence rewards, row p holding the K >= 2 samples of prompt p.

    Returns:
      float32 [P, K] advantages; no gradient flows through them.

    Raises:
      ValueError: K < 2 (a single sample has no other sample to be its baseline).
    """
    rewards_PK = jax.lax.stop_gradient(as_f32(rewards_PK))
    if rewards_PK.ndim != 2 or rewards_PK.shape[1] < 2:
        raise ValueError(f"rloo_advantages: rewards must be [prompts, k] with k >= 2, got shape {rewards_PK.shape}")
    k = rewards_PK.shape[1]
    others_PK = jnp.sum(rewards_PK, axis=1, keepdims=True) - rewards_PK
    return rewards_PK - others_PK / (k - 1)


def adaptive_kl_update(beta, current_kl, target_kl, horizon, n_steps):
    """Proportional KL controller (Ziegler et al. 2019, sec. 2.2).

    e = clip(KL / KL_target - 1, -0.2, 0.2); beta <- beta * (1 + e * n_steps / horizon), where
    n_steps is the number of samples (episodes) since the last update and `horizon` sets how fast
    beta adapts (K_beta = n_steps / horizon, lm-human-preferences' AdaptiveKLController).

    Args:
      beta: current KL coefficient.
      current_kl: measured KL (e.g. mean per-sequence KL of the last rollout batch).
      target_kl: desired KL (> 0).
      horizon: adaptation horizon, in samples.
      n_steps: samples seen since the last update.

    Returns:
      float32 scalar: the new beta.
    """
    error = jnp.clip(as_f32(current_kl) / target_kl - 1.0, -0.2, 0.2)
    return as_f32(beta) * (1.0 + error * n_steps / horizon)


# ---------------------------------------------------------------- Preference optimisation (DPO / IPO)
#
# Offline RL-CAI: the policy is trained on the feedback stage's comparisons directly, with no PM
# and no sampling. Both losses read the policy's preference through one number per pair, the
# log-ratio margin d (`preference_log_ratio`), and the AI label p = P(A preferred) as a target.
# Per example ([B] in, [B] out), no masks or weights: the trainer averages.

__all__ += ["preference_log_ratio", "preference_stats", "soft_dpo_loss", "ipo_loss"]


def preference_log_ratio(
    logp_a_B: jax.Array, logp_b_B: jax.Array, ref_logp_a_B: jax.Array, ref_logp_b_B: jax.Array
) -> jax.Array:
    """d = (log pi(a) - log ref(a)) - (log pi(b) - log ref(b)), float32 [B].

    Args:
      logp_a_B, logp_b_B: [B] sequence log-probs of responses A and B under the policy (sums over
        each response's tokens).
      ref_logp_a_B, ref_logp_b_B: [B] the same under the frozen reference.
    """
    return (as_f32(logp_a_B) - as_f32(ref_logp_a_B)) - (as_f32(logp_b_B) - as_f32(ref_logp_b_B))


def preference_stats(d_B: jax.Array, p_B: jax.Array, beta) -> dict[str, jax.Array]:
    """Per-example diagnostics of a margin d against a target p (no gradient flows through them).

    "margin" is beta * d, the difference of the implied rewards beta * log(pi / ref) of A and B
    (Rafailov et al. 2023). "accuracy" is 1 where sign(d) agrees with sign(p - 1/2), 0
    where they disagree and 1/2 where either is 0, the convention of `losses.pm_loss`.

    Returns:
      {"margin" [B], "accuracy" [B]}, float32.
    """
    d_B, p_B = jax.lax.stop_gradient(as_f32(d_B)), as_f32(p_B)
    return {"margin": beta * d_B, "accuracy": 0.5 * (1.0 + jnp.sign(d_B) * jnp.sign(p_B - 0.5))}


def soft_dpo_loss(d_B: jax.Array, p_B: jax.Array, beta) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO against a soft target: loss = -[p log sigmoid(beta d) + (1 - p) log sigmoid(-beta d)].

    The binary cross-entropy of the Bradley-Terry probability sigmoid(beta d) that the policy's
    implied rewards give A over B, against the AI label p. With p = 1 it is the DPO loss
    -log sigmoid(beta d) of Rafailov et al. 2023 (eq. 7); a constant p = 1 - eps is DPO with label
    smoothing eps ("conservative DPO", Mitchell 2023), and a per-example p generalises that to the
    feedback model's own confidence, as the PM's loss (`losses.pm_loss`) does for the PM. Since
    the loss is linear in p it equals E_{label ~ Bernoulli(p)} of the hard-label loss.

    d loss / d d = beta (sigmoid(beta d) - p): zero at d = logit(p) / beta, so a soft label has a
    finite optimum (p = 1/2 at d = 0), while p in {0, 1} keeps pushing d to +-inf. log_sigmoid
    keeps large |beta d| finite.

    Args:
      d_B: [B] log-ratio margins (`preference_log_ratio`).
      p_B: [B] targets in [0, 1], the probability that A is preferred.
      beta: the KL-regularisation strength (inverse temperature of the implied reward).

    Returns:
      (loss [B] float32, `preference_stats`).
    """
    d_B, p_B = as_f32(d_B), as_f32(p_B)
    z_B = beta * d_B
    loss_B = -(p_B * jax.nn.log_sigmoid(z_B) + (1.0 - p_B) * jax.nn.log_sigmoid(-z_B))
    return loss_B, preference_stats(d_B, p_B, beta)


def ipo_loss(d_B: jax.Array, p_B: jax.Array, beta) -> tuple[jax.Array, dict[str, jax.Array]]:
    """IPO against a soft target: loss = (d - (p - 1/2) / beta)^2.

    Azar et al. 2023 ("A General Theoretical Paradigm to Understand Learning from Human
    Preferences") regress d onto a finite target instead of pushing a sigmoid to 0 or 1; their
    empirical IPO loss for a (winner, loser) pair is (d - 1/(2 tau))^2. This is that loss with
    tau = beta and the soft target (p - 1/2) / beta, which for p = 1 is their 1 / (2 beta). It is
    the hard-label loss averaged over label ~ Bernoulli(p), up to a constant:
    p (d - c)^2 + (1 - p) (-d - c)^2 = (d - (2p - 1) c)^2 + 4 p (1 - p) c^2 with c = 1 / (2 beta).
    d loss / d d = 2 (d - (p - 1/2) / beta), zero at the target; p = 1/2 asks for d = 0.

    Args:
      d_B: [B] log-ratio margins (`preference_log_ratio`).
      p_B: [B] targets in [0, 1], the probability that A is preferred.
      beta: the regularisation strength (> 0; IPO's tau).

    Returns:
      (loss [B] float32, `preference_stats`).
    """
    d_B, p_B = as_f32(d_B), as_f32(p_B)
    loss_B = jnp.square(d_B - (p_B - 0.5) / beta)
    return loss_B, preference_stats(d_B, p_B, beta)
