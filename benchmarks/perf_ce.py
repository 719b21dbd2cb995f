"""Tied LM head + SFT cross-entropy, forward + backward: current formulation vs a fused, chunked
one that never materialises the [N, V] fp32 logits or their gradient (issue 4 perf exploration).

    python benchmarks/perf_ce.py [--batch 8] [--seq-len 256] [--chunk 512] [--reps 3]

current: logits = einsum(h, emb) -> losses.sft_loss -> grad wrt (h, emb) by autodiff.
fused:   custom_vjp; the forward walks token chunks (lax.map): logits_c = h_c emb^T, loss terms
         and g_c = (softmax_c - onehot_c) * w / count, then dh_c = g_c emb and
         d_emb += g_c^T h_c, so the backward is a multiply by the incoming scalar cotangent.
Same FLOPs (no recompute); interleaved in one process, medians; also checks loss/grads agree.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cai_jax.losses import sft_loss  # noqa: E402


def current(h, emb, targets, mask):
    logits = jnp.einsum("bte,ve->btv", h, emb, preferred_element_type=jnp.float32)
    return sft_loss(logits, targets, mask)[0]


def make_fused(chunk):
    def _parts(h, emb, targets, mask):
        b, t, e = h.shape
        n = b * t
        pad = (-n) % chunk
        hf = jnp.pad(h.reshape(n, e), ((0, pad), (0, 0))).reshape(-1, chunk, e)
        tf = jnp.pad(targets.reshape(n).astype(jnp.int32), (0, pad)).reshape(-1, chunk)
        wf = jnp.pad(mask.reshape(n).astype(jnp.float32), (0, pad)).reshape(-1, chunk)
        count = jnp.maximum(jnp.sum(wf), 1.0)

        def body(carry, xs):
            d_emb, total = carry
            hc, tc, wc = xs
            logits = jax.lax.dot_general(hc, emb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            m = jnp.max(logits, axis=-1, keepdims=True)
            p = jnp.exp(logits - m)
            s = jnp.sum(p, axis=-1, keepdims=True)
            lse = (m + jnp.log(s))[:, 0]
            tgt = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
            total = total + jnp.sum(jnp.where(wc != 0, (lse - tgt) * wc, 0.0))
            g = p / s
            g = g.at[jnp.arange(chunk), tc].add(-1.0) * (wc / count)[:, None]
            dh = jax.lax.dot_general(g, emb, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            d_emb = d_emb + jax.lax.dot_general(g, hc, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            return (d_emb, total), dh

        (d_emb, total), dh = jax.lax.scan(body, (jnp.zeros_like(emb), jnp.zeros((), jnp.float32)), (hf, tf, wf))
        dh = dh.reshape(-1, e)[:n].reshape(b, t, e)
        return total / count, dh, d_emb

    @jax.custom_vjp
    def fused(h, emb, targets, mask):
        return _parts(h, emb, targets, mask)[0]

    def fwd(h, emb, targets, mask):
        loss, dh, d_emb = _parts(h, emb, targets, mask)
        return loss, (dh, d_emb, targets, mask)

    def bwd(res, ct):
        dh, d_emb, targets, mask = res
        z = lambda x: (
            np.zeros(x.shape, jax.dtypes.float0) if not jnp.issubdtype(x.dtype, jnp.floating) else jnp.zeros_like(x)
        )  # noqa: E731
        return ct * dh, ct * d_emb, z(targets), z(mask)

    fused.defvjp(fwd, bwd)
    return fused


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    b, t, e, v = a.batch, a.seq_len - 1, 576, 49152
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k1, (b, t, e))
    emb = 0.02 * jax.random.normal(k2, (v, e))
    targets = jax.random.randint(k3, (b, t), 0, v)
    mask = jnp.broadcast_to(jnp.arange(t) >= t // 2, (b, t))
    fns = {
        "current": jax.jit(jax.value_and_grad(current, argnums=(0, 1))),
        f"fused chunk {a.chunk}": jax.jit(jax.value_and_grad(make_fused(a.chunk), argnums=(0, 1))),
    }
    outs = {k: jax.block_until_ready(f(h, emb, targets, mask)) for k, f in fns.items()}
    (l0, (dh0, de0)), (l1, (dh1, de1)) = outs.values()
    rel = lambda x, y: float(jnp.linalg.norm(x - y) / jnp.linalg.norm(x))  # noqa: E731
    print(f"loss {float(l0):.7g} vs {float(l1):.7g}; rel err dh {rel(dh0, dh1):.2e}, d_emb {rel(de0, de1):.2e}")
    ts = {k: [] for k in fns}
    for _ in range(a.reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(h, emb, targets, mask))
            ts[k].append(time.perf_counter() - t0)
    for k, v_ in ts.items():
        print(f"{k:20s} {statistics.median(v_) * 1e3:9.1f} ms  (head + loss fwd+bwd, {b}x{t} tokens)")


if __name__ == "__main__":
    main()
