"""Multiple-choice evals in the CAI paper's file format: loading (the real sample files and bad
rows), hand-checkable accuracy / log-loss / calibration with a fake scorer, both renderings, and
the embedded SmolLM2 on a few real questions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cai_jax.cai import feedback as fb
from cai_jax.eval import mc
from cai_jax.eval.mc import MCEvalError, MCQuestion, calibration, evaluate_mc, load_mc_eval, mc_report
from tests.test_feedback import SYSTEM, tiny_lm

SAMPLES = Path("/work/shared/data/cai-paper/evals-sample")
FILES = {
    "438HHHEvaluations.sample.jsonl": 2,
    "HarmfulVsEthical.sample.jsonl": 2,
    "HarmfulnessClassification.sample.jsonl": 9,
}


@pytest.fixture(scope="module")
def lm(smollm2_gguf):
    return tiny_lm()


def fake_scores(table: dict[str, list[float]], calls: list | None = None):
    """A stand-in for `feedback.score_options`: log-probs looked up by the question text's last line."""

    def score_options(lm, texts, options, *, rendering, batch_size):
        if calls is not None:
            calls.append((list(texts), [list(o) for o in options], rendering))
        return np.array([table[t.split("\n")[-2]] for t in texts], np.float32)

    return score_options


def question(i: int, corrects, incorrects) -> MCQuestion:
    return MCQuestion(f"q:{i}", f"Question {i}?\nQ{i}\nThe answer is:", tuple(corrects), tuple(incorrects), "toy")


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("name", sorted(FILES))
def test_loads_every_row_of_the_sample_files(name):
    path = SAMPLES / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    qs = load_mc_eval(path)
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    assert len(qs) == len(lines) == 12
    for i, (q, row) in enumerate(zip(qs, lines)):
        assert q.id == f"{name.split('.')[0]}:{i + 1}" and q.source == str(path)
        assert q.prompt == row["prompt"] and q.prompt.rstrip().endswith("The answer is:")
        assert list(q.corrects) == row["corrects"] and list(q.incorrects) == row["incorrects"]
        assert len(q.options) == FILES[name] and q.options[0] == " (A)"
    if name.startswith("438"):
        assert {"text_correct", "text_incorrect"} <= set(qs[0].extras)


