"""The one fit loop: SFT, the PM (PMP too) and PPO are each a source of batches plus an update.

    state = fit(source, update, state, ckpt=Checkpointer(ckpt_cfg), logger=MetricsLogger(path),
                num_steps=n, export_at={k: folder}, export=lambda state, folder: ...)

Step i (0-based; its number in files, checkpoints and errors is i + 1) is

    step = source.next(state, i)               # Step(batch, extra row fields, attached side rows)
    data_state = source.state()                # the position after this batch, saved with the state
    state, metrics = update(state, step.batch)
    logger.push(i + 1, metrics, step.extra, step.attached)   # fetches and checks step i's row

SFT and PM (`fit_batches`): the source is a `Batcher` placed on the mesh (`BatcherSource`), the
update one jitted step (`loop.jit_train_step`). PPO (`train.ppo`): the source is
`ppo_rollout.RolloutSource` (sample with the current params, score, teacher-forced forwards,
advantages), the update `ppo_rollout.update_on_rollout` (epochs x minibatches of the jitted
`ppo_update`).

Invariants:
- Exact resume. The latest checkpoint holds the train state and `source.state()` (the batcher
  position; PPO's prompt stream and adaptive KL coefficient); every random draw derives from the
  seed and the step, so a resumed run computes what an uninterrupted one would have. On resume
  the logs are cut back to the restored step (`MetricsLogger.resume`), so the files too equal an
  uninterrupted run's, timings aside.
- Metrics one step late (nanodo's pattern): the host fetches, checks and writes step i's row
  after step i + 1 was dispatched. `fetch_late=False` (PPO) fetches right after the update: the
  next rollout waits for those params anyway, and a bad update is reported before a rollout
  samples from it.
- Nothing unchecked is kept. A step is checkpointed (and exported) only after its own row was
  fetched and found finite; a non-finite loss or gradient norm (or a PPO reward) raises
  FloatingPointError naming the step (iteration) and the batch id, and the last good checkpoint,
  which stays in place.
- Exports. At each step k of `export_at` the loop checks the row, calls `export(state, folder)`
  and then forces a checkpoint, so k's export exists once k is saved: a resume never skips it (a
  kill between the two redoes both). With `export_done`, a resume also checks every export at or
  before the restored step and redoes one that is not done (cut mid-write, or removed) from its
  own checkpoint.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from cai_jax.checkpoints.train_state import CheckpointConfig, Checkpointer
from cai_jax.sharding import DATA_PARALLEL, Rules, batch_sharding, global_batch, process_shard
from cai_jax.train.flops import resolve_peak_flops
from cai_jax.train.logs import MetricsLogger
from cai_jax.train.loop import Batcher, init_train_state, jit_train_step
from cai_jax.train.state import OptimConfig, TrainState

__all__ = ["Step", "Source", "BatcherSource", "fit", "fit_batches", "default_checkpoints"]

log = logging.getLogger(__name__)


class Step(NamedTuple):
    """What a source gives the loop for one step."""

    batch: Any  # what `update` consumes
    extra: dict  # host fields of the step's metrics row; "batch_id" names the batch in errors
    attached: Mapping[str, list] | None = None  # side-log rows written with the row (PPO: {"samples": [...]})


class Source(Protocol):
    """The loop's data: one `Step` per step, and a JSON position saved with each checkpoint."""

    def next(self, state: TrainState, step: int) -> Step: ...  # step: 0-based index of the step

    def state(self) -> dict: ...

    def restore(self, data_state: Mapping) -> None: ...


