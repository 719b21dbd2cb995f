"""A sampler call's compile time against its run time, in the default precision.

    python benchmarks/bench_compile.py --rows 16 18 --prompt-tokens 40 120

For each (rows, prompt length): `generate` on the embedded SmolLM2-135M-Instruct (weights fp32,
matmuls in model.dtype=auto), temperature 0.7, top-p 0.9, 64 new tokens, never stopping early,
with JAX's persistent compilation cache off. The first call compiles and runs; the next
--repeats calls only run. Reported: the first call, the best later call, and their difference
(the compile, tracing included). Run it at two commits, one after the other on the same quiet
machine, to compare what a change does to both (BENCHMARKS.md: "Compile time of the sampler").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["CAI_JAX_COMPILATION_CACHE"] = "0"  # every first call compiles
if __name__ == "__main__":
    from cai_jax.runtime import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()

import jax  # noqa: E402

from benchmarks.bench_sampler import _commit, _machine  # noqa: E402
from cai_jax.models import load_pretrained  # noqa: E402
from cai_jax.nn.precision import resolve_dtype  # noqa: E402
from cai_jax.sampling import call_shapes, generate  # noqa: E402


def _prompts(tokenizer, rows: int, tokens: int) -> list[list[int]]:
    """`rows` distinct prompts of `tokens` tokens each."""
    base = tokenizer.encode(" ".join(f"Question {i}: how would one bake bread at home?" for i in range(64)))
    return [tokenizer.encode(f"{r}.")[:1] + base[: tokens - 1] for r in range(rows)]


def _call(lm, prompts, seed: int, new_tokens: int) -> None:
    out = generate(
        lm, prompts, rng=jax.random.key(seed), max_new_tokens=new_tokens, temperature=0.7, top_p=0.9, stop_at_eos=False
    )
    jax.block_until_ready(out.tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 18])
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[40, 120])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lm = load_pretrained(dtype=resolve_dtype("auto"), param_dtype="float32")
    print(f"# {_machine()}; commit {_commit()}; jax {jax.__version__}; model.dtype=auto -> {lm.config.dtype}")
    print("| rows (padded) | prompt tokens (bucket) | first call (s) | later call (s) | compile (s) |")
    print("|---|---|---:|---:|---:|")
    for rows in args.rows:
        for n in args.prompt_tokens:
            prompts = _prompts(lm.tokenizer, rows, n)
            b, _, p = call_shapes(lm.config, rows, rows, n, args.new_tokens)

            t0 = time.perf_counter()
            _call(lm, prompts, 0, args.new_tokens)
            first = time.perf_counter() - t0
            later = []
            for seed in range(1, args.repeats + 1):
                t0 = time.perf_counter()
                _call(lm, prompts, seed, args.new_tokens)
                later.append(time.perf_counter() - t0)
            best = min(later)
            print(f"| {rows} ({b}) | {n} ({p}) | {first:.2f} | {best:.2f} | {first - best:.2f} |", flush=True)


if __name__ == "__main__":
    main()
