"""Seams between stages: one encoding per model input, the PM read where it was trained, V in reward units.

Each test ties both sides of a boundary together: what SFT / PM training wrote and what the
sampler, PPO's reward and the evals read back. A review found the PM read one token away from
where it was trained (the trailing newline after ChatML's `<|im_end|>`), BOS missing from some
transcript encodings but not others, options tokenised on their own (wrong for SentencePiece) and
the value model in raw PM units; each of those fails one of these tests.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.cai import feedback as fb
from cai_jax.cai.judge import LMJudge, option_token_ids
from cai_jax.cai.sft_data import tokenize_pair
from cai_jax.checkpoints.pm import load_pm, save_pm
from cai_jax.models import ScalarModel, Transformer, init_params, tiny_config
from cai_jax.sampling import STOP_EOS, SampleOutput
from cai_jax.scoring import score_continuations
from cai_jax.text import encode, encode_exchange, encode_prompt, encode_text, end_of_turn_id
from cai_jax.train.pm_data import tokenize_comparison
from cai_jax.train.pm_reward import PMReward
from cai_jax.train.ppo import train_ppo
from cai_jax.train.ppo_rollout import _encode_prompts, layout
from tests.conftest import smollm2_tokenizer
from tests.defaults import optim_config, ppo_config

# One fp32 forward vs another of the same tokens with other padding / batch shapes.
SAME_MATH_RTOL, SAME_MATH_ATOL = 1e-5, 1e-6
PROMPTS = ["How do I bake bread?", "Is it safe to swim after eating?", "Tell me a joke.", "What is 2 + 2?"]
RESPONSES = ["Mix flour, water and yeast.", "Yes, mostly.", "Why did the chicken cross the road?", "4."]


@pytest.fixture(scope="module")
def smol():
    return smollm2_tokenizer()


def _params(cfg, seed=0):
    """Random params drawn from their shapes (skips compiling the initialiser), scale 0.3."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(x.dtype), shapes)


def _lm(cfg, tokenizer, seed=0):
    return types.SimpleNamespace(model=Transformer(cfg), params=_params(cfg, seed), tokenizer=tokenizer, config=cfg)


def _smol_cfg(**kw):
    return tiny_config("llama", vocab_size=49152, eos_token_id=2, pad_token_id=2, **kw)


def _pm_folder(tmp_path, cfg, tokenizer, rendering, seq_len=96, seed=3):
    backbone = _params(cfg, seed)
    backbone = {k: v for k, v in backbone.items() if k != "lm_head"}
    head = {"kernel": 0.2 * np.random.default_rng(seed).standard_normal((cfg.hidden_size, 1)), "bias": np.array([0.3])}
    params = {"backbone": backbone, "head": jax.tree.map(lambda x: x.astype(np.float32), head)}
    folder = tmp_path / f"pm-{rendering}"
    stats = {"mean": 0.25, "std": 0.5, "count": 8}
    return save_pm(folder, params, cfg, tokenizer=tokenizer, reward_stats=stats, rendering=rendering, seq_len=seq_len)


# ---------------------------------------------------------------- one encoding


def test_chat_exchange_ends_at_the_end_of_turn_token(smol):
    head, tail = encode_exchange(smol, "Hi", "Yo", "chat")
    user = [{"role": "user", "content": "Hi"}]
    full = smol.apply_chat_template(user + [{"role": "assistant", "content": "Yo"}], tokenize=False)
    assert full.endswith("<|im_end|>\n")  # the template closes the turn, then a newline
    assert head == encode(smol, smol.apply_chat_template(user, tokenize=False, add_generation_prompt=True))
    assert head + tail == encode(smol, full)[:-1]  # everything but the newline after <|im_end|>
    assert tail[-1] == smol.convert_tokens_to_ids("<|im_end|>") == end_of_turn_id(smol, "chat")
    open_head, open_tail = encode_exchange(smol, "Hi", "Yo", "chat", closed=False)
    assert open_head == head and open_tail == tail[:-1]
    assert encode_prompt(smol, "Hi", "chat") == head


