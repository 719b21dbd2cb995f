"""Conversation rendering: the model's chat template or the paper's raw Human/Assistant transcript."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from cai_jax.text.tokenizer import adds_bos, encode

ROLES = ("user", "assistant", "system")
MODES = ("chat", "transcript")

# The CAI paper (and hh-rlhf) format: every turn opens with a blank line and a role marker.
_TRANSCRIPT_PREFIX = {"user": "\n\nHuman:", "assistant": "\n\nAssistant:"}
# A role marker after a blank line (or at the very start); a bare "Human:" mid-turn is content.
_TRANSCRIPT_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_MARKER_ROLE = {"Human": "user", "Assistant": "assistant"}


def validate_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Checks a conversation and returns it as a list of {"role", "content"} dicts.

    Args:
      messages: a non-empty list of {"role": "user" | "assistant" | "system", "content": str}.

    Returns:
      The messages as plain {"role", "content"} dicts (other keys are dropped).

    Raises:
      ValueError: naming the message index and field that is wrong.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"a conversation is a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError("conversation is empty")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content', got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}]['role']: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}]['content']: expected a str, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def render_chat(tokenizer: Any, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """Renders a conversation with the tokenizer's chat template.

    Args:
      tokenizer: a transformers tokenizer with a chat template.
      messages: the conversation (see `validate_messages`).
      add_generation_prompt: append the template's opening of an assistant turn.

    Returns:
      The rendered string, special tokens included as text.

    Raises:
      ValueError: if the tokenizer has no chat template or a message is malformed.
    """
    messages = validate_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
            "use mode='transcript' for the raw Human/Assistant format"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_transcript(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """Renders a conversation in the paper's raw format (Bai et al. 2022, CAI, appendix prompts).

    User turns become "\\n\\nHuman: {content}", assistant turns "\\n\\nAssistant: {content}". System
    messages, allowed only before the first turn, become leading plain paragraphs. With
    `add_generation_prompt` a trailing "\\n\\nAssistant:" is added without a space, since the
    model's first sampled token carries the space.

    Args:
      messages: the conversation (see `validate_messages`).
      add_generation_prompt: append "\\n\\nAssistant:".

    Returns:
      The transcript string.

    Raises:
      ValueError: on a malformed message or a system message after the first turn.
    """
    messages = validate_messages(messages)
    system, parts = [], []
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "system":
            if parts:
                raise ValueError(f"messages[{i}]['role']: a system message must come before the first turn")
            system.append(content)
        else:
            parts.append(f"{_TRANSCRIPT_PREFIX[role]} {content}")
    if add_generation_prompt:
        parts.append(_TRANSCRIPT_PREFIX["assistant"])
    return "\n\n".join(system) + "".join(parts)


def render(
    tokenizer: Any, messages: Sequence[dict[str, Any]], mode: str = "chat", add_generation_prompt: bool = True
) -> str:
    """Renders a conversation as "chat" (the chat template) or "transcript" (raw Human/Assistant).

    Args:
      tokenizer: a transformers tokenizer (unused in transcript mode).
      messages: the conversation (see `validate_messages`).
      mode: "chat" or "transcript".
      add_generation_prompt: end with the opening of an assistant turn.

    Returns:
      The rendered string.
    """
    if mode == "chat":
        return render_chat(tokenizer, messages, add_generation_prompt)
    if mode == "transcript":
        return render_transcript(messages, add_generation_prompt)
    raise ValueError(f"unknown render mode {mode!r} (expected one of {', '.join(MODES)})")


def encode_conversation(
    tokenizer: Any, messages: Sequence[dict[str, Any]], mode: str = "chat", add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of a rendered conversation, as the model saw such text in training.

    Chat mode tokenizes the template string without adding specials, since the template already
    holds them (the ids equal `apply_chat_template(..., tokenize=True)`). Transcript mode prepends
    BOS only for tokenizers that add it to plain text by default.

    Args:
      tokenizer: a transformers tokenizer.
      messages: the conversation (see `validate_messages`).
      mode: "chat" or "transcript".
      add_generation_prompt: end with the opening of an assistant turn.

    Returns:
      The token ids as a list of Python ints.
    """
    ids = encode(tokenizer, render(tokenizer, messages, mode, add_generation_prompt))
    if mode == "transcript" and adds_bos(tokenizer):
        ids = [int(tokenizer.bos_token_id)] + ids
    return ids


def parse_transcript(text: str) -> list[dict[str, str]]:
    """Parses a "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript (the hh-rlhf format) into messages.

    Turn contents are stripped of surrounding whitespace. Text before the first marker becomes a
    system message (the inverse of `render_transcript`). A trailing "\\n\\nAssistant:" gives an
    assistant message with empty content, so the last message of an hh-rlhf row is its response.

    Args:
      text: the transcript.

    Returns:
      The conversation as a list of {"role", "content"} dicts.

    Raises:
      ValueError: if the text is not a str or has no Human turn.
    """
    if not isinstance(text, str):
        raise ValueError(f"transcript must be a str, got {type(text).__name__}")
    pieces = _TRANSCRIPT_MARKER.split(text)
    # re.split with one group: [preamble, marker, content, marker, content, ...]
    preamble, rest = pieces[0], pieces[1:]
    if "Human" not in rest[0::2]:
        raise ValueError(f"transcript has no '\\n\\nHuman:' turn: {text[:80]!r}")
    messages = [{"role": "system", "content": preamble.strip()}] if preamble.strip() else []
    for marker, content in zip(rest[0::2], rest[1::2]):
        messages.append({"role": _MARKER_ROLE[marker], "content": content.strip()})
    return messages
