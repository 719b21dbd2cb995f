"""The SFT loop on a tiny config: exact resume, memorisation, non-finite stop, truncation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.checkpoints.train_state import CheckpointConfig, Checkpointer
from cai_jax.models import Transformer, init_params, tiny_config
from cai_jax.sharding import make_mesh, param_shardings
from cai_jax.train.loop import state_shardings
from cai_jax.train.sft import SFTBatcher, train_sft
from cai_jax.train.state import TrainState, make_optimizer
from cai_jax.train.steps import sft_step
from tests.defaults import checkpoint_config, optim_config

SEQ_LEN, BATCH = 32, 4
ROOT = Path(__file__).resolve().parents[1]


def _examples(n: int, seed: int = 0, min_len: int = 12, max_len: int = 32) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        prompt = int(rng.integers(3, length - 2))
        ids = rng.integers(3, 256, size=length).tolist()
        out.append({"input_ids": ids, "loss_mask": [0] * prompt + [1] * (length - prompt)})
    return out


@pytest.fixture(scope="module")
def cfg():
    return tiny_config("llama")


@pytest.fixture(scope="module")
def params(cfg):
    return jax.device_get(init_params(cfg, jax.random.key(0)))


def _run(cfg, params, examples, workdir, num_steps, *, save_every=3, lr=1e-3, **kw):
    return train_sft(
        cfg,
        params,
        examples,
        optim_cfg=optim_config(lr=lr, schedule="constant", updates=num_steps),
        ckpt_cfg=CheckpointConfig(
            directory=str(workdir / "ckpt"), save_every_steps=save_every, keep_last=None, async_save=False
        ),
        num_steps=num_steps,
        batch_size=BATCH,
        seq_len=SEQ_LEN,
        seed=0,
        workdir=workdir,
        **kw,
    )


def _rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_resume_matches_uninterrupted(cfg, params, tmp_path):
    examples = _examples(12)
    a, b = tmp_path / "a", tmp_path / "b"
    state_a = _run(cfg, params, examples, a, 6)
    _run(cfg, params, examples, b, 3)
    assert [r["step"] for r in _rows(b)] == [1, 2, 3]
    state_b = _run(cfg, params, examples, b, 6)

    rows_a, rows_b = _rows(a), _rows(b)
    assert [r["step"] for r in rows_a] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5, 6]
    # Exact: the resumed run restores bit-identical state and data position and runs the same
    # compiled program on CPU, so there is nothing to be tolerant of.
    for key in ("loss", "accuracy", "tokens", "grad_norm", "lr"):
        assert [r[key] for r in rows_a] == [r[key] for r in rows_b], key
    assert [r["batch_id"] for r in rows_a] == [r["batch_id"] for r in rows_b]
    # 12 examples / batch 4: steps 4-6 are epoch 1 in its own shuffled order.
    assert rows_a[3]["batch_id"] == "epoch 1 index 0"
    assert int(state_a.step) == int(state_b.step) == 6
    for x, y in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert Checkpointer(checkpoint_config(b / "ckpt")).all_steps() == [3, 6]


# A child that trains like `_run(..., 6)` and SIGKILLs itself once step 5's row is on disk (its last
# checkpoint is step 3): what kill -9 of a launch during SFT leaves behind.
KILLED_CHILD = """
import os, signal, sys
from pathlib import Path
import jax
from cai_jax import compile_cache
from cai_jax.models import init_params, tiny_config
from cai_jax.train import logs
from tests.test_sft_loop import _examples, _run

compile_cache.enable()
def kill_at_5(path, row):
    if row["step"] == 5:
        os.kill(os.getpid(), signal.SIGKILL)
logs.METRICS_SINKS.append(kill_at_5)
cfg = tiny_config("llama")
_run(cfg, jax.device_get(init_params(cfg, jax.random.key(0))), _examples(12), Path(sys.argv[1]), 6)
"""
TIMINGS = ("time/", "tokens_per_s", "mfu")


def _untimed(workdir) -> list[str]:
    """metrics.jsonl's rows without timing fields, each re-serialised in its own key order."""
    return [json.dumps({k: v for k, v in r.items() if not k.startswith(TIMINGS)}) for r in _rows(workdir)]


