"""Judge diagnostics on constructed comparison rows of known position bias, flip rate, length
preference and principle agreement (every expected value worked out by hand in the comments)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cai_jax.eval.judge_report import Z95, judge_report, judge_report_markdown, mean_interval


def _row(a: str, b: str, first, swapped, members, principles=("harm", "honest")) -> dict:
    """A `label_pairs`-shaped row; the label p_a is the members' mean, as the labeller makes it."""
    return {
        "prompt_id": f"p{len(a)}{len(b)}",
        "response_a": a,
        "response_b": b,
        "principle_ids": list(principles),
        "p_a_first": list(first),
        "p_a_swapped": list(swapped),
        "p_a_members": list(members),
        "p_a": float(np.mean(members)),
    }


# Four comparisons, two principles each. Length difference len(A) - len(B): +2, -2, 0, +5.
ROWS = [
    _row("aaaa", "bb", first=(0.9, 0.8), swapped=(0.7, 0.6), members=(0.9, 0.9)),
    _row(" a ", "bbb", first=(0.6, 0.7), swapped=(0.2, 0.3), members=(0.4, 0.5)),  # stripped: 1 char
    _row("aa", "bb", first=(0.6, 0.5), swapped=(0.4, 0.5), members=(0.5, 0.5)),
    _row("aaaaaa", "b", first=(0.9, 0.3), swapped=(0.9, 0.1), members=(0.9, 0.2)),
]


def test_position_bias_and_flip_rate_hand_computed():
    pos = judge_report(ROWS)["position"]
    # p_a_first - p_a_swapped per question: (.2, .2), (.4, .4), (.2, 0), (0, .2); per comparison
    # .2, .4, .1, .1 -> mean .2, sample sd sqrt(.06 / 3), normal interval over 4 comparisons.
    half = Z95 * math.sqrt(0.06 / 3) / 2
    assert pos["bias"]["mean"] == pytest.approx(0.2) and pos["bias"]["n"] == 4
    assert pos["bias"]["lo"] == pytest.approx(0.2 - half) and pos["bias"]["hi"] == pytest.approx(0.2 + half)
    # Flips, (first - .5)(swapped - .5) < 0: both members of row 1, the first of row 2 (the
    # second is a tie on both sides): 3 of 8.
    assert (pos["flip_rate"], pos["n_flips"], pos["n_questions"]) == (0.375, 3, 8)
    # Without the swap: 2 mean(p_a_first) - 1 over comparisons: means .85, .65, .55, .6.
    assert pos["first_order"]["mean"] == pytest.approx(2 * (0.85 + 0.65 + 0.55 + 0.6) / 4 - 1)


def test_length_preference_agreement_and_labels_hand_computed():
    rep = judge_report(ROWS)
    # Labels p_a = .9, .45, .5, .55 against x = 2, -2, 0, 5: mean x 1.25, mean p .6;
    # sum dx dp = .75*.3 + (-3.25)(-.15) + (-1.25)(-.1) + 3.75(-.05) = .65,
    # sum dx^2 = 26.75, sum dp^2 = .125.
    assert rep["length"]["correlation"] == pytest.approx(0.65 / math.sqrt(26.75 * 0.125))
    # Unequal lengths and a non-tie label: rows 0 (A longer, A preferred), 1 (B longer, B
    # preferred), 3 (A longer, A preferred): all three prefer the longer one.
    assert rep["length"]["longer_preferred"] == 1.0 and rep["length"]["n_decided"] == 3
    # Member sides (+, +), (-, tie), (tie, tie), (+, -): two of four principle pairs agree.
    assert rep["agreement"] == {"pairwise": 0.5, "n_pairs": 4, "unanimous": 0.5, "n_comparisons": 4}
    labels = rep["labels"]
    assert labels["count"] == [0, 0, 0, 0, 1, 2, 0, 0, 0, 1]
    assert (labels["prefer_a"], labels["prefer_b"], labels["ties"]) == (2, 1, 1)
    assert labels["confident_share"] == 0.25  # only .9 has max(p, 1 - p) >= .8
    assert labels["mean_confidence"] == pytest.approx((0.9 + 0.55 + 0.5 + 0.55) / 4)


