"""Scalar heads: one number per sequence (preference-model score, value), read at the last real token."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cai_jax.nn.config import ModelConfig
from cai_jax.nn.llama import Transformer


def last_token_index(mask_BL: jax.Array) -> jax.Array:
    """Index of the last non-pad token of each row [B] (works for left and right padding)."""
    l = mask_BL.shape[1]
    idx_BL = jnp.where(mask_BL.astype(bool), jnp.arange(l)[None, :], -1)
    return jnp.maximum(jnp.max(idx_BL, axis=1), 0)


class ScalarModel(nn.Module):
    """Backbone + linear head -> float32 scores.

    Params: {"backbone": <Transformer params>, "head": {"kernel": [E, 1], "bias": [1]}}, so a
    language model's params drop in as the backbone. `per_token=True` returns a score for every
    position [B, L] (the PPO value function); otherwise one score per sequence [B], read at the
    last non-pad token.
    """

    cfg: ModelConfig

    def setup(self):
        self.backbone = Transformer(self.cfg)
        self.head = nn.Dense(
            1,
            dtype=jnp.float32,
            param_dtype=self.cfg.jnp_param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(1e-3), ("embed", "score")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("score",)),
        )

    def __call__(self, tokens_BL, mask_BL=None, positions_BL=None, segment_ids_BL=None, per_token=False):
        h_BLE = self.backbone(tokens_BL, mask_BL, positions_BL, segment_ids_BL, return_hidden=True)
        scores_BL = self.head(h_BLE.astype(jnp.float32))[..., 0]
        if per_token:
            return scores_BL
        if mask_BL is None:
            mask_BL = jnp.ones(tokens_BL.shape, bool)
        idx_B = last_token_index(mask_BL)
        return jnp.take_along_axis(scores_BL, idx_B[:, None], axis=1)[:, 0]
