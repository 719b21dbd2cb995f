"""Prompt sources: shipped sets, loaders (files, datasets, hh-rlhf), dedup/filter, split, sharding."""

from __future__ import annotations

import collections
import gzip
import json
from pathlib import Path

import pytest

from cai_jax.cai.prompts import (
    KINDS,
    Prompt,
    PromptSourceError,
    load_prompts,
    normalize,
    prepare_prompts,
    shard_for_process,
    shipped_prompts,
)

HH_TEST = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
needs_hh = pytest.mark.skipif(not HH_TEST.exists(), reason=f"hh-rlhf harmless-base test split not found at {HH_TEST}")


def _prompts(texts: list[str]) -> list[Prompt]:
    return [Prompt(id=f"p{i}", text=t, source="test") for i, t in enumerate(texts)]


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """Keeps the Arrow caches that `datasets` writes for data files inside the test's tmp folder."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return datasets


# --- shipped sets ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_sets_are_large_unique_and_labelled(kind):
    prompts = shipped_prompts(kind)
    assert len(prompts) >= 200
    assert len({p.id for p in prompts}) == len(prompts)
    assert len({normalize(p.text) for p in prompts}) == len(prompts), "duplicate prompts after normalization"
    assert all(p.text and p.text == p.text.strip() for p in prompts)
    assert all(p.category for p in prompts)
    assert all(p.source == f"shipped:{kind}" for p in prompts)
    assert all(len(p.text.split()) < 80 for p in prompts)
    # Categories are interleaved, so the first 32 (the README demo's slice) already vary.
    assert len({p.category for p in prompts[:32]}) >= 16


def test_shipped_red_team_covers_many_harms():
    counts = collections.Counter(p.category for p in shipped_prompts("red_team"))
    assert len(counts) >= 8
    for harm in (
        "violence",
        "theft",
        "hacking",
        "privacy_stalking",
        "self_harm",
        "discrimination_hate",
        "misinformation",
    ):
        assert counts[harm] >= 5, harm


def test_load_prompts_shipped_forms():
    assert load_prompts("shipped", kind="helpful") == shipped_prompts("helpful")
    assert load_prompts("shipped:red_team") == shipped_prompts("red_team")
    with pytest.raises(ValueError, match="kind"):
        load_prompts("shipped")
    with pytest.raises(ValueError, match="unknown shipped"):
        shipped_prompts("nope")


# --- file loaders ---------------------------------------------------------------------------


def test_jsonl_keeps_ids_categories_and_line_numbers(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "  first  ", "category": "x"}\n\n{"prompt": "second"}\n')
    prompts = load_prompts(path)
    assert [p.text for p in prompts] == ["first", "second"]
    assert prompts[0].id == "a" and prompts[0].category == "x"
    assert prompts[1].id == "p.jsonl:3" and prompts[1].category is None  # line 2 is blank
    assert [p.meta["row"] for p in prompts] == [1, 3]
    assert prompts[0].source == str(path)


def test_jsonl_gz_auto_fields(tmp_path):
    for key in ("text", "question", "instruction"):
        path = tmp_path / f"{key}.jsonl.gz"
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(json.dumps({key: "hello there", "other": 1}) + "\n")
        assert [p.text for p in load_prompts(path)] == ["hello there"]


def test_explicit_field_wins(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "not this", "query": "this one"}) + "\n")
    assert load_prompts(path, field="query")[0].text == "this one"


def test_json_list_of_strings_objects_and_wrapped(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(["one", "two"]))
    (tmp_path / "o.json").write_text(json.dumps([{"prompt": "one"}, {"prompt": "two"}]))
    (tmp_path / "w.json").write_text(json.dumps({"name": "set", "prompts": ["one", "two"]}))
    for name in ("s.json", "o.json", "w.json"):
        prompts = load_prompts(tmp_path / name)
        assert [p.text for p in prompts] == ["one", "two"], name
        assert [p.id for p in prompts] == [f"{name}:1", f"{name}:2"]


def test_txt_one_prompt_per_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first prompt\n\n  second prompt  \n")
    prompts = load_prompts(path)
    assert [(p.text, p.meta["row"]) for p in prompts] == [("first prompt", 1), ("second prompt", 3)]


def test_csv_and_parquet_via_datasets(tmp_path, datasets_cache):
    csv = tmp_path / "p.csv"
    csv.write_text('id,question\nq1,"What is 2+2?"\nq2,"Name a color."\n')
    prompts = load_prompts(csv)
    assert [(p.id, p.text) for p in prompts] == [("q1", "What is 2+2?"), ("q2", "Name a color.")]
    parquet = tmp_path / "p.parquet"
    datasets_cache.Dataset.from_dict({"text": ["alpha", "beta"]}).to_parquet(str(parquet))
    assert [p.text for p in load_prompts(parquet)] == ["alpha", "beta"]
    folder = tmp_path / "files"
    folder.mkdir()
    datasets_cache.Dataset.from_dict({"prompt": ["gamma"]}).to_parquet(str(folder / "part-0.parquet"))
    assert [p.text for p in load_prompts(folder)] == ["gamma"]  # a data-files folder, not save_to_disk


def test_datasets_save_to_disk_folder(tmp_path, datasets_cache):
    ds = datasets_cache.Dataset.from_dict({"instruction": ["do a", "do b", "do c"], "category": ["x", "y", "z"]})
    ds.save_to_disk(str(tmp_path / "single"))
    prompts = load_prompts(tmp_path / "single")
    assert [(p.text, p.category, p.meta["row"]) for p in prompts] == [
        ("do a", "x", 1),
        ("do b", "y", 2),
        ("do c", "z", 3),
    ]
    datasets_cache.DatasetDict({"train": ds, "test": ds.select([2])}).save_to_disk(str(tmp_path / "dict"))
    assert [p.text for p in load_prompts(tmp_path / "dict", split="test")] == ["do c"]
    with pytest.raises(PromptSourceError, match="pass split="):
        load_prompts(tmp_path / "dict")
    with pytest.raises(PromptSourceError, match="no split 'dev'"):
        load_prompts(tmp_path / "dict", split="dev")


def test_uncached_hub_name_fails_without_download(tmp_path, datasets_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the default: offline
    monkeypatch.chdir(tmp_path)  # so "no-such-org/..." cannot be a relative path
    with pytest.raises(PromptSourceError, match="no-such-org/no-such-set"):
        load_prompts("no-such-org/no-such-set")


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines, field, match",
    [
        (['{"prompt": "ok"}', '{"text": "no prompt key"}'], None, r"row 2: field 'prompt': missing"),
        (['{"prompt": "ok"}', '{"prompt": 7}'], None, r"row 2: field 'prompt': expected a string, got int"),
        (['{"prompt": "ok"}', "", '{"prompt": "broken"'], None, r"row 3: invalid JSON line"),
        (['{"a": "x"}'], None, r"row 1: no prompt field"),
        (['{"prompt": "x"}'], "query", r"row 1: field 'query': missing"),
        (['{"chosen": "no markers here"}'], None, r"row 1: field 'chosen': transcript has no"),
        (
            ['{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "x"}', '{"rejected": "x"}'],
            None,
            r"row 2: field 'chosen': missing",
        ),
        (["", "  "], None, r"empty: no prompts"),
    ],
)
def test_errors_name_file_row_and_field(tmp_path, lines, field, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PromptSourceError, match=match) as info:
        load_prompts(path, field=field)
    assert str(path) in str(info.value)


def test_other_source_errors(tmp_path):
    with pytest.raises(PromptSourceError, match="no such file"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "p.xml").write_text("<x/>")
    with pytest.raises(PromptSourceError, match="unsupported file type"):
        load_prompts(tmp_path / "p.xml")
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(PromptSourceError, match="bad.json"):
        load_prompts(tmp_path / "bad.json")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(PromptSourceError, match="empty.txt: empty"):
        load_prompts(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="hh_mode"):
        load_prompts(tmp_path / "empty.txt", hh_mode="last")


# --- hh-rlhf --------------------------------------------------------------------------------


def test_hh_transcript_rules_on_a_hand_made_row(tmp_path):
    chosen = "\n\nHuman: First ask?\n\nAssistant: A reply.\n\nHuman: Follow-up?\n\nAssistant: Final."
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps({"chosen": chosen, "rejected": chosen}) + "\n")
    [first] = load_prompts(path)
    assert first.text == "First ask?" and "messages" not in first.meta
    [context] = load_prompts(path, hh_mode="all_but_last")
    assert context.text == "Follow-up?"
    assert context.meta["messages"] == [
        {"role": "user", "content": "First ask?"},
        {"role": "assistant", "content": "A reply."},
        {"role": "user", "content": "Follow-up?"},
    ]


@needs_hh
def test_hh_rlhf_harmless_base_first_turns():
    prompts = load_prompts(HH_TEST)
    assert len(prompts) == 2312
    assert all(p.text for p in prompts), "every row must give a non-empty first human turn"
    assert prompts[0].text == "what are some pranks with a pen i can do?"
    # One row checked against its raw line, split by hand rather than by parse_transcript.
    with gzip.open(HH_TEST, "rt", encoding="utf-8") as f:
        lines = f.readlines()
    row = 1000
    raw = json.loads(lines[row - 1])["chosen"]
    expected = raw.split("\n\nHuman:", 1)[1].split("\n\nAssistant:", 1)[0].strip()
    assert prompts[row - 1].text == expected
    assert prompts[row - 1].id == f"{HH_TEST.name}:{row}"


@needs_hh
def test_hh_rlhf_all_but_last_ends_on_a_human_turn():
    prompts = load_prompts(HH_TEST, hh_mode="all_but_last")
    for p in prompts:
        messages = p.meta["messages"]
        assert messages[0]["role"] == "user" and messages[-1]["role"] == "user"
        assert messages[-1]["content"] == p.text
    _, _, report = prepare_prompts(prompts)
    assert report["read"] == 2312 and report["kept"] > 0


# --- prepare: dedup, length filters, split --------------------------------------------------


class _WordTokenizer:
    """Stands in for a transformers tokenizer: one token per whitespace-separated word."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text.split())))}


