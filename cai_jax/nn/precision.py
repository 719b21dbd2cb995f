"""The matmul input dtype "auto" resolves to: bfloat16 where the hardware multiplies bf16 natively, else float32.

    resolve_dtype("auto")        # "bfloat16" on a GPU / TPU, or a CPU with AVX512-BF16 or AMX-BF16
    resolve_dtype("float32")     # any explicit dtype is returned as it is

bf16 here means bf16 matmul *inputs* with float32 accumulation (`nn/cpu_matmul.py` on the CPU);
master weights (`param_dtype`), losses, softmax and the optimizer stay float32. On a CPU without
bf16 dot instructions a bf16 matmul is emulated and slower than fp32, so "auto" keeps fp32 there.
Configs resolve it once, when they are loaded (`experiments.config_util.load_config`), so the
run's recorded config and its stage hashes hold the dtype that ran.
"""

from __future__ import annotations

import functools

__all__ = ["AUTO", "BF16_CPU_FLAGS", "cpu_has_bf16_dot", "resolve_dtype"]

AUTO = "auto"
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 dot products (x86)


@functools.cache
def cpu_has_bf16_dot(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU lists a native bf16 dot-product instruction set (Linux x86; False elsewhere)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return bool(set(line.split(":", 1)[1].split()) & set(BF16_CPU_FLAGS))
    except OSError:
        pass
    return False


def resolve_dtype(dtype: str, backend: str | None = None) -> str:
    """`dtype`, with "auto" replaced by "bfloat16" or "float32" for `backend` (default: JAX's)."""
    if dtype != AUTO:
        return dtype
    if backend is None:
        import jax

        backend = jax.default_backend()
    if backend != "cpu":
        return "bfloat16"
    return "bfloat16" if cpu_has_bf16_dot() else "float32"
