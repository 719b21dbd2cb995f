"""Device mesh, logical-axis rules and multi-host setup: the only module that names mesh axes.

Strategy (the usual FSDP + tensor-parallel layout for decoder LMs):

* ``data``: pure data parallelism. Params are replicated across it; the batch is split over it.
* ``fsdp``: fully sharded data parallelism. The batch is split over it *and* every parameter's
  ``embed`` dimension is sharded over it, so params, grads and optimizer state are divided by its
  size; XLA all-gathers a layer's weights just before they are used.
* ``tensor``: Megatron-style tensor parallelism over attention heads, MLP hidden units and the
  vocabulary. Activations keep ``embed`` unsharded (``batch`` already uses ``fsdp``).

Models only use logical names (``nn.with_logical_partitioning`` / ``nn.with_logical_constraint``);
`DEFAULT_RULES` maps them onto the mesh. Typical use::

    initialize_distributed(cfg.mesh)            # before any other JAX call; no-op on one host
    mesh = make_mesh(cfg.mesh)                  # data * fsdp * tensor == number of devices
    params = sharded_init(model, rng, tokens_BL, mesh)          # or shard_params(loaded, shardings)
    with with_rules(mesh):
        step = jax.jit(fn, in_shardings=(param_shardings(...), batch_sharding(mesh)))
        out = step(params, global_batch(local_batch, mesh))
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import functools
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axes (None = replicated). Earlier rules win; a mesh axis is used at most once
# per array, so ("batch", "length", "embed") activations get P(("data", "fsdp"), None, None).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("score", None),
)

Rules = collections.abc.Sequence[tuple[str, Any]]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh sizes (devices per axis). One of them may be -1: all remaining devices.

    No field has a default: a run's mesh is its config's `mesh` section (`configs/base.py`);
    `DATA_PARALLEL` is the layout the library takes when a caller gives none.
    """

    data: int  # data-parallel replicas
    fsdp: int  # parameter-sharding (ZeRO-3) group size
    tensor: int  # tensor-parallel group size


DATA_PARALLEL = MeshConfig(data=-1, fsdp=1, tensor=1)  # every device on the data axis


def _field(cfg: Any, name: str) -> Any:
    if isinstance(cfg, collections.abc.Mapping):
        return cfg[name]
    return getattr(cfg, name)


def mesh_shape(mesh_cfg: Any, n_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes from a ConfigDict, dict or dataclass, with a -1 filled in."""
    try:
        sizes = {a: int(_field(mesh_cfg, a)) for a in MESH_AXES}
    except (KeyError, AttributeError) as e:
        raise ValueError(f"mesh config needs integer fields {MESH_AXES}; missing {e}") from None
    free = [a for a, s in sizes.items() if s == -1]
    bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
    if bad or len(free) > 1:
        raise ValueError(f"mesh sizes {sizes}: each must be a positive integer, or -1 for at most one axis")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n_devices % fixed:
            raise ValueError(
                f"mesh sizes {sizes}: cannot fill {free[0]}=-1, {n_devices} devices are not a multiple of {fixed}"
            )
        sizes[free[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(
            f"mesh sizes {sizes} (product {math.prod(sizes.values())}) do not match the {n_devices} available "
            "devices; make data * fsdp * tensor equal the device count, or set one size to -1"
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(mesh_cfg: Any = DATA_PARALLEL, devices: collections.abc.Sequence | None = None) -> jax.sharding.Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)  # GSPMD propagation, as flax's rules expect
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def make_rules(overrides: collections.abc.Mapping[str, Any] | None = None) -> tuple:
    """`DEFAULT_RULES` with some logical names remapped, e.g. {"embed": None} turns FSDP off."""
    overrides = dict(overrides or {})
    rules = [(name, overrides.pop(name, axes)) for name, axes in DEFAULT_RULES]
    return tuple(rules + [(name, axes) for name, axes in overrides.items()])


def logical_to_sharding(logical_tree: Any, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Tree of logical PartitionSpecs (e.g. ``P("embed", "mlp")``) -> tree of NamedShardings."""
    return nn.logical_to_mesh_sharding(logical_tree, mesh, list(rules))


def _is_spec(x) -> bool:
    return isinstance(x, (P, NamedSharding))


def _flat_with_paths(tree: Any) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(tree))
    return [(jax.tree_util.keystr(path, simple=True, separator="/"), x) for path, x in leaves]


