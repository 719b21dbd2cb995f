"""Optimizer config, learning-rate schedules, the AdamW optimizer and the train state.

The optimizer is built once from `OptimConfig` and the params it will update:

    clip_by_global_norm -> AdamW(schedule, decoupled weight decay on matrices only)

applied to the trainable params, zero updates for the frozen ones (`optax.multi_transform`), and
wrapped in `optax.MultiSteps` for gradient accumulation. Params keep their storage dtype
(`ModelConfig.param_dtype`, fp32 master weights by default); the compute dtype is the model's
concern (`ModelConfig.dtype` / `activation_dtype`), so nothing here casts.

Step counting: `TrainState.step` counts calls of the step function (micro-batches). The schedule
is in optimizer updates: with `grad_accum_steps = k` the update applied at the end of micro-steps
s = k-1, 2k-1, ... uses `schedule(s // k)`, and `Optimizer.lr(step)` reports exactly that value.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

__all__ = [
    "OptimConfig",
    "Optimizer",
    "TrainState",
    "make_schedule",
    "make_optimizer",
    "param_paths",
    "decay_mask",
]

SCHEDULES = ("constant", "cosine")

# Weight decay is applied to weight matrices and embeddings only. RMSNorm scales ("scale") and
# biases ("bias", e.g. Qwen2's qkv biases and the scalar head's bias) are excluded: decaying a norm
# scale towards 0 shrinks the whole residual branch, and biases are offsets with no capacity to
# regularise (the usual GPT-2 / Llama recipe). Matched on the leaf name, not on ndim, because
# DenseGeneral biases of the attention projections are 2-D [heads, head_dim].
_NO_DECAY_LEAF_NAMES = ("scale", "bias")


def strict_fields(cls: type, cfg: Mapping[str, Any] | Any, section: str) -> dict[str, Any]:
    """A config section (ConfigDict or mapping) as a dict of exactly `cls`'s dataclass fields.

    Raises:
      ValueError: naming every unknown field (a typo) and every missing one.
    """
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    missing = [n for n in names if n not in d]
    problems = []
    if unknown:
        problems.append(f"unknown field(s) {', '.join(map(repr, unknown))}")
    if missing:
        problems.append(f"missing field(s) {', '.join(map(repr, missing))}")
    if problems:
        raise ValueError(f"{section} config: {'; '.join(problems)} (fields: {', '.join(names)})")
    return d


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer hyper-parameters (a config's `optim` sub-dict, converted by `from_config`).

    No field has a default: `configs/base.py`'s `optim(...)` is their one home, so a config file
    spells out every field and `from_config` treats a missing one as an error (tests build one
    from the base config: tests/defaults.py).
    """

    lr: float  # peak learning rate, per optimizer update
    warmup_steps: int  # optimizer updates of linear warmup from 0 to `lr`
    schedule: str  # "constant" | "cosine" (after warmup)
    total_steps: int  # optimizer updates; cosine reaches lr * min_lr_ratio here (0 in a config: derived)
    min_lr_ratio: float  # cosine floor, as a fraction of `lr`
    weight_decay: float  # decoupled AdamW decay (multiplied by the current lr); matrices only
    b1: float  # Adam first-moment decay
    b2: float  # Adam second-moment decay
    eps: float  # Adam denominator epsilon
    grad_clip_norm: float  # max global L2 norm of the (accumulated) gradient; 0 disables
    grad_accum_steps: int  # micro-batches averaged per optimizer update (1 = no accumulation)
    frozen: tuple[str, ...]  # regexes (re.search) on "/"-joined param paths; matches get no update

    def __post_init__(self):
        if isinstance(self.frozen, str):
            raise TypeError(f"OptimConfig.frozen must be a sequence of regexes, got the string {self.frozen!r}")
        object.__setattr__(self, "frozen", tuple(self.frozen))
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimConfig.schedule={self.schedule!r}; expected one of {SCHEDULES}")
        if self.lr < 0:
            raise ValueError(f"OptimConfig.lr={self.lr} must be >= 0")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps={self.warmup_steps} must be >= 0")
        if self.schedule == "cosine" and self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"OptimConfig.total_steps={self.total_steps} must exceed warmup_steps={self.warmup_steps} "
                "for the cosine schedule"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"OptimConfig.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.grad_accum_steps < 1:
            raise ValueError(f"OptimConfig.grad_accum_steps={self.grad_accum_steps} must be >= 1")
        if self.grad_clip_norm < 0:
            raise ValueError(f"OptimConfig.grad_clip_norm={self.grad_clip_norm} must be >= 0 (0 disables)")
        for pattern in self.frozen:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"OptimConfig.frozen: bad regex {pattern!r} ({e})") from None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any, *, updates: int | None = None) -> OptimConfig:
        """Builds the config from an `ml_collections.ConfigDict` or a plain dict.

        A config's `total_steps = 0` means "the schedule ends where the stage's updates end": pass
        the stage's number of optimizer updates as `updates` (derived from the quantities it
        follows, never typed beside them). A positive `total_steps` is an explicit override and
        stays as it is.

        Raises:
          ValueError: naming every unknown field (a typo) and every missing one, or a derived
            schedule without `updates`.
        """
        fields = strict_fields(cls, cfg, "optim")
        if int(fields["total_steps"]) == 0:
            if updates is None or updates < 1:
                raise ValueError(f"optim.total_steps=0 derives the schedule from the stage's updates; got {updates!r}")
            fields["total_steps"] = max(int(updates), int(fields["warmup_steps"]) + 1)
        return cls(**fields)


