"""Writes tests/testdata/tiny-chat: a character-level tokenizer with a ChatML template, for tests.

    python scripts/make_tiny_chat.py

Every printable ASCII character, newline and tab is one token (unknown characters map to <unk>),
plus the ChatML markers as special tokens; the chat template renders user / assistant / system
turns as `<|im_start|>{role}\\n{content}<|im_end|>\\n` and opens an assistant turn with
`<|im_start|>assistant\\n`, as SmolLM2's does (without its default system prompt). A vocabulary of
about a hundred tokens makes every character frequent in a random model's samples, so a test can
ask a tiny model to learn something about one of them (tests/test_pipeline_learning.py).
`config.json` is a tiny Llama of that vocabulary; the folder holds no weights (configs that use
it set `model.init = "random"`, which reads only the tokenizer).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "testdata" / "tiny-chat"
SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def main() -> None:
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\r\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = TEMPLATE
    OUT.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(OUT)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": vocab["<|endoftext|>"],
        "eos_token_id": vocab["<|im_end|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }
    (OUT / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {OUT} ({len(tok)} tokens)")


if __name__ == "__main__":
    main()