def test_killed_with_sigkill_resumes_to_the_uninterrupted_metrics(cfg, params, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(cfg, params, _examples(12), a, 6)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    child = subprocess.run(
        [sys.executable, "-c", KILLED_CHILD, str(b)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert [r["step"] for r in _rows(b)] == [1, 2, 3, 4, 5]
    assert Checkpointer(checkpoint_config(b / "ckpt")).all_steps() == [3]
    _run(cfg, params, _examples(12), b, 6)
    assert _untimed(b) == _untimed(a)  # before: steps 1, 2, 3, 4, 5, 4, 5, 6
    assert len(_untimed(a)) == 6 and all(r["tokens_per_s"] > 0 for r in _rows(b))


def test_loss_decreases_when_memorising(cfg, params, tmp_path):
    examples = _examples(4, seed=1)  # one batch, repeated every step
    _run(cfg, params, examples, tmp_path, 20, save_every=20, lr=3e-3)
    losses = [r["loss"] for r in _rows(tmp_path)]
    assert len(losses) == 20
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(r["tokens_per_s"] > 0 for r in _rows(tmp_path))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(cfg, params, tmp_path):
    def nan_at_step_4(state, batch, *, model, optimizer):
        new_state, metrics = sft_step(state, batch, model=model, optimizer=optimizer)
        loss = jnp.where(state.step == 3, jnp.nan, metrics["loss"])
        return new_state, {**metrics, "loss": loss}

    with pytest.raises(FloatingPointError, match="step 4"):
        _run(cfg, params, _examples(12), tmp_path, 6, step_fn=nan_at_step_4)
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3]
    ckpt = Checkpointer(checkpoint_config(tmp_path / "ckpt"))
    assert ckpt.all_steps() == [3]
    ckpt.close()


def test_truncation_is_counted_and_batches_are_padded():
    examples = _examples(6, min_len=10, max_len=20) + _examples(2, seed=3, min_len=40, max_len=50)
    batcher = SFTBatcher(examples, batch_size=BATCH, seq_len=SEQ_LEN, seed=0)
    assert batcher.num_truncated == 2
    batch, batch_id = batcher.next()
    assert batch_id == "epoch 0 index 0"
    assert {k: v.shape for k, v in batch.items()} == {k: (BATCH, SEQ_LEN) for k in ("tokens", "mask", "loss_mask")}
    # Truncated rows are full; padding carries no mask and no loss.
    assert batcher.mask[6:].all() and batcher.tokens[6:, -1].min() >= 3
    np.testing.assert_array_equal(batcher.loss_mask * (1 - batcher.mask), 0)
    np.testing.assert_array_equal(batcher.tokens * (1 - batcher.mask), 0)
    np.testing.assert_array_equal(batcher.mask.sum(1)[:6], [len(e["input_ids"]) for e in examples[:6]])


def test_batcher_resumes_exactly():
    examples = _examples(10)
    full = SFTBatcher(examples, batch_size=BATCH, seq_len=SEQ_LEN, seed=5)
    ids = [full.next()[1] for _ in range(7)]
    assert ids[2] == "epoch 1 index 0"  # 10 rows: two batches per epoch, the last 2 rows dropped
    part = SFTBatcher(examples, batch_size=BATCH, seq_len=SEQ_LEN, seed=5)
    for _ in range(3):
        part.next()
    resumed = SFTBatcher(examples, batch_size=BATCH, seq_len=SEQ_LEN, seed=5)
    resumed.restore(json.loads(json.dumps(part.state())))
    ref = SFTBatcher(examples, batch_size=BATCH, seq_len=SEQ_LEN, seed=5)
    for _ in range(3):
        ref.next()
    for _ in range(4):
        x, xid = resumed.next()
        y, yid = ref.next()
        assert xid == yid
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    with pytest.raises(ValueError, match="seed"):
        SFTBatcher(examples, batch_size=BATCH, seq_len=SEQ_LEN, seed=6).restore(part.state())


def test_missing_field_is_a_clear_error():
    with pytest.raises(ValueError, match="example 1: missing field 'loss_mask'"):
        SFTBatcher([{"input_ids": [3, 4], "loss_mask": [0, 1]}, {"input_ids": [3, 4]}], batch_size=1, seq_len=4)


def test_state_shardings_follow_params(cfg, params):
    mesh = make_mesh()
    p_shardings = param_shardings(Transformer(cfg), jax.ShapeDtypeStruct((BATCH, SEQ_LEN), jnp.int32), mesh)
    optimizer = make_optimizer(optim_config(lr=1e-4, updates=1), params)
    abstract = jax.eval_shape(lambda p: TrainState.create(p, optimizer, jax.random.key(0)), params)
    shardings = state_shardings(abstract, p_shardings, mesh)
    assert jax.tree.structure(shardings.opt_state) == jax.tree.structure(abstract.opt_state)
    p_leaves = jax.tree.leaves(p_shardings)
    n_matched = sum(any(s is p for p in p_leaves) for s in jax.tree.leaves(shardings.opt_state))
    assert n_matched >= 2 * len(jax.tree.leaves(params))  # mu and nu of every param


def test_final_model_is_exported_as_hf_folder(cfg, params, tmp_path):
    from cai_jax.checkpoints.hf import load_hf_params

    state = _run(cfg, params, _examples(8), tmp_path / "run", 2, export_dir=tmp_path / "export")
    loaded_cfg, loaded = load_hf_params(tmp_path / "export")
    assert loaded_cfg.num_layers == cfg.num_layers and loaded_cfg.vocab_size == cfg.vocab_size
    trained = jax.device_get(state.params)
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(jax.tree.leaves(trained)[0], jax.tree.leaves(jax.device_get(params))[0])


# ---------------------------------------------------------------- packing

# Same quantity computed two ways in fp32 (a packed row vs separate rows: different reduction
# orders inside attention and the mean): a few ulps of the loss.
PACKED_RTOL = 1e-5


def test_packed_batch_loss_equals_unpacked_loss_of_its_examples(cfg, params):
    import functools

    from cai_jax.train.steps import sft_loss_fn

    examples = _examples(16, seed=4, min_len=6, max_len=14)
    packed = SFTBatcher(examples, batch_size=2, seq_len=SEQ_LEN, seed=1, packing=True)
    rows = packed.rows(0)
    assert sum(len(r) for r in rows) == 16 and len(rows) < 16  # several examples per row
    batch, batch_id = packed.next()
    assert batch_id == "epoch 0 index 0"
    members = [i for row in rows[:2] for i in row]
    seg = batch["segment_ids"]
    assert [int(seg[r].max()) for r in range(2)] == [len(rows[0]), len(rows[1])]
    np.testing.assert_array_equal(batch["mask"], seg > 0)
    first = [len(examples[i]["input_ids"]) for i in rows[0]]
    np.testing.assert_array_equal(batch["positions"][0, : first[0] + 2], list(range(first[0])) + [0, 1])
    np.testing.assert_array_equal(batch["tokens"][0, : first[0]], examples[rows[0][0]]["input_ids"])

    plain = SFTBatcher([examples[i] for i in members], batch_size=len(members), seq_len=SEQ_LEN)
    unpacked = {"tokens": plain.tokens, "mask": plain.mask, "loss_mask": plain.loss_mask}
    loss_fn = jax.jit(functools.partial(sft_loss_fn, model=Transformer(cfg)))
    loss_p, m_p = loss_fn(params, batch)
    loss_u, m_u = loss_fn(params, unpacked)
    # Response targets of every example (the first token of an example is never a target).
    want = sum(sum(examples[i]["loss_mask"][1:]) for i in members)
    assert float(m_p["tokens"]) == float(m_u["tokens"]) == want
    np.testing.assert_allclose(loss_p, loss_u, rtol=PACKED_RTOL)


def test_packed_batcher_resumes_exactly_and_checks_layout():
    examples = _examples(30, seed=5, min_len=6, max_len=20)
    ref = SFTBatcher(examples, batch_size=2, seq_len=SEQ_LEN, seed=2, packing=True)
    want = [ref.next() for _ in range(12)]  # crosses epochs
    assert any(bid.startswith("epoch 1") for _, bid in want)
    part = SFTBatcher(examples, batch_size=2, seq_len=SEQ_LEN, seed=2, packing=True)
    for _ in range(5):
        part.next()
    resumed = SFTBatcher(examples, batch_size=2, seq_len=SEQ_LEN, seed=2, packing=True)
    resumed.restore(json.loads(json.dumps(part.state())))
    for batch, bid in want[5:]:
        got, got_id = resumed.next()
        assert got_id == bid
        for k in batch:
            np.testing.assert_array_equal(got[k], batch[k], err_msg=k)
    with pytest.raises(ValueError, match="packing"):
        SFTBatcher(examples, batch_size=2, seq_len=SEQ_LEN, seed=2).restore(part.state())


def test_packed_training_resumes_like_uninterrupted(cfg, params, tmp_path):
    examples = _examples(24, seed=6, min_len=6, max_len=16)
    a, b = tmp_path / "a", tmp_path / "b"
    _run(cfg, params, examples, a, 4, packing=True)
    _run(cfg, params, examples, b, 2, packing=True)
    _run(cfg, params, examples, b, 4, packing=True)
    rows_a, rows_b = _rows(a), _rows(b)
    for key in ("loss", "tokens", "grad_norm", "batch_id", "tokens_in_batch"):
        assert [r[key] for r in rows_a] == [r[key] for r in rows_b], key
    # Packed rows hold more real tokens than one example each could.
    assert min(r["tokens_in_batch"] for r in rows_a) > BATCH * 16
    assert all("mfu" not in r for r in rows_a)  # CPU: no known peak