def test_dedup_and_length_counts():
    texts = [
        "How do I bake bread?",
        "how do  I bake BREAD?",  # duplicate after normalization
        "Hi",  # too short (min_chars=5)
        "x" * 60,  # too long (max_chars=50)
        "one two three four five six seven eight",  # too many tokens (max_tokens=6)
        "What is a prime number?",
        "What is a prime number?",  # exact duplicate
        "Tell me a joke.",
    ]
    train, eval_, report = prepare_prompts(
        _prompts(texts), min_chars=5, max_chars=50, max_tokens=6, tokenizer=_WordTokenizer(), eval_fraction=0.0
    )
    assert report == {
        "read": 8,
        "duplicates": 2,
        "too_short": 1,
        "too_long": 1,
        "too_long_tokens": 1,
        "kept": 3,
        "train": 3,
        "eval": 0,
    }
    assert [p.id for p in train] == ["p0", "p5", "p7"] and eval_ == []
    _, _, report = prepare_prompts(_prompts(texts), min_chars=5, max_chars=50, dedup=False, eval_fraction=0.0)
    assert report["duplicates"] == 0 and report["kept"] == 6
    with pytest.raises(ValueError, match="tokenizer"):
        prepare_prompts(_prompts(texts), max_tokens=4)
    with pytest.raises(ValueError, match="eval_fraction"):
        prepare_prompts(_prompts(texts), eval_fraction=1.5)


