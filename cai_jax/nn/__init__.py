"""The networks: the Llama-family Flax decoder, its config and the scalar heads (PM score, value).

The bottom of the library: imports nothing else of cai_jax. `cai_jax.models` builds on it (and on
`cai_jax.checkpoints`) to load pretrained models, and re-exports these names.
"""

from cai_jax.nn.config import ModelConfig, RopeScaling, UnsupportedModelError, tiny_config
from cai_jax.nn.heads import ScalarModel, last_token_index
from cai_jax.nn.llama import Transformer, init_cache, init_params, stack_layers

__all__ = [
    "ModelConfig",
    "RopeScaling",
    "ScalarModel",
    "Transformer",
    "UnsupportedModelError",
    "init_cache",
    "init_params",
    "last_token_index",
    "stack_layers",
    "tiny_config",
]