def test_bad_rows_name_file_line_and_field(tmp_path):
    good = {"prompt": "Q\nThe answer is:", "corrects": [" (A)"], "incorrects": [" (B)"]}
    cases = [
        ("{not json", r"line 2: invalid JSON"),
        (json.dumps({**good, "prompt": "  "}), r"line 2, field 'prompt': expected a non-empty string"),
        (json.dumps({k: v for k, v in good.items() if k != "corrects"}), r"line 2, field 'corrects'"),
        (json.dumps({**good, "incorrects": []}), r"line 2, field 'incorrects': expected a non-empty list"),
        (json.dumps({**good, "incorrects": [" (A)"]}), r"line 2, field 'incorrects': options \[' \(A\)'\] are also"),
        (json.dumps({**good, "corrects": [" (A)", " (A)"]}), r"line 2, field 'corrects': repeats"),
        ("[1, 2]", r"line 2: expected a JSON object"),
    ]
    for bad, match in cases:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(good) + "\n" + bad + "\n")
        with pytest.raises(MCEvalError, match=rf"bad\.jsonl: {match}"):
            load_mc_eval(path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(MCEvalError, match="no questions"):
        load_mc_eval(tmp_path / "empty.jsonl")
    with pytest.raises(MCEvalError, match="no such file"):
        load_mc_eval(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- metrics


def test_accuracy_log_loss_and_calibration_hand_computed(lm, monkeypatch):
    qs = [
        question(0, [" (A)"], [" (B)"]),  # p = .82 on the correct option: right, confidence .82
        question(1, [" (B)"], [" (A)"]),  # p = .93 on the wrong option: wrong, confidence .93
        question(2, [" (C)"], [" (A)", " (B)"]),  # 3 options, .55 on the correct one: right
        question(3, [" (A)", " (B)"], [" (C)"]),  # two correct: p_correct = .3 + .25; chosen (C), wrong
    ]
    table = {
        "Q0": np.log([0.82, 0.18]).tolist(),
        "Q1": np.log([0.93, 0.07]).tolist(),
        "Q2": np.log([0.2, 0.25, 0.55]).tolist(),
        "Q3": np.log([0.3, 0.25, 0.45]).tolist(),
    }
    calls = []
    monkeypatch.setattr(fb, "score_options", fake_scores(table, calls))
    res = evaluate_mc(lm, qs, rendering="raw", batch_size=4, n_bins=10)
    assert res["n"] == 4 and res["accuracy"] == 0.5
    assert res["log_loss"] == pytest.approx(-(math.log(0.82) + math.log(0.07) + math.log(0.55) + math.log(0.55)) / 4)
    assert res["mean_p_correct"] == pytest.approx((0.82 + 0.07 + 0.55 + 0.55) / 4)
    # Bins of width .1: confidences .82 (right), .93 (wrong), .55 (right), .45 (wrong).
    assert res["ece"] == pytest.approx((0.18 + 0.93 + 0.45 + 0.45) / 4)
    assert res["bins"]["count"].tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 1, 1]
    assert [r["chosen"] for r in res["questions"]] == [" (A)", " (A)", " (C)", " (C)"]
    assert res["questions"][2]["probs"] == pytest.approx({" (A)": 0.2, " (B)": 0.25, " (C)": 0.55})
    # One call per option count, with the options in sorted order and the prompt as is.
    assert sorted(len(o[0]) for _, o, _ in calls) == [2, 3]
    assert all(r == "raw" for _, _, r in calls)
    assert sorted(t for texts, _, _ in calls for t in texts) == [q.prompt for q in qs]
    assert res["by_source"]["toy"]["n"] == 4
    assert "| toy | 4 | 0.500 |" in mc_report(res)


def test_calibration_function():
    out = calibration([0.05, 0.15, 0.95, 1.0], [0, 1, 1, 1], n_bins=10)
    assert out["bins"]["count"].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert out["ece"] == pytest.approx((0.05 + 0.85 + abs(1.95 - 2)) / 4)
    assert np.isnan(out["bins"]["accuracy"][3])
    with pytest.raises(ValueError, match="one non-empty"):
        calibration([], [])


def test_chat_rendering_moves_the_answer_cue_into_the_assistant_turn(lm, monkeypatch):
    calls = []
    q = question(0, [" (A)"], [" (B)"])
    monkeypatch.setattr(fb, "score_options", fake_scores({"<|im_start|>assistant": [0.0, -1.0]}, calls))
    res = evaluate_mc(lm, [q], rendering="chat")
    ((texts, _, rendering),) = calls
    assert rendering == "chat" and res["accuracy"] == 1.0
    assert texts == [SYSTEM + "<|im_start|>user\nQuestion 0?\nQ0<|im_end|>\n<|im_start|>assistant\nThe answer is:"]
    with pytest.raises(ValueError, match="unknown rendering"):
        evaluate_mc(lm, [q], rendering="transcript")
    with pytest.raises(ValueError, match="no questions"):
        evaluate_mc(lm, [], rendering="raw")


def test_sample_files_with_the_tiny_model(lm):
    """The real scorer on the first question of each two-option file (tiny random model)."""
    qs = [load_mc_eval(SAMPLES / name)[0] for name in sorted(FILES)[:2]]
    res = evaluate_mc(lm, qs, rendering="raw", batch_size=8)
    assert res["n"] == 2 and len(res["by_source"]) == 2
    for r in res["questions"]:
        assert sum(r["probs"].values()) == pytest.approx(1.0) and r["log_loss"] > 0


@pytest.mark.slow
def test_smollm2_on_sample_questions(smollm2):
    """SmolLM2-135M on the four shortest harmful-vs-ethical questions: metrics are well formed.

    A 135M model is near chance on these evals (measured on all 12 rows: accuracy 0.33 raw, 0.50
    chat), so the test checks the plumbing on a real model rather than a score.
    """
    qs = sorted(load_mc_eval(SAMPLES / "HarmfulVsEthical.sample.jsonl"), key=lambda q: len(q.prompt))[:4]
    res = evaluate_mc(smollm2, qs, rendering="chat", batch_size=8)
    print(mc_report(res))
    assert res["n"] == 4 and 0.0 <= res["accuracy"] <= 1.0 and 0 <= res["ece"] <= 1
    assert all(0.0 < r["p_correct"] < 1.0 for r in res["questions"])
    assert mc.__name__ == "cai_jax.eval.mc"