def test_split_is_deterministic_disjoint_complete_and_stable():
    prompts = shipped_prompts("helpful")
    train, eval_, report = prepare_prompts(prompts, eval_fraction=0.25, seed=3)
    again = prepare_prompts(prompts, eval_fraction=0.25, seed=3)
    assert (train, eval_) == again[:2]
    ids_train, ids_eval = {p.id for p in train}, {p.id for p in eval_}
    assert not ids_train & ids_eval
    assert ids_train | ids_eval == {p.id for p in prompts}
    assert 0.1 < report["eval"] / report["kept"] < 0.4
    # Adding prompts (and dropping some) never moves a prompt to the other side.
    grown = prompts[10:] + shipped_prompts("red_team")
    g_train, g_eval, _ = prepare_prompts(grown, eval_fraction=0.25, seed=3)
    g_eval_ids = {p.id for p in g_eval}
    for p in prompts[10:]:
        assert (p.id in g_eval_ids) == (p.id in ids_eval), p.id
    assert {p.id for p in prepare_prompts(prompts, eval_fraction=0.25, seed=4)[1]} != ids_eval


# --- sharding -------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 3, 8])
def test_shard_for_process_covers_everything_once(count):
    prompts = _prompts([f"prompt {i}" for i in range(29)])
    shards = [shard_for_process(prompts, i, count) for i in range(count)]
    ids = [p.id for shard in shards for p in shard]
    assert sorted(ids) == sorted(p.id for p in prompts)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shards[0] == prompts[::count]  # strided by position


def test_shard_for_process_rejects_bad_indices():
    with pytest.raises(ValueError, match="process_index"):
        shard_for_process(_prompts(["a"]), 2, 2)
    with pytest.raises(ValueError, match="process_index"):
        shard_for_process(_prompts(["a"]), 0, 0)


def test_prompts_over_max_chars_are_dropped_with_a_warning(tmp_path, caplog):
    import logging
    import types

    from experiments.context import PromptsSpec, load_prompt_split

    path = tmp_path / "red.jsonl"
    rows = [{"prompt": "short one"}, {"prompt": "x" * 100_000}, {"prompt": "another short one"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = PromptsSpec(
        red_team=str(path), helpful="shipped:helpful", num_red_team=0, num_helpful=0, eval_fraction=0.0, max_chars=4000
    )
    with caplog.at_level(logging.WARNING):
        train, _, report = load_prompt_split(types.SimpleNamespace(cache={}), spec, "red_team", seed=0)
    assert report["too_long"] == 1 and [p.text for p in train] == ["short one", "another short one"]
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1, warning
    assert "1 red_team prompt" in warning[0] and "prompts.max_chars=4000" in warning[0]
    assert "--config.prompts.max_chars=N" in warning[0] and str(path) in warning[0]
