"""Multiple-choice evals in the CAI paper's file format: loading (the real sample files and bad
rows), hand-checkable accuracy / log-loss / calibration and their swap-debiased variants with
judges of known log-probs (`CallableJudge`), both renderings, and the embedded SmolLM2 on a few
real questions."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from cai_jax.cai.judge import CallableJudge, LMJudge
from cai_jax.eval import mc
from cai_jax.eval.mc import MCEvalError, MCQuestion, calibration, evaluate_mc, load_mc_eval, mc_report, swap_options
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


def table_judge(table: dict[str, list[float]], calls: list | None = None, tokenizer=None) -> CallableJudge:
    """A judge whose option log-probs are looked up by the question text's last line but one."""

    def fn(questions):
        if calls is not None:
            calls.append(([q.text for q in questions], [list(q.options) for q in questions]))
        return [table[q.text.split("\n")[-2]] for q in questions]

    judge = CallableJudge(fn, "table")
    judge.tokenizer = tokenizer
    return judge


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


def test_accuracy_log_loss_and_calibration_hand_computed():
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
    res = evaluate_mc(table_judge(table, calls), qs, rendering="raw", n_bins=10)
    assert res["n"] == 4 and res["accuracy"] == 0.5
    assert res["log_loss"] == pytest.approx(-(math.log(0.82) + math.log(0.07) + math.log(0.55) + math.log(0.55)) / 4)
    assert res["mean_p_correct"] == pytest.approx((0.82 + 0.07 + 0.55 + 0.55) / 4)
    # Bins of width .1: confidences .82 (right), .93 (wrong), .55 (right), .45 (wrong).
    assert res["ece"] == pytest.approx((0.18 + 0.93 + 0.45 + 0.45) / 4)
    assert res["bins"]["count"].tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 1, 1]
    assert [r["chosen"] for r in res["questions"]] == [" (A)", " (A)", " (C)", " (C)"]
    assert res["questions"][2]["probs"] == pytest.approx({" (A)": 0.2, " (B)": 0.25, " (C)": 0.55})
    # One call per option count, with the options in sorted order and the prompt as is.
    assert sorted(len(o[0]) for _, o in calls) == [2, 3]
    assert sorted(t for texts, _ in calls for t in texts) == [q.prompt for q in qs]
    assert res["by_source"]["toy"]["n"] == 4
    assert "| toy | 4 | 0.500 |" in mc_report(res)


def test_calibration_function():
    out = calibration([0.05, 0.15, 0.95, 1.0], [0, 1, 1, 1], n_bins=10)
    assert out["bins"]["count"].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert out["ece"] == pytest.approx((0.05 + 0.85 + abs(1.95 - 2)) / 4)
    assert np.isnan(out["bins"]["accuracy"][3])
    with pytest.raises(ValueError, match="one non-empty"):
        calibration([], [])


def test_chat_rendering_moves_the_answer_cue_into_the_assistant_turn(lm):
    calls = []
    q = question(0, [" (A)"], [" (B)"])
    judge = table_judge({"<|im_start|>assistant": [0.0, -1.0]}, calls, tokenizer=lm.tokenizer)
    res = evaluate_mc(judge, [q], rendering="chat")
    ((texts, _),) = calls
    assert res["accuracy"] == 1.0
    assert texts == [SYSTEM + "<|im_start|>user\nQuestion 0?\nQ0<|im_end|>\n<|im_start|>assistant\nThe answer is:"]
    with pytest.raises(ValueError, match="unknown rendering"):
        evaluate_mc(judge, [q], rendering="transcript")
    with pytest.raises(ValueError, match="no questions"):
        evaluate_mc(judge, [], rendering="raw")
    with pytest.raises(ValueError, match="rendering='chat' needs a judge with a tokenizer; judge table has none"):
        evaluate_mc(table_judge({}), [q], rendering="chat")
    with pytest.raises(ValueError, match="rendering='chat' but judge lm renders 'raw'"):
        evaluate_mc(LMJudge(lm, rendering="raw", name="lm"), [q], rendering="chat")


