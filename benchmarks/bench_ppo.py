"""One RL-CAI PPO iteration on SmolLM2-135M-Instruct, timed by phase: rollout, scoring, train.

    python benchmarks/bench_ppo.py --json benchmarks/out/ppo.json
    python benchmarks/bench_ppo.py --config configs/base.py --config.ppo.max_new_tokens=128

The PPO settings are the config's own (`--config`, default configs/demo.py: what the demo runs;
`--config.ppo.<field>=v` overrides, as for the launcher), so the figure is of a run that exists.
Policy, frozen reference, value model and preference model are all the embedded
SmolLM2-135M-Instruct in the config's `model.dtype`: the PM is a ScalarModel on the same backbone
with a fresh head and reward mean 0 / std 1, reading the config's `pm.rendering` and `pm.seq_len`;
the value model starts from it when `ppo.value_init = pm`. `rollout_batch_size` chat-rendered
prompts, stop at EOS (the train shapes are fixed at `max_new_tokens` whatever the sampled lengths).
`train_ppo` runs two iterations without checkpoints: the first includes compilation, the second is
the measurement, and compile time per phase is reported as (first - second). Phases (the loop's
time/* metrics): rollout = sampling with the KV-cache sampler; scoring = PM scores, teacher-forced
policy / reference / value forwards and advantages; train = all the minibatch updates of the
iteration.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from cai_jax.train.ppo import PPOConfig, train_ppo  # noqa: E402
from cai_jax.train.state import OptimConfig  # noqa: E402
from experiments.config_util import load_config  # noqa: E402

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


def preference_model(lm, cfg) -> types.SimpleNamespace:
    """A LoadedPM-like PM on `lm`'s backbone: a fresh scalar head, reward mean 0 / std 1, and the
    run config `cfg`'s `pm.rendering` and `pm.seq_len`."""
    head = {
        "kernel": 1e-3 * jax.random.normal(jax.random.key(1), (lm.config.hidden_size, 1), jnp.float32),
        "bias": jnp.zeros((1,), jnp.float32),
    }
    return types.SimpleNamespace(
        model=ScalarModel(lm.config),
        params={"backbone": lm.params, "head": head},
        tokenizer=lm.tokenizer,
        config=lm.config,
        reward_mean=0.0,
        reward_std=1.0,
        rendering=cfg.pm.rendering,
        seq_len=int(cfg.pm.seq_len),
    )


def ppo_iterations(lm, cfg) -> dict:
    """Two PPO iterations of `lm` against itself, with the PPO settings of the run config `cfg`
    (policy, reference, value and PM as described above); the second is the measurement.
    Returns the per-phase seconds, compile seconds and tokens/s."""
    c = cfg.ppo
    ppo = PPOConfig.from_config({k: v for k, v in c.items() if k not in ("num_iterations", "optim")})
    ppo = dataclasses.replace(ppo, sample_every=0)
    optim = OptimConfig.from_config(c.optim, updates=int(c.num_iterations) * ppo.updates_per_iteration)
    pm = preference_model(lm, cfg)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(ppo.rollout_batch_size)]
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        train_ppo(
            lm,
            lm,
            pm,
            prompts,
            ppo_cfg=ppo,
            optim_cfg=optim,
            ckpt_cfg=False,
            mesh_cfg=cfg.mesh,
            num_iterations=2,
            seed=0,
            workdir=workdir,
            rendering=cfg.sft.rendering,
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
        "no_eos_frac": second["response/no_eos_frac"],
        "rollout_tokens_per_s": ppo.rollout_batch_size * second["response/length_mean"] / timed["rollout"],
        "wall_s_two_iterations_incl_load": total,
        "ppo": {
            k: getattr(ppo, k)
            for k in ("rollout_batch_size", "minibatch_size", "micro_batch_size", "ppo_epochs", "max_new_tokens")
        },
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.py"), help="the run whose PPO settings are timed")
    ap.add_argument("--json", type=Path)
    args, rest = ap.parse_known_args()
    bad = [r for r in rest if not r.startswith("--config.")]
    if bad:
        ap.error(f"unrecognized arguments {bad} (overrides look like --config.ppo.max_new_tokens=128)")
    cfg = load_config(args.config, [r[len("--config.") :] for r in rest])
    lm = load_pretrained(cfg.model.name, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)
    result = ppo_iterations(lm, cfg)
    timed = {p: result[f"{p}_s"] for p in PHASES}
    compile_s = result["compile_s"]
    ppo = result.pop("ppo")
    meta = {
        "command": "python " + " ".join(sys.argv),
        "machine": _machine(),
        "commit": _commit(),
        "jax": jax.__version__,
        "config": args.config,
        "dtype": cfg.model.dtype,
        "ppo": ppo,
    }
    print(f"machine: {meta['machine']}; commit {meta['commit']}; jax {meta['jax']}")
    print(
        f"command: {meta['command']}; {ppo['rollout_batch_size']} prompts x {ppo['max_new_tokens']} new tokens, "
        f"{ppo['ppo_epochs']} epochs of minibatch {ppo['minibatch_size']} (micro {ppo['micro_batch_size']}), "
        f"{cfg.model.dtype}\n"
    )
    print("| model | rollout s | scoring s | train s | iteration s | compile s (r/s/t) | mean response tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {cfg.model.name} | {timed['rollout']:.2f} | {timed['scoring']:.2f} | {timed['train']:.2f} | "
        f"{result['iteration_s']:.2f} | {compile_s['rollout']:.1f} / {compile_s['scoring']:.1f} / "
        f"{compile_s['train']:.1f} | {result['response_length_mean']:.1f} |"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "result": result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
