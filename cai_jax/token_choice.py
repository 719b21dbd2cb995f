"""The sampler's token choice: the sampling distribution and an inverse-CDF draw from it (used by sampling.py).

    logp_BV = process_logits(logits_BV, temperature, top_k, top_p)   # -inf outside top-k / top-p
    tok_B = inverse_cdf(logp_BV, u_B)                                # u_B uniform in [0, 1)

The draw walks two levels (blocks of 256 vocabulary entries, then within the block): one uniform
number per row and step instead of V Gumbel draws, exact in distribution. top-p finds its
threshold among the top 256 probabilities and bisects over the whole vocabulary only when those do
not reach p.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["process_logits", "inverse_cdf"]

_BLOCK = 256  # vocabulary block size of the two-level inverse-CDF sampler
_TOP_P_CANDIDATES = 256


def _top_p_threshold(probs_BV: jax.Array, top_p: float) -> jax.Array:
    """Smallest probability kept by nucleus sampling, per row [B]."""
    k = min(_TOP_P_CANDIDATES, probs_BV.shape[-1])
    top_BK, _ = jax.lax.top_k(probs_BV, k)
    cum_BK = jnp.cumsum(top_BK, axis=-1)
    n_keep = jnp.minimum(jnp.sum(cum_BK < top_p, axis=-1), k - 1)
    thresh_B = jnp.take_along_axis(top_BK, n_keep[:, None], axis=-1)[:, 0]

    def bisect(_):
        def body(_, lo_hi):
            lo, hi = lo_hi
            mid = 0.5 * (lo + hi)
            mass = jnp.sum(jnp.where(probs_BV >= mid[:, None], probs_BV, 0.0), axis=-1)
            ok = mass >= top_p
            return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

        lo, _ = jax.lax.fori_loop(0, 40, body, (jnp.zeros_like(thresh_B), top_BK[:, 0]))
        return jnp.where(cum_BK[:, -1] >= top_p, thresh_B, lo)

    return jax.lax.cond(jnp.all(cum_BK[:, -1] >= top_p), lambda _: thresh_B, bisect, None)


def process_logits(logits_BV: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Log-probs of the sampling distribution [B, V] (-inf outside top-k / top-p)."""
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k and top_k < logits_BV.shape[-1]:
        kth_B = jax.lax.top_k(logits_BV, top_k)[0][:, -1]
        logits_BV = jnp.where(logits_BV >= kth_B[:, None], logits_BV, -jnp.inf)
    if top_p < 1.0:
        probs_BV = jax.nn.softmax(logits_BV, axis=-1)
        thresh_B = _top_p_threshold(probs_BV, top_p)
        logits_BV = jnp.where(probs_BV >= thresh_B[:, None], logits_BV, -jnp.inf)
    return jax.nn.log_softmax(logits_BV, axis=-1)


def inverse_cdf(logp_BV: jax.Array, u_B: jax.Array) -> jax.Array:
    """Index i with CDF(i - 1) <= u < CDF(i), found block-wise; never picks a zero-prob entry."""
    b, v = logp_BV.shape
    nb = -(-v // _BLOCK)
    p_BV = jnp.exp(logp_BV)
    p_BNK = jnp.pad(p_BV, ((0, 0), (0, nb * _BLOCK - v))).reshape(b, nb, _BLOCK)
    block_sum_BN = jnp.sum(p_BNK, axis=-1)
    cum_BN = jnp.cumsum(block_sum_BN, axis=-1)
    target_B = u_B * cum_BN[:, -1]
    last_block = jnp.max(jnp.where(block_sum_BN > 0, jnp.arange(nb), 0), axis=-1)
    blk_B = jnp.minimum(jnp.sum(cum_BN <= target_B[:, None], axis=-1), last_block)
    before_B = jnp.take_along_axis(cum_BN - block_sum_BN, blk_B[:, None], axis=1)[:, 0]
    inner_BK = jnp.take_along_axis(p_BNK, blk_B[:, None, None], axis=1)[:, 0]
    inner_cum_BK = jnp.cumsum(inner_BK, axis=-1) + before_B[:, None]
    last_in = jnp.max(jnp.where(inner_BK > 0, jnp.arange(_BLOCK), 0), axis=-1)
    first_in = jnp.argmax(inner_BK > 0, axis=-1)
    j_B = jnp.clip(jnp.sum(inner_cum_BK <= target_B[:, None], axis=-1), first_in, last_in)
    return (blk_B * _BLOCK + j_B).astype(jnp.int32)
