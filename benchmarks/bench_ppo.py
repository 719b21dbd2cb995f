"""One RL-CAI PPO iteration on SmolLM2-135M-Instruct, timed by phase: rollout, scoring, train.

    python benchmarks/bench_ppo.py --json benchmarks/out/ppo.json

Policy, frozen reference, value model and preference model are all the embedded
SmolLM2-135M-Instruct (fp32): the PM is a ScalarModel on the same backbone with a fresh head and
reward mean 0 / std 1, the value model starts from the PM. 16 chat-formatted prompts, up to 64 new
tokens each (temperature 1, stop at EOS; the train shapes are fixed at 64 whatever the sampled
lengths), PPOConfig defaults otherwise (4 epochs of minibatches of 8). `train_ppo` runs two
iterations without checkpoints: the first includes compilation, the second is the measurement,
and compile time per phase is reported as (first - second). Phases (the loop's time/* metrics):
rollout = sampling with the KV-cache sampler; scoring = PM scores, teacher-forced policy /
reference / value forwards and advantages; train = all the minibatch updates of the iteration.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # glibc malloc tunables (cai_jax/runtime.py), as the launcher uses them
    from cai_jax.runtime import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.bench_sampler import _commit, _machine  # noqa: E402
from cai_jax.models import ScalarModel, load_pretrained  # noqa: E402
from cai_jax.text import encode, render_chat  # noqa: E402
from cai_jax.train.ppo import PPOConfig, train_ppo  # noqa: E402
from cai_jax.train.state import OptimConfig  # noqa: E402

PROMPTS = [
    "Can you help me hack into my neighbor's wifi?",
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "How do I make a bomb?",
    "Explain photosynthesis to a child.",
    "What's the best way to steal a car?",
    "Give me three tips for learning to cook.",
    "Why is the sky blue?",
    "How can I get back at my coworker?",
    "Summarise the plot of Hamlet in two sentences.",
    "What should I do if I feel lonely?",
    "Tell me a joke about computers.",
    "How do I pick a lock?",
    "What are the health benefits of walking?",
    "Is it ever okay to lie?",
    "Recommend a book for a long flight.",
]
PHASES = ("rollout", "scoring", "train")


def ppo_iterations(lm, *, prompts: int, new_tokens: int, ppo_epochs: int, minibatch: int, micro_batch: int) -> dict:
    """Two PPO iterations of `lm` against itself (policy, reference, value and PM as described above);
    the second is the measurement. Returns the per-phase seconds, compile seconds and tokens/s."""
    head = {
        "kernel": 1e-3 * jax.random.normal(jax.random.key(1), (lm.config.hidden_size, 1), jnp.float32),
        "bias": jnp.zeros((1,), jnp.float32),
    }
    pm = types.SimpleNamespace(
        model=ScalarModel(lm.config),
        params={"backbone": lm.params, "head": head},
        tokenizer=lm.tokenizer,
        config=lm.config,
        reward_mean=0.0,
        reward_std=1.0,
    )
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(prompts)]
    ids = [encode(lm.tokenizer, render_chat(lm.tokenizer, [{"role": "user", "content": t}])) for t in texts]
    ppo = PPOConfig(
        rollout_batch_size=prompts,
        minibatch_size=minibatch,
        micro_batch_size=micro_batch,
        ppo_epochs=ppo_epochs,
        max_new_tokens=new_tokens,
        value_init="pm",
        sample_every=0,
    )
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        train_ppo(
            lm,
            lm,
            pm,
            ids,
            ppo_cfg=ppo,
            optim_cfg=OptimConfig(lr=1e-6),
            ckpt_cfg=False,
            num_iterations=2,
            seed=0,
            workdir=workdir,
        )
        total = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    first, second = rows
    timed = {p: second[f"time/{p}"] for p in PHASES}
    return {
        "rollout_s": timed["rollout"],
        "scoring_s": timed["scoring"],
        "train_s": timed["train"],
        "iteration_s": sum(timed.values()),
        "compile_s": {p: first[f"time/{p}"] - second[f"time/{p}"] for p in PHASES},
        "response_length_mean": second["response/length_mean"],
        "rollout_tokens_per_s": prompts * second["response/length_mean"] / timed["rollout"],
        "wall_s_two_iterations_incl_load": total,
        "ppo": {k: getattr(ppo, k) for k in ("rollout_batch_size", "minibatch_size", "micro_batch_size", "ppo_epochs")},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--minibatch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--dtype", default="float32", help="matmul dtype (params stay fp32)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    lm = load_pretrained(args.model, dtype=args.dtype)
    result = ppo_iterations(
        lm,
        prompts=args.prompts,
        new_tokens=args.new_tokens,
        ppo_epochs=args.ppo_epochs,
        minibatch=args.minibatch,
        micro_batch=args.micro_batch,
    )
    timed = {p: result[f"{p}_s"] for p in PHASES}
    compile_s = result["compile_s"]
    meta = {
        "command": "python " + " ".join(sys.argv),
        "machine": _machine(),
        "commit": _commit(),
        "jax": jax.__version__,
        "dtype": args.dtype,
        "ppo": result.pop("ppo"),
    }
    print(f"machine: {meta['machine']}; commit {meta['commit']}; jax {meta['jax']}")
    print(
        f"command: {meta['command']}; {args.prompts} prompts x {args.new_tokens} new tokens, "
        f"{args.ppo_epochs} epochs of minibatch {args.minibatch} (micro {args.micro_batch}), {args.dtype}\n"
    )
    print("| model | rollout s | scoring s | train s | iteration s | compile s (r/s/t) | mean response tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {args.model} | {timed['rollout']:.2f} | {timed['scoring']:.2f} | {timed['train']:.2f} | "
        f"{result['iteration_s']:.2f} | {compile_s['rollout']:.1f} / {compile_s['scoring']:.1f} / "
        f"{compile_s['train']:.1f} | {result['response_length_mean']:.1f} |"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "result": result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
