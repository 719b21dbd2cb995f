"""The preference-model artifact: an HF-format backbone folder plus the score head and reward stats.

    save_pm(folder, params, cfg, tokenizer=tok, rendering="chat", seq_len=512,
            reward_stats={"mean": m, "std": s, "count": n})
    pm = load_pm(folder)
    raw = pm.score_texts(prompts, responses)   # float32 [N]: texts encoded exactly as in training
    reward = pm.normalize(raw)                 # (raw - reward_mean) / reward_std, the RL reward
    pm.score([[1, 5, 7], [1, 9]])              # float32 [N], one score per token-id list

Folder layout:

    config.json, model.safetensors (or shards + index), tokenizer files
        the backbone, written by `save_hf_checkpoint` (loadable by transformers as a causal LM
        whose logits are meaningless: a PM has no language-model head, so config.json declares
        tied embeddings; pm.json keeps the backbone's own `tie_word_embeddings`).
    score_head.safetensors
        "kernel" [E, 1] and "bias" [1] of `ScalarModel`'s head, in our layout.
    pm.json
        {"format": "cai_jax.pm", "version": 2, "rendering", "seq_len", "reward_mean",
         "reward_std", "count", "tie_word_embeddings", "metadata": {...}}; rendering and seq_len
        are how training encoded (prompt, response) pairs (`text.encode_exchange`, cut to seq_len
        by `text.fit_exchange`), so `score_texts` reads texts exactly as training did;
        reward_mean / reward_std are the statistics of the PM's scores of its training responses
        (`eval.pm.reward_stats`), null when not given. Version 1 folders (no rendering) load, but
        only `score` works on them.
    export.json
        the completion marker every export of this project ends with (`checkpoints.hf.EXPORT_MARKER`).

The folder is written under a temporary name next to it and renamed into place, so a killed save
never leaves a half-written artifact under the final name (an existing one is replaced).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from cai_jax import profiling
from cai_jax.checkpoints.hf import (
    INDEX_NAME,
    SINGLE_NAME,
    CheckpointError,
    load_hf_params,
    mark_export_complete,
    save_hf_checkpoint,
)
from cai_jax.nn.config import ModelConfig
from cai_jax.nn.heads import ScalarModel

__all__ = ["save_pm", "load_pm", "LoadedPM", "HEAD_NAME", "PM_JSON"]

HEAD_NAME = "score_head.safetensors"
PM_JSON = "pm.json"
FORMAT, VERSION = "cai_jax.pm", 2
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _finite_or_none(x: Any) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


@profiling.phase("export")
def save_pm(
    folder: str | os.PathLike,
    params: Mapping[str, Any],
    cfg: ModelConfig,
    tokenizer: Any = None,
    reward_stats: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    *,
    rendering: str | None = None,
    seq_len: int | None = None,
) -> Path:
    """Writes a PM folder (see the module docstring) atomically.

    Args:
      folder: destination; replaced if it exists.
      params: `ScalarModel` params {"backbone", "head"} (host or device arrays).
      cfg: the backbone's config.
      tokenizer: saved with `save_pretrained` when given.
      reward_stats: {"mean", "std"} and optionally "count" (`eval.pm.reward_stats` output, or the
        same with "reward_" prefixes); None leaves them null.
      metadata: JSON-able extras stored under pm.json's "metadata" (e.g. eval metrics, data hash).
      rendering, seq_len: how training encoded its comparisons; `score_texts` needs both.

    Returns:
      The folder's path.
    """
    if not isinstance(params, Mapping) or set(params) != {"backbone", "head"}:
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"save_pm: params must be ScalarModel params {{'backbone', 'head'}}, got {got}")
    host = jax.device_get(params)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    stats = dict(reward_stats or {})
    if rendering is not None:
        from cai_jax.text.exchange import RENDERINGS

        if rendering not in RENDERINGS:
            raise ValueError(f"save_pm: rendering={rendering!r}; expected one of {RENDERINGS}")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "rendering": rendering,
        "seq_len": None if seq_len is None else int(seq_len),
        "reward_mean": _finite_or_none(stats.get("mean", stats.get("reward_mean"))),
        "reward_std": _finite_or_none(stats.get("std", stats.get("reward_std"))),
        "count": stats.get("count", stats.get("reward_count")),
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "metadata": dict(metadata or {}),
    }
    try:
        # No LM head in a PM: declare tied embeddings so the HF folder is complete without one.
        backbone = {k: v for k, v in host["backbone"].items() if k != "lm_head"}
        save_hf_checkpoint(
            tmp, cfg.replace(tie_word_embeddings=True), backbone, tokenizer=tokenizer, mark_complete=False
        )
        head = {k: np.ascontiguousarray(np.asarray(v)) for k, v in host["head"].items()}
        save_file(head, str(tmp / HEAD_NAME), metadata={"format": "np"})
        (tmp / PM_JSON).write_text(json.dumps(meta, indent=2, allow_nan=False))
        mark_export_complete(tmp)  # last, like every export (the rename below is atomic too)
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


@dataclasses.dataclass
class LoadedPM:
    """What `load_pm` returns: a scoring-ready preference model.

    model: `ScalarModel(config)`; params: {"backbone", "head"} (jax arrays in the config's param
    dtype); tokenizer: the saved tokenizer or None; reward_mean / reward_std: the training-score
    statistics for reward normalisation (None when the artifact has none); path: the folder;
    metadata: pm.json's "metadata".
    """

    model: ScalarModel
    params: Any
    tokenizer: Any
    config: ModelConfig
    reward_mean: float | None
    reward_std: float | None
    path: Path
    count: int | None = None
    metadata: dict = dataclasses.field(default_factory=dict)
    rendering: str | None = None
    seq_len: int | None = None

    def apply(self, *args, **kwargs):
        return self.model.apply({"params": self.params}, *args, **kwargs)

    @property
    def pad_id(self) -> int:
        from cai_jax.text import pad_id

        return pad_id(self.tokenizer) if self.tokenizer is not None else int(self.config.pad_token_id or 0)

    def encode(self, prompt: Any, response: str, *, closed: bool = True) -> list[int]:
        """The token ids this PM reads for a (prompt, response), as its training encoded them."""
        from cai_jax.text import encode_exchange, fit_exchange

        if self.tokenizer is None or self.rendering is None or self.seq_len is None:
            raise ValueError(
                f"PM folder {self.path}: scoring texts needs its tokenizer and the rendering and seq_len it was "
                "trained with (pm.json version 2); this folder lacks them, so only token ids can be scored"
            )
        head, tail = encode_exchange(self.tokenizer, prompt, response, self.rendering, closed=closed)
        return fit_exchange(head, tail, self.seq_len)[0]

    def score_texts(self, prompts: Sequence[Any], responses: Sequence[str], *, batch_size: int = 8) -> np.ndarray:
        """Raw scores of (prompt, response) texts, encoded exactly as PM training saw them.

        Args:
          prompts: N prompts (a string: one user turn; or a message list ending with a user turn).
          responses: N response texts.

        Returns:
          float32 [N] raw (unnormalised) scores; `normalize` turns them into RL rewards.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"score_texts: {len(prompts)} prompts but {len(responses)} responses")
        ids = [self.encode(p, r) for p, r in zip(prompts, responses)]
        return self.score(ids, batch_size=batch_size, pad_id=self.pad_id)

    def normalize(self, raw: Any) -> np.ndarray:
        """(raw - reward_mean) / reward_std: scores in the units PPO's rewards and evals use.

        Raises:
          ValueError: the artifact holds no reward statistics (or a zero std).
        """
        if self.reward_mean is None or not self.reward_std:
            raise ValueError(
                f"PM folder {self.path}: no reward statistics (reward_mean={self.reward_mean}, reward_std="
                f"{self.reward_std}); export the PM with them (train_pm computes them) before normalising"
            )
        return ((np.asarray(raw, np.float64) - self.reward_mean) / self.reward_std).astype(np.float32)

    def score(self, token_id_lists: Sequence[Sequence[int]], *, batch_size: int = 32, pad_id: int = 0) -> np.ndarray:
        """Scores token sequences (prompt + response ids, unpadded), read at each one's last token.

        Sequences are right-padded per batch to a bucketed length (`text.bucket_length`: few recompiles).

        Returns:
          float32 [N] raw (unnormalised) scores.
        """
        from cai_jax.text.batching import bucket_length, right_pad

        if not len(token_id_lists):
            return np.zeros((0,), np.float32)
        fn = _score_fn(self.model.cfg)
        out = []
        for lo in range(0, len(token_id_lists), batch_size):
            chunk = list(token_id_lists[lo : lo + batch_size])
            n = len(chunk)
            chunk += [chunk[0]] * (batch_size - n) if len(token_id_lists) > batch_size else []
            tokens_BL, mask_BL = right_pad(chunk, pad_id, length=bucket_length(max(map(len, chunk)), 16))
            out.append(np.asarray(fn(self.params, tokens_BL, mask_BL))[:n])
        return np.concatenate(out).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _score_fn(cfg: ModelConfig):
    """One jitted scorer per config (a new `LoadedPM` of the same model reuses its compilations)."""
    model = ScalarModel(cfg)
    return jax.jit(lambda p, t, m: model.apply({"params": p}, t, m))


