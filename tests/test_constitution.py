"""Constitution schema, importers (paper files, chat layout), validation errors, sampling."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from cai_jax.cai.constitution import (
    Constitution,
    ConstitutionError,
    constitutions_dir,
    default_constitution,
    load_constitution,
    sample_feedback_principles,
    sample_sl_principles,
    save_constitution,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_YAML = REPO / "constitutions" / "default.yaml"
PAPER = Path(__file__).resolve().parents[2] / "shared/data/cai-paper/prompts"
PAPER_FILES = {  # file -> (sl principles, feedback principles, sl, feedback, cot few-shots)
    "CritiqueRevisionInstructions.json": (16, 0, 0, 0, 0),
    "CritiqueRevisionFewShotPrompts.json": (0, 0, 5, 0, 0),
    "RLMadisonInstructions.json": (0, 16, 0, 0, 0),
    "RLMadisonFewShotPrompts.json": (0, 0, 0, 5, 0),
    "RLMadisonPrecogFewShotPrompts.json": (0, 0, 0, 0, 6),
}
needs_paper = pytest.mark.skipif(not PAPER.is_dir(), reason=f"CAI paper prompt files not found at {PAPER}")
# The paper's transcript markers, to rebuild raw text from parsed pieces.
MARK = {"user": "Human", "assistant": "Assistant"}


def counts(c: Constitution) -> tuple[int, ...]:
    return tuple(
        map(len, (c.sl_principles, c.feedback_principles, c.sl_few_shots, c.feedback_few_shots, c.cot_few_shots))
    )


def transcript(conversation) -> str:
    return "".join(f"\n\n{MARK[m['role']]}: {m['content']}" for m in conversation)


def test_default_constitution_loads_valid():
    c = default_constitution()
    assert counts(c) == (16, 16, 3, 3, 2)
    assert c == load_constitution(DEFAULT_YAML) == load_constitution("default")
    sl_ids, fb_ids = [p.id for p in c.sl_principles], [p.id for p in c.feedback_principles]
    assert len(set(sl_ids)) == 16 and len(set(fb_ids)) == 16
    for p in c.sl_principles:  # plain instructions: the renderer adds the paper's framing
        assert "CritiqueRequest" not in p.critique_request and "Revision:" not in p.revision_request
    for shot in c.sl_few_shots:
        assert 1 <= len(shot.rounds) <= 2 and shot.conversation[-1]["role"] == "assistant"
        assert all(r.principle_id in sl_ids and r.critique and r.revision for r in shot.rounds)
    for shot in c.feedback_few_shots + c.cot_few_shots:
        assert shot.conversation[-1]["role"] == "user" and len(shot.options) == 2 and shot.answer in "AB"
    assert all(shot.reasoning for shot in c.cot_few_shots)
    assert {s.answer for s in c.feedback_few_shots + c.cot_few_shots} == {"A", "B"}


def test_constitutions_dir_env_var(tmp_path, monkeypatch):
    shutil.copy(DEFAULT_YAML, tmp_path / "default.yaml")
    monkeypatch.setenv("CAI_JAX_CONSTITUTIONS", str(tmp_path))
    assert constitutions_dir() == tmp_path
    assert default_constitution().source == str(tmp_path / "default.yaml")


@needs_paper
def test_paper_folder_imports_intact():
    c = load_constitution(PAPER)
    assert counts(c) == (16, 16, 5, 5, 6)
    raw = {name: json.loads((PAPER / name).read_text()) for name in PAPER_FILES}
    # Principles: re-adding the framing gives back the file's exact strings.
    instructions = raw["CritiqueRevisionInstructions.json"]
    assert [p.id for p in c.sl_principles] == list(instructions)
    for p in c.sl_principles:
        assert f"\n\nCritiqueRequest: {p.critique_request}\n\nCritique:" == instructions[p.id]["prompt"][0]
        assert f"\n\nRevisionRequest: {p.revision_request}\n\nRevision:" == instructions[p.id]["edit_request"]
    assert [p.id for p in c.feedback_principles] == [f"paper_fb_{i}" for i in range(16)]
    assert [f"\n{p.text} Options:" for p in c.feedback_principles] == raw["RLMadisonInstructions.json"]
    # SL few-shots: conversation + rounds rebuild each raw transcript exactly.
    for shot, text in zip(c.sl_few_shots, raw["CritiqueRevisionFewShotPrompts.json"]):
        rebuilt = transcript(shot.conversation) + "".join(
            f"\n\nCritiqueRequest: {r.critique_request}\n\nCritique: {r.critique}"
            f"\n\nRevisionRequest: {r.revision_request}\n\nRevision: {r.revision}"
            for r in shot.rounds
        )
        assert text in (rebuilt, rebuilt + "\n\nHuman:")
    first = c.sl_few_shots[0]
    assert first.rounds[0].critique.startswith("Arson is very dangerous and illegal")
    assert first.rounds[0].principle_id == "harmful3"  # quotes harmful3's critique request exactly
    assert c.sl_few_shots[4].rounds[0].principle_id is None  # the honesty example quotes no listed principle
    # Feedback few-shots: prompt rebuilt, the correct reply is the answer, positions alternate.
    for i, (shot, ex) in enumerate(zip(c.feedback_few_shots, raw["RLMadisonFewShotPrompts.json"])):
        assert transcript(shot.conversation) + "\n\nAssistant:" == ex["prompt"]
        assert shot.options[ord(shot.answer) - ord("A")] == ex["corrects"][0]
        assert set(shot.options) == {ex["corrects"][0], ex["incorrects"][0]}
        assert shot.answer == "AB"[i % 2]
    # Chain-of-thought few-shots: options, reasoning, answer and turns all come from the raw prompt.
    for shot, ex in zip(c.cot_few_shots, raw["RLMadisonPrecogFewShotPrompts.json"]):
        p = ex["prompt"]
        assert f"(A) [[[{shot.options[0]}]]]" in p and f"(B) [[[{shot.options[1]}]]]" in p
        assert shot.reasoning in p and p.rstrip().endswith(f"So the answer is: ({shot.answer})")
        assert all(m["content"] in p for m in shot.conversation) and shot.conversation[-1]["role"] == "user"
        assert "{}" not in shot.conversation[-1]["content"]
    assert [s.answer for s in c.cot_few_shots] == ["B", "B", "A", "B", "A", "B"]


@needs_paper
@pytest.mark.parametrize("name", sorted(PAPER_FILES))
def test_each_paper_file_loads_alone(name, tmp_path):
    assert counts(load_constitution(PAPER / name)) == PAPER_FILES[name]
    renamed = tmp_path / "whatever.json"  # detection is by content, not by file name
    shutil.copy(PAPER / name, renamed)
    assert counts(load_constitution(renamed)) == PAPER_FILES[name]


def chat(*turns: str, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def test_chat_layout(tmp_path):
    data = {
        "constitutions": [
            {"critic": "Is the reply harmful?", "revision": "Make it harmless."},
            {"critic": "Is the reply rude?", "revision": "Make it polite.", "id": "rude"},
        ],
        "system_chat": [
            chat("q", "bad", "Is the reply harmful?", "yes", "Please fix it.", "good", system="Be brief."),
            chat("q1", "a1", "q2", "a2", "Any problems?", "some", "Rewrite it.", "better"),
            chat("hi", "hello"),
            chat(
                "q",
                "bad",
                "Is the reply rude?",
                "yes",
                "Make it polite.",
                "ok",
                "Is the reply harmful?",
                "no",
                "Fix.",
                "ok2",
            ),
        ],
    }
    path = tmp_path / "hf.json"
    path.write_text(json.dumps(data))
    c = load_constitution(path)
    assert counts(c) == (2, 0, 4, 0, 0) and c.name == "hf"
    assert [p.id for p in c.sl_principles] == ["sl_0", "rude"]
    s0, s1, s2, s3 = c.sl_few_shots
    assert [m["role"] for m in s0.conversation] == ["system", "user", "assistant"]
    (r,) = s0.rounds  # quotes sl_0's critic: linked, with its own revision request kept
    assert (r.principle_id, r.critique, r.revision_request, r.revision) == ("sl_0", "yes", "Please fix it.", "good")
    assert len(s1.conversation) == 4 and s1.rounds[0].principle_id is None  # no critic quoted: last 4 turns
    assert s1.rounds[0].critique_request == "Any problems?"
    assert s2.rounds == [] and len(s2.conversation) == 2  # too short for a round: context only
    assert [r.principle_id for r in s3.rounds] == ["rude", "sl_0"] and s3.rounds[
        0
    ].revision_request == "Make it polite."
    for suffix in ("yaml", "json"):  # round trip through the project's schema
        assert load_constitution(save_constitution(c, tmp_path / f"rt.{suffix}")) == c
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(data["constitutions"]))
    assert load_constitution(bare).sl_principles == c.sl_principles


@pytest.mark.parametrize("suffix", ["yaml", "yml", "json"])
def test_round_trip(tmp_path, suffix):
    sources = [default_constitution(), default_constitution().restrict(3)]
    if PAPER.is_dir():
        sources.append(load_constitution(PAPER))
    for i, c in enumerate(sources):
        out = save_constitution(c, tmp_path / f"c{i}.{suffix}")
        assert load_constitution(out) == c
    with pytest.raises(ConstitutionError, match="suffix"):
        save_constitution(sources[0], tmp_path / "c.txt")


def test_sampling_seeded_and_restricted():
    c = default_constitution()
    a = sample_sl_principles(c, 50, 123)
    assert a == sample_sl_principles(c, 50, 123) and a != sample_sl_principles(c, 50, 124)
    # The documented algorithm: numpy's default_rng(seed).integers(0, k, n) indexes the first k.
    idx = np.random.default_rng(123).integers(0, 16, size=50)
    assert [p.id for p in a] == [c.sl_principles[i].id for i in idx]
    rng = np.random.default_rng(7)  # a Generator continues its stream across calls
    assert sample_sl_principles(c, 5, rng) + sample_sl_principles(c, 5, rng) == sample_sl_principles(c, 10, 7)
    first4 = {p.id for p in c.sl_principles[:4]}
    draws = sample_sl_principles(c, 400, 0, k=4)
    assert {p.id for p in draws} == first4  # only the first k, and (at 400 draws) all of them
    assert {p.id for p in sample_feedback_principles(c, 400, 0, k=2)} == {p.id for p in c.feedback_principles[:2]}
    assert sample_sl_principles(c, 0, 0) == []
    for bad_k in (0, 17, -1):
        with pytest.raises(ConstitutionError, match=f"k={bad_k}"):
            sample_sl_principles(c, 3, 0, k=bad_k)
    with pytest.raises(ConstitutionError, match="k=17"):
        sample_feedback_principles(c, 3, 0, k=17)


@pytest.mark.parametrize("sampler", [sample_sl_principles, sample_feedback_principles])
def test_sampling_uniform(sampler):
    c = default_constitution()
    n, k = 16_000, 16
    ids = [p.id for p in sampler(c, n, 2024)]
    freq = np.array(
        [ids.count(p.id) for p in (c.sl_principles if sampler is sample_sl_principles else c.feedback_principles)]
    )
    expected = n / k
    chi2 = float(((freq - expected) ** 2 / expected).sum())
    # Under uniform sampling chi2 ~ chi-square with 15 dof (mean 15, sd 5.5); P(chi2 > 44.3) ~ 1e-4,
    # so a correct sampler fails for about 1 seed in 10,000. Dropping one principle gives chi2 ~ 1000+.
    assert chi2 < 44.3, (chi2, freq)


def test_restrict_and_lookup():
    c = default_constitution()
    r = c.restrict(4)
    assert r.sl_principles == c.sl_principles[:4] and r.feedback_principles == c.feedback_principles[:4]
    assert len(r.sl_few_shots) == 3  # few-shots are kept; rounds naming dropped principles lose the id
    kept = {p.id for p in r.sl_principles}
    assert all(rd.principle_id in kept | {None} for s in r.sl_few_shots for rd in s.rounds)
    assert [rd.critique for s in r.sl_few_shots for rd in s.rounds] == [
        rd.critique for s in c.sl_few_shots for rd in s.rounds
    ]
    for bad in (0, 17):
        with pytest.raises(ConstitutionError, match=f"k={bad}"):
            c.restrict(bad)
    assert c.sl_principle("privacy").id == "privacy"
    with pytest.raises(ConstitutionError, match="'no_such_id'"):
        c.sl_principle("no_such_id")
    with pytest.raises(ConstitutionError, match="'nope'"):
        c.feedback_principle("nope")


def _set(path, value):
    def mutate(d):
        *head, last = path
        for key in head:
            d = d[key]
        if value is _DELETE:
            del d[last]
        else:
            d[last] = value

    return mutate


_DELETE = object()
# (mutation of the default's raw YAML, expected entry (prefix), expected field, expected problem text)
SCHEMA_ERRORS = {
    "missing": (
        _set(["sl_principles", 1, "revision_request"], _DELETE),
        "sl_principles[1] (id 'harm_to_user')",
        "revision_request",
        "missing field",
    ),
    "empty": (_set(["feedback_principles", 2, "text"], "   "), "feedback_principles[2]", "text", "empty text"),
    "duplicate": (
        _set(["sl_principles", 2, "id"], "overall_harm"),
        "sl_principles[2]",
        "id",
        "duplicate id 'overall_harm'",
    ),
    "unknown_round_principle": (
        _set(["sl_few_shots", 1, "rounds", 0, "principle_id"], "nope"),
        "sl_few_shots[1] (id 'roommate_food') rounds[0]",
        "principle_id",
        "unknown SL principle id 'nope'",
    ),
    "unknown_fb_principle": (
        _set(["feedback_few_shots", 0, "principle_id"], "nope"),
        "feedback_few_shots[0]",
        "principle_id",
        "unknown feedback principle",
    ),
    "wrong_type": (
        _set(["feedback_principles", 0, "text"], 5),
        "feedback_principles[0]",
        "text",
        "expected a string, got int",
    ),
    "not_a_list": (_set(["sl_principles"], {"a": 1}), None, "sl_principles", "expected a list"),
    "typo_field": (
        _set(["sl_principles", 0, "critque_request"], "x"),
        "sl_principles[0]",
        "critque_request",
        "unknown field",
    ),
    "three_options": (
        _set(["cot_few_shots", 1, "options"], ["a", "b", "c"]),
        "cot_few_shots[1]",
        "options",
        "exactly 2",
    ),
    "bad_answer": (_set(["feedback_few_shots", 2, "answer"], "C"), "feedback_few_shots[2]", "answer", "'A' or 'B'"),
    "bad_role": (
        _set(["sl_few_shots", 0, "conversation", 0, "role"], "robot"),
        "sl_few_shots[0] (id 'neighbour_wifi') conversation[0]",
        "role",
        "unknown role",
    ),
    "no_reasoning": (
        _set(["cot_few_shots", 0, "reasoning"], _DELETE),
        "cot_few_shots[0]",
        "reasoning",
        "missing field",
    ),
    "missing_top": (_set(["name"], _DELETE), None, "name", "missing field"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_ERRORS))
@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_schema_errors_name_file_entry_field(tmp_path, case, suffix):
    mutate, entry, field, problem = SCHEMA_ERRORS[case]
    data = copy.deepcopy(yaml.safe_load(DEFAULT_YAML.read_text()))
    mutate(data)
    path = tmp_path / f"bad.{suffix}"
    path.write_text(json.dumps(data) if suffix == "json" else yaml.safe_dump(data))
    with pytest.raises(ConstitutionError) as info:
        load_constitution(path)
    e = info.value
    assert (e.path, e.field) == (path, field) and problem in e.problem
    assert e.entry == entry if entry is None else e.entry.startswith(entry)  # the index, then the id if any
    assert str(path) in str(e) and f"field '{field}'" in str(e) and (entry or "") in str(e)


def test_format_errors(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: x\nversion: 1\nsl_principles: [\n  - id: a\n")
    with pytest.raises(ConstitutionError, match=r"bad\.yaml: invalid YAML at line \d+"):
        load_constitution(bad_yaml)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"name": "x",\n "version": 1,\n}')
    with pytest.raises(ConstitutionError, match=r"bad\.json: invalid JSON at line 3"):
        load_constitution(bad_json)
    other = tmp_path / "other.json"
    other.write_text('{"foo": 1}')
    with pytest.raises(ConstitutionError, match="unrecognised constitution format"):
        load_constitution(other)
    with pytest.raises(ConstitutionError, match="no such file"):
        load_constitution(tmp_path / "missing.yaml")
    with pytest.raises(ConstitutionError, match="no CAI paper prompt files"):
        load_constitution(tmp_path)


def test_importer_errors_name_entry(tmp_path):
    fewshot = tmp_path / "CritiqueRevisionFewShotPrompts.json"
    ok = (
        "\n\nHuman: q\n\nAssistant: a\n\nCritiqueRequest: c?\n\nCritique: bad\n\nRevisionRequest: fix\n\nRevision: good"
    )
    fewshot.write_text(json.dumps([ok, ok.split("\n\nRevision:")[0]]))
    with pytest.raises(ConstitutionError, match=r"CritiqueRevisionFewShotPrompts\.json: \[1\]: round 0"):
        load_constitution(fewshot)
    layout = tmp_path / "layout.json"
    layout.write_text(
        json.dumps({"constitutions": [{"critic": "c", "revision": "r"}], "system_chat": [chat("q", "a"), chat("q")]})
    )
    with pytest.raises(ConstitutionError, match=r"layout\.json: system_chat\[1\]: expected"):
        load_constitution(layout)
    layout.write_text(json.dumps({"constitutions": [{"critic": "c"}]}))
    with pytest.raises(ConstitutionError, match=r"constitutions\[0\], field 'revision': missing field"):
        load_constitution(layout)


def test_save_refuses_invalid(tmp_path):
    c = default_constitution()
    # The wifi few-shot names 'crime'; without that principle the file would not load back.
    broken = dataclasses.replace(c, sl_principles=[p for p in c.sl_principles if p.id != "crime"])
    with pytest.raises(ConstitutionError, match="unknown SL principle id 'crime'"):
        save_constitution(broken, tmp_path / "x.yaml")
    assert not (tmp_path / "x.yaml").exists()


def test_unterminated_yaml_quote_is_reported_where_it_starts(tmp_path):
    path = tmp_path / "quote.yaml"
    lines = [
        "name: x",
        "version: 1",
        "sl_principles:",
        '  - id: "a',
        "    critique_request: c",
        "    revision_request: r",
    ]
    path.write_text("\n".join(lines + [""] * 3))
    with pytest.raises(ConstitutionError) as info:
        load_constitution(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid YAML at line 4, column 9"), message
