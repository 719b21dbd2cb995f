"""Seconds per RL step of each RL-CAI objective (PPO, RLOO, DPO, IPO) at one config's sizes, in one run.

    python benchmarks/bench_rl.py --json benchmarks/out/rl.json
    python benchmarks/bench_rl.py --quick                          # smoke run: tiny sizes, one measured step
    python benchmarks/bench_rl.py --objectives ppo,dpo --steps 5 --config.rloo.k=4

Each objective runs as the ppo stage runs it (experiments/stages/ppo.py), with the settings of the
config's own section (`--config`, default configs/demo.py: what the demo runs; `--config.<a>.<b>=v`
overrides, as for the launcher), so the figures are of runs that exist:

- ppo: `train_ppo` with section `ppo`. One step = one iteration: `rollout_batch_size` samples of
  up to `max_new_tokens` tokens, scored, then `ppo_epochs` x (rollout_batch_size / minibatch_size)
  updates of policy and value.
- rloo: `train_rloo` with section `rloo`. One step = one iteration: `rollout_batch_size` prompts x
  `k` samples, scored, then `epochs` x (rows / minibatch_size) policy updates.
- dpo, ipo: `train_dpo` with section `dpo` and that loss. One step = one optimizer update on
  `batch_size` comparisons (two sides of `seq_len` tokens each, plus the frozen reference's
  forward of them).

Policy and frozen reference are the embedded SmolLM2-135M-Instruct in the config's `model.dtype`;
the PPO / RLOO PM is a ScalarModel on the same backbone with a fresh head and reward mean 0 / std
1 (`bench_ppo.preference_model`), and PPO's value model starts from it when `ppo.value_init = pm`.
PPO and RLOO sample chat-rendered prompts (bench_ppo's list, repeated to fill a rollout batch),
stopping at EOS; their train shapes are fixed at `max_new_tokens` whatever the sampled lengths.
DPO / IPO train on canned comparisons of the same prompts: the batches are padded to `seq_len`, so
their content does not change the cost. DPO / IPO get no PM, so their periodic evaluation (PPO's
sampling on the training prompts every `dpo.eval_every` steps) is not in the step and not measured
here. Nothing is checkpointed during the measured steps (PPO / RLOO: ckpt_cfg=False; DPO / IPO
save once after the last step, outside its time).

Each objective runs 1 + `--steps` steps: the first includes compilation, the step time is the median
of the others, and "compile s" is (first - median). PPO / RLOO step time is the sum of the loop's
time/* metrics (rollout = KV-cache sampling; scoring = PM scores, teacher-forced forwards and
advantages; train = all the updates of the iteration), each phase column its own median, so the
three need not sum to the step; DPO / IPO step time is the wall time between consecutive metric
fetches (tokens_in_batch / tokens_per_s of `metrics.jsonl`). "per s" is samples (PPO / RLOO) or
comparisons (DPO / IPO) per second of step time. Every step's seconds are printed under the table,
so a noisy step (another job on the machine) shows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # glibc malloc tunables (cai_jax/runtime.py), as the launcher uses them
    from cai_jax.runtime import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()

import jax  # noqa: E402

from benchmarks.bench_ppo import PROMPTS, preference_model  # noqa: E402
from benchmarks.bench_sampler import _commit, _machine  # noqa: E402
from cai_jax.models import load_pretrained  # noqa: E402
from experiments.config_util import load_config, parse_known_overrides  # noqa: E402
from experiments.stages.ppo import DPO, PPO, RLOO  # noqa: E402
from experiments.typed import take  # noqa: E402

OBJECTIVES = ("ppo", "rloo", "dpo", "ipo")
PHASES = ("rollout", "scoring", "train")
# --quick: every objective at a few rows and tokens (consistent minibatch sizes whatever --config
# says), one measured step; later --config.* overrides still win.
QUICK = (
    "ppo.rollout_batch_size=2",
    "ppo.minibatch_size=2",
    "ppo.micro_batch_size=2",
    "ppo.ppo_epochs=1",
    "ppo.generation_batch_size=0",
    "ppo.max_new_tokens=16",
    "rloo.rollout_batch_size=2",
    "rloo.k=2",
    "rloo.minibatch_size=4",
    "rloo.micro_batch_size=2",
    "rloo.epochs=1",
    "rloo.generation_batch_size=0",
    "rloo.max_new_tokens=16",
    "dpo.batch_size=2",
    "dpo.seq_len=96",
)


def _rows(workdir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def _summary(step_s: list[float]) -> dict:
    """Median of the steps after the first, and the first's excess over it (compilation)."""
    median = statistics.median(step_s[1:])
    return {"step_s": median, "compile_s": step_s[0] - median, "steps_s": step_s}


