"""Preference-model data: comparison rows (validation, hh-rlhf transcripts, mixing), tokenisation, batches.

A comparison is {"prompt", "response_a", "response_b", "p_a"}: p_a = P(A is preferred), soft for AI
feedback, 0/1 for human or PMP labels ("p" is accepted for p_a, as `cai.pmp.build_pmp_pairs`
writes it). hh-rlhf rows {"chosen", "rejected"} become p_a = 1 comparisons whose prompt is the
shared conversation before the last Assistant turn. Used by the trainer in `train.pm`, which
re-exports these names.
"""

from __future__ import annotations

import collections.abc
import logging
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cai_jax.train.loop import EpochBatcher

__all__ = [
    "ComparisonError",
    "load_comparisons",
    "validate_comparison",
    "mix_comparisons",
    "tokenize_comparison",
    "tokenize_comparisons",
    "PMBatcher",
    "pad_pairs",
    "count_pair_tokens",
]

log = logging.getLogger(__name__)

TEXT_FIELDS = ("prompt", "response_a", "response_b")
TARGET_FIELDS = ("p_a", "p")  # tried in order
HH_FIELDS = ("chosen", "rejected")


class ComparisonError(ValueError):
    """A comparison source or row that cannot be used; the message names the source, row and field."""


def _error(source: str, row: int | None, field: str | None, problem: str) -> ComparisonError:
    where = [source] + ([f"row {row}"] if row is not None else []) + ([f"field {field!r}"] if field else [])
    return ComparisonError(f"{': '.join(where)}: {problem}")


# ---------------------------------------------------------------- loading and validation


def _hh_prompt_response(source: str, row_no: int, field: str, text: Any) -> tuple[list[dict], str]:
    from cai_jax.text import parse_transcript

    if not isinstance(text, str):
        raise _error(source, row_no, field, f"expected a transcript string, got {type(text).__name__}")
    try:
        messages = parse_transcript(text)
    except ValueError as e:
        raise _error(source, row_no, field, str(e)) from None
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise _error(source, row_no, field, "the transcript does not end with an Assistant turn")
    return messages[:-1], messages[-1]["content"]


def validate_comparison(row: Any, source: str = "comparisons", row_no: int = 1) -> dict:
    """One comparison row -> {"prompt", "response_a", "response_b", "p_a"} (plus "qid" if present).

    Accepts {"prompt", "response_a", "response_b", "p_a" or "p"} (the prompt a string or a list of
    {"role", "content"} messages) and hh-rlhf {"chosen", "rejected"} transcripts (p_a = 1; the
    prompt is the conversation before the last Assistant turn, which both must share).

    Raises:
      ComparisonError: naming `source`, `row_no` and the field, for a missing or mistyped field,
        a target outside [0, 1] or not finite, or hh-rlhf transcripts with different prompts.
    """
    if not isinstance(row, Mapping):
        raise _error(source, row_no, None, f"expected an object, got {type(row).__name__}")
    if "response_a" not in row and any(f in row for f in HH_FIELDS):
        for field in HH_FIELDS:  # an hh-rlhf row: name the missing side, not the prompt
            if field not in row:
                raise _error(source, row_no, field, f"missing (an hh-rlhf row needs both; row has {sorted(row)})")
        prompt, chosen = _hh_prompt_response(source, row_no, "chosen", row["chosen"])
        prompt_r, rejected = _hh_prompt_response(source, row_no, "rejected", row["rejected"])
        if prompt != prompt_r:
            raise _error(source, row_no, "rejected", "chosen and rejected differ before their last Assistant turn")
        out = {"prompt": prompt, "response_a": chosen, "response_b": rejected, "p_a": 1.0}
    else:
        out = {}
        for field in TEXT_FIELDS:
            if field not in row:
                raise _error(source, row_no, field, f"missing (row has {sorted(row)})")
            value = row[field]
            ok = isinstance(value, str) or (
                field == "prompt" and isinstance(value, list) and all(isinstance(m, Mapping) for m in value)
            )
            if not ok:
                raise _error(source, row_no, field, f"expected a string, got {type(value).__name__}")
            out[field] = [dict(m) for m in value] if isinstance(value, list) else value
        field = next((f for f in TARGET_FIELDS if f in row), None)
        if field is None:
            raise _error(source, row_no, "p_a", f"missing target (neither 'p_a' nor 'p'; row has {sorted(row)})")
        p = row[field]
        if isinstance(p, bool) or not isinstance(p, numbers.Real):
            raise _error(source, row_no, field, f"expected a number in [0, 1], got {p!r}")
        if not math.isfinite(float(p)) or not 0.0 <= float(p) <= 1.0:
            raise _error(source, row_no, field, f"target {p!r} is not a finite number in [0, 1]")
        out["p_a"] = float(p)
    if "qid" in row:
        out["qid"] = row["qid"]
    return out


