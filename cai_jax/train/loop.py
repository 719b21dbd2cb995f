"""Plumbing under the fit loop (`train.fit`): the one jit of a train step, state shardings, batchers.

    state, shardings, optimizer, mesh = init_train_state(module, params, sample, optim_cfg=ocfg)
    step = jit_train_step(partial(sft_step, model=module, optimizer=optimizer), shardings,
                          batch_sharding(mesh), mesh)        # sharded in and out, state donated
    state, metrics = step(state, batch)

`state_shardings` splits Adam's moments exactly like their params; `abstract_train_state` is the
same state as ShapeDtypeStructs (what a planner lowers a step with). `EpochBatcher` is the
seeded, resumable (epoch, index) position every batcher shares (SFT, PM, PPO's prompt stream).
`MetricsLogger` and `METRICS_SINKS` live in `train.logs` and are re-exported here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cai_jax.sharding import (
    DEFAULT_RULES,
    Rules,
    abstract_params,
    from_host,
    make_mesh,
    shard_params,
    sharded_init,
    with_rules,
)
from cai_jax.train.logs import METRICS_SINKS, MetricsLogger
from cai_jax.train.state import OptimConfig, Optimizer, TrainState, make_optimizer

__all__ = [
    "jit_train_step",
    "state_shardings",
    "METRICS_SINKS",
    "MetricsLogger",
    "EpochBatcher",
    "Batcher",
    "init_train_state",
    "abstract_train_state",
    "gather_to_host",
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
    `batch` is global arrays, or host arrays that every process holds whole (`sharding.from_host`).
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
            return jitted(state, from_host(batch, batch_shardings))

    step.jitted = jitted  # for .lower() / cost analysis
    return step


# ---------------------------------------------------------------- batchers


class Batcher(Protocol):
    """A host data source (`fit.BatcherSource` feeds it to the loop): fixed-shape batches, a resumable position."""

    batch_size: int  # rows of a global batch

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

    def _next_items(self, num_items: int) -> tuple[np.ndarray, str]:
        """One item per row: the next batch's indices in the epoch's order of `num_items` items, and its id.

        Epoch e takes the items in the order `default_rng([seed, e]).permutation(num_items)`.
        """
        epoch, index = self._advance()
        order = np.random.default_rng([self.seed, epoch]).permutation(num_items)
        return order[index : index + self.batch_size], f"epoch {epoch} index {index}"

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


# ---------------------------------------------------------------- the train state


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
      mesh, mesh_cfg: the mesh, or its sizes (default `DATA_PARALLEL`: all devices data-parallel).
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


def gather_to_host(tree: Any) -> Any:
    """A (possibly sharded, multi-host) pytree as host numpy arrays on every process (for export)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)
