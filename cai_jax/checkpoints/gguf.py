"""GGUF file -> HF-format folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).

Torch-free: tensors are dequantized with the `gguf` package's numpy kernels, the rotary q/k
row permutation that llama.cpp's converter applies is undone, and the tokenizer is rebuilt with
the `tokenizers` library from the vocabulary, merges and chat template stored in the metadata.

Only Llama-architecture GGUFs with a byte-level BPE vocabulary (`tokenizer.ggml.model == "gpt2"`)
are converted; anything else is a clear error. The pre-tokenizer follows llama.cpp's
`tokenizer.ggml.pre` table: for `smollm`/`starcoder` digits are split one by one before the GPT-2
regex, which is what the original SmolLM2 `tokenizer.json` does.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from cai_jax.checkpoints.hf import save_hf_checkpoint
from cai_jax.nn.config import ModelConfig, UnsupportedModelError

CONVERTER_VERSION = "2"  # bump when the conversion changes, so cached folders are rebuilt

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (split digits one by one first, split regex)
_PRE_TOKENIZERS = {
    "default": (False, _GPT2_SPLIT),
    "gpt2": (False, _GPT2_SPLIT),
    "smollm": (True, _GPT2_SPLIT),
    "starcoder": (True, _GPT2_SPLIT),
    "refact": (True, _GPT2_SPLIT),
    "llama-bpe": (False, _LLAMA3_SPLIT),
    "llama3": (False, _LLAMA3_SPLIT),
    "qwen2": (False, _QWEN2_SPLIT),
}


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation (interleaved rotary pairs -> HF half-split layout)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(reader, source: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"{source}: GGUF architecture {arch!r} is not supported (only 'llama')")
    a = lambda k, d=None: _field(reader, f"llama.{k}", d)  # noqa: E731
    heads = int(a("attention.head_count"))
    hidden = int(a("embedding_length"))
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    return ModelConfig(
        vocab_size=int(a("vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(a("feed_forward_length")),
        num_layers=int(a("block_count")),
        num_heads=heads,
        num_kv_heads=int(a("attention.head_count_kv", heads)),
        head_dim=int(a("attention.key_length", hidden // heads)),
        max_position_embeddings=int(a("context_length", 2048)),
        rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(a("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        model_type="llama",
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )


_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TO_HF = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_tensors(reader, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """All tensors dequantized to float32 numpy, under HF names, q/k un-permuted."""
    from gguf import dequantize

    out = {}
    for t in reader.tensors:
        if t.name.startswith("blk."):
            _, layer, kind, suffix = t.name.split(".", 3)
            if kind not in _BLOCK_TO_HF:
                raise UnsupportedModelError(f"unexpected GGUF tensor {t.name!r}")
            name = f"model.layers.{layer}.{_BLOCK_TO_HF[kind]}.{suffix}"
        elif t.name in _GGUF_TO_HF:
            name = _GGUF_TO_HF[t.name]
        elif t.name == "rope_freqs.weight":
            continue  # llama3 rope factors; we recompute them from the config
        else:
            raise UnsupportedModelError(f"unexpected GGUF tensor {t.name!r}")
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims innermost first
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if ".attn_q." in t.name:
            w = _reverse_permute(w, cfg.num_heads)
        elif ".attn_k." in t.name:
            w = _reverse_permute(w, cfg.num_kv_heads)
        out[name] = w
    return out


def build_tokenizer(reader, source: str):
    """A transformers fast tokenizer from GGUF metadata (byte-level BPE vocabularies)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"{source}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')"
        )
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise UnsupportedModelError(
            f"{source}: GGUF pre-tokenizer {pre!r} is not supported ({', '.join(_PRE_TOKENIZERS)})"
        )
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    split_digits, regex = _PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    steps += [
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
    bpe.pre_tokenizer = pre_tokenizers.Sequence(steps)
    bpe.decoder = decoders.ByteLevel()
    special = [AddedToken(tok, special=True, normalized=False) for tok, ty in zip(tokens, types) if ty == 3]
    bpe.add_special_tokens(special)

    def tok_of(key):
        i = _field(reader, key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=tok_of("tokenizer.ggml.bos_token_id"),
        eos_token=tok_of("tokenizer.ggml.eos_token_id"),
        unk_token=tok_of("tokenizer.ggml.unknown_token_id"),
        pad_token=tok_of("tokenizer.ggml.padding_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        model_max_length=int(_field(reader, "llama.context_length", 2048)),
    )


def default_cache_dir() -> Path:
    root = os.environ.get("CAI_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cai_jax"
    )
    return Path(root)


def _fingerprint(path: Path) -> str:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}|{CONVERTER_VERSION}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Converts a GGUF file to an HF-format folder (cached) and returns the folder.

    The folder is `<cache>/gguf/<file stem>-<fingerprint>` unless `out_dir` is given; the cache is
    `$CAI_JAX_CACHE`, else `$XDG_CACHE_HOME/cai_jax`, else `~/.cache/cai_jax`. A finished folder
    holds a `.complete` marker; a conversion killed midway is redone on the next call.
    """
    from gguf import GGUFReader

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    if out_dir is None:
        out_dir = default_cache_dir() / "gguf" / f"{gguf_path.stem}-{_fingerprint(gguf_path)}"
    out_dir = Path(out_dir)
    marker = out_dir / ".complete"
    if marker.exists() and not force:
        return out_dir
    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as e:
        raise ValueError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    cfg = gguf_config(reader, str(gguf_path))
    tokenizer = build_tokenizer(reader, str(gguf_path))
    tensors = gguf_tensors(reader, cfg)
    from cai_jax.checkpoints.hf import hf_tensors_to_params

    params = hf_tensors_to_params(cfg, tensors, source=str(gguf_path))
    tmp = out_dir.with_name(out_dir.name + ".partial")
    save_hf_checkpoint(tmp, cfg, params, tokenizer=tokenizer)
    # transformers 5 keeps the template in chat_template.jinja; older readers look for it here.
    tok_cfg_path = tmp / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["chat_template"] = tokenizer.chat_template
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))
    (tmp / "generation_config.json").write_text(
        json.dumps({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}, indent=2)
    )
    (tmp / ".complete").write_text(json.dumps({"source": str(gguf_path), "converter": CONVERTER_VERSION}))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