def test_per_principle_table_hand_computed():
    per = judge_report(ROWS)["principles"]
    assert list(per) == ["harm", "honest"]
    harm, honest = per["harm"], per["honest"]
    # harm: first .9 .6 .6 .9, swapped .7 .2 .4 .9 -> bias .2 .4 .2 0 (mean .2), flips rows 1, 2.
    assert harm["n"] == 4 and harm["mean_p"] == pytest.approx((0.9 + 0.4 + 0.5 + 0.9) / 4)
    assert harm["position"]["bias"]["mean"] == pytest.approx(0.2) and harm["position"]["flip_rate"] == 0.5
    # honest: first .8 .7 .5 .3, swapped .6 .3 .5 .1 -> bias .2 .4 0 .2, one flip (row 1).
    assert honest["position"]["bias"]["mean"] == pytest.approx(0.2) and honest["position"]["flip_rate"] == 0.25
    sd = np.std([0.2, 0.4, 0.0, 0.2], ddof=1)
    assert honest["position"]["bias"]["hi"] == pytest.approx(0.2 + Z95 * sd / 2)
    # Member labels against the length differences.
    x = np.array([2, -2, 0, 5])
    assert harm["length"]["correlation"] == pytest.approx(np.corrcoef(x, [0.9, 0.4, 0.5, 0.9])[0, 1])
    assert honest["length"]["correlation"] == pytest.approx(np.corrcoef(x, [0.9, 0.5, 0.5, 0.2])[0, 1])
    # honest: decided rows 0 (longer A, A), 3 (longer A, B): one of two; confident .9 and .2.
    assert honest["length"]["longer_preferred"] == 0.5 and honest["labels"]["confident_share"] == 0.5


def test_unswapped_single_member_run_and_json():
    rows = [
        {**r, "p_a_swapped": [], "principle_ids": r["principle_ids"][:1], "p_a_first": r["p_a_first"][:1]} for r in ROWS
    ]
    rows = [{**r, "p_a_members": r["p_a_first"], "p_a": r["p_a_first"][0]} for r in rows]
    rep = judge_report(rows, mc={"HarmfulVsEthical.jsonl": _mc_result()})
    assert rep["swapped"] is False and rep["members"] == [1]
    assert rep["position"]["bias"] is None and rep["position"]["flip_rate"] is None
    assert rep["position"]["first_order"]["mean"] == pytest.approx(2 * (0.9 + 0.6 + 0.6 + 0.9) / 4 - 1)
    assert rep["agreement"]["pairwise"] is None and rep["agreement"]["n_comparisons"] == 0
    assert rep["mc"]["HarmfulVsEthical.jsonl"]["debiased"]["accuracy"] == 0.75
    assert json.loads(json.dumps(rep, allow_nan=False)) == rep  # plain JSON, no NaN
    md = judge_report_markdown(rep)
    assert "| position bias [95% normal] | - |" in md and "| harm | 4 | 0.750 | - | - |" in md
    assert "| HarmfulVsEthical.jsonl | 4 | 0.500 | 0.7000 | 0.1000 | 0.750 |" in md


def _mc_result() -> dict:
    summary = {"n": 4, "accuracy": 0.5, "log_loss": 0.7, "ece": 0.1, "mean_p_correct": 0.5}
    return {**summary, "debiased": {**summary, "accuracy": 0.75}, "position_bias": mean_interval([0.1, 0.3])}


def test_markdown_of_a_swapped_ensemble():
    md = judge_report_markdown(judge_report(ROWS))
    half = Z95 * math.sqrt(0.06 / 3) / 2
    assert f"| position bias [95% normal] | +0.200 [{0.2 - half:+.3f}, {0.2 + half:+.3f}] |" in md
    assert "| flip rate | 0.375 (3 of 8) |" in md and "| principle agreement | 0.500 (of 4 pairs) |" in md
    assert md.count("\n| harm | 4 |") == 1 and md.count("\n| honest | 4 |") == 1


def test_rows_that_cannot_be_read_are_named():
    with pytest.raises(ValueError, match="no comparison rows"):
        judge_report([])
    with pytest.raises(ValueError, match=r"row 'p42' has no field 'p_a_first'"):
        judge_report([{k: v for k, v in ROWS[0].items() if k != "p_a_first"}])
    with pytest.raises(ValueError, match=r"row 'p42': p_a_first, p_a_members and principle_ids .* got 2, 1, 2"):
        judge_report([{**ROWS[0], "p_a_members": [0.5]}])
    with pytest.raises(ValueError, match=r"row 'p42': p_a_swapped has 1 entries for 2 members"):
        judge_report([{**ROWS[0], "p_a_swapped": [0.5]}])
    with pytest.raises(ValueError, match="1 of 2 rows are swapped"):
        judge_report([ROWS[0], {**ROWS[1], "p_a_swapped": []}])
    assert mean_interval([]) == {"mean": None, "lo": None, "hi": None, "n": 0}
    assert mean_interval([0.3]) == {"mean": 0.3, "lo": None, "hi": None, "n": 1}
