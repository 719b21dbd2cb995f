"""SL-CAI fine-tuning data: (prompt, revision) pairs mixed with helpful samples, tokenized with a
loss mask on the response tokens (paper sec. 3.1).

`revision_round=n` gives SL-CAI-n: by default one example per round 1..n (every revision up to
round n), or with `final_only=True` only the round-n revision. Round 0 is the initial answer:
SL-CAI-0 fine-tunes on the model's own unrevised answers (the no-revision baseline of the
revision-count ablation, paper Fig. 5), with or without `final_only`. Helpful samples are the helpful
model's own answers to helpfulness prompts (the revision engine's output with 0 rounds: its
`initial_response`), added at `helpful_ratio` helpful examples per harmlessness example (drawn
without replacement with `seed`, capped at what exists).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from cai_jax.text import encode_exchange


@dataclasses.dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str
    source: str  # "revision_<round>" (round 0: the initial answer) or "helpful"
    input_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]  # 1 on response tokens and the end-of-turn token that closes them, else 0


def _pairs(rows: Iterable[dict], revision_round: int | None, final_only: bool) -> list[tuple[str, str, str]]:
    out = []
    for i, row in enumerate(rows):
        for field in ("prompt", "rounds"):
            if field not in row:
                raise ValueError(f"revision row {i} (id {row.get('id')!r}): missing field {field!r}")
        rounds = row["rounds"]
        n = len(rounds) if revision_round is None else revision_round
        if n < 0 or n > len(rounds):
            raise ValueError(f"revision row {i} (id {row.get('id')!r}): has {len(rounds)} rounds, SL-CAI-{n} needs {n}")
        if n == 0:
            if "initial_response" not in row:
                raise ValueError(f"revision row {i} (id {row.get('id')!r}): missing field 'initial_response'")
            out.append((row["prompt"], row["initial_response"], "revision_0"))
            continue
        for r in range(n - 1, n) if final_only else range(n):
            out.append((row["prompt"], rounds[r]["revision"], f"revision_{r + 1}"))
    return out


def tokenize_pair(tokenizer, prompt, response: str, rendering: str = "chat") -> tuple[list[int], list[int]]:
    """Token ids of a (prompt, response) exchange (`text.encode_exchange`) and the mask of its response tokens."""
    head, tail = encode_exchange(tokenizer, prompt, response, rendering)
    return head + tail, [0] * len(head) + [1] * len(tail)


def build_sft_examples(
    revision_rows: Sequence[dict],
    tokenizer: Any,
    *,
    revision_round: int | None = None,
    final_only: bool = False,
    helpful_rows: Sequence[dict] = (),
    helpful_ratio: float = 0.0,
    rendering: str = "chat",
    seed: int = 0,
) -> list[SFTExample]:
    """SL-CAI-n training examples (see the module docstring), harmlessness first then helpful."""
    pairs = _pairs(revision_rows, revision_round, final_only)
    if helpful_ratio < 0:
        raise ValueError(f"helpful_ratio={helpful_ratio} must be >= 0")
    n_help = min(len(helpful_rows), int(round(helpful_ratio * len(pairs))))
    if n_help:
        pick = np.random.default_rng(seed).choice(len(helpful_rows), n_help, replace=False)
        for i in sorted(pick.tolist()):
            row = helpful_rows[i]
            if "initial_response" not in row or "prompt" not in row:
                raise ValueError(f"helpful row {i} (id {row.get('id')!r}): needs 'prompt' and 'initial_response'")
            pairs.append((row["prompt"], row["initial_response"], "helpful"))
    out = []
    for prompt, response, source in pairs:
        ids, mask = tokenize_pair(tokenizer, prompt, response, rendering)
        out.append(SFTExample(prompt, response, source, tuple(ids), tuple(mask)))
    return out
