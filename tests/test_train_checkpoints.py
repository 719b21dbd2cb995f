"""Train-state checkpoints: a killed and resumed toy run continues bitwise like an uninterrupted one."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cai_jax.checkpoints.train_state import CheckpointConfig, Checkpointer

N_ROWS, BATCH, D_IN, D_HID = 40, 8, 4, 8  # 5 batches per epoch, so 10 steps cross an epoch boundary
TOTAL_STEPS = 10
OPTIMIZER = optax.adam(1e-2)


def _dataset(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N_ROWS, D_IN)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(D_IN, 1))).astype(np.float32)[:, 0]
    return x, y


def _next_batch(data_state: dict) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
    """Rows [position, position + BATCH) of this epoch's seeded permutation, and the advanced position."""
    x, y = _dataset(data_state["seed"])
    perm = np.random.default_rng((data_state["seed"], data_state["epoch"])).permutation(N_ROWS)
    idx = perm[data_state["position"] : data_state["position"] + BATCH]
    epoch, position = data_state["epoch"], data_state["position"] + BATCH
    if position >= N_ROWS:
        epoch, position = epoch + 1, 0
    return (x[idx], y[idx]), {**data_state, "epoch": epoch, "position": position}


def _init_state(rng: jax.Array) -> dict:
    k1, k2, rng = jax.random.split(rng, 3)
    params = {
        "w1": 0.5 * jax.random.normal(k1, (D_IN, D_HID)),
        "b1": jnp.zeros((D_HID,)),
        "w2": 0.5 * jax.random.normal(k2, (D_HID,)),
    }
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": OPTIMIZER.init(params), "rng": rng}


@jax.jit
def _train_step(state: dict, batch: tuple[jax.Array, jax.Array]) -> tuple[dict, dict]:
    x, y = batch
    # Input noise from the state's key: a resume that lost the key would diverge at once.
    noise = 0.1 * jax.random.normal(jax.random.fold_in(state["rng"], state["step"]), x.shape)

    def loss_fn(p):
        pred = jnp.tanh((x + noise) @ p["w1"] + p["b1"]) @ p["w2"]
        return jnp.mean((pred - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = OPTIMIZER.update(grads, state["opt_state"], state["params"])
    new = {
        "step": state["step"] + 1,
        "params": optax.apply_updates(state["params"], updates),
        "opt_state": opt_state,
        "rng": jax.random.split(state["rng"])[0],
    }
    return new, {"loss": loss}


def _run(state, data_state, until_step, ckpt=None):
    """The loop: one step per batch; saves after step s as checkpoint s. Returns (state, data, losses)."""
    losses = {}
    while int(state["step"]) < until_step:
        batch, data_state = _next_batch(data_state)
        state, metrics = _train_step(state, batch)
        step = int(state["step"])
        losses[step] = np.asarray(metrics["loss"])
        if ckpt is not None:
            ckpt.save(step, state, data_state, force=step == TOTAL_STEPS)
    return state, data_state, losses


def _fresh():
    return _init_state(jax.random.key(0)), {"epoch": 0, "position": 0, "seed": 0}


@functools.cache
def _uninterrupted():
    return _run(*_fresh(), TOTAL_STEPS)


def _assert_trees_equal(a, b):
    jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), a, b)


def _cfg(tmp_path, **kw) -> CheckpointConfig:
    return CheckpointConfig(
        **{"directory": str(tmp_path / "ckpt"), "save_every_steps": 3, "keep_last": 2, "async_save": False, **kw}
    )


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    ref_state, ref_data, ref_losses = _uninterrupted()

    ckpt = Checkpointer(_cfg(tmp_path))
    _run(*_fresh(), 7, ckpt)  # "killed" after step 7: step 7 ran but was never checkpointed
    ckpt.close()

    ckpt = Checkpointer(_cfg(tmp_path))
    assert ckpt.latest_step() == 6
    assert ckpt.all_steps() == [3, 6]  # keep_last=2
    state, data_state = ckpt.restore(target=_init_state(jax.random.key(123)))
    assert int(state["step"]) == 6
    assert data_state == {"epoch": 1, "position": 8, "seed": 0}
    assert jnp.issubdtype(state["rng"].dtype, jax.dtypes.prng_key)

    state, data_state, losses = _run(state, data_state, TOTAL_STEPS, ckpt)
    ckpt.close()
    assert sorted(losses) == [7, 8, 9, 10]
    for step, loss in losses.items():
        np.testing.assert_array_equal(loss, ref_losses[step], err_msg=f"step {step}")
    _assert_trees_equal(jax.random.key_data(state["rng"]), jax.random.key_data(ref_state["rng"]))
    _assert_trees_equal(
        {k: v for k, v in state.items() if k != "rng"}, {k: v for k, v in ref_state.items() if k != "rng"}
    )
    assert data_state == ref_data
    assert Checkpointer(_cfg(tmp_path)).all_steps() == [9, 10]  # step 10 forced as the last step


