"""The SL-CAI supervised fine-tuning loop (paper sec. 3): fixed-length batches, resumable exactly.

    state = train_sft(tiny_config("llama"), params, examples, optim_cfg=OptimConfig(lr=1e-3),
                      ckpt_cfg=CheckpointConfig(directory=f"{workdir}/ckpt", save_every_steps=100),
                      num_steps=1000, batch_size=8, seq_len=256, seed=0, workdir=workdir)

Writes `workdir/metrics.jsonl` (one row per step: loss, accuracy, tokens, grad_norm, lr,
param_norm, tokens_per_s) and checkpoints (train state + data position). Called again with the
same arguments, it resumes from the latest checkpoint and continues with exactly the batches and
losses an uninterrupted run would have had.
"""

from __future__ import annotations

import collections.abc
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cai_jax.checkpoints.train_state import CheckpointConfig, Checkpointer
from cai_jax.models import ModelConfig, Transformer
from cai_jax.sharding import (
    DEFAULT_RULES,
    MeshConfig,
    Rules,
    batch_sharding,
    global_batch,
    make_mesh,
    param_shardings,
    process_shard,
    shard_params,
    sharded_init,
)
from cai_jax.train.loop import MetricsLogger, jit_train_step, state_shardings
from cai_jax.train.state import OptimConfig, TrainState, make_optimizer
from cai_jax.train.steps import sft_step

__all__ = ["SFTBatcher", "train_sft"]

log = logging.getLogger(__name__)


def _field(example: Any, name: str, i: int) -> Sequence[int]:
    if isinstance(example, collections.abc.Mapping):
        if name not in example:
            raise ValueError(f"SFT example {i}: missing field {name!r} (has {sorted(example)})")
        return example[name]
    if not hasattr(example, name):
        raise ValueError(f"SFT example {i}: {type(example).__name__} has no field {name!r}")
    return getattr(example, name)


