"""Models: the networks of `cai_jax.nn` and `load_pretrained` (preset, HF-format folder or .gguf).

    from cai_jax.models import load_pretrained
    lm = load_pretrained("smollm2-135m-instruct")   # .model, .params, .tokenizer, .config

Imports point one way: `cai_jax.nn` (the Flax modules and their config) at the bottom, then
`cai_jax.checkpoints` (which reads and writes their parameters), then this package.
"""

from cai_jax.models.loading import DEFAULT_MODEL, PRESETS, LoadedModel, load_pretrained, load_tokenizer
from cai_jax.nn import (
    ModelConfig,
    RopeScaling,
    ScalarModel,
    Transformer,
    UnsupportedModelError,
    init_cache,
    init_params,
    last_token_index,
    stack_layers,
    tiny_config,
)

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
    "stack_layers",
    "tiny_config",
]
