"""report.html (experiments/explorer.py) and report.md's intervals and findings, on a run folder
built from fixture files (tests/_run_fixture.py): every row is on the page, text is escaped, the
page needs nothing outside itself; intervals match hand-computed values; the generated sentences
follow the numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from experiments.explorer import display_text, write_explorer
from experiments.findings import findings
from experiments.run_folder import load_run
from experiments.stats import mean_estimate, mean_from_stderr, wilson
from tests._html import Page
from tests._run_fixture import NASTY, make_run


@pytest.fixture
def run_dir(tmp_path) -> tuple[Path, dict]:
    return tmp_path / "run", make_run(tmp_path / "run")


def _page(workdir: Path) -> Page:
    return Page(write_explorer(workdir).read_text(encoding="utf-8"))


def test_every_row_is_on_the_page(run_dir):
    workdir, wrote = run_dir
    page = _page(workdir)
    chains = {(r["attrs"]["data-kind"], r["attrs"]["data-id"]): r for r in page.of("revision")}
    for kind, rows in (("red_team", wrote["revisions"]), ("helpful", wrote["helpful"])):
        for row in rows:
            got = chains.pop((kind, row["id"]))
            assert got["fields"]["prompt"] == display_text(row["prompt"])
            assert got["fields"]["initial_response"] == display_text(row["initial_response"])
            assert json.loads(got["attrs"]["data-principles"]) == [r["principle_id"] for r in row["rounds"]]
            assert len(got["rounds"]) == len(row["rounds"])
            for shown, rnd in zip(got["rounds"], row["rounds"]):
                for key in ("principle_id", "critique_request", "critique", "revision_request", "revision"):
                    assert shown["fields"][key] == display_text(rnd[key]), key
    assert not chains, f"rows on the page that the run does not have: {list(chains)}"

    def comparison_key(prompt, a, b, principles, first, swapped, p):
        return prompt, a, b, tuple(principles), tuple(first), tuple(swapped), p

    shown = sorted(
        comparison_key(
            r["fields"]["prompt"], r["fields"]["response_a"], r["fields"]["response_b"],
            *(r["values"][k] for k in ("principle_ids", "p_a_first", "p_a_swapped", "p_a")),
        )
        for r in page.of("comparison")
    )  # fmt: skip
    expected = sorted(
        comparison_key(
            display_text(c["prompt"]), display_text(c["response_a"]), display_text(c["response_b"]),
            c["principle_ids"], c["p_a_first"], c["p_a_swapped"], c["p_a"],
        )
        for c in wrote["comparisons"]
    )  # fmt: skip
    assert shown == expected
    labels = {r["values"]["p_a"]: r["fields"]["label"] for r in page.of("comparison")}
    assert labels == {0.91: "A", 0.5: "tie", 0.23: "B", 0.64: "A"}

    samples = sorted(
        (int(r["attrs"]["data-iteration"]), r["fields"]["prompt"], r["fields"]["response"], r["values"]["score"],
         r["values"]["kl"])
        for r in page.of("sample")
    )  # fmt: skip
    assert samples == sorted(
        (s["iteration"], display_text(s["prompt"]), display_text(s["response"]), s["score"], s["kl"])
        for s in wrote["samples"]
    )


def test_page_is_escaped_and_self_contained(run_dir):
    workdir, _ = run_dir
    page = _page(workdir)
    scripts = [a for tag, a in page.tags if tag == "script"]
    assert scripts == [{}], "the only script is the page's own inline one"
    assert not [a for _, a in page.tags if any(k.startswith("on") for k in a)], "no event-handler attributes"
    for tag, a in page.tags:
        for key in ("src", "href"):
            if key in a:
                assert a[key].startswith(("data:image/png;base64,", "#")), (tag, a)
    assert sum(tag == "img" for tag, _ in page.tags) == 1  # the one figure, embedded
    text = "".join(page.text)
    assert NASTY[0] in text  # shown as text, not run
    assert "\x00" not in text and "\x1b" not in text and "\u2400" in text and "\u241b" in text


def test_sections_and_order(run_dir):
    workdir, _ = run_dir
    html = write_explorer(workdir).read_text(encoding="utf-8")
    timings = [html.index(f"<tr><td>{s}</td><td>") for s in ("revisions", "sft", "feedback", "pm", "ppo", "eval")]
    assert timings == sorted(timings), "stage timings in pipeline order"
    for expected in ("What this run shows", "position_bias", "per_principle", "Training curves", "sft/metrics.jsonl"):
        assert expected in html
    assert "Judge report" in html and "flip_rate" in html
    for sentence in findings(load_run(workdir)):
        assert Page(html).text and sentence.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in html


def test_display_text():
    assert display_text("a\tb\nc") == "a\tb\nc"
    assert display_text("\x00\x1b\r\x7f") == "\u2400\u241b\u240d\u2421"
    assert display_text("\x85\ud800 é 🙂") == "\\x85\\ud800 é 🙂"
    assert display_text(None) == ""


def test_partial_and_empty_runs(tmp_path):
    """A run folder with only some stages (or nothing) renders; absent sections are left out."""
    empty = tmp_path / "empty"
    empty.mkdir()
    page = _page(empty)
    assert not page.rows
    only = tmp_path / "only_revisions"
    wrote = make_run(tmp_path / "full")
    (only / "revisions" / "red_team").mkdir(parents=True)
    (only / "revisions" / "red_team" / "rows-p000-b000000.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in wrote["revisions"])
    )
    page = _page(only)
    assert len(page.of("revision")) == len(wrote["revisions"]) and not page.of("comparison")


def test_run_in_progress(run_dir):
    """A metrics row still being written (no newline yet) is left out, not an error."""
    workdir, _ = run_dir
    with open(workdir / "ppo" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "objective/sco')
    assert [r["step"] for r in load_run(workdir).metrics["ppo"]] == [1, 2, 3]
    write_explorer(workdir)


def test_row_cap(run_dir):
    workdir, wrote = run_dir
    page = Page(write_explorer(workdir, max_rows=2).read_text())
    assert len([r for r in page.of("revision") if r["attrs"]["data-kind"] == "red_team"]) == 2
    assert "Showing the first 2 of 5 rows" in "".join(page.text)
    # The label statistics still count every comparison on disk.
    assert load_run(workdir, limit=2).label_p_a == [c["p_a"] for c in wrote["comparisons"]]


def test_intervals_hand_computed():
    # Wilson, 2 of 4: centre 0.5, half-width z sqrt(1/16 + z^2/64) / (1 + z^2/4), z = 1.959964.
    e = wilson(2, 4)
    assert (e.value, e.n) == (0.5, 4)
    assert e.lo == pytest.approx(0.1500, abs=1e-4) and e.hi == pytest.approx(0.8500, abs=1e-4)
    assert wilson(0, 10).lo == 0.0 and wilson(0, 10).hi == pytest.approx(0.2775, abs=1e-4)
    assert math.isnan(wilson(0, 0).value)
    with pytest.raises(ValueError, match="must lie in"):
        wilson(5, 4)
    # t, [1, 2, 3, 4]: mean 2.5, s = 1.2910, se = 0.6455, t_{0.975, 3} = 3.182446.
    m = mean_estimate([1, 2, 3, 4, float("nan"), None])
    assert (m.value, m.n) == (2.5, 4)
    assert m.lo == pytest.approx(2.5 - 3.182446 * 0.645497, abs=1e-5)
    assert m.hi == pytest.approx(2.5 + 3.182446 * 0.645497, abs=1e-5)
    assert mean_from_stderr(1.0, 0.5, 31).hi == pytest.approx(1.0 + 2.042272 * 0.5, abs=1e-5)
    assert math.isnan(mean_estimate([3.0]).lo)
    assert wilson(2, 4).fmt() == "0.50 [0.15, 0.85]"
    assert mean_from_stderr(3.0, 6.0 / 2.571, 6).fmt(signed=True) == "+3 [-3, +9]"


def test_findings_follow_the_numbers(run_dir):
    workdir, _ = run_dir
    lines = findings(load_run(workdir))
    text = "\n".join(lines)
    # PM: 36 of 40 right, Wilson [0.77, 0.96]: above chance.
    assert "PM accuracy on held-out AI-labelled pairs: 0.90 [0.77, 0.96] (Wilson, n = 40): above chance" in text
    # Elo: sl-cai's interval holds 0, rl-cai@3's does not; their intervals are disjoint.
    assert "harmlessness Elo of sl-cai relative to helpful (fixed at 0): +3 [-9, +15]" in text
    assert "not distinguishable from helpful at this size" in text
    assert "harmlessness Elo of rl-cai@3 relative to helpful (fixed at 0): +60 [+40, +80]" in text
    assert "higher than helpful" in text and "rl-cai@3 is higher than sl-cai (disjoint intervals)" in text
    # PPO no-EOS: 4 + 3 + 2 of 12 rollouts (rollout_batch_size 4).
    assert "ppo: 9 of 12 rollouts ended at max_new_tokens without EOS" in text
    summary = json.loads((workdir / "eval/summary.json").read_text())
    summary["elo"]["harmlessness"]["rl-cai@3"].update(elo=5.0, lo=-2.0, hi=12.0)
    (workdir / "eval/summary.json").write_text(json.dumps(summary))
    text = "\n".join(findings(load_run(workdir)))
    assert "rl-cai@3 vs sl-cai: +5 [-2, +12] vs +3 [-9, +15]; their intervals overlap" in text


def test_report_md(run_dir):
    from experiments.report import write_run_report

    workdir, wrote = run_dir
    out = write_run_report(workdir)
    assert out["html"] == "report.html" and (workdir / "report.html").is_file()
    captions = json.loads((workdir / "figures" / "captions.json").read_text())
    assert captions["fig5_revisions.png"].startswith("Fig. 5 analogue")
    assert f"<figcaption>{captions['fig5_revisions.png']} (" in (workdir / "report.html").read_text()
    md = (workdir / "report.md").read_text()
    assert md.index("## What this run shows") < md.index("## Stage timings (pipeline order)")
    timings = md.split("## Stage timings")[1].split("## Figures")[0]
    rows = [line.split("|")[1].strip() for line in timings.splitlines() if line.startswith("|")]
    assert [r for r in rows if r in ("revisions", "sft", "feedback", "pm", "ppo", "eval")] == [
        "revisions", "sft", "feedback", "pm", "ppo", "eval",
    ]  # fmt: skip
    assert "| 0.90 [0.77, 0.96] | 40 | 0 |" in md
    assert "| rl-cai@3 | +60 [+40, +80] | 6 |" in md and "| helpful | 0 (anchor) | 6 |" in md
    assert "Stage pm was resumed" in md
    # The mean length comes from the responses (as cai_jax.eval.goodhart counts it) with its t interval.
    lengths = [len(t) for t in json.loads((workdir / "eval/parts/responses-sl-cai.json").read_text())["harmlessness"]]
    assert f"| sl-cai | harmlessness | 3 | {mean_estimate(lengths).fmt()} |" in md
