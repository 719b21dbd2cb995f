"""The HTTP judge: option spans in echoed completions (hand-made answers), and a real server on
127.0.0.1 (tests/judge_server.py, the embedded SmolLM2 through cai_jax) against the in-process
judge, with dropped, failing, slow and log-prob-less servers and one that is down."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from cai_jax.cai import feedback_probs as fb
from cai_jax.cai.judge import CallableJudge, JudgeError, JudgeQuestion, LMJudge
from cai_jax.cai.judge_http import HTTPJudge, option_span
from cai_jax.cai.judge_loading import load_judge
from tests.judge_server import Faults, make_server
from tests.test_scoring import _embedded_questions

TOL = 1e-4  # the bound: a full forward on the server vs the shared-prefix path here (fp32)


def _logprobs(tokens, values=None, shift=None):
    """An echoed "logprobs" object; `shift` = (index, chars) adds chars to every offset from index on."""
    offsets = np.cumsum([0] + [len(t) for t in tokens])[:-1]
    if shift:
        offsets[shift[0] :] += shift[1]
    values = values if values is not None else [None] + [-0.5] * (len(tokens) - 1)
    return {"tokens": tokens, "token_logprobs": values, "text_offset": offsets.tolist()}


# ---------------------------------------------------------------- option spans


def test_option_span_hand_made():
    prompt_tokens = ["The", " answer", " is", ":", " (", "A", ")"]
    lp = _logprobs(prompt_tokens + [" Yes"])
    assert option_span(lp, " (A)", 1, len("".join(prompt_tokens))) == (4, 7)
    # Without usage, tokens starting past the prompt are the generated ones.
    assert option_span(lp, " (A)", None, len("".join(prompt_tokens))) == (4, 7)
    assert option_span(_logprobs(prompt_tokens), " (A)", 0, 0) == (4, 7)
    # A multi-byte character decoded as two replacement characters shifts every later offset.
    assert option_span(_logprobs(prompt_tokens + [" Yes"], shift=(2, 3)), " (A)", 1, 0) == (4, 7)
    # A token straddling the question/option boundary belongs to the option.
    assert option_span(_logprobs(["The", " answer", " is", ": (", "A", ")", "!"]), " (A)", 1, 0) == (3, 6)
    with pytest.raises(ValueError, match="do not end with the option"):
        option_span(_logprobs(prompt_tokens + [" Yes"]), " (B)", 1, 0)
    with pytest.raises(ValueError, match="lacks tokens"):
        option_span({"tokens": ["x"]}, " (A)", 1, 0)
    with pytest.raises(ValueError, match="differ"):
        option_span({"tokens": ["a", "b"], "token_logprobs": [None], "text_offset": [0, 1]}, " (A)", 1, 0)
    with pytest.raises(ValueError, match="1 tokens for the prompt"):
        option_span(_logprobs([" Yes"]), " (A)", 1, 0)  # llama-server: the generated token only


def test_options_of_a_question_are_scored_from_one_start(monkeypatch):
    """Option (B)'s first token straddles the boundary: both options are summed from there, the
    tokens before it must agree, and the first prompt token (no log-prob) is never part of one."""
    echoes = {
        " (A)": (["Q", " is", ":", " (", "A", ")"], [None, -1.0, -2.0, -3.0, -4.0, -5.0]),
        " (B)": (["Q", " is", ": (", "B", ")"], [None, -1.0, -2.5, -3.5, -4.5]),
    }

    def echo(self, prompt, option, model):
        tokens, values = echoes[option]
        return tokens, values, option_span(_logprobs(tokens, values), option, 0, 0)[0]

    monkeypatch.setattr(HTTPJudge, "_echo", echo)
    judge = HTTPJudge("http://127.0.0.1:9", model="m")
    got = judge.option_logprobs([JudgeQuestion("Q is:", (" (A)", " (B)"))])
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, [[-2.0 - 3.0 - 4.0 - 5.0, -2.5 - 3.5 - 4.5]])
    echoes[" (B)"] = (["R", " is", ": (", "B", ")"], [None, -1.0, -2.5, -3.5, -4.5])
    with pytest.raises(JudgeError, match="tokenised its text differently per option"):
        judge.option_logprobs([JudgeQuestion("Q is:", (" (A)", " (B)"))])
    echoes[" (A)"] = ([" (", "A", ")"], [None, -1.0, -2.0])
    echoes[" (B)"] = ([" (", "B", ")"], [None, -1.0, -2.0])
    with pytest.raises(JudgeError, match="start at the prompt's first token"):
        judge.option_logprobs([JudgeQuestion("", (" (A)", " (B)"))])


def test_load_judge_dispatch_and_bad_settings():
    assert isinstance(load_judge("http://127.0.0.1:9", http={"model": "m"}), HTTPJudge)
    assert isinstance(load_judge("python:tests.test_judge_http:_prefers_a"), CallableJudge)
    assert isinstance(load_judge("any", lm=_FakeLoaded()), LMJudge)
    with pytest.raises(JudgeError, match="unexpected keyword"):
        load_judge("http://127.0.0.1:9", http={"tries": 3})
    with pytest.raises(JudgeError, match="retries=-1"):
        HTTPJudge("http://127.0.0.1:9", retries=-1)
    with pytest.raises(JudgeError, match="expected an http"):
        HTTPJudge("ftp://x")
    assert HTTPJudge("http://h:1/v1/").base == HTTPJudge("http://h:1").base == "http://h:1"


def _prefers_a(questions):
    return [[0.0, -1.0] for _ in questions]


class _FakeLoaded:
    tokenizer = None


# ---------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def serve(smollm2):
    """`serve(faults)` -> (server, url): tests/judge_server.py on 127.0.0.1, stopped after the module."""
    started = []

    def start(faults: Faults | None = None):
        server = make_server(smollm2, faults=faults)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return server, f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def questions():
    return _embedded_questions(2)[:2] + _embedded_questions(9)[:1]


@pytest.fixture(scope="module")
def local(smollm2, questions):
    """The in-process judge's option log-probs, per option count."""
    judge = LMJudge(smollm2, batch_size=4)
    return {k: judge.option_logprobs([q for q in questions if len(q.options) == k]) for k in (2, 9)}


