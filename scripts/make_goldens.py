"""Writes the reference values in tests/testdata/ from transformers' PyTorch models.

Run once (needs torch: `pip install -e .[bench]`):  python scripts/make_goldens.py

* smollm2_golden.npz: token ids (transformers' GGUF tokenizer + chat template) and log-probs of
  transformers' own GGUF load of SmolLM2-135M-Instruct at every position: the top-64 entries and
  a fixed random subset of 1024 vocabulary ids (the full [L, 49152] arrays would be megabytes).
* tiny-<family>/: random tiny models made with a fixed torch seed and saved by transformers
  (config.json + model.safetensors), with golden.npz holding full log-probs for a left-padded
  batch (explicit position ids) and the state dict's tensor names and shapes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "tests" / "testdata"

CONVERSATIONS = [
    [{"role": "user", "content": "Can you help me hack into my neighbor's wifi?"}],
    [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "What is 17 times 23? Show the steps."},
        {"role": "assistant", "content": "17 x 23 = 17 x 20 + 17 x 3 = 340 + 51 = 391."},
        {"role": "user", "content": "Thanks! Now explain why the sky looks blue, café-style \u2615."},
    ],
]
TRANSCRIPTS = [
    "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with breaking into property, but a locksmith can.",
]
TOPK = 64
SUBSET = 1024


def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cai_jax.models.loading import resolve_preset

    gguf = resolve_preset("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.eval()
    seqs = [
        tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False) for c in CONVERSATIONS
    ]
    seqs += [tok(t, add_special_tokens=False)["input_ids"] for t in TRANSCRIPTS]
    rng = np.random.default_rng(0)
    subset = np.sort(rng.choice(model.config.vocab_size, SUBSET, replace=False)).astype(np.int32)
    out = {"subset_ids": subset, "num_seqs": np.int32(len(seqs))}
    for i, ids in enumerate(seqs):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits.float(), -1)[0].numpy()
        top = np.argsort(-logp, axis=-1)[:, :TOPK].astype(np.int32)
        out[f"ids_{i}"] = np.asarray(ids, np.int32)
        out[f"top_ids_{i}"] = top
        out[f"top_logp_{i}"] = np.take_along_axis(logp, top, axis=-1)
        out[f"subset_logp_{i}"] = logp[:, subset]
    np.savez_compressed(OUT / "smollm2_golden.npz", **out)
    meta = {"conversations": CONVERSATIONS, "transcripts": TRANSCRIPTS, "torch": torch.__version__}
    (OUT / "smollm2_golden.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    print("smollm2: ", [len(s) for s in seqs])


TINY = {
    "llama": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=False),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", tie_word_embeddings=False, sliding_window=4),
}  # fmt: skip


def tiny(name: str, extra: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_act="silu",
    )  # fmt: skip
    hf.update(extra)
    cfg = AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"})
    cfg.architectures = hf["architectures"]
    if name == "mistral":
        cfg._attn_implementation = "eager"  # sdpa path ignores sliding windows on CPU in some versions
    torch.manual_seed({"llama": 0, "qwen2": 1, "mistral": 2}[name])
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():  # HF inits biases and norms to constants; randomize them so they are tested
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    folder = OUT / f"tiny-{name}"
    model.save_pretrained(folder, safe_serialization=True)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 256, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # row 1 is left-padded by 5
    ids[1, :5] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    logp = torch.log_softmax(logits, -1).numpy()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    np.savez_compressed(
        folder / "golden.npz", ids=ids.numpy().astype(np.int32), mask=mask.numpy().astype(bool), logp=logp
    )
    (folder / "state_dict_shapes.json").write_text(json.dumps(shapes, indent=1))
    print(name, "saved", folder)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, extra in TINY.items():
        tiny(name, extra)
    smollm2()


if __name__ == "__main__":
    main()
