"""Generates SL-CAI revision data (critique -> revision rounds) with the embedded default model.

    python -m experiments.make_revisions --num-prompts 32 --num-revisions 2 --out runs/revisions-demo

Interrupted runs resume: rerun the same command. The output folder loads with
`cai_jax.cai.revisions.load_revisions(out)` (a `datasets.Dataset`, one row per prompt). Until the
launcher and configs exist (experiments issue), this is the revisions stage's entry point.
"""

import argparse
import json
import time

import jax

from cai_jax.cai.constitution import default_constitution, load_constitution
from cai_jax.cai.prompts import load_prompts, prepare_prompts, shipped_prompts
from cai_jax.cai.revisions import RevisionSettings, load_revisions, run_revisions
from cai_jax.models import DEFAULT_MODEL, load_pretrained


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/revisions-demo", help="output folder (resumable)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="preset name, HF-format folder or .gguf file")
    p.add_argument("--prompts", default="shipped:red_team", help="prompt source (file, folder, dataset or shipped:*)")
    p.add_argument("--num-prompts", type=int, default=32, help="first N prompts of the source; 0 = all")
    p.add_argument("--constitution", default=None, help="constitution file or paper prompts folder (default: shipped)")
    p.add_argument("--num-revisions", type=int, default=2, help="critique -> revision rounds")
    p.add_argument("--num-principles", type=int, default=None, help="sample from the first k principles")
    p.add_argument("--mode", default="critique", choices=["critique", "direct"])
    p.add_argument("--few-shots", type=int, default=0, help="few-shot transcripts prepended")
    p.add_argument("--rendering", default="chat", choices=["chat", "transcript"])
    p.add_argument("--temperature", type=float, default=1.0, help="paper: 1.0")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass; 1 disables")
    p.add_argument("--max-new-tokens", type=int, default=96, help="per answer / critique / revision")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch and output shard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompt-chars", type=int, default=2000, help="longer prompts are dropped (counted)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="matmul/param dtype")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    prompts = shipped_prompts("red_team") if args.prompts == "shipped:red_team" else load_prompts(args.prompts)
    if args.num_prompts:
        prompts = prompts[: args.num_prompts]
    prompts, _, report = prepare_prompts(prompts, eval_fraction=0.0, max_chars=args.max_prompt_chars)
    print("prompts:", ", ".join(f"{k} {v}" for k, v in report.items()))
    constitution = load_constitution(args.constitution) if args.constitution else default_constitution()
    settings = RevisionSettings(
        num_revisions=args.num_revisions,
        num_principles=args.num_principles,
        mode=args.mode,
        num_few_shots=args.few_shots,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        rendering=args.rendering,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    lm = load_pretrained(args.model, dtype=args.dtype, param_dtype=args.dtype)
    start = time.perf_counter()
    # On several hosts (after jax.distributed.initialize) each process writes its own prompt shard.
    run_revisions(
        lm,
        prompts,
        constitution,
        settings,
        args.out,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    ds = load_revisions(args.out)
    print(f"{len(ds)} rows in {args.out} ({time.perf_counter() - start:.0f} s this run)")
    print(json.dumps(ds[0], indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
