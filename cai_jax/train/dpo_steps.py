"""DPO / IPO's pure pieces: the config, the pair encoding and batcher, sequence log-probs, the step.

`cai_jax/train/dpo.py` wires them to the fit loop and describes the method (Rafailov et al. 2023;
Mitchell 2023; Azar et al. 2023).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax.rl_losses import ipo_loss, preference_log_ratio, soft_dpo_loss
from cai_jax.scoring import token_logprobs
from cai_jax.text import encode_exchange, fit_exchange
from cai_jax.train.loop import EpochBatcher
from cai_jax.train.state import Optimizer, TrainState, strict_fields
from cai_jax.train.steps import _apply

__all__ = [
    "DPOConfig",
    "tokenize_dpo_pair",
    "DPOBatcher",
    "sequence_logprobs",
    "reference_logprobs",
    "dpo_loss_fn",
    "dpo_step",
]

LOSSES = {"dpo": soft_dpo_loss, "ipo": ipo_loss}
SIDES = ("a", "b")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """The preference-optimisation objective (a config section, converted by `from_config`).

    No defaults here: a run's values live in its config file. Frozen and hashable: a static
    argument of the jitted step.
    """

    loss: str  # "dpo" (`rl_losses.soft_dpo_loss`) | "ipo" (`rl_losses.ipo_loss`)
    beta: float  # KL-regularisation strength: implied reward = beta * log(pi / ref), per nat

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"DPOConfig.loss={self.loss!r}; expected one of {tuple(LOSSES)}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"DPOConfig.beta={self.beta} must be a finite number > 0")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any) -> DPOConfig:
        """From a ConfigDict or dict. Raises ValueError naming every unknown and missing field."""
        return cls(**strict_fields(cls, cfg, "dpo"))


# ---------------------------------------------------------------- data


def tokenize_dpo_pair(tokenizer: Any, row: Mapping[str, Any], *, seq_len: int, rendering: str) -> tuple[dict, int]:
    """Token ids and response masks of both sides of a validated comparison.

    Each side is `text.encode_exchange(prompt, response)` (head + tail, the tail the loss mask, as
    an SFT example), cut to `seq_len` from the left by `text.fit_exchange` (the PM's cut).

    Returns:
      ({"input_ids_a", "loss_mask_a", "input_ids_b", "loss_mask_b", "p_a"}, worst cut of the two
      sides: 0 none, 1 prompt tokens, 2 response tokens).
    """
    out, cuts = {"p_a": float(row["p_a"])}, 0
    for side in SIDES:
        head, tail = encode_exchange(tokenizer, row["prompt"], row[f"response_{side}"], rendering)
        ids, cut = fit_exchange(head, tail, seq_len)
        response = min(len(tail), len(ids))
        out[f"input_ids_{side}"], out[f"loss_mask_{side}"] = ids, [0] * (len(ids) - response) + [1] * response
        cuts = max(cuts, cut)
    return out, cuts


class DPOBatcher(EpochBatcher):
    """Fixed-shape batches of `tokenize_dpo_pair` outputs with a resumable position (`EpochBatcher`).

    Epoch order, dropped remainder and the (epoch, index) position are those of `PMBatcher`.
    Batches: "tokens_a", "mask_a", "loss_mask_a", "tokens_b", "mask_b", "loss_mask_b" int32
    [B, L] (right-padded with `pad_id`), "p" float32 [B].
    """

    def __init__(self, pairs: Sequence[Mapping], *, batch_size: int, seq_len: int, seed: int, pad_id: int):
        if batch_size < 1 or seq_len < 2:
            raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size} and {seq_len}")
        if len(pairs) < batch_size:
            raise ValueError(f"{len(pairs)} comparisons cannot fill one batch of {batch_size}")
        self.batch_size, self.seq_len, self.seed = int(batch_size), int(seq_len), int(seed)
        n = len(pairs)
        self.arrays = {"p": np.array([float(pair["p_a"]) for pair in pairs], np.float32)}
        for side in SIDES:
            tokens = np.full((n, seq_len), pad_id, np.int32)
            mask, loss_mask = np.zeros((2, n, seq_len), np.int32)
            for i, pair in enumerate(pairs):
                ids, lm = pair[f"input_ids_{side}"], pair[f"loss_mask_{side}"]
                if not 0 < len(ids) <= seq_len or len(lm) != len(ids):
                    raise ValueError(
                        f"DPO pair {i} side {side}: {len(ids)} ids, {len(lm)} mask entries, seq_len {seq_len}"
                    )
                tokens[i, : len(ids)], mask[i, : len(ids)], loss_mask[i, : len(ids)] = ids, 1, lm
            self.arrays.update({f"tokens_{side}": tokens, f"mask_{side}": mask, f"loss_mask_{side}": loss_mask})
        self.epoch, self.index = 0, 0

    def __len__(self) -> int:
        return self.arrays["p"].shape[0]

    def _epoch_len(self, epoch: int) -> int:
        return len(self)

    def next(self) -> tuple[dict[str, np.ndarray], str]:
        """The next global batch (host numpy) and its id "epoch E index I"; advances the position."""
        rows, batch_id = self._next_items(len(self))
        return {k: v[rows] for k, v in self.arrays.items()}, batch_id


# ---------------------------------------------------------------- the step


def sequence_logprobs(params, tokens_BL, mask_BL, loss_mask_BL, *, model) -> jax.Array:
    """log pi(response | prompt) per row [B]: teacher-forced log-probs summed over response tokens, fp32."""
    logits_BLV = model.apply({"params": params}, tokens_BL, mask_BL.astype(bool))
    logp_BL = token_logprobs(logits_BLV[:, :-1], tokens_BL[:, 1:])
    keep_BL = (loss_mask_BL[:, 1:] != 0) & (mask_BL[:, 1:] != 0)
    return jnp.sum(jnp.where(keep_BL, logp_BL, 0.0), axis=1)


def _pair_logprobs(params, batch: Mapping, *, model) -> tuple[jax.Array, jax.Array]:
    """(log pi(a) [B], log pi(b) [B]) in one forward of 2B rows."""
    b = batch["tokens_a"].shape[0]
    cat = {k: jnp.concatenate([batch[f"{k}_a"], batch[f"{k}_b"]]) for k in ("tokens", "mask", "loss_mask")}
    logp_2B = sequence_logprobs(params, cat["tokens"], cat["mask"], cat["loss_mask"], model=model)
    return logp_2B[:b], logp_2B[b:]


def reference_logprobs(params, batch: Mapping, *, model) -> dict[str, jax.Array]:
    logp_a_B, logp_b_B = _pair_logprobs(params, batch, model=model)
    return {"ref_logp_a": logp_a_B, "ref_logp_b": logp_b_B}


def dpo_loss_fn(params, batch: Mapping, *, model, cfg: DPOConfig) -> tuple[jax.Array, dict]:
    """Mean DPO / IPO loss of a batch and its diagnostics.

    Args:
      params: the policy's params.
      batch: `DPOBatcher`'s fields plus "ref_logp_a", "ref_logp_b" [B] (the reference's
        `sequence_logprobs`).
      model: the policy `Transformer`.
      cfg: the objective.

    Returns:
      (loss, metrics): means over pairs of "loss", "accuracy", "log_ratio" (d), "margin" (implied
      reward of the chosen side minus the rejected one's; chosen = A where p_a >= 1/2),
      "rewards/chosen", "rewards/rejected" (beta * log(pi / ref) of each side).
    """
    logp_a_B, logp_b_B = _pair_logprobs(params, batch, model=model)
    ref_a_B, ref_b_B = jax.lax.stop_gradient(batch["ref_logp_a"]), jax.lax.stop_gradient(batch["ref_logp_b"])
    d_B = preference_log_ratio(logp_a_B, logp_b_B, ref_a_B, ref_b_B)
    loss_B, stats = LOSSES[cfg.loss](d_B, batch["p"], cfg.beta)
    sg = jax.lax.stop_gradient
    reward_a_B, reward_b_B = cfg.beta * sg(logp_a_B - ref_a_B), cfg.beta * sg(logp_b_B - ref_b_B)
    a_chosen_B = batch["p"] >= 0.5
    chosen_B = jnp.where(a_chosen_B, reward_a_B, reward_b_B)
    rejected_B = jnp.where(a_chosen_B, reward_b_B, reward_a_B)
    loss = jnp.mean(loss_B)
    metrics = {
        "loss": sg(loss),
        "accuracy": jnp.mean(stats["accuracy"]),
        "log_ratio": jnp.mean(sg(d_B)),
        "margin": jnp.mean(chosen_B - rejected_B),
        "rewards/chosen": jnp.mean(chosen_B),
        "rewards/rejected": jnp.mean(rejected_B),
    }
    return loss, metrics


def dpo_step(
    state: TrainState, batch: Mapping, *, model, optimizer: Optimizer, cfg: DPOConfig
) -> tuple[TrainState, dict]:
    """One DPO / IPO update: `dpo_loss_fn`'s metrics (params before the update) plus grad_norm, lr, param_norm."""
    grad_fn = jax.value_and_grad(functools.partial(dpo_loss_fn, batch=batch, model=model, cfg=cfg), has_aux=True)
    (_, metrics), grads = grad_fn(state.params)
    state, opt_metrics = _apply(state, grads, optimizer)
    return state, {**metrics, **opt_metrics}


# ---------------------------------------------------------------- the source
