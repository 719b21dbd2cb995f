"""Losses of SL-CAI and the preference model (Bai et al. 2022, sec. 3-4); RL-CAI's are in rl_losses.py.

Pure `jax.numpy`: arrays in, arrays out, no I/O, no parameters. All arithmetic is float32 whatever
the input dtype (bf16 logits are upcast before any softmax). Masks may be bool or 0/1 numbers; a
masked-out position never contributes a value *or* a gradient, even if it holds inf or NaN.

Shape letters: B batch, L sequence length, T response length, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "masked_mean",
    "sft_loss",
    "pm_loss",
    "as_f32",
    "keep_mask",
]


def as_f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def keep_mask(mask) -> jax.Array:
    """Boolean "position counts" array from a bool or 0/1 mask."""
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean of `x` over positions where `mask` is nonzero.

    A float mask acts as weights (sum(x * w) / sum(w)). Masked-out entries of `x` are replaced by 0
    before the product, so inf/NaN there neither leak into the value nor into the gradient.

    Args:
      x: any shape.
      mask: same shape as `x` (or broadcastable), bool or numeric.
      axis: axes to reduce (None: all).

    Returns:
      float32 mean; 0 where the mask is empty along `axis`.
    """
    x = as_f32(x)
    w = jnp.broadcast_to(as_f32(mask), x.shape)
    total = jnp.sum(jnp.where(w != 0, x * w, 0.0), axis=axis)
    count = jnp.sum(w, axis=axis)
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def sft_loss(logits_BLV: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array) -> tuple[jax.Array, dict]:
    """Token cross-entropy for supervised fine-tuning (SL-CAI, Bai et al. 2022, sec. 3).

    Convention: targets are already shifted, i.e. `targets_BL[:, t]` is the token that follows
    position t, the one `logits_BLV[:, t]` predicts (for a sequence `tokens`, pass
    `logits[:, :-1]`, `tokens[:, 1:]`). The loss is the mean over all unmasked tokens of the batch
    (every token weighs the same, long responses weigh more than short ones).

    Args:
      logits_BLV: [B, L, V] logits, any float dtype (log-softmax is taken in float32).
      targets_BL: [B, L] int token ids; values at masked positions are ignored (may be -100).
      mask_BL: [B, L] 1 where the token is trained on (the response), 0 on prompt and padding.

    Returns:
      (loss, metrics): scalar mean negative log-likelihood; metrics {"loss", "tokens" (number of
      unmasked tokens), "accuracy" (fraction of unmasked tokens whose argmax is the target)}.
    """
    keep_BL = keep_mask(mask_BL)
    logp_BLV = jax.nn.log_softmax(as_f32(logits_BLV), axis=-1)
    safe_targets_BL = jnp.where(keep_BL, targets_BL, 0).astype(jnp.int32)
    target_logp_BL = jnp.take_along_axis(logp_BLV, safe_targets_BL[..., None], axis=-1)[..., 0]
    loss = masked_mean(-target_logp_BL, mask_BL)
    correct_BL = jnp.argmax(logp_BLV, axis=-1) == safe_targets_BL
    metrics = {
        "loss": loss,
        "tokens": jnp.sum(as_f32(keep_BL)),
        "accuracy": masked_mean(correct_BL, mask_BL),
    }
    return loss, metrics


def pm_loss(
    r_a_B: jax.Array,
    r_b_B: jax.Array,
    p_B: jax.Array,
    centering: float = 0.0,
    *,
    mask_B: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """Preference-model loss with soft targets (Bai et al. 2022, sec. 4.1; Christiano et al. 2017, sec. 2.2.3).

    With margin m = r_A - r_B and target p = P(A preferred):

        loss = mean_B -[p log sigmoid(m) + (1 - p) log sigmoid(-m)] + centering * mean_B (r_A + r_B)^2

    the binary cross-entropy of the Bradley-Terry probability sigmoid(m) against p, computed with
    `log_sigmoid` so large margins do not overflow. Hard labels are p in {0, 1}; p = 1 gives the
    usual pairwise loss -log sigmoid(r_A - r_B). d loss / d m = sigmoid(m) - p, zero exactly when
    the model's probability equals the target. The optional centering term is the reward-centering
    regulariser of Eisenstein et al. 2023 ("Helping or Herding?", sec. 3): the BCE only sees
    differences, so it keeps the scores' free offset near 0 (they suggest a coefficient of 0.01).

    Accuracy counts a pair as right when sign(m) agrees with sign(p - 0.5), wrong when they
    disagree, and half when either is 0 (a tied score, or a p = 0.5 pair with no preferred side):
    per pair 0.5 * (1 + sign(m) * sign(p - 0.5)), which is the expected accuracy of breaking ties
    by a coin flip.

    Args:
      r_a_B: [B] PM scores of response A.
      r_b_B: [B] PM scores of response B.
      p_B: [B] targets in [0, 1], the probability that A is preferred.
      centering: coefficient of the centering term (0 disables it).
      mask_B: optional [B] mask of real pairs (for batches padded to a fixed size).

    Returns:
      (loss, metrics): scalar loss; metrics {"loss", "bce" (loss without centering), "accuracy",
      "margin" (mean r_A - r_B), "p_mean" (mean target)}.
    """
    r_a_B, r_b_B, p_B = as_f32(r_a_B), as_f32(r_b_B), as_f32(p_B)
    mask_B = jnp.ones_like(p_B) if mask_B is None else mask_B
    margin_B = r_a_B - r_b_B
    bce_B = -(p_B * jax.nn.log_sigmoid(margin_B) + (1.0 - p_B) * jax.nn.log_sigmoid(-margin_B))
    bce = masked_mean(bce_B, mask_B)
    loss = bce + centering * masked_mean(jnp.square(r_a_B + r_b_B), mask_B)
    sg = jax.lax.stop_gradient
    acc_B = 0.5 * (1.0 + jnp.sign(sg(margin_B)) * jnp.sign(p_B - 0.5))
    metrics = {
        "loss": loss,
        "bce": bce,
        "accuracy": masked_mean(acc_B, mask_B),
        "margin": masked_mean(sg(margin_B), mask_B),
        "p_mean": masked_mean(p_B, mask_B),
    }
    return loss, metrics