def _source_rows(source: Any, split: str | None) -> tuple[str, collections.abc.Iterable[tuple[int, Any]]]:
    """(name, (row number, row) pairs) of a list, a datasets.Dataset, or a path / hub name."""
    if isinstance(source, (str, os.PathLike)):
        from cai_jax.cai.row_files import PromptSourceError, read_rows

        name = os.fspath(source)
        try:
            return name, list(read_rows(name, split))
        except PromptSourceError as e:
            raise ComparisonError(str(e)) from None
    if hasattr(source, "column_names") and hasattr(source, "__iter__"):  # datasets.Dataset
        return f"Dataset({len(source)} rows)", enumerate(source, start=1)
    if isinstance(source, Sequence):
        return "comparisons", enumerate(source, start=1)
    raise ComparisonError(f"unsupported comparison source of type {type(source).__name__}")


def load_comparisons(source: Any, *, split: str | None = None, name: str | None = None) -> list[dict]:
    """Reads and validates comparison rows (`validate_comparison`).

    Args:
      source: a list of dicts, a `datasets.Dataset`, or a path / hub name as in
        `cai.prompts.load_prompts` (.jsonl(.gz), .json(.gz), .parquet/.arrow/.csv, a
        `save_to_disk` or data-files folder, an "org/name" already in the local cache).
      split: the `datasets` split for datasets sources.
      name: how errors name the source (default: the path, or "comparisons" for a list).

    Returns:
      Normalised rows {"prompt", "response_a", "response_b", "p_a"} in source order. Row numbers in
      errors are 1-based (line numbers for .jsonl).

    Raises:
      ComparisonError: for an unreadable or empty source or a bad row (see `validate_comparison`).
    """
    src_name, rows = _source_rows(source, split)
    src_name = name or src_name
    out = [validate_comparison(row, src_name, row_no) for row_no, row in rows]
    if not out:
        raise _error(src_name, None, None, "empty: no comparisons")
    return out


def mix_comparisons(harmless: Any, helpful: Any, helpful_fraction: float, seed: int = 0) -> list[dict]:
    """All harmlessness comparisons plus a seeded sample of helpfulness ones, `helpful_fraction` of the mix.

    Bai et al. 2022 (sec. 4.1) train the PM on AI-labelled harmlessness comparisons (soft p_a)
    mixed with human helpfulness comparisons (p_a = 1). With n harmlessness rows, round(n * f /
    (1 - f)) helpful rows are drawn without replacement (fewer, with a warning, if that many do not
    exist). Rows get "source": "harmless" / "helpful" (harmless first, then helpful in source
    order); the batcher shuffles.

    Args:
      harmless, helpful: comparison sources or rows (anything `load_comparisons` reads).
      helpful_fraction: f in [0, 1).
      seed: the helpful sample's seed.
    """
    if not 0.0 <= helpful_fraction < 1.0:
        raise ValueError(f"helpful_fraction={helpful_fraction} must be in [0, 1)")
    harm = load_comparisons(harmless, name=None)
    help_rows = load_comparisons(helpful) if helpful_fraction > 0 else []
    want = int(round(len(harm) * helpful_fraction / (1.0 - helpful_fraction)))
    if want > len(help_rows):
        log.warning("mix_comparisons: %d helpful comparisons wanted, only %d exist", want, len(help_rows))
        want = len(help_rows)
    pick = sorted(np.random.default_rng(seed).choice(len(help_rows), want, replace=False).tolist()) if want else []
    return [{**r, "source": "harmless"} for r in harm] + [{**help_rows[i], "source": "helpful"} for i in pick]


# ---------------------------------------------------------------- tokenisation and batches


def tokenize_comparison(
    tokenizer: Any, row: Mapping[str, Any], *, seq_len: int, rendering: str = "chat"
) -> tuple[dict, int]:
    """Prompt + response token ids for both sides of a validated comparison.

    Each side is encoded like an SFT example (`text.encode_exchange`: the chat template or the raw
    transcript, the response closed by its end-of-turn token) and cut to `seq_len` from the left
    (`text.fit_exchange`). `LoadedPM.score_texts` encodes (prompt, response) texts the same way.

    Returns:
      ({"input_ids_a", "input_ids_b", "p_a"}, worst cut of the two sides: 0 none, 1 prompt, 2 response).
    """
    from cai_jax.text import encode_exchange, fit_exchange

    ids, cuts = {}, 0
    for side in ("a", "b"):
        head, tail = encode_exchange(tokenizer, row["prompt"], row[f"response_{side}"], rendering)
        ids[side], cut = fit_exchange(head, tail, seq_len)
        cuts = max(cuts, cut)
    return {"input_ids_a": ids["a"], "input_ids_b": ids["b"], "p_a": float(row["p_a"])}, cuts


