"""A pure-functional Flax decoder for the Llama family (SmolLM2, Llama 2/3, Mistral, Qwen2).

Two entry points share one set of parameters:

* `Transformer.__call__(tokens_BL, ...)` -> float32 logits [B, L, V]: training and scoring. Takes a
  padding mask (left- or right-padded batches) or segment ids (packed sequences) and optional
  explicit positions.
* `Transformer.decode(tokens_BT, positions_BT, cache, cache_index, kv_mask_BS)` -> (logits, cache):
  writes T new keys/values into a preallocated KV cache at `cache_index` (the same slot for every
  row; left padding keeps rows aligned) and attends over the cache slots allowed by `kv_mask_BS`.

Shapes use suffixes: B batch, L/T query length, S key (cache) length, E embed, H query heads,
K kv heads, G = H // K, D head dim, M mlp hidden, V vocab.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cai_jax.nn import cpu_matmul
from cai_jax.nn.config import ModelConfig

# {"k": [L, B, K, D, S], "v": [L, B, K, S, D]}: every layer's keys and values (the blocks run as a
# scan), or a list of L {"k": [B, K, D, S], "v": [B, K, S, D]} (the blocks unrolled); see `init_cache`.
Cache = dict | list
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite, so fully masked rows give no NaN


def _init(std: float, names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [D/2], with linear or Llama 3 scaling applied (as in HF)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        inv = inv / rs.factor
    elif rs.rope_type == "llama3":
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(is_medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x_BTHD: jax.Array, positions_BT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotary embedding in HF's half-split layout: x * cos + rotate_half(x) * sin (fp32 math)."""
    angles_BTF = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    cos = jnp.cos(angles_BTF)[:, :, None, :]
    sin = jnp.sin(angles_BTF)[:, :, None, :]
    x = x_BTHD.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHD.dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


