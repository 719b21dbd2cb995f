"""SL-CAI critique -> revision engine: rounds, principle sampling, modes, golden prompt strings,
clean-up, resume after a kill, multi-process output and bad input.

Generation runs on a tiny random model (2 layers) with the real SmolLM2 tokenizer and chat
template, so the text plumbing is real while every sample is cheap. Tests about what is *fed* to
the model replace `_generate_step` with a recorder that returns numbered outputs, which makes every
rendered prompt of every step checkable against a hand-written string.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from cai_jax.cai import revisions as rev
from cai_jax.cai.constitution import ConstitutionError, default_constitution, sample_sl_principles
from cai_jax.cai.prompts import Prompt, shipped_prompts
from cai_jax.cai.revisions import (
    TRANSCRIPT_STOPS,
    clean_text,
    dialogue_turns,
    load_revisions,
    render_step,
    run_revisions,
)
from cai_jax.jobs import Progress
from tests.defaults import revision_settings

# SmolLM2's chat template inserts this system turn when the conversation has none.
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
# The settings of the shared end-to-end run: 4 prompts in 2 batches of 2, first 4 principles. One
# round keeps the number of compiled shapes (about 3 s each on 2 cores) down; runs with the
# recorder below cover more rounds.
BASE = revision_settings(num_revisions=1, num_principles=4, max_new_tokens=8, batch_size=2, seed=3)


def chatml(*messages: tuple[str, str]) -> str:
    """SmolLM2's ChatML by hand: default system turn, the messages, an open assistant turn."""
    body = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    return SYSTEM + body + "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def lm(smollm2_gguf):
    """A tiny random llama with the real SmolLM2 tokenizer (vocab 49152, ChatML template)."""
    from cai_jax.models import Transformer, init_params, load_tokenizer, tiny_config
    from cai_jax.models.loading import LoadedModel, resolve_model_path

    tok = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    cfg = tiny_config("llama", vocab_size=49152, max_position_embeddings=4096, eos_token_id=2, pad_token_id=2)
    return LoadedModel(Transformer(cfg), init_params(cfg, jax.random.key(0)), tok, cfg)


@pytest.fixture(scope="module")
def constitution():
    return default_constitution()


@pytest.fixture(scope="module")
def prompts():
    return shipped_prompts("red_team")[:4]


@pytest.fixture(scope="module")
def base_run(lm, prompts, constitution, tmp_path_factory):
    """One uninterrupted run with BASE settings: (folder, rows)."""
    out = tmp_path_factory.mktemp("revisions-a")
    run_revisions(lm, prompts, constitution, BASE, out, progress=False)
    return out, load_revisions(out).to_list()


def recorder(calls: list):
    """A stand-in for `_generate_step`: records the texts, answers " out<call>.<row>"."""

    def generate_step(lm, texts, key, settings):
        n = len(calls)
        calls.append(list(texts))
        return [f" out{n}.{j}" for j in range(len(texts))]

    return generate_step


def shards(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.glob("rows-*.jsonl"))}


# ---------------------------------------------------------------- rounds and principles


def test_rounds_and_principles_follow_the_seeded_sampler(base_run, prompts, constitution):
    _, rows = base_run
    assert [r["id"] for r in rows] == [p.id for p in prompts]
    first_k = {p.id for p in constitution.sl_principles[: BASE.num_principles]}
    for i, row in enumerate(rows):
        assert row["prompt"] == prompts[i].text and row["settings"] == dataclasses.asdict(BASE)
        assert len(row["rounds"]) == BASE.num_revisions
        expected = sample_sl_principles(
            constitution, BASE.num_revisions, np.random.default_rng([BASE.seed, i]), k=BASE.num_principles
        )
        for rd, pr in zip(row["rounds"], expected):
            assert rd["principle_id"] == pr.id and rd["principle_id"] in first_k
            assert rd["critique_request"] == pr.critique_request
            assert rd["revision_request"] == pr.revision_request
            assert isinstance(rd["critique"], str) and isinstance(rd["revision"], str)
    # Different prompts draw their own principles (not one shared sequence).
    assert len({tuple(rd["principle_id"] for rd in row["rounds"]) for row in rows}) > 1


