"""Train-step throughput: our SFT and PM steps vs transformers + PyTorch AdamW, same batch.

    pip install -e .[bench]        # torch==2.13.0 (CPU)
    python benchmarks/bench_train.py --batch 8 --seq-len 256

SFT: next-token loss on the response half of each row, AdamW (lr 1e-5, weight decay 0.01, grad
clip 1.0). PM: two sequences per pair through the model, scalar head at the last token, the
soft-target pairwise loss, same optimizer. Both sides start from the embedded SmolLM2-135M-Instruct
weights in fp32, run a warm-up step (compile excluded), then --steps timed steps. Tokens/s counts
every token the step reads (SFT: batch x seq_len; PM: 2 x batch x seq_len).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # glibc malloc tunables for both sides of the comparison (cai_jax/runtime.py)
    from cai_jax.runtime import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.bench_sampler import _auto, _commit, _machine  # noqa: E402
from cai_jax.models import ScalarModel, load_pretrained  # noqa: E402
from cai_jax.nn.precision import resolve_dtype  # noqa: E402
from cai_jax.train.pm import scalar_model_params  # noqa: E402
from cai_jax.train.state import OptimConfig, TrainState, make_optimizer  # noqa: E402
from cai_jax.train.steps import pm_step, sft_step  # noqa: E402
from configs.base import optim  # noqa: E402


def _batches(vocab, batch, seq_len, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (batch, seq_len)).astype(np.int32)
    loss_mask = np.zeros((batch, seq_len), bool)
    loss_mask[:, seq_len // 2 :] = True
    sft = {"tokens": tokens, "mask": np.ones_like(loss_mask), "loss_mask": loss_mask}
    tokens_b = rng.integers(3, vocab, (batch, seq_len)).astype(np.int32)
    pm = {
        "tokens_a": tokens,
        "mask_a": np.ones_like(loss_mask),
        "tokens_b": tokens_b,
        "mask_b": np.ones_like(loss_mask),
        "p": rng.uniform(0, 1, batch).astype(np.float32),
    }
    return sft, pm


def bench_optim(steps: int) -> OptimConfig:
    """configs/base.py's `optim` at lr 1e-5 with weight decay 0.01 and a constant schedule (PyTorch's
    AdamW has none); `steps` is the schedule length `from_config` derives, unread when constant."""
    return OptimConfig.from_config(
        {**optim(1e-5).to_dict(), "weight_decay": 0.01, "schedule": "constant"}, updates=steps
    )


def _time(fn, steps):
    fn()  # warm-up / compile
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def bench_ours(lm, sft_batch, pm_batch, steps, ocfg):
    model = lm.model
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (the steps donate their state)
    opt = make_optimizer(ocfg, lm.params)
    state = {"s": TrainState.create(copy(lm.params), opt, jax.random.key(0))}
    step = jax.jit(functools.partial(sft_step, model=model, optimizer=opt), donate_argnums=0)

    def run_sft():
        state["s"], m = step(state["s"], sft_batch)
        jax.block_until_ready(m["loss"])

    sft_s = _time(run_sft, steps)
    pm_model = ScalarModel(lm.config)
    pm_params = scalar_model_params(copy(lm.params), lm.config, seed=1)
    pm_opt = make_optimizer(ocfg, pm_params)
    pm_state = {"s": TrainState.create(pm_params, pm_opt, jax.random.key(0))}
    pstep = jax.jit(functools.partial(pm_step, model=pm_model, optimizer=pm_opt), donate_argnums=0)

    def run_pm():
        pm_state["s"], m = pstep(pm_state["s"], pm_batch)
        jax.block_until_ready(m["loss"])

    return sft_s, _time(run_pm, steps)


def bench_torch(folder, sft_batch, pm_batch, steps, ocfg, autocast=False):
    """autocast: forward passes under `torch.autocast("cpu", torch.bfloat16)` (fp32 master weights,
    AdamW in fp32), PyTorch's counterpart of our bf16 matmuls."""
    import contextlib

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=ocfg.lr, weight_decay=ocfg.weight_decay, betas=(ocfg.b1, ocfg.b2))
    tokens = torch.tensor(sft_batch["tokens"], dtype=torch.long)
    labels = tokens.clone()
    labels[:, : tokens.shape[1] // 2] = -100

    def run_sft():
        opt.zero_grad(set_to_none=True)
        with amp():
            logits = model(input_ids=tokens).logits
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ocfg.grad_clip_norm)
        opt.step()

    sft_s = _time(run_sft, steps)
    backbone = model.model
    head = torch.nn.Linear(backbone.config.hidden_size, 1)
    params = list(backbone.parameters()) + list(head.parameters())
    popt = torch.optim.AdamW(params, lr=ocfg.lr, weight_decay=ocfg.weight_decay, betas=(ocfg.b1, ocfg.b2))
    both = torch.cat([tokens, torch.tensor(pm_batch["tokens_b"], dtype=torch.long)])
    p = torch.tensor(pm_batch["p"])

    def run_pm():
        popt.zero_grad(set_to_none=True)
        with amp():
            h = backbone(input_ids=both).last_hidden_state[:, -1]
            r = head(h)[:, 0].float()
        ra, rb = r.chunk(2)
        m = ra - rb
        loss = -(p * F.logsigmoid(m) + (1 - p) * F.logsigmoid(-m)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, ocfg.grad_clip_norm)
        popt.step()

    return sft_s, _time(run_pm, steps)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--remat", default="none", help="our remat policy (none | full | dots)")
    ap.add_argument(
        "--dtype",
        default="auto",
        help="our matmul dtype (params stay fp32 master weights); auto = the configs' default",
    )
    ap.add_argument(
        "--torch", default="fp32", help="reference precisions, comma-separated: fp32, autocast-bf16 (one row each)"
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch_modes = args.torch.split(",")
    if not set(torch_modes) <= {"fp32", "autocast-bf16"}:
        ap.error(f"--torch: expected fp32 and/or autocast-bf16, got {args.torch!r}")
    ocfg = bench_optim(args.steps)
    dtype = resolve_dtype(args.dtype)  # what model.dtype = "auto" runs here (cai_jax/nn/precision.py)
    lm = load_pretrained(args.model, remat=args.remat, dtype=dtype)
    sft_batch, pm_batch = _batches(lm.config.vocab_size, args.batch, args.seq_len)
    ours = bench_ours(lm, sft_batch, pm_batch, args.steps, ocfg)
    refs = [bench_torch(lm.path, sft_batch, pm_batch, args.steps, ocfg, autocast=m != "fp32") for m in torch_modes]
    n = args.batch * args.seq_len
    rows = []
    import torch
    import transformers

    ref_name = f"transformers {transformers.__version__} + torch {torch.__version__}"
    for name, (sft_s, pm_s) in (
        (f"cai_jax ({'fp32' if dtype == 'float32' else dtype + ' matmuls, fp32 params'}{_auto(args.dtype)})", ours),
        *((f"{ref_name} ({m})", r) for m, r in zip(torch_modes, refs)),
    ):
        rows.append({"impl": name, "sft_tokens_per_s": n / sft_s, "pm_tokens_per_s": 2 * n / pm_s})
    meta = {
        "command": "python " + " ".join(sys.argv),
        "machine": _machine(),
        "commit": _commit(),
        "jax": jax.__version__,
    }
    print(f"machine: {meta['machine']}; commit {meta['commit']}; jax {meta['jax']}")
    print(f"command: {meta['command']}; batch {args.batch} x {args.seq_len} tokens, AdamW\n")
    print("| implementation | SFT tokens/s | PM tokens/s |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['impl']} | {r['sft_tokens_per_s']:.1f} | {r['pm_tokens_per_s']:.1f} |")
    print()
    for ref in rows[1:]:
        print(
            f"speedup vs {ref['impl']}: SFT {rows[0]['sft_tokens_per_s'] / ref['sft_tokens_per_s']:.2f}x, "
            f"PM {rows[0]['pm_tokens_per_s'] / ref['pm_tokens_per_s']:.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