class HeadsDense(nn.Module):
    """`nn.DenseGeneral` for the attention projections, with parameters created at their final rank.

    DenseGeneral draws its kernel (and bias) flat and reshapes it afterwards, applying the logical
    sharding constraint to the flat array; under a mesh with axis rules that fails on 3-d kernels
    (flax issue #3676). Same parameter names, shapes, initial values and maths as DenseGeneral.
    """

    features: tuple[int, ...]  # output dims appended to the result
    in_dims: int  # number of trailing input dims contracted
    kernel_axes: tuple[str, ...]  # logical names of the kernel [*contracted, *features]
    use_bias: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        n = self.in_dims
        kernel = self.param("kernel", _init(0.02, self.kernel_axes), x.shape[-n:] + self.features, self.param_dtype)
        contract = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
        y = cpu_matmul.dot_f32(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
        if self.use_bias:
            init = nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[n:])
            y = y + self.param("bias", init, self.features, self.param_dtype).astype(self.dtype)
        return y


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTE, positions_BT, mask_BTS, cache=None, cache_index=None, layer=None):
        cfg = self.cfg
        dt, pdt, act = cfg.jnp_dtype, cfg.jnp_param_dtype, cfg.jnp_activation_dtype
        h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        def proj(name, heads, axes):
            dense = HeadsDense((heads, d), 1, ("embed",) + axes, cfg.attention_bias, dt, pdt, name=name)
            return dense(x_BTE).astype(act)

        q_BTHD = proj("q_proj", h, ("q_heads", "head_dim"))
        k_BTKD = proj("k_proj", k, ("kv_heads", "head_dim"))
        v_BTKD = proj("v_proj", k, ("kv_heads", "head_dim"))
        inv_freq = rope_inv_freq(cfg)
        q_BTHD = apply_rope(q_BTHD, positions_BT, inv_freq)
        k_BTKD = apply_rope(k_BTKD, positions_BT, inv_freq)

        # Keys are kept as [B, K, D, S] and values as [B, K, S, D]: both attention matmuls are
        # then plain (non-transposed) batched matmuls over (B, K). On CPU the transposed-operand
        # form reads the cache ~5x slower, and decode time is dominated by reading the cache.
        k_BKDT = k_BTKD.transpose(0, 2, 3, 1)
        v_BKTD = v_BTKD.transpose(0, 2, 1, 3)
        new_cache = None
        if cache is not None and layer is None:
            # This layer's own cache (the blocks unrolled): the new slots are written in place.
            k_BKDS = jax.lax.dynamic_update_slice(cache["k"], k_BKDT.astype(cache["k"].dtype), (0, 0, 0, cache_index))
            v_BKSD = jax.lax.dynamic_update_slice(cache["v"], v_BKTD.astype(cache["v"].dtype), (0, 0, cache_index, 0))
            new_cache = {"k": k_BKDS, "v": v_BKSD}
        elif cache is not None:
            # The cache holds every layer ([L, ...]): the new slots are written in place into this
            # layer's part, which is then read for attention.
            k_LBKDS = jax.lax.dynamic_update_slice(
                cache["k"], k_BKDT[None].astype(cache["k"].dtype), (layer, 0, 0, 0, cache_index)
            )
            v_LBKSD = jax.lax.dynamic_update_slice(
                cache["v"], v_BKTD[None].astype(cache["v"].dtype), (layer, 0, 0, cache_index, 0)
            )
            new_cache = {"k": k_LBKDS, "v": v_LBKSD}
            k_BKDS = jax.lax.dynamic_index_in_dim(k_LBKDS, layer, keepdims=False)
            v_BKSD = jax.lax.dynamic_index_in_dim(v_LBKSD, layer, keepdims=False)
        else:
            k_BKDS, v_BKSD = k_BKDT, v_BKTD

        b, t = q_BTHD.shape[:2]
        g = h // k
        # (G, T) merged into one axis M: a plain batched matmul over (B, K), no layout copies.
        q_BKMD = q_BTHD.reshape(b, t, k, g, d).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, d)
        q_BKMD = q_BKMD * jnp.asarray(d**-0.5, act)
        scores_BKMS = jnp.einsum("bkmd,bkds->bkms", q_BKMD, k_BKDS.astype(act), preferred_element_type=jnp.float32)
        scores_BKGTS = scores_BKMS.reshape(b, k, g, t, -1)
        scores_BKGTS = jnp.where(mask_BTS[:, None, None, :, :], scores_BKGTS, _MASK_VALUE)
        probs_BKMS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(act).reshape(b, k, g * t, -1)
        out_BKMD = jnp.einsum("bkms,bksd->bkmd", probs_BKMS, v_BKSD.astype(act))
        out_BTKGD = out_BKMD.reshape(b, k, g, t, d).transpose(0, 3, 1, 2, 4)
        out_BTHD = out_BTKGD.reshape(b, t, h, d)
        o_proj = HeadsDense((cfg.hidden_size,), 2, ("q_heads", "head_dim", "embed"), False, dt, pdt, name="o_proj")
        out_BTE = o_proj(out_BTHD).astype(act)
        return out_BTE, new_cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTE):
        cfg = self.cfg
        dense = lambda n, name, axes: nn.Dense(  # noqa: E731
            n, use_bias=False, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
            kernel_init=_init(0.02, axes), dot_general=cpu_matmul.dot_f32, name=name,
        )  # fmt: skip
        act = cfg.jnp_activation_dtype
        gate = dense(cfg.intermediate_size, "gate_proj", ("embed", "mlp"))(x_BTE).astype(act)
        up = dense(cfg.intermediate_size, "up_proj", ("embed", "mlp"))(x_BTE).astype(act)
        hidden_BTM = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return dense(cfg.hidden_size, "down_proj", ("mlp", "embed"))(hidden_BTM).astype(act)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTE, positions_BT, mask_BTS, cache=None, cache_index=None, layer=None):
        cfg = self.cfg
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.jnp_activation_dtype, cfg.jnp_param_dtype, name=name)  # noqa: E731
        attn_out, new_cache = Attention(cfg, name="self_attn")(
            norm("input_layernorm")(x_BTE), positions_BT, mask_BTS, cache, cache_index, layer
        )
        x_BTE = x_BTE + attn_out
        x_BTE = x_BTE + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(x_BTE))
        x_BTE = nn.with_logical_constraint(x_BTE, ("batch", "length", "embed"))
        return x_BTE, new_cache


