"""Sampler throughput: cai_jax.sampling.generate vs transformers' PyTorch `generate`, same weights.

    pip install -e .[bench]        # torch==2.13.0 (CPU)
    python benchmarks/bench_sampler.py --batch-sizes 1 16 64 --new-tokens 64

Both sides load the same fp32 weights (the embedded SmolLM2-135M-Instruct, converted once from
its GGUF into an HF-format folder), sample with temperature 1 and no top-k/top-p, never stop
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
    return f"{model}, {os.cpu_count()} cores{accel}"


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


def bench_ours(lm, ids, batch, new_tokens, repeats, dtype_note):
    def run(seed):
        out = generate(lm, [ids] * batch, rng=jax.random.key(seed), max_new_tokens=new_tokens, stop_at_eos=False)
        out.tokens.block_until_ready()
        assert int(np.min(np.asarray(out.lengths))) == new_tokens
        return out

    run(0)  # compile + warm-up
    counter = iter(range(1, 1000))
    secs = _best(lambda: run(next(counter)), repeats)
    return {
        "impl": f"cai_jax ({dtype_note})",
        "batch": batch,
        "seconds": secs,
        "tokens_per_s": batch * new_tokens / secs,
    }


def bench_torch(folder, ids, batch, new_tokens, repeats):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    input_ids = torch.tensor([ids] * batch)
    attn = torch.ones_like(input_ids)

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
    return {
        "impl": f"transformers {__import__('transformers').__version__} + torch {torch.__version__} (fp32)",
        "batch": batch,
        "seconds": secs,
        "tokens_per_s": batch * new_tokens / secs,
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
        2 * cfg.num_layers * batch * mean_len * cfg.num_kv_heads * cfg.head_dim * np.dtype(cfg.jnp_dtype).itemsize
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
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", help="our compute/param dtype (the reference is always fp32)")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    lm = load_pretrained(args.model, dtype=args.dtype, param_dtype=args.dtype)
    ids = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    rows = []
    for b in args.batch_sizes:
        ours = bench_ours(lm, ids, b, args.new_tokens, args.repeats, args.dtype)
        if jax.devices()[0].platform == "gpu":
            ours["roofline"] = roofline(lm, len(ids), b, args.new_tokens, ours["tokens_per_s"])
        rows.append(ours)
        if not args.skip_torch:
            ref = bench_torch(lm.path, ids, b, args.new_tokens, args.repeats)
            ours["speedup"] = ours["tokens_per_s"] / ref["tokens_per_s"]
            rows.append(ref)
        print(json.dumps(rows[-2:] if not args.skip_torch else rows[-1:]), flush=True)

    meta = {
        "command": "python " + " ".join(sys.argv),
        "machine": _machine(),
        "commit": _commit(),
        "jax": jax.__version__,
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
    }
    print(f"\nmachine: {meta['machine']}; commit {meta['commit']}; jax {meta['jax']}")
    print(f"command: {meta['command']}\n")
    print("| implementation | batch | tokens/s | speedup |")
    print("|---|---:|---:|---:|")
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        print(f"| {r['impl']} | {r['batch']} | {r['tokens_per_s']:.1f} | {sp} |")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