class BatcherSource:
    """A `Batcher` as a source: each global host batch, this process's rows of it placed on `mesh`.

    The row gets `tokens_in_batch` = `count_tokens(host batch)` (for tokens/s and MFU) and `batch_id`.
    """

    def __init__(self, batcher: Batcher, mesh: jax.sharding.Mesh, count_tokens: Callable[[dict], int]):
        self.batcher, self.mesh, self.count_tokens = batcher, mesh, count_tokens
        self.rows = process_shard(batcher.batch_size)

    def next(self, state: TrainState, step: int) -> Step:
        host, batch_id = self.batcher.next()
        lo, hi = self.rows
        batch = global_batch({k: v[lo:hi] for k, v in host.items()}, self.mesh)
        return Step(batch, {"tokens_in_batch": int(self.count_tokens(host)), "batch_id": batch_id})

    def state(self) -> dict:
        return self.batcher.state()

    def restore(self, data_state: Mapping) -> None:
        self.batcher.restore(data_state)


def fit(
    source: Source,
    update: Callable[[TrainState, Any], tuple[TrainState, dict]],
    state: TrainState,
    *,
    ckpt: Checkpointer,
    logger: MetricsLogger,
    num_steps: int,
    export_at: Mapping[int, str | os.PathLike] | None = None,
    export: Callable[[TrainState, str | os.PathLike], None] | None = None,
    export_done: Callable[[str | os.PathLike], bool] | None = None,
    fetch_late: bool = True,
    name: str = "train",
    unit: str = "step",
) -> TrainState:
    """Runs `update` on `source`'s steps until step `num_steps`, resuming from `ckpt`'s latest checkpoint.

    Args:
      source: the data (`Source`); restored to the checkpoint's position.
      update: `update(state, batch) -> (state, metrics)`; the state passed in may be donated.
      state: the initial state, on its shardings; replaced by the checkpoint (restored onto the
        same shardings) if one exists.
      ckpt: where states go (`Checkpointer(None)`: nowhere); saved every `save_every_steps`, at
        `num_steps` and at each `export_at` step.
      logger: where rows go; cut back to the restored step first. The caller closes it and `ckpt`.
      num_steps: total steps, counting resumed ones.
      export_at: {step: folder}: after step k is checked, `export(state, folder)`.
      export: the export hook `export_at` calls.
      export_done: `export_done(folder)`: whether an export finished (e.g.
        `checkpoints.hf.is_complete_export`). On resume, an export at or before the restored
        step that is not done is redone from its step's checkpoint (an error if that is gone).
        None trusts the checkpoint: an export exists once its step is saved.
      fetch_late: fetch step i's metrics after step i + 1 is dispatched (False: right away).
      name, unit: for log messages and errors ("PPO", "iteration").

    Returns:
      The final state (the restored one, untrained, if a checkpoint at or beyond `num_steps` exists).

    Raises:
      FloatingPointError: a non-finite row (or whatever the source or update raises as one),
        with the last good checkpoint appended.
    """
    num_steps = int(num_steps)
    exports = {int(k): v for k, v in (export_at or {}).items()}
    if exports and export is None:
        raise ValueError(f"{name}: export_at needs an export hook")
    if any(not 0 < k <= num_steps for k in exports):
        raise ValueError(f"{name}: export_at {sorted(exports)} must lie in [1, {num_steps}]")
    start = ckpt.latest_step() or 0
    if start:
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        if export_done is not None:
            _redo_exports(
                ckpt, target, {k: f for k, f in exports.items() if k <= start}, export, export_done, name, unit
            )
        state, data_state = ckpt.restore(start, target=target)
        source.restore(data_state)
        log.info("%s: resumed from %s %d (%s)", name, unit, start, data_state)
    logger.resume(start)
    try:
        for i in range(start, num_steps):
            step = source.next(state, i)
            data_state = source.state()
            state, metrics = update(state, step.batch)
            logger.push(i + 1, metrics, step.extra, step.attached)
            last = i + 1 == num_steps
            save = last or i + 1 in exports or ckpt.should_save(i + 1)
            if save or not fetch_late:
                logger.flush()  # never save or export a state whose own step is unchecked
            if i + 1 in exports:
                export(state, exports[i + 1])
            if save:
                ckpt.save(i + 1, state, data_state, force=last or i + 1 in exports)
        logger.flush()
    except FloatingPointError as e:
        ckpt.wait()
        raise FloatingPointError(f"{e}. Last good checkpoint: {ckpt.describe_latest(unit)}") from None
    ckpt.wait()
    return state


