"""Teacher-forced scoring: log-probs of given continuations after given prefixes.

The feedback labeller reads log P(" (A)" | question) and log P(" (B)" | question); PPO needs the
per-token log-probs of sampled responses under the policy and the reference. Everything here is
batched, padded to bucketed shapes (so repeated calls rarely recompile) and jitted once per shape.

Multiple-choice options share their question (`option_logprobs`). The question is prefilled once
into a KV cache, left-padded to a bucketed length P; then the K options of every question of the
batch are read in one pass, written side by side after the prefix (each right-padded to a
power-of-two length T, so cache slots P + k T + t hold option k's token t). An attention mask lets
option k's tokens see the prefix and option k's own earlier tokens only, and its positions restart
at the prefix length, so each option is scored exactly as if it followed the question alone.
Questions go shortest first in power-of-two batches (no filler rows), and a batch is halved while
that saves a fifth of its padded prefill, so few programs compile and little padding is run. A
two-option label then costs one prefill instead of two, the 9-way harm classification one instead
of nine; the full-prefix path (`shared_prefix=False`) is kept as the reference it is tested against.
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
from cai_jax.nn.llama import Transformer, init_cache, stack_layers
from cai_jax.text import bucket_length, pad_batch_size

__all__ = [
    "ContinuationScores",
    "option_logprobs",
    "score_continuations",
    "sequence_token_logprobs",
    "shared_prefix_token_logprobs",
    "token_logprobs",
]


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


def _check_context(cfg: ModelConfig, n: int, where: str) -> None:
    if n > cfg.max_position_embeddings:
        raise ValueError(f"{where} has {n} tokens, more than the model's context of {cfg.max_position_embeddings}")


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
        _check_context(cfg, len(pre) + len(cont), f"score_continuations: pair {i}")
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


@functools.partial(jax.jit, static_argnames=("cfg",))
def shared_prefix_token_logprobs(params, prefix_BP, prefix_mask_BP, options_BKT, options_mask_BKT, *, cfg: ModelConfig):
    """log P(option token | prefix, earlier tokens of the same option), shape [B, K, T] (module doc).

    Args:
      params: model parameters.
      prefix_BP: int32 question ids, left-padded (every row holds at least one real token).
      prefix_mask_BP: True at real prefix tokens.
      options_BKT: int32 ids of the K options of each question, right-padded to T.
      options_mask_BKT: True at real option tokens.
      cfg: the model config.

    Returns:
      float32 [B, K, T]: the log-prob of each option token, 0 at padding.
    """
    b, p = prefix_BP.shape
    _, k, t = options_BKT.shape
    n = k * t
    model = Transformer(cfg)
    params = stack_layers(params, cfg)  # once for both calls
    positions_BP = jnp.maximum(jnp.cumsum(prefix_mask_BP, axis=1) - 1, 0).astype(jnp.int32)
    n_real_B = jnp.sum(prefix_mask_BP, axis=1).astype(jnp.int32)
    # Every option restarts at the prefix length: option k token j sits at position n_real + j.
    positions_BN = n_real_B[:, None] + jnp.tile(jnp.arange(t, dtype=jnp.int32), k)[None, :]
    kv_positions_BS = jnp.concatenate([positions_BP, positions_BN], axis=1)
    prefill_mask_BS = jnp.concatenate([prefix_mask_BP, jnp.zeros((b, n), bool)], axis=1)
    logits_B1V, cache = model.apply(
        {"params": params}, prefix_BP, positions_BP, init_cache(cfg, b, p + n), 0, prefill_mask_BS,
        kv_positions_BS, True, method="decode",
    )  # fmt: skip
    options_BN = options_BKT.reshape(b, n)
    kv_mask_BS = jnp.concatenate([prefix_mask_BP, options_mask_BKT.reshape(b, n)], axis=1)
    # Option slot s is visible to query q only within q's own option (the prefix to all).
    slot_S = jnp.arange(p + n)
    block_mask_NS = (slot_S[None, :] < p) | ((slot_S[None, :] - p) // t == (jnp.arange(n) // t)[:, None])
    logits_BNV, _ = model.apply(
        {"params": params}, options_BN, positions_BN, cache, p, kv_mask_BS, kv_positions_BS,
        attn_mask_TS=block_mask_NS, method="decode",
    )  # fmt: skip
    # Token 0 of every option is predicted by the prefix's last logits, token j > 0 by the
    # option's own token j - 1.
    first_BK = token_logprobs(jnp.broadcast_to(logits_B1V, (b, k, logits_B1V.shape[-1])), options_BKT[:, :, 0])
    logits_BKTV = logits_BNV.reshape(b, k, t, -1)
    rest_BKT = token_logprobs(
        logits_BKTV[:, :, :-1].reshape(b * k, t - 1, -1), options_BKT[:, :, 1:].reshape(b * k, t - 1)
    )
    logp_BKT = jnp.concatenate([first_BK[:, :, None], rest_BKT.reshape(b, k, t - 1)], axis=-1)
    return jnp.where(options_mask_BKT, logp_BKT, 0.0)


def _check_questions(cfg: ModelConfig, prefixes, options) -> tuple[int, list[tuple[list[int], list[list[int]]]]]:
    """Validated (prefix ids, option ids) per question and the common option count K."""
    if len(prefixes) != len(options):
        raise ValueError(f"option_logprobs: {len(prefixes)} questions but {len(options)} option lists")
    if not prefixes:
        raise ValueError("option_logprobs: no questions to score")
    n_opt = {len(o) for o in options}
    if len(n_opt) != 1:
        raise ValueError(f"option_logprobs: questions have different numbers of options {sorted(n_opt)}")
    (k,) = n_opt
    rows = []
    for i, (pre, opts) in enumerate(zip(prefixes, options)):
        pre, opts = [int(x) for x in pre], [[int(x) for x in o] for o in opts]
        if not pre:
            raise ValueError(f"option_logprobs: question {i} has an empty prefix")
        for j, o in enumerate(opts):
            if not o:
                raise ValueError(f"option_logprobs: question {i} has an empty option {j}")
            _check_context(cfg, len(pre) + len(o), f"option_logprobs: question {i} with option {j}")
        rows.append((pre, opts))
    return k, rows


def _question_batches(lengths: Sequence[int], batch_size: int, bucket) -> list[list[int]]:
    """Question indices per device call: shortest first, power-of-two batches of at most
    `batch_size` (no filler rows), a batch halved while that saves a fifth of its padded prefill."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    cost = lambda idx: len(idx) * bucket(lengths[idx[-1]])  # noqa: E731  (idx is sorted by length)

    def split(idx: list[int]) -> list[list[int]]:
        half = len(idx) // 2
        if half and cost(idx[:half]) + cost(idx[half:]) < 0.8 * cost(idx):
            return split(idx[:half]) + split(idx[half:])
        return [idx]

    out, start = [], 0
    while start < len(order):
        n = 1 << (min(batch_size, len(order) - start).bit_length() - 1)  # the largest power of two that fits
        out += split(order[start : start + n])
        start += n
    return out


