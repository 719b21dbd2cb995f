"""Prompt sources: the shipped red-team and helpfulness sets, file and `datasets` loaders, and the
clean-up (dedup, length filter), deterministic train/eval split and per-process sharding that every
generation stage applies before sampling.

Typical use::

    prompts = load_prompts("shipped", kind="red_team")          # or a path / hub name
    train, eval_, report = prepare_prompts(prompts, max_chars=1000)
    mine = shard_for_process(train, jax.process_index(), jax.process_count())
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cai_jax.cai.row_files import PromptSourceError, read_jsonl, read_rows, source_error  # noqa: F401  (PromptSourceError: re-exported)
from cai_jax.text.render import parse_transcript
from cai_jax.text.tokenizer import encode

KINDS = ("red_team", "helpful")
# Tried in order when no `field` is given; "chosen" is the hh-rlhf transcript column.
AUTO_FIELDS = ("prompt", "text", "question", "instruction", "chosen")
# Columns holding whole "\n\nHuman: ...\n\nAssistant: ..." transcripts rather than a prompt.
TRANSCRIPT_FIELDS = ("chosen", "rejected")
HH_MODES = ("first_turn", "all_but_last")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt.

    Attributes:
      id: stable identifier: the row's "id" column when it has one, else "<source name>:<row>".
      text: the prompt (the human turn to answer), surrounding whitespace stripped.
      source: where it came from ("shipped:red_team", a path or a hub name).
      category: harm or topic label where the source has one (the shipped sets do).
      meta: extra per-row data: "row" (1-based line / row number) and, for hh-rlhf rows read with
        hh_mode="all_but_last", "messages" (the conversation up to the final assistant reply).
    """

    id: str
    text: str
    source: str
    category: str | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)


def _resolve_field(source: str, row_no: int, row: Mapping[str, Any], field: str | None) -> str:
    """`field`, else the first of AUTO_FIELDS that `row` has."""
    if field is not None:
        return field
    for candidate in AUTO_FIELDS:
        if candidate in row:
            return candidate
    raise source_error(
        source, row_no, None, f"no prompt field: none of {AUTO_FIELDS} in columns {sorted(row)}; pass field="
    )


def _from_transcript(source: str, row_no: int, field: str, value: str, hh_mode: str) -> tuple[str, dict]:
    """hh-rlhf rule: the prompt is the first human turn of the transcript (see `load_prompts`)."""
    try:
        messages = parse_transcript(value)
    except ValueError as e:
        raise source_error(source, row_no, field, str(e)) from None
    if hh_mode == "first_turn":
        return next(m["content"] for m in messages if m["role"] == "user"), {}
    if messages[-1]["role"] != "assistant":
        raise source_error(source, row_no, field, "transcript does not end with an assistant reply")
    # Drop the whole trailing run of assistant turns: a few hh-rlhf rows split one reply in two.
    end = len(messages)
    while messages[end - 1]["role"] == "assistant":
        end -= 1
    return messages[end - 1]["content"], {"messages": messages[:end]}


def _to_prompts(
    source: str, rows: Iterable[tuple[int, Any]], field: str | None, hh_mode: str, source_label: str
) -> list[Prompt]:
    """Prompts from (row number, row) pairs, checking each row's field."""
    out, resolved = [], None
    # Default ids: the file name keeps them short; a hub name is kept whole (it is the identity).
    stem = Path(source).name if Path(source).exists() else source
    for row_no, row in rows:
        meta: dict[str, Any] = {"row": row_no}
        category = pid = None
        if isinstance(row, str):
            if field is not None:
                raise source_error(source, row_no, field, "row is a bare string, so it has no fields")
            text, used = row, None
        elif isinstance(row, Mapping):
            # Resolve once on the first row so every row is read from the same column.
            used = resolved = resolved or _resolve_field(source, row_no, row, field)
            if used not in row:
                raise source_error(source, row_no, used, "missing")
            text = row[used]
            if not isinstance(text, str):
                raise source_error(source, row_no, used, f"expected a string, got {type(text).__name__}")
            if used in TRANSCRIPT_FIELDS:
                text, extra = _from_transcript(source, row_no, used, text, hh_mode)
                meta.update(extra)
            category = row.get("category") if isinstance(row.get("category"), str) else None
            pid = row.get("id") if isinstance(row.get("id"), (str, int)) else None
        else:
            raise source_error(source, row_no, field, f"expected an object or a string, got {type(row).__name__}")
        pid = str(pid) if pid is not None else f"{stem}:{row_no}"
        out.append(Prompt(id=pid, text=text.strip(), source=source_label, category=category, meta=meta))
    if not out:
        raise source_error(source, None, None, "empty: no prompts")
    return out


