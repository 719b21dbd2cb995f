"""The CPU bf16 matmuls with row-major backward (`cpu_matmul.matmul`, `matmul_t`, `dot_f32`) compute
the same values and gradients as plain `dot_general` on the same bf16 inputs.

Reference: float32 math on the bf16 inputs. The patched backward rounds the incoming gradient to
bf16 before its two matmuls (that is what keeps them in the bf16 kernel), so gradients agree to
bf16 precision: relative error below 2^-7 of the largest entry, set once here. Forward values are
float32 sums of exact bf16 products, so they agree up to the order of summation: within
K * 2^-24 * sum_k |x_nk w_km| per entry (the standard bound for a K-term float32 sum), not within a
relative tolerance, which fails wherever the terms cancel.
"""

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax.nn import cpu_matmul

BF16_TOL = 2.0**-7


def _close(a, b, tol=BF16_TOL):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * float(np.abs(b).max()))


def _sum_order_atol(x, w):
    x, w = np.abs(np.asarray(x, np.float32)), np.abs(np.asarray(w, np.float32))
    return x.shape[1] * 2.0**-24 * (x @ w)


def _inputs(*shapes, seed=0):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(k, s, jnp.float32).astype(jnp.bfloat16) for k, s in zip(keys, shapes)]


def test_matmul_values_and_gradients_match_plain_dot():
    x, w = _inputs((24, 16), (16, 12))
    c = jax.random.normal(jax.random.key(9), (24, 12), jnp.float32)

    def patched(x, w):
        return jnp.sum(cpu_matmul.matmul(x, w) * c)

    def plain(x, w):
        return jnp.sum(jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32)) * c)

    got = np.asarray(cpu_matmul.matmul(x, w))
    want = np.asarray(jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32)))
    assert np.all(np.abs(got - want) <= _sum_order_atol(x, w))
    gx, gw = jax.grad(patched, argnums=(0, 1))(x, w)
    rx, rw = jax.grad(plain, argnums=(0, 1))(x, w)
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    _close(gx, rx)
    _close(gw, rw)


def test_tied_head_matmul_t_matches_plain_dot():
    h, emb = _inputs((10, 16), (40, 16), seed=1)
    c = jax.random.normal(jax.random.key(3), (10, 40), jnp.float32)

    def patched(h, emb):
        return jnp.sum(cpu_matmul.matmul_t(h, emb) * c)

    def plain(h, emb):
        return jnp.sum(jnp.dot(h.astype(jnp.float32), emb.astype(jnp.float32).T) * c)

    gh, ge = jax.grad(patched, argnums=(0, 1))(h, emb)
    rh, re = jax.grad(plain, argnums=(0, 1))(h, emb)
    _close(gh, rh)
    _close(ge, re)


def test_dot_f32_dispatch_keeps_shapes_and_values():
    # A projection with two contracting dims ([B, T, H, D] x [H, D, E]) and one with an output
    # head axis ([B, T, E] x [E, H, D]) go through `_matmul` on CPU; results equal plain dots.
    x4, w3 = _inputs((2, 3, 4, 8), (4, 8, 6), seed=2)
    dn = (((2, 3), (0, 1)), ((), ()))
    out = cpu_matmul.dot_f32(x4, w3, dn)
    ref = jax.lax.dot_general(x4, w3, dn, preferred_element_type=jnp.float32)
    assert out.shape == ref.shape == (2, 3, 6) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    x3, w3b = _inputs((2, 3, 6), (6, 4, 8), seed=4)
    dn = (((2,), (0,)), ((), ()))
    np.testing.assert_allclose(
        cpu_matmul.dot_f32(x3, w3b, dn),
        jax.lax.dot_general(x3, w3b, dn, preferred_element_type=jnp.float32),
        rtol=1e-6,
        atol=1e-6,
    )
    # float32 inputs: a plain 2-d dot (no custom VJP), the same numbers.
    xf, wf = x4.astype(jnp.float32), w3.astype(jnp.float32)
    dn = (((2, 3), (0, 1)), ((), ()))
    np.testing.assert_array_equal(
        cpu_matmul.dot_f32(xf, wf, dn), jax.lax.dot_general(xf, wf, dn, preferred_element_type=jnp.float32)
    )


def test_projections_and_their_gradients_are_2d_dots_on_cpu():
    # On CPU a [B, L, E] x [E, M] projection runs as one [B*L, E] x [E, M] dot, forward and
    # backward, in float32 too: XLA's CPU backend computed the weight gradient that contracts B and
    # L together ~1.3x slower than the 2-d one (BENCHMARKS.md). Under `disabled` it stays 3-d.
    x, w = (a.astype(jnp.float32) for a in _inputs((2, 5, 8), (8, 6), seed=6))
    dn = (((2,), (0,)), ((), ()))

    def dot_ranks():
        loss = lambda x, w: jnp.sum(jnp.tanh(cpu_matmul.dot_f32(x, w, dn)))  # noqa: E731
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w)
        return sorted({len(e.invars[0].aval.shape) for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"})

    assert dot_ranks() == [2]
    with cpu_matmul.disabled():
        assert 3 in dot_ranks()