def option_logprobs(
    lm: Any,
    prefixes: Sequence[Sequence[int]],
    options: Sequence[Sequence[Sequence[int]]],
    *,
    params: Any = None,
    batch_size: int = 16,
    min_bucket: int = 16,
    shared_prefix: bool = True,
) -> np.ndarray:
    """Multiple choice: total log-prob of each option after its question, shape [N, K].

    log P(option_k | prefix_i) = sum_j log P(option_k[j] | prefix_i, option_k[:j]) (the feedback
    model's reading of " (A)" / " (B)", paper sec. 4.1). With `shared_prefix` (default) each
    question is prefilled once and its options are read from its KV cache (module docstring);
    otherwise every (question, option) pair is scored as its own sequence by `score_continuations`.
    The two agree to float32 rounding (tests/test_scoring.py).

    Args:
      lm: a `LoadedModel` (anything with .config and .params).
      prefixes: N question token-id lists (non-empty).
      options: options[i] lists the K token-id lists of question i's options (non-empty, any
        lengths); every question has the same K.
      params: parameters to use instead of `lm.params`.
      batch_size: questions per device call at most (shared prefix: in power-of-two batches, split
        further where prefix lengths differ much) or sequences per call (full prefix).
      min_bucket: smallest padded prefix length.
      shared_prefix: score the options from one prefill of their question.

    Returns:
      float32 [N, K].
    """
    cfg: ModelConfig = lm.config
    k, rows = _check_questions(cfg, prefixes, options)
    if not shared_prefix:
        flat_pre = [pre for pre, opts in rows for _ in opts]
        flat_opt = [opt for _, opts in rows for opt in opts]
        scores = score_continuations(
            lm, flat_pre, flat_opt, params=params, batch_size=batch_size, min_bucket=min_bucket
        )
        return scores.total.reshape(len(rows), k)
    params = lm.params if params is None else params
    pad = cfg.pad_token_id or 0
    out = np.zeros((len(rows), k), np.float32)
    bucket = lambda n: min(bucket_length(n, min_bucket), cfg.max_position_embeddings)  # noqa: E731
    for idx in _question_batches([len(pre) for pre, _ in rows], batch_size, bucket):
        b = len(idx)  # a power of two
        p = bucket(max(len(rows[i][0]) for i in idx))
        t = 1 << (max(len(o) for i in idx for o in rows[i][1]) - 1).bit_length()  # a power of two
        prefix = np.full((b, p), pad, np.int32)
        prefix_mask = np.zeros((b, p), bool)
        opts = np.full((b, k, t), pad, np.int32)
        opts_mask = np.zeros((b, k, t), bool)
        for r, i in enumerate(idx):
            pre, row_opts = rows[i]
            prefix[r, p - len(pre) :] = pre
            prefix_mask[r, p - len(pre) :] = True
            for j, o in enumerate(row_opts):
                opts[r, j, : len(o)] = o
                opts_mask[r, j, : len(o)] = True
        logp = np.asarray(shared_prefix_token_logprobs(params, prefix, prefix_mask, opts, opts_mask, cfg=cfg))
        out[idx] = logp[: len(idx)].sum(axis=-1)
    return out
