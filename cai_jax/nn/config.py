"""Model configuration: a frozen dataclass built from (and written back to) an HF config.json."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

# HF `architectures` entries we implement, mapped to our family name (which decides qkv bias etc.).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_MODEL_TYPE_TO_ARCH = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class UnsupportedModelError(ValueError):
    """A checkpoint whose architecture or options this package does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (HF `rope_scaling`). `rope_type` is default, linear or llama3."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder (SmolLM2, Llama 2/3, Mistral, Qwen2).

    Frozen and hashable, so it can be a static argument of jitted functions.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v projections (Qwen2)
    sliding_window: int | None = None  # Mistral-style local attention, in tokens
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"  # dtype of matmul inputs (accumulation and matmul outputs are float32)
    param_dtype: str = "float32"  # storage dtype of parameters
    activation_dtype: str = "float32"  # residual stream, attention, KV cache (bfloat16 saves memory)
    remat: str = "none"  # none | full | dots (checkpoint policy per decoder block)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        for field in ("dtype", "param_dtype", "activation_dtype"):
            if getattr(self, field) not in _DTYPES:
                raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}; expected one of {sorted(_DTYPES)}")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"ModelConfig.remat={self.remat!r}; expected none, full or dots")
        if self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_scaling type {self.rope_scaling.rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def jnp_activation_dtype(self):
        return _DTYPES[self.activation_dtype]

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (embeddings included once when tied)."""
        e, m, h, kv, d = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = e * h * d * 2 + e * kv * d * 2 + (h * d + 2 * kv * d if self.attention_bias else 0)
        block = attn + 3 * e * m + 2 * e
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        return self.vocab_size * e + self.num_layers * block + e + head

    # ---- HF config.json <-> ModelConfig ----

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json", **overrides) -> ModelConfig:
        """Builds the config from the dict of an HF config.json; errors name `source`."""
        archs = hf.get("architectures") or []
        family = None
        for arch in archs:
            family = SUPPORTED_ARCHITECTURES.get(arch)
            if family:
                break
        if family is None:
            family = hf.get("model_type") if hf.get("model_type") in _MODEL_TYPE_TO_ARCH else None
        if family is None:
            raise UnsupportedModelError(
                f"{source}: architecture {archs or hf.get('model_type')!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            num_heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
            rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
            rope_theta = float(hf.get("rope_theta", scaling.get("rope_theta", 10000.0)))
            rope = RopeScaling(
                rope_type=rope_type,
                factor=float(scaling.get("factor", 1.0) or 1.0),
                low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
            )
            sliding = hf.get("sliding_window")
            if family == "qwen2" and not hf.get("use_sliding_window", False):
                sliding = None
            eos = hf.get("eos_token_id")
            kwargs = dict(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                head_dim=int(hf.get("head_dim") or hidden // num_heads),
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
                sliding_window=int(sliding) if sliding else None,
                model_type=family,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
                pad_token_id=hf.get("pad_token_id"),
            )
        except KeyError as e:
            raise UnsupportedModelError(f"{source}: missing required field {e.args[0]!r}") from None
        if hf.get("mlp_bias"):
            raise UnsupportedModelError(f"{source}: mlp_bias=true is not supported")
        if hf.get("hidden_act", "silu") not in ("silu", "swish"):
            raise UnsupportedModelError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (only silu)")
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_hf_file(cls, path: str | os.PathLike, **overrides) -> ModelConfig:
        try:
            with open(path) as f:
                hf = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(hf, source=str(path), **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF config.json dict that transformers loads as the same architecture."""
        hf: dict[str, Any] = {
            "architectures": [_MODEL_TYPE_TO_ARCH[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": self.param_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.rope_scaling.rope_type != "default":
            rs = self.rope_scaling
            hf["rope_scaling"] = {"rope_type": rs.rope_type, "factor": rs.factor}
            if rs.rope_type == "llama3":
                hf["rope_scaling"].update(
                    low_freq_factor=rs.low_freq_factor,
                    high_freq_factor=rs.high_freq_factor,
                    original_max_position_embeddings=rs.original_max_position_embeddings,
                )
        if self.model_type == "llama":
            hf["attention_bias"] = self.attention_bias
            hf["mlp_bias"] = False
        if self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            hf["use_sliding_window"] = self.sliding_window is not None
            hf["sliding_window"] = self.sliding_window
        return hf


def tiny_config(model_type: str = "llama", **overrides) -> ModelConfig:
    """A small random-init config for unit tests (2 layers, GQA, 256-token vocab)."""
    kwargs = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=model_type != "qwen2",
        attention_bias=model_type == "qwen2",
        model_type=model_type,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return ModelConfig(**kwargs)
