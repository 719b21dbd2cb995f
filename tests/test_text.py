"""Tests for cai_jax.text: rendering, transcript parsing, token bytes, padding and buckets."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from cai_jax.text import (
    bucket_length,
    encode,
    encode_conversation,
    eos_ids,
    left_pad,
    pad_batch_size,
    pad_id,
    parse_transcript,
    render,
    render_chat,
    render_transcript,
    right_pad,
    token_bytes,
)

HH_TEST = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"

CONVERSATION = [
    {"role": "user", "content": "How do I bake bread?"},
    {"role": "assistant", "content": "Mix flour, water, yeast and salt."},
    {"role": "user", "content": "How long?"},
]
TEXTS = ["Hello world", "café au lait", "emoji 🙂👍🏽 mix", "中文测试文本", "  tabs\tand\nnewlines  ", "naïve Ωmega"]


@pytest.fixture(scope="module")
def smol():
    """The embedded SmolLM2 tokenizer (converted once into ~/.cache/cai_jax, no network)."""
    from cai_jax.models import load_tokenizer
    from cai_jax.models.loading import resolve_model_path

    try:
        folder = resolve_model_path("smollm2-135m-instruct")
    except FileNotFoundError as e:
        pytest.skip(f"embedded model unavailable: {e}")
    return load_tokenizer(folder)


# --- transcript rendering and parsing ---------------------------------------------------------


def test_render_transcript_golden():
    assert render_transcript(CONVERSATION) == (
        "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt.\n\nHuman: How long?\n\nAssistant:"
    )
    assert render_transcript(CONVERSATION[:2], add_generation_prompt=False) == (
        "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt."
    )
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_transcript(system) == "Be brief.\n\nHuman: Hi\n\nAssistant:"
    assert render(None, system, mode="transcript") == "Be brief.\n\nHuman: Hi\n\nAssistant:"


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "empty"),
        ([{"role": "bot", "content": "x"}], r"messages\[0\]\['role'\]"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}], r"messages\[1\]\['content'\]"),
        ([{"role": "user", "content": "x"}, "hello"], r"messages\[1\]"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "late"}], r"messages\[1\].*system"),
    ],
)
def test_render_transcript_validation(messages, match):
    with pytest.raises(ValueError, match=match):
        render_transcript(messages)


def test_render_unknown_mode():
    with pytest.raises(ValueError, match="unknown render mode"):
        render(None, CONVERSATION, mode="markdown")


def test_parse_transcript_sample():
    text = "\n\nHuman: Hi there\n\nAssistant:  Hello! Human: is not a marker here.\n\nHuman: Bye\n\nAssistant:"
    assert parse_transcript(text) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! Human: is not a marker here."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": ""},
    ]
    assert parse_transcript(render_transcript(CONVERSATION, add_generation_prompt=False)) == CONVERSATION
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert parse_transcript(render_transcript(system, add_generation_prompt=False)) == system


def test_parse_transcript_errors():
    with pytest.raises(ValueError, match="no '.*Human:' turn"):
        parse_transcript("\n\nAssistant: only me")
    with pytest.raises(ValueError, match="no '.*Human:' turn"):
        parse_transcript("just some text")


def test_parse_transcript_hh_rlhf():
    if not HH_TEST.exists():
        pytest.skip(f"hh-rlhf test split not found at {HH_TEST}")
    with gzip.open(HH_TEST, "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(50), f)]
    for row in rows:
        for key in ("chosen", "rejected"):
            messages = parse_transcript(row[key])
            assert messages[0]["role"] == "user"
            assert messages[-1]["role"] == "assistant"
            # Rendering back gives the original up to whitespace around turn contents.
            assert render_transcript(messages, add_generation_prompt=False).split() == row[key].split()
        # chosen and rejected share the prompt and differ in the final response.
        assert parse_transcript(row["chosen"])[:-1] == parse_transcript(row["rejected"])[:-1]


# --- chat rendering ---------------------------------------------------------------------------


def test_render_chat_matches_apply_chat_template(smol):
    for messages in (CONVERSATION, CONVERSATION[:2], [{"role": "system", "content": "Be brief."}] + CONVERSATION):
        for gen in (True, False):
            expected = smol.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
            assert encode_conversation(smol, messages, "chat", add_generation_prompt=gen) == list(expected)
            assert render_chat(smol, messages, gen) == smol.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen
            )
    assert render_chat(smol, CONVERSATION).endswith("<|im_start|>assistant\n")


def test_render_chat_requires_template(spiece):
    with pytest.raises(ValueError, match="no chat template"):
        render_chat(spiece, CONVERSATION)


def test_encode_conversation_transcript_bos(smol, spiece):
    # SmolLM2 adds no BOS to plain text, so neither do transcripts.
    assert encode_conversation(smol, CONVERSATION, "transcript") == encode(smol, render_transcript(CONVERSATION))
    # A Llama-style tokenizer that adds BOS by default gets it in front.
    ids = encode_conversation(spiece, CONVERSATION, "transcript")
    assert ids[0] == spiece.bos_token_id and ids[1:] == encode(spiece, render_transcript(CONVERSATION))


# --- tokenizer helpers ------------------------------------------------------------------------


def test_eos_and_pad_ids(smol, spiece):
    assert eos_ids(smol) == (0, 2)  # <|endoftext|>, <|im_end|>
    assert eos_ids(smol, config=type("C", (), {"eos_token_ids": (2, 7)})()) == (0, 2, 7)
    assert eos_ids(smol, config=type("C", (), {"eos_token_id": 5})()) == (0, 2, 5)
    assert pad_id(smol) == 2
    assert eos_ids(spiece) == (2,)
    assert pad_id(spiece) == 2  # no pad token: falls back to eos


def test_token_bytes_round_trip_bytelevel(smol):
    table = token_bytes(smol)
    assert len(table) == len(smol)
    assert token_bytes(smol) is table  # cached per tokenizer
    assert table[2] == b""  # <|im_end|> is special
    for text in TEXTS:
        ids = encode(smol, text)
        assert b"".join(table[i] for i in ids) == text.encode(), text


def test_token_bytes_round_trip_sentencepiece(spiece):
    table = token_bytes(spiece)
    assert table[1] == b"" and table[2] == b""
    assert table[3 + 0x0A] == b"\n"
    for text in ["hi a b", "hi café", "🙂 abc"]:
        ids = encode(spiece, text)
        # The normalizer prepends "▁", which the decoder strips at the start of text only.
        assert b"".join(table[i] for i in ids) == (" " + text).encode(), text
        assert spiece.decode(ids) == text


# --- padding and buckets ----------------------------------------------------------------------


def test_left_pad():
    tokens, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    np.testing.assert_array_equal(tokens, [[1, 2, 3], [0, 0, 4]])
    np.testing.assert_array_equal(mask, [[True, True, True], [False, False, True]])
    assert tokens.dtype == np.int32 and mask.dtype == np.bool_
    tokens, mask = left_pad([[1, 2, 3], [4]], pad_id=9, length=4, multiple_of=3)
    np.testing.assert_array_equal(tokens, [[9, 9, 9, 1, 2, 3], [9, 9, 9, 9, 9, 4]])
    assert mask.sum() == 4


def test_right_pad():
    tokens, mask = right_pad([[1, 2, 3], [4]], pad_id=0, multiple_of=4)
    np.testing.assert_array_equal(tokens, [[1, 2, 3, 0], [4, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[True, True, True, False], [True, False, False, False]])
    tokens, _ = right_pad([np.array([5, 6])], pad_id=0, length=2)
    np.testing.assert_array_equal(tokens, [[5, 6]])


@pytest.mark.parametrize("pad", [left_pad, right_pad])
def test_pad_errors(pad):
    with pytest.raises(ValueError, match="empty list"):
        pad([], pad_id=0)
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        pad([[1], []], pad_id=0)
    with pytest.raises(ValueError, match="sequence 1 has 3 tokens, more than length=2"):
        pad([[1], [1, 2, 3]], pad_id=0, length=2)


def test_bucket_length():
    assert [bucket_length(n) for n in (0, 1, 16, 17, 42, 100, 512, 513, 1024)] == [
        16,
        16,
        16,
        20,
        48,
        112,
        512,
        640,
        1024,
    ]
    assert [bucket_length(n) for n in (1025, 1500, 1537, 4000)] == [1280, 1536, 1792, 4096]
    assert bucket_length(3, min_bucket=1) == 3
    # Never more than a quarter of padding past the minimum bucket.
    assert all(bucket_length(n) < 1.25 * n + 1 for n in range(17, 5000))
    assert bucket_length(5, min_bucket=64) == 64
    with pytest.raises(ValueError):
        bucket_length(-1)


def test_pad_batch_size():
    assert [pad_batch_size(b) for b in (1, 2, 3, 5, 8, 9, 16, 18, 33, 64)] == [1, 2, 4, 8, 8, 16, 16, 24, 40, 64]
    with pytest.raises(ValueError):
        pad_batch_size(0)
