"""KV-cache sampler: one jitted prefill + `lax.while_loop` decode over a preallocated cache.

    out = generate(lm, prompt_ids, rng=jax.random.key(0), max_new_tokens=64,
                   temperature=1.0, top_p=1.0, top_k=0, stop_at_eos=True)

Design choices (written down because callers rely on them):

* Prompts are left-padded to a bucketed length and the batch to a padded size
  (`text.pad_batch_size`: powers of two up to 8, then multiples of 8), so a new batch rarely
  recompiles; the padding never changes a row's output (pads are masked, positions count
  real tokens only).
* Against the KV cache the model runs its blocks as one scan over the layers (nn/llama.py), so
  a sampler program compiles one block, not one per layer; the layers' weights are stacked and
  cast to the matmul dtype once per call (`stack_layers`), not in every decode step.
* Identical prompts in one call (several samples per prompt, as the feedback and PPO stages
  ask for) are prefilled once and their KV caches copied to every row that uses them.
* Randomness is per row: row i at step t draws from `fold_in(fold_in(rng, i), t)`, so a prompt's
  samples depend only on the key and its index in `prompt_ids` (plus `row_offset`), not on batch
  size or bucketing: processes that each sample a share of one batch draw what one process would.
* Sampling uses the inverse CDF over two levels (blocks of 256 vocabulary entries, then within
  the block): one uniform number per row and step instead of V Gumbel draws, exact in
  distribution. top-k uses `lax.top_k`; top-p finds its threshold among the top 256 probabilities
  and falls back to bisection over the whole vocabulary only when those do not reach p.
* `out.logprobs` is the log-prob of each sampled token under the distribution it was drawn from
  (after temperature, top-k and top-p). For greedy decoding (temperature 0) it is the model's
  log-prob at temperature 1.
* A sequence ends at an EOS id (`stop_at_eos`) or when its generated text contains one of
  `stop_strings`; stop strings are matched on bytes, across token boundaries, by a per-string
  automaton advanced one token at a time on device. The ending token is kept in `tokens` and
  counted in `lengths`; later slots hold the pad id and log-prob 0. `SampleOutput.texts` cuts
  the text before the stop string.
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
from cai_jax.stop_strings import stop_tables
from cai_jax.text import bucket_length, eos_ids, pad_batch_size, pad_id
from cai_jax.token_choice import inverse_cdf, process_logits

# From this many padded rows a call runs the blocks unrolled over a per-layer KV cache: the scan's
# copy of each layer's cache slice per step grows with the rows and outweighs the longer compile.
UNROLL_ROWS = 64
STOP_NONE, STOP_EOS, STOP_STRING = 0, 1, 2  # values of SampleOutput.stop_reason (0: ran to max_new_tokens)


@dataclasses.dataclass
class SampleOutput:
    """Result of `generate`; arrays have one row per prompt, in the order given."""

    tokens: jax.Array  # int32 [B, max_new_tokens], pad after a sequence stops
    logprobs: jax.Array  # float32 [B, max_new_tokens], 0 after a sequence stops
    lengths: jax.Array  # int32 [B], generated tokens including the EOS / stop-string token
    stop_reason: np.ndarray  # int8 [B]: 0 max tokens, 1 EOS, 2 stop string
    stop_strings: tuple[str, ...] = ()

    def texts(self, tokenizer, trim_stop: bool = True) -> list[str]:
        """Decoded generations (special tokens skipped), cut before the first stop string."""
        tokens, lengths = np.asarray(self.tokens), np.asarray(self.lengths)
        out = []
        for row, n in zip(tokens, lengths):
            text = tokenizer.decode(row[:n].tolist(), skip_special_tokens=True)
            if trim_stop:
                cuts = [text.find(s) for s in self.stop_strings if s in text]
                text = text[: min(cuts)] if cuts else text
            out.append(text)
        return out


@dataclasses.dataclass(frozen=True)
class _Settings:
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop_at_eos: bool
    pad_id: int


# ---------------------------------------------------------------- token choice


def _choose(logits_BV, keys_B, step, s: _Settings):
    """Next token [B] and its log-prob [B]."""
    if s.temperature == 0.0:
        logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
        tok_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    else:
        logp_BV = process_logits(logits_BV, s.temperature, s.top_k, s.top_p)
        u_B = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step)))(keys_B)
        tok_B = inverse_cdf(logp_BV, u_B)
    return tok_B, jnp.take_along_axis(logp_BV, tok_B[:, None], axis=-1)[:, 0]


# ---------------------------------------------------------------- the loop


@functools.partial(jax.jit, static_argnames=("cfg", "s", "per_layer"))
def _sample(
    params, tokens_UP, mask_UP, src_B, row_ids_B, rng, stop_table_KQV, stop_final_K, eos_E, *, cfg, s, per_layer=False
):
    """Prefill the U distinct prompts once, copy their caches to the B rows (src_B), then decode.

    `per_layer`: the blocks unrolled over one cache per layer, else a scan over a stacked cache.
    """
    model = Transformer(cfg)
    params = stack_layers(params, cfg, stack=not per_layer)  # once, not in every decode step
    u, p = tokens_UP.shape
    b = src_B.shape[0]
    n = s.max_new_tokens
    kv_mask_US = jnp.zeros((u, p + n), bool).at[:, :p].set(mask_UP)
    positions_UP = jnp.maximum(jnp.cumsum(mask_UP, axis=1) - 1, 0).astype(jnp.int32)
    logits_U1V, cache = model.apply(
        {"params": params}, tokens_UP, positions_UP, init_cache(cfg, u, p + n, per_layer=per_layer), 0, kv_mask_US, None, True,
        method="decode",
    )  # fmt: skip
    rows = lambda x: jnp.take(x, src_B, axis=0)  # noqa: E731
    cache = jax.tree.map(lambda x: jnp.take(x, src_B, axis=0 if per_layer else 1), cache)  # rows U -> B
    logits_B1V, kv_mask_BS, mask_BP, positions_BP = map(rows, (logits_U1V, kv_mask_US, mask_UP, positions_UP))
    n_real_B = jnp.sum(mask_BP, axis=1).astype(jnp.int32)
    # Position of every cache slot (read only by sliding-window attention).
    kv_positions_BS = jnp.concatenate([positions_BP, n_real_B[:, None] + jnp.arange(n, dtype=jnp.int32)], axis=1)
    keys_B = jax.vmap(lambda i: jax.random.fold_in(rng, i))(row_ids_B)
    num_stop = stop_final_K.shape[0]

    def record(state, logits_BV, i):
        tok_B, logp_B = _choose(logits_BV, keys_B, i, s)
        live_B = ~state["done"]
        tok_B = jnp.where(live_B, tok_B, s.pad_id)
        ended_eos = (
            jnp.any(tok_B[:, None] == eos_E[None, :], axis=-1) & live_B if s.stop_at_eos else jnp.zeros_like(live_B)
        )
        stop_BK = state["stop"]
        ended_stop = jnp.zeros_like(live_B)
        if num_stop:
            stop_BK = stop_table_KQV[jnp.arange(num_stop)[None, :], stop_BK, tok_B[:, None]]
            ended_stop = jnp.any(stop_BK == stop_final_K[None, :], axis=-1) & live_B
        reason = jnp.where(ended_eos, STOP_EOS, jnp.where(ended_stop, STOP_STRING, state["reason"]))
        return dict(
            state,
            tokens=state["tokens"].at[:, i].set(tok_B),
            logprobs=state["logprobs"].at[:, i].set(jnp.where(live_B, logp_B, 0.0)),
            lengths=state["lengths"] + live_B.astype(jnp.int32),
            done=state["done"] | ended_eos | ended_stop,
            reason=reason.astype(jnp.int8),
            stop=stop_BK,
            last=tok_B,
            i=i + 1,
        )

    state = dict(
        cache=cache,
        kv_mask=kv_mask_BS,
        tokens=jnp.full((b, n), s.pad_id, jnp.int32),
        logprobs=jnp.zeros((b, n), jnp.float32),
        lengths=jnp.zeros((b,), jnp.int32),
        done=jnp.zeros((b,), bool),
        reason=jnp.zeros((b,), jnp.int8),
        stop=jnp.zeros((b, num_stop), jnp.int32),
        last=jnp.zeros((b,), jnp.int32),
        i=jnp.int32(0),
    )
    state = record(state, logits_B1V[:, 0], jnp.int32(0))

    def cond(state):
        return (state["i"] < n) & ~jnp.all(state["done"])

    def body(state):
        i = state["i"]
        slot = p + i - 1  # the previous token's cache slot
        kv_mask = state["kv_mask"].at[:, slot].set(True)
        pos_B1 = (n_real_B + i - 1)[:, None]
        logits_B1V, cache = model.apply(
            {"params": params},
            state["last"][:, None],
            pos_B1,
            state["cache"],
            slot,
            kv_mask,
            kv_positions_BS,
            method="decode",
        )
        return record(dict(state, cache=cache, kv_mask=kv_mask), logits_B1V[:, 0], i)

    state = jax.lax.while_loop(cond, body, state)
    return state["tokens"], state["logprobs"], state["lengths"], state["reason"]


def call_shapes(
    cfg: ModelConfig, rows: int, distinct: int, longest: int, max_new_tokens: int, min_bucket: int = 16
) -> tuple[int, int, int]:
    """(B rows, U distinct prompts, P prompt width) of one device call of `generate`.

    Rows and distinct prompts are padded by `pad_batch_size`, the longest prompt to its length bucket
    (capped so that P + max_new_tokens fits the context).
    """
    p = min(bucket_length(longest, min_bucket), cfg.max_position_embeddings - max_new_tokens)
    return pad_batch_size(rows), pad_batch_size(distinct), p


def abstract_sample_call(
    cfg: ModelConfig,
    params: Any,
    *,
    rows: int,
    distinct: int,
    prompt_len: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_eos: int = 1,
    sharding: Any = None,
) -> tuple[Any, tuple, dict]:
    """The jitted sampler and abstract arguments of one `generate` device call, for `.lower()`.

    Shapes are those `call_shapes` gives (B = rows, U = distinct, P = prompt_len), so a planner
    compiles exactly the executable `generate` runs (experiments/plan.py) without allocating it.
    `params` are arrays or ShapeDtypeStructs (their shardings kept); the other inputs take
    `sharding` (None: unspecified). No stop strings (they add a [K, Q, V] int32 table).

    Returns:
      (fn, args, kwargs) with `fn.lower(*args, **kwargs)` lowering the call.
    """
    s = _Settings(max_new_tokens, float(temperature), float(top_p), int(top_k), True, int(cfg.pad_token_id or 0))

    def arg(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (
        params,
        arg((distinct, prompt_len), jnp.int32),
        arg((distinct, prompt_len), jnp.bool_),
        arg((rows,), jnp.int32),
        arg((rows,), jnp.int32),
        jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding),
        arg((0, 1, cfg.vocab_size), jnp.int32),
        arg((0,), jnp.int32),
        arg((max(num_eos, 1),), jnp.int32),
    )
    return _sample, args, {"cfg": cfg, "s": s, "per_layer": rows >= UNROLL_ROWS}


def abstract_decode_step(cfg: ModelConfig, params: Any, *, rows: int, cache_len: int, sharding: Any = None):
    """One step of the sampler's decode loop (the model's `decode` of one token per row against a
    `cache_len`-slot cache), jitted with abstract arguments: its cost analysis gives the FLOPs of a
    decode step, which the loop's own cost analysis counts only once (XLA does not know the trip count).

    Returns:
      (fn, args) with `fn.lower(*args)` lowering the step.
    """
    model = Transformer(cfg)

    def step(params, last_B1, pos_B1, cache, slot, kv_mask_BS, kv_positions_BS):
        variables = {"params": params}
        return model.apply(variables, last_B1, pos_B1, cache, slot, kv_mask_BS, kv_positions_BS, method="decode")

    def arg(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    cache = {k: arg(x.shape, x.dtype) for k, x in jax.eval_shape(lambda: init_cache(cfg, rows, cache_len)).items()}
    args = (
        params,
        arg((rows, 1), jnp.int32),
        arg((rows, 1), jnp.int32),
        cache,
        arg((), jnp.int32),
        arg((rows, cache_len), jnp.bool_),
        arg((rows, cache_len), jnp.int32),
    )
    return jax.jit(step), args


def _validate(prompt_ids, cfg: ModelConfig, max_new_tokens: int, truncate: bool) -> list[list[int]]:
    if prompt_ids is None or len(prompt_ids) == 0:
        raise ValueError("generate: prompt_ids is empty (expected a list of token-id lists)")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
    limit = cfg.max_position_embeddings - max_new_tokens
    if limit < 1:
        raise ValueError(
            f"generate: max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
            f"context of {cfg.max_position_embeddings} tokens"
        )
    out = []
    for i, ids in enumerate(prompt_ids):
        ids = [int(t) for t in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if not ids:
            raise ValueError(f"generate: prompt {i} is empty")
        if any(t < 0 or t >= cfg.vocab_size for t in ids):
            raise ValueError(f"generate: prompt {i} holds token ids outside [0, {cfg.vocab_size})")
        if len(ids) > limit:
            if not truncate:
                raise ValueError(
                    f"generate: prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                    f"the model's context of {cfg.max_position_embeddings} (pass truncate=True to keep the last "
                    f"{limit} prompt tokens)"
                )
            ids = ids[-limit:]
        out.append(ids)
    return out


def generate(
    lm: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    rng: jax.Array,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_at_eos: bool = True,
    stop_strings: Sequence[str] = (),
    eos_token_ids: Sequence[int] | None = None,
    params: Any = None,
    batch_size: int | None = None,
    truncate: bool = False,
    min_bucket: int = 16,
    row_offset: int = 0,
    unroll_layers: bool | None = None,
) -> SampleOutput:
    """Samples continuations of token-id prompts with a KV cache (see the module docstring).

    Args:
      lm: a `LoadedModel` (anything with .config, .params and .tokenizer).
      prompt_ids: B token-id lists of any lengths.
      rng: a jax PRNG key; same key -> same samples.
      max_new_tokens: N, the number of decode steps at most.
      temperature: 0 for greedy decoding.
      top_p: nucleus mass in (0, 1]; 1 disables.
      top_k: keep the k most likely tokens; 0 disables.
      stop_at_eos: end a row at any of `eos_token_ids` (default: the tokenizer's end-of-turn ids).
      stop_strings: end a row once its generated text contains one of these.
      params: parameters to use instead of `lm.params` (e.g. a policy being trained).
      batch_size: rows per device call (default: all of them); results do not depend on it.
      truncate: drop the oldest prompt tokens of a too-long prompt instead of raising.
      min_bucket: smallest padded prompt length.
      row_offset: index of `prompt_ids[0]` in a larger batch that several processes sample a
        share of each: row i draws as row `row_offset + i` of that batch would.
      unroll_layers: run the blocks unrolled over a per-layer KV cache instead of as a scan over a
        stacked one; None: unrolled when a call's padded rows are at least `UNROLL_ROWS`. The
        same numbers either way; only speed and compile time differ.

    Returns:
      SampleOutput with tokens [B, N], logprobs [B, N], lengths [B], stop_reason [B].
    """
    cfg: ModelConfig = lm.config
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p={top_p} must be in (0, 1]")
    if temperature < 0 or top_k < 0:
        raise ValueError(f"generate: temperature={temperature} and top_k={top_k} must be >= 0")
    prompts = _validate(prompt_ids, cfg, max_new_tokens, truncate)
    tokenizer = getattr(lm, "tokenizer", None)
    if eos_token_ids is None:
        eos_token_ids = eos_ids(tokenizer, cfg) if tokenizer is not None else cfg.eos_token_ids
    if stop_at_eos and not eos_token_ids:
        raise ValueError("generate: stop_at_eos=True but no EOS id is known; pass eos_token_ids")
    pad = pad_id(tokenizer) if tokenizer is not None else (cfg.pad_token_id or 0)
    settings = _Settings(max_new_tokens, float(temperature), float(top_p), int(top_k), bool(stop_at_eos), int(pad))
    stop_table, stop_final = stop_tables(tokenizer, tuple(stop_strings), cfg.vocab_size)
    eos_arr = jnp.asarray(np.array(list(eos_token_ids) or [-1], np.int32))
    params = lm.params if params is None else params
    chunk = batch_size or len(prompts)
    results = []
    for start in range(0, len(prompts), chunk):
        rows = prompts[start : start + chunk]
        # Identical prompts (several samples per prompt) are prefilled once.
        distinct: dict[tuple[int, ...], int] = {}
        src = np.array([distinct.setdefault(tuple(ids), len(distinct)) for ids in rows], np.int32)
        b, u, p = call_shapes(cfg, len(rows), len(distinct), max(map(len, rows)), max_new_tokens, min_bucket)
        src = np.concatenate([src, np.zeros(b - len(rows), np.int32)])  # filler rows copy row 0
        tokens = np.full((u, p), pad, np.int32)
        mask = np.zeros((u, p), bool)
        for r, ids in enumerate(distinct):
            tokens[r, p - len(ids) :] = ids
            mask[r, p - len(ids) :] = True
        mask[len(distinct) :, -1] = True  # filler prompts: one real token keeps them well defined
        row_ids = np.arange(row_offset + start, row_offset + start + b, dtype=np.int32)
        per_layer = b >= UNROLL_ROWS if unroll_layers is None else bool(unroll_layers)
        out = _sample(
            params, tokens, mask, src, row_ids, rng, stop_table, stop_final, eos_arr,
            cfg=cfg, s=settings, per_layer=per_layer,
        )  # fmt: skip
        results.append([x[: len(rows)] for x in out])
    tokens, logprobs, lengths, reason = (jnp.concatenate(xs) if len(results) > 1 else xs[0] for xs in zip(*results))
    return SampleOutput(tokens, logprobs, lengths, np.asarray(reason), tuple(stop_strings))