def test_restore_into_abstract_target(tmp_path):
    ref_state, _, _ = _uninterrupted()
    with Checkpointer(_cfg(tmp_path)) as ckpt:
        assert ckpt.save(3, ref_state, {"epoch": 0, "position": 24, "seed": 0})
    abstract = jax.eval_shape(_init_state, jax.random.key(0))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    with Checkpointer(_cfg(tmp_path)) as ckpt:
        state, data_state = ckpt.restore(3, target=abstract)
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)
    assert state["rng"].dtype == ref_state["rng"].dtype
    assert isinstance(state["opt_state"], type(ref_state["opt_state"]))
    _assert_trees_equal(jax.random.key_data(state["rng"]), jax.random.key_data(ref_state["rng"]))
    _assert_trees_equal(state["params"], ref_state["params"])
    assert data_state["position"] == 24


def test_checkpointing_off_saves_and_restores_nothing(tmp_path):
    state, data_state = _fresh()
    with Checkpointer(None) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        assert not ckpt.should_save(3) and not ckpt.save(3, state, data_state, force=True)
        assert ckpt.describe_latest("iteration") == "none (checkpointing is off)"
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            ckpt.restore()
    with Checkpointer(_cfg(tmp_path)) as ckpt:
        assert ckpt.describe_latest() == f"none yet in {tmp_path / 'ckpt'}"
        ckpt.save(3, state, data_state)
        assert ckpt.describe_latest("iteration") == f"iteration 3 in {tmp_path / 'ckpt'}"


def test_saves_only_on_interval_or_force(tmp_path):
    state, data_state = _fresh()
    with Checkpointer(_cfg(tmp_path, keep_last=None)) as ckpt:
        saved = [s for s in range(1, 8) if ckpt.save(s, state, data_state, force=s == 7)]
        assert saved == [3, 6, 7]
        assert ckpt.all_steps() == [3, 6, 7]
        assert not ckpt.save(7, state, data_state, force=True)  # already saved: left as it is


def test_partial_save_of_a_killed_run_is_ignored(tmp_path):
    state, data_state = _fresh()
    with Checkpointer(_cfg(tmp_path)) as ckpt:
        ckpt.save(3, state, {"position": 24})
    (tmp_path / "ckpt" / "6.orbax-checkpoint-tmp" / "state").mkdir(parents=True)  # killed mid-save
    with Checkpointer(_cfg(tmp_path)) as ckpt:
        assert ckpt.latest_step() == 3
        assert ckpt.restore(target=state)[1] == {"position": 24}
        assert ckpt.save(6, state, data_state)
        assert ckpt.all_steps() == [3, 6]


def test_async_save_then_wait(tmp_path):
    state, data_state = _fresh()
    with Checkpointer(_cfg(tmp_path, async_save=True)) as ckpt:
        assert ckpt.save(3, state, data_state)
        ckpt.wait()
        assert ckpt.latest_step() == 3


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
    with Checkpointer(_cfg(tmp_path)) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            ckpt.restore()


def test_data_state_must_be_json(tmp_path):
    state, _ = _fresh()
    with Checkpointer(_cfg(tmp_path)) as ckpt, pytest.raises(TypeError, match="JSON"):
        ckpt.save(3, state, {"position": object()})


def test_config_from_configdict_and_unknown_field():
    cfg = ml_collections.ConfigDict({"directory": "/tmp/x", "save_every_steps": 5, "keep_last": 2, "async_save": False})
    assert CheckpointConfig.from_config(cfg) == CheckpointConfig("/tmp/x", 5, 2, False)
    with pytest.raises(
        ValueError, match=r"missing required field\(s\) \['save_every_steps', 'keep_last', 'async_save'\]"
    ):
        CheckpointConfig.from_config({"directory": "/tmp/x"})
    with pytest.raises(ValueError, match="save_evry_steps"):
        CheckpointConfig.from_config({"directory": "/tmp/x", "save_evry_steps": 5})
    with pytest.raises(ValueError, match="directory"):
        CheckpointConfig.from_config({"save_every_steps": 5})
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointConfig(directory="/tmp/x", save_every_steps=1, keep_last=0, async_save=False)