def tokenize_comparisons(
    rows: Sequence[Mapping[str, Any]], tokenizer: Any, *, seq_len: int, rendering: str = "chat", name: str = "PM"
) -> list[dict]:
    """`tokenize_comparison` of every row; logs how many pairs lost prompt (or response) tokens."""
    out, counts = [], [0, 0, 0]
    for row in rows:
        pair, cut = tokenize_comparison(tokenizer, row, seq_len=seq_len, rendering=rendering)
        out.append(pair)
        counts[cut] += 1
    if counts[1] or counts[2]:
        log.warning(
            "%s: %d of %d comparisons exceed seq_len=%d: %d lost prompt tokens (from the left), %d response tokens",
            name,
            counts[1] + counts[2],
            len(rows),
            seq_len,
            counts[1],
            counts[2],
        )
    return out


def pad_pairs(pairs: Sequence[Mapping], seq_len: int, pad_id: int) -> tuple[dict[str, np.ndarray], int]:
    """Right-padded arrays of pre-tokenized pairs (left-truncated to seq_len) and the number cut."""
    n = len(pairs)
    out = {
        "tokens_a": np.full((n, seq_len), pad_id, np.int32),
        "mask_a": np.zeros((n, seq_len), np.int32),
        "tokens_b": np.full((n, seq_len), pad_id, np.int32),
        "mask_b": np.zeros((n, seq_len), np.int32),
        "p": np.zeros((n,), np.float32),
    }
    cut = 0
    for i, pair in enumerate(pairs):
        for side in ("a", "b"):
            ids = pair.get(f"input_ids_{side}")
            if ids is None or not len(ids):
                raise ValueError(f"PM pair {i}: missing or empty 'input_ids_{side}'")
            cut += len(ids) > seq_len
            ids = list(ids)[-seq_len:]
            out[f"tokens_{side}"][i, : len(ids)] = ids
            out[f"mask_{side}"][i, : len(ids)] = 1
        p = float(pair.get("p_a", pair.get("p", math.nan)))
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"PM pair {i}: target p_a={p} is not a finite number in [0, 1]")
        out["p"][i] = p
    return out, cut


class PMBatcher(EpochBatcher):
    """Deterministic fixed-shape batches of tokenized comparisons, with a resumable position.

    Takes `tokenize_comparison` outputs ({"input_ids_a", "input_ids_b", "p_a"}); each side is
    right-padded to `seq_len` (a longer side keeps its last `seq_len` tokens; `num_truncated`
    counts those sides). Epoch order, dropped remainder and the (epoch, index) position are those
    of the unpacked `SFTBatcher` (`EpochBatcher`); `state()` / `restore()` likewise.

    Batches: "tokens_a", "mask_a", "tokens_b", "mask_b" int32 [B, L], "p" float32 [B], the format
    of `steps.pm_step`.
    """

    def __init__(self, pairs: Sequence[Mapping], *, batch_size: int, seq_len: int, seed: int = 0, pad_id: int = 0):
        if batch_size < 1 or seq_len < 2:
            raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size} and {seq_len}")
        if len(pairs) < batch_size:
            raise ValueError(f"{len(pairs)} comparisons cannot fill one batch of {batch_size}")
        self.batch_size, self.seq_len, self.seed = int(batch_size), int(seq_len), int(seed)
        self.arrays, self.num_truncated = pad_pairs(pairs, seq_len, pad_id)
        self.epoch, self.index = 0, 0

    def __len__(self) -> int:
        return self.arrays["p"].shape[0]

    def _epoch_len(self, epoch: int) -> int:
        return len(self)

    def next(self) -> tuple[dict[str, np.ndarray], str]:
        """The next global batch (host numpy) and its id "epoch E index I"; advances the position."""
        rows, batch_id = self._next_items(len(self))
        return {k: v[rows] for k, v in self.arrays.items()}, batch_id


def count_pair_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Real tokens of a PM batch, both sides (for tokens/s and MFU)."""
    return int(batch["mask_a"].sum() + batch["mask_b"].sum())