def test_principle_sampling_is_uniform_over_first_k_and_independent_across_prompts(constitution):
    k, n, seed = 4, 2, 3
    ids = [
        [p.id for p in sample_sl_principles(constitution, n, np.random.default_rng([seed, i]), k=k)]
        for i in range(2000)
    ]
    first_k = [p.id for p in constitution.sl_principles[:k]]
    counts = collections.Counter(x for row in ids for x in row)
    assert set(counts) == set(first_k)
    expected = 2000 * n / k  # 1000; binomial sd about 27
    assert all(abs(c - expected) < 0.1 * expected for c in counts.values()), counts
    # Neighbouring prompts (and the two rounds of one prompt) agree about 1/k of the time.
    same_next = np.mean([a[0] == b[0] for a, b in zip(ids, ids[1:])])
    same_round = np.mean([row[0] == row[1] for row in ids])
    assert abs(same_next - 1 / k) < 0.05 and abs(same_round - 1 / k) < 0.05


@pytest.mark.parametrize("num_revisions", [0, 3])
def test_number_of_rounds(lm, constitution, tmp_path, monkeypatch, num_revisions):
    calls = []
    monkeypatch.setattr(rev, "_generate_step", recorder(calls))
    ps = [Prompt(f"p{i}", f"Question {i}?", "test") for i in range(3)]
    settings = dataclasses.replace(BASE, num_revisions=num_revisions, num_principles=None, batch_size=3)
    run_revisions(lm, ps, constitution, settings, tmp_path, progress=False)
    rows = load_revisions(tmp_path).to_list()
    assert len(calls) == 1 + 2 * num_revisions
    for i, row in enumerate(rows):
        expected = sample_sl_principles(constitution, num_revisions, np.random.default_rng([BASE.seed, i]))
        assert [rd["principle_id"] for rd in row["rounds"]] == [p.id for p in expected]


# ---------------------------------------------------------------- modes and prompt strings


def test_golden_strings_in_both_renderings(lm):
    turns = dialogue_turns("P", "R", [{"critique_request": "CR", "critique": "C", "revision_request": "RR"}])
    assert render_step(lm.tokenizer, turns, "revision", "transcript") == (
        "\n\nHuman: P\n\nAssistant: R\n\nCritiqueRequest: CR\n\nCritique: C\n\nRevisionRequest: RR\n\nRevision:"
    )
    assert render_step(lm.tokenizer, turns, "revision", "chat") == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nP<|im_end|>\n"
        "<|im_start|>assistant\nR<|im_end|>\n"
        "<|im_start|>user\nCR<|im_end|>\n"
        "<|im_start|>assistant\nC<|im_end|>\n"
        "<|im_start|>user\nRR<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    start = dialogue_turns("P", None, [])
    assert render_step(lm.tokenizer, start, "assistant", "transcript") == "\n\nHuman: P\n\nAssistant:"
    assert render_step(lm.tokenizer, start, "assistant", "chat") == chatml(("user", "P"))


def test_direct_mode_has_no_critique_and_another_revision_prompt(lm, prompts, constitution, tmp_path, monkeypatch):
    # By construction: the direct revision prompt lacks the critique turns.
    crit = dialogue_turns("P", "R", [{"critique_request": "CR", "critique": "C", "revision_request": "RR"}])
    direct = dialogue_turns("P", "R", [{"critique_request": None, "critique": None, "revision_request": "RR"}])
    for rendering in ("chat", "transcript"):
        a = render_step(lm.tokenizer, crit, "revision", rendering)
        b = render_step(lm.tokenizer, direct, "revision", rendering)
        assert a != b and "CR" in a and "CR" not in b and "RR" in b
    assert render_step(lm.tokenizer, direct, "revision", "transcript") == (
        "\n\nHuman: P\n\nAssistant: R\n\nRevisionRequest: RR\n\nRevision:"
    )
    assert render_step(lm.tokenizer, direct, "revision", "chat") == chatml(
        ("user", "P"), ("assistant", "R"), ("user", "RR")
    )

    # End to end on the tiny model, recording what the engine feeds it.
    calls, real = [], rev._generate_step

    def spy(lm_, texts, key, settings):
        calls.append(list(texts))
        return real(lm_, texts, key, settings)

    monkeypatch.setattr(rev, "_generate_step", spy)
    settings = dataclasses.replace(BASE, mode="direct", num_revisions=1)
    run_revisions(lm, prompts[:2], constitution, settings, tmp_path, progress=False)
    rows = load_revisions(tmp_path).to_list()
    assert len(calls) == 2  # answer, revision: no critique step
    for j, row in enumerate(rows):
        (rd,) = row["rounds"]
        assert rd["critique"] is None and rd["critique_request"] is None
        pr = sample_sl_principles(constitution, 1, np.random.default_rng([BASE.seed, j]), k=BASE.num_principles)[0]
        assert rd["principle_id"] == pr.id and rd["revision_request"] == pr.revision_request
        fed = calls[1][j]
        assert fed == chatml(
            ("user", row["prompt"]), ("assistant", row["initial_response"]), ("user", pr.revision_request)
        )
        assert pr.critique_request not in fed


