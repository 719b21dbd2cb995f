"""Text: tokenizer helpers, conversation rendering (chat template or raw transcript), batching."""

from cai_jax.text.batching import bucket_length, left_pad, pad_batch_size, right_pad
from cai_jax.text.render import (
    encode_conversation,
    parse_transcript,
    render,
    render_chat,
    render_transcript,
    validate_messages,
)
from cai_jax.text.tokenizer import encode, eos_ids, pad_id, token_bytes

__all__ = [
    "bucket_length",
    "encode",
    "encode_conversation",
    "eos_ids",
    "left_pad",
    "pad_batch_size",
    "pad_id",
    "parse_transcript",
    "render",
    "render_chat",
    "render_transcript",
    "right_pad",
    "token_bytes",
    "validate_messages",
]