def check_divisible(
    params: Any, shardings: Any, mesh: Any = None, logical_specs: Any = None, max_listed: int = 8
) -> None:
    """Raises ValueError naming every parameter whose dimension does not divide its mesh axes.

    Args:
      params: params tree (arrays, ShapeDtypeStructs, or boxed flax metadata).
      shardings: same structure, NamedSharding or PartitionSpec leaves.
      mesh: Mesh or AbstractMesh; needed only when `shardings` holds PartitionSpecs.
      logical_specs: optional tree of logical PartitionSpecs, quoted in the message.
      max_listed: report at most this many offending parameters in full.
    """
    named = _flat_with_paths(params)
    specs = jax.tree.leaves(shardings, is_leaf=_is_spec)
    logical = jax.tree.leaves(logical_specs, is_leaf=_is_spec) if logical_specs is not None else [None] * len(specs)
    if len(specs) != len(named) or len(logical) != len(named):
        raise ValueError(f"params have {len(named)} leaves but the sharding tree has {len(specs)}")
    problems = []
    for (path, x), spec, names in zip(named, specs, logical):
        sizes = dict((spec.mesh if isinstance(spec, NamedSharding) else mesh).shape)
        spec = spec.spec if isinstance(spec, NamedSharding) else spec
        shape = tuple(x.shape)
        if len(spec) > len(shape):
            problems.append(f"{path}: shape {shape} has fewer dimensions than its partition spec {spec}")
            continue
        for dim, axes in enumerate(spec):
            if axes is None or axes is P.UNCONSTRAINED:
                continue
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            unknown = [a for a in axes if a not in sizes]
            if unknown:
                problems.append(f"{path}: mesh axes {unknown} are not in the mesh {tuple(sizes)}")
                continue
            n = math.prod(sizes[a] for a in axes)
            if shape[dim] % n:
                logical_name = f", logical axis {names[dim]!r}" if names is not None and dim < len(names) else ""
                problems.append(
                    f"{path}: shape {shape}, dimension {dim} (size {shape[dim]}{logical_name}) is split over "
                    f"mesh axes {axes} of total size {n}, which does not divide {shape[dim]}"
                )
    if problems:
        more = f"\n  ... and {len(problems) - max_listed} more" if len(problems) > max_listed else ""
        raise ValueError(
            f"parameters do not divide the mesh {sizes}:\n  "
            + "\n  ".join(problems[:max_listed])
            + more
            + "\nChoose mesh sizes that divide these dimensions, or map their logical axes to None in the rules."
        )


def _args(sample_input) -> tuple:
    return sample_input if isinstance(sample_input, tuple) else (sample_input,)


def _abstract_boxed_params(model: nn.Module, sample_input) -> Any:
    return jax.eval_shape(model.init, jax.random.key(0), *_args(sample_input))["params"]


def _check_rules_cover(logical: Any, rules: Rules) -> None:
    known = {name for name, _ in rules}
    used = {n for spec in jax.tree.leaves(logical, is_leaf=_is_spec) for n in spec if isinstance(n, str)}
    if missing := sorted(used - known):
        raise ValueError(
            f"logical axes {missing} have no sharding rule; add (name, None) to replicate them or (name, mesh_axis)"
        )


