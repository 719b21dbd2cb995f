"""Loop plumbing shared by the SFT and PM loops: the one jit of a train step, state shardings, metrics.

    shardings = state_shardings(state, param_shardings(model, tokens, mesh), mesh)
    step = jit_train_step(partial(sft_step, model=m, optimizer=o), shardings, batch_shardings, mesh)
    logger = MetricsLogger(workdir / "metrics.jsonl")
    for i in ...:
        state, metrics = step(state, batch)       # dispatched; the device runs ahead
        logger.push(i + 1, metrics)               # fetches step i's metrics, not step i + 1's
    logger.flush()

Fetching the previous step's metrics after dispatching the next step keeps the device busy while
the host converts, checks and writes them (nanodo's pattern).

The SFT and PM trainers share everything after their batcher and step function:

    state, shardings, optimizer, mesh = init_train_state(module, params, sample, optim_cfg=..., ...)
    step = jit_train_step(partial(step_fn, model=module, optimizer=optimizer), shardings, b_sharding, mesh)
    state = run_steps(step, state, batcher, shardings=shardings, mesh=mesh, ckpt=ckpt, logger=logger,
                      num_steps=n, batch_size=b, count_tokens=lambda batch: int(batch["mask"].sum()))

`run_steps` restores the latest checkpoint (train state + batcher position), runs to `num_steps`,
saves only states whose own metrics were fetched and found finite, and stops with
FloatingPointError on a non-finite loss, leaving the last good checkpoint in place.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cai_jax.checkpoints.train_state import Checkpointer
from cai_jax.sharding import (
    DEFAULT_RULES,
    Rules,
    abstract_params,
    global_batch,
    make_mesh,
    process_shard,
    shard_params,
    sharded_init,
    with_rules,
)
from cai_jax.train.state import OptimConfig, Optimizer, TrainState, make_optimizer
from cai_jax.train.steps import check_finite

__all__ = [
    "jit_train_step",
    "state_shardings",
    "METRICS_SINKS",
    "MetricsLogger",
    "EpochBatcher",
    "Batcher",
    "init_train_state",
    "abstract_train_state",
    "run_steps",
]

log = logging.getLogger(__name__)


def _path(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def state_shardings(state: TrainState, param_shardings: Any, mesh: jax.sharding.Mesh) -> TrainState:
    """NamedShardings for every leaf of `state` (a TrainState of arrays or ShapeDtypeStructs).

    Params take `param_shardings`. An optimizer-state leaf (Adam's mu / nu) takes the sharding of
    the parameter whose path is a suffix of its own path and whose shape it has, so moments are
    split exactly like their params (FSDP divides them too); every other leaf (step counts, the
    empty placeholders of frozen leaves, scalars) is replicated, as are `step` and `rng`.
    """
    replicated = NamedSharding(mesh, P())
    by_path = {}
    for (path, x), s in zip(
        jax.tree_util.tree_flatten_with_path(state.params)[0], jax.tree.leaves(param_shardings), strict=True
    ):
        by_path[_path(path)] = (tuple(x.shape), s)

    def opt_leaf(path, x):
        p = _path(path)
        shape = tuple(np.shape(x))
        # Longest matching suffix first, so "a/kernel" never shadows "b/a/kernel".
        for name in sorted(by_path, key=len, reverse=True):
            want_shape, sharding = by_path[name]
            if (p == name or p.endswith("/" + name)) and shape == want_shape:
                return sharding
        return replicated

    return TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=jax.tree_util.tree_map_with_path(opt_leaf, state.opt_state),
        rng=replicated,
    )


def jit_train_step(
    step_fn: Callable,
    state_shardings: Any,
    batch_shardings: Any,
    mesh: jax.sharding.Mesh,
    rules: Rules = DEFAULT_RULES,
) -> Callable:
    """`step_fn(state, batch) -> (state, metrics)` jitted once: sharded in and out, state donated.

    The returned callable enters `with_rules(mesh, rules)` around each call, so the logical
    constraints inside the model resolve to `mesh` when (and whenever) jax traces. Metrics come
    out replicated. The caller must not use the `state` it passed in after the call (donated).
    """
    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )

    def step(state, batch):
        with with_rules(mesh, rules):
            return jitted(state, batch)

    step.jitted = jitted  # for .lower() / cost analysis
    return step


# Callables sink(metrics file path, row) that also get every row a MetricsLogger writes (on the
# process that writes the file): the entry points register optional loggers here, e.g. Weights &
# Biases (experiments/wandb_log.py), so the loops stay free of them.
METRICS_SINKS: list[Callable[[str, dict], None]] = []


class MetricsLogger:
    """Appends one JSON object per step to `path`, fetching each step's metrics one step late.

    `push(step, metrics)` stores the new (device) metrics and fetches, checks and writes the ones
    pushed before, so the host waits on step k only after step k + 1 has been dispatched.
    `flush()` fetches whatever is pending (call it before a checkpoint and at the end). Every
    fetched row goes through `check_finite` before it is written, so a non-finite step raises
    FloatingPointError naming its step; rows before it are on disk.

    `tokens_per_s` is `extra["tokens_in_batch"]` (real tokens) over the wall time between
    consecutive fetches (the first row's includes compilation). With `flops_per_token` (see
    `train.flops.model_flops_per_token`) and `peak_flops` (the whole mesh's peak FLOP/s) each row
    also gets `mfu` = tokens_per_s * flops_per_token / peak_flops. Only process 0 writes the file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        check: bool = True,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
    ):
        self.path = os.fspath(path)
        self.check = check
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self._pending: tuple[int, Any, dict] | None = None
        self._last_fetch = time.perf_counter()
        self._file = None
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, "a")  # noqa: SIM115  (kept open across steps; closed in close())
        self.rows: list[dict] = []  # every row written by this logger, for callers and tests

    def push(self, step: int, metrics: dict, extra: dict | None = None) -> dict | None:
        """Queues step `step`'s device metrics; returns the previous step's row (or None)."""
        row = self.flush()
        self._pending = (int(step), metrics, dict(extra or {}))
        return row

    def flush(self) -> dict | None:
        """Fetches, checks and writes the pending step's metrics; returns its row (or None)."""
        if self._pending is None:
            return None
        step, metrics, extra = self._pending
        self._pending = None
        host = jax.device_get(metrics)
        now = time.perf_counter()
        dt, self._last_fetch = now - self._last_fetch, now
        row = {"step": step, **{k: float(np.asarray(v)) for k, v in host.items()}}
        for k, v in extra.items():
            row[k] = v
        if "tokens_in_batch" in extra and dt > 0:
            row["tokens_per_s"] = float(extra["tokens_in_batch"]) / dt
            if self.flops_per_token and self.peak_flops:
                row["mfu"] = row["tokens_per_s"] * self.flops_per_token / self.peak_flops
        if self.check:
            check_finite(row, step, extra.get("batch_id"))
        self._write(row)
        return row

    def _write(self, row: dict) -> None:
        self.rows.append(row)
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
            for sink in METRICS_SINKS:
                sink(self.path, row)

    def close(self) -> None:
        """Drops (does not fetch) anything pending and closes the file."""
        self._pending = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- batchers


