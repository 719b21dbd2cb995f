"""The SL-CAI supervised fine-tuning loop (paper sec. 3): fixed-length batches, resumable exactly.

    optim = OptimConfig.from_config(cfg.sft.optim, updates=1000)  # cfg: a config, e.g. configs/base.py
    state = train_sft(tiny_config("llama"), params, examples, optim_cfg=optim,
                      ckpt_cfg=CheckpointConfig(directory=f"{workdir}/ckpt", save_every_steps=100, keep_last=2, async_save=False),
                      num_steps=1000, batch_size=8, seq_len=256, seed=0, workdir=workdir)

Writes `workdir/metrics.jsonl` (one row per step: loss, accuracy, tokens, grad_norm, lr,
param_norm, tokens_in_batch, tokens_per_s of real tokens, and mfu on known accelerators) and
checkpoints (train state + data position). Called again with the same arguments, it resumes from
the latest checkpoint and continues with exactly the batches and losses an uninterrupted run
would have had, and metrics.jsonl ends as an uninterrupted run's would (rows past the restored
checkpoint are dropped on resume). SFT is "a batcher + a step function" on the one fit loop
(`train.fit.fit_batches`), which holds the checkpoint / resume / metrics / non-finite machinery
shared with the PM and PPO trainers.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from cai_jax.checkpoints.train_state import CheckpointConfig
from cai_jax.models import ModelConfig, Transformer
from cai_jax.nn.lora import LoRAConfig, LoRAModel, init_lora, logical_specs, merge_lora
from cai_jax.sharding import DEFAULT_RULES, Rules
from cai_jax.train.fit import fit_batches
from cai_jax.train.flops import model_flops_per_token
from cai_jax.train.loop import EpochBatcher, gather_to_host
from cai_jax.train.state import OptimConfig, TrainState
from cai_jax.train.steps import sft_step

__all__ = ["SFTBatcher", "train_sft", "export_params"]

log = logging.getLogger(__name__)


def _field(example: Any, name: str, i: int) -> Sequence[int]:
    if isinstance(example, collections.abc.Mapping):
        if name not in example:
            raise ValueError(f"SFT example {i}: missing field {name!r} (has {sorted(example)})")
        return example[name]
    if not hasattr(example, name):
        raise ValueError(f"SFT example {i}: {type(example).__name__} has no field {name!r}")
    return getattr(example, name)


class SFTBatcher(EpochBatcher):
    """Deterministic fixed-shape batches over SFT examples, with a resumable position.

    Every example is truncated to `seq_len` (`num_truncated` counts those longer). Each epoch takes
    the examples in the order `default_rng([seed, epoch]).permutation(n)`.

    Unpacked (default): one example per row, right-padded; batches of `batch_size` consecutive
    examples of that order, a final partial batch dropped (static shapes), so every example is
    seen once per epoch except the last `n % batch_size` of that epoch's order.

    Packed (`packing=True`): the epoch's examples, in that order, are packed greedily into rows of
    `seq_len`: an example goes into the current row if it fits whole, else it starts a new row
    (never split; a truncated example fills a row alone). Batches are `batch_size` consecutive
    rows; leftover rows at the end of an epoch are dropped. Rows carry "segment_ids" (1..k for
    the k examples of the row, 0 on padding) and "positions" (restarting at 0 for each example), so
    attention stays within an example and RoPE sees each one from position 0: the loss of a packed
    batch equals the loss of the same examples unpacked (`sft_loss_fn` also drops the cross-example
    target at each boundary). Fewer, fuller rows: padding compute is traded for nothing.

    The position is (epoch, index): the index of the next batch's first row in that epoch's row
    order (examples unpacked, packed rows packed); see `EpochBatcher`.

    Batches: "tokens" int32 [B, L] (pad `pad_id`), "mask" int32 [B, L] (1 on real tokens),
    "loss_mask" int32 [B, L] (1 on response tokens, 0 on padding); packed also "segment_ids" and
    "positions" int32 [B, L].
    """

    def __init__(
        self,
        examples: Sequence[Any],
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        pad_id: int = 0,
        packing: bool = False,
    ):
        n = len(examples)
        if batch_size < 1 or seq_len < 2:
            raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size} and {seq_len}")
        if n < batch_size:
            raise ValueError(f"{n} SFT examples cannot fill one batch of {batch_size}")
        self.batch_size, self.seq_len, self.seed = int(batch_size), int(seq_len), int(seed)
        self.pad_id, self.packing = int(pad_id), bool(packing)
        self.tokens = np.full((n, seq_len), pad_id, np.int32)
        self.mask = np.zeros((n, seq_len), np.int32)
        self.loss_mask = np.zeros((n, seq_len), np.int32)
        self.lengths = np.zeros(n, np.int64)
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
            self.lengths[i] = k
        if self.num_truncated:
            log.warning(
                "SFT: %d of %d examples are longer than seq_len=%d and were truncated", self.num_truncated, n, seq_len
            )
        self._packed: tuple[int, list[list[int]]] | None = None  # (epoch, rows of example indices)
        self.epoch, self.index = 0, 0
        if self.packing and len(self.rows(0)) < self.batch_size:
            raise ValueError(f"{n} SFT examples pack into {len(self.rows(0))} rows, fewer than a batch of {batch_size}")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self))

    def rows(self, epoch: int) -> list[list[int]]:
        """The example indices of each row of `epoch`, in row order (one example per row unpacked)."""
        order = self._order(epoch)
        if not self.packing:
            return [[int(i)] for i in order]
        if self._packed is None or self._packed[0] != epoch:
            rows: list[list[int]] = []
            used = self.seq_len  # forces a new row for the first example
            for i in order.tolist():
                if used + self.lengths[i] > self.seq_len:
                    rows.append([])
                    used = 0
                rows[-1].append(i)
                used += int(self.lengths[i])
            self._packed = (epoch, rows)
        return self._packed[1]

    def _epoch_len(self, epoch: int) -> int:
        return len(self.rows(epoch)) if self.packing else len(self)

    def _state_extra(self) -> dict:
        return {"packing": self.packing}

    def _pack(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        b, l = len(rows), self.seq_len
        out = {k: np.zeros((b, l), np.int32) for k in ("tokens", "mask", "loss_mask", "segment_ids", "positions")}
        out["tokens"][:] = self.pad_id
        for r, examples in enumerate(rows):
            at = 0
            for seg, i in enumerate(examples, start=1):
                k = int(self.lengths[i])
                cols = slice(at, at + k)
                out["tokens"][r, cols] = self.tokens[i, :k]
                out["mask"][r, cols] = 1
                out["loss_mask"][r, cols] = self.loss_mask[i, :k]
                out["segment_ids"][r, cols] = seg
                out["positions"][r, cols] = np.arange(k)
                at += k
        return out

    def next(self) -> tuple[dict[str, np.ndarray], str]:
        """The next global batch (host numpy) and its id "epoch E index I"; advances the position."""
        epoch, index = self._advance()
        batch_id = f"epoch {epoch} index {index}"
        if self.packing:
            return self._pack(self.rows(epoch)[index : index + self.batch_size]), batch_id
        rows = self._order(epoch)[index : index + self.batch_size]
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
    packing: bool = False,
    peak_flops_per_device: float | str | None = "auto",
    lora: LoRAConfig | None = None,
) -> TrainState:
    """Fine-tunes `model` on `examples` for `num_steps` steps (total, counting resumed ones).

    Args:
      model: a `ModelConfig` (a `Transformer` is built) or a Flax module with the same call API.
      params: unboxed host or device params to start from, or None for a fresh sharded init.
      examples: `SFTExample`s or dicts with "input_ids" and "loss_mask".
      optim_cfg: `OptimConfig` or its config dict.
      ckpt_cfg: where and how often to save; default `workdir/checkpoints`, saving only the end.
      mesh_cfg: mesh sizes (default None: `DATA_PARALLEL`, all devices on the data axis).
      num_steps, batch_size, seq_len, seed: run length, global batch rows, padded length, data
        order and state rng seed.
      workdir: folder for metrics.jsonl (on resume, cut back to the restored step, then appended to).
      rules: logical-axis rules.
      pad_id: token id of padding (masked out, so only its embedding lookup sees it).
      step_fn: `step(state, batch, *, model, optimizer) -> (state, metrics)`; `sft_step` by default.
      export_dir: if given, the final params are written there as an HF-format folder
        (config.json + safetensors, plus `tokenizer` if given) that transformers loads.
      packing: pack several examples per row (`SFTBatcher`); same loss, less padding.
      peak_flops_per_device: for the "mfu" metric: "auto" looks the device up in
        `train.flops.PEAK_FLOPS` (no MFU on CPU or unknown devices), a number is used as the
        per-device peak FLOP/s, None reports no MFU. Model FLOPs per token are
        `model_flops_per_token(cfg, seq_len)` (6N + attention, N including the logits matmul).
      lora: train LoRA adapters only (`nn.lora`): the model becomes `LoRAModel(model, lora)`,
        `params` its frozen base (adapters drawn with `fold_in(key(seed), 1)`), the state's params
        {"base", "lora"} with the base frozen (bit-identical after training, no optimizer state),
        and `export_dir` gets the merged model.

    Returns:
      The final train state (sharded on the mesh). If a checkpoint at or beyond `num_steps` exists,
      the restored state is returned without training.

    Raises:
      FloatingPointError: a non-finite loss or gradient norm, naming the step and batch; the
        latest checkpoint is the last one saved before that step.
    """
    module = _as_model(model)
    if lora is not None:
        params, optim_cfg = _lora_setup(module, params, optim_cfg, lora, seed)
        module = LoRAModel(module, lora)
    batcher = SFTBatcher(examples, batch_size=batch_size, seq_len=seq_len, seed=seed, pad_id=pad_id, packing=packing)
    cfg = getattr(module, "cfg", None)
    state, _ = fit_batches(
        module,
        params,
        batcher,
        step_fn,
        optim_cfg=optim_cfg,
        ckpt_cfg=ckpt_cfg,
        mesh_cfg=mesh_cfg,
        rules=rules,
        seed=seed,
        num_steps=num_steps,
        seq_len=seq_len,
        workdir=os.fspath(workdir),
        count_tokens=lambda b: int(b["mask"].sum()),
        flops_per_token=model_flops_per_token(cfg, seq_len) if isinstance(cfg, ModelConfig) else None,
        peak_flops_per_device=peak_flops_per_device,
        name="SFT",
    )
    if export_dir is not None:
        final = state.params if lora is None else merge_lora(state.params["base"], state.params["lora"], lora)
        export_params(final, module.cfg, export_dir, tokenizer)
    return state


def _lora_setup(module: nn.Module, base: Any, optim_cfg, lora: LoRAConfig, seed: int):
    """({"base", "lora"} params (None stays None: a fresh init), the optimizer config with the base frozen)."""
    ocfg = optim_cfg if isinstance(optim_cfg, OptimConfig) else OptimConfig.from_config(optim_cfg)
    ocfg = dataclasses.replace(ocfg, frozen=ocfg.frozen + (LoRAModel.FROZEN,))
    if base is None:
        return None, ocfg
    adapters = init_lora(base, logical_specs(module), lora, jax.random.fold_in(jax.random.key(seed), 1))
    return {"base": base, "lora": adapters}, ocfg


def export_adapters(
    adapters: Any, cfg: ModelConfig, folder: str | os.PathLike, lora: LoRAConfig, base_model_name_or_path=None
) -> None:
    """Gathers (possibly sharded, multi-host) LoRA adapters and writes them in PEFT's layout on process 0."""
    from cai_jax.checkpoints.peft import save_peft_adapters

    host = gather_to_host(adapters)
    if jax.process_index() == 0:
        save_peft_adapters(folder, cfg, host, lora, base_model_name_or_path=base_model_name_or_path)


def export_params(params: Any, cfg: ModelConfig, folder: str | os.PathLike, tokenizer: Any = None) -> None:
    """Gathers (possibly sharded, multi-host) params and writes an HF-format folder on process 0."""
    from cai_jax.checkpoints.hf import save_hf_checkpoint

    host = gather_to_host(params)
    if jax.process_index() == 0:
        save_hf_checkpoint(folder, cfg, host, tokenizer=tokenizer)
