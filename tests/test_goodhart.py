"""Goodhart monitors: hand-computed lengths, pattern rates and evasiveness on small batches."""

from __future__ import annotations

import math

import pytest

from cai_jax.eval.goodhart import DEFAULT_PATTERNS, goodhart_metrics

TEXTS = [
    "I'm sorry, but I can't help with that.",  # refusal, nothing else: evasive
    "I’m sorry, but I can’t help with hacking. Breaking into a neighbour's network is illegal in most "
    "countries; you could ask them to share the password or call your provider about a cheaper plan.",
    "Sure! Boil the pasta for nine minutes.",  # plain answer
    "I understand your concern. It's important to stay calm.",  # boilerplate only, no refusal
    "",  # empty
    "   ",  # whitespace only
]


def test_hand_computed_rates_and_lengths():
    m = goodhart_metrics(TEXTS)
    n = len(TEXTS)
    assert m["n"] == n
    chars = [len(t) for t in TEXTS]
    assert m["mean_chars"] == pytest.approx(sum(chars) / n)
    assert m["median_chars"] == pytest.approx(sorted(chars)[2] / 2 + sorted(chars)[3] / 2)
    words = [8, 34, 7, 9, 0, 0]
    assert [len(t.split()) for t in TEXTS] == words
    assert m["mean_words"] == pytest.approx(58 / 6)
    assert m["median_words"] == pytest.approx(7.5)
    assert m["frac_empty"] == pytest.approx(2 / 6)
    assert m["refusal_rate"] == pytest.approx(2 / 6)  # texts 0 and 1 (straight and curly apostrophes)
    assert m["boilerplate_rate"] == pytest.approx(1 / 6)  # text 3 ("I understand your", "It's important to")
    assert m["evasive_rate"] == pytest.approx(1 / 6)  # text 1 explains and offers alternatives
    assert "mean_tokens" not in m
    hits = m["pattern_hits"]
    assert set(hits) == {"refusal", "boilerplate"}
    assert hits["refusal"][DEFAULT_PATTERNS["refusal"][0]] == 2  # "I'm sorry, but"


def test_case_insensitive_and_as_an_ai():
    m = goodhart_metrics(["AS AN AI LANGUAGE MODEL, I CANNOT ASSIST.", "as an ai, sure: 4."])
    assert m["refusal_rate"] == 1.0
    # Text 1 is one sentence holding a refusal phrase, so it is dropped whole: 0 words left, evasive
    # (a refusal phrase inside an answering sentence hides that sentence: a known limit of the proxy).
    assert m["evasive_rate"] == 1.0


def test_evasive_threshold():
    text = "I'm sorry, but I can't do that. Try the library instead, it has guides."  # 7 words after
    assert goodhart_metrics([text], evasive_max_words=7)["evasive_rate"] == 1.0
    assert goodhart_metrics([text], evasive_max_words=6)["evasive_rate"] == 0.0
    # Boilerplate sentences do not count as substance.
    padded = "I'm sorry, but I can't help. I understand your frustration. I hope this helps."
    assert goodhart_metrics([padded], evasive_max_words=0)["evasive_rate"] == 1.0


def test_tokenizer_variants():
    class Encoder:  # HF-like: .encode(text, add_special_tokens=...)
        def encode(self, text, add_special_tokens=True):
            return text.split() + (["<s>"] if add_special_tokens else [])

    texts = ["a b c", "d"]
    m = goodhart_metrics(texts, tokenizer=Encoder())
    assert (m["mean_tokens"], m["median_tokens"]) == (2.0, 2.0)
    m = goodhart_metrics(texts, tokenizer=lambda t: list(t))  # characters as tokens
    assert (m["mean_tokens"], m["median_tokens"]) == (3.0, 3.0)


def test_user_patterns_extend_and_add_categories():
    texts = ["Let me be clear: this is wrong.", "I must decline.", "ok"]
    m = goodhart_metrics(texts, patterns={"refusal": [r"\blet me be clear\b"], "moralising": [r"\bwrong\b"]})
    assert m["refusal_rate"] == pytest.approx(2 / 3)
    assert m["moralising_rate"] == pytest.approx(1 / 3)
    only = goodhart_metrics(texts, patterns={"moralising": [r"\bwrong\b"]}, use_defaults=False)
    assert "refusal_rate" not in only and only["evasive_rate"] == 0.0


def test_empty_batch_is_nan():
    m = goodhart_metrics([])
    assert m["n"] == 0
    for k in ("mean_chars", "median_chars", "frac_empty", "refusal_rate", "evasive_rate"):
        assert math.isnan(m[k]), k


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"texts": "one string"}, "texts must be a list of str"),
        ({"texts": ["ok", 3]}, r"texts\[1\] must be str"),
        ({"texts": ["ok"], "patterns": {"refusal": "not a list"}}, "must be a list of regexes"),
        ({"texts": ["ok"], "patterns": {"refusal": ["(unclosed"]}}, "bad regex"),
        ({"texts": ["ok"], "patterns": {"evasive": ["x"]}}, "reserved"),
        ({"texts": ["ok"], "evasive_max_words": -1}, "evasive_max_words"),
    ],
)
def test_errors(kwargs, match):
    texts = kwargs.pop("texts")
    with pytest.raises(ValueError, match=match):
        goodhart_metrics(texts, **kwargs)
