"""LoRA adapters (`cai_jax.nn.lora`) on disk: merged into a plain HF-format folder, or alone in
PEFT's layout (adapter_config.json + adapter_model.safetensors, tensors named after the
transformers modules with PEFT's "base_model.model." prefix; lora_A [r, in], lora_B [out, r]).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file

from cai_jax import atomic
from cai_jax.checkpoints.hf import (
    EXPORT_MARKER,
    CheckpointError,
    _atomic_save,
    _get,
    _set,
    mark_export_complete,
    save_hf_checkpoint,
    tensor_map,
)
from cai_jax.nn.config import ModelConfig

__all__ = [
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "save_merged_checkpoint",
    "save_peft_adapters",
    "load_peft_adapters",
]

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # PEFT's wrapper prefix before the transformers module name


def save_merged_checkpoint(
    folder: str | os.PathLike, cfg: ModelConfig, base: dict, adapters: dict, lora, tokenizer=None, dtype=None
) -> Path:
    """`save_hf_checkpoint` of `nn.lora.merge_lora(base, adapters, lora)`: a plain folder, no adapters."""
    from cai_jax.nn.lora import merge_lora

    return save_hf_checkpoint(folder, cfg, merge_lora(base, adapters, lora), tokenizer=tokenizer, dtype=dtype)


def _hf_modules(cfg: ModelConfig) -> dict[str, str]:
    """ "/"-joined kernel path -> transformers module name ("model.layers.0.self_attn.q_proj")."""
    return {
        "/".join(path): hf_name[: -len(".weight")] for hf_name, path, _, _ in tensor_map(cfg) if path[-1] == "kernel"
    }


def _peft_target_modules(modules: list[str], cfg: ModelConfig) -> list[str] | str:
    """PEFT's target_modules: the projection names when every layer has the same set, else a full-match regex."""
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})
    per_layer = {
        f"model.layers.{i}.{kind}.{s}" for i in range(cfg.num_layers) for kind in ("self_attn", "mlp") for s in short
    }
    if set(modules) == per_layer & set(_hf_modules(cfg).values()):
        return short
    return "(" + "|".join(re.escape(m) for m in modules) + ")"


def save_peft_adapters(
    folder: str | os.PathLike,
    cfg: ModelConfig,
    adapters: dict,
    lora,
    base_model_name_or_path: str | None = None,
    dtype=None,
) -> Path:
    """Writes the adapters alone as a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors).

    Tensor names are PEFT's: `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight`
    [out, r] (torch's [out, in] layout), so the update is lora_B @ lora_A * lora_alpha / r, as
    `nn.lora.apply_lora` has it in our [in, out] layout. Attention dims are flattened as HF's
    weights are (heads major). The completion marker (`EXPORT_MARKER`) is written last.

    Args:
      folder: the folder to write (created).
      cfg: the base model's config (for the transformers names).
      adapters: from `nn.lora.init_lora` or training (host or device arrays).
      lora: the `nn.lora.LoRAConfig` the adapters were made with.
      base_model_name_or_path: recorded in adapter_config.json for PEFT to find the base.
      dtype: storage dtype (default: the adapters' own).

    Raises:
      CheckpointError: an adapter on a parameter that has no transformers module name.
    """
    from cai_jax.nn.lora import flat_adapters

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / EXPORT_MARKER).unlink(missing_ok=True)
    names = _hf_modules(cfg)
    tensors: dict[str, np.ndarray] = {}
    modules = []
    r = int(lora.rank)
    for path, ab in flat_adapters(jax.device_get(adapters)).items():
        if path not in names:
            raise CheckpointError(f"LoRA adapter on {path!r}: no transformers module has this parameter")
        a, b = (np.asarray(ab[k]) if dtype is None else np.asarray(ab[k]).astype(dtype) for k in ("a", "b"))
        module = names[path]
        modules.append(module)
        tensors[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
        tensors[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": float(lora.alpha),
        "lora_dropout": float(lora.dropout),
        "target_modules": _peft_target_modules(modules, cfg),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
    }
    _atomic_save(tensors, folder / PEFT_WEIGHTS_NAME, {"format": "pt"})
    atomic.write_json(folder / PEFT_CONFIG_NAME, config, indent=2)
    mark_export_complete(folder)
    return folder


def load_peft_adapters(folder: str | os.PathLike, cfg: ModelConfig):
    """Reads a PEFT LoRA folder (as `save_peft_adapters` writes it) into (adapters, `LoRAConfig`).

    The config's target_modules select exactly the kernels that have adapters in the file.

    Raises:
      CheckpointError: a missing file, a tensor of another module kind or of the wrong shape.
    """
    import flax.linen as nn

    from cai_jax.nn.llama import Transformer
    from cai_jax.nn.lora import LoRAConfig, init_lora, logical_specs

    folder = Path(folder)
    try:
        config = json.loads((folder / PEFT_CONFIG_NAME).read_text())
        tensors = load_file(str(folder / PEFT_WEIGHTS_NAME))
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder}: not a PEFT adapter folder ({e.filename} is missing)") from None
    if config.get("peft_type") != "LORA" or config.get("use_rslora") or config.get("use_dora"):
        raise CheckpointError(f"{folder / PEFT_CONFIG_NAME}: only plain LoRA adapters are supported")
    paths = {module: path for path, module in _hf_modules(cfg).items()}
    found = []
    for name in tensors:
        module = name.removeprefix(_PEFT_PREFIX).removesuffix(".lora_A.weight")
        if name.endswith(".lora_A.weight"):
            if module not in paths:
                raise CheckpointError(f"{folder / PEFT_WEIGHTS_NAME}: {name!r} names no module of this model")
            found.append(paths[module])
    lora = LoRAConfig(
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        dropout=float(config["lora_dropout"]),
        target_modules=tuple(f"^{re.escape(p)}$" for p in found),
    )
    model = Transformer(cfg)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 1), np.int32))["params"])
    like = jax.eval_shape(lambda: init_lora(shapes, logical_specs(model), lora, jax.random.key(0)))
    modules = _hf_modules(cfg)
    adapters: dict = {}
    for path in found:
        a_like, b_like = (_get(like, tuple(path.split("/")) + (k,)) for k in ("a", "b"))
        prefix = f"{_PEFT_PREFIX}{modules[path]}"
        a_t, b_t = tensors[f"{prefix}.lora_A.weight"], tensors.get(f"{prefix}.lora_B.weight")
        if b_t is None:
            raise CheckpointError(f"{folder / PEFT_WEIGHTS_NAME}: {prefix}.lora_B.weight is missing")
        r = lora.rank
        want_a, want_b = (r, math.prod(a_like.shape[:-1])), (math.prod(b_like.shape[1:]), r)
        if a_t.shape != want_a or b_t.shape != want_b:
            raise CheckpointError(
                f"{folder / PEFT_WEIGHTS_NAME}: {prefix} has lora_A {a_t.shape} and lora_B {b_t.shape}, "
                f"the model implies {want_a} and {want_b}"
            )
        _set(adapters, tuple(path.split("/")), {"a": a_t.T.reshape(a_like.shape), "b": b_t.T.reshape(b_like.shape)})
    return adapters, lora
