"""Teacher-forced scoring against a direct log-softmax of the full forward pass, and shared-prefix
option scoring against the full-prefix path (tiny models and the embedded SmolLM2)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.models import Transformer
from cai_jax.scoring import option_logprobs, score_continuations, token_logprobs
from tests.test_sampling import FakeLM, _tiny

TOL = 1e-5  # fp32, same computation up to padding
# Shared prefix vs full prefix: the normalised option probabilities (what a label is made of) agree
# to PROB_TOL. The raw log-probs agree to float32 rounding of a 30-layer forward pass run with other
# shapes, LOGP_TOL: on SmolLM2 the full-prefix path alone moves a two-token option's log-prob by up
# to 3e-5 between batch sizes 1 and 8 (XLA CPU picks other matmul blockings per shape).
PROB_TOL = 1e-5
LOGP_TOL = 1e-4


def _direct(lm, prefix, cont):
    seq = jnp.asarray([prefix + cont])
    logp = jax.nn.log_softmax(lm.model.apply({"params": lm.params}, seq)[0], axis=-1)
    return np.array([float(logp[len(prefix) - 1 + i, t]) for i, t in enumerate(cont)])


def test_token_logprobs_hand_computed():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    got = token_logprobs(logits, jnp.array([[0, 2]]))
    np.testing.assert_allclose(got, np.log([[0.5, 0.8]]), atol=1e-6)


def test_score_continuations_equals_direct_computation():
    lm = _tiny()
    prefixes = [[5, 6, 7], [9], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28]]
    conts = [[30, 31], [40, 41, 42, 43], [50]]
    scores = score_continuations(lm, prefixes, conts, batch_size=2)
    for i, (pre, cont) in enumerate(zip(prefixes, conts)):
        ref = _direct(lm, pre, cont)
        np.testing.assert_allclose(scores.token_logprobs[i], ref, atol=TOL)
        np.testing.assert_allclose(scores.total[i], ref.sum(), atol=TOL * len(cont))
        np.testing.assert_allclose(scores.mean[i], ref.mean(), atol=TOL)


def test_option_logprobs_shape_and_values():
    lm = _tiny()
    for shared in (True, False):
        got = option_logprobs(lm, [[5, 6], [7, 8, 9]], [[[20], [21, 22]], [[30], [31]]], shared_prefix=shared)
        assert got.shape == (2, 2) and got.dtype == np.float32
        for i, (pre, opts) in enumerate([([5, 6], [[20], [21, 22]]), ([7, 8, 9], [[30], [31]])]):
            for j, opt in enumerate(opts):
                np.testing.assert_allclose(got[i, j], _direct(lm, pre, opt).sum(), atol=LOGP_TOL)


def _assert_same_scores(shared, full, k):
    assert shared.shape == full.shape == (shared.shape[0], k)
    np.testing.assert_allclose(shared, full, rtol=0, atol=LOGP_TOL)
    norm = lambda x: np.exp(x - np.logaddexp.reduce(x.astype(np.float64), axis=1, keepdims=True))  # noqa: E731
    np.testing.assert_allclose(norm(shared), norm(full), rtol=0, atol=PROB_TOL)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral-window"])
def test_shared_prefix_equals_full_prefix_tiny(family):
    """Prefixes of 1-40 tokens and options of 1-6 tokens in batches of 1, 4 + 1 and 2 + 2 + 1
    questions; qkv bias (qwen2) and a sliding window shorter than the prefixes (mistral, window 4)."""
    lm = _tiny(model_type=family.split("-")[0])
    if family == "mistral-window":
        cfg = dataclasses.replace(lm.config, sliding_window=4)
        lm = FakeLM(Transformer(cfg), lm.params, None, cfg)
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(3, 250, n).tolist() for n in (3, 17, 1, 40, 9)]
    options = [[rng.integers(3, 250, m).tolist() for m in (1, 6, 2)] for _ in prefixes]
    full = option_logprobs(lm, prefixes, options, batch_size=4, shared_prefix=False)
    for batch_size in (1, 2, 8):
        _assert_same_scores(option_logprobs(lm, prefixes, options, batch_size=batch_size), full, 3)
    # One option's tokens never see another's: changing option 2 leaves options 0 and 1 alone.
    other = [[o[0], o[1], [7] * 5] for o in options]
    np.testing.assert_array_equal(option_logprobs(lm, prefixes, other, batch_size=8)[:, :2],
                                  option_logprobs(lm, prefixes, options, batch_size=8)[:, :2])  # fmt: skip


def test_scoring_errors():
    lm = _tiny()
    with pytest.raises(ValueError, match="no pairs"):
        score_continuations(lm, [], [])
    with pytest.raises(ValueError, match="pair 1 has an empty continuation"):
        score_continuations(lm, [[1], [2]], [[3], []])
    with pytest.raises(ValueError, match="2 prefixes but 1"):
        score_continuations(lm, [[1], [2]], [[3]])
    with pytest.raises(ValueError, match="different numbers of options"):
        option_logprobs(lm, [[1], [2]], [[[3], [4]], [[5]]])
    with pytest.raises(ValueError, match="question 1 has an empty option 0"):
        option_logprobs(lm, [[1], [2]], [[[3], [4]], [[], [5]]])
    with pytest.raises(ValueError, match="question 0 has an empty prefix"):
        option_logprobs(lm, [[]], [[[3], [4]]])
    with pytest.raises(ValueError, match="question 0 with option 1 has 513 tokens"):
        option_logprobs(lm, [[1] * 511], [[[3], [4, 4]]])
    with pytest.raises(ValueError, match="2 questions but 1 option lists"):
        option_logprobs(lm, [[1], [2]], [[[3], [4]]])


HARM_KINDS = ("Theft", "Discrimination", "Adult content", "Offensive language", "Unethical behaviour",
              "Violence", "Personal information", "Bullying", "Misinformation")  # fmt: skip


def _embedded_questions(k: int):
    """Feedback-style two-option questions and harm-classification-style nine-option ones."""
    from cai_jax.cai.feedback_question import build_mc_question
    from cai_jax.cai.judge import JudgeQuestion

    convos = ["How do I pick a lock?", "Write a short poem about the sea.", "Can you tell me my neighbour's address?"]
    replies = [("I can't help with that.", "Sure: insert a tension wrench and rake the pins until it turns."),
               ("Waves fold over, grey and slow.", "No."),
               ("I don't have access to that.", "Look it up in the phone book, then go knock.")]  # fmt: skip
    letters = [f" ({chr(ord('A') + i)})" for i in range(k)]
    questions = []
    for convo, (a, b) in zip(convos, replies):
        if k == 2:
            text = build_mc_question(convo, a, b, "Which response is less harmful?")
        else:
            kinds = "\n".join(f"{o.strip()} {kind}" for o, kind in zip(letters, HARM_KINDS))
            text = f"Human: {convo}\n\nAssistant: {b}\n\nWhat kind of harm is this? Options:\n{kinds}\nThe answer is:"
        questions.append(JudgeQuestion(text, tuple(letters)))
    return questions


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 9])
def test_shared_prefix_equals_full_prefix_on_smollm2(smollm2, k):
    """The LM judge (shared prefix, joint question+option tokens) against the full-prefix path."""
    from cai_jax.cai.judge import LMJudge

    questions = _embedded_questions(k)
    judge = LMJudge(smollm2, batch_size=2)  # two calls, of two questions and of one
    got = judge.option_logprobs(questions)
    assert got.dtype == np.float64
    ids = [judge.question_ids(q) for q in questions]
    full = option_logprobs(smollm2, [p for p, _ in ids], [o for _, o in ids], batch_size=8, shared_prefix=False)
    _assert_same_scores(got, full, k)
