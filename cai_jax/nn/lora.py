"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), as a function of params.

A targeted kernel W keeps its value and gains a low-rank update (sec. 4.1, eq. 3):

    W' = W + (alpha / r) * A @ B        A: [*in, r] (random normal), B: [r, *out] (zeros)

The Flax modules are not touched: `apply_lora(base, adapters, cfg)` returns an ordinary params
tree holding W' for every targeted kernel (and the base leaf itself everywhere else), which any
`model.apply({"params": ...})` takes. So

* the frozen base is one tree that the adapted policy and its reference share: the reference is
  `base` alone (adapters off), the policy is `apply_lora(base, adapters, cfg)`;
* at init B = 0, so the adapted model equals the base exactly;
* export merges: `merge_lora` gives plain params for the usual HF export, and
  `checkpoints.peft.save_peft_adapters` writes the adapters alone in PEFT's layout.

Kernels keep this codebase's layout ([in, out], attention split per head: q/k/v [E, H, D], o
[H, D, E]); an adapter splits its kernel's dimensions into the contracted (input) ones and the
output ones, so A of q_proj is [E, r] and B is [r, H, D], and A of o_proj is [H, D, r]. A kernel
whose logical axes start with "embed" reads the residual stream (one input dimension); any other
kernel writes into it or into a hidden axis and contracts all its dimensions but the last. The
adapters take their kernel's logical axis names on those dimensions and None on the rank axis
(`lora_logical_specs`), so the mesh rules of `cai_jax.sharding` shard them like their kernels.

Adapters form a tree that mirrors the params and holds only the targeted kernels, each replaced by
{"a": A, "b": B}: e.g. adapters["layers_0"]["self_attn"]["q_proj"]["kernel"]["a"].

`LoRAModel` wraps a module so that its params are {"base": ..., "lora": ...}: the trainers' one
fit loop (which sees a module and one params tree) then trains the adapters only, with the base
listed in `OptimConfig.frozen` (`LoRAModel.FROZEN`) and held by `stop_gradient`.

