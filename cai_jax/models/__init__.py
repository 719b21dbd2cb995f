"""Llama-family models: config, Flax modules, scalar heads and loading."""

from cai_jax.models.config import ModelConfig, RopeScaling, UnsupportedModelError, tiny_config
from cai_jax.models.heads import ScalarModel, last_token_index
from cai_jax.models.llama import Transformer, init_cache, init_params
from cai_jax.models.loading import DEFAULT_MODEL, PRESETS, LoadedModel, load_pretrained, load_tokenizer

__all__ = [
    "DEFAULT_MODEL",
    "PRESETS",
    "LoadedModel",
    "ModelConfig",
    "RopeScaling",
    "ScalarModel",
    "Transformer",
    "UnsupportedModelError",
    "init_cache",
    "init_params",
    "last_token_index",
    "load_pretrained",
    "load_tokenizer",
    "tiny_config",
]