def test_engine_feeds_the_growing_dialogue(lm, constitution, tmp_path, monkeypatch):
    """Every step's prompt, transcript rendering, 2 rounds: hand-built strings."""
    calls = []
    monkeypatch.setattr(rev, "_generate_step", recorder(calls))
    ps = [Prompt("a", "First question?", "test"), Prompt("b", "Second question?", "test")]
    settings = revision_settings(num_revisions=2, max_new_tokens=8, batch_size=2, rendering="transcript", seed=7)
    run_revisions(lm, ps, constitution, settings, tmp_path, progress=False)
    rows = load_revisions(tmp_path).to_list()
    assert len(calls) == 5  # answer + 2 x (critique, revision)
    for j, p in enumerate(ps):
        pr = sample_sl_principles(constitution, 2, np.random.default_rng([7, j]))
        text = f"\n\nHuman: {p.text}\n\nAssistant:"
        assert calls[0][j] == text
        text += f" out0.{j}\n\nCritiqueRequest: {pr[0].critique_request}\n\nCritique:"
        assert calls[1][j] == text
        text += f" out1.{j}\n\nRevisionRequest: {pr[0].revision_request}\n\nRevision:"
        assert calls[2][j] == text
        text += f" out2.{j}\n\nCritiqueRequest: {pr[1].critique_request}\n\nCritique:"
        assert calls[3][j] == text
        text += f" out3.{j}\n\nRevisionRequest: {pr[1].revision_request}\n\nRevision:"
        assert calls[4][j] == text
        assert rows[j]["initial_response"] == f"out0.{j}"
        assert [(r["critique"], r["revision"]) for r in rows[j]["rounds"]] == [
            (f"out1.{j}", f"out2.{j}"),
            (f"out3.{j}", f"out4.{j}"),
        ]


@pytest.mark.parametrize("mode", ["critique", "direct"])
def test_few_shot_transcript_precedes_the_dialogue(lm, constitution, tmp_path, monkeypatch, mode):
    calls = []
    monkeypatch.setattr(rev, "_generate_step", recorder(calls))
    shot = constitution.sl_few_shots[0]
    assert [m["role"] for m in shot.conversation] == ["user", "assistant"]
    label = {"user": "Human", "assistant": "Assistant"}
    few = "".join(f"\n\n{label[m['role']]}: {m['content']}" for m in shot.conversation)
    chat_few = [(m["role"], m["content"]) for m in shot.conversation]
    for r in shot.rounds:
        if mode == "critique":
            few += f"\n\nCritiqueRequest: {r.critique_request}\n\nCritique: {r.critique}"
            chat_few += [("user", r.critique_request), ("assistant", r.critique)]
        few += f"\n\nRevisionRequest: {r.revision_request}\n\nRevision: {r.revision}"
        chat_few += [("user", r.revision_request), ("assistant", r.revision)]
    ps = [Prompt("a", "P", "test")]
    for rendering in ("transcript", "chat"):
        calls.clear()
        settings = revision_settings(
            num_revisions=1,
            num_principles=None,
            num_few_shots=1,
            mode=mode,
            rendering=rendering,
            max_new_tokens=8,
            seed=0,
        )
        run_revisions(lm, ps, constitution, settings, tmp_path / rendering, progress=False)
        pr = sample_sl_principles(constitution, 1, np.random.default_rng([0, 0]))[0]
        if rendering == "transcript":
            assert calls[0] == [few + "\n\nHuman: P\n\nAssistant:"]
            assert calls[-1] == [
                few
                + "\n\nHuman: P\n\nAssistant: out0.0"
                + (f"\n\nCritiqueRequest: {pr.critique_request}\n\nCritique: out1.0" if mode == "critique" else "")
                + f"\n\nRevisionRequest: {pr.revision_request}\n\nRevision:"
            ]
        else:
            assert calls[0] == [chatml(*chat_few, ("user", "P"))]
            mid = [("user", pr.critique_request), ("assistant", "out1.0")] if mode == "critique" else []
            assert calls[-1] == [
                chatml(*chat_few, ("user", "P"), ("assistant", "out0.0"), *mid, ("user", pr.revision_request))
            ]
        if mode == "direct":
            assert not any("CritiqueRequest" in t or shot.rounds[0].critique in t for c in calls for t in c)