def param_shardings(model: nn.Module, sample_input, mesh: Any, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedSharding per parameter (the unboxed "params" tree structure) from the logical names.

    `sample_input` is the model's first call argument (array or ShapeDtypeStruct) or a tuple of them.
    Raises ValueError (see `check_divisible`) when a parameter does not divide the mesh.
    """
    boxed = _abstract_boxed_params(model, sample_input)
    logical = nn.get_partition_spec(boxed)
    _check_rules_cover(logical, rules)
    shardings = logical_to_sharding(logical, mesh, rules)
    check_divisible(boxed, shardings, logical_specs=logical)
    return shardings


def abstract_params(model: nn.Module, sample_input, mesh: Any, rules: Rules = DEFAULT_RULES) -> Any:
    """The unboxed params `sharded_init` would make, as ShapeDtypeStructs on their shardings.

    Nothing is allocated: the shapes come from `jax.eval_shape` of `model.init`, so a planner can
    lower a step for a model of any size (see experiments/plan.py).
    """
    shardings = param_shardings(model, sample_input, mesh, rules)
    shapes = nn.meta.unbox(_abstract_boxed_params(model, sample_input))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def sharded_init(model: nn.Module, rng: jax.Array, sample_input, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
    """`model.init` jitted straight into its shardings: unboxed params, never materialised whole.

    Gives the same values as an unsharded `model.init(rng, ...)` (threefry is partitionable).
    """
    shardings = param_shardings(model, sample_input, mesh, rules)
    abstract_args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _args(sample_input))

    def init(rng):
        args = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_args)
        return nn.meta.unbox(model.init(rng, *args)["params"])

    return jax.jit(init, out_shardings=shardings)(rng)


def shard_params(params: Any, shardings: Any) -> Any:
    """Places host or device params (e.g. loaded from a checkpoint) onto their shardings.

    On several hosts every process must pass the same full values; each keeps only its shards.
    """
    check_divisible(params, shardings)

    def put(x, sharding):
        return jax.device_put(x, sharding) if sharding.is_fully_addressable else _from_full(x, sharding)

    return jax.tree.map(put, nn.meta.unbox(params), shardings)


def _from_full(x: Any, sharding: Any) -> jax.Array:
    """A global array from the full value `x`, which every process holds: each places its own shards."""
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def batch_sharding(mesh: Any) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp; other dimensions replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


@contextlib.contextmanager
def with_rules(mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
    """Context in which `nn.with_logical_constraint` inside jitted code constrains onto `mesh`.

    Enter it around tracing (the first call of a jitted function): the rules are read at trace time.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        yield mesh


# ---------------------------------------------------------------------------------------------
# Multi-host


def _cluster_detected() -> bool:
    """Cheap environment hints of a multi-process launch that jax can auto-configure."""
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        return True
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return True
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
    return "," in hosts


def initialize_distributed(cfg: Any = None) -> bool:
    """Starts `jax.distributed` for multi-process runs; call before any other JAX call.

    Sources, first match wins:
      1. `cfg` (ConfigDict, dict or object) with `coordinator_address` ("host:port"),
         `num_processes` and `process_id`; optional `local_device_ids`.
      2. Environment variables COORDINATOR_ADDRESS, NUM_PROCESSES, PROCESS_ID.
      3. A cluster jax detects itself (Slurm, Open MPI, multi-host TPU, JAX_COORDINATOR_ADDRESS),
         or `cfg.auto_detect=True` to ask jax to try (GCE TPU pods, Kubernetes).
    Otherwise, a no-op (single process).

    Returns:
      True if the distributed runtime is (now) initialised.
    """
    if jax.distributed.is_initialized():
        return True

    def get(name):
        if cfg is None:
            return None
        if isinstance(cfg, collections.abc.Mapping):
            return cfg.get(name)
        return getattr(cfg, name, None)

    explicit = {k: get(k) for k in ("coordinator_address", "num_processes", "process_id", "local_device_ids")}
    env = {
        "coordinator_address": os.environ.get("COORDINATOR_ADDRESS"),
        "num_processes": os.environ.get("NUM_PROCESSES"),
        "process_id": os.environ.get("PROCESS_ID"),
    }
    for source, values in (("config", explicit), ("environment", env)):
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            continue
        for k in ("num_processes", "process_id"):
            if k in values:
                values[k] = int(values[k])
        if "coordinator_address" not in values or "num_processes" not in values:
            raise ValueError(
                f"distributed setup from {source} needs coordinator_address and num_processes; got {values}"
            )
        jax.distributed.initialize(**values)
        return True
    if get("auto_detect") or _cluster_detected():
        jax.distributed.initialize()
        return True
    return False


def process_shard(n_items: int, process_index: int | None = None, process_count: int | None = None) -> tuple[int, int]:
    """Contiguous [start, stop) of `n_items` this process loads; the first n % count get one more."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"need 0 <= process_index < process_count, got {index} of {count}")
    base, extra = divmod(n_items, count)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


def global_batch(local_batch: Any, mesh: jax.sharding.Mesh) -> Any:
    """Tree of this process's rows [B / process_count, ...] -> global arrays sharded by `batch_sharding`.

    Each process passes its own rows (e.g. `process_shard(B)` of every global batch); the rows of
    a global batch may be permuted relative to the dataset, which no per-example loss notices.
    """
    sharding = batch_sharding(mesh)
    split = math.prod(mesh.shape[a] for a in BATCH_AXES)

    def put(x):
        rows = x.shape[0] * jax.process_count()
        if rows % split:
            raise ValueError(f"global batch of {rows} rows does not divide over data x fsdp = {split} devices")
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, local_batch)


def from_host(tree: Any, shardings: Any) -> Any:
    """Full host arrays, equal on every process -> global arrays on `shardings` (one, or a tree).

    What a multi-process jit needs for inputs that every process holds whole (a rollout batch
    after `allgather_rows`); each process places only its own shards. Leaves that are already
    `jax.Array`s are kept. In one process the tree is returned as it is: the jitted function
    places host arrays by its in_shardings, as before.
    """
    if jax.process_count() == 1:
        return tree
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    return jax.tree.map(lambda x, sharding: x if isinstance(x, jax.Array) else _from_full(x, sharding), tree, shardings)


def to_host(tree: Any) -> Any:
    """Global (possibly multi-process) arrays -> their full values as numpy, on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def get(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


def allgather_rows(tree: Any) -> Any:
    """Tree of this process's rows [B / process_count, ...] (numpy) -> the full [B, ...] on every
    process, in process order: the inverse of taking `process_shard(B)`. Every process must hold
    the same number of rows. One process: returned as it is."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True)), tree)


def local_copy(tree: Any) -> Any:
    """Global params -> their full values on this process's first device (for a per-process program
    such as the sampler). Leaves replicated over the mesh are read from a local shard; sharded ones
    are all-gathered first (one jitted copy per mesh). One process: returned as it is."""
    if jax.process_count() == 1:
        return tree
    sharded = [x.sharding.mesh for x in jax.tree.leaves(tree) if not x.is_fully_replicated]
    if sharded:
        tree = _replicator(sharded[0])(tree)
    return jax.tree.map(lambda x: x.addressable_data(0), tree)


@functools.lru_cache(maxsize=8)
def _replicator(mesh: jax.sharding.Mesh):
    return jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, P()))
