"""Teacher-forced scoring: log-probs of given continuations after given prefixes.

The feedback labeller reads log P(" (A)" | question) and log P(" (B)" | question); PPO needs the
per-token log-probs of sampled responses under the policy and the reference. Everything here is
batched, padded to bucketed shapes (so repeated calls rarely recompile) and jitted once per shape.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax.nn.config import ModelConfig
from cai_jax.nn.llama import Transformer
from cai_jax.text import bucket_length, pad_batch_size


def token_logprobs(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
    """log softmax(logits)[target] per position [B, L], in float32."""
    logits = logits_BLV.astype(jnp.float32)
    lse_BL = jax.nn.logsumexp(logits, axis=-1)
    picked_BL = jnp.take_along_axis(logits, targets_BL[..., None], axis=-1)[..., 0]
    return picked_BL - lse_BL


@functools.partial(jax.jit, static_argnames=("cfg",))
def sequence_token_logprobs(params, tokens_BL, mask_BL, *, cfg: ModelConfig) -> jax.Array:
    """log P(token_t | tokens_<t) for t = 1..L-1, shape [B, L-1] (0 where token t is padding).

    Works for left- or right-padded rows: positions count real tokens only.
    """
    logits_BLV = Transformer(cfg).apply({"params": params}, tokens_BL, mask_BL)
    logp_BL = token_logprobs(logits_BLV[:, :-1], tokens_BL[:, 1:])
    return jnp.where(mask_BL[:, 1:] & mask_BL[:, :-1], logp_BL, 0.0)


@dataclasses.dataclass
class ContinuationScores:
    """Per-pair results of `score_continuations`, in input order."""

    token_logprobs: list[np.ndarray]  # float32 [len(continuation_i)]
    total: np.ndarray  # float32 [N]: sum of token log-probs
    mean: np.ndarray  # float32 [N]: total / continuation length


def score_continuations(
    lm: Any,
    prefixes: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    params: Any = None,
    batch_size: int = 16,
    min_bucket: int = 16,
) -> ContinuationScores:
    """log P(continuation | prefix) token by token, for N (prefix, continuation) pairs.

    Args:
      lm: a `LoadedModel` (anything with .config and .params).
      prefixes: N token-id lists (non-empty).
      continuations: N token-id lists (non-empty), scored after their prefix.
      params: parameters to use instead of `lm.params`.
      batch_size: rows per device call.

    Returns:
      ContinuationScores with per-token log-probs, their sums and means.
    """
    if len(prefixes) != len(continuations):
        raise ValueError(f"score_continuations: {len(prefixes)} prefixes but {len(continuations)} continuations")
    if not prefixes:
        raise ValueError("score_continuations: no pairs to score")
    cfg: ModelConfig = lm.config
    params = lm.params if params is None else params
    rows = []
    for i, (pre, cont) in enumerate(zip(prefixes, continuations)):
        pre, cont = list(map(int, pre)), list(map(int, cont))
        if not pre or not cont:
            raise ValueError(f"score_continuations: pair {i} has an empty {'prefix' if not pre else 'continuation'}")
        if len(pre) + len(cont) > cfg.max_position_embeddings:
            raise ValueError(
                f"score_continuations: pair {i} has {len(pre) + len(cont)} tokens, more than the model's "
                f"context of {cfg.max_position_embeddings}"
            )
        rows.append((pre, cont))
    pad = cfg.pad_token_id or 0
    out: list[np.ndarray] = [None] * len(rows)  # type: ignore[list-item]
    # Similar lengths together: less padding per batch.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs = [rows[i][0] + rows[i][1] for i in idx]
        length = min(bucket_length(max(map(len, seqs)), min_bucket), cfg.max_position_embeddings)
        b = pad_batch_size(len(seqs))
        tokens = np.full((b, length), pad, np.int32)
        mask = np.zeros((b, length), bool)
        for r, seq in enumerate(seqs):
            tokens[r, : len(seq)] = seq
            mask[r, : len(seq)] = True
        logp = np.asarray(sequence_token_logprobs(params, tokens, mask, cfg=cfg))
        for r, i in enumerate(idx):
            pre, cont = rows[i]
            # logp[:, t] scores token t + 1, so the continuation is logp[len(pre) - 1 : len(seq) - 1].
            out[i] = logp[r, len(pre) - 1 : len(pre) + len(cont) - 1].astype(np.float32)
    total = np.array([x.sum() for x in out], np.float32)
    mean = np.array([x.mean() for x in out], np.float32)
    return ContinuationScores(out, total, mean)


def option_logprobs(
    lm: Any, prefixes: Sequence[Sequence[int]], options: Sequence[Sequence[Sequence[int]]], **kwargs
) -> np.ndarray:
    """Multiple choice: total log-prob of each option after its question, shape [N, num_options].

    `options[i]` lists the token ids of every option of question i (e.g. " (A)" and " (B)");
    all questions must have the same number of options.
    """
    n_opt = {len(o) for o in options}
    if len(n_opt) != 1:
        raise ValueError(f"option_logprobs: questions have different numbers of options {sorted(n_opt)}")
    (k,) = n_opt
    flat_pre = [pre for pre, opts in zip(prefixes, options) for _ in opts]
    flat_opt = [opt for opts in options for opt in opts]
    scores = score_continuations(lm, flat_pre, flat_opt, **kwargs)
    return scores.total.reshape(len(prefixes), k)
