"""RLOO's pure steps: its config, the teacher-forced forwards, the sequence rewards and the update.

`cai_jax/train/rloo.py` wires them to the rollout source and the fit loop; the method is described
there (Ahmadian et al. 2024; Kool et al. 2019). Shape letters: B rows (= prompts x k), P prompts,
K samples per prompt, L = prompt + N response tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cai_jax.rl_losses import entropy_from_logits, ppo_rewards, rloo_advantages
from cai_jax.scoring import token_logprobs
from cai_jax.train.ppo_steps import KL_ESTIMATORS
from cai_jax.train.rl_lora import policy_params, reference_params
from cai_jax.train.state import Optimizer, TrainState, strict_fields
from cai_jax.train.steps import _apply, accumulated_grads

__all__ = ["RLOOConfig", "rloo_forward", "rloo_rewards", "rloo_update"]


@dataclasses.dataclass(frozen=True)
class RLOOConfig:
    """RLOO hyper-parameters (a config section, converted by `from_config`).

    No defaults: a run's values live in the config file, and `from_config` requires every field.
    Frozen and hashable: it is a static argument of the jitted steps.
    """

    rollout_batch_size: int  # prompts sampled per iteration
    k: int  # responses sampled per prompt (>= 2: each one's baseline is the mean of the others)
    minibatch_size: int  # responses per optimizer update; divides rollout_batch_size * k
    micro_batch_size: int  # rows per forward/backward pass (gradients accumulated up to minibatch_size)
    epochs: int  # passes over each rollout, reshuffled each time (1 with a full minibatch: on-policy)
    max_new_tokens: int  # N: response length cap, tokens
    temperature: float  # sampling temperature (> 0); the trained policy is softmax(logits / temperature)
    generation_batch_size: int  # rows per sampler call, a multiple of k (0: the whole rollout at once)
    kl_coef: float  # beta: KL penalty coefficient, reward units per nat
    kl_estimator: str  # per-token KL estimator in the reward: "k1" (log-ratio), "k3" (or "k2")
    missing_eos_penalty: float  # subtracted from the normalised score of responses without EOS; 0 disables
    pm_retokenize: bool  # PM vocabulary differs from the policy's: re-encode the text (False: raise)
    sample_every: int  # iterations between sample dumps to <workdir>/samples.jsonl; 0 disables
    num_samples_logged: int  # (prompt, response, score) rows per dump (the first prompts' k samples)

    def __post_init__(self):
        positive = ("rollout_batch_size", "minibatch_size", "micro_batch_size", "epochs", "max_new_tokens")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"RLOOConfig.{name}={getattr(self, name)} must be >= 1")
        if self.k < 2:
            raise ValueError(f"RLOOConfig.k={self.k} must be >= 2 (the leave-one-out baseline needs another sample)")
        if self.rows % self.minibatch_size or self.minibatch_size % self.micro_batch_size:
            raise ValueError(
                f"RLOOConfig: minibatch_size={self.minibatch_size} must divide rollout_batch_size * k = {self.rows} "
                f"and micro_batch_size={self.micro_batch_size} must divide minibatch_size"
            )
        if self.temperature <= 0:
            raise ValueError(f"RLOOConfig.temperature={self.temperature} must be > 0 (RLOO needs a stochastic policy)")
        if self.generation_batch_size < 0 or self.generation_batch_size % self.k:
            raise ValueError(
                f"RLOOConfig.generation_batch_size={self.generation_batch_size} must be 0 or a multiple of "
                f"k={self.k} (a prompt's samples share one prefill only within a sampler call)"
            )
        if self.sample_every < 0 or self.num_samples_logged < 0:
            raise ValueError("RLOOConfig.sample_every and num_samples_logged must be >= 0")
        if self.kl_coef < 0 or self.missing_eos_penalty < 0:
            raise ValueError("RLOOConfig.kl_coef and missing_eos_penalty must be >= 0")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"RLOOConfig.kl_estimator={self.kl_estimator!r}; expected one of {KL_ESTIMATORS}")

    @property
    def rows(self) -> int:
        """Responses per iteration: rollout_batch_size prompts x k samples."""
        return self.rollout_batch_size * self.k

    @property
    def updates_per_iteration(self) -> int:
        """Optimizer updates of one iteration: epochs passes of rows / minibatch updates."""
        return self.epochs * (self.rows // self.minibatch_size)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any) -> RLOOConfig:
        """Builds the config from a ConfigDict or a plain dict; a ValueError names unknown and missing fields."""
        return cls(**strict_fields(cls, cfg, "rloo"))


# ---------------------------------------------------------------- pure steps


def _response_logits_logp(params, tokens_BL, mask_BL, *, model: nn.Module, n: int, temperature: float):
    """Logits [B, N, V] (at the temperature) and log-probs [B, N] of the N response tokens, float32."""
    p = tokens_BL.shape[1] - n
    logits_BNV = model.apply({"params": params}, tokens_BL, mask_BL)[:, p - 1 : p - 1 + n]
    logits_BNV = logits_BNV.astype(jnp.float32) / temperature
    return logits_BNV, token_logprobs(logits_BNV, tokens_BL[:, p:])


def rloo_forward(
    params, ref_params, tokens_BL, mask_BL, resp_mask_BN, *, policy_model, ref_model, cfg: RLOOConfig, lora=None
):
    """Teacher-forced log-probs of a rollout chunk under the rollout policy and the reference (under
    LoRA, `lora` set, `ref_params` is None and the reference is the policy's frozen base).

    Returns:
      {"logp", "ref_logp"} [B, N] (0 at padding), "entropy_sum" (summed over response tokens, nats)
      and "tokens" (response tokens).
    """
    n, t = cfg.max_new_tokens, cfg.temperature
    logits_BNV, logp_BN = _response_logits_logp(
        policy_params(params["policy"], lora), tokens_BL, mask_BL, model=policy_model, n=n, temperature=t
    )
    ref = reference_params(params, ref_params, lora)
    _, ref_logp_BN = _response_logits_logp(ref, tokens_BL, mask_BL, model=ref_model, n=n, temperature=t)
    keep_BN = resp_mask_BN.astype(bool)
    count = jnp.sum(resp_mask_BN.astype(jnp.float32))
    return {
        "logp": jnp.where(keep_BN, logp_BN, 0.0),
        "ref_logp": jnp.where(keep_BN, ref_logp_BN, 0.0),
        "entropy_sum": entropy_from_logits(logits_BNV, resp_mask_BN) * count,
        "tokens": count,
    }


def rloo_rewards(
    score_B, logp_BN, ref_logp_BN, resp_mask_BN, ended_B, beta, score_mean, score_std, *, cfg: RLOOConfig
) -> dict[str, jax.Array]:
    """Sequence rewards and leave-one-out advantages of a rollout whose rows are P prompts x k samples.

    R_i = sum_t of `rl_losses.ppo_rewards` = (score - mean) / std - missing-EOS penalty - beta sum_t KL_t;
    A = `rloo_advantages` of R grouped [P, k]. `beta` is an array (no recompile when it changes).

    Returns:
      {"reward", "kl_sum", "advantages"} [B], float32.
    """
    rewards_BN, kl_BN = ppo_rewards(
        score_B, logp_BN, ref_logp_BN, resp_mask_BN, beta=beta, kl_kind=cfg.kl_estimator, score_mean=score_mean,
        score_std=score_std, ended_B=ended_B, missing_eos_penalty=cfg.missing_eos_penalty,
    )  # fmt: skip
    reward_B = jnp.sum(rewards_BN, axis=1)
    adv_B = rloo_advantages(reward_B.reshape(-1, cfg.k)).reshape(-1)
    return {"reward": reward_B, "kl_sum": jnp.sum(kl_BN, axis=1), "advantages": adv_B}


def rloo_update(
    state: TrainState, minibatch: dict, *, policy_model, optimizer: Optimizer, cfg: RLOOConfig, lora=None
) -> tuple[TrainState, dict]:
    """One optimizer update on -mean_i A_i sum_t log pi(y_i,t), accumulated over micro-batches.

    Args:
      state: params {"policy"}.
      minibatch: "tokens", "mask" [K, B/K, L]; "resp_mask", "old_logp" [K, B/K, N]; "advantages" [K, B/K].

    Returns:
      (new state, metrics {"loss", "loss/policy", "policy/approxkl", "grad_norm", "lr", "param_norm"}),
      the losses of the params before the update.
    """
    rows = minibatch["advantages"].size
    total_tokens = jnp.sum(minibatch["resp_mask"].astype(jnp.float32))

    def loss_fn(params, mb):
        _, logp_BN = _response_logits_logp(
            policy_params(params["policy"], lora), mb["tokens"], mb["mask"], model=policy_model, n=cfg.max_new_tokens,
            temperature=cfg.temperature,
        )  # fmt: skip
        keep_BN = mb["resp_mask"].astype(bool)
        logp_B = jnp.sum(jnp.where(keep_BN, logp_BN, 0.0), axis=1)
        loss = -jnp.sum(jax.lax.stop_gradient(mb["advantages"]) * logp_B) / rows  # this micro-batch's share
        diff_BN = jnp.where(keep_BN, jax.lax.stop_gradient(logp_BN) - mb["old_logp"], 0.0)
        approxkl = 0.5 * jnp.sum(jnp.square(diff_BN)) / total_tokens
        sg = jax.lax.stop_gradient(loss)
        return loss, {"loss": sg, "loss/policy": sg, "policy/approxkl": approxkl}

    grads, metrics = accumulated_grads(loss_fn, state.params, minibatch, optimizer.trainable)
    state, opt_metrics = _apply(state, grads, optimizer)
    return state, {**metrics, **opt_metrics}