class SFTBatcher:
    """Deterministic fixed-shape batches over SFT examples, with a resumable position.

    Every example is right-padded (or truncated) to `seq_len`; `num_truncated` counts those longer
    than `seq_len`. Each epoch visits the examples in the order `default_rng([seed, epoch])
    .permutation(n)` in batches of `batch_size`; a final partial batch is dropped (static shapes),
    so every example is seen once per epoch except the last `n % batch_size` of that epoch's order.
    The position is (epoch, index): the index into that epoch's order of the next batch's first row.

    Batches: "tokens" int32 [B, L] (pad `pad_id`), "mask" int32 [B, L] (1 on real tokens),
    "loss_mask" int32 [B, L] (1 on response tokens, 0 on padding).
    """

    def __init__(self, examples: Sequence[Any], *, batch_size: int, seq_len: int, seed: int = 0, pad_id: int = 0):
        n = len(examples)
        if batch_size < 1 or seq_len < 2:
            raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size} and {seq_len}")
        if n < batch_size:
            raise ValueError(f"{n} SFT examples cannot fill one batch of {batch_size}")
        self.batch_size, self.seq_len, self.seed = int(batch_size), int(seq_len), int(seed)
        self.tokens = np.full((n, seq_len), pad_id, np.int32)
        self.mask = np.zeros((n, seq_len), np.int32)
        self.loss_mask = np.zeros((n, seq_len), np.int32)
        self.num_truncated = 0
        for i, ex in enumerate(examples):
            ids, lm = _field(ex, "input_ids", i), _field(ex, "loss_mask", i)
            if len(ids) != len(lm):
                raise ValueError(f"SFT example {i}: {len(ids)} input_ids but {len(lm)} loss_mask entries")
            if not len(ids):
                raise ValueError(f"SFT example {i}: empty input_ids")
            self.num_truncated += len(ids) > seq_len
            k = min(len(ids), seq_len)
            self.tokens[i, :k] = np.asarray(ids[:k], np.int32)
            self.mask[i, :k] = 1
            self.loss_mask[i, :k] = np.asarray(lm[:k], np.int32)
        if self.num_truncated:
            log.warning(
                "SFT: %d of %d examples are longer than seq_len=%d and were truncated", self.num_truncated, n, seq_len
            )
        self.epoch, self.index = 0, 0

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self))

    def state(self) -> dict:
        """The position as a JSON dict (saved with each checkpoint)."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def restore(self, data_state: dict) -> None:
        """Continues from a `state()`; a different seed is an error (it would be a different run)."""
        if int(data_state["seed"]) != self.seed:
            raise ValueError(f"checkpoint data seed {data_state['seed']} differs from this run's seed {self.seed}")
        self.epoch, self.index = int(data_state["epoch"]), int(data_state["index"])

    def next(self) -> tuple[dict[str, np.ndarray], str]:
        """The next global batch (host numpy) and its id "epoch E index I"; advances the position."""
        if self.index + self.batch_size > len(self):
            self.epoch, self.index = self.epoch + 1, 0
        rows = self._order(self.epoch)[self.index : self.index + self.batch_size]
        batch_id = f"epoch {self.epoch} index {self.index}"
        self.index += self.batch_size
        return {"tokens": self.tokens[rows], "mask": self.mask[rows], "loss_mask": self.loss_mask[rows]}, batch_id


def _as_model(model: ModelConfig | nn.Module) -> nn.Module:
    return Transformer(model) if isinstance(model, ModelConfig) else model


def train_sft(
    model: ModelConfig | nn.Module,
    params: Any,
    examples: Sequence[Any],
    *,
    optim_cfg: OptimConfig | collections.abc.Mapping,
    ckpt_cfg: CheckpointConfig | None = None,
    mesh_cfg: Any = None,
    num_steps: int,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
    workdir: str | os.PathLike,
    rules: Rules = DEFAULT_RULES,
    pad_id: int = 0,
    step_fn: Callable = sft_step,
    export_dir: str | os.PathLike | None = None,
    tokenizer: Any = None,
) -> TrainState:
    """Fine-tunes `model` on `examples` for `num_steps` steps (total, counting resumed ones).

    Args:
      model: a `ModelConfig` (a `Transformer` is built) or a Flax module with the same call API.
      params: unboxed host or device params to start from, or None for a fresh sharded init.
      examples: `SFTExample`s or dicts with "input_ids" and "loss_mask".
      optim_cfg: `OptimConfig` or its config dict.
      ckpt_cfg: where and how often to save; default `workdir/checkpoints`, saving only the end.
      mesh_cfg: mesh sizes (default None: `MeshConfig()`, all devices on the data axis).
      num_steps, batch_size, seq_len, seed: run length, global batch rows, padded length, data
        order and state rng seed.
      workdir: folder for metrics.jsonl (appended to across resumes).
      rules: logical-axis rules.
      pad_id: token id of padding (masked out, so only its embedding lookup sees it).
      step_fn: `step(state, batch, *, model, optimizer) -> (state, metrics)`; `sft_step` by default.
      export_dir: if given, the final params are written there as an HF-format folder
        (config.json + safetensors, plus `tokenizer` if given) that transformers loads.

    Returns:
      The final train state (sharded on the mesh). If a checkpoint at or beyond `num_steps` exists,
      the restored state is returned without training.

    Raises:
      FloatingPointError: a non-finite loss or gradient norm, naming the step and batch; the
        latest checkpoint is the last one saved before that step.
    """
    module = _as_model(model)
    ocfg = optim_cfg if isinstance(optim_cfg, OptimConfig) else OptimConfig.from_config(optim_cfg)
    workdir = os.fspath(workdir)
    if ckpt_cfg is None:
        ckpt_cfg = CheckpointConfig(directory=os.path.join(workdir, "checkpoints"), save_every_steps=max(num_steps, 1))
    batcher = SFTBatcher(examples, batch_size=batch_size, seq_len=seq_len, seed=seed, pad_id=pad_id)

    mesh = make_mesh(MeshConfig() if mesh_cfg is None else mesh_cfg)
    sample = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    p_shardings = param_shardings(module, sample, mesh, rules)
    if params is None:
        params = sharded_init(module, jax.random.key(seed), sample, mesh, rules)
    else:
        params = shard_params(params, p_shardings)
    optimizer = make_optimizer(ocfg, params)

    def create(p):
        return TrainState.create(p, optimizer, jax.random.key(seed))

    shardings = state_shardings(jax.eval_shape(create, params), p_shardings, mesh)
    state = jax.jit(create, out_shardings=shardings)(params)
    del params  # now owned by the state, which the first step donates

    b_sharding = batch_sharding(mesh)
    batch_shardings = {"tokens": b_sharding, "mask": b_sharding, "loss_mask": b_sharding}
    step = jit_train_step(
        lambda s, b: step_fn(s, b, model=module, optimizer=optimizer), shardings, batch_shardings, mesh, rules
    )

    ckpt = Checkpointer(ckpt_cfg)
    logger = MetricsLogger(os.path.join(workdir, "metrics.jsonl"))
    try:
        if ckpt.latest_step() is not None:
            target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
            state, data_state = ckpt.restore(target=target)
            batcher.restore(data_state)
            log.info("SFT: resumed from step %d (%s)", int(state.step), data_state)
        start, last = int(jax.device_get(state.step)), int(num_steps)
        lo, hi = process_shard(batch_size)
        for i in range(start, last):
            host_batch, batch_id = batcher.next()
            data_state = batcher.state()
            local = {k: v[lo:hi] for k, v in host_batch.items()}
            state, metrics = step(state, global_batch(local, mesh))
            extra = {"tokens_in_batch": int(host_batch["mask"].sum()), "batch_id": batch_id}
            logger.push(i + 1, metrics, extra)  # fetches and checks step i's metrics
            final = i + 1 == last
            if final or ckpt.should_save(i + 1):
                logger.flush()  # never save a state whose own step is unchecked
                ckpt.save(i + 1, state, data_state, force=final)
        logger.flush()
        ckpt.wait()
    finally:
        logger.close()
        ckpt.close()
    if export_dir is not None:
        export_params(state.params, module.cfg, export_dir, tokenizer)
    return state


def export_params(params: Any, cfg: ModelConfig, folder: str | os.PathLike, tokenizer: Any = None) -> None:
    """Gathers (possibly sharded, multi-host) params and writes an HF-format folder on process 0."""
    from jax.experimental import multihost_utils

    from cai_jax.checkpoints.hf import save_hf_checkpoint

    host = multihost_utils.process_allgather(params, tiled=True) if jax.process_count() > 1 else jax.device_get(params)
    if jax.process_index() == 0:
        save_hf_checkpoint(folder, cfg, host, tokenizer=tokenizer)
