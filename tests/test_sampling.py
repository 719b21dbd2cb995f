"""The KV-cache sampler: greedy == argmax of the full forward, cache == no cache, padding
invariance, stop strings and EOS, determinism, the token-choice maths, and input errors."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import sampling
from cai_jax.models import Transformer, init_params, tiny_config
from cai_jax.sampling import (
    STOP_EOS,
    STOP_NONE,
    STOP_STRING,
    generate,
)
from cai_jax.scoring import score_continuations
from cai_jax.stop_strings import _kmp_dfa, _token_table
from cai_jax.token_choice import inverse_cdf, process_logits

LOGP_TOL = 1e-4  # fp32 cached decode vs uncached forward (the bound)


@dataclasses.dataclass
class FakeLM:
    model: Transformer
    params: dict
    tokenizer: object
    config: object


@functools.cache
def _tiny(vocab_size=256, seed=0, model_type="llama"):
    cfg = tiny_config(model_type, vocab_size=vocab_size, eos_token_id=2, pad_token_id=0)
    params = init_params(cfg, jax.random.key(seed))
    # Larger weights than the init's 0.02 so the tiny model has peaked, prompt-dependent outputs.
    params = jax.tree.map(lambda x: x * 20.0 if x.ndim == 2 or x.ndim == 3 else x, params)
    return FakeLM(Transformer(cfg), params, None, cfg)


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


PROMPTS = [
    [5, 9, 17, 33],
    [7, 8],
    [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115, 116],
]


def _full_forward_greedy(lm, prompt, n, width=32):
    """Argmax decoding with a full (uncached) forward pass per token, right-padded to `width`."""
    forward = jax.jit(lambda p, t, m: lm.model.apply({"params": p}, t, m))
    seq = list(prompt)
    for _ in range(n):
        tokens = np.zeros((1, width), np.int32)
        tokens[0, : len(seq)] = seq
        logits = forward(lm.params, tokens, np.arange(width)[None] < len(seq))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt) :]


def test_greedy_equals_argmax_of_full_forward(tiny):
    n = 12
    out = generate(tiny, PROMPTS, rng=jax.random.key(0), max_new_tokens=n, temperature=0.0, stop_at_eos=False)
    assert out.tokens.shape == (3, n) and out.tokens.dtype == jnp.int32
    for row, prompt in enumerate(PROMPTS):
        assert np.asarray(out.tokens[row]).tolist() == _full_forward_greedy(tiny, prompt, n)
    assert np.all(np.asarray(out.lengths) == n)
    assert np.all(out.stop_reason == STOP_NONE)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_sampled_logprobs_equal_teacher_forced(model_type):
    # At temperature 1 with no top-k/top-p the sampling distribution is the model's, so the
    # sampler's per-token log-probs (cached decode) must equal a teacher-forced uncached pass.
    lm = _tiny(model_type=model_type)
    out = generate(lm, PROMPTS, rng=jax.random.key(3), max_new_tokens=10, stop_at_eos=False)
    tokens, logprobs = np.asarray(out.tokens), np.asarray(out.logprobs)
    scores = score_continuations(lm, PROMPTS, [t.tolist() for t in tokens])
    for row in range(len(PROMPTS)):
        np.testing.assert_allclose(logprobs[row], scores.token_logprobs[row], atol=LOGP_TOL, rtol=0)


def test_left_padding_and_batching_do_not_change_a_row(tiny):
    kw = dict(rng=jax.random.key(1), max_new_tokens=8, temperature=1.0, stop_at_eos=False)
    alone = generate(tiny, [PROMPTS[0]], **kw)
    # With a longer prompt in the batch, row 0 is left-padded to a larger bucket and batch size.
    batched = generate(tiny, [PROMPTS[0], PROMPTS[2], [3] * 40], **kw)
    np.testing.assert_array_equal(alone.tokens[0], batched.tokens[0])
    np.testing.assert_allclose(alone.logprobs[0], batched.logprobs[0], atol=LOGP_TOL)
    chunked = generate(tiny, [PROMPTS[0], PROMPTS[2], [3] * 40], batch_size=2, **kw)
    np.testing.assert_array_equal(batched.tokens, chunked.tokens)


def test_identical_prompts_share_a_prefill_but_sample_independently(tiny):
    kw = dict(rng=jax.random.key(4), max_new_tokens=10, temperature=1.0, stop_at_eos=False)
    shared = generate(tiny, [PROMPTS[0], PROMPTS[0], PROMPTS[1]], **kw)  # rows 0 and 1 prefilled once
    separate = generate(tiny, [PROMPTS[2], PROMPTS[0], PROMPTS[1]], **kw)  # row 1 prefilled on its own
    np.testing.assert_array_equal(shared.tokens[1:], separate.tokens[1:])
    np.testing.assert_allclose(shared.logprobs[1:], separate.logprobs[1:], atol=LOGP_TOL)
    assert not np.array_equal(np.asarray(shared.tokens[0]), np.asarray(shared.tokens[1]))


def test_unrolled_blocks_sample_what_the_scan_samples(tiny, monkeypatch):
    # Large calls run the blocks unrolled over a per-layer cache (UNROLL_ROWS): same tokens and
    # log-probs, bit for bit, as the scan over a stacked cache, shared prefills included.
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[2], [5] * 20]
    kw = dict(rng=jax.random.key(5), max_new_tokens=9, temperature=1.0, stop_at_eos=False)
    scan = generate(tiny, prompts, unroll_layers=False, **kw)
    unrolled = generate(tiny, prompts, unroll_layers=True, **kw)
    np.testing.assert_array_equal(unrolled.tokens, scan.tokens)
    np.testing.assert_array_equal(unrolled.logprobs, scan.logprobs)
    # By default the padded row count chooses.
    chosen = []
    real = sampling._sample
    monkeypatch.setattr(sampling, "_sample", lambda *a, **k: chosen.append(k["per_layer"]) or real(*a, **k))
    monkeypatch.setattr(sampling, "UNROLL_ROWS", 8)
    generate(tiny, prompts, **kw)  # 5 rows, padded to 8
    generate(tiny, prompts[:3], **kw)  # 3 rows, padded to 4
    assert chosen == [True, False]


def test_bf16_matmuls_track_fp32():
    # bf16 matmul inputs (float32 accumulation and activations): greedy text may drift after a
    # while, but the first tokens' log-probs stay close to the fp32 model's.
    lm = _tiny()
    lm16 = FakeLM(
        Transformer(lm.config.replace(dtype="bfloat16")), lm.params, None, lm.config.replace(dtype="bfloat16")
    )
    a = generate(lm, PROMPTS, rng=jax.random.key(0), max_new_tokens=1, temperature=0.0, stop_at_eos=False)
    b = generate(lm16, PROMPTS, rng=jax.random.key(0), max_new_tokens=1, temperature=0.0, stop_at_eos=False)
    np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=0.05)


def test_same_key_same_samples_other_key_differs(tiny):
    kw = dict(max_new_tokens=16, temperature=1.0, stop_at_eos=False)
    a = generate(tiny, PROMPTS, rng=jax.random.key(7), **kw)
    b = generate(tiny, PROMPTS, rng=jax.random.key(7), **kw)
    c = generate(tiny, PROMPTS, rng=jax.random.key(8), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_eos_ends_a_sequence_and_pads_after(tiny):
    greedy = generate(tiny, PROMPTS, rng=jax.random.key(0), max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    row = np.asarray(greedy.tokens[0])
    eos = int(row[3])  # make the 4th greedy token of row 0 the EOS
    first = int(np.argmax(row == eos))
    out = generate(tiny, PROMPTS, rng=jax.random.key(0), max_new_tokens=12, temperature=0.0, eos_token_ids=[eos])
    assert int(out.lengths[0]) == first + 1 and out.stop_reason[0] == STOP_EOS
    np.testing.assert_array_equal(out.tokens[0, : first + 1], row[: first + 1])
    assert np.all(np.asarray(out.tokens[0, first + 1 :]) == tiny.config.pad_token_id)
    assert np.all(np.asarray(out.logprobs[0, first + 1 :]) == 0.0)
    # Rows that never produce the EOS run to max_new_tokens.
    for r in (1, 2):
        never = eos not in np.asarray(greedy.tokens[r]).tolist()
        if never:
            assert int(out.lengths[r]) == 12 and out.stop_reason[r] == STOP_NONE


@pytest.mark.slow
def test_stop_string_spanning_tokens_and_eos_on_smollm2(smollm2):
    tok = smollm2.tokenizer
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Write three short lines about the sea."}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    base = generate(smollm2, [ids], rng=jax.random.key(0), max_new_tokens=24, temperature=0.0, stop_at_eos=False)
    gen = np.asarray(base.tokens[0]).tolist()
    pieces = [tok.decode([t]) for t in gen]
    # A stop string made of the last 2 characters of token k and the first 2 of token k + 1.
    k = next(
        i
        for i in range(2, len(pieces) - 1)
        if len(pieces[i].strip()) >= 2
        and len(pieces[i + 1].strip()) >= 2
        and (pieces[i][-2:] + pieces[i + 1][:2]) not in "".join(pieces[: i + 1])
    )
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    out = generate(
        smollm2,
        [ids],
        rng=jax.random.key(0),
        max_new_tokens=24,
        temperature=0.0,
        stop_at_eos=False,
        stop_strings=[stop],
    )
    assert out.stop_reason[0] == STOP_STRING
    assert int(out.lengths[0]) == k + 2, (stop, pieces)
    text = out.texts(tok)[0]
    assert stop not in text and text == "".join(pieces[: k + 2]).split(stop)[0].replace("<|im_end|>", "")
    # EOS: the chat model ends its turn with <|im_end|> well before 200 tokens.
    out = generate(smollm2, [ids], rng=jax.random.key(0), max_new_tokens=200, temperature=0.0)
    assert out.stop_reason[0] == STOP_EOS
    assert int(out.tokens[0, int(out.lengths[0]) - 1]) == tok.convert_tokens_to_ids("<|im_end|>")


def test_token_automaton_matches_bytes_search():
    rng = np.random.default_rng(0)
    alphabet = b"ab\n"
    vocab = tuple(bytes(rng.choice(list(alphabet), size=rng.integers(0, 4))) for _ in range(40))
    pattern = b"a\nab"
    table = _token_table(vocab, pattern, len(vocab))
    assert table.shape == (len(pattern) + 1, len(vocab))
    for _ in range(200):
        seq = rng.integers(0, len(vocab), size=rng.integers(1, 12))
        state, text = 0, b""
        for t in seq:
            state = table[state, t]
            text += vocab[t]
            assert (state == len(pattern)) == (pattern in text)
    # The DFA itself: state after a text = longest pattern prefix that is a suffix of the text.
    dfa = _kmp_dfa(pattern)
    state = 0
    for c in b"aa\na\nab":
        state = dfa[state, c]
    assert state == len(pattern)


def test_inverse_cdf_sampling_distribution():
    # 600 entries span three 256-blocks; zeros (masked entries) must never be drawn.
    v = 600
    logits = np.full(v, -np.inf, np.float32)
    support = np.array([0, 3, 255, 256, 257, 400, 599])
    logits[support] = np.log(np.array([1, 2, 3, 4, 5, 6, 9], np.float32))
    logp = jax.nn.log_softmax(jnp.asarray(logits))
    n = 40000
    u = jax.random.uniform(jax.random.key(0), (n,))
    draws = np.asarray(inverse_cdf(jnp.broadcast_to(logp, (n, v)), u))
    assert set(np.unique(draws)) <= set(support.tolist())
    freq = np.bincount(draws, minlength=v)[support] / n
    expect = np.exp(np.asarray(logp)[support])
    # 4 standard errors of a binomial proportion at n = 40000 is < 0.01.
    np.testing.assert_allclose(freq, expect, atol=0.01)
    edge = np.asarray(inverse_cdf(jnp.broadcast_to(logp, (2, v)), jnp.array([0.0, 1.0 - 1e-7])))
    assert edge.tolist() == [0, 599]


def _reference_filter(logits, temperature, top_k, top_p):
    """Sort-based top-k / top-p (as in HF's logits warpers), numpy."""
    x = logits / temperature
    keep = np.ones_like(x, bool)
    if top_k:
        kth = np.sort(x)[::-1][top_k - 1]
        keep &= x >= kth
    if top_p < 1.0:
        p = np.exp(x - x.max()) * keep
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        n_keep = int(np.sum(cum < top_p)) + 1
        mask = np.zeros_like(keep)
        mask[order[:n_keep]] = True
        keep &= mask
    return keep


@pytest.mark.parametrize(
    "temperature,top_k,top_p,scale",
    [(1.0, 0, 0.9, 3.0), (0.7, 20, 1.0, 3.0), (1.3, 50, 0.8, 3.0), (1.0, 0, 0.95, 0.01)],  # last: flat -> bisection
)
def test_top_k_top_p_match_sort_based_reference(temperature, top_k, top_p, scale):
    logits = np.asarray(jax.random.normal(jax.random.key(5), (4, 1000))) * scale
    logp = np.asarray(process_logits(jnp.asarray(logits), temperature, top_k, top_p))
    for row in range(4):
        keep = _reference_filter(logits[row], temperature, top_k, top_p)
        np.testing.assert_array_equal(np.isfinite(logp[row]), keep)
        ref = logits[row] / temperature
        ref = np.where(keep, ref - np.log(np.sum(np.exp(ref[keep] - ref.max()))) - ref.max(), -np.inf)
        np.testing.assert_allclose(logp[row][keep], ref[keep], atol=1e-5)


def test_sampled_tokens_respect_top_k(tiny):
    out = generate(tiny, PROMPTS, rng=jax.random.key(2), max_new_tokens=6, temperature=1.0, top_k=1, stop_at_eos=False)
    greedy = generate(tiny, PROMPTS, rng=jax.random.key(2), max_new_tokens=6, temperature=0.0, stop_at_eos=False)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    np.testing.assert_allclose(np.asarray(out.logprobs), 0.0, atol=1e-6)  # top-1 leaves probability 1


def test_bad_input_errors(tiny):
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        generate(tiny, [], rng=key)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(tiny, [[1, 2], []], rng=key)
    too_long = list(range(3, 250)) * 2  # 494 tokens + 64 new > 512 context
    with pytest.raises(ValueError, match="prompt 0 has 494 tokens.*context of 512"):
        generate(tiny, [too_long], rng=key, max_new_tokens=64)
    out = generate(tiny, [too_long], rng=key, max_new_tokens=64, truncate=True, stop_at_eos=False)
    assert out.tokens.shape == (1, 64)
    with pytest.raises(ValueError, match="outside"):
        generate(tiny, [[1, 999]], rng=key)
    with pytest.raises(ValueError, match="top_p"):
        generate(tiny, [[1, 2]], rng=key, top_p=0.0)
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(tiny, [[1, 2]], rng=key, stop_strings=["x"])
