"""LoRA in the PM-driven RL trainers (PPO, RLOO): which params a state holds, and the plain params
each forward, the sampler and the exports see.

With `lora` set, the train state stores the policy as {"base": the SL-CAI weights, "lora":
adapters}. The base is stored once and serves twice: the policy is `apply_lora(base, adapters)`
and the reference is the base itself (adapters off), so no separate copy of the reference is
held. The value model is LoRA too: with `value_init="policy"` its params are {"lora", "head"},
adapters of its own on the policy's same base; with `value_init="pm"` they are {"base": the PM's
backbone, "lora", "head"}; a shared backbone is the head alone, as without LoRA. Every "base"
is frozen (`frozen_patterns`: no gradient, no optimizer state, bit-identical after training).

    params = lora_state(policy.params, value_params, policy_cfg, value_cfg, lora, key)
    forward:   policy_params(params["policy"], lora), value_params(params, lora),
               reference_params(params, ref_params, lora)
    sampler / export: merged_policy(params["policy"], lora)

Without `lora` (None) every function returns its input: full fine-tuning is the same code.
Adapters are initialised as `nn.lora.init_lora` (B = 0, so the adapted models start equal to
their bases) and carry their kernels' logical axis names, so they shard like them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from cai_jax.models import Transformer
from cai_jax.nn.lora import LoRAConfig, apply_lora, init_lora, logical_specs, lora_logical_specs, merge_lora
from cai_jax.sharding import Rules, logical_to_sharding

__all__ = [
    "abstract_lora_state",
    "adapter_shardings",
    "check_reference",
    "frozen_patterns",
    "lora_build",
    "lora_state",
    "merged_policy",
    "policy_params",
    "reference_params",
    "value_params",
]


def policy_params(p: Any, lora: LoRAConfig | None) -> Any:
    """The policy's effective params: base + (alpha / r) A B with the base held by stop_gradient."""
    if lora is None:
        return p
    return apply_lora(jax.lax.stop_gradient(p["base"]), p["lora"], lora)


def reference_params(params: Any, ref_params: Any, lora: LoRAConfig | None) -> Any:
    """The reference's params: the policy's frozen base under LoRA (`ref_params` is then None), else `ref_params`."""
    return ref_params if lora is None else params["policy"]["base"]


def value_params(params: Any, lora: LoRAConfig | None) -> Any:
    """The value model's ScalarModel params {"backbone", "head"} (a shared backbone: {"head"} as stored)."""
    v = params["value"]
    if lora is None or "lora" not in v:
        return v
    base = v["base"] if "base" in v else params["policy"]["base"]
    return {"backbone": apply_lora(jax.lax.stop_gradient(base), v["lora"], lora), "head": v["head"]}


def merged_policy(p: Any, lora: LoRAConfig | None) -> Any:
    """Plain policy params (the adapters merged in) for the sampler and the HF export."""
    return p if lora is None else merge_lora(p["base"], p["lora"], lora)


def frozen_patterns(state: Any) -> tuple[str, ...]:
    """`OptimConfig.frozen` regexes of the bases in a `lora_state` tree."""
    return ("^policy/base/",) + (("^value/base/",) if "base" in state.get("value", {}) else ())


def check_reference(lora: LoRAConfig | None, policy: Any, reference: Any) -> None:
    """Under LoRA the reference is the policy's frozen base, so `reference` must be the policy's model."""
    if lora is not None and reference is not policy and reference.params is not policy.params:
        raise ValueError(
            "with LoRA the reference is the policy's frozen base (stored once): pass the policy as the reference "
            "(the same loaded model), or train without LoRA to use another reference"
        )


def _backbone_logical(cfg) -> Any:
    return logical_specs(Transformer(cfg))