class Batcher(Protocol):
    """What `run_steps` needs of a data source: fixed-shape host batches and a resumable position."""

    def next(self) -> tuple[dict[str, np.ndarray], str]: ...  # (global batch, batch id)

    def state(self) -> dict: ...  # JSON position, saved with each checkpoint

    def restore(self, data_state: dict) -> None: ...


class EpochBatcher:
    """Position bookkeeping shared by the batchers: epochs of `_epoch_len(epoch)` rows, seeded.

    The position is (epoch, index): the index into that epoch's row order of the next batch's
    first row. A batch takes `batch_size` consecutive rows; when fewer are left in the epoch the
    rest are dropped (static shapes) and the next epoch starts. Subclasses define
    `_epoch_len(epoch)` and build batches from `_advance()`'s (epoch, index); `_state_extra()`
    adds fields that must match on restore (e.g. whether rows are packed).
    """

    seed: int
    batch_size: int
    epoch: int = 0
    index: int = 0

    def _epoch_len(self, epoch: int) -> int:
        raise NotImplementedError

    def _state_extra(self) -> dict:
        return {}

    def _advance(self) -> tuple[int, int]:
        """The (epoch, index) of the next batch; moves the position past it."""
        if self.index + self.batch_size > self._epoch_len(self.epoch):
            self.epoch, self.index = self.epoch + 1, 0
            if self.batch_size > self._epoch_len(self.epoch):
                raise ValueError(f"epoch {self.epoch} has {self._epoch_len(self.epoch)} rows, fewer than a batch")
        at = (self.epoch, self.index)
        self.index += self.batch_size
        return at

    def state(self) -> dict:
        """The position as a JSON dict (saved with each checkpoint)."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, **self._state_extra()}

    def restore(self, data_state: Mapping) -> None:
        """Continues from a `state()`; a different seed (or layout) is an error: it would be another run."""
        if int(data_state["seed"]) != self.seed:
            raise ValueError(f"checkpoint data seed {data_state['seed']} differs from this run's seed {self.seed}")
        for key, value in self._state_extra().items():
            if data_state.get(key, False) != value:
                raise ValueError(
                    f"checkpoint data {key}={data_state.get(key, False)!r} differs from this run's {value!r}"
                )
        self.epoch, self.index = int(data_state["epoch"]), int(data_state["index"])


# ---------------------------------------------------------------- the loop


def init_train_state(
    module: nn.Module,
    params: Any,
    sample_input: Any,
    *,
    optim_cfg: OptimConfig,
    mesh: jax.sharding.Mesh | None = None,
    mesh_cfg: Any = None,
    rules: Rules = DEFAULT_RULES,
    seed: int = 0,
) -> tuple[TrainState, TrainState, Optimizer, jax.sharding.Mesh]:
    """A sharded `TrainState` for `module`, from `params` or a fresh init.

    Args:
      module: the Flax module the step applies.
      params: unboxed host or device params, or None for `sharded_init` with `key(seed)`.
      sample_input: the module's first call argument(s) (arrays or ShapeDtypeStructs), for shapes.
      optim_cfg: the optimizer config.
      mesh, mesh_cfg: the mesh, or its sizes (default `MeshConfig()`: all devices data-parallel).
      rules: logical-axis rules.
      seed: init and state rng seed.

    Returns:
      (state, state shardings, optimizer, mesh). The state owns `params` (donated by the first step).
    """
    if mesh is None:
        mesh = make_mesh(mesh_cfg) if mesh_cfg is not None else make_mesh()
    _, shardings, optimizer = abstract_train_state(module, sample_input, optim_cfg=optim_cfg, mesh=mesh, rules=rules)
    if params is None:
        params = sharded_init(module, jax.random.key(seed), sample_input, mesh, rules)
    else:
        params = shard_params(params, shardings.params)
    create = jax.jit(lambda p: TrainState.create(p, optimizer, jax.random.key(seed)), out_shardings=shardings)
    return create(params), shardings, optimizer, mesh


def abstract_train_state(
    module: nn.Module, sample_input: Any, *, optim_cfg: OptimConfig, mesh: Any, rules: Rules = DEFAULT_RULES
) -> tuple[TrainState, TrainState, Optimizer]:
    """The state `init_train_state` builds, as ShapeDtypeStructs on their shardings (nothing allocated).

    Returns:
      (abstract state, its shardings, the optimizer): what a planner lowers a step with
      (experiments/plan.py), and what `init_train_state` places the real state on.
    """
    params = abstract_params(module, sample_input, mesh, rules)
    optimizer = make_optimizer(optim_cfg, params)
    state = jax.eval_shape(lambda p: TrainState.create(p, optimizer, jax.random.key(0)), params)
    shardings = state_shardings(state, jax.tree.map(lambda x: x.sharding, params), mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    return state, shardings, optimizer


def run_steps(
    step: Callable,
    state: TrainState,
    batcher: Batcher,
    *,
    shardings: TrainState,
    mesh: jax.sharding.Mesh,
    ckpt: Checkpointer,
    logger: MetricsLogger,
    num_steps: int,
    batch_size: int,
    count_tokens: Callable[[dict], int],
    name: str = "train",
) -> TrainState:
    """Runs `step` until `state.step == num_steps`, resuming from `ckpt`'s latest checkpoint.

    Each iteration takes the batcher's next global batch, gives this process its rows
    (`process_shard`), dispatches the step and pushes its metrics to `logger` (fetched one step
    late, with `tokens_in_batch` = `count_tokens(batch)` and `batch_id`). A state is saved (with
    the batcher position after its batch) only once its own metrics have been fetched and checked,
    so a non-finite step raises FloatingPointError before anything after it is saved.

    Args:
      step: `step(state, batch) -> (state, metrics)` from `jit_train_step` (state donated).
      state: the initial state (from `init_train_state`); replaced by the checkpoint if one exists.
      batcher: the data (`Batcher`); restored to the checkpoint's position.
      shardings: the state's shardings (restore target).
      mesh: the mesh the batch is placed on.
      ckpt, logger: where states and metrics go; the caller closes them.
      num_steps: total steps, counting resumed ones.
      batch_size: global batch rows.
      count_tokens: real tokens of a host batch (for tokens/s and MFU).
      name: for log messages.

    Returns:
      The final state (the restored one, untrained, if a checkpoint at or beyond `num_steps` exists).
    """
    if ckpt.latest_step() is not None:
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
        state, data_state = ckpt.restore(target=target)
        batcher.restore(data_state)
        log.info("%s: resumed from step %d (%s)", name, int(state.step), data_state)
    start, last = int(jax.device_get(state.step)), int(num_steps)
    lo, hi = process_shard(batch_size)
    for i in range(start, last):
        host_batch, batch_id = batcher.next()
        data_state = batcher.state()
        local = {k: v[lo:hi] for k, v in host_batch.items()}
        state, metrics = step(state, global_batch(local, mesh))
        extra = {"tokens_in_batch": int(count_tokens(host_batch)), "batch_id": batch_id}
        logger.push(i + 1, metrics, extra)  # fetches and checks step i's metrics
        final = i + 1 == last
        if final or ckpt.should_save(i + 1):
            logger.flush()  # never save a state whose own step is unchecked
            ckpt.save(i + 1, state, data_state, force=final)
    logger.flush()
    ckpt.wait()
    return state


def gather_to_host(tree: Any) -> Any:
    """A (possibly sharded, multi-host) pytree as host numpy arrays on every process (for export)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def open_run(
    workdir: str | os.PathLike,
    ckpt_cfg: Any,
    mesh: jax.sharding.Mesh,
    flops_per_token: float | None,
    peak_flops_per_device: float | str | None,
) -> tuple[Checkpointer, MetricsLogger]:
    """The checkpointer and `workdir/metrics.jsonl` logger of a loop (MFU when the peak is known)."""
    from cai_jax.train.flops import resolve_peak_flops

    peak = resolve_peak_flops(peak_flops_per_device)
    logger = MetricsLogger(
        os.path.join(workdir, "metrics.jsonl"),
        flops_per_token=flops_per_token,
        peak_flops=None if peak is None else peak * mesh.devices.size,
    )
    return Checkpointer(ckpt_cfg), logger