def shipped_prompts(kind: str) -> list[Prompt]:
    """The prompt sets written for this project (package data, so they work when installed).

    Args:
      kind: "red_team" (requests a harmless assistant should decline or redirect; for the
        revisions and feedback stages) or "helpful" (ordinary requests; for the helpful mix).

    Returns:
      The prompts in file order (categories interleaved, so any prefix is a varied sample).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown shipped prompt set {kind!r} (expected one of {', '.join(KINDS)})")
    resource = importlib.resources.files("cai_jax.cai") / "data" / f"{kind}_prompts.jsonl"
    with importlib.resources.as_file(resource) as path:
        return _to_prompts(str(path), read_jsonl(path), "prompt", "first_turn", f"shipped:{kind}")


def load_prompts(
    source: str | os.PathLike,
    *,
    field: str | None = None,
    split: str | None = None,
    kind: str | None = None,
    hh_mode: str = "first_turn",
) -> list[Prompt]:
    """Loads prompts from the shipped sets, a file, a `datasets` folder or a cached hub dataset.

    Sources: "shipped" (with `kind`), or "shipped:red_team" / "shipped:helpful"; a .jsonl(.gz)
    file (one object per line); a .json(.gz) file (a list of strings or objects, or an object whose
    one list value is that list); a .txt(.gz) file (one prompt per non-blank line); a .parquet,
    .arrow or .csv file, a `save_to_disk` folder or a data-files folder (read with `datasets`); an
    "org/name" hub dataset, from the local cache only unless HF_HUB_OFFLINE=0 is set.

    Field: `field` if given, else the first of AUTO_FIELDS the first row has. Rows may carry "id"
    and "category" columns, which are kept.

    hh-rlhf rule: a "chosen" (or "rejected") column is a "\\n\\nHuman: ...\\n\\nAssistant: ..."
    transcript, parsed with `parse_transcript`. With hh_mode="first_turn" the prompt is the FIRST
    human turn: that is the red-teamer's opening request, and later turns depend on the replies of
    the model that was red-teamed, which our model will not have given. With "all_but_last" the
    conversation up to the final assistant reply (the trailing run of assistant turns) goes to
    meta["messages"], ending on a human turn, and the text is that turn (the one the reply answers).

    Args:
      source: see above.
      field: the column holding the prompt.
      split: the `datasets` split ("train" for single files when not given).
      kind: which shipped set "shipped" means; ignored for other sources, so one config call can
        name either a shipped set or a path.
      hh_mode: "first_turn" or "all_but_last", for transcript columns.

    Returns:
      The prompts in source order, text stripped of surrounding whitespace.

    Raises:
      PromptSourceError: naming the file, the 1-based row (line number for .jsonl/.txt) and the
        field, for a missing field, a non-string value, an invalid JSON line or an empty source.
    """
    if hh_mode not in HH_MODES:
        raise ValueError(f"unknown hh_mode {hh_mode!r} (expected one of {', '.join(HH_MODES)})")
    name = str(source)
    if name == "shipped" or name.startswith("shipped:"):
        chosen = name.partition(":")[2] or kind
        if chosen is None:
            raise ValueError("source 'shipped' needs kind= ('red_team' or 'helpful')")
        return shipped_prompts(chosen)
    return _to_prompts(name, read_rows(name, split), field, hh_mode, name)


def normalize(text: str) -> str:
    """The dedup and split key: case-folded, runs of whitespace collapsed, ends stripped."""
    return " ".join(text.split()).casefold()


def _content(prompt: Prompt) -> str:
    """What the model is given: the conversation for multi-turn prompts, else the text."""
    messages = prompt.meta.get("messages")
    if messages:
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return prompt.text


def _is_eval(key: str, seed: int, eval_fraction: float) -> bool:
    """Whether the seeded hash of `key` falls in the eval share of [0, 1)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def prepare_prompts(
    prompts: Sequence[Prompt],
    *,
    min_chars: int = 1,
    max_chars: int = 4000,
    max_tokens: int | None = None,
    tokenizer: Any = None,
    dedup: bool = True,
    eval_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[list[Prompt], list[Prompt], dict[str, int]]:
    """Deduplicates, length-filters and splits prompts into train and eval.

    Order: exact dedup on `normalize` (first occurrence kept), then characters (< min_chars is too
    short, > max_chars too long), then tokens (> max_tokens, only with a tokenizer). Lengths are of
    the text, or of the whole conversation for multi-turn prompts.

    Split: a prompt goes to eval when sha256(seed, normalized content) falls below eval_fraction
    of the hash range. Its side depends only on its own text and the seed, never on its position or
    on the other prompts, so adding or removing prompts never moves a prompt between train and eval
    (a split by shuffled position would reshuffle everything), and duplicates kept by dedup=False
    land on the same side, so none leaks across. The eval share is eval_fraction only on average.

    Args:
      prompts: the loaded prompts.
      min_chars: shortest text kept, in characters after stripping.
      max_chars: longest text kept, in characters.
      max_tokens: longest text kept, in tokens of `tokenizer` (no specials); needs `tokenizer`.
      tokenizer: a transformers tokenizer, for `max_tokens`.
      dedup: drop exact duplicates after normalization.
      eval_fraction: expected share of prompts in eval, in [0, 1].
      seed: split seed; another seed gives another (equally stable) split.

    Returns:
      (train, eval, report), train and eval in input order; report counts "read", "duplicates",
      "too_short", "too_long", "too_long_tokens", "kept", "train", "eval", where read equals
      duplicates + too_short + too_long + too_long_tokens + kept.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    if max_tokens is not None and tokenizer is None:
        raise ValueError("max_tokens needs a tokenizer")
    report = dict.fromkeys(
        ("read", "duplicates", "too_short", "too_long", "too_long_tokens", "kept", "train", "eval"), 0
    )
    report["read"] = len(prompts)
    seen: set[str] = set()
    train, eval_ = [], []
    for prompt in prompts:
        content = _content(prompt)
        key = normalize(content)
        if dedup and key in seen:
            report["duplicates"] += 1
            continue
        seen.add(key)
        if len(content.strip()) < min_chars:
            report["too_short"] += 1
        elif len(content) > max_chars:
            report["too_long"] += 1
        elif max_tokens is not None and len(encode(tokenizer, content)) > max_tokens:
            report["too_long_tokens"] += 1
        else:
            (eval_ if _is_eval(key, seed, eval_fraction) else train).append(prompt)
    report.update(kept=len(train) + len(eval_), train=len(train), eval=len(eval_))
    return train, eval_, report


def shard_for_process(prompts: Sequence[Prompt], process_index: int, process_count: int) -> list[Prompt]:
    """The prompts process `process_index` of `process_count` generates: every count-th one.

    Strided by position (prompts[index::count]) rather than contiguous blocks: shard sizes differ
    by at most one, and each host gets a mix of the whole list instead of one block of it (one
    source or category, or the long prompts), so hosts finish at about the same time. Every process
    must pass the same list in the same order, which the loaders and `prepare_prompts` guarantee.

    Args:
      prompts: the full, identically ordered list on every process.
      process_index: this process, in [0, process_count).
      process_count: number of processes (jax.process_count()).

    Returns:
      This process's prompts; over all indices each prompt appears exactly once.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index} of {process_count}")
    return list(prompts[process_index::process_count])