# ---------------------------------------------------------------- clean-up


def test_clean_text_cuts_strips_and_counts():
    counts = collections.Counter()
    assert clean_text(" A fine answer.\n\nHuman: next question", counts) == "A fine answer."
    assert counts == {"cut_at_role_label": 1}
    counts.clear()
    assert clean_text(" Revision: Better answer.\n\nCritiqueRequest: x", counts) == "Better answer."
    assert counts == {"cut_at_role_label": 1, "echoed_label": 1}
    counts.clear()
    assert clean_text("Sure, here is a revised response: I can't help with that.", counts) == (
        "I can't help with that."
    )
    assert counts == {"boilerplate_prefix": 1}
    counts.clear()
    text = "Revision: Sure, here is a revised response: Let's talk.\n\nHuman: ok\n\nAssistant: no"
    assert clean_text(text, counts) == "Let's talk."
    assert counts == {"cut_at_role_label": 1, "echoed_label": 1, "boilerplate_prefix": 1}
    counts.clear()
    plain = "Here is why: a revision request is not a label."
    assert clean_text(plain, counts) == plain and not counts
    for stop in TRANSCRIPT_STOPS:  # every role label cuts, also those of the CAI steps
        assert clean_text(f"keep{stop} drop", collections.Counter()) == "keep"


# ---------------------------------------------------------------- resume and processes


def test_cleanup_counts_survive_resume_and_rerun(lm, prompts, constitution, tmp_path, monkeypatch):
    def messy(lm_, texts, key, settings):
        return [" Revision: Sure, here is a revised response: fine.\n\nHuman: more"] * len(texts)

    monkeypatch.setattr(rev, "_generate_step", messy)
    stats = lambda d: json.loads((d / "cleanup-p000.json").read_text())
    run_revisions(lm, prompts, constitution, BASE, tmp_path / "a", progress=False)
    steps = len(prompts) * (1 + 2 * BASE.num_revisions)
    fixes = ("cut_at_role_label", "echoed_label", "boilerplate_prefix")
    assert stats(tmp_path / "a")["total"] == dict.fromkeys(fixes, steps)

    _run_killed_on_second_batch(lm, prompts, constitution, tmp_path / "b", monkeypatch)
    for _ in range(2):  # resume, then rerun the finished folder
        run_revisions(lm, prompts, constitution, BASE, tmp_path / "b", progress=False)
        assert stats(tmp_path / "b") == stats(tmp_path / "a")


def _run_killed_on_second_batch(lm, prompts, constitution, out_dir, monkeypatch):
    """run_revisions with BASE settings, interrupted as the second batch starts (a simulated kill)."""
    real, calls = rev.revise_batch, []

    def killed_on_second_batch(*args, **kwargs):
        calls.append(args[3])
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(rev, "revise_batch", killed_on_second_batch)
        with pytest.raises(KeyboardInterrupt):
            run_revisions(lm, prompts, constitution, BASE, out_dir, progress=False)