def _ask(judge, questions):
    return {k: judge.option_logprobs([q for q in questions if len(q.options) == k]) for k in (2, 9)}


@pytest.mark.slow
def test_http_judge_equals_in_process_judge(serve, questions, local):
    server, url = serve()
    judge = load_judge(url)  # the model name comes from GET /v1/models
    got = _ask(judge, questions)
    assert judge._model == "judge" and server.requests["n"] == 2 * 2 + 9
    for k in (2, 9):
        assert got[k].dtype == np.float64 and got[k].shape == local[k].shape
        np.testing.assert_allclose(got[k], local[k], rtol=0, atol=TOL)
    # The labels the labeller makes from them (p of option (A) among the two).
    p_http = fb.member_probabilities(got[2][:, 0], got[2][:, 1])
    p_local = fb.member_probabilities(local[2][:, 0], local[2][:, 1])
    np.testing.assert_allclose(p_http, p_local, rtol=0, atol=TOL)


@pytest.mark.slow
def test_http_judge_survives_dropped_failed_and_slow_requests(serve, questions, local):
    _, url = serve()
    _ask(HTTPJudge(url, model="judge"), questions)  # compiles the server's programs (shared by its servers)
    faults = Faults(drop={1}, status={3: 503}, delay={5: 12.0})
    server, url = serve(faults)
    judge = HTTPJudge(url, timeout=6.0, retries=3, backoff=0.01, concurrency=1)  # no queueing on the server
    got = _ask(judge, questions)
    assert server.requests["n"] == 2 * 2 + 9 + 3  # three requests answered on a retry
    for k in (2, 9):
        np.testing.assert_allclose(got[k], local[k], rtol=0, atol=TOL)


@pytest.mark.slow
def test_http_judge_errors_name_the_server(serve, questions):
    two = [q for q in questions if len(q.options) == 2]
    # Answers two requests, then fails every later one: the call raises, returning nothing
    # (the labeller writes a shard only from a finished batch, so no partial shard).
    server, url = serve(Faults(fail_from=2))
    judge = HTTPJudge(url, model="judge", retries=2, backoff=0.01, concurrency=1)
    with pytest.raises(
        JudgeError, match=rf"judge {url}: no answer from {url}/v1/completions after 3 attempts \(HTTP 503"
    ):
        judge.option_logprobs(two)
    assert server.requests["n"] == 2 + 3
    # A client error is not retried.
    server, url = serve(Faults(status={0: 400}))
    with pytest.raises(JudgeError, match=rf"judge {url}: /v1/completions answered HTTP 400"):
        HTTPJudge(url, model="judge", retries=3, backoff=0.01, concurrency=1).option_logprobs(two[:1])
    # One request at a time, so the count is exact: the first try failed and was not retried (with
    # concurrent requests the second option's may or may not reach the server before the raise).
    assert server.requests["n"] == 1
    # A server like llama-server, without prompt log-probs.
    _, url = serve(Faults(generated_logprobs_only=True))
    with pytest.raises(JudgeError, match=rf"judge {url}: /v1/completions does not return the prompt log-probs"):
        HTTPJudge(url, model="judge").option_logprobs(two[:1])


def test_down_server_raises_after_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    url = f"http://127.0.0.1:{port}"
    judge = HTTPJudge(url, retries=2, backoff=0.01)
    with pytest.raises(JudgeError, match=rf"judge {url}: no answer from {url}/v1/models after 3 attempts \(URLError"):
        judge.option_logprobs([JudgeQuestion("Q:", (" (A)", " (B)"))])
    judge = HTTPJudge(url, model="m", retries=1, backoff=0.01)
    with pytest.raises(JudgeError, match=rf"no answer from {url}/v1/completions after 2 attempts"):
        judge.option_logprobs([JudgeQuestion("Q:", (" (A)", " (B)"))])