def _require(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.exists():
        raise FileNotFoundError(f"PM folder {folder}: missing {name}")
    return path


def load_pm(folder: str | os.PathLike, *, with_tokenizer: bool = True, param_dtype: str | None = None) -> LoadedPM:
    """Reads a folder written by `save_pm`.

    Args:
      folder: the PM folder.
      with_tokenizer: load the tokenizer when the folder has one.
      param_dtype: override the stored config's param dtype (e.g. "bfloat16"); default as saved.

    Raises:
      FileNotFoundError: naming the folder and the missing file (config.json, model.safetensors,
        score_head.safetensors, pm.json).
      CheckpointError: a file that is unreadable or holds the wrong tensors.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"PM folder {folder} does not exist")
    _require(folder, "config.json")
    if not (folder / INDEX_NAME).exists():
        _require(folder, SINGLE_NAME)
    head_path, meta_path = _require(folder, HEAD_NAME), _require(folder, PM_JSON)
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: unreadable ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    overrides = {} if param_dtype is None else {"param_dtype": param_dtype}
    cfg = ModelConfig.from_hf_file(folder / "config.json", **overrides)
    cfg, backbone = load_hf_params(folder, cfg)
    cfg = cfg.replace(tie_word_embeddings=bool(meta.get("tie_word_embeddings", cfg.tie_word_embeddings)))
    try:
        head = load_file(str(head_path))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{head_path}: unreadable safetensors file ({e})") from None
    want = {"kernel": (cfg.hidden_size, 1), "bias": (1,)}
    for name, shape in want.items():
        if name not in head or tuple(head[name].shape) != shape:
            got = None if name not in head else tuple(head[name].shape)
            raise CheckpointError(f"{head_path}: tensor {name!r} has shape {got}, expected {shape}")
    dtype = cfg.jnp_param_dtype
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), {"backbone": backbone, "head": head})
    tokenizer = None
    if with_tokenizer and any((folder / f).exists() for f in _TOKENIZER_FILES):
        from cai_jax.models.loading import load_tokenizer

        tokenizer = load_tokenizer(folder)
    count = meta.get("count")
    return LoadedPM(
        model=ScalarModel(cfg),
        params=params,
        tokenizer=tokenizer,
        config=cfg,
        reward_mean=meta.get("reward_mean"),
        reward_std=meta.get("reward_std"),
        path=folder,
        count=None if count is None else int(count),
        metadata=dict(meta.get("metadata") or {}),
        rendering=meta.get("rendering"),
        seq_len=None if meta.get("seq_len") is None else int(meta["seq_len"]),
    )