def test_resume_after_kill_equals_uninterrupted_run(lm, prompts, constitution, base_run, tmp_path, monkeypatch):
    a_dir, a_rows = base_run
    b_dir = tmp_path / "b"
    _run_killed_on_second_batch(lm, prompts, constitution, b_dir, monkeypatch)
    real, calls = rev.revise_batch, []
    assert [p.name for p in b_dir.glob("rows-*")] == ["rows-p000-b000000.jsonl"]
    assert not (b_dir / "DONE-p000").exists()
    # A half-written shard from the killed batch must not count as done.
    (b_dir / "rows-p000-b000001.tmp").write_text('{"id": "rt-0002", "prompt": "trunc')
    assert len(load_revisions(b_dir)) == 2

    with monkeypatch.context() as m:
        m.setattr(rev, "revise_batch", lambda *a, **k: (calls.append(a[3]), real(*a, **k))[1])
        run_revisions(lm, prompts, constitution, BASE, b_dir, progress=False)
    assert calls == [[2, 3]]  # only the missing batch ran
    assert not list(b_dir.glob("*.tmp"))
    b_rows = load_revisions(b_dir).to_list()
    assert b_rows == a_rows  # same rows, same order
    assert len({r["id"] for r in b_rows}) == len(prompts)
    assert shards(a_dir).keys() == shards(b_dir).keys()
    assert all(shards(a_dir)[k][1] == v[1] for k, v in shards(b_dir).items())
    assert (b_dir / "DONE-p000").exists()

    # Rerunning a finished folder does nothing.
    before = shards(b_dir)
    meta = (b_dir / "meta.json").read_bytes()
    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(rev, "revise_batch", lambda *a, **k: (calls.append(a[3]), real(*a, **k))[1])
        run_revisions(lm, prompts, constitution, BASE, b_dir, progress=False)
    assert calls == [] and shards(b_dir) == before and (b_dir / "meta.json").read_bytes() == meta


def test_folder_of_other_settings_is_refused(lm, prompts, constitution, tmp_path, monkeypatch):
    monkeypatch.setattr(rev, "_generate_step", recorder([]))
    settings = dataclasses.replace(BASE, num_few_shots=1)
    run_revisions(lm, prompts, constitution, settings, tmp_path, progress=False)
    before = shards(tmp_path)
    others = {
        "seed": (prompts, constitution, dataclasses.replace(settings, seed=4)),
        "mode": (prompts, constitution, dataclasses.replace(settings, mode="direct")),
        "prompts": (prompts[:3], constitution, settings),
        "principles": (
            prompts,
            dataclasses.replace(constitution, sl_principles=constitution.sl_principles[::-1]),
            settings,
        ),
        "few-shots": (
            prompts,
            dataclasses.replace(constitution, sl_few_shots=constitution.sl_few_shots[::-1]),
            settings,
        ),
    }
    for what, (ps, c, s) in others.items():
        with pytest.raises(ValueError, match="fingerprint"):
            run_revisions(lm, ps, c, s, tmp_path, progress=False)
        assert shards(tmp_path) == before, what
    run_revisions(lm, prompts, constitution, settings, tmp_path, progress=False)  # same settings: fine
    assert shards(tmp_path) == before


def test_processes_write_every_prompt_once(lm, constitution, tmp_path, monkeypatch):
    monkeypatch.setattr(rev, "_generate_step", recorder([]))
    ps = shipped_prompts("red_team")[:5]
    settings = dataclasses.replace(BASE, batch_size=2)
    for index in (0, 1):
        run_revisions(lm, ps, constitution, settings, tmp_path, process_index=index, process_count=2, progress=False)
    names = sorted(p.name for p in tmp_path.glob("rows-*"))
    assert names == ["rows-p000-b000000.jsonl", "rows-p000-b000001.jsonl", "rows-p001-b000000.jsonl"]
    assert (tmp_path / "DONE-p000").exists() and (tmp_path / "DONE-p001").exists()
    rows = load_revisions(tmp_path).to_list()
    assert sorted(r["id"] for r in rows) == sorted(p.id for p in ps)
    # A prompt's principles depend on its global index, not on the process that ran it.
    for r in rows:
        i = next(i for i, p in enumerate(ps) if p.id == r["id"])
        expected = sample_sl_principles(constitution, 1, np.random.default_rng([BASE.seed, i]), k=4)
        assert [rd["principle_id"] for rd in r["rounds"]] == [p.id for p in expected]


