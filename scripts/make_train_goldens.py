"""Writes tests/testdata/train_step_golden.json: frozen metrics of one SFT and one PM train step.

Run from the repository root after an intended change to the model, losses or optimizer:

    python scripts/make_train_goldens.py

Setup (nanodo's "one step on a tiny config against frozen reference numbers"): tiny_config("llama"),
params from key(0), a fixed synthetic batch from np.random.default_rng(0), AdamW lr 1e-3, no warmup,
constant schedule, clip 1.0. Two steps are run on the same batch; the golden holds the loss and
gradient norm of the first (init params) and the loss of the second (after one update), for SFT
and for the PM. tests/test_train_steps.py recomputes them with the functions below.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GOLDEN = ROOT / "tests" / "testdata" / "train_step_golden.json"

from cai_jax.models import ScalarModel, Transformer, init_params, tiny_config  # noqa: E402
from cai_jax.train.state import OptimConfig, TrainState, make_optimizer  # noqa: E402
from cai_jax.train.steps import pm_step, sft_step  # noqa: E402

# Every field spelled out: the goldens are frozen, so their setup must not follow configs/base.py.
OPTIM = OptimConfig(
    lr=1e-3,
    warmup_steps=0,
    schedule="constant",
    total_steps=2,  # the two steps below (a constant schedule does not read it)
    min_lr_ratio=0.1,
    weight_decay=0.0,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    grad_clip_norm=1.0,
    grad_accum_steps=1,
    frozen=(),
)
B, L = 4, 16


def golden_config():
    return tiny_config("llama")


@functools.cache
def _host_params(objective: str) -> dict:
    cfg = golden_config()
    if objective == "sft":
        params = init_params(cfg, jax.random.key(0))
    else:
        variables = ScalarModel(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        params = nn.meta.unbox(variables["params"])
    return jax.tree.map(np.array, params)  # host copies


def sft_params() -> dict:
    """Transformer params from key(0) (fresh device arrays each call: the steps donate them)."""
    return jax.tree.map(jnp.array, _host_params("sft"))


def pm_params() -> dict:
    """ScalarModel params from key(0): head kernel N(0, 1e-3^2), bias 0 (fresh device arrays)."""
    return jax.tree.map(jnp.array, _host_params("pm"))


@functools.cache
def golden_step(objective: str):
    """(model, optimizer, jitted donating step) for "sft" or "pm"; cached so tests reuse the compile."""
    cfg = golden_config()
    if objective == "sft":
        model, step_fn, params = Transformer(cfg), sft_step, _host_params("sft")
    else:
        model, step_fn, params = ScalarModel(cfg), pm_step, _host_params("pm")
    optimizer = make_optimizer(OPTIM, params)
    step = jax.jit(functools.partial(step_fn, model=model, optimizer=optimizer), donate_argnums=0)
    return model, optimizer, step


def _padded(rng, vocab):
    """[B, L] tokens and mask: row 0 full, row 1 right-padded by 5, row 2 left-padded by 4, row 3 full."""
    tokens = rng.integers(3, vocab, size=(B, L)).astype(np.int32)
    mask = np.ones((B, L), bool)
    mask[1, L - 5 :] = False
    mask[2, :4] = False
    return np.where(mask, tokens, 0).astype(np.int32), mask


def sft_batch() -> dict:
    """Prompt = the first real tokens of each row, response = the rest (6 response tokens or more)."""
    rng = np.random.default_rng(0)
    tokens, mask = _padded(rng, golden_config().vocab_size)
    prompt_len = np.array([5, 4, 6, 8])
    first_real = np.argmax(mask, axis=1)
    idx = np.arange(L)[None, :]
    loss_mask = mask & (idx >= (first_real + prompt_len)[:, None])
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def pm_batch() -> dict:
    """Two independently drawn padded halves and soft targets p ~ U(0, 1)."""
    rng = np.random.default_rng(0)
    vocab = golden_config().vocab_size
    tokens_a, mask_a = _padded(rng, vocab)
    tokens_b, mask_b = _padded(rng, vocab)
    p = rng.uniform(0.0, 1.0, size=(B,)).astype(np.float32)
    return {"tokens_a": tokens_a, "mask_a": mask_a, "tokens_b": tokens_b, "mask_b": mask_b, "p": p}


def _two_steps(objective: str, params, batch) -> dict:
    _, optimizer, step = golden_step(objective)
    state = TrainState.create(params, optimizer, jax.random.key(0))
    state, m0 = step(state, batch)
    state, m1 = step(state, batch)
    return {"loss": float(m0["loss"]), "grad_norm": float(m0["grad_norm"]), "loss_after": float(m1["loss"])}


def compute_metrics() -> dict:
    """{"sft": {...}, "pm": {...}} with keys loss (init), grad_norm (init), loss_after (after one update)."""
    return {
        "sft": _two_steps("sft", sft_params(), sft_batch()),
        "pm": _two_steps("pm", pm_params(), pm_batch()),
    }


def main():
    metrics = compute_metrics()
    out = {
        "_about": "scripts/make_train_goldens.py: one SFT and one PM step on tiny_config('llama'), fp32 on CPU",
        "jax_version": jax.__version__,
        **metrics,
    }
    GOLDEN.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {GOLDEN}: {json.dumps(metrics)}")


if __name__ == "__main__":
    main()