def _redo_exports(ckpt, target, exports: Mapping[int, Any], export, export_done, name: str, unit: str) -> None:
    """Re-exports, from its own checkpoint, each of `exports` (steps already trained) not done."""
    saved = set(ckpt.all_steps())
    for k, folder in sorted(exports.items()):
        if export_done(folder):
            continue
        if k not in saved:
            raise RuntimeError(
                f"{name}: incomplete export: {folder} (the export at {unit} {k}) is not finished and {unit} {k}'s "
                f"checkpoint is gone (kept: {sorted(saved)}); rerun the stage from scratch"
            )
        log.warning("%s: the export at %s %d, %s, was not finished: exporting it again", name, unit, k, folder)
        state, _ = ckpt.restore(k, target=target)
        export(state, folder)
        del state


def default_checkpoints(workdir: str | os.PathLike, num_steps: int) -> CheckpointConfig:
    """`workdir/checkpoints`, saving only the last step: a trainer's default."""
    return CheckpointConfig(
        directory=os.path.join(workdir, "checkpoints"),
        save_every_steps=max(int(num_steps), 1),
        keep_last=3,
        async_save=False,
    )


def fit_batches(
    module: nn.Module,
    params: Any,
    batcher: Batcher,
    step_fn: Callable,
    *,
    optim_cfg: OptimConfig | Mapping,
    ckpt_cfg: CheckpointConfig | None,
    mesh_cfg: Any,
    rules: Rules,
    seed: int,
    num_steps: int,
    seq_len: int,
    workdir: str | os.PathLike,
    count_tokens: Callable[[dict], int],
    flops_per_token: float | None,
    peak_flops_per_device: float | str | None,
    name: str,
) -> tuple[TrainState, jax.sharding.Mesh]:
    """A batcher plus a step function, trained with `fit` (the SFT and PM trainers).

    Builds the sharded state (`init_train_state` from `params`, or a fresh init for None), jits
    `step_fn(state, batch, *, model, optimizer)` once, and runs it for `num_steps` (total) with
    checkpoints (`ckpt_cfg`, default `default_checkpoints`) and `workdir/metrics.jsonl` (MFU when
    `peak_flops_per_device` resolves, see `train.flops.resolve_peak_flops`).

    Returns:
      (final state, mesh).
    """
    ocfg = optim_cfg if isinstance(optim_cfg, OptimConfig) else OptimConfig.from_config(optim_cfg)
    sample = jax.ShapeDtypeStruct((batcher.batch_size, seq_len), jnp.int32)
    mesh_cfg = DATA_PARALLEL if mesh_cfg is None else mesh_cfg
    state, shardings, optimizer, mesh = init_train_state(
        module, params, sample, optim_cfg=ocfg, mesh_cfg=mesh_cfg, rules=rules, seed=seed
    )
    del params  # now owned by the state, which the first step donates
    step = functools.partial(step_fn, model=module, optimizer=optimizer)
    step = jit_train_step(step, shardings, batch_sharding(mesh), mesh, rules)
    peak = resolve_peak_flops(peak_flops_per_device)
    logger = MetricsLogger(
        os.path.join(workdir, "metrics.jsonl"),
        flops_per_token=flops_per_token,
        peak_flops=None if peak is None else peak * mesh.devices.size,
    )
    ckpt = Checkpointer(ckpt_cfg or default_checkpoints(workdir, num_steps))
    try:
        state = fit(
            BatcherSource(batcher, mesh, count_tokens), step, state, ckpt=ckpt, logger=logger, num_steps=num_steps,
            name=name,
        )  # fmt: skip
    finally:
        logger.close()
        ckpt.close()
    return state, mesh