def _biased_judge(bias: float, quality: dict[str, float]) -> CallableJudge:
    """log-prob of option X = quality of the text shown as X, + `bias` for (A) (the first shown)."""

    def fn(questions):
        out = []
        for q in questions:
            shown = dict(line.strip().split(" ", 1) for line in q.text.split("\n") if line.startswith(" ("))
            out.append([quality[shown[o.strip()]] + (bias if o == " (A)" else 0.0) for o in q.options])
        return out

    return CallableJudge(fn, "biased")


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_swap_debiased_accuracy_hand_computed():
    """A judge that prefers "good" by 1 nat and the first position by 2: plainly it picks (A) on
    both questions (one wrong); averaged over both orders in log-odds the bias cancels."""
    qs = [
        MCQuestion("q:0", "Q?\n (A) good\n (B) bad\nThe answer is:", (" (A)",), (" (B)",), "toy"),
        MCQuestion("q:1", "Q?\n (A) bad\n (B) good\n\nThe answer is:", (" (B)",), (" (A)",), "toy"),
        MCQuestion("q:2", "Q?\n (A) bad\n (B) good\n (C) good\nThe answer is:", (" (B)", " (C)"), (" (A)",), "toy"),
    ]
    res = evaluate_mc(_biased_judge(2.0, {"good": 0.0, "bad": -1.0}), qs, n_bins=10, debias=True)
    # Plain: q0 p(A) = sig(3), right; q1 p(A) = sig(1), wrong; q2 (3 options, not swapped):
    # logits (1, 0, 0), p(A) = e / (e + 2), wrong.
    p2 = math.e / (math.e + 2)
    assert res["accuracy"] == pytest.approx(1 / 3)
    assert res["log_loss"] == pytest.approx((-math.log(_sig(3)) - math.log(_sig(-1)) - math.log(1 - p2)) / 3)
    # Debiased: q0 d = (3 - 1) / 2 = 1, q1 d = (1 - 3) / 2 = -1: both right at confidence sig(1).
    deb = res["debiased"]
    assert deb["n"] == 3 and deb["accuracy"] == pytest.approx(2 / 3)
    assert deb["log_loss"] == pytest.approx((2 * -math.log(_sig(1)) - math.log(1 - p2)) / 3)
    assert res["questions"][1]["debiased"]["chosen"] == " (B)"
    assert res["questions"][1]["debiased"]["confidence"] == pytest.approx(_sig(1))
    # ECE over bins of .1: sig(1) = .731 (two right) in bin 7, q2's p(A) = .576 (wrong) in bin 5.
    assert deb["ece"] == pytest.approx((2 * (1 - _sig(1)) + p2) / 3)
    # Position bias: P((A) | original) + P((A) | swapped) - 1 = sig(3) + sig(1) - 1 for both.
    pb = res["position_bias"]
    assert pb["n"] == 2 and pb["mean"] == pytest.approx(_sig(3) + _sig(1) - 1)
    assert pb["lo"] == pytest.approx(pb["mean"]) and pb["hi"] == pytest.approx(pb["mean"])
    assert "debiased accuracy" in mc_report(res) and "| all | 3 | 0.333 | " in mc_report(res)
    # No swap asked: no debiased fields.
    assert "debiased" not in evaluate_mc(_biased_judge(2.0, {"good": 0.0, "bad": -1.0}), qs)


def test_swap_options_exchanges_the_option_texts():
    q = MCQuestion(
        "f:3", "Pick.\nOptions:\n (A) [[[one\nline two]]]\n (B) [[[three]]]\n\nThe answer is:", (" (B)",), (" (A)",)
    )
    s = swap_options(q)
    assert s.prompt == "Pick.\nOptions:\n (A) [[[three]]]\n (B) [[[one\nline two]]]\n\nThe answer is:"
    assert s.corrects == (" (A)",) and s.incorrects == (" (B)",) and swap_options(s) == q
    with pytest.raises(MCEvalError, match="f:3: the prompt has no"):
        swap_options(dataclasses.replace(q, prompt="Pick (A) or (B).\nThe answer is:"))
    with pytest.raises(MCEvalError, match="only questions with options"):
        swap_options(question(0, [" (C)"], [" (A)", " (B)"]))


@pytest.mark.parametrize("name", sorted(FILES))
def test_sample_files_with_a_judge_of_known_log_probs(name):
    """Option k gets log-prob -k whatever the question: every confidence is p(A) = 1 / sum_k e^-k,
    so accuracy is the share of rows whose correct option is (A) and ECE = |p(A) - accuracy|."""
    path = SAMPLES / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    judge = CallableJudge(lambda qs: [[-float(k) for k in range(len(q.options))] for q in qs], "by-letter")
    res = evaluate_mc(judge, load_mc_eval(path), debias=FILES[name] == 2)
    k = FILES[name]
    log_z = math.log(sum(math.exp(-j) for j in range(k)))
    acc = sum(r["corrects"] == [" (A)"] for r in rows) / len(rows)
    letter = lambda o: ord(o.strip()[1]) - ord("A")  # noqa: E731
    loss = sum(-math.log(sum(math.exp(-letter(o) - log_z) for o in r["corrects"])) for r in rows) / len(rows)
    assert res["n"] == len(rows) and res["accuracy"] == pytest.approx(acc)
    assert res["log_loss"] == pytest.approx(loss)
    assert res["ece"] == pytest.approx(abs(math.exp(-log_z) - acc))
    if k == 2:
        # A pure position preference: debiased, every question is a coin flip (argmax picks (A)).
        deb = res["debiased"]
        assert deb["accuracy"] == pytest.approx(acc) and deb["log_loss"] == pytest.approx(math.log(2))
        assert deb["ece"] == pytest.approx(abs(0.5 - acc))
        assert res["position_bias"]["mean"] == pytest.approx(2 * _sig(1) - 1)
        for q in load_mc_eval(path):
            assert swap_options(swap_options(q)) == q


def test_sample_files_with_the_tiny_model(lm):
    """The real scorer on the first question of each two-option file (tiny random model, wrapped in
    an LMJudge): the same numbers as that judge's option log-probs give by hand."""
    path = SAMPLES / sorted(FILES)[0]
    if not path.exists():
        pytest.skip(f"{path} not present")
    qs = [load_mc_eval(SAMPLES / name)[0] for name in sorted(FILES)[:2]]
    res = evaluate_mc(lm, qs, rendering="raw", batch_size=8)
    assert res["n"] == 2 and len(res["by_source"]) == 2
    from cai_jax.cai.judge import JudgeQuestion

    logp = LMJudge(lm).option_logprobs([JudgeQuestion(q.prompt, q.options) for q in qs])
    for r, q, lp in zip(res["questions"], qs, logp):
        p = np.exp(lp - np.logaddexp.reduce(lp))
        assert [r["probs"][o] for o in q.options] == pytest.approx(p.tolist(), abs=1e-12)
        assert r["log_loss"] == pytest.approx(-math.log(p[q.options.index(q.corrects[0])]))


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
