"""What a jitted step needs per device, from abstract arrays and the compiled executable alone.

    cost = compile_cost("sft step", step.jitted, state, batch, resident=state, mesh=mesh)
    cost.temp_bytes, cost.flops               # XLA's numbers for one device of the mesh

A planner (experiments/plan.py) builds a stage's params and optimizer state as ShapeDtypeStructs
on their shardings (`sharding.abstract_params`, `train.loop.abstract_train_state`: nothing of the
real size is allocated), lowers and compiles each of the stage's jitted steps for those shapes,
and reads the compiled executable's memory analysis (argument, output, aliased and temporary
bytes) and cost analysis (FLOPs). Both describe one device's share of the partitioned (SPMD)
program, so every figure here is per device. A loop's body is counted once by XLA's cost
analysis, whatever its trip count.

The compiled program is the one the target would run only if it is traced as on the target:
`traced_for(platform)` turns off the CPU-only matmul layout of `nn/cpu_matmul.py` (chosen there by
`jax.default_backend()`) while an accelerator's program is traced on CPU. What the CPU compiler's
memory estimate can and cannot say about an accelerator is in README.md ("Accelerators").
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any

import jax

from cai_jax.sharding import DEFAULT_RULES, Rules, with_rules

__all__ = [
    "DEVICE_KINDS",
    "DeviceKind",
    "ExecutableCost",
    "PlanError",
    "bytes_per_device",
    "compile_cost",
    "device_kind",
    "traced_for",
]

GIB = 1 << 30
MIB = 1 << 20


class PlanError(ValueError):
    """Input a plan cannot be made from (device kind, mesh, model shape); the message names it."""


@dataclasses.dataclass(frozen=True)
class DeviceKind:
    """A device a plan is checked against: its memory and the platform its program is traced for."""

    name: str  # the --device-kind name
    platform: str  # gpu | tpu | cpu
    memory_bytes: int  # memory of one device as it reports it (nvidia-smi's total; TPU HBM per chip)
    description: str

    def usable_bytes(self, fraction: float | None = None) -> int:
        """Memory a JAX program may use: on GPUs JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION of it
        (0.75 unless set) and cannot grow past that; elsewhere all of it, unless `fraction` says."""
        if fraction is None:
            env = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
            fraction = float(env) if env else (0.75 if self.platform == "gpu" else 1.0)
        return int(self.memory_bytes * fraction)


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 * GIB


DEVICE_KINDS: dict[str, DeviceKind] = {
    k.name: k
    for k in (
        DeviceKind("h100-80gb", "gpu", 81559 * MIB, "NVIDIA H100 80GB HBM3 (SXM)"),
        DeviceKind("h200-141gb", "gpu", 143771 * MIB, "NVIDIA H200 (141 GB HBM3e)"),
        DeviceKind("a100-40gb", "gpu", 40960 * MIB, "NVIDIA A100 40GB"),
        DeviceKind("a100-80gb", "gpu", 81920 * MIB, "NVIDIA A100 80GB"),
        DeviceKind("l4-24gb", "gpu", 23034 * MIB, "NVIDIA L4 (24 GB GDDR6)"),
        DeviceKind("v4-32gb", "tpu", 32 * GIB, "TPU v4 chip (32 GiB HBM)"),
        DeviceKind("v5e-16gb", "tpu", 16 * GIB, "TPU v5e chip (16 GiB HBM)"),
        DeviceKind("v5p-95gb", "tpu", 95 * GIB, "TPU v5p chip (95 GiB HBM)"),
        DeviceKind("cpu", "cpu", _host_memory(), "this machine's RAM, shared by the fake devices"),
    )
}


def device_kind(name: str) -> DeviceKind:
    """The known device kind `name`; an unknown one is a PlanError listing them all."""
    if name not in DEVICE_KINDS:
        known = ", ".join(f"{k} ({v.description})" for k, v in DEVICE_KINDS.items())
        raise PlanError(f"--device-kind {name!r} is not a known device kind; known kinds: {known}")
    return DEVICE_KINDS[name]


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of arrays or ShapeDtypeStructs: the largest shard of each
    leaf (a leaf with no sharding, or a single-device one, counts whole)."""
    total = 0
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        n = 1
        for d in shape:
            n *= int(d)
        total += n * x.dtype.itemsize
    return total


@dataclasses.dataclass(frozen=True)
class ExecutableCost:
    """One compiled step on one device: XLA's memory and cost analysis, and what the plan adds."""

    name: str  # e.g. "sft step", "sampler", "decode step (FLOPs only)"
    shapes: str  # the inputs' shapes in words, e.g. "64 x 1024 tokens"
    argument_bytes: int  # every input buffer of one device
    output_bytes: int
    alias_bytes: int  # outputs written into donated inputs (counted once)
    temp_bytes: int  # XLA's temporary buffers (activations, gathered weights, loop state)
    resident_bytes: int  # the part of argument_bytes the stage holds anyway (params, optimizer state)
    flops: float  # cost analysis of one call (a loop body counted once)
    compile_s: float
    kv_cache_bytes: int = 0  # the sampler's KV cache, allocated inside the call (part of temp_bytes)

    @property
    def transient_bytes(self) -> int:
        """What the call adds on top of the stage's resident buffers: temporaries, plus inputs and
        outputs that are not resident (batches, samples, metrics) and not written in place."""
        return self.temp_bytes + self.argument_bytes - self.resident_bytes + self.output_bytes - self.alias_bytes


def compile_cost(
    name: str,
    fn: Any,
    *args,
    shapes: str = "",
    resident: Any = None,
    kv_cache_bytes: int = 0,
    mesh: Any = None,
    rules: Rules = DEFAULT_RULES,
    **kwargs,
) -> ExecutableCost:
    """Lowers and compiles `fn(*args, **kwargs)` (a jitted function, abstract arguments) and reads
    its memory and cost analysis.

    Args:
      name, shapes: how the step is named in the plan.
      fn: a `jax.jit`-wrapped function.
      resident: the arguments (a tree) that the stage holds anyway, counted in its params and
        optimizer state, not in the call's transient memory.
      kv_cache_bytes: bytes of a KV cache the call allocates inside itself (for the report).
      mesh, rules: the logical-axis rules the model's constraints resolve with (needed when `fn`
        traces a model under a mesh).
    """
    t0 = time.perf_counter()
    ctx = with_rules(mesh, rules) if mesh is not None else contextlib.nullcontext()
    with ctx:
        compiled = fn.lower(*args, **kwargs).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per program
        cost = cost[0] if cost else {}
    return ExecutableCost(
        name=name,
        shapes=shapes,
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        resident_bytes=bytes_per_device(resident) if resident is not None else 0,
        flops=float(cost.get("flops", 0.0)),
        compile_s=seconds,
        kv_cache_bytes=int(kv_cache_bytes),
    )


@contextlib.contextmanager
def traced_for(platform: str):
    """Traces models as on `platform`: off CPU, the CPU-only custom-VJP matmuls of nn/cpu_matmul.py
    (selected there by `jax.default_backend()`, which is "cpu" while planning) are not used, so the
    compiled program is the accelerator's. A no-op for "cpu"."""
    if platform == "cpu":
        yield
        return
    from cai_jax.nn import cpu_matmul

    with cpu_matmul.disabled():
        yield
