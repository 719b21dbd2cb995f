"""PMP data: the StackExchange score rule, loaders (raw and HF H4 layouts), answer pairs."""

from __future__ import annotations

import collections
import json

import pytest

from cai_jax.cai.pmp import (
    PMPAnswer,
    PMPQuestion,
    PMPSourceError,
    build_pmp_pairs,
    load_pmp_questions,
    pmp_score,
    shipped_pmp_sample,
)
from cai_jax.cai.prompts import PromptSourceError


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """Keeps the Arrow caches that `datasets` writes for data files inside the test's tmp folder."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return datasets


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _question(qid: str, scores: list[int]) -> PMPQuestion:
    answers = tuple(
        PMPAnswer(text=f"{qid} answer {i}", score=s, upvotes=None, accepted=False, answer_id=f"{qid}:{i}")
        for i, s in enumerate(scores)
    )
    return PMPQuestion(qid=qid, question=f"question {qid}?", answers=answers, source="test")


# --- score ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("upvotes", "accepted", "expected"),
    [
        (0, False, 0),  # log2(1) = 0
        (1, False, 1),  # log2(2) = 1
        (3, False, 2),  # log2(4) = 2
        (7, False, 3),  # log2(8) = 3
        (2, False, 2),  # log2(3) = 1.58 -> 2
        (4, False, 2),  # log2(5) = 2.32 -> 2
        (0, True, 1),
        (7, True, 4),
        (-2, False, -1),
        (-2, True, -1),  # negative votes give -1 even when accepted
        (-1, False, -1),
    ],
)
def test_pmp_score_hand_computed(upvotes, accepted, expected):
    assert pmp_score(upvotes, accepted) == expected


# --- loaders ----------------------------------------------------------------------------------


def test_shipped_sample_loads_and_covers_every_rule():
    qs = shipped_pmp_sample()
    assert len(qs) == 12
    assert all(2 <= len(q.answers) <= 5 for q in qs)
    assert len({q.qid for q in qs}) == 12
    answers = [a for q in qs for a in q.answers]
    assert any(a.upvotes < 0 and a.score == -1 for a in answers)
    assert any(a.upvotes == 0 and a.score == 0 for a in answers)
    assert any(a.accepted for a in answers)
    # Every answer's score, worked out by hand from round(log2(1 + upvotes)) + accepted (-1 below
    # 0 votes): e.g. 4 -> round(2.32) = 2, 5 -> round(2.58) = 3, 22 accepted -> round(4.52) + 1 = 6.
    hand = {
        (-6, False): -1, (-5, False): -1, (-4, False): -1, (-3, False): -1, (-2, False): -1, (-1, False): -1,
        (0, False): 0, (1, False): 1, (2, False): 2, (3, False): 2, (4, False): 2, (5, False): 3, (6, False): 3,
        (7, False): 3, (8, True): 4, (9, False): 3, (10, True): 4, (11, False): 4, (12, True): 5, (13, False): 4,
        (14, True): 5, (15, False): 4, (16, True): 5, (18, True): 5, (19, True): 5, (21, False): 4, (22, True): 6,
        (25, True): 6, (30, False): 5, (33, False): 5, (42, True): 6, (54, True): 7, (63, True): 7,
    }  # fmt: skip
    assert {(a.upvotes, a.accepted) for a in answers} == set(hand)
    assert all(a.score == hand[(a.upvotes, a.accepted)] for a in answers)
    assert load_pmp_questions("shipped") == qs
    assert qs[0].source == "shipped:pmp_sample"


def test_raw_layout_loads_with_every_field_name(tmp_path):
    rows = [
        {
            "question_id": 17,
            "question": "  Why? ",
            "answers": [
                {"text": "a", "upvotes": 3, "accepted": True},
                {"text": "b", "score": 7, "is_accepted": False},  # StackExchange API names
                {"text": "c", "score": -2.0},  # integral float, no acceptance field
                {"text": "d", "upvotes": 1, "pm_score": 99},  # upvotes win over pm_score
            ],
        },
        {"question": "No id?", "answers": []},
    ]
    qs = load_pmp_questions(_write_jsonl(tmp_path / "raw.jsonl", rows))
    assert [q.qid for q in qs] == ["17", "raw.jsonl:2"]
    assert qs[0].question == "Why?"
    assert [a.score for a in qs[0].answers] == [3, 3, -1, 1]
    assert [a.accepted for a in qs[0].answers] == [True, False, False, False]
    assert [a.answer_id for a in qs[0].answers] == ["17:1", "17:2", "17:3", "17:4"]
    assert qs[1].answers == ()
    assert len(load_pmp_questions(tmp_path / "raw.jsonl", max_questions=1)) == 1


def _h4_rows():
    """Rows in the HuggingFaceH4/stack-exchange-preferences layout (pm_score precomputed)."""

    def answer(aid, text, pm_score, selected):
        return {
            "answer_id": aid,
            "author": "someone",
            "author_id": 1,
            "author_profile": "https://example.invalid/u/1",
            "pm_score": pm_score,
            "selected": selected,
            "text": text,
        }

    return [
        {
            "qid": 5,
            "question": "How do I exit vim?",
            "answers": [answer(50, "Type :q and Enter.", 4, True), answer(51, "Unplug it.", -1, False)],
            "date": "2010/01/01",
            "metadata": ["https://example.invalid/q/5"],
        },
        {
            "qid": 6,
            "question": "Tabs or spaces?",
            "answers": [answer(60, "Whatever the project uses.", 2, False), answer(61, "Spaces.", 0, False)],
            "date": "2011/02/02",
            "metadata": [],
        },
    ]


def _check_h4(qs):
    assert [q.qid for q in qs] == ["5", "6"]
    assert [[a.score for a in q.answers] for q in qs] == [[4, -1], [2, 0]]  # pm_score used as is
    assert [[a.accepted for a in q.answers] for q in qs] == [[True, False], [False, False]]
    assert [a.answer_id for a in qs[0].answers] == ["50", "51"]
    assert all(a.upvotes is None for q in qs for a in q.answers)


def test_h4_layout_loads_from_jsonl(tmp_path):
    _check_h4(load_pmp_questions(_write_jsonl(tmp_path / "h4.jsonl", _h4_rows())))


def test_h4_layout_loads_from_parquet_and_saved_folder(tmp_path, datasets_cache):
    ds = datasets_cache.Dataset.from_list(_h4_rows())
    ds.to_parquet(str(tmp_path / "h4.parquet"))
    _check_h4(load_pmp_questions(tmp_path / "h4.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    _check_h4(load_pmp_questions(tmp_path / "saved"))


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"answers": []}, "'question'", "missing"),
        ({"question": "q"}, "'answers'", "missing"),
        ({"question": "q", "answers": "x"}, "'answers'", "expected a list"),
        ({"question": 3, "answers": []}, "'question'", "expected a string"),
        ({"question": "q", "answers": [{"upvotes": 1}]}, "'answers[0].text'", "missing"),
        ({"question": "q", "answers": [{"text": "a", "upvotes": 1}, {"text": "b"}]}, "'answers[1].upvotes'", "missing"),
        ({"question": "q", "answers": [{"text": "a", "upvotes": "3"}]}, "'answers[0].upvotes'", "expected an integer"),
        ({"question": "q", "answers": [{"text": "a", "score": 1.5}]}, "'answers[0].score'", "expected an integer"),
        (
            {"question": "q", "answers": [{"text": "a", "pm_score": True}]},
            "'answers[0].pm_score'",
            "expected an integer",
        ),
        (
            {"question": "q", "answers": [{"text": "a", "upvotes": 1, "selected": "yes"}]},
            "'answers[0].selected'",
            "bool",
        ),
        ({"question": "q", "answers": [{"text": " ", "upvotes": 1}]}, "'answers[0].text'", "empty"),
    ],
)
def test_errors_name_file_row_and_field(tmp_path, row, field, problem):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "fine", "answers": []}, row])
    with pytest.raises(PMPSourceError) as e:
        load_pmp_questions(path)
    msg = str(e.value)
    assert str(path) in msg and "row 2" in msg and f"field {field}" in msg and problem in msg


def test_errors_for_bad_json_empty_and_missing_sources(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answers": []}\n{not json\n')
    with pytest.raises(PMPSourceError, match=r"bad\.jsonl: row 2: invalid JSON"):
        load_pmp_questions(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(PMPSourceError, match="empty"):
        load_pmp_questions(empty)
    with pytest.raises(PMPSourceError, match="no such file"):
        load_pmp_questions(tmp_path / "nope.jsonl")
    assert issubclass(PMPSourceError, PromptSourceError)


# --- pairs ------------------------------------------------------------------------------------


def test_pairs_never_tie_and_p_matches_score_order():
    qs = [_question("a", [3, 3, 1, -1, 3]), _question("b", [2, 2]), _question("c", [0])]
    pairs = build_pmp_pairs(qs)
    # "a": scores {3,3,3} x {1} x {-1} -> 3 + 3 + 1 cross pairs; "b" ties only; "c" one answer.
    assert len(pairs) == 7
    assert {p["qid"] for p in pairs} == {"a"}
    for p in pairs:
        assert p["score_a"] != p["score_b"]
        assert p["p"] == (1.0 if p["score_a"] > p["score_b"] else 0.0)
        assert p["prompt"] == "question a?"
        assert p["response_a"] != p["response_b"]
    assert set(pairs[0]) == {"prompt", "response_a", "response_b", "p", "score_a", "score_b", "qid"}


def test_min_score_gap():
    qs = [_question("a", [0, 1, 3])]
    assert len(build_pmp_pairs(qs, min_score_gap=1)) == 3
    gap2 = build_pmp_pairs(qs, min_score_gap=2)
    assert sorted(sorted((p["score_a"], p["score_b"])) for p in gap2) == [[0, 3], [1, 3]]
    with pytest.raises(ValueError, match="min_score_gap"):
        build_pmp_pairs(qs, min_score_gap=0)


def test_labels_are_balanced_over_a_larger_set():
    qs = [_question(f"q{i}", [i % 5, (i + 1) % 5 + 5, -1, (7 * i) % 4]) for i in range(400)]
    pairs = build_pmp_pairs(qs, seed=3)
    assert len(pairs) > 1500
    counts = collections.Counter(p["p"] for p in pairs)
    assert set(counts) == {0.0, 1.0}
    # Fair coin flips: the share of p = 1 is within 5 points of one half (over 4 sigma here).
    assert abs(counts[1.0] / len(pairs) - 0.5) < 0.05


def test_max_pairs_per_question_caps_each_question():
    qs = [_question("a", [0, 1, 2, 3, 4]), _question("b", [0, 1])]  # 10 and 1 candidates
    pairs = build_pmp_pairs(qs, max_pairs_per_question=3)
    per_q = collections.Counter(p["qid"] for p in pairs)
    assert per_q == {"a": 3, "b": 1}
    with pytest.raises(ValueError, match="max_pairs_per_question"):
        build_pmp_pairs(qs, max_pairs_per_question=0)


def test_pairs_are_deterministic_by_seed_and_independent_of_other_questions():
    qs = shipped_pmp_sample()
    first = build_pmp_pairs(qs, max_pairs_per_question=2, seed=7)
    assert first == build_pmp_pairs(qs, max_pairs_per_question=2, seed=7)
    assert first != build_pmp_pairs(qs, max_pairs_per_question=2, seed=8)
    # A question's pairs depend on the seed and its qid only, not on the questions before it.
    last_alone = build_pmp_pairs(qs[-1:], max_pairs_per_question=2, seed=7)
    assert [p for p in first if p["qid"] == qs[-1].qid] == last_alone


def test_shipped_sample_pairs():
    pairs = build_pmp_pairs(shipped_pmp_sample())
    assert len(pairs) == 43  # all cross-score pairs of the 12 questions (ties excluded)
    assert all(p["score_a"] != p["score_b"] for p in pairs)