@pytest.mark.parametrize("rendering", ["chat", "transcript"])
def test_sft_pm_and_prompt_encodings_are_one(smol, rendering):
    """SFT examples, PM comparisons and the prompts every sampler starts from: the same ids."""
    for prompt, response in zip(PROMPTS, RESPONSES):
        head, tail = encode_exchange(smol, prompt, response, rendering)
        ids, mask = tokenize_pair(smol, prompt, response, rendering)
        assert ids == head + tail and mask == [0] * len(head) + [1] * len(tail)
        row = {"prompt": prompt, "response_a": response, "response_b": "No.", "p_a": 1.0}
        pair, cut = tokenize_comparison(smol, row, seq_len=512, rendering=rendering)
        assert cut == 0 and pair["input_ids_a"] == head + tail
        assert encode_prompt(smol, prompt, rendering) == head
        assert _encode_prompts([prompt], smol, rendering)[0][0] == head
        assert tail[-1] == end_of_turn_id(smol, rendering)


def test_transcript_gets_bos_wherever_the_tokenizer_adds_it(spiece, smol, monkeypatch):
    """SentencePiece-style tokenizers add BOS to plain text; every transcript encoding does too."""
    bos = spiece.bos_token_id
    assert encode_prompt(spiece, "hi", "transcript")[0] == bos
    assert tokenize_pair(spiece, "hi", "ab", "transcript")[0][0] == bos
    row = {"prompt": "hi", "response_a": "ab", "response_b": "ba", "p_a": 0.5}
    pair, _ = tokenize_comparison(spiece, row, seq_len=64, rendering="transcript")
    assert pair["input_ids_a"][0] == pair["input_ids_b"][0] == bos
    assert encode_text(spiece, "\n\nHuman: hi", "raw")[0] == bos and encode_text(smol, "x", "raw")[0] != bos
    # The samplers of revisions and feedback start from those ids.
    seen = []

    def fake_generate(lm, prompt_ids, **kw):
        seen.extend(prompt_ids)
        return types.SimpleNamespace(texts=lambda tok: [" ab"] * len(prompt_ids))

    from cai_jax.cai import revisions
    from tests.defaults import feedback_settings, revision_settings

    monkeypatch.setattr(revisions, "generate", fake_generate)
    monkeypatch.setattr(fb, "generate", fake_generate)
    lm = types.SimpleNamespace(tokenizer=spiece, config=tiny_config("llama"))
    settings = revision_settings(
        num_revisions=0, rendering="transcript", max_new_tokens=4, seed=0, temperature=1.0, top_p=1.0
    )
    revisions._generate_step(
        lm, [revisions.render_step(spiece, [("human", "hi")], "assistant", "transcript")], 0, settings
    )
    fb.sample_pairs(lm, ["hi"], rng=jax.random.key(0), settings=feedback_settings(policy_rendering="transcript"))
    assert len(seen) == 3 and all(ids[0] == bos for ids in seen)
    assert seen[1] == encode_prompt(spiece, "hi", "transcript")


def test_options_are_read_as_the_continuation_of_the_question(spiece):
    """SentencePiece prepends "▁" to a string: " (A)" alone has an extra space token."""
    text = "The answer is:"
    prefix, tails = option_token_ids(spiece, text, [" (A)", " (B)"], bos=True)
    for option, tail in zip((" (A)", " (B)"), tails):
        assert prefix + tail == [spiece.bos_token_id] + encode(spiece, text + option)
    assert tails[0] != encode(spiece, " (A)")  # the old, separate tokenisation differs here
    cfg = tiny_config("llama", vocab_size=512, max_position_embeddings=64)
    lm = _lm(cfg, spiece)
    from cai_jax.cai.judge import JudgeQuestion

    got = LMJudge(lm, rendering="raw").option_logprobs([JudgeQuestion(text, (" (A)", " (B)"))])
    want = score_continuations(lm, [prefix, prefix], tails).total
    np.testing.assert_allclose(got[0], want, rtol=SAME_MATH_RTOL, atol=SAME_MATH_ATOL)


# ---------------------------------------------------------------- PPO reads the PM as it was trained


