"""Model FLOPs per token (PaLM's 6N + attention estimate) and the peak FLOP/s table."""

import pytest

from cai_jax.models import tiny_config
from cai_jax.train.flops import matmul_params, model_flops_per_token, peak_flops_per_device, resolve_peak_flops


def test_flops_per_token_by_hand():
    cfg = tiny_config("llama")  # E=64, M=128, 2 layers, 4 heads, 2 kv heads, head_dim 16, V=256
    # Per layer: q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12288; MLP 3*64*128 = 24576.
    # Two layers: 73728; logits matmul 256*64 = 16384 -> N = 90112.
    assert matmul_params(cfg) == 90112
    assert matmul_params(cfg, lm_head=False, score_head=True) == 73728 + 64
    # 6N + 12 * layers * heads * head_dim * L at L = 32: 540672 + 12*2*64*32 = 540672 + 49152.
    assert model_flops_per_token(cfg, 32) == 589824.0
    # Untied embeddings multiply the same V x E matrix shape: N does not change.
    assert matmul_params(tiny_config("qwen2")) == 90112


def test_peak_flops_table():
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_per_device("NVIDIA H200") == 989e12
    assert peak_flops_per_device("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_per_device("TPU v4") == 275e12
    assert peak_flops_per_device("TPU v5 lite") == 197e12
    assert peak_flops_per_device("cpu") is None
    assert resolve_peak_flops(None) is None
    assert resolve_peak_flops(1e12) == 1e12
    with pytest.raises(ValueError, match="peak_flops_per_device"):
        resolve_peak_flops("fast")