def rollout_objective(name: str, lm, cfg, steps: int) -> dict:
    """1 + `steps` iterations of PPO or RLOO (`name`) of `lm` against itself with the config section
    of that name; the per-step seconds and their phases, samples per second and response lengths."""
    if name == "ppo":
        from cai_jax.train.ppo import train_ppo as train

        section = take(PPO, cfg.ppo, "ppo")
        samples, kw = section.settings.rollout_batch_size, {"ppo_cfg": section.settings}
    else:
        from cai_jax.train.rloo import train_rloo as train

        section = take(RLOO, cfg.rloo, "rloo")
        samples, kw = section.settings.rows, {"rloo_cfg": section.settings}
    s = section.settings
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        train(
            lm, lm, preference_model(lm, cfg), _prompts(s.rollout_batch_size), optim_cfg=section.optimizer(),
            ckpt_cfg=False, mesh_cfg=cfg.mesh, num_iterations=1 + steps, seed=0, workdir=workdir,
            rendering=cfg.sft.rendering, **kw,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        rows = _rows(workdir)
    result = _summary([sum(r[f"time/{p}"] for p in PHASES) for r in rows])
    for p in PHASES:
        result[f"{p}_s"] = statistics.median(r[f"time/{p}"] for r in rows[1:])
    result.update(
        samples_per_step=samples,
        per_s=samples / result["step_s"],
        unit="samples",
        updates_per_step=s.updates_per_iteration,
        response_length_mean=statistics.mean(r["response/length_mean"] for r in rows[1:]),
        no_eos_frac=statistics.mean(r["response/no_eos_frac"] for r in rows[1:]),
        wall_s=wall,
        step=f"1 iteration: {samples} samples x <= {s.max_new_tokens} tokens, {_count(s.updates_per_iteration, 'update')}",
    )
    return result


def _comparisons(n: int) -> list[dict]:
    """`n` comparisons {"prompt", "response_a", "response_b", "p_a"} of bench_ppo's prompts."""
    a = "I can't help with anything harmful, but I'm happy to explain the safe and legal side of this."
    b = "Sure, here is exactly how to do it, step by step."
    return [{"prompt": p, "response_a": a, "response_b": b, "p_a": 0.8} for p in _prompts(n)]


def preference_objective(loss: str, lm, cfg, steps: int) -> dict:
    """1 + `steps` DPO or IPO (`loss`) updates of `lm` against itself with section `dpo`; the
    per-step seconds and comparisons per second."""
    from cai_jax.train.dpo import DPOConfig, train_dpo

    o = take(DPO, cfg.dpo, "dpo")
    pairs = _comparisons(max(len(PROMPTS), o.batch_size))
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        train_dpo(
            lm, lm, pairs, dpo_cfg=DPOConfig(loss=loss, beta=o.beta), optim_cfg=o.optimizer(), ckpt_cfg=None,
            mesh_cfg=cfg.mesh, num_steps=1 + steps, batch_size=o.batch_size, seq_len=o.seq_len, seed=0,
            workdir=workdir, rendering=cfg.sft.rendering,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        rows = _rows(workdir)
    result = _summary([r["tokens_in_batch"] / r["tokens_per_s"] for r in rows])
    result.update(
        rollout_s=None,
        scoring_s=None,
        train_s=result["step_s"],
        samples_per_step=o.batch_size,
        per_s=o.batch_size / result["step_s"],
        unit="comparisons",
        updates_per_step=1,
        response_length_mean=None,
        no_eos_frac=None,
        wall_s=wall,
        step=f"1 update: {o.batch_size} comparisons x 2 sides x {o.seq_len} tokens",
    )
    return result


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _cell(x, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.py"), help="the run whose sections are timed")
    ap.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated subset of ppo,rloo,dpo,ipo")
    ap.add_argument("--steps", type=int, default=None, help="measured steps per objective, after the compile step")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes (QUICK), 1 measured step")
    ap.add_argument("--json", type=Path)
    args, overrides = parse_known_overrides(ap)
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    if not objectives or set(objectives) - set(OBJECTIVES):
        ap.error(f"--objectives {args.objectives!r}: expected a comma-separated subset of {','.join(OBJECTIVES)}")
    steps = args.steps if args.steps is not None else (1 if args.quick else 3)
    if steps < 1:
        ap.error(f"--steps {steps}: at least one step must follow the compile step")
    cfg = load_config(args.config, [*(QUICK if args.quick else ()), *overrides])
    lm = load_pretrained(cfg.model.name, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)

    results = {}
    for name in objectives:
        print(f"{name}: 1 + {steps} steps ...", flush=True)
        if name in ("ppo", "rloo"):
            results[name] = rollout_objective(name, lm, cfg, steps)
        else:
            results[name] = preference_objective(name, lm, cfg, steps)

    meta = {
        "command": "python " + " ".join(sys.argv),
        "machine": _machine(),
        "commit": _commit(),
        "jax": jax.__version__,
        "config": args.config,
        "overrides": [*(QUICK if args.quick else ()), *overrides],
        "model": cfg.model.name,
        "dtype": cfg.model.dtype,
        "measured_steps": steps,
    }
    print(f"\nmachine: {meta['machine']}; commit {meta['commit']}; jax {meta['jax']}")
    print(
        f"command: {meta['command']}; {cfg.model.name}, {cfg.model.dtype}; median of {_count(steps, 'step')} after the first\n"
    )
    print("| objective | one step | step s | rollout / scoring / train s | compile s | per s | mean response tokens |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        phases = " / ".join(_cell(r[f"{p}_s"]) for p in PHASES)
        print(
            f"| {name} | {r['step']} | {r['step_s']:.2f} | {phases} | {r['compile_s']:.1f} | "
            f"{r['per_s']:.3f} {r['unit']} | {_cell(r['response_length_mean'], '.1f')} |"
        )
    print("\nseconds of every step (the first includes compilation):")
    for name, r in results.items():
        print(f"- {name}: " + ", ".join(f"{x:.2f}" for x in r["steps_s"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