def _rollout(policy_tok, rendering, responses, ended):
    """Prompt ids and a sampler-like response array: canonical ids, the stop token where `ended`."""
    prompt_ids = [encode_prompt(policy_tok, p, rendering) for p in PROMPTS]
    stop = end_of_turn_id(policy_tok, rendering)
    rows = [
        encode(policy_tok, (" " if rendering == "transcript" else "") + r) + ([stop] if e else [])
        for r, e in zip(responses, ended)
    ]
    width = max(map(len, rows)) + 2
    out = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return prompt_ids, out, np.array([len(r) for r in rows]), np.asarray(ended)


@pytest.mark.parametrize("rendering", ["chat", "transcript"])
def test_ppo_reward_equals_score_texts(tmp_path, smol, rendering):
    cfg = _smol_cfg()
    pm = load_pm(_pm_folder(tmp_path, cfg, smol, rendering))
    policy = _lm(cfg, smol)
    ended = [True, True, False, True]
    prompt_ids, responses, lengths, ended = _rollout(smol, rendering, RESPONSES, ended)
    reward = PMReward(pm, policy, rendering=rendering)
    assert reward.same
    got = reward(PROMPTS, prompt_ids, responses, lengths, ended)
    want = pm.score_texts(PROMPTS, RESPONSES)
    seqs = reward.sequences(PROMPTS, prompt_ids, responses, lengths, ended)
    for i in range(len(PROMPTS)):  # ended or cut off (then closed, as in the PM's training data)
        assert seqs[i] == pm.encode(PROMPTS[i], RESPONSES[i])
        np.testing.assert_allclose(got[i], want[i], rtol=SAME_MATH_RTOL, atol=SAME_MATH_ATOL)
    # A sampler that stops on another end-of-turn id (<|endoftext|>) is read as the trained closing token.
    other = responses.copy()
    other[0, lengths[0] - 1] = smol.convert_tokens_to_ids("<|endoftext|>")
    np.testing.assert_allclose(reward(PROMPTS, prompt_ids, other, lengths, ended)[0], want[0], rtol=1e-6, atol=1e-7)
    # The PM read one token away (at EOS, without ChatML's trailing newline kept in training before
    # this fix, or with it now) gives another number: the test would catch that seam moving.
    head, tail = encode_exchange(smol, PROMPTS[0], RESPONSES[0], rendering)
    shifted = pm.score([head + tail[:-1]], pad_id=pm.pad_id)[0]
    assert abs(shifted - want[0]) > 1e-3


def test_ppo_reward_with_another_vocabulary_re_encodes_text(tmp_path, smol, spiece):
    """A PM with another tokenizer and rendering gets the texts in its own encoding, markers included."""
    pm_cfg = tiny_config("llama", vocab_size=512, max_position_embeddings=256)
    pm = load_pm(_pm_folder(tmp_path, pm_cfg, spiece, "transcript", seq_len=200))
    policy = _lm(_smol_cfg(), smol)
    ended = [True, False, True, True]
    prompt_ids, responses, lengths, ended = _rollout(smol, "chat", RESPONSES, ended)
    reward = PMReward(pm, policy, rendering="chat")
    assert not reward.same
    seqs = reward.sequences(PROMPTS, prompt_ids, responses, lengths, ended)
    got = reward(PROMPTS, prompt_ids, responses, lengths, ended)
    want = pm.score_texts(PROMPTS, RESPONSES)
    for i in range(len(PROMPTS)):
        assert seqs[i] == pm.encode(PROMPTS[i], RESPONSES[i])
        assert seqs[i][0] == spiece.bos_token_id and "Human:" in spiece.decode(seqs[i])
        np.testing.assert_allclose(got[i], want[i], rtol=SAME_MATH_RTOL, atol=SAME_MATH_ATOL)
    with pytest.raises(ValueError, match="pm_retokenize"):
        PMReward(pm, policy, rendering="chat", retokenize=False)


