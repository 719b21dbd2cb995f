"""HF-format checkpoint folders (config.json + safetensors, single or sharded) <-> Flax params.

The name mapping is the only place that knows HF's tensor names. HF stores linear weights as
[out, in]; we store kernels as [in, out], with attention projections split per head
(q: [E, H, D], o: [H, D, E]) so the head axis can be sharded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from cai_jax import atomic, profiling
from cai_jax.nn.config import ModelConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


# Written last by every export of this project (`save_hf_checkpoint`, `checkpoints.pm.save_pm`):
# a folder without it was cut mid-write. Folders from elsewhere (transformers) need not have it.
EXPORT_MARKER = "export.json"
EXPORT_FORMAT = "cai_jax-export"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing files or tensors, or holds tensors of the wrong shape."""


class IncompleteExportError(CheckpointError):
    """A folder this project exported whose completion marker (`EXPORT_MARKER`) is missing."""


def mark_export_complete(folder: str | os.PathLike) -> Path:
    """Writes `folder`'s completion marker (atomically): call it after every other file is in place."""
    folder = Path(folder)
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != EXPORT_MARKER)
    return atomic.write_json(folder / EXPORT_MARKER, {"format": EXPORT_FORMAT, "files": files}, indent=2)


def is_complete_export(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a finished export (its completion marker exists)."""
    return (Path(folder) / EXPORT_MARKER).is_file()


def require_complete_export(folder: str | os.PathLike) -> Path:
    """`folder` if it is a finished export of this project, else `IncompleteExportError` naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IncompleteExportError(f"missing export: {folder} does not exist; rerun the stage that writes it")
    if not is_complete_export(folder):
        raise IncompleteExportError(
            f"incomplete export: {folder} has no {EXPORT_MARKER} (it was cut mid-write); rerun the stage that writes it"
        )
    return folder


def _layer_map(cfg: ModelConfig, i: int):
    """(hf_name, param_path, to_ours, to_hf) for every tensor of decoder layer i."""
    e, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    p = f"model.layers.{i}."
    ours = f"layers_{i}"

    def qkv(heads):
        return (lambda w: w.T.reshape(e, heads, d)), (lambda x: x.reshape(e, heads * d).T)

    def qkv_bias(heads):
        return (lambda b: b.reshape(heads, d)), (lambda x: x.reshape(heads * d))

    lin = (lambda w: w.T), (lambda x: x.T)
    ident = (lambda w: w), (lambda x: x)
    rows = [
        (p + "input_layernorm.weight", (ours, "input_layernorm", "scale"), *ident),
        (p + "post_attention_layernorm.weight", (ours, "post_attention_layernorm", "scale"), *ident),
        (p + "self_attn.q_proj.weight", (ours, "self_attn", "q_proj", "kernel"), *qkv(h)),
        (p + "self_attn.k_proj.weight", (ours, "self_attn", "k_proj", "kernel"), *qkv(k)),
        (p + "self_attn.v_proj.weight", (ours, "self_attn", "v_proj", "kernel"), *qkv(k)),
        (
            p + "self_attn.o_proj.weight",
            (ours, "self_attn", "o_proj", "kernel"),
            lambda w: w.T.reshape(h, d, e),
            lambda x: x.reshape(h * d, e).T,
        ),
        (p + "mlp.gate_proj.weight", (ours, "mlp", "gate_proj", "kernel"), *lin),
        (p + "mlp.up_proj.weight", (ours, "mlp", "up_proj", "kernel"), *lin),
        (p + "mlp.down_proj.weight", (ours, "mlp", "down_proj", "kernel"), *lin),
    ]
    if cfg.attention_bias:
        for name, heads in (("q_proj", h), ("k_proj", k), ("v_proj", k)):
            rows.append((p + f"self_attn.{name}.bias", (ours, "self_attn", name, "bias"), *qkv_bias(heads)))
    return rows


def tensor_map(cfg: ModelConfig):
    """Every (hf_name, param_path, to_ours, to_hf) of the model."""
    ident = (lambda w: w), (lambda x: x)
    rows = [
        ("model.embed_tokens.weight", ("embed_tokens", "embedding"), *ident),
        ("model.norm.weight", ("norm", "scale"), *ident),
    ]
    for i in range(cfg.num_layers):
        rows += _layer_map(cfg, i)
    if not cfg.tie_word_embeddings:
        rows.append(("lm_head.weight", ("lm_head", "kernel"), lambda w: w.T, lambda x: x.T))
    return rows


def _safetensors_files(folder: Path) -> dict[str, Path]:
    """hf tensor name -> file that holds it."""
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable shard index ({e!r})") from None
        return {name: folder / fname for name, fname in weight_map.items()}
    single = folder / SINGLE_NAME
    if single.exists():
        return {"*": single}
    raise CheckpointError(f"{folder}: no {SINGLE_NAME} or {INDEX_NAME} found")


@profiling.phase("load")
def _load_tensors(folder: Path) -> dict[str, np.ndarray]:
    files = _safetensors_files(folder)
    tensors: dict[str, np.ndarray] = {}
    for path in sorted(set(files.values())):
        try:
            tensors.update(load_file(str(path)))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: shard listed in the index is missing") from None
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    return tensors


def _set(tree: dict, path: tuple[str, ...], value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def hf_tensors_to_params(cfg: ModelConfig, tensors: dict[str, np.ndarray], source: str = "checkpoint") -> dict:
    """HF state dict (numpy) -> our params pytree (numpy, in cfg.param_dtype)."""
    params: dict = {}
    dtype = np.dtype(cfg.jnp_param_dtype)
    expected = _expected_shapes(cfg)
    for hf_name, path, to_ours, to_hf in tensor_map(cfg):
        if hf_name not in tensors:
            if hf_name == "lm_head.weight":
                raise CheckpointError(f"{source}: lm_head.weight missing but tie_word_embeddings is false")
            raise CheckpointError(f"{source}: tensor {hf_name!r} is missing")
        # Check the HF-side shape before converting: a reshape accepts any tensor of the right size.
        want = to_hf(np.empty(expected[path], np.int8)).shape
        got = tuple(tensors[hf_name].shape)
        if got != want:
            raise CheckpointError(f"{source}: tensor {hf_name!r} has shape {got}, config implies {want}")
        value = to_ours(np.asarray(tensors[hf_name]))
        _set(params, path, value.astype(dtype))
    return params


def _expected_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    import flax.linen as nn

    from cai_jax.nn.llama import Transformer

    abstract = jax.eval_shape(
        lambda: nn.meta.unbox(Transformer(cfg).init(jax.random.key(0), np.zeros((1, 1), np.int32))["params"])
    )
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    return {tuple(k.key for k in keypath): tuple(leaf.shape) for keypath, leaf in flat}


def load_hf_params(folder: str | os.PathLike, cfg: ModelConfig | None = None) -> tuple[ModelConfig, dict]:
    """Reads an HF-format folder into (config, numpy params)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    cfg = cfg or ModelConfig.from_hf_file(folder / "config.json")
    tensors = _load_tensors(folder)
    if cfg.tie_word_embeddings and "lm_head.weight" in tensors:
        tied = np.array_equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
        if not tied:
            cfg = cfg.replace(tie_word_embeddings=False)
    return cfg, hf_tensors_to_params(cfg, tensors, source=str(folder))


def params_to_hf_tensors(cfg: ModelConfig, params: dict, dtype=None) -> dict[str, np.ndarray]:
    """Our params -> HF state dict (numpy, contiguous)."""
    out = {}
    for hf_name, path, _, to_hf in tensor_map(cfg):
        value = np.asarray(jax.device_get(_get(params, path)))
        if dtype is not None:
            value = value.astype(dtype)
        out[hf_name] = np.ascontiguousarray(to_hf(value))
    return out


@profiling.phase("export")
def save_hf_checkpoint(
    folder: str | os.PathLike,
    cfg: ModelConfig,
    params: dict,
    tokenizer=None,
    max_shard_bytes: int = 2 * 1024**3,
    dtype=None,
    *,
    mark_complete: bool = True,
) -> Path:
    """Writes config.json + safetensors (sharded with an index when larger than max_shard_bytes).

    The folder loads with `transformers.AutoModelForCausalLM.from_pretrained` and with
    `load_pretrained`. Each file goes to a temporary name first, so none is ever half-written;
    the folder's completion marker (`EXPORT_MARKER`) is removed first and written last
    (`mark_complete=False` leaves that to a caller that adds files of its own), so a save killed
    part-way leaves a folder that `require_complete_export` refuses.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / EXPORT_MARKER).unlink(missing_ok=True)
    tensors = params_to_hf_tensors(cfg, params, dtype)
    hf_cfg = cfg.to_hf_dict()
    if dtype is not None:
        hf_cfg["torch_dtype"] = np.dtype(dtype).name
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in tensors.items():
        if size and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    for stale in list(folder.glob("model*.safetensors")) + [folder / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        _atomic_save(shards[0], folder / SINGLE_NAME, metadata)
    else:
        weight_map = {}
        total = sum(v.nbytes for v in tensors.values())
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(shard, folder / fname, metadata)
            weight_map.update({name: fname for name in shard})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic.write_json(folder / INDEX_NAME, index, indent=2)
    atomic.write_json(folder / "config.json", hf_cfg, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    if mark_complete:
        mark_export_complete(folder)
    return folder


def _atomic_save(tensors, path: Path, metadata):
    with atomic.replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
