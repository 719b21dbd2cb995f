"""Where the time goes: the diagnostics quoted in BENCHMARKS.md ("Reading the figures", leads).

    python benchmarks/profile_steps.py decode   # decode-only step vs KV-cache length, batch 64
    python benchmarks/profile_steps.py train    # forward vs forward+backward, whole model and parts

SmolLM2-135M-Instruct, fp32, each figure the mean of a few calls after a compile call.
"""

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cai_jax.models import init_cache, load_pretrained  # noqa: E402
from cai_jax.nn.llama import MLP, Block  # noqa: E402


def _time(name, fn, *args, n=3, per=1, unit="ms"):
    out = fn(*args)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn(*args)
    jax.block_until_ready(out)
    dt = (time.perf_counter() - t0) / n / per
    print(f"{name:42s} {dt * 1e3:9.1f} ms")
    return dt


def decode(lm, batch=64, steps=8):
    cfg = lm.config
    for length in (16, 128, 512):

        def loop(p, cache, mask):
            def body(i, c):
                tok = jnp.zeros((batch, 1), jnp.int32)
                _, c = lm.model.apply({"params": p}, tok, jnp.full((batch, 1), i), c, i, mask, method="decode")
                return c  # logits unused: the LM head is left out of this figure

            return jax.lax.fori_loop(0, steps, body, cache)

        f = jax.jit(loop, donate_argnums=(1,))
        cache, mask = init_cache(cfg, batch, length), jnp.ones((batch, length), bool)
        cache = f(lm.params, cache, mask)
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        cache = f(lm.params, cache, mask)
        jax.block_until_ready(cache)
        print(
            f"decode step, batch {batch}, cache {length:4d} (no head) {(time.perf_counter() - t0) / steps * 1e3:9.1f} ms"
        )
    h = jnp.ones((batch, 1, cfg.hidden_size))
    _time(
        f"LM head, batch {batch}", jax.jit(lambda p, x: lm.model.apply({"params": p}, x, method="logits")), lm.params, h
    )


def train(lm, batch=16, length=256):
    cfg = lm.config
    tok = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, length)), jnp.int32)
    hid = lambda p: lm.model.apply({"params": p}, tok, return_hidden=True)  # noqa: E731
    fwd = _time(f"model forward ({batch}x{length} tokens)", jax.jit(hid), lm.params, n=1)
    print(f"{'':42s} {batch * length / fwd:9.0f} tokens/s")
    _time("model forward+backward", jax.jit(jax.grad(lambda p: hid(p)[:, -1].sum())), lm.params, n=1)
    x = jax.random.normal(jax.random.key(0), (batch, length, cfg.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(length), (batch, length))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))
    p0 = lm.params["layers_0"]
    blk = lambda p, x: Block(cfg).apply({"params": p}, x, pos, mask)[0]  # noqa: E731
    _time("one block forward", jax.jit(blk), p0, x)
    _time("one block forward+backward", jax.jit(jax.grad(lambda p, x: blk(p, x).sum(), argnums=(0, 1))), p0, x)
    mlp = lambda p, x: MLP(cfg).apply({"params": p}, x)  # noqa: E731
    _time("one MLP forward", jax.jit(mlp), p0["mlp"], x)
    _time("one MLP forward+backward", jax.jit(jax.grad(lambda p, x: mlp(p, x).sum(), argnums=(0, 1))), p0["mlp"], x)


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "decode"
    model = load_pretrained("smollm2-135m-instruct", with_tokenizer=False)
    {"decode": decode, "train": train}[mode](model)
