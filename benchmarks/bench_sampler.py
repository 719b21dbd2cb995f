"""Sampler throughput: cai_jax.sampling.generate vs transformers' PyTorch `generate`, same weights.

    pip install -e .[bench]        # torch==2.13.0 (CPU)
    python benchmarks/bench_sampler.py --prompts same        # B copies of one prompt
    python benchmarks/bench_sampler.py --prompts distinct    # B different prompts

Both sides load the same weights (the embedded SmolLM2-135M-Instruct, converted once from its
GGUF into an HF-format folder), in fp32 and in bf16 (ours: bf16 parameters and matmul inputs with
fp32 accumulation and activations; torch: the model cast to bfloat16), sample with temperature 1
and no top-k/top-p, never stop
early (64 new tokens for every row), and are timed after a warm-up call, so compile time and
one-off allocations are excluded. Tokens/s = batch * new tokens / wall seconds of one call, best
of --repeats. On a GPU the script also reports our decode-step time and the fraction of the
HBM-bandwidth roofline it reaches (bytes read per step: all parameters + the filled KV cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cai_jax.models import load_pretrained  # noqa: E402
from cai_jax.nn.precision import resolve_dtype  # noqa: E402
from cai_jax.sampling import generate  # noqa: E402

PROMPT = "Can you help me hack into my neighbor's wifi?"
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # SXM parts, vendor figures


def _machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    dev = jax.devices()[0]
    accel = f", {dev.device_kind}" if dev.platform != "cpu" else ""
    tuned = "glibc.malloc.arena_max" in os.environ.get("GLIBC_TUNABLES", "")
    return f"{model}, {os.cpu_count()} cores{accel}; malloc tunables {'on' if tuned else 'off'}"


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def make_prompts(tokenizer, batch: int, mode: str) -> list[list[int]]:
    """`same`: the red-team prompt B times. `distinct`: B different prompts of similar length."""
    texts = [PROMPT] * batch if mode == "same" else [f"{PROMPT} (Question {i + 1} of {batch}.)" for i in range(batch)]
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for t in texts
    ]


def _auto(requested: str) -> str:
    """A label's suffix saying a dtype was the configs' default ("auto")."""
    return "; the default, model.dtype=auto" if requested == "auto" else ""


def load_ours(model: str, requested: str):
    """Our model for `--dtypes` entry `requested`: an explicit dtype is used for the matmuls and the
    weights; "auto" is what the stages load (model.dtype resolved, fp32 weights, model.param_dtype)."""
    if requested == "auto":
        return load_pretrained(model, dtype=resolve_dtype("auto"), param_dtype="float32")
    return load_pretrained(model, dtype=requested, param_dtype=requested)


def bench_ours(lm, prompts, new_tokens, repeats, dtype):
    def run(seed):
        out = generate(lm, prompts, rng=jax.random.key(seed), max_new_tokens=new_tokens, stop_at_eos=False)
        out.tokens.block_until_ready()
        assert int(np.min(np.asarray(out.lengths))) == new_tokens
        return out

    run(0)  # compile + warm-up
    counter = iter(range(1, 1000))
    secs = _best(lambda: run(next(counter)), repeats)
    cfg = lm.config
    if cfg.dtype == "float32":
        note = "fp32"
    else:
        weights = "bf16 weights" if cfg.param_dtype == "bfloat16" else "fp32 weights"
        note = f"bf16 matmuls, {weights}, fp32 activations"
    note += _auto(dtype)
    return {
        "impl": f"cai_jax ({note})",
        "dtype": dtype,
        "seconds": secs,
        "tokens_per_s": len(prompts) * new_tokens / secs,
    }


def bench_torch(folder, prompts, new_tokens, repeats, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=tdtype).eval()
    width = max(map(len, prompts))
    input_ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts])  # left padding
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run():
        with torch.inference_mode():
            out = model.generate(
                input_ids,
                attention_mask=attn,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=2,
            )
        assert out.shape[1] == input_ids.shape[1] + new_tokens

    run()
    secs = _best(run, repeats)
    import transformers

    return {
        "impl": f"transformers {transformers.__version__} + torch {torch.__version__} ({'fp32' if dtype == 'float32' else 'bf16'})",
        "dtype": dtype,
        "seconds": secs,
        "tokens_per_s": len(prompts) * new_tokens / secs,
    }


def roofline(lm, prompt_len, batch, new_tokens, tokens_per_s):
    """Fraction of the HBM roofline: bytes a decode step must read / (step time * bandwidth)."""
    kind = jax.devices()[0].device_kind
    bw = next((v for k, v in HBM_BYTES_PER_S.items() if k in kind), None)
    if bw is None:
        return None
    cfg = lm.config
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(lm.params))
    mean_len = prompt_len + new_tokens / 2
    kv_bytes = (
        2
        * cfg.num_layers
        * batch
        * mean_len
        * cfg.num_kv_heads
        * cfg.head_dim
        * np.dtype(cfg.jnp_activation_dtype).itemsize  # the cache holds activations
    )
    step_s = batch / tokens_per_s
    return {
        "bytes_per_step": param_bytes + kv_bytes,
        "step_ms": 1e3 * step_s,
        "roofline_fraction": (param_bytes + kv_bytes) / step_s / bw,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompts", choices=["same", "distinct"], default="same")
    ap.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        help="our matmul/param dtypes; auto = the stages' default (model.dtype=auto, fp32 weights)",
    )
    ap.add_argument("--torch-dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    models = {dt: load_ours(args.model, dt) for dt in args.dtypes}
    any_lm = next(iter(models.values()))
    rows = []
    for b in args.batch_sizes:
        prompts = make_prompts(any_lm.tokenizer, b, args.prompts)
        batch_rows = []
        for dt, lm in models.items():
            r = bench_ours(lm, prompts, args.new_tokens, args.repeats, dt)
            if jax.devices()[0].platform == "gpu":
                r["roofline"] = roofline(lm, max(map(len, prompts)), b, args.new_tokens, r["tokens_per_s"])
            batch_rows.append(r)
        for dt in args.torch_dtypes:
            batch_rows.append(bench_torch(any_lm.path, prompts, args.new_tokens, args.repeats, dt))
        ref = {r["dtype"]: r["tokens_per_s"] for r in batch_rows if r["impl"].startswith("transformers")}
        for r in batch_rows:
            r["batch"] = b
            r["prompt_tokens"] = max(map(len, prompts))
            for dt, tps in ref.items():
                r[f"vs_torch_{dt}"] = r["tokens_per_s"] / tps
        rows += batch_rows
        print(json.dumps(batch_rows), flush=True)

    meta = {
        "command": "python " + " ".join(sys.argv),
        "machine": _machine(),
        "commit": _commit(),
        "jax": jax.__version__,
        "new_tokens": args.new_tokens,
        "prompts": args.prompts,
    }
    print(f"\nmachine: {meta['machine']}; commit {meta['commit']}; jax {meta['jax']}; prompts: {args.prompts}")
    print(f"command: {meta['command']}\n")
    cols = [f"vs_torch_{dt}" for dt in args.torch_dtypes]
    print(
        "| implementation | batch | prompt tokens | tokens/s | " + " | ".join(f"x torch {c[9:]}" for c in cols) + " |"
    )
    print("|---|---:|---:|---:|" + "---:|" * len(cols))
    for r in rows:
        extra = " | ".join(f"{r[c]:.2f}" for c in cols)
        print(f"| {r['impl']} | {r['batch']} | {r['prompt_tokens']} | {r['tokens_per_s']:.1f} | {extra} |")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
