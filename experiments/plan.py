r"""What each stage of a config needs per device, and whether it fits, before anything runs.

    python -m experiments.plan --config configs/llama8b_gpu8.py --devices 8 --device-kind h100-80gb \
        --config.model.name=configs/shapes/llama-3.1-8b [--json plan.json] [--stages sft,pm]

Builds every stage's models and optimizer state as abstract arrays (nothing of the real size is
allocated), shards them on the config's mesh over `--devices` fake CPU devices, lowers and
compiles each jitted step of each stage (experiments/plan_stages.py says which, at which shapes),
and prints per stage and per device: parameters of every model the stage holds, optimizer state,
KV cache, the rest of its largest step's transient memory (XLA's temporary buffers plus
non-resident inputs and outputs), the total, FLOPs per stage step, and "fits" / "does not fit"
against the memory a JAX program may use on `--device-kind`. `model.name` may be a folder holding
only an HF config.json: only the shape is read. `--target tpu:v5e:2x4` (or `cuda:...`) compiles
for devices jax can describe without having them (`jax.experimental.topologies`; needs libtpu or
the CUDA plugin installed). Bad input prints one `error:` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from cai_jax.runtime import XLA_CPU_FLAGS
from experiments.config_util import ConfigError, load_config, parse_known_overrides

STAGE_NAMES = ("revisions", "sft", "feedback", "pm", "ppo", "eval")
# CPU compiler settings of a plan (later XLA_FLAGS win). Its default scheduler orders a program for
# concurrency and keeps, e.g., every layer's all-gathered weights alive at once (the 8B config's
# PPO forward: 86 GiB of temporaries per device); the memory-minimising one is closer to what an
# accelerator's scheduler does under its memory limit (the same forward: 2.9 GiB). LLVM's
# optimisation level changes the machine code, not the buffers: level 0 halves the compile time
# with the same memory and cost analysis.
PLAN_XLA_FLAGS = " ".join((*XLA_CPU_FLAGS, "--xla_backend_optimization_level=0"))


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Overrides: --config.<a>.<b>=<value>")
    p.add_argument("--config", required=True, help="configs/<name>.py[:arg]")
    p.add_argument("--devices", type=int, required=True, help="devices of the mesh (fake CPU devices)")
    p.add_argument("--device-kind", default="h100-80gb", help="device whose memory the plan is checked against")
    p.add_argument("--stages", default="all", help=f"comma-separated subset of: {','.join(STAGE_NAMES)}")
    p.add_argument("--prompt-tokens", type=int, default=256, help="upper bound on a rendered prompt, tokens")
    p.add_argument("--memory-fraction", type=float, default=None, help="share of device memory usable")
    p.add_argument("--target", default=None, help="compile for PLATFORM[:TOPOLOGY] via jax.experimental.topologies")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return parse_known_overrides(p, argv)


def _init_devices(n: int, target: str | None):
    """(devices, platform) to plan on: `n` fake CPU devices (set before JAX starts; platform None), or
    the compile-only devices of a target topology and its platform."""
    if n < 1:
        raise ValueError(f"--devices={n} must be >= 1")
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{PLAN_XLA_FLAGS} {flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    if target is None:
        devices = jax.devices()
        if len(devices) != n:
            raise ValueError(f"--devices={n}, but JAX started with {len(devices)} (run the plan as its own process)")
        return devices, None
    from jax.experimental import topologies

    platform, _, topology = target.partition(":")
    try:
        devices = topologies.get_topology_desc(topology, platform).devices
    except (RuntimeError, NotImplementedError, ValueError) as e:
        need = {"tpu": "libtpu (pip install libtpu)", "cuda": "the jax CUDA plugin (pip install jax[cuda13])"}
        raise ValueError(
            f"--target {target!r}: jax cannot compile for it here ({str(e).splitlines()[0]}); this needs "
            f"{need.get(platform, 'a PJRT plugin for ' + platform)} matching jax {jax.__version__}"
        ) from None
    if len(devices) != n:
        raise ValueError(f"--target {target!r} has {len(devices)} devices, but --devices={n}")
    return devices, {"cuda": "gpu"}.get(platform, platform)


def model_configs(configs: dict):
    """(base, feedback) ModelConfigs as the stages build them, from the shape alone where it can."""
    from cai_jax.models import ModelConfig
    from cai_jax.models.loading import load_tokenizer, resolve_model_path
    from experiments.context import random_model_config

    m, judge = configs["feedback"].model, configs["feedback"].feedback_model.name

    def one(name: str) -> ModelConfig:
        if m.init == "random":
            return random_model_config(m, load_tokenizer(resolve_model_path(name)))
        try:  # a folder with only config.json is enough; presets and GGUF files are converted once
            folder = resolve_model_path(name)
        except (FileNotFoundError, ValueError) as e:
            raise FileNotFoundError(f"config model.name={name!r}: {e} (the plan needs its config.json)") from None
        return ModelConfig.from_hf_file(folder / "config.json", dtype=m.dtype, param_dtype=m.param_dtype)

    base = one(m.name)
    if judge.startswith("python:"):  # a Python judge holds no model
        return base, base
    return base, one(judge) if judge else base


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def verdict(plan, usable: int) -> str | None:
    """None when the stage fits; else which stage and which buffers break it, largest first."""
    if plan.total_bytes <= usable:
        return None
    peak = plan.peak.cost
    buffers = [(f"{h.name}: params", h.params_bytes) for h in plan.held]
    buffers += [(f"{h.name}: optimizer state", h.opt_state_bytes) for h in plan.held]
    buffers += [(f"KV cache of the {peak.name}", plan.kv_cache_bytes)]
    buffers += [(f"temp of the {peak.name} at {peak.shapes} (XLA temporaries and step inputs)", plan.temp_bytes)]
    buffers = sorted((b for b in buffers if b[1]), key=lambda b: -b[1])
    named = "; then ".join(f"{name} ({_size(n)})" for name, n in buffers[:2])
    return (
        f"{plan.name} does not fit: {_size(plan.total_bytes)} per device > {_size(usable)} usable; "
        f"the largest buffer is {named}"
    )


def render(plans, kind, usable: int, header: str) -> str:
    lines = [
        header,
        "",
        "| stage | params | opt state | KV cache | temp | total | FLOPs/step | fits |",
        "|---|" + "---:|" * 6 + "---|",
    ]
    for p in plans:
        fits = "fits" if p.total_bytes <= usable else "does not fit"
        cells = (p.params_bytes, p.opt_state_bytes, p.kv_cache_bytes, p.temp_bytes, p.total_bytes)
        lines.append(f"| {p.name} | " + " | ".join(map(_size, cells)) + f" | {p.flops_per_step:.3g} | {fits} |")
    lines += ["", "Held per device:"]
    for p in plans:
        lines.append(f"- {p.name}: " + "; ".join(
            f"{h.name} {_size(h.params_bytes)}" + (f" + optimizer {_size(h.opt_state_bytes)}" if h.opt_state_bytes else "")
            for h in p.held))  # fmt: skip
    lines += ["", "Compiled steps (per device; a stage's peak is its step with the most transient memory):", "",
              "| stage | step | shapes | calls/step | transient | XLA temp | FLOPs/call | compile s |",
              "|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for p in plans:
        for s in p.steps:
            c = s.cost
            lines.append(f"| {p.name} | {c.name} | {c.shapes} | {s.calls:g} | {_size(c.transient_bytes)} | "
                         f"{_size(c.temp_bytes)} | {s.flops_per_call:.3g} | {c.compile_s + (s.decode.compile_s if s.decode else 0):.1f} |")  # fmt: skip
    lines += ["", "Steps per stage: " + "; ".join(f"{p.name}: {p.step_unit}" for p in plans)]
    broken = [v for p in plans if (v := verdict(p, usable))]
    lines += [""] + (broken or [f"Every stage fits on {kind.name}."])
    return "\n".join(lines)


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    from experiments.quiet import setup_logging

    setup_logging("WARNING")  # the plan's own output is its tables; third-party notices stay hidden

    try:
        from cai_jax.planning import device_kind

        kind = device_kind(args.device_kind)
        names = list(STAGE_NAMES) if args.stages == "all" else [s.strip() for s in args.stages.split(",")]
        if unknown := [s for s in names if s not in STAGE_NAMES]:
            raise ValueError(f"--stages: unknown stage(s) {unknown}; stages are: {', '.join(STAGE_NAMES)}")
        if args.prompt_tokens < 1:
            raise ValueError(f"--prompt-tokens={args.prompt_tokens} must be >= 1")
        cfg = load_config(args.config, overrides)
        devices, platform = _init_devices(args.devices, args.target)
        from cai_jax.sharding import make_mesh
        from experiments.pipeline import stage_configs
        from experiments.stages import REGISTRY

        configs = stage_configs(cfg, REGISTRY)
        mesh = make_mesh(cfg.mesh, devices=devices)
        base, feedback = model_configs(configs)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from cai_jax.planning import traced_for
    from experiments.plan_kit import PlanContext
    from experiments.plan_stages import PLANNERS

    platform = platform or kind.platform  # trace the program the device kind would run
    ctx = PlanContext(configs, mesh, base, feedback, int(args.prompt_tokens))
    usable = kind.usable_bytes(args.memory_fraction)
    t0 = time.perf_counter()
    plans = []
    with traced_for(platform):
        for name in names:
            print(f"[plan] {name} ...", file=sys.stderr, flush=True)
            try:
                plans.append(PLANNERS[name](ctx))
            except ValueError as e:  # a parameter or batch that does not divide the mesh, a bad config field
                print(f"error: stage {name}: {str(e).splitlines()[0]}", file=sys.stderr)
                return 2
    shape = dict(mesh.shape)
    header = (
        f"Plan of {args.config} on {args.devices} x {kind.name} ({kind.description}; {_size(usable)} usable of "
        f"{_size(kind.memory_bytes)} per device), mesh {shape}, traced for {platform}, prompts <= {args.prompt_tokens} "
        f"tokens; model {base.num_params() / 1e9:.3g}B params ({base.dtype} matmuls, {base.param_dtype} params); "
        f"compiled in {time.perf_counter() - t0:.0f} s"
    )
    print(render(plans, kind, usable, header))
    if args.json is not None:
        fields = ("params_bytes", "opt_state_bytes", "kv_cache_bytes", "temp_bytes", "total_bytes")
        out = {
            "device_kind": kind.name,
            "devices": args.devices,
            "stages": {
                p.name: {
                    **{f: int(getattr(p, f)) for f in fields},
                    "flops_per_step": p.flops_per_step,
                    "fits": p.total_bytes <= usable,
                }  # fmt: skip
                for p in plans
            },
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
