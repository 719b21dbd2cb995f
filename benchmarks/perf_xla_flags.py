"""XLA CPU flag sweep for the train step (issue 4 perf exploration).

    python benchmarks/perf_xla_flags.py --what mlp,block --batch 4 --rounds 3
    python benchmarks/perf_xla_flags.py --what sft,pm --batch 8 --rounds 2 --variants base,xnn_dot

Each variant runs in its own subprocess (XLA_FLAGS must be set before jax is imported); variants
are interleaved round-robin, `--rounds` times, and the median per (variant, measurement) is
reported. Inside a subprocess each measurement is compiled once and then timed `--reps` times
(median). `--worker` is the subprocess entry point.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "base": "",
    "xnn_dot": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "xnn_all": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "xnn_graph": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "onednn_dot": "--xla_cpu_experimental_onednn_fusion_type=dot",
    "use_onednn": "--xla_cpu_use_onednn=true",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "no_eigen_mt": "--xla_cpu_multi_thread_eigen=false",
    "split4": "--xla_cpu_parallel_codegen_split_count=4",
    "no_thunk": "--xla_cpu_use_thunk_runtime=false",
    "xnn_dot_fm": "--xla_cpu_experimental_xnn_fusion_type=dot --xla_cpu_enable_fast_math=true",
}


def worker(args):
    import functools

    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(ROOT))
    from cai_jax.models import ScalarModel, load_pretrained
    from cai_jax.nn.llama import MLP, Block
    from cai_jax.train.pm import scalar_model_params
    from cai_jax.train.state import TrainState, make_optimizer
    from cai_jax.train.steps import pm_step, sft_step

    lm = load_pretrained("smollm2-135m-instruct", with_tokenizer=False, dtype=args.dtype)
    cfg = lm.config
    b, length = args.batch, args.seq_len
    out = {}

    def timeit(name, fn, *a):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*a))
        out[name + "_compile_s"] = time.perf_counter() - t0
        ts = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            ts.append(time.perf_counter() - t0)
        out[name] = statistics.median(ts)

    whats = args.what.split(",")
    x = jax.random.normal(jax.random.key(0), (b, length, cfg.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(length), (b, length))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (b, length, length))
    p0 = lm.params["layers_0"]
    if "mlp" in whats:
        mlp = lambda p, x: MLP(cfg).apply({"params": p}, x)  # noqa: E731
        timeit("mlp_fwd", jax.jit(mlp), p0["mlp"], x)
        timeit("mlp_fb", jax.jit(jax.grad(lambda p, x: mlp(p, x).sum(), argnums=(0, 1))), p0["mlp"], x)
    if "block" in whats:
        blk = lambda p, x: Block(cfg).apply({"params": p}, x, pos, mask)[0]  # noqa: E731
        timeit("block_fwd", jax.jit(blk), p0, x)
        timeit("block_fb", jax.jit(jax.grad(lambda p, x: blk(p, x).sum(), argnums=(0, 1))), p0, x)
    if "sft" in whats or "pm" in whats:
        from benchmarks.bench_train import _batches, bench_optim

        ocfg = bench_optim(1 + args.reps)  # the first call compiles
        sft_batch, pm_batch = _batches(cfg.vocab_size, b, length)
        copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
        if "sft" in whats:
            opt = make_optimizer(ocfg, lm.params)
            st = {"s": TrainState.create(copy(lm.params), opt, jax.random.key(0))}
            step = jax.jit(functools.partial(sft_step, model=lm.model, optimizer=opt), donate_argnums=0)

            def run_sft():
                st["s"], m = step(st["s"], sft_batch)
                return m["loss"]

            t0 = time.perf_counter()
            out["sft_loss0"] = float(run_sft())
            out["sft_compile_s"] = time.perf_counter() - t0
            ts = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                jax.block_until_ready(run_sft())
                ts.append(time.perf_counter() - t0)
            out["sft"] = statistics.median(ts)
            out["sft_tok_s"] = b * length / out["sft"]
            del st
        if "pm" in whats:
            pm_model = ScalarModel(cfg)
            pm_params = scalar_model_params(copy(lm.params), cfg, seed=1)
            popt = make_optimizer(ocfg, pm_params)
            ps = {"s": TrainState.create(pm_params, popt, jax.random.key(0))}
            pstep = jax.jit(functools.partial(pm_step, model=pm_model, optimizer=popt), donate_argnums=0)

            def run_pm():
                ps["s"], m = pstep(ps["s"], pm_batch)
                return m["loss"]

            t0 = time.perf_counter()
            out["pm_loss0"] = float(run_pm())
            out["pm_compile_s"] = time.perf_counter() - t0
            ts = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                jax.block_until_ready(run_pm())
                ts.append(time.perf_counter() - t0)
            out["pm"] = statistics.median(ts)
            out["pm_tok_s"] = 2 * b * length / out["pm"]
    print("RESULT " + json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--what", default="mlp,block")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--extra", action="append", default=[], help="NAME=FLAGS, an extra variant")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    variants = {k: VARIANTS[k] for k in args.variants.split(",") if k}
    for e in args.extra:
        k, v = e.split("=", 1)
        variants[k] = v
    results = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, flags in variants.items():
            env = dict(os.environ)
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
            cmd = [sys.executable, __file__, "--worker", "--what", args.what, "--batch", str(args.batch),
                   "--seq-len", str(args.seq_len), "--reps", str(args.reps), "--dtype", args.dtype]  # fmt: skip
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not line:
                print(f"[round {r}] {name}: FAILED rc={p.returncode}\n{p.stderr[-1500:]}", flush=True)
                continue
            res = json.loads(line[0][7:])
            results[name].append(res)
            short = {k: round(v, 4) for k, v in res.items() if not k.endswith("compile_s")}
            print(f"[round {r}] {name}: {short}", flush=True)
    keys = sorted({k for rs in results.values() for res in rs for k in res if not k.endswith("compile_s")})
    print(f"\nmedians over rounds (batch {args.batch} x {args.seq_len}, dtype {args.dtype}); times in ms")
    print("| variant | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    summary = {}
    for name, rs in results.items():
        if not rs:
            continue
        med = {k: statistics.median([res[k] for res in rs if k in res]) for k in keys if any(k in res for res in rs)}
        summary[name] = med
        cells = []
        for k in keys:
            v = med.get(k)
            if v is None:
                cells.append("-")
            elif k.endswith("tok_s") or k.endswith("loss0"):
                cells.append(f"{v:.6g}" if k.endswith("loss0") else f"{v:.1f}")
            else:
                cells.append(f"{v * 1e3:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"variants": variants, "raw": results, "median": summary}, indent=2))


if __name__ == "__main__":
    main()