def _remat_policy(name: str):
    if name == "dots":
        return jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
    return None


def _window(mask_BTS, q_pos_BT, k_pos_BS, window):
    if window is None:
        return mask_BTS
    return mask_BTS & (q_pos_BT[:, :, None] - k_pos_BS[:, None, :] < window)


def default_positions(mask_BL: jax.Array | None, segment_ids_BL: jax.Array | None, shape) -> jax.Array:
    """Positions that make left padding and packing transparent.

    Padded: position = number of real tokens before this one (pads get 0). Packed: the offset
    of each token from the start of its segment.
    """
    b, l = shape
    if segment_ids_BL is not None:
        idx = jnp.broadcast_to(jnp.arange(l), (b, l))
        starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1)
        start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
        return (idx - start_idx).astype(jnp.int32)
    if mask_BL is not None:
        return jnp.maximum(jnp.cumsum(mask_BL.astype(jnp.int32), axis=1) - 1, 0)
    return jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))


class Transformer(nn.Module):
    """Llama-family causal LM. See the module docstring for the two entry points."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.jnp_dtype,
            param_dtype=cfg.jnp_param_dtype,
            embedding_init=_init(0.02, ("vocab", "embed")),
        )
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=_remat_policy(cfg.remat), prevent_cse=True)
        self.layers = [block(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.jnp_activation_dtype, cfg.jnp_param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=cfg.jnp_dtype,
                param_dtype=cfg.jnp_param_dtype,
                kernel_init=_init(0.02, ("embed", "vocab")),
                dot_general=cpu_matmul.dot_f32,
            )

    def _blocks(self, x_BTE, positions_BT, mask_BTS, cache=None, cache_index=None):
        """The decoder blocks: one by one, or as a `lax.scan` over the layers against a stacked cache.

        Without a cache (training, teacher-forced scoring) and with a per-layer cache (a list, see
        `init_cache`) the blocks run one by one. With a stacked cache (prefill, decode, option
        scoring) they are a scan over the layers' stacked parameters: a program traces and
        compiles one block instead of num_layers copies, which on a CPU was most of a sampler's
        compile time. The scan's price is a copy of each layer's weights and of its cache slice
        per step (their dynamic slices; bf16 weights are sliced as uint16 bits, `_to_bits`). The
        weights' copy is small; the cache slice's grows with the rows, so the sampler unrolls the
        blocks over a per-layer cache for large batches (sampling.py, `UNROLL_ROWS`). A full
        forward pass under a scan ran 1.4x slower on CPU and compiled no faster (BENCHMARKS.md).
        The parameters stay one subtree per layer (`layers_{i}`, as in HF checkpoints); a caller
        that applies the model many times with the same weights stacks them once (`stack_layers`),
        otherwise the scan stacks them here. Both paths accept either form and compute the same.
        """
        cfg = self.cfg
        if cache is None or self.is_initializing():
            for layer in self.layers:
                x_BTE, _ = layer(x_BTE, positions_BT, mask_BTS)
            return x_BTE, None
        params = self.variables["params"]
        block = Block(cfg, parent=None)
        if isinstance(cache, (list, tuple)):
            new_cache = []
            for i, kv in enumerate(cache):
                if STACKED in params:
                    layer_params = jax.tree.map(lambda a: a[i], params[STACKED])  # noqa: B023
                else:
                    layer_params = params[f"layers_{i}"]
                x_BTE, kv = block.apply({"params": layer_params}, x_BTE, positions_BT, mask_BTS, kv, cache_index)
                new_cache.append(kv)
            return x_BTE, new_cache
        stacked = params[STACKED] if STACKED in params else _stack(params, cfg.num_layers)
        dtypes = jax.tree.map(lambda a: a.dtype, stacked)

        def body(carry, xs):
            x, kv = carry
            layer_params, i = xs
            layer_params = jax.tree.map(_from_bits, layer_params, dtypes)
            return block.apply({"params": layer_params}, x, positions_BT, mask_BTS, kv, cache_index, i), None

        xs = (jax.tree.map(_to_bits, stacked), jnp.arange(cfg.num_layers))
        (x_BTE, cache), _ = jax.lax.scan(body, (x_BTE, cache), xs)
        return x_BTE, cache

    def logits(self, h_BTE: jax.Array) -> jax.Array:
        """Final hidden states [B, T, E] -> float32 logits [B, T, V]."""
        if self.cfg.tie_word_embeddings:
            emb_VE = jnp.asarray(self.embed_tokens.embedding, self.cfg.jnp_dtype)
            h_BTE = h_BTE.astype(self.cfg.jnp_dtype)
            if cpu_matmul.on_cpu():  # a 2-d product, as `cpu_matmul.dot_f32` runs the projections
                b, t, e = h_BTE.shape
                h_NE = h_BTE.reshape(b * t, e)
                if cpu_matmul.applies(h_NE):
                    logits_NV = cpu_matmul.matmul_t(h_NE, emb_VE)
                else:
                    logits_NV = jnp.einsum("ne,ve->nv", h_NE, emb_VE, preferred_element_type=jnp.float32)
                logits = logits_NV.reshape(b, t, -1)
            else:
                logits = jnp.einsum("bte,ve->btv", h_BTE, emb_VE, preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(h_BTE)
        return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))

    def __call__(
        self,
        tokens_BL: jax.Array,
        mask_BL: jax.Array | None = None,
        positions_BL: jax.Array | None = None,
        segment_ids_BL: jax.Array | None = None,
        return_hidden: bool = False,
    ) -> jax.Array:
        """Full causal forward pass.

        Args:
          tokens_BL: int token ids.
          mask_BL: 1/True for real tokens, 0 for padding (either side). Pads are never attended to.
          positions_BL: explicit RoPE positions; by default derived from the mask or segments.
          segment_ids_BL: packed sequences: tokens attend only within their segment id (0 = pad).
          return_hidden: return the final normed hidden states [B, L, E] instead of logits.

        Returns:
          float32 logits [B, L, V] (or hidden states).
        """
        b, l = tokens_BL.shape
        if positions_BL is None:
            positions_BL = default_positions(mask_BL, segment_ids_BL, (b, l))
        causal_LL = jnp.tril(jnp.ones((l, l), bool))
        mask_BLL = jnp.broadcast_to(causal_LL, (b, l, l))
        if segment_ids_BL is not None:
            same = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
            mask_BLL = mask_BLL & same & (segment_ids_BL[:, None, :] != 0)
        if mask_BL is not None:
            mask_BLL = mask_BLL & mask_BL.astype(bool)[:, None, :]
        mask_BLL = _window(mask_BLL, positions_BL, positions_BL, self.cfg.sliding_window)
        x = self.embed_tokens(tokens_BL).astype(self.cfg.jnp_activation_dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x, _ = self._blocks(x, positions_BL, mask_BLL)
        h = self.norm(x)
        return h if return_hidden else self.logits(h)

    def decode(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array,
        cache: Cache,
        cache_index: jax.Array,
        kv_mask_BS: jax.Array,
        kv_positions_BS: jax.Array | None = None,
        last_only: bool = False,
        attn_mask_TS: jax.Array | None = None,
    ) -> tuple[jax.Array, Cache]:
        """Forward T new tokens against a KV cache.

        Args:
          tokens_BT: new token ids, written to cache slots [cache_index, cache_index + T).
          positions_BT: their RoPE positions.
          cache: stacked or per-layer keys and values (see `init_cache`).
          cache_index: int scalar, first slot to write.
          kv_mask_BS: which cache slots hold real tokens, *including* the T being written.
          kv_positions_BS: positions of the cache slots (only needed for sliding windows).
          last_only: compute logits for the last of the T tokens only (prefill), [B, 1, V].
          attn_mask_TS: an extra [T, S] mask ANDed with the causal and slot masks (shared-prefix
            option scoring: several continuations written side by side after one prefix, each
            attending to the prefix and to itself only).

        Returns:
          (float32 logits [B, T, V], updated cache).
        """
        t = tokens_BT.shape[1]
        s = kv_mask_BS.shape[1]
        slots_S = jnp.arange(s)
        causal_TS = slots_S[None, :] <= cache_index + jnp.arange(t)[:, None]
        mask_BTS = causal_TS[None] & kv_mask_BS.astype(bool)[:, None, :]
        if attn_mask_TS is not None:
            mask_BTS = mask_BTS & attn_mask_TS[None]
        if self.cfg.sliding_window is not None:
            mask_BTS = _window(mask_BTS, positions_BT, kv_positions_BS, self.cfg.sliding_window)
        x = self.embed_tokens(tokens_BT).astype(self.cfg.jnp_activation_dtype)
        x, new_cache = self._blocks(x, positions_BT, mask_BTS, cache, cache_index)
        if last_only:
            x = x[:, -1:]
        return self.logits(self.norm(x)), new_cache


STACKED = "layers"  # the key of pre-stacked block parameters (`stack_layers`)


def _to_bits(x: jax.Array) -> jax.Array:
    """bf16 -> its uint16 bits (free), so that XLA's CPU backend keeps the scanned weights in bf16.

    Given bf16 scan inputs, XLA on CPU converts the whole stacked array to f32 before the loop and
    each step slices the f32 copy and converts it back: twice the bytes read per step, and an f32
    copy of every layer's weights held beside the bf16 one (BENCHMARKS.md, "Compile time"). Integer
    bits are sliced as they are.
    """
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def _from_bits(x: jax.Array, dtype) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def _stack(params: dict, num_layers: int) -> dict:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *(params[f"layers_{i}"] for i in range(num_layers)))


def _cast_kernels(tree, cfg: ModelConfig):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.astype(cfg.jnp_dtype) if getattr(path[-1], "key", None) == "kernel" else x, tree
    )


def stack_layers(params: dict, cfg: ModelConfig, stack: bool = True) -> dict:
    """`params` with the blocks' per-layer subtrees replaced by one stacked subtree (leading axis L).

    A model applied with a KV cache (`Transformer.decode`) accepts either form and computes the
    same; a caller that applies it many times with the same weights (the sampler's decode loop)
    stacks once, outside the loop. The blocks' kernels are cast to the matmul dtype (`cfg.dtype`),
    which every use of them casts to anyway: the result is exact, and a scan step then copies
    half the bytes when that dtype is bf16. `stack=False` only casts (for the blocks unrolled
    over a per-layer cache, which read each layer's subtree as it is).
    """
    layers = {k: v for k, v in params.items() if k.startswith("layers_")}
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    if stack:
        out[STACKED] = _cast_kernels(_stack(layers, cfg.num_layers), cfg)
    else:
        out.update(_cast_kernels(layers, cfg))
    return out


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None, per_layer: bool = False) -> Cache:
    """Zeroed KV cache of every layer (see Attention for the layout).

    Stacked (the default): {"k": [L, B, K, D, S], "v": [L, B, K, S, D]}, and `Transformer.decode`
    runs the blocks as a scan. `per_layer`: a list of L {"k": [B, K, D, S], "v": [B, K, S, D]},
    and the blocks run unrolled, each reading and writing its own buffers in place.
    """
    dtype = dtype or cfg.jnp_activation_dtype
    n, b, k, d = cfg.num_layers, batch, cfg.num_kv_heads, cfg.head_dim
    if per_layer:
        return [{"k": jnp.zeros((b, k, d, length), dtype), "v": jnp.zeros((b, k, length, d), dtype)} for _ in range(n)]
    return {"k": jnp.zeros((n, b, k, d, length), dtype), "v": jnp.zeros((n, b, k, length, d), dtype)}


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Random parameters (unboxed, no logical-partitioning wrappers)."""
    model = Transformer(cfg)
    variables = jax.jit(model.init)(rng, jnp.zeros((1, 8), jnp.int32))
    return nn.meta.unbox(variables["params"])
