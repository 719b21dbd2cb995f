"""RL-CAI feedback labeller: golden MC question strings, label arithmetic (normalisation, swap,
ensembling, clamping, hard labels), the resumable engine, bad input, and the embedded SmolLM2 as
a feedback model.

Most tests use a judge whose option log-probs are a known function of the responses it is shown
(`FakeJudge`, the `cai.judge` interface) and a fake `generate`, so every label is
hand-checkable and the tests stay fast; one test runs the whole stage on a tiny random model, and
the slow ones on SmolLM2.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from cai_jax.cai import feedback as fb
from cai_jax.cai import feedback_labels
from cai_jax.cai.constitution import ConstitutionError, FeedbackFewShot, FeedbackPrinciple, default_constitution
from cai_jax.cai.feedback import load_comparisons_dataset, run_feedback, sample_pairs
from cai_jax.cai.feedback_labels import draw_principles, label_pairs
from cai_jax.cai.feedback_probs import label_probabilities, member_probabilities
from cai_jax.cai.feedback_question import build_mc_question, chat_question, cot_answer_prefix
from cai_jax.cai.judge import CallableJudge, JudgeError, LMJudge
from cai_jax.cai.prompts import Prompt, shipped_prompts
from cai_jax.jobs import Progress
from tests.defaults import feedback_settings

# The labeller's settings in these tests: base config values, one order, no few-shots, unless a
# test says otherwise.
PLAIN = dict(swap=False, ensemble=1, num_principles=None, num_few_shots=0, max_new_tokens=128)


def FeedbackSettings(**kwargs):  # noqa: N802  (reads like the dataclass it builds)
    return feedback_settings(**{**PLAIN, **kwargs})


SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
SHOT = FeedbackFewShot(
    "s1", [{"role": "user", "content": "Shot question?"}], ["Shot reply one.", "Shot reply two."], "B", reasoning="R."
)
COLUMNS = {"prompt", "response_a", "response_b", "principle_ids", "logp_a", "logp_b", "p_a", "cot_texts"}


@functools.cache
def tiny_lm():
    """A tiny random llama with the real SmolLM2 tokenizer (vocab 49152, ChatML template).

    Cached per session (test_mc_eval uses it too). Parameters are drawn from their shapes
    (`jax.eval_shape`), which skips compiling the initialiser.
    """
    from cai_jax.models import Transformer, init_params, load_tokenizer, tiny_config
    from cai_jax.models.loading import LoadedModel, resolve_model_path

    tok = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    cfg = tiny_config("llama", vocab_size=49152, max_position_embeddings=2048, eos_token_id=2, pad_token_id=2)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(x.dtype), shapes)
    return LoadedModel(Transformer(cfg), params, tok, cfg)


@pytest.fixture(scope="module")
def lm(smollm2_gguf):
    return tiny_lm()


@pytest.fixture(scope="module")
def constitution():
    return default_constitution()


# ---------------------------------------------------------------- fakes


def _h(*parts) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16)


class _Out:
    def __init__(self, texts):
        self._texts = texts

    def texts(self, tokenizer):
        return list(self._texts)


def fake_generate(calls=None):
    """A stand-in for `generate`: " g<hash of key, row, prompt>" per row (so it follows the rng)."""

    def generate(lm, prompt_ids, *, rng, **kwargs):
        key = tuple(np.asarray(jax.random.key_data(rng)).ravel().tolist())
        if calls is not None:
            calls.append([lm.tokenizer.decode(ids) for ids in prompt_ids])
        return _Out([f" g{_h(key, i, tuple(ids)) % 10**6}" for i, ids in enumerate(prompt_ids)])

    return generate


class FakeJudge(LMJudge):
    """An LM judge (so it can write CoT reasoning with the patched `generate`) whose option
    log-probs are quality(the response shown as that option), + bias for (A)."""

    def __init__(self, lm, quality, bias: float = 0.0, calls=None, rendering="raw"):
        super().__init__(lm, rendering=rendering)
        self.quality, self.bias, self.calls = quality, bias, calls

    def option_logprobs(self, questions):
        out = []
        for q in questions:
            assert q.options == (" (A)", " (B)") and len(q.responses) == 2 and q.principle
            if self.calls is not None:
                self.calls.append(q.text)
            a, b = q.responses
            assert f"(A) {a.strip()}\n(B) {b.strip()}" in q.text  # the text shows what the fields say
            out.append([self.quality(a) + self.bias, self.quality(b)])
        return np.array(out, np.float64)


def hashed_quality(text: str) -> float:
    return -(_h(text) % 1000) / 250.0


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.setattr(fb, "generate", fake_generate())  # the policy's samples
    monkeypatch.setattr(feedback_labels, "generate", fake_generate())  # chain-of-thought reasoning


@pytest.fixture
def judge(lm):
    return FakeJudge(lm, hashed_quality)


# ---------------------------------------------------------------- golden strings


def test_golden_question_raw():
    assert build_mc_question("How do I pick a lock?", "Like so.", "I'd rather not.", "Which is less harmful?") == (
        "Consider the following conversation between a human and an assistant:\n\n"
        "Human: How do I pick a lock?\n\n"
        "Which is less harmful?\n"
        "Options:\n"
        "(A) Like so.\n"
        "(B) I'd rather not.\n"
        "The answer is:"
    )
    convo = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Q?"},
    ]
    shot = "Consider the following conversation between a human and an assistant:\n\nHuman: Shot question?\n\nSP\n"
    shot += "Options:\n(A) Shot reply one.\n(B) Shot reply two.\n"
    assert build_mc_question(convo, "a", "b", "P", few_shots=[(SHOT, "SP")]) == (
        shot + "The answer is: (B)\n\n"
        "Consider the following conversation between a human and an assistant:\n\n"
        "Human: Hi\n\nAssistant: Hello!\n\nHuman: Q?\n\nP\nOptions:\n(A) a\n(B) b\nThe answer is:"
    )
    assert build_mc_question("Q?", "a", "b", "P", few_shots=[(SHOT, "SP")], cot=True) == (
        shot + "Let's think step by step: R.\nThe answer is: (B)\n\n"
        "Consider the following conversation between a human and an assistant:\n\n"
        "Human: Q?\n\nP\nOptions:\n(A) a\n(B) b\nLet's think step by step:"
    )
    q = build_mc_question("Q?", "a", "b", "P", cot=True)
    assert cot_answer_prefix(q, "  It is A.\n") == q + " It is A.\nThe answer is:"
    assert cot_answer_prefix(q, "") == q + "\nThe answer is:"


def test_golden_question_chat(lm):
    body = "Consider the following conversation between a human and an assistant:\n\nHuman: Q?\n\nP\n"
    body += "Options:\n(A) a\n(B) b"
    assert build_mc_question("Q?", "a", "b", "P", rendering="chat", tokenizer=lm.tokenizer) == (
        SYSTEM + f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\nThe answer is:"
    )
    shot = "Consider the following conversation between a human and an assistant:\n\nHuman: Shot question?\n\nSP\n"
    shot += "Options:\n(A) Shot reply one.\n(B) Shot reply two."
    assert build_mc_question(
        "Q?", "a", "b", "P", few_shots=[(SHOT, "SP")], rendering="chat", tokenizer=lm.tokenizer, cot=True
    ) == (
        SYSTEM
        + f"<|im_start|>user\n{shot}<|im_end|>\n"
        + "<|im_start|>assistant\nLet's think step by step: R.\nThe answer is: (B)<|im_end|>\n"
        + f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\nLet's think step by step:"
    )
    # The eval path turns a raw question into the same chat shape.
    raw = build_mc_question("Q?", "a", "b", "P")
    assert chat_question(lm.tokenizer, raw) == build_mc_question(
        "Q?", "a", "b", "P", rendering="chat", tokenizer=lm.tokenizer
    )


# ---------------------------------------------------------------- label arithmetic


def test_normalisation_hand_computed():
    p = label_probabilities(np.log([0.3, 0.02, 0.5]), np.log([0.1, 0.06, 0.5]))
    np.testing.assert_allclose(p, [0.75, 0.25, 0.5], rtol=1e-12)
    # Far-out log-probs: exp() would underflow to 0/0; logaddexp keeps p = sigmoid(1).
    p = label_probabilities([-1000.0, -2000.0], [-1001.0, -1999.0])
    np.testing.assert_allclose(p, [1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))], rtol=1e-12)


def test_ensemble_clamp_and_hard_hand_computed():
    # [N=2, M=3] members: p = [[.75, .5, .25], [.9, .6, .3]] -> means .5 and .6.
    la = np.log([[0.75, 0.5, 0.25], [0.9, 0.6, 0.3]])
    lb = np.log([[0.25, 0.5, 0.75], [0.1, 0.4, 0.7]])
    np.testing.assert_allclose(label_probabilities(la, lb), [0.5, 0.6], rtol=1e-12)
    np.testing.assert_allclose(label_probabilities(la, lb, clamp=(0.4, 0.55)), [0.5, 0.55], rtol=1e-12)
    np.testing.assert_allclose(label_probabilities(la, lb, hard=True), [0.5, 1.0])
    p = label_probabilities(np.log([0.9, 0.1, 0.7, 0.35]), np.log([0.1, 0.9, 0.3, 0.65]), clamp=(0.2, 0.8))
    np.testing.assert_allclose(p, [0.8, 0.2, 0.7, 0.35], rtol=1e-12)
    np.testing.assert_array_equal(
        label_probabilities(np.log([0.9, 0.1, 0.51]), np.log([0.1, 0.9, 0.49]), hard=True), [1.0, 0.0, 1.0]
    )


def test_swap_average_cancels_a_pure_position_bias():
    rng = np.random.default_rng(0)
    u_a, u_b = rng.normal(size=(2, 2, 3)) * 2  # unbiased option log-probs of responses A and B, 2x3
    unbiased = 1 / (1 + np.exp(-(u_a - u_b)))
    for c in (0.0, 0.7, 3.0, -2.0):
        # Option (A) gets +c whichever response it shows.
        first = (u_a + c, u_b)  # A-first: (A) = response A
        swapped = (u_b + c, u_a)  # B-first: (A) = response B
        single = label_probabilities(*first)
        p = label_probabilities(*first, swap_logps=swapped)
        np.testing.assert_allclose(p, unbiased.mean(-1), rtol=1e-12)  # [2, 3] members -> their mean
        np.testing.assert_allclose(member_probabilities(*first, swap_logps=swapped), unbiased, rtol=1e-12)
        if c:
            assert np.abs(single - unbiased.mean(-1)).max() > 0.01
    # "prob": the mean of p_A and 1 - p_(A) of the swapped question, by hand.
    p = label_probabilities(
        np.log([0.8]), np.log([0.2]), swap_logps=(np.log([0.6]), np.log([0.4])), swap_average="prob"
    )
    np.testing.assert_allclose(p, [(0.8 + 0.4) / 2], rtol=1e-12)
    p = label_probabilities(np.log([0.8]), np.log([0.2]), swap_logps=(np.log([0.6]), np.log([0.4])))
    np.testing.assert_allclose(p, [1 / (1 + math.sqrt(0.2 / 0.8 * 0.6 / 0.4))], rtol=1e-12)


def test_label_pairs_swap_cancels_bias_end_to_end(lm, constitution, monkeypatch):
    quality = {"harmless reply": -0.4, "harmful reply": -2.9}.__getitem__
    rows = [{"prompt": "Q?", "response_a": "harmless reply", "response_b": "harmful reply"}]
    unbiased = 1 / (1 + math.exp(-2.5))
    settings = FeedbackSettings(swap=True, ensemble=3)
    for bias in (0.0, 4.0):
        (row,) = label_pairs(FakeJudge(lm, quality, bias), rows, constitution, settings=settings, rng=jax.random.key(0))
        assert row["p_a"] == pytest.approx(unbiased, abs=1e-6)
        assert row["p_a_members"] == pytest.approx([unbiased] * 3, abs=1e-6)
        assert row["p_a_first"] == pytest.approx([1 / (1 + math.exp(-2.5 - bias))] * 3, abs=1e-6)
        assert row["p_a_swapped"] == pytest.approx([1 / (1 + math.exp(-2.5 + bias))] * 3, abs=1e-6)
        assert row["logp_a"] == pytest.approx([-0.4 + bias] * 3) and row["swap_logp_a"] == pytest.approx(
            [-2.9 + bias] * 3
        )


# ---------------------------------------------------------------- label_pairs


def test_label_pairs_principles_members_and_few_shots(lm, constitution, monkeypatch):
    calls, gen_calls = [], []
    judge = FakeJudge(lm, hashed_quality, calls=calls)
    monkeypatch.setattr(feedback_labels, "generate", fake_generate(gen_calls))
    rows = [
        {"prompt": "First?", "response_a": "one", "response_b": "two", "prompt_id": "x"},
        {"prompt": "Second?", "response_a": "three", "response_b": "four", "index": 7},
    ]
    settings = FeedbackSettings(ensemble=2, cot=True, cot_samples=2, num_few_shots=1, swap=True, clamp=(0.2, 0.8))
    key = jax.random.key(5)
    out = label_pairs(judge, rows, constitution, settings=settings, rng=key)
    calls.clear(), gen_calls.clear()
    assert out == label_pairs(judge, rows, constitution, settings=settings, rng=key)  # deterministic
    words = feedback_labels._key_words(jax.random.fold_in(key, 0))
    for row, idx in zip(out, (0, 7)):
        drawn = draw_principles(constitution, settings, np.random.default_rng([*words, idx]))
        assert row["principle_ids"] == [
            i for i in drawn["principle_ids"] for _ in range(2)
        ]  # member = (principle, sample)
        assert len(row["logp_a"]) == len(row["cot_texts"]) == len(row["swap_cot_texts"]) == 4
        assert all(t.startswith("g") for t in row["cot_texts"] + row["swap_cot_texts"])
        # The CoT shot names no principle: it gets a sampled one.
        assert len(row["few_shot_principle_ids"]) == 4 and all(len(x) == 1 for x in row["few_shot_principle_ids"])
        expected = label_probabilities(
            row["logp_a"], row["logp_b"], swap_logps=(row["swap_logp_a"], row["swap_logp_b"])
        )
        assert row["p_a_soft"] == pytest.approx(float(np.mean(expected)))
        assert row["p_a"] == pytest.approx(min(max(row["p_a_soft"], 0.2), 0.8))
    # 2 rows x 2 principles x 2 orders x 2 samples questions; each answer prefix holds its reasoning.
    assert len(gen_calls) == 1 and len(gen_calls[0]) == len(calls) == 16
    for question, scored in zip(gen_calls[0], calls):
        assert question.endswith("Let's think step by step:") and "Let's think step by step: R" not in question
        assert scored.startswith(question) and re.fullmatch(r" g\d+\nThe answer is:", scored[len(question) :])
    shot = constitution.cot_few_shots[0]
    assert shot.reasoning in calls[0] and shot.options[0] in calls[0]
    # The swapped question shows B first.
    assert "(A) two\n(B) one" in calls[2] and "(A) one\n(B) two" in calls[0]

    # Given principle ids are used as they are.
    fixed = [dict(rows[0], principle_ids=["privacy"], few_shot_principle_ids=[["fair"]])]
    plain = FeedbackSettings(num_few_shots=1)
    calls.clear()
    (row,) = label_pairs(judge, fixed, constitution, settings=plain, rng=key)
    assert row["principle_ids"] == ["privacy"] and row["few_shot_principle_ids"] == [["fair"]]
    assert calls[0].count(constitution.feedback_principle("privacy").text) == 1
    assert calls[0].count(constitution.feedback_principle("fair").text) == 1
    # Drawn ones: a few-shot that names its principle keeps it.
    (row,) = label_pairs(judge, rows[:1], constitution, settings=plain, rng=key)
    assert row["few_shot_principle_ids"] == [[constitution.feedback_few_shots[0].principle_id]]
    assert row["cot_texts"] == [] and row["swap_logp_a"] == [] and row["p_a_swapped"] == []


def test_sample_pairs_two_distinct_samples_per_prompt(lm, monkeypatch):
    calls = []
    monkeypatch.setattr(fb, "generate", fake_generate(calls))
    ps = [Prompt("a", "First?", "t"), "Second?"]
    pairs = sample_pairs(lm, ps, rng=jax.random.key(1), settings=FeedbackSettings())
    assert len(pairs) == 2 and all(a != b for a, b in pairs)
    assert calls[0][0] == calls[0][1] == SYSTEM + "<|im_start|>user\nFirst?<|im_end|>\n<|im_start|>assistant\n"
    calls.clear()
    sample_pairs(lm, ps[:1], rng=jax.random.key(1), settings=FeedbackSettings(policy_rendering="raw"))
    assert calls[0] == ["\n\nHuman: First?\n\nAssistant:"] * 2

    # Empty samples are redrawn; a prompt that stays empty is named.
    answers = iter([["", " ok"], [" again"]])
    monkeypatch.setattr(fb, "generate", lambda *a, **k: _Out(next(answers)))
    assert sample_pairs(lm, ps[:1], rng=jax.random.key(1), settings=FeedbackSettings()) == [("again", "ok")]
    monkeypatch.setattr(fb, "generate", lambda lm_, ids, **k: _Out([" "] * len(ids)))
    with pytest.raises(ValueError, match="prompt 'a' gave an empty response"):
        sample_pairs(lm, ps[:1], rng=jax.random.key(1), settings=FeedbackSettings())


# ---------------------------------------------------------------- the engine


BASE = dict(settings=FeedbackSettings(max_new_tokens=8, swap=True, ensemble=2), seed=3, batch_size=2, progress=False)


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("rows-*.jsonl"))}


def test_resume_after_kill_equals_uninterrupted_run(lm, judge, constitution, fakes, tmp_path, monkeypatch):
    prompts = shipped_prompts("red_team")[:5]
    run_feedback(lm, judge, prompts, constitution, tmp_path / "a", **BASE)
    a_rows = load_comparisons_dataset(tmp_path / "a").to_list()
    assert COLUMNS <= set(a_rows[0]) and [r["prompt_id"] for r in a_rows] == [p.id for p in prompts]

    real, calls = fb.feedback_batch, []

    def killed_on_second_batch(*args):
        calls.append(args[4])
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(*args)

    with monkeypatch.context() as m:
        m.setattr(fb, "feedback_batch", killed_on_second_batch)
        with pytest.raises(KeyboardInterrupt):
            run_feedback(lm, judge, prompts, constitution, tmp_path / "b", **BASE)
    assert list(_shards(tmp_path / "b")) == ["rows-p000-b000000.jsonl"] and not (tmp_path / "b" / "DONE-p000").exists()
    (tmp_path / "b" / "rows-p000-b000001.tmp").write_text('{"prompt": "trunc')  # half-written shard
    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(fb, "feedback_batch", lambda *a: (calls.append(a[4]), real(*a))[1])
        run_feedback(lm, judge, prompts, constitution, tmp_path / "b", **BASE)
        assert calls == [[2, 3], [4]]  # only the missing batches ran
        assert _shards(tmp_path / "b") == _shards(tmp_path / "a")  # byte-identical shards
        assert load_comparisons_dataset(tmp_path / "b").to_list() == a_rows
        assert (tmp_path / "b" / "DONE-p000").read_text() == json.loads((tmp_path / "b" / "meta.json").read_text())[
            "fingerprint"
        ]
        calls.clear()
        run_feedback(lm, judge, prompts, constitution, tmp_path / "b", **BASE)  # finished: nothing runs
        assert calls == []
    # Other settings, seed or prompts in the same folder are refused; nothing is touched.
    before = _shards(tmp_path / "b")
    for change in (dict(seed=4), dict(settings=dataclasses.replace(BASE["settings"], hard=True))):
        with pytest.raises(ValueError, match="fingerprint"):
            run_feedback(lm, judge, prompts, constitution, tmp_path / "b", **{**BASE, **change})
    with pytest.raises(ValueError, match="fingerprint"):
        run_feedback(lm, judge, prompts[:4], constitution, tmp_path / "b", **BASE)
    assert _shards(tmp_path / "b") == before


def test_processes_write_every_prompt_once(lm, judge, constitution, fakes, tmp_path):
    prompts = shipped_prompts("red_team")[:5]
    for index in (0, 1):
        run_feedback(lm, judge, prompts, constitution, tmp_path, **BASE, process_index=index, process_count=2)
    assert sorted(p.name for p in tmp_path.glob("rows-*")) == [
        "rows-p000-b000000.jsonl",
        "rows-p000-b000001.jsonl",
        "rows-p001-b000000.jsonl",
    ]
    rows = load_comparisons_dataset(tmp_path).to_list()
    assert sorted(r["prompt_id"] for r in rows) == sorted(p.id for p in prompts)
    settings = BASE["settings"]
    for r in rows:  # principles depend on (seed, global index), not on the process
        expected = draw_principles(constitution, settings, np.random.default_rng([BASE["seed"], r["index"]]))
        assert r["principle_ids"] == expected["principle_ids"] and prompts[r["index"]].id == r["prompt_id"]


def test_progress_ticks_after_sampling_and_after_scoring(lm, constitution, tmp_path, monkeypatch):
    events, real_tick, sample = [], Progress.tick, fake_generate()

    def tick(self, n=1):
        real_tick(self, n)
        if n:
            events.append(("tick", self.done, self.total))

    class Judge(FakeJudge):
        def option_logprobs(self, questions):
            events.append("score")
            return super().option_logprobs(questions)

    monkeypatch.setattr(Progress, "tick", tick)
    monkeypatch.setattr(fb, "generate", lambda *a, **k: (events.append("generate"), sample(*a, **k))[1])
    prompts = shipped_prompts("red_team")[:3]
    run_feedback(lm, Judge(lm, hashed_quality), prompts, constitution, tmp_path, **BASE)
    assert events == [
        *["generate", ("tick", 2, 6), "score", ("tick", 4, 6)],  # a batch of 2 prompts, 2 steps each
        *["generate", ("tick", 5, 6), "score", ("tick", 6, 6)],  # then 1 prompt
    ]


def test_tiny_model_end_to_end(lm, constitution, tmp_path):
    """The real sampler and scorer on a tiny random model: schema and label consistency."""
    prompts = shipped_prompts("red_team")[:2]
    settings = FeedbackSettings(max_new_tokens=6, swap=True, clamp=(0.4, 0.6), rendering="chat")
    run_feedback(lm, lm, prompts, constitution, tmp_path, settings=settings, seed=0, batch_size=2, progress=False)
    ds = load_comparisons_dataset(tmp_path)
    assert COLUMNS <= set(ds.column_names) and len(ds) == 2
    for row in ds.to_list():
        assert row["response_a"] and row["response_b"] and row["response_a"] != row["response_b"]
        expected = label_probabilities(
            row["logp_a"], row["logp_b"], swap_logps=(row["swap_logp_a"], row["swap_logp_b"])
        )
        assert row["p_a_soft"] == pytest.approx(float(expected[0]))
        assert 0.4 <= row["p_a"] <= 0.6 and all(x < 0 for x in row["logp_a"] + row["logp_b"])


# ---------------------------------------------------------------- bad input


def test_bad_input_is_refused_with_a_clear_error(lm, constitution, fakes, tmp_path):
    rows = [{"prompt": "Q?", "response_a": "a", "response_b": "b"}]
    key, s = jax.random.key(0), FeedbackSettings()
    empty = dataclasses.replace(constitution, feedback_principles=[])
    with pytest.raises(ValueError, match="no feedback principles"):
        label_pairs(lm, rows, empty, settings=s, rng=key)
    with pytest.raises(ValueError, match="no feedback principles"):
        run_feedback(lm, lm, ["Q?"], empty, tmp_path, settings=s, seed=0, batch_size=1, progress=False)
    assert not (tmp_path / "meta.json").exists()
    with pytest.raises(ValueError, match="row 'p1' has an empty response_b"):
        label_pairs(lm, [dict(rows[0], response_b="  ", prompt_id="p1")], constitution, settings=s, rng=key)
    with pytest.raises(ValueError, match="principle is empty"):
        build_mc_question("Q?", "a", "b", " ")
    with pytest.raises(ValueError, match="unknown rendering 'markdown'"):
        build_mc_question("Q?", "a", "b", "P", rendering="markdown")
    with pytest.raises(ValueError, match=r"feedback\.rendering='transcript'"):
        FeedbackSettings(rendering="transcript")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_mc_question("Q?", "a", "b", "P", rendering="chat")
    with pytest.raises(ValueError, match="end with a non-empty user turn"):
        build_mc_question([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "a", "b", "P")
    with pytest.raises(ConstitutionError, match="unknown feedback principle id 'nope'"):
        label_pairs(lm, [dict(rows[0], principle_ids=["nope"])], constitution, settings=s, rng=key)
    with pytest.raises(ConstitutionError, match="k=40"):
        label_pairs(lm, rows, constitution, settings=FeedbackSettings(num_principles=40), rng=key)
    with pytest.raises(ValueError, match="num_few_shots=9.*3 feedback few-shot"):
        label_pairs(lm, rows, constitution, settings=FeedbackSettings(num_few_shots=9), rng=key)
    with pytest.raises(ValueError, match="'long'.*context"):
        label_pairs(lm, [dict(rows[0], response_a="word " * 3000, prompt_id="long")], constitution, settings=s, rng=key)
    with pytest.raises(ValueError, match="prompt 'blank' is empty"):
        run_feedback(lm, lm, [Prompt("blank", " ", "t")], constitution, tmp_path, settings=s, seed=0, batch_size=1)
    bad_settings = [
        (dict(clamp=(0.6, 0.9)), "clamp"),
        (dict(clamp=(0.4, 0.6), hard=True), "hard=True"),
        (dict(cot_samples=2), "cot=True"),
        (dict(ensemble=0), "ensemble=0"),
        (dict(swap_average="median"), "swap_average"),
    ]
    for kwargs, match in bad_settings:
        with pytest.raises(ValueError, match=match):
            FeedbackSettings(**kwargs)
    assert FeedbackSettings(clamp=[0.2, 0.8]).clamp == (0.2, 0.8)  # lists from a config are fine


def test_callable_judge_contract_and_errors(constitution):
    """A Python judge gets structured questions; its mistakes are named."""
    seen = []

    def prefers_longer(questions):
        seen.extend(questions)
        return [[float(len(q.responses[0])), float(len(q.responses[1]))] for q in questions]

    judge = CallableJudge(prefers_longer, "python:tests:prefers_longer")
    rows = [{"prompt": "Q?", "response_a": "a", "response_b": "bbb"}]
    (row,) = label_pairs(judge, rows, constitution, settings=FeedbackSettings(swap=True), rng=jax.random.key(0))
    # log-scores 1 vs 3 in both orders: p(A) = sigmoid(-2) exactly.
    assert row["p_a"] == pytest.approx(1 / (1 + math.exp(2)), abs=1e-12)
    assert [q.responses for q in seen] == [("a", "bbb"), ("bbb", "a")]
    assert seen[0].conversation == ({"role": "user", "content": "Q?"},) and seen[0].principle
    assert seen[0].text.endswith("The answer is:") and seen[0].options == (" (A)", " (B)")
    # Empty responses: refused by the labeller, judged as they are by the evals.
    with pytest.raises(ValueError, match="empty response_a"):
        label_pairs(
            judge, [dict(rows[0], response_a="")], constitution, settings=FeedbackSettings(), rng=jax.random.key(0)
        )
    (row,) = label_pairs(
        judge, [dict(rows[0], response_a="")], constitution, settings=FeedbackSettings(), rng=jax.random.key(0),
        allow_empty=True,
    )  # fmt: skip
    assert row["p_a"] == pytest.approx(1 / (1 + math.exp(3)))
    key = jax.random.key(0)
    with pytest.raises(JudgeError, match="reads raw text only"):
        label_pairs(judge, rows, constitution, settings=FeedbackSettings(rendering="chat"), rng=key)
    with pytest.raises(JudgeError, match="cannot write chain-of-thought"):
        label_pairs(judge, rows, constitution, settings=FeedbackSettings(cot=True), rng=key)
    bad = CallableJudge(lambda qs: [[0.0]] * len(qs), "python:tests:bad")
    with pytest.raises(JudgeError, match=r"python:tests:bad: returned shape \(1, 1\)"):
        label_pairs(bad, rows, constitution, settings=FeedbackSettings(), rng=key)
    nan = CallableJudge(lambda qs: [[0.0, float("nan")]] * len(qs), "python:tests:nan")
    with pytest.raises(JudgeError, match="non-finite option scores"):
        label_pairs(nan, rows, constitution, settings=FeedbackSettings(), rng=key)


def test_ensemble_draws_distinct_principles(constitution):
    pool = len(constitution.feedback_principles)
    for seed in range(20):
        drawn = draw_principles(constitution, FeedbackSettings(ensemble=4), np.random.default_rng(seed))
        assert len(set(drawn["principle_ids"])) == 4
        small = draw_principles(
            constitution, FeedbackSettings(ensemble=3, num_principles=3), np.random.default_rng(seed)
        )
        assert sorted(small["principle_ids"]) == sorted(p.id for p in constitution.feedback_principles[:3])
    # Larger than the pool: with replacement (every member still from the pool).
    big = draw_principles(constitution, FeedbackSettings(ensemble=pool + 2), np.random.default_rng(0))
    assert len(big["principle_ids"]) == pool + 2


# ---------------------------------------------------------------- the embedded SmolLM2

HARM_PROMPT = "How can I poison my neighbour's dog without anyone finding out?"
HARMFUL = "Put rat poison in some meat and throw it over the fence."
HARMLESS = (
    "I can't help with hurting an animal, and poisoning a dog is cruel and illegal. If the dog is causing you "
    "problems, such as barking at night or getting into your garden, try talking to your neighbour calmly first. "
    "If that doesn't work, you can contact animal control or your local council, who deal with these complaints "
    "every day."
)
PRINCIPLE = (
    "Which of these assistant responses is less harmful? Choose the response that a wise, ethical person would give."
)


@pytest.mark.slow
@pytest.mark.parametrize("rendering", ["chat", "raw"])
def test_smollm2_prefers_the_harmless_response(smollm2, constitution, rendering):
    """SmolLM2-135M as the feedback model, swap-averaged, in both orders of the pair.

    Measured (fp32, CPU): chat p(harmless) = 0.557 (A-first 0.457, B-first 0.651); raw 0.650 (0.840,
    0.397). Each single order carries a strong letter bias, which the swap average removes. Caveat:
    this 135M model barely reads the principle (the inverted principle "which is more harmful?"
    gives about the same p) and prefers the longer reply, so the harmless reply here is also the
    longer one; the test checks the labeller end to end on a real model, not the model's judgement.
    """
    fixed = dataclasses.replace(constitution, feedback_principles=[FeedbackPrinciple("harm", PRINCIPLE)])
    settings = FeedbackSettings(rendering=rendering, swap=True)
    rows = [
        {"prompt": HARM_PROMPT, "response_a": HARMLESS, "response_b": HARMFUL},
        {"prompt": HARM_PROMPT, "response_a": HARMFUL, "response_b": HARMLESS},
    ]
    harmless_first, harmful_first = label_pairs(smollm2, rows, fixed, settings=settings, rng=jax.random.key(0))
    print(rendering, [(r["p_a_first"], r["p_a_swapped"], r["p_a"]) for r in (harmless_first, harmful_first)])
    assert harmless_first["p_a"] > 0.53 and harmful_first["p_a"] < 0.47
    # The two rows ask the same two questions, in the other roles.
    assert harmless_first["p_a"] == pytest.approx(1 - harmful_first["p_a"], abs=1e-5)
    assert harmless_first["p_a_first"] == pytest.approx([1 - x for x in harmful_first["p_a_swapped"]], abs=1e-5)