Dropout on the adapter input (PEFT's lora_dropout) needs the per-example input x, which a merged
weight never sees; `LoRAConfig.dropout` must therefore be 0 (a positive value is an error).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

__all__ = [
    "ATTENTION_AND_MLP",
    "LoRAConfig",
    "LoRAModel",
    "apply_lora",
    "flat_adapters",
    "init_lora",
    "logical_specs",
    "lora_logical_specs",
    "lora_targets",
    "merge_lora",
    "num_lora_params",
]

# The projections of a Llama block: what `target_modules` usually names.
ATTENTION_AND_MLP = (
    r"self_attn/(q_proj|k_proj|v_proj|o_proj)/kernel$",
    r"mlp/(gate_proj|up_proj|down_proj)/kernel$",
)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA hyper-parameters (a config's `model.lora` section). No field has a default.

    `target_modules` are regexes, each matched with `re.search` against the "/"-joined params
    paths ("layers_0/self_attn/q_proj/kernel"); every one must match at least one kernel.
    """

    rank: int  # r, the inner dimension of A @ B
    alpha: float  # the update is scaled by alpha / rank (Hu et al. 2021, sec. 4.1)
    dropout: float  # dropout on the adapter input; only 0 is supported (see the module docstring)
    target_modules: tuple[str, ...]  # regexes over "/"-joined param paths; each must match a kernel

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            raise TypeError(f"LoRAConfig.target_modules must be a sequence of regexes, got {self.target_modules!r}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if int(self.rank) != self.rank or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank={self.rank} must be a positive integer")
        if self.dropout != 0:
            raise ValueError(
                f"LoRAConfig.dropout={self.dropout}: only 0 is supported; the adapters are merged into the "
                "weights before each forward, where there is no per-example input to drop"
            )
        if not self.target_modules:
            raise ValueError("LoRAConfig.target_modules is empty: name at least one kernel regex")
        for pattern in self.target_modules:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"LoRAConfig.target_modules: bad regex {pattern!r} ({e})") from None

    @property
    def scale(self) -> float:
        return float(self.alpha) / int(self.rank)


def _is_spec(x) -> bool:
    return isinstance(x, P)


def _flat(tree) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_spec)[0]
    return {jax.tree_util.keystr(k, simple=True, separator="/"): v for k, v in leaves}


def _set(tree: dict, path: str, value) -> None:
    *parents, last = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[last] = value


def _get(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def lora_targets(params, cfg: LoRAConfig) -> list[str]:
    """The "/"-joined paths of the kernels `cfg.target_modules` selects, in params order.

    Raises:
      ValueError: a regex that matches no parameter (naming it and a sample path), or one that
        matches a leaf that is not a kernel of two or more dimensions.
    """
    paths = _flat(params)
    chosen: list[str] = []
    for pattern in cfg.target_modules:
        hits = [p for p in paths if re.search(pattern, p)]
        if not hits:
            raise ValueError(
                f"LoRAConfig.target_modules: regex {pattern!r} matches no parameter (paths look like {next(iter(paths))!r})"
            )
        bad = [p for p in hits if p.rsplit("/", 1)[-1] != "kernel" or len(paths[p].shape) < 2]
        if bad:
            raise ValueError(f"LoRAConfig.target_modules: regex {pattern!r} matches non-kernel leaves {bad[:4]}")
        chosen += hits
    return [p for p in paths if p in set(chosen)]


def logical_specs(module: nn.Module) -> Any:
    """The logical PartitionSpec of every param of `module` (abstract init on a [1, 1] token batch)."""
    boxed = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return nn.get_partition_spec(boxed)


def _num_in(axes: tuple) -> int:
    """How many leading kernel dims are contracted: 1 when the input is the residual stream, else all but the last."""
    return 1 if axes and axes[0] == "embed" else len(axes) - 1


def init_lora(params, logical, cfg: LoRAConfig, key: jax.Array) -> dict:
    """Fresh adapters for the kernels of `params` that `cfg` targets.

    A is drawn from N(0, 1 / fan_in) with fan_in the product of the input dims (so A x has unit
    scale, as PEFT's Kaiming-uniform default roughly has), B is zero: the adapted model starts
    equal to the base (Hu et al. 2021, sec. 4.1). Adapters take the kernel's dtype.

    Args:
      params: the base params (arrays or ShapeDtypeStructs; only shapes and dtypes are read).
      logical: their logical PartitionSpecs (`logical_specs(module)`), which say how each kernel
        splits into input and output dimensions.
      cfg: the LoRA config.
      key: PRNG key; adapter i uses fold_in(key, i).

    Returns:
      {...: {"kernel": {"a": [*in, r], "b": [r, *out]}}}, mirroring `params`.
    """
    flat, axes = _flat(params), _flat(logical)
    adapters: dict = {}
    r = int(cfg.rank)
    for i, path in enumerate(lora_targets(params, cfg)):
        w = flat[path]
        n_in = _num_in(tuple(axes[path]))
        in_shape, out_shape = tuple(w.shape[:n_in]), tuple(w.shape[n_in:])
        std = 1.0 / math.sqrt(math.prod(in_shape))
        a = std * jax.random.normal(jax.random.fold_in(key, i), in_shape + (r,), jnp.float32)
        _set(adapters, path, {"a": a.astype(w.dtype), "b": jnp.zeros((r,) + out_shape, w.dtype)})
    return adapters


def lora_logical_specs(adapters, logical) -> dict:
    """Logical PartitionSpecs of the adapters: the kernel's names on A's input and B's output dims, None on r."""
    axes = _flat(logical)
    out: dict = {}
    for path in _flat(adapters):
        kernel, leaf = path.rsplit("/", 1)
        names = tuple(axes[kernel])
        n_in = _num_in(names)
        _set(out, path, P(*names[:n_in], None) if leaf == "a" else P(None, *names[n_in:]))
    return out


def _delta(a, b):
    """A @ B over the rank axis, in float32: [*in, r] x [r, *out] -> [*in, *out]."""
    return jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)


def apply_lora(base, adapters, cfg: LoRAConfig):
    """The effective params: W + (alpha / r) * A @ B on every adapted kernel, the base leaf elsewhere.

    Pure and jit-able; differentiable in both arguments (the trainers hold the base with
    `stop_gradient`). The sum is taken in float32 and cast back to W's dtype.
    """
    out = jax.tree.map(lambda x: x, base)  # a new tree; the base's leaves are shared, never written
    for path, ab in flat_adapters(adapters).items():
        w = _get(base, path)
        w_new = (w.astype(jnp.float32) + cfg.scale * _delta(ab["a"], ab["b"])).astype(w.dtype)
        _set(out, path, w_new)
    return out


def flat_adapters(adapters) -> dict[str, dict]:
    """{kernel path: {"a": A, "b": B}} of an adapter tree, in tree order."""
    flat = _flat(adapters)
    return {p[:-2]: {"a": v, "b": flat[p[:-2] + "/b"]} for p, v in flat.items() if p.endswith("/a")}


_merge_jit = jax.jit(apply_lora, static_argnums=2)


def merge_lora(base, adapters, cfg: LoRAConfig):
    """`apply_lora` jitted: plain params for `checkpoints.hf.save_hf_checkpoint` (a folder without adapters)."""
    return _merge_jit(base, adapters, cfg)


def num_lora_params(adapters) -> int:
    """Number of adapter parameters."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(adapters))


class LoRAModel(nn.Module):
    """`module` with LoRA adapters: params {"base": module's params, "lora": adapters}.

    Calls forward to `module.apply({"params": apply_lora(stop_gradient(base), lora)}, ...)`, so
    only the adapters get gradients; add `LoRAModel.FROZEN` to `OptimConfig.frozen` and the base
    also gets no optimizer state and stays bit-identical. `init` draws the base with the module's
    initialisers (from the "base" param's key, so not the values of `module.init` with the same
    key) and the adapters as `init_lora`, with logical names on both (sharded init works).
    `.cfg` is the wrapped module's model config.
    """

    module: nn.Module
    lora: LoRAConfig

    FROZEN = "^base/"  # the OptimConfig.frozen regex of the base

    @property
    def cfg(self):
        return self.module.cfg

    def _inner(self) -> nn.Module:
        return self.module.clone(parent=None)

    @nn.compact
    def __call__(self, tokens_BL, *args, **kwargs):
        inner = self._inner()
        base = self.param("base", lambda rng: inner.init(rng, tokens_BL)["params"])

        def init_adapters(rng):
            logical = logical_specs(inner)
            adapters = init_lora(base, logical, self.lora, rng)
            specs = lora_logical_specs(adapters, logical)
            return jax.tree.map(lambda s, x: nn.Partitioned(x, tuple(s)), specs, adapters, is_leaf=_is_spec)

        lora = self.param("lora", init_adapters)
        params = apply_lora(jax.lax.stop_gradient(base), lora, self.lora)
        return inner.apply({"params": params}, tokens_BL, *args, **kwargs)
