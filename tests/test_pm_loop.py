"""The PM trainer on a tiny config: comparison rows, tokenisation, exact resume, the PM artifact, PMP -> PM."""

from __future__ import annotations

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.checkpoints.pm import load_pm, save_pm
from cai_jax.checkpoints.train_state import CheckpointConfig, Checkpointer
from cai_jax.losses import pm_loss
from cai_jax.models import ScalarModel, init_params, tiny_config
from cai_jax.sharding import make_mesh
from cai_jax.train.pm import (
    ComparisonError,
    PMBatcher,
    load_comparisons,
    mix_comparisons,
    scalar_model_params,
    score_pairs,
    tokenize_comparison,
    tokenize_comparisons,
    train_pm,
    train_pmp_then_pm,
)
from cai_jax.train.steps import pm_step
from tests.conftest import TESTDATA
from tests.defaults import checkpoint_config, optim_config

SEQ_LEN, BATCH = 48, 4
# Same fp32 program on CPU, different reduction grouping (a batch of 4 pairs vs a batch of 8 rows
# holding them): a few ulps.
SAME_MATH_RTOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    """A tiny in-memory byte-fallback tokenizer (3 specials + 256 bytes), with a ChatML-ish template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    t = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    t.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    return t


@pytest.fixture(scope="module")
def cfg():
    return tiny_config("llama", vocab_size=272)


@pytest.fixture(scope="module")
def lm_params(cfg):
    return jax.device_get(init_params(cfg, jax.random.key(0)))


def _comparisons(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        good, bad = "yes ok" * int(rng.integers(1, 3)), "no" * int(rng.integers(1, 4))
        a_good = bool(rng.integers(2))
        rows.append(
            {
                "prompt": f"q{i}?",
                "response_a": good if a_good else bad,
                "response_b": bad if a_good else good,
                "p": float(np.clip(rng.normal(0.8 if a_good else 0.2, 0.1), 0, 1)),
            }
        )
    return rows


def _run(cfg, params, rows, workdir, num_steps, tok, *, save_every=2, **kw):
    return train_pm(
        cfg,
        params,
        rows,
        optim_cfg=optim_config(lr=1e-3, schedule="constant", updates=num_steps),
        ckpt_cfg=CheckpointConfig(
            directory=str(workdir / "ckpt"), save_every_steps=save_every, keep_last=None, async_save=False
        ),
        num_steps=num_steps,
        batch_size=BATCH,
        seq_len=SEQ_LEN,
        seed=0,
        workdir=workdir,
        tokenizer=tok,
        rendering="transcript",
        **kw,
    )


def _rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- rows


@pytest.mark.parametrize(
    "row, field, problem",
    [
        ({"prompt": "q", "response_a": "a", "p": 0.5}, "response_b", "missing"),
        (
            {"prompt": "q", "response_a": "a", "response_b": "b", "p_a": 1.5},
            "p_a",
            "target 1.5 is not a finite number in",
        ),
        (
            {"prompt": "q", "response_a": "a", "response_b": "b", "p": math.nan},
            "p",
            "target nan is not a finite number in",
        ),
        ({"prompt": "q", "response_a": "a", "response_b": "b"}, "p_a", "missing target"),
        ({"prompt": "q", "response_a": 3, "response_b": "b", "p": 1}, "response_a", "expected a string"),
    ],
)
def test_bad_rows_are_clear_errors(row, field, problem, tmp_path):
    good = {"prompt": "q", "response_a": "a", "response_b": "b", "p": 1.0}
    with pytest.raises(ComparisonError, match=rf"^comparisons: row 2: field '{field}': {problem}"):
        load_comparisons([good, row])
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(row) + "\n")  # the bad row is on line 3
    with pytest.raises(ComparisonError, match=rf"rows.jsonl: row 3: field '{field}'"):
        load_comparisons(path)


def test_rows_p_alias_and_hh_rlhf_transcripts():
    rows = load_comparisons(
        [
            {"prompt": "q", "response_a": "a", "response_b": "b", "p": 0.25, "qid": "x"},
            {
                "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: Sure, here.",
                "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: No.",
            },
        ]
    )
    assert rows[0] == {"prompt": "q", "response_a": "a", "response_b": "b", "p_a": 0.25, "qid": "x"}
    assert rows[1]["p_a"] == 1.0 and (rows[1]["response_a"], rows[1]["response_b"]) == ("Sure, here.", "No.")
    assert [m["role"] for m in rows[1]["prompt"]] == ["user", "assistant", "user"]
    with pytest.raises(ComparisonError, match="row 1: field 'rejected': chosen and rejected differ"):
        load_comparisons([{"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}])


def test_mix_comparisons_fraction_and_determinism():
    harm, helpful = _comparisons(6), [{**r, "p": 1.0} for r in _comparisons(20, seed=1)]
    mix = mix_comparisons(harm, helpful, helpful_fraction=0.25, seed=3)
    assert [r["source"] for r in mix] == ["harmless"] * 6 + ["helpful"] * 2
    assert all(r["p_a"] == 1.0 for r in mix[6:])
    assert mix == mix_comparisons(harm, helpful, helpful_fraction=0.25, seed=3)
    assert len(mix_comparisons(harm, helpful[:1], helpful_fraction=0.5)) == 7  # capped
    with pytest.raises(ValueError, match="helpful_fraction"):
        mix_comparisons(harm, helpful, helpful_fraction=1.0)


def test_tokenisation_truncates_the_prompt_from_the_left(tok):
    row = load_comparisons([{"prompt": "p" * 30, "response_a": "good", "response_b": "bad!", "p": 1.0}])[0]
    full, cut = tokenize_comparison(tok, row, seq_len=100, rendering="transcript")
    assert cut == 0
    assert tok.decode(full["input_ids_a"]) == "\n\nHuman: " + "p" * 30 + "\n\nAssistant: good</s>"
    short, cut = tokenize_comparison(tok, row, seq_len=20, rendering="transcript")
    assert cut == 1 and len(short["input_ids_a"]) == 20
    assert short["input_ids_a"] == full["input_ids_a"][-20:]  # the prompt's start is what goes
    chat, _ = tokenize_comparison(tok, row, seq_len=100, rendering="chat")
    assert tok.decode(chat["input_ids_b"]) == "[user]" + "p" * 30 + "</s>[assistant]bad!</s>"
    pairs = tokenize_comparisons([row] * 4, tok, seq_len=20, rendering="transcript")
    batcher = PMBatcher(pairs, batch_size=2, seq_len=20)
    batch, _ = batcher.next()
    assert {k: v.shape for k, v in batch.items()} == {
        "tokens_a": (2, 20), "mask_a": (2, 20), "tokens_b": (2, 20), "mask_b": (2, 20), "p": (2,),
    }  # fmt: skip
    assert batcher.num_truncated == 0  # already cut by tokenisation


def test_pm_batcher_resumes_exactly(tok):
    pairs = tokenize_comparisons(load_comparisons(_comparisons(10)), tok, seq_len=SEQ_LEN, rendering="transcript")
    ref = PMBatcher(pairs, batch_size=BATCH, seq_len=SEQ_LEN, seed=4)
    want = [ref.next() for _ in range(6)]
    part = PMBatcher(pairs, batch_size=BATCH, seq_len=SEQ_LEN, seed=4)
    for _ in range(3):
        part.next()
    resumed = PMBatcher(pairs, batch_size=BATCH, seq_len=SEQ_LEN, seed=4)
    resumed.restore(json.loads(json.dumps(part.state())))
    for batch, bid in want[3:]:
        got, got_id = resumed.next()
        assert got_id == bid
        for k in batch:
            np.testing.assert_array_equal(got[k], batch[k])


# ---------------------------------------------------------------- params


@pytest.fixture(scope="module")
def untied():
    """tests/testdata/tiny-qwen2 (untied embeddings: the LM has an lm_head the PM must drop)."""
    from cai_jax.checkpoints.hf import load_hf_params

    return load_hf_params(TESTDATA / "tiny-qwen2")


def test_lm_params_become_the_backbone(untied):
    cfg, lm = untied
    assert "lm_head" in lm
    pm = scalar_model_params(lm, cfg, seed=0)
    assert set(pm) == {"backbone", "head"} and "lm_head" not in pm["backbone"]
    assert pm["head"]["kernel"].shape == (cfg.hidden_size, 1) and float(jnp.abs(pm["head"]["bias"]).max()) == 0
    for x, y in zip(jax.tree.leaves({k: v for k, v in lm.items() if k != "lm_head"}), jax.tree.leaves(pm["backbone"])):
        np.testing.assert_array_equal(x, y)
    again = scalar_model_params(pm, cfg, seed=1)  # ScalarModel params pass through: no new head
    np.testing.assert_array_equal(again["head"]["kernel"], pm["head"]["kernel"])
    with pytest.raises(ValueError, match="missing backbone/layers_1"):
        scalar_model_params({k: v for k, v in lm.items() if k != "layers_1"}, cfg)


# ---------------------------------------------------------------- the trainer


def test_resume_matches_uninterrupted_and_artifact_round_trips(cfg, lm_params, tok, tmp_path):
    rows = _comparisons(12)
    evals = _comparisons(6, seed=9)
    a, b = tmp_path / "a", tmp_path / "b"
    res_a = _run(cfg, lm_params, rows, a, 4, tok, eval_comparisons=evals, export_dir=a / "export")
    _run(cfg, lm_params, rows, b, 2, tok)
    assert [r["step"] for r in _rows(b)] == [1, 2]
    res_b = _run(cfg, lm_params, rows, b, 4, tok, eval_comparisons=evals)

    rows_a, rows_b = _rows(a), _rows(b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2, 3, 4]
    for key in ("loss", "accuracy", "grad_norm", "reward_mean", "batch_id", "tokens_in_batch"):
        assert [r[key] for r in rows_a] == [r[key] for r in rows_b], key
    assert rows_a[3]["batch_id"] == "epoch 1 index 0"
    for x, y in zip(jax.tree.leaves(res_a.state.params), jax.tree.leaves(res_b.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert all(r["tokens_per_s"] > 0 for r in rows_a)

    report = json.loads((a / "eval.json").read_text())
    assert report == json.loads((b / "eval.json").read_text())
    assert report["steps"] == 4 and report["eval"]["n"] == 6 and 0 <= report["eval"]["ece"] <= 1
    assert sum(report["eval"]["bins"]["count"]) == 6 and report["reward_count"] == 24
    assert report["reward_std"] > 0 and "ECE" in report["reliability_table"]

    # The first logged loss is pm_loss of the initial params on the first batch, recomputed here.
    first = PMBatcher(
        tokenize_comparisons(load_comparisons(rows), tok, seq_len=SEQ_LEN, rendering="transcript"),
        batch_size=BATCH, seq_len=SEQ_LEN, seed=0, pad_id=tok.pad_token_id or tok.eos_token_id,
    )  # fmt: skip
    batch, _ = first.next()
    scores = score_pairs(
        scalar_model_params(lm_params, cfg, seed=0), ScalarModel(cfg), batch, batch_size=BATCH, mesh=make_mesh()
    )
    loss, _ = pm_loss(jnp.asarray(scores["r_a"]), jnp.asarray(scores["r_b"]), jnp.asarray(batch["p"]))
    np.testing.assert_allclose(rows_a[0]["loss"], float(loss), rtol=SAME_MATH_RTOL)

    # The exported artifact: bit-exact params, the same scores, the reward statistics.
    pm = load_pm(a / "export")
    trained = jax.device_get(res_a.state.params)
    assert jax.tree.structure(pm.params) == jax.tree.structure(trained)
    for x, y in zip(jax.tree.leaves(trained), jax.tree.leaves(pm.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert (pm.reward_mean, pm.reward_std, pm.count) == (report["reward_mean"], report["reward_std"], 24)
    assert pm.config == cfg and pm.tokenizer is not None and pm.metadata["eval"]["n"] == 6
    ids = [tok("\n\nHuman: q?\n\nAssistant: yes ok</s>", add_special_tokens=False)["input_ids"], [5, 6, 7]]
    direct = ScalarModel(cfg).apply({"params": trained}, jnp.asarray([ids[0]]), jnp.ones((1, len(ids[0])), bool))
    got = pm.score(ids)
    assert got.shape == (2,) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], np.asarray(direct)[0], rtol=SAME_MATH_RTOL)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(cfg, lm_params, tok, tmp_path):
    def nan_at_step_3(state, batch, *, model, optimizer, centering):
        new_state, metrics = pm_step(state, batch, model=model, optimizer=optimizer, centering=centering)
        return new_state, {**metrics, "loss": jnp.where(state.step == 2, jnp.nan, metrics["loss"])}

    with pytest.raises(FloatingPointError, match="step 3"):
        _run(cfg, lm_params, _comparisons(12), tmp_path, 4, tok, step_fn=nan_at_step_3)
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2]
    ckpt = Checkpointer(checkpoint_config(tmp_path / "ckpt"))
    assert ckpt.all_steps() == [2]
    ckpt.close()
    assert not (tmp_path / "eval.json").exists()


def test_pm_artifact_errors_and_untied_round_trip(untied, tmp_path):
    cfg, lm = untied
    params = scalar_model_params(lm, cfg, seed=5)
    save_pm(tmp_path / "pm", params, cfg, reward_stats={"mean": 0.5, "std": 2.0, "count": 10})
    save_pm(tmp_path / "pm", params, cfg, reward_stats={"mean": 0.25, "std": 2.0})  # replaces
    pm = load_pm(tmp_path / "pm")
    assert pm.config == cfg and pm.reward_mean == 0.25 and pm.tokenizer is None
    for x, y in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(pm.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert [p.name for p in tmp_path.iterdir()] == ["pm"]  # no temporary folders left behind
    (tmp_path / "pm" / "score_head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"PM folder .*pm: missing score_head.safetensors"):
        load_pm(tmp_path / "pm")
    with pytest.raises(ValueError, match="ScalarModel params"):
        save_pm(tmp_path / "x", params["backbone"], cfg)


def test_pmp_then_pm_chain_on_the_shipped_sample(cfg, lm_params, tok, tmp_path):
    from cai_jax.cai.pmp import build_pmp_pairs, shipped_pmp_sample

    pmp_rows = build_pmp_pairs(shipped_pmp_sample(), max_pairs_per_question=2)
    phase = dict(optim_cfg=optim_config(lr=1e-3, schedule="constant", updates=2), num_steps=2, batch_size=BATCH)
    pmp, pm = train_pmp_then_pm(
        cfg,
        lm_params,
        pmp_rows,
        _comparisons(8),
        pmp=dict(phase, workdir=tmp_path / "pmp", reward_stats_max_pairs=0),
        pm=dict(
            phase, workdir=tmp_path / "pm", export_dir=tmp_path / "export", eval_comparisons=_comparisons(4, seed=7)
        ),
        seq_len=64,
        tokenizer=tok,
        rendering="transcript",
    )
    assert [r["step"] for r in _rows(tmp_path / "pmp")] == [1, 2]
    assert [r["step"] for r in _rows(tmp_path / "pm")] == [1, 2]
    assert pmp.report["reward_mean"] is None and pm.report["reward_std"] > 0
    assert pm.report["eval"]["n"] == 4
    assert load_pm(tmp_path / "export").count == 16  # both sides of the 8 training comparisons


@pytest.mark.parametrize("missing", ["rejected", "chosen"])
def test_hh_rlhf_row_missing_one_side_names_that_side(missing, tmp_path):
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    half = {k: v for k, v in hh.items() if k != missing}
    path = tmp_path / "helpful.jsonl"
    path.write_text(json.dumps(hh) + "\n" + json.dumps(half) + "\n")
    with pytest.raises(ComparisonError, match=rf"^{re.escape(str(path))}: row 2: field '{missing}': missing"):
        load_comparisons(path)
    with pytest.raises(ComparisonError, match=rf"^comparisons: row 2: field '{missing}': missing"):
        load_comparisons([hh, half])


def test_a_bad_feedback_shard_row_names_the_shard_line_and_field(tmp_path):
    from experiments.stages.pm import feedback_comparisons

    good = {"prompt": "q", "response_a": "a", "response_b": "b", "p_a": 0.75}
    (tmp_path / "rows-p000-b000000.jsonl").write_text(json.dumps(good) + "\n")
    shard = tmp_path / "rows-p000-b000001.jsonl"
    shard.write_text(json.dumps(good) + "\n" + json.dumps({**good, "p_a": 1.5}) + "\n")
    with pytest.raises(
        ComparisonError, match=rf"^{re.escape(str(shard))}: row 2: field 'p_a': target 1.5 is not a finite number"
    ):
        feedback_comparisons(tmp_path)
    shard.write_text(json.dumps(good) + "\n")
    assert feedback_comparisons(tmp_path) == [good, good]
