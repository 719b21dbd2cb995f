"""Tokenizer helpers: plain encoding, end-of-sequence ids, pad id and per-token byte strings."""

from __future__ import annotations

import functools
import json
import re
import weakref
from typing import Any

# End-of-turn tokens of common chat formats (ChatML, Llama 3, GPT-2/StarCoder, Gemma, Phi-3). A
# sampler must stop on these even when the tokenizer's own eos_token is a different one.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>", "<|end|>")

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPIECE_SPACE = "\u2581"  # "▁", SentencePiece's stand-in for a space

_TOKEN_BYTES_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encode(tokenizer: Any, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of `text`, without BOS/EOS unless asked.

    Args:
      tokenizer: a transformers tokenizer.
      text: the string to encode.
      add_special_tokens: whether to let the tokenizer add its default specials (e.g. BOS).

    Returns:
      The token ids as a list of Python ints.
    """
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer prepends BOS to plain text by default (Llama does, SmolLM2/GPT-2 do not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("x")["input_ids"]
    return bool(ids) and ids[0] == bos


def _special_token_id(tokenizer: Any, token: str) -> int | None:
    """Id of `token` only if the vocabulary really holds it (convert_tokens_to_ids maps misses to unk)."""
    token_id = tokenizer.get_vocab().get(token)
    if token_id is None:
        return None
    # Only trust added/special tokens: a plain BPE piece spelled like a marker is ordinary text.
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return token_id if token_id in added or token in tokenizer.all_special_tokens else None


def eos_ids(tokenizer: Any, config: Any = None) -> tuple[int, ...]:
    """All ids that end a generation: the tokenizer's eos, the model config's and end-of-turn tokens.

    Args:
      tokenizer: a transformers tokenizer.
      config: optional model config with `eos_token_ids` (a tuple, as `ModelConfig`) or
        `eos_token_id` (an int or a list of ints, as an HF config).

    Returns:
      Sorted, de-duplicated token ids; empty only if none of these sources names one.
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if config is not None:
        from_config = getattr(config, "eos_token_ids", None)
        if from_config is None:
            from_config = getattr(config, "eos_token_id", None)
        if isinstance(from_config, int):
            from_config = (from_config,)
        ids.update(int(i) for i in from_config or ())
    for token in END_OF_TURN_TOKENS:
        token_id = _special_token_id(tokenizer, token)
        if token_id is not None:
            ids.add(int(token_id))
    return tuple(sorted(ids))


def pad_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its eos token, else 0.

    Args:
      tokenizer: a transformers tokenizer.

    Returns:
      A token id; padded positions are masked, so any valid id is safe.
    """
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


@functools.lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table (byte-level BPE maps each byte to a printable char)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    byte_values, chars = printable[:], printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(byte_values, chars)}


def _decoder_kind(tokenizer: Any) -> tuple[str, str]:
    """("bytelevel" | "sentencepiece" | "other", space replacement) from the fast tokenizer's decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        # Slow SentencePiece tokenizers have no backend JSON but do use "▁" pieces.
        return ("sentencepiece", _SPIECE_SPACE) if hasattr(tokenizer, "sp_model") else ("other", "")
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    types = {part.get("type") for part in parts}
    if "ByteLevel" in types:
        return "bytelevel", ""
    if "Metaspace" in types:
        part = next(p for p in parts if p.get("type") == "Metaspace")
        return "sentencepiece", part.get("replacement", _SPIECE_SPACE)
    for part in parts:
        if part.get("type") == "Replace" and part.get("content") == " ":
            return "sentencepiece", part.get("pattern", {}).get("String", _SPIECE_SPACE)
    return "other", ""


def _compute_token_bytes(tokenizer: Any) -> tuple[bytes, ...]:
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special_ids = set(tokenizer.all_special_ids)
    kind, space = _decoder_kind(tokenizer)
    to_byte = _unicode_to_bytes()
    out: list[bytes] = []
    for i, token in enumerate(tokens):
        entry = added.get(i)
        if i in special_ids or (entry is not None and entry.special):
            # Specials never appear in decoded text (skip_special_tokens), so they match no stop string.
            out.append(b"")
        elif entry is not None or token is None:
            # Added non-special tokens are inserted verbatim by the decoder.
            out.append(entry.content.encode() if entry is not None else tokenizer.decode([i]).encode())
        elif kind == "bytelevel" and all(ch in to_byte for ch in token):
            out.append(bytes(to_byte[ch] for ch in token))
        elif kind == "sentencepiece":
            match = _BYTE_FALLBACK.match(token)
            out.append(bytes([int(match.group(1), 16)]) if match else token.replace(space, " ").encode())
        else:
            out.append(tokenizer.decode([i]).encode())
    return tuple(out)


def token_bytes(tokenizer: Any) -> tuple[bytes, ...]:
    """The exact bytes each token id contributes to decoded text, for stop strings across tokens.

    Concatenating the entries of a token sequence gives the UTF-8 bytes of its decoded text even when a
    multi-byte character is split over tokens, which `decode([i])` per token cannot (it yields U+FFFD).
    Byte-level BPE vocabularies invert GPT-2's byte-to-unicode table; SentencePiece vocabularies map "▁"
    to a space and `<0xNN>` byte-fallback tokens to their byte (so a leading space that the decoder
    would strip at the start of text is kept). Special tokens map to b"". Computed once per tokenizer.

    Args:
      tokenizer: a transformers tokenizer.

    Returns:
      A tuple of length `len(tokenizer)`; ids past it (padded embedding rows) have no entry.
    """
    try:
        return _TOKEN_BYTES_CACHE[tokenizer]
    except KeyError:
        pass
    except TypeError:  # not weak-referenceable or unhashable: compute without caching
        return _compute_token_bytes(tokenizer)
    result = _compute_token_bytes(tokenizer)
    try:
        _TOKEN_BYTES_CACHE[tokenizer] = result
    except TypeError:
        pass
    return result
