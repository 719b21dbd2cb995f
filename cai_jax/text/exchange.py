"""One encoding of every model input: a prompt, a (prompt, response) exchange, a rendered text.

Every stage that turns text into token ids calls these functions, so a model reads at run time
exactly the token layout it was trained on:

    head = encode_prompt(tok, conversation, "chat")            # what a policy answers after
    head, tail = encode_exchange(tok, conversation, response, "chat")
    ids, cut = fit_exchange(head, tail, seq_len)               # left-cut to a PM's context

SFT (loss on `tail`), preference-model training and scoring (`LoadedPM.score_texts`), PPO's
reward rows and the eval stage all use `encode_exchange`; the samplers of revisions, feedback,
PPO and eval start from `encode_prompt`, which is always the exchange's `head`.

Renderings: "chat" (the tokenizer's chat template) and "transcript" (the paper's raw
"\\n\\nHuman: ...\\n\\nAssistant:" text; "raw" is the same rendering under the feedback stage's
name). Raw text gets the tokenizer's BOS first when the tokenizer adds BOS to plain text
(Llama, Mistral), as the model saw its pretraining text; a chat template writes its own BOS.

An exchange ends at the end of the assistant's turn: the template's end-of-turn token in chat
rendering (SmolLM2's `<|im_end|>`, Llama 3's `<|eot_id|>`; any text the template puts after it,
such as ChatML's trailing newline, is not part of the exchange), the tokenizer's EOS after the
response in transcript rendering. That is where a sampler stops, so a sampled response that
ended on its own is laid out exactly like a trained one, and a preference model's score is read
at the same token in training and in RL. `closed=False` encodes a response cut off before its
end (no end-of-turn token), as PPO's rollouts that hit `max_new_tokens` are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cai_jax.text.render import render_chat, render_transcript, validate_messages
from cai_jax.text.tokenizer import adds_bos, encode, eos_ids

__all__ = [
    "RENDERINGS",
    "conversation_messages",
    "encode_text",
    "encode_prompt",
    "encode_exchange",
    "end_of_turn_id",
    "fit_exchange",
]

RENDERINGS = ("chat", "transcript", "raw")  # "raw" = "transcript"


def _mode(rendering: str) -> str:
    if rendering not in RENDERINGS:
        raise ValueError(f"unknown rendering {rendering!r} (expected one of {', '.join(RENDERINGS)})")
    return "transcript" if rendering == "raw" else rendering


def conversation_messages(conversation: str | Sequence[dict]) -> list[dict[str, str]]:
    """A prompt string (one user turn) or a message list ending with a user turn, validated."""
    if isinstance(conversation, str):
        conversation = [{"role": "user", "content": conversation}]
    messages = validate_messages(conversation)
    if messages[-1]["role"] != "user":
        raise ValueError("a prompt must end with a user turn (the response follows it)")
    return messages


def encode_text(tokenizer: Any, text: str, rendering: str) -> list[int]:
    """Token ids of an already rendered text: raw text gets BOS where the tokenizer adds it."""
    ids = encode(tokenizer, text)
    if _mode(rendering) == "transcript" and adds_bos(tokenizer):
        ids = [int(tokenizer.bos_token_id)] + ids
    return ids


def encode_prompt(tokenizer: Any, conversation: str | Sequence[dict], rendering: str) -> list[int]:
    """Token ids a model answers after: the conversation and the opening of the assistant's turn."""
    messages = conversation_messages(conversation)
    if _mode(rendering) == "chat":
        return encode(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=True))
    return encode_text(tokenizer, render_transcript(messages, add_generation_prompt=True), "transcript")


def encode_exchange(
    tokenizer: Any, conversation: str | Sequence[dict], response: str, rendering: str, *, closed: bool = True
) -> tuple[list[int], list[int]]:
    """(head, tail) token ids of a prompt and its response (module docstring).

    `head == encode_prompt(tokenizer, conversation, rendering)`; `tail` holds the response and,
    when `closed`, the end-of-turn token that ends it (nothing after that token).

    Raises:
      ValueError: a malformed conversation, an unknown rendering, or a chat template that does
        not render the prompt as a prefix of the whole exchange.
    """
    messages = conversation_messages(conversation)
    head = encode_prompt(tokenizer, messages, rendering)
    if _mode(rendering) == "transcript":
        tail = encode(tokenizer, " " + response)
        if closed and tokenizer.eos_token_id is not None:
            tail.append(int(tokenizer.eos_token_id))
        return head, tail
    head_text = render_chat(tokenizer, messages, add_generation_prompt=True)
    full = render_chat(tokenizer, messages + [{"role": "assistant", "content": response}], add_generation_prompt=False)
    if not full.startswith(head_text):
        raise ValueError("the chat template does not render the prompt as a prefix of the full exchange")
    tail = encode(tokenizer, full[len(head_text) :])
    ends = set(eos_ids(tokenizer))
    last = max((i for i, t in enumerate(tail) if t in ends), default=None)
    if last is not None:
        tail = tail[: last + 1] if closed else tail[:last]
    return head, tail


def end_of_turn_id(tokenizer: Any, rendering: str) -> int | None:
    """The token that closes an assistant turn in `rendering` (the last id of a closed exchange)."""
    _, tail = encode_exchange(tokenizer, "x", "y", rendering)
    return tail[-1] if tail and tail[-1] in set(eos_ids(tokenizer)) else None


def fit_exchange(head: Sequence[int], tail: Sequence[int], seq_len: int) -> tuple[list[int], int]:
    """head + tail in at most `seq_len` tokens, cut from the left.

    The prompt's start goes first; only a response longer than `seq_len` loses its own start. A
    score read at the last token needs the end to survive.

    Returns:
      (ids, cut): cut is 0 when it fits, 1 when prompt tokens were dropped, 2 for response tokens.
    """
    head, tail = list(head), list(tail)
    if len(head) + len(tail) <= seq_len:
        return head + tail, 0
    if len(tail) <= seq_len:
        keep = seq_len - len(tail)
        return (head[len(head) - keep :] if keep else []) + tail, 1
    return tail[len(tail) - seq_len :], 2
