"""The projections' matmuls on the CPU: 2-d products, and a bf16 backward that stays in XLA's bf16 kernel.

Matmuls take inputs in cfg.dtype and accumulate and return float32 (bf16 x bf16 -> f32 is the
fast path on CPUs with AVX512-BF16 and on accelerators); the result is then cast to the
activation dtype. On the CPU backend every projection runs as a 2-d [N, K] x [K, M] product
(`dot_f32`), and bf16 projections go through `matmul` / `matmul_t`, custom VJPs whose backward
dots are plain row-major products (see `_row_major_t` for why); elsewhere `dot_f32` is plain
`dot_general`.

    y = cpu_matmul.dot_f32(x, w, (((2,), (0,)), ((), ())))     # the Dense layers' dot_general
    with cpu_matmul.disabled():                              # trace as for an accelerator
        ...
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp

__all__ = ["dot_f32", "matmul", "matmul_t", "applies", "on_cpu", "disabled"]

_ENABLED = [True]

_dot_f32_plain = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)


def _row_major_t(a_NK: jax.Array) -> jax.Array:
    """`a.T` [K, N] copied into a fresh row-major buffer.

    XLA CPU gives a transpose the permuted layout and folds it into the consuming dot; a bf16 dot
    with such an operand is upcast to f32 (operand_upcaster), and one contracting the leading dim
    of both operands (every weight gradient x^T dy) runs in Eigen instead of YNNPACK: the backward
    of a bf16 matmul ran at fp32 speed. The barrier keeps the transpose from being folded back
    and the size-1 reduce gives the copy the default layout, so both backward dots stay
    bf16 x bf16 -> f32 in YNNPACK (~2x faster here; the copy costs ~1% of the dot).
    """
    return jnp.sum(jax.lax.optimization_barrier(a_NK.T)[..., None], axis=-1)


def _mm(a_NK, b_KM):
    return jax.lax.dot_general(a_NK, b_KM, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


@jax.custom_vjp
def matmul(x_NK: jax.Array, w_KM: jax.Array) -> jax.Array:
    """x @ w -> float32, whose backward matmuls are plain row-major [N, K] x [K, M] dots."""
    return _mm(x_NK, w_KM)


def _matmul_fwd(x_NK, w_KM):
    return _mm(x_NK, w_KM), (x_NK, w_KM)


def _matmul_bwd(res, dy_NM):
    x_NK, w_KM = res
    dy_NM = dy_NM.astype(x_NK.dtype)
    return _mm(dy_NM, _row_major_t(w_KM)).astype(x_NK.dtype), _mm(_row_major_t(x_NK), dy_NM).astype(w_KM.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def matmul_t(x_NK: jax.Array, e_MK: jax.Array) -> jax.Array:
    """x @ e.T -> float32 (the tied LM head, e = embedding [V, E]); row-major backward as above."""
    return jax.lax.dot_general(x_NK, e_MK, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _matmul_t_fwd(x_NK, e_MK):
    return matmul_t(x_NK, e_MK), (x_NK, e_MK)


def _matmul_t_bwd(res, dy_NM):
    x_NK, e_MK = res
    dy_NM = dy_NM.astype(x_NK.dtype)
    return _mm(dy_NM, e_MK).astype(x_NK.dtype), _mm(_row_major_t(dy_NM), x_NK).astype(e_MK.dtype)


matmul_t.defvjp(_matmul_t_fwd, _matmul_t_bwd)


def on_cpu() -> bool:
    """Whether dots are traced for XLA's CPU backend (flattened to 2-d, see `dot_f32`), unless `disabled`."""
    return _ENABLED[0] and jax.default_backend() == "cpu"


def applies(x: jax.Array) -> bool:
    """Whether a dot with bf16 input `x` takes the custom-VJP path: on the CPU backend, unless `disabled`."""
    return x.dtype == jnp.bfloat16 and on_cpu()


@contextlib.contextmanager
def disabled():
    """Within: every dot is plain `dot_general` (traces the program an accelerator would run)."""
    before = _ENABLED[0]
    _ENABLED[0] = False
    try:
        yield
    finally:
        _ENABLED[0] = before


def dot_f32(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`dot_general` -> float32.

    On CPU a dot contracting lhs's trailing dims with rhs's leading dims (every projection) runs
    as one [N, K] x [K, M] product: given [B, L, E] activations, XLA's CPU backend computed the
    weight gradient (contracting B and L together) ~1.3x slower than the 2-d product's (an fp32
    MLP forward+backward, 8 x 256 tokens of SmolLM2-135M: 364 -> 271 ms; BENCHMARKS.md). bf16
    dots then take `matmul`, so their backward runs in bf16 too.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    n = len(lc)
    plain = not lb and not rb and tuple(lc) == tuple(range(lhs.ndim - n, lhs.ndim)) and tuple(rc) == tuple(range(n))
    if not (plain and on_cpu()):
        return _dot_f32_plain(lhs, rhs, dimension_numbers, precision)
    k = math.prod(rhs.shape[:n])
    x_NK, w_KM = lhs.reshape(-1, k), rhs.reshape(k, -1)
    if applies(lhs) and rhs.dtype == lhs.dtype:
        y = matmul(x_NK, w_KM)
    else:
        y = _dot_f32_plain(x_NK, w_KM, (((1,), (0,)), ((), ())), precision)
    return y.reshape(lhs.shape[: lhs.ndim - n] + rhs.shape[n:])
