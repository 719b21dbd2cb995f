"""Model FLOPs per token and the peak FLOP/s of known accelerators, for model FLOPs utilisation (MFU).

    mfu = tokens_per_s * model_flops_per_token(cfg, seq_len) / (peak_flops_per_device * n_devices)

The estimate is PaLM's (Chowdhery et al. 2022, appendix B): a forward and backward pass cost
6 FLOPs per matmul weight per token (2 forward, 4 backward), plus the attention score and value
matmuls, 12 * n_layers * n_heads * head_dim * seq_len per token (the full L x L products: causal
masking does not halve what XLA computes). Model FLOPs count only useful work: tokens are the
real (unpadded) tokens, and rematerialisation's recomputation is not counted (that would be
hardware FLOPs utilisation).
"""

from __future__ import annotations

import jax

from cai_jax.nn.config import ModelConfig

__all__ = ["matmul_params", "model_flops_per_token", "PEAK_FLOPS", "peak_flops_per_device", "resolve_peak_flops"]

# Dense bf16 peak FLOP/s per device (vendor data sheets, without sparsity), keyed by a substring of
# `jax.Device.device_kind`. Checked in order, so the more specific names come first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),  # same compute as H100 SXM, more memory
    ("A100", 312e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5"
    ("TPU v4", 275e12),
)


def matmul_params(cfg: ModelConfig, *, lm_head: bool = True, score_head: bool = False) -> int:
    """N of the 6N term: the weights every token multiplies by.

    Counts the attention projections (q, k, v, o), the MLP (gate, up, down) of every layer, and
    the output projection V x E when `lm_head` (the tied embedding matrix counts here, since the
    logits matmul uses it). Leaves out the embedding lookup (a gather, no FLOPs), norm scales and
    biases (elementwise, negligible). `score_head` adds the E x 1 scalar head of a `ScalarModel`.
    """
    e, m, h, kv, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn = e * h * d * 2 + e * kv * d * 2
    mlp = 3 * e * m
    n = cfg.num_layers * (attn + mlp)
    if lm_head:
        n += cfg.vocab_size * e
    if score_head:
        n += e
    return n


def model_flops_per_token(cfg: ModelConfig, seq_len: int, *, lm_head: bool = True, score_head: bool = False) -> float:
    """Training FLOPs per token: 6 * matmul_params + 12 * n_layers * n_heads * head_dim * seq_len.

    Args:
      cfg: the model.
      seq_len: the padded sequence length the model runs at (attention cost grows with it).
      lm_head: count the V x E logits matmul (True for language models, False for a PM / value
        model, which reads the final hidden state with a scalar head instead).
      score_head: count the E x 1 score head.

    Returns:
      FLOPs of one forward + backward pass, per token.
    """
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * int(seq_len)
    return float(6 * matmul_params(cfg, lm_head=lm_head, score_head=score_head) + attention)


def peak_flops_per_device(device_kind: str | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of one device, from `PEAK_FLOPS`; None for CPUs and unknown kinds.

    Args:
      device_kind: e.g. "NVIDIA H100 80GB HBM3" or "TPU v4"; default the first local device's.
    """
    if device_kind is None:
        device_kind = jax.local_devices()[0].device_kind
    for key, peak in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return peak
    return None


def resolve_peak_flops(peak: float | str | None) -> float | None:
    """A loop's `peak_flops_per_device` argument: "auto" looks it up, None disables MFU, a number is used."""
    if peak is None:
        return None
    if isinstance(peak, str):
        if peak != "auto":
            raise ValueError(f"peak_flops_per_device={peak!r}; expected 'auto', None or FLOP/s as a number")
        return peak_flops_per_device()
    if not float(peak) > 0:
        raise ValueError(f"peak_flops_per_device={peak} must be > 0 (or None to not report MFU)")
    return float(peak)
