"""Text: tokenizer helpers, conversation rendering (chat template or raw transcript), batching."""

from cai_jax.text.batching import bucket_length, left_pad, pad_batch_size, right_pad
from cai_jax.text.exchange import (
    conversation_messages,
    encode_exchange,
    encode_prompt,
    encode_text,
    end_of_turn_id,
    fit_exchange,
)
from cai_jax.text.render import (
    encode_conversation,
    parse_transcript,
    render,
    render_chat,
    render_transcript,
    validate_messages,
)
from cai_jax.text.tokenizer import adds_bos, encode, eos_ids, pad_id, token_bytes

__all__ = [
    "adds_bos",
    "bucket_length",
    "conversation_messages",
    "encode",
    "encode_conversation",
    "encode_exchange",
    "encode_prompt",
    "encode_text",
    "end_of_turn_id",
    "fit_exchange",
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