def test_ppo_loop_logs_the_score_of_score_texts(tmp_path, smol, monkeypatch):
    """Through `train_ppo` itself: the score each logged rollout got is `score_texts` of its texts."""
    cfg = _smol_cfg()
    pm = load_pm(_pm_folder(tmp_path, cfg, smol, "chat"))
    policy = _lm(cfg, smol)
    stop = end_of_turn_id(smol, "chat")

    def canned(lm, prompt_ids, *, max_new_tokens, **kw):
        """A sampler that answers prompt k with RESPONSES[k] + <|im_end|> (canonical ids)."""
        heads = [encode_prompt(smol, p, "chat") for p in PROMPTS]
        tokens = np.zeros((len(prompt_ids), max_new_tokens), np.int32)
        lengths, reasons = [], []
        for r, ids in enumerate(prompt_ids):
            resp = encode(smol, RESPONSES[heads.index(list(ids))]) + [stop]
            tokens[r, : len(resp)] = resp
            lengths.append(len(resp))
            reasons.append(STOP_EOS)
        return SampleOutput(tokens, np.zeros(tokens.shape, np.float32), np.array(lengths), np.array(reasons))

    monkeypatch.setattr("cai_jax.train.ppo.generate", canned)
    ppo = ppo_config(
        rollout_batch_size=4, minibatch_size=4, micro_batch_size=2, ppo_epochs=1, max_new_tokens=16,
        sample_every=1, num_samples_logged=4,
    )  # fmt: skip
    train_ppo(
        policy, policy, pm, PROMPTS, ppo_cfg=ppo, optim_cfg=optim_config(lr=0.0, updates=1), ckpt_cfg=False,
        num_iterations=1, workdir=tmp_path / "ppo", rendering="chat",
    )  # fmt: skip
    import json

    samples = [json.loads(line) for line in (tmp_path / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["ended"] for s in samples)
    scores = pm.score_texts([s["prompt"] for s in samples], [s["response"] for s in samples])
    np.testing.assert_allclose([s["score"] for s in samples], scores, rtol=SAME_MATH_RTOL, atol=SAME_MATH_ATOL)
    assert {s["response"] for s in samples} == set(RESPONSES)


def test_value_model_starts_at_the_normalised_pm_score(tmp_path, smol):
    """value_init="pm": V at the last response token = (score - mean) / std, the units of the returns."""
    cfg = _smol_cfg()
    pm = load_pm(_pm_folder(tmp_path, cfg, smol, "chat"))
    policy = _lm(cfg, smol)
    ppo = ppo_config(rollout_batch_size=4, minibatch_size=4, micro_batch_size=4, ppo_epochs=1, max_new_tokens=16)
    state = train_ppo(
        policy, policy, pm, PROMPTS, ppo_cfg=ppo, optim_cfg=optim_config(lr=1e-4, updates=1), ckpt_cfg=False, num_iterations=0,
        workdir=tmp_path / "ppo", rendering="chat",
    )  # fmt: skip
    prompt_ids, responses, lengths, ended = _rollout(smol, "chat", RESPONSES, [True] * 4)
    width = 16 * -(-max(map(len, prompt_ids)) // 16)
    tokens, mask, _ = layout(prompt_ids, responses, lengths, width, 2)
    values = ScalarModel(cfg).apply({"params": jax.device_get(state.params["value"])}, tokens, mask, per_token=True)
    last = width + lengths - 1
    v_last = np.asarray(values)[np.arange(4), last]
    np.testing.assert_allclose(v_last, pm.normalize(pm.score_texts(PROMPTS, RESPONSES)), rtol=1e-4, atol=1e-5)
    # Before the fix the head was the PM's own, in raw score units: off by the normalisation.
    raw = np.asarray(ScalarModel(cfg).apply({"params": pm.params}, jnp.asarray(tokens), jnp.asarray(mask)))
    assert np.abs(raw - v_last).max() > 0.1


def test_a_pm_without_reward_statistics_is_refused(tmp_path, smol):
    cfg = _smol_cfg()
    folder = _pm_folder(tmp_path, cfg, smol, "chat")
    pm = load_pm(folder)
    pm.reward_std = None
    with pytest.raises(ValueError, match="no reward statistics"):
        pm.normalize([0.0])
    with pytest.raises(ValueError, match="no reward statistics"):
        train_ppo(
            _lm(cfg, smol), _lm(cfg, smol), pm, PROMPTS, ppo_cfg=ppo_config(), optim_cfg=optim_config(lr=1e-4, updates=1),
            num_iterations=1, workdir=tmp_path / "ppo", rendering="chat",
        )  # fmt: skip