@pytest.mark.parametrize("mode", ["critique", "direct"])
def test_progress_ticks_after_every_generate_call(lm, constitution, tmp_path, monkeypatch, mode):
    events, record = [], recorder([])
    real_tick = Progress.tick

    def tick(self, n=1):
        real_tick(self, n)
        if n:
            events.append(("tick", self.done, self.total))

    monkeypatch.setattr(Progress, "tick", tick)
    monkeypatch.setattr(rev, "_generate_step", lambda *a: (events.append("generate"), record(*a))[1])
    ps = [Prompt(f"p{i}", f"Question {i}?", "test") for i in range(3)]
    settings = dataclasses.replace(BASE, num_revisions=2, batch_size=2, mode=mode)
    run_revisions(lm, ps, constitution, settings, tmp_path, progress=False)
    steps = 5 if mode == "critique" else 3  # the answer, then (critique,) revision per round
    expected, done = [], 0
    for size in (2, 1):  # batches of 2 and 1 prompts
        for _ in range(steps):
            done += size
            expected += ["generate", ("tick", done, 3 * steps)]
    assert events == expected


# ---------------------------------------------------------------- bad input


def test_bad_input_is_refused_with_a_clear_error(lm, prompts, constitution, base_run):
    out, rows = base_run
    before = shards(out)
    with pytest.raises(ValueError, match="empty"):
        run_revisions(lm, [], constitution, BASE, out, progress=False)
    with pytest.raises(ValueError, match="'blank-1'.*empty"):
        run_revisions(lm, [*prompts, Prompt("blank-1", "  \n ", "test")], constitution, BASE, out, progress=False)
    long = Prompt("long-1", "word " * 5000, "test")
    with pytest.raises(ValueError, match="'long-1'.*context"):
        run_revisions(lm, [*prompts, long], constitution, BASE, out, progress=False)
    with pytest.raises(ConstitutionError, match="k=17"):
        run_revisions(lm, prompts, constitution, dataclasses.replace(BASE, num_principles=17), out, progress=False)
    with pytest.raises(ValueError, match="num_few_shots=4.*3 SL few-shot"):
        run_revisions(lm, prompts, constitution, dataclasses.replace(BASE, num_few_shots=4), out, progress=False)
    with pytest.raises(ValueError, match=r"revisions\.mode='rewrite'"):
        revision_settings(mode="rewrite")
    with pytest.raises(ValueError, match=r"revisions\.rendering='raw'"):
        revision_settings(rendering="raw")
    with pytest.raises(ValueError, match="num_revisions"):
        revision_settings(num_revisions=-1)
    assert shards(out) == before  # nothing already written is lost
    assert load_revisions(out).to_list() == rows


def test_num_principles_checks_only_the_sl_principles(lm, constitution, tmp_path, monkeypatch):
    """k may exceed the number of *feedback* principles: the SL stage samples SL principles only."""
    monkeypatch.setattr(rev, "_generate_step", recorder([]))
    few_feedback = dataclasses.replace(constitution, feedback_principles=constitution.feedback_principles[:2])
    settings = dataclasses.replace(BASE, num_principles=8)
    run_revisions(lm, [Prompt("a", "P", "test")], few_feedback, settings, tmp_path, progress=False)
    (row,) = load_revisions(tmp_path).to_list()
    assert {rd["principle_id"] for rd in row["rounds"]} <= {p.id for p in constitution.sl_principles[:8]}


# ---------------------------------------------------------------- transcript rendering end to end


def test_transcript_rendering_end_to_end(lm, prompts, constitution, tmp_path):
    settings = dataclasses.replace(BASE, rendering="transcript", num_revisions=1)
    run_revisions(lm, prompts[:2], constitution, settings, tmp_path, progress=False)
    rows = load_revisions(tmp_path).to_list()
    assert [r["id"] for r in rows] == [p.id for p in prompts[:2]]
    for row in rows:
        (rd,) = row["rounds"]
        assert row["settings"]["rendering"] == "transcript"
        for text in (row["initial_response"], rd["critique"], rd["revision"]):
            assert isinstance(text, str) and not any(s in text for s in TRANSCRIPT_STOPS)
    assert json.loads((tmp_path / "meta.json").read_text())["num_prompts"] == 2
