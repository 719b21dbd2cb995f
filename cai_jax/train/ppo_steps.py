"""RL-CAI (Bai et al. 2022, sec. 4) PPO: the config and the pure, jit-able pieces of one iteration.

    fwd = rollout_forward(params, ref_params, batch, ...)      # teacher-forced logp, ref logp, values
    adv = compute_advantages(score_B, fwd..., beta, cfg=...)   # rewards, KL, GAE, whitening
    state, metrics = ppo_update(state, minibatch, ...)         # one optimizer update (scan over micro-batches)

Sequence layout shared by all of them: a row is the prompt left-padded to P tokens followed by the
response right-padded to N tokens, `tokens_BL` with L = P + N, `mask_BL` 1 on real tokens.
Positions count real tokens only (the model derives them from the mask), as in the sampler, so
the logits at column P - 1 + t predict response token t and the value read there is V(s_t), the
value of the state before token t is emitted. The policy being trained is softmax(logits /
temperature), the distribution the sampler draws from (no top-k / top-p), so sampler log-probs and
teacher-forced ones agree up to float error.

Params of the train state: {"policy": Transformer params, "value": ScalarModel params
{"backbone", "head"}} or, with a shared backbone, {"policy": ..., "value": {"head"}} (the value
head reads the policy's final hidden states). One optimizer updates both with the summed loss
policy + vf_coef * value - ent_coef * entropy (the PPO paper's eq. 9 objective).

Shape letters: B batch (episodes), L = P + N sequence, N response tokens, V vocabulary, K micro-batches.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cai_jax.rl_losses import entropy_from_logits, gae, ppo_policy_loss, ppo_rewards, ppo_value_loss, whiten
from cai_jax.scoring import token_logprobs
from cai_jax.train.rl_lora import policy_params, reference_params, value_params
from cai_jax.train.state import Optimizer, TrainState, strict_fields
from cai_jax.train.steps import _apply, accumulated_grads

__all__ = ["PPOConfig", "policy_value_forward", "rollout_forward", "compute_advantages", "ppo_loss", "ppo_update"]

VALUE_INITS = ("pm", "policy")
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO hyper-parameters (a config's `ppo` sub-dict, converted by `from_config`).

    No defaults here: a run's defaults live in the config file (`configs/base.py`, section
    `ppo`), and `from_config` requires every field. Frozen and hashable: it is a static argument
    of the jitted steps.
    """

    rollout_batch_size: int  # prompts (= episodes, one response each) sampled per PPO iteration
    minibatch_size: int  # episodes per optimizer update; divides rollout_batch_size
    micro_batch_size: int  # rows per forward/backward pass (gradients accumulated up to minibatch_size)
    ppo_epochs: int  # passes over each rollout batch, reshuffled each time
    max_new_tokens: int  # N: response length cap, tokens
    temperature: float  # sampling temperature (> 0); the trained policy is softmax(logits / temperature)
    generation_batch_size: int  # rows per sampler call (0: the whole rollout batch at once)
    gamma: float  # GAE discount per token
    lam: float  # GAE lambda
    clip_ratio: float  # PPO epsilon: probability ratios are clipped to [1 - eps, 1 + eps]
    clip_value: float  # largest move of a value from its rollout value before clipping, reward units
    vf_coef: float  # weight of the value loss in the total loss
    ent_coef: float  # weight of the entropy bonus (nats/token) subtracted from the loss; 0 disables
    kl_coef: float  # beta: initial KL penalty coefficient, reward units per nat
    kl_estimator: str  # per-token KL estimator in the reward: "k1" (log-ratio), "k3" (or "k2")
    adaptive_kl: bool  # adapt beta towards kl_target (Ziegler et al. 2019, sec. 2.2)
    kl_target: float  # adaptive controller's target, nats per response (sum over its tokens)
    kl_horizon: int  # adaptive controller's horizon, episodes
    missing_eos_penalty: float  # subtracted from the normalised score of responses without EOS; 0 disables
    whiten_advantages: bool  # whiten advantages over each rollout batch's response tokens
    value_init: str  # value model starts from the "pm" (backbone + head) or the "policy" (fresh head)
    shared_backbone: bool  # value head on the policy's backbone (value_init must be "policy")
    pm_retokenize: bool  # PM vocabulary differs from the policy's: re-encode the text (False: raise)
    sample_every: int  # iterations between sample dumps to <workdir>/samples.jsonl; 0 disables
    num_samples_logged: int  # (prompt, response, score) rows per dump

    def __post_init__(self):
        positive = ("rollout_batch_size", "minibatch_size", "micro_batch_size", "ppo_epochs", "max_new_tokens")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PPOConfig.{name}={getattr(self, name)} must be >= 1")
        if self.rollout_batch_size % self.minibatch_size:
            raise ValueError(
                f"PPOConfig.minibatch_size={self.minibatch_size} must divide rollout_batch_size={self.rollout_batch_size}"
            )
        if self.minibatch_size % self.micro_batch_size:
            raise ValueError(
                f"PPOConfig.micro_batch_size={self.micro_batch_size} must divide minibatch_size={self.minibatch_size}"
            )
        if self.temperature <= 0:
            raise ValueError(f"PPOConfig.temperature={self.temperature} must be > 0 (PPO needs a stochastic policy)")
        if self.generation_batch_size < 0 or self.sample_every < 0 or self.num_samples_logged < 0:
            raise ValueError("PPOConfig.generation_batch_size, sample_every and num_samples_logged must be >= 0")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ValueError(f"PPOConfig.gamma={self.gamma} and lam={self.lam} must be in [0, 1]")
        if self.clip_ratio <= 0 or self.clip_value <= 0:
            raise ValueError(f"PPOConfig.clip_ratio={self.clip_ratio} and clip_value={self.clip_value} must be > 0")
        if self.kl_coef < 0 or self.missing_eos_penalty < 0:
            raise ValueError("PPOConfig.kl_coef and missing_eos_penalty must be >= 0")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"PPOConfig.kl_estimator={self.kl_estimator!r}; expected one of {KL_ESTIMATORS}")
        if self.adaptive_kl and (self.kl_target <= 0 or self.kl_horizon < 1):
            raise ValueError("PPOConfig.adaptive_kl needs kl_target > 0 and kl_horizon >= 1")
        if self.value_init not in VALUE_INITS:
            raise ValueError(f"PPOConfig.value_init={self.value_init!r}; expected one of {VALUE_INITS}")
        if self.shared_backbone and self.value_init != "policy":
            raise ValueError(
                "PPOConfig.shared_backbone=True puts a fresh value head on the policy's backbone; set "
                "value_init='policy' (a PM head read on another backbone's features would be meaningless)"
            )

    @property
    def updates_per_iteration(self) -> int:
        """Optimizer updates of one iteration: ppo_epochs passes of rollout_batch / minibatch updates."""
        return self.ppo_epochs * (self.rollout_batch_size // self.minibatch_size)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any) -> PPOConfig:
        """Builds the config from an `ml_collections.ConfigDict` or a plain dict.

        Raises:
          ValueError: naming every unknown field (a typo) and every missing one.
        """
        return cls(**strict_fields(cls, cfg, "ppo"))


def _head(head_params, h_BLE: jax.Array) -> jax.Array:
    """The ScalarModel head (a float32 Dense to one unit) on hidden states: [B, L]."""
    kernel = jnp.asarray(head_params["kernel"], jnp.float32)
    return (h_BLE.astype(jnp.float32) @ kernel)[..., 0] + jnp.asarray(head_params["bias"], jnp.float32)[0]


def policy_value_forward(
    params, tokens_BL, mask_BL, *, policy_model: nn.Module, value_model: nn.Module | None, cfg: PPOConfig, lora=None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Response logits, log-probs and values of a batch.

    Args:
      params: {"policy", "value"} (see the module docstring).
      tokens_BL, mask_BL: rows laid out as prompt (P) + response (N).
      policy_model: the policy `Transformer`.
      value_model: the value `ScalarModel`, or None for a shared backbone.
      cfg: the PPO config (N and the temperature).
      lora: the `nn.lora.LoRAConfig` of a LoRA state (`train.rl_lora`), else None.

    Returns:
      (logits_BNV at the sampling temperature, logp_BN of the response tokens, values_BN), float32.
    """
    n = cfg.max_new_tokens
    p = tokens_BL.shape[1] - n
    variables = {"params": policy_params(params["policy"], lora)}
    if value_model is None:
        h_BLE = policy_model.apply(variables, tokens_BL, mask_BL, return_hidden=True)
        logits_BLV = policy_model.apply(variables, h_BLE[:, p - 1 : p - 1 + n], method="logits")
        values_BN = _head(params["value"]["head"], h_BLE[:, p - 1 : p - 1 + n])  # head only, never LoRA
    else:
        logits_BLV = policy_model.apply(variables, tokens_BL, mask_BL)[:, p - 1 : p - 1 + n]
        values_BL = value_model.apply({"params": value_params(params, lora)}, tokens_BL, mask_BL, per_token=True)
        values_BN = values_BL[:, p - 1 : p - 1 + n]
    logits_BNV = logits_BLV.astype(jnp.float32) / cfg.temperature
    return logits_BNV, token_logprobs(logits_BNV, tokens_BL[:, p:]), values_BN


def rollout_forward(
    params,
    ref_params,
    tokens_BL,
    mask_BL,
    resp_mask_BN,
    *,
    policy_model,
    value_model,
    ref_model,
    cfg: PPOConfig,
    lora=None,
) -> dict[str, jax.Array]:
    """Teacher-forced quantities of a rollout chunk under the rollout policy and the reference.

    Under LoRA (`lora` set) `ref_params` is None: the reference is the policy's frozen base.

    Returns:
      {"logp" [B, N] (policy, the PPO "old" log-probs), "ref_logp" [B, N] (reference, same
      temperature), "values" [B, N], "entropy_sum" (sum over response tokens of the policy's
      entropy, nats), "tokens" (response tokens)}; 0 at padding.
    """
    logits_BNV, logp_BN, values_BN = policy_value_forward(
        params, tokens_BL, mask_BL, policy_model=policy_model, value_model=value_model, cfg=cfg, lora=lora
    )
    n = cfg.max_new_tokens
    p = tokens_BL.shape[1] - n
    ref_variables = {"params": reference_params(params, ref_params, lora)}
    ref_logits_BNV = ref_model.apply(ref_variables, tokens_BL, mask_BL)[:, p - 1 : p - 1 + n]
    ref_logp_BN = token_logprobs(ref_logits_BNV.astype(jnp.float32) / cfg.temperature, tokens_BL[:, p:])
    keep_BN = resp_mask_BN.astype(bool)
    count = jnp.sum(resp_mask_BN.astype(jnp.float32))
    return {
        "logp": jnp.where(keep_BN, logp_BN, 0.0),
        "ref_logp": jnp.where(keep_BN, ref_logp_BN, 0.0),
        "values": jnp.where(keep_BN, values_BN, 0.0),
        "entropy_sum": entropy_from_logits(logits_BNV, resp_mask_BN) * count,
        "tokens": count,
    }


def compute_advantages(
    score_B,
    logp_BN,
    ref_logp_BN,
    values_BN,
    resp_mask_BN,
    ended_B,
    beta,
    score_mean=0.0,
    score_std=1.0,
    *,
    cfg: PPOConfig,
) -> dict[str, jax.Array]:
    """Per-token rewards (score at the last token - beta KL), GAE advantages and returns.

    R_t = -beta KL_t + [t last] ((score - mean) / std - missing-EOS penalty) (`rl_losses.ppo_rewards`,
    Ziegler et al. 2019, eq. 2), A_t by GAE (Schulman et al. 2016, eq. 16; `rl_losses.gae`) with the
    value after the last token 0, returns = A + V, then A whitened over the batch's response tokens.
    `score_mean` / `score_std` are the PM's saved reward statistics; `ended_B` is True where the
    response emitted EOS; `beta` is the KL coefficient (an array, so the adaptive controller does
    not recompile).

    Returns:
      {"rewards", "kl", "advantages", "returns"} [B, N] and per-episode {"score_norm", "kl_sum",
      "reward_sum"} [B], float32.
    """
    rewards_BN, kl_BN = ppo_rewards(
        score_B,
        logp_BN,
        ref_logp_BN,
        resp_mask_BN,
        beta=beta,
        kl_kind=cfg.kl_estimator,
        score_mean=score_mean,
        score_std=score_std,
        ended_B=ended_B,
        missing_eos_penalty=cfg.missing_eos_penalty,
    )
    adv_BN, returns_BN = gae(rewards_BN, values_BN, resp_mask_BN, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        adv_BN = whiten(adv_BN, resp_mask_BN)
    return {
        "rewards": rewards_BN,
        "kl": kl_BN,
        "advantages": adv_BN,
        "returns": returns_BN,
        "score_norm": (jnp.asarray(score_B, jnp.float32) - score_mean) / score_std,
        "kl_sum": jnp.sum(kl_BN, axis=1),
        "reward_sum": jnp.sum(rewards_BN, axis=1),
    }


def ppo_loss(
    params, mb: dict, total_tokens, *, policy_model, value_model, cfg: PPOConfig, lora=None
) -> tuple[jax.Array, dict]:
    """Clipped PPO loss of one micro-batch, scaled by its share of the minibatch's response tokens.

    Summing the result over the micro-batches of a minibatch gives exactly the token-mean loss of
    the whole minibatch (each micro-batch's masked mean times n_micro / n_minibatch).

    Args:
      params: {"policy", "value"}.
      mb: "tokens", "mask" [B, L]; "resp_mask", "old_logp", "old_values", "advantages",
        "returns" [B, N].
      total_tokens: response tokens in the whole minibatch.

    Returns:
      (scaled loss, scaled metrics {"loss", "loss/policy", "loss/value", "policy/approxkl",
      "policy/clipfrac", "val/clipfrac", "policy/entropy"}).
    """
    logits_BNV, logp_BN, values_BN = policy_value_forward(
        params, mb["tokens"], mb["mask"], policy_model=policy_model, value_model=value_model, cfg=cfg, lora=lora
    )
    resp_mask_BN = mb["resp_mask"]
    pg_loss, pg_metrics = ppo_policy_loss(logp_BN, mb["old_logp"], mb["advantages"], resp_mask_BN, cfg.clip_ratio)
    vf_loss, vf_metrics = ppo_value_loss(values_BN, mb["old_values"], mb["returns"], resp_mask_BN, cfg.clip_value)
    loss = pg_loss + cfg.vf_coef * vf_loss
    entropy = entropy_from_logits(logits_BNV, resp_mask_BN)
    if cfg.ent_coef:
        loss = loss - cfg.ent_coef * entropy
    share = jnp.sum(resp_mask_BN.astype(jnp.float32)) / total_tokens
    sg = jax.lax.stop_gradient
    metrics = {
        "loss": sg(loss),
        "loss/policy": sg(pg_loss),
        "loss/value": sg(vf_loss),
        "policy/approxkl": pg_metrics["approxkl"],
        "policy/clipfrac": pg_metrics["clipfrac"],
        "val/clipfrac": vf_metrics["clipfrac"],
        "policy/entropy": sg(entropy),
    }
    return loss * share, jax.tree.map(lambda x: x * share, metrics)


def ppo_update(
    state: TrainState, minibatch: dict, *, policy_model, value_model, optimizer: Optimizer, cfg: PPOConfig, lora=None
) -> tuple[TrainState, dict]:
    """One optimizer update on a minibatch, gradients accumulated over its micro-batches.

    Args:
      state: params {"policy", "value"}.
      minibatch: the `ppo_loss` fields with a leading micro-batch axis, [K, B/K, ...].

    Returns:
      (new state, metrics): the token-weighted means of `ppo_loss`'s metrics over the minibatch
      (params before the update), plus "grad_norm" (before clipping), "lr", "param_norm".
    """
    total_tokens = jnp.sum(minibatch["resp_mask"].astype(jnp.float32))
    loss_fn = functools.partial(
        ppo_loss, total_tokens=total_tokens, policy_model=policy_model, value_model=value_model, cfg=cfg, lora=lora
    )
    grads, metrics = accumulated_grads(loss_fn, state.params, minibatch, optimizer.trainable)
    state, opt_metrics = _apply(state, grads, optimizer)
    return state, {**metrics, **opt_metrics}