def make_schedule(ocfg: OptimConfig) -> Callable[[jax.Array], jax.Array]:
    """Learning rate as a function of the optimizer-update count (float32, jit-able).

    Warmup: lr * count / warmup_steps for count < warmup_steps (so update 0 has lr 0, as optax's
    warmup schedules). Then "constant": lr; "cosine": lr * (m + (1 - m) * (1 + cos(pi * t)) / 2)
    with t = (count - warmup_steps) / (total_steps - warmup_steps) clipped to [0, 1] and
    m = min_lr_ratio.
    """
    peak, warm = float(ocfg.lr), int(ocfg.warmup_steps)
    kind, m = ocfg.schedule, float(ocfg.min_lr_ratio)
    decay = max(int(ocfg.total_steps) - warm, 1)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warmup_lr = peak * count / max(warm, 1)
        if kind == "constant":
            after = jnp.full_like(count, peak)
        else:
            t = jnp.clip((count - warm) / decay, 0.0, 1.0)
            after = peak * (m + (1.0 - m) * 0.5 * (1.0 + jnp.cos(math.pi * t)))
        return jnp.where(count < warm, warmup_lr, after)

    return schedule


def param_paths(params) -> Any:
    """A pytree like `params` holding each leaf's "/"-joined path, e.g. "layers_0/mlp/up_proj/kernel"."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: jax.tree_util.keystr(path, simple=True, separator="/"), params
    )


def decay_mask(params) -> Any:
    """True where weight decay applies: every leaf except norm scales and biases (see module comment)."""
    return jax.tree.map(lambda p: p.rsplit("/", 1)[-1] not in _NO_DECAY_LEAF_NAMES, param_paths(params))


def _trainable_mask(ocfg: OptimConfig, params) -> Any:
    patterns = [re.compile(p) for p in ocfg.frozen]
    paths = param_paths(params)
    flat = jax.tree.leaves(paths)
    for pattern in patterns:
        if not any(pattern.search(p) for p in flat):
            raise ValueError(
                f"OptimConfig.frozen: regex {pattern.pattern!r} matches no parameter (paths look like {flat[0]!r})"
            )
    return jax.tree.map(lambda p: not any(pat.search(p) for pat in patterns), paths)


class Optimizer(NamedTuple):
    """An optax `GradientTransformation` (`init`, `update`) plus what the steps report.

    Usable wherever optax expects a transformation (it duck-types on `init`/`update`).
    """

    init: Callable
    update: Callable
    lr: Callable[[jax.Array], jax.Array]  # micro-step -> lr of the update that micro-step contributes to
    trainable: Any  # bool pytree like the params: False for frozen leaves (static Python bools)
    config: OptimConfig


def make_optimizer(ocfg: OptimConfig, params) -> Optimizer:
    """AdamW with warmup/cosine schedule, global-norm clipping, frozen subsets and accumulation.

    Args:
      ocfg: the optimizer config.
      params: the params to optimise (or their `jax.eval_shape`); only the tree structure and the
        leaf paths are read, to resolve `ocfg.frozen` (a regex that matches no path is an error,
        which catches typos) and the weight-decay mask.

    Returns:
      An `Optimizer`. Clipping sees only the trainable leaves, frozen leaves get exactly zero
      updates (so they stay bitwise unchanged) and no Adam moments. With `grad_accum_steps = k > 1`
      (`optax.MultiSteps`) the gradients of k consecutive calls are averaged and applied on the
      k-th; the other calls return zero updates.
    """
    schedule = make_schedule(ocfg)
    trainable = _trainable_mask(ocfg, params)
    inner = []
    if ocfg.grad_clip_norm > 0:
        inner.append(optax.clip_by_global_norm(ocfg.grad_clip_norm))
    # A callable mask: inside multi_transform the frozen leaves are optax.MaskedNode placeholders.
    inner.append(
        optax.adamw(schedule, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps, weight_decay=ocfg.weight_decay, mask=decay_mask)
    )
    labels = jax.tree.map(lambda t: "trainable" if t else "frozen", trainable)
    tx = optax.multi_transform({"trainable": optax.chain(*inner), "frozen": optax.set_to_zero()}, labels)
    k = int(ocfg.grad_accum_steps)
    if k > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
    return Optimizer(
        init=tx.init,
        update=tx.update,
        lr=lambda step: schedule(jnp.asarray(step, jnp.int32) // k),
        trainable=trainable,
        config=ocfg,
    )


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: a pytree, so it can be jitted, donated, sharded and checkpointed.

    step: int32 scalar, number of step-function calls so far (micro-steps under accumulation).
    params: model params in their storage dtype (fp32 master weights by default).
    opt_state: the optimizer's state.
    rng: the run's base PRNG key; steps derive per-step keys with `fold_in(rng, step)` and never
      advance it, so a resumed run draws the same keys.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, params, optimizer: Optimizer | optax.GradientTransformation, rng: jax.Array) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=rng)