def lora_state(
    policy: Any, value: Any, policy_cfg, value_cfg, lora: LoRAConfig, key: jax.Array, *, value_from_policy: bool = True
) -> dict:
    """The LoRA train-state params from the full-fine-tuning ones.

    Args:
      policy: the policy's params (arrays or ShapeDtypeStructs: `init_lora` reads shapes only).
      value: the value params as full fine-tuning holds them: {"head"} (shared backbone) or
        {"backbone", "head"}; None without a value model (RLOO: the result has no "value").
      policy_cfg, value_cfg: the policy's and the value backbone's `ModelConfig`.
      lora: the adapters' config.
      key: the policy's adapters use fold_in(key, 0), the value's fold_in(key, 1).
      value_from_policy: the value backbone is the policy's own weights (value_init="policy"):
        it then keeps adapters only, on the policy's base.

    Returns:
      {"policy": {"base", "lora"}, "value": {"head"} | {"lora", "head"} | {"base", "lora", "head"}}.
    """
    out = {"policy": {"base": policy, "lora": init_lora(policy, _backbone_logical(policy_cfg), lora, _k(key, 0))}}
    if value is None:  # RLOO: no value model
        return out
    if "backbone" not in value:
        out["value"] = value
        return out
    adapters = init_lora(value["backbone"], _backbone_logical(value_cfg), lora, _k(key, 1))
    out["value"] = {"lora": adapters, "head": value["head"]}
    if not value_from_policy:
        out["value"]["base"] = value["backbone"]
    return out


def abstract_lora_state(policy: Any, value: Any, policy_cfg, value_cfg, lora: LoRAConfig, *, value_from_policy: bool):
    """`lora_state` of abstract params (ShapeDtypeStructs), by `jax.eval_shape`: shapes only, nothing allocated."""
    fn = functools.partial(
        lora_state, policy_cfg=policy_cfg, value_cfg=value_cfg, lora=lora, key=jax.random.key(0),
        value_from_policy=value_from_policy,
    )  # fmt: skip
    return jax.eval_shape(fn, policy, value)


def lora_build(
    abstract: Any,
    shardings: Any,
    ocfg,
    policy_cfg,
    value_cfg,
    lora: LoRAConfig | None,
    mesh,
    rules,
    *,
    value_from_policy: bool = True,
) -> tuple:
    """What a trainer's `_build` changes under LoRA: (abstract state params, their shardings, the
    optimizer config with the bases frozen), from the full-fine-tuning ones; as they are at None."""
    if lora is None:
        return abstract, shardings, ocfg
    value = abstract.get("value")
    abstract = abstract_lora_state(
        abstract["policy"], value, policy_cfg, value_cfg, lora, value_from_policy=value_from_policy
    )
    shardings = adapter_shardings(shardings, abstract, policy_cfg, value_cfg, mesh, rules)
    return abstract, shardings, dataclasses.replace(ocfg, frozen=ocfg.frozen + frozen_patterns(abstract))


def _k(key, i):
    return jax.random.fold_in(key, i)


def adapter_shardings(shardings: Any, abstract: Any, policy_cfg, value_cfg, mesh, rules: Rules) -> Any:
    """NamedShardings of a `lora_state` tree (`abstract`) from those of the full-fine-tuning tree.

    `shardings` is {"policy": ..., "value": {"head"} | {"backbone", "head"}} as without LoRA; bases
    keep their kernels' shardings and adapters take the kernels' logical names (`lora_logical_specs`).
    """

    def adapters(tree, cfg):
        return logical_to_sharding(lora_logical_specs(tree, _backbone_logical(cfg)), mesh, rules)

    out = {"policy": {"base": shardings["policy"], "lora": adapters(abstract["policy"]["lora"], policy_cfg)}}
    if "value" not in abstract:
        return out
    v = abstract["value"]
    if "lora" not in v:
        out["value"] = shardings["value"]
        return out
    out["value"] = {"lora": adapters(v["lora"], value_cfg), "head": shardings["value"]["head"]}
    if "base" in v:
        out["value"]["base"] = shardings["value"]["backbone"]
    return out
