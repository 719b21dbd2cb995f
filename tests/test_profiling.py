"""Where a stage's seconds go (cai_jax/profiling.py): phases counted exclusively, compile time from
JAX's events, the files that open the phases, timings.json and the report's columns."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import profiling
from cai_jax.checkpoints.hf import load_hf_params, save_hf_checkpoint
from cai_jax.checkpoints.train_state import CheckpointConfig, Checkpointer
from cai_jax.models import tiny_config

PHASE_KEYS = ("compile", *profiling.PHASES)


class _Clock:
    """A clock the test advances by hand (profiling._clock)."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(profiling, "_clock", c)
    return c


def _spent(before: dict) -> dict[str, float]:
    now = profiling.snapshot()
    return {k: now[k] - before[k] for k in PHASE_KEYS}


def _fresh_program():
    """A jitted function whose program no earlier call (in this or another process) compiled."""
    salt = float(time.time_ns() % 1_000_003)
    return jax.jit(lambda x: jnp.sin(x) * salt + jnp.cos(x).sum())


def test_sequential_and_nested_phases_count_each_second_once(clock):
    before = profiling.snapshot()
    with profiling.phase("checkpoint"):
        clock.now += 1.0
    with profiling.phase("export"):
        clock.now += 2.0
        with profiling.phase("load"):  # 3 s of load inside the export: not export's
            clock.now += 3.0
            with profiling.phase("load"):  # the same phase nested: counted once
                clock.now += 4.0
        clock.now += 0.5

    @profiling.phase("checkpoint")
    def save():
        clock.now += 0.25

    save()
    save()
    assert _spent(before) == {"compile": 0.0, "checkpoint": 1.5, "export": 2.5, "load": 7.0}


def test_a_phase_that_raises_is_counted(clock):
    before = profiling.snapshot()
    with pytest.raises(RuntimeError), profiling.phase("export"):
        clock.now += 1.5
        raise RuntimeError("disk")
    with profiling.phase("load"):  # the failed phase is closed: this one is not nested in it
        clock.now += 1.0
    assert _spent(before) == {"compile": 0.0, "checkpoint": 0.0, "export": 1.5, "load": 1.0}


def test_unknown_phase_is_refused():
    with pytest.raises(ValueError, match=r"profiling.phase\('compile'\): expected one of"):
        profiling.phase("compile")  # measured from JAX's events, never opened by hand


def test_first_call_of_a_jitted_function_records_compile_time_and_the_second_none():
    f, x = _fresh_program(), jnp.arange(8.0)
    before = profiling.snapshot()
    f(x).block_until_ready()
    first = _spent(before)
    assert first["compile"] > 0
    before = profiling.snapshot()
    f(x).block_until_ready()
    assert _spent(before)["compile"] == 0.0


def test_nested_compile_events_count_the_outermost_only():
    event = "/jax/core/compile/jaxpr_trace_duration"  # as jax._src.dispatch announces and ends one
    before = profiling.snapshot()
    jax.monitoring.record_scalar(event, 0.0, fun_name="outer")
    jax.monitoring.record_scalar(event, 0.0, fun_name="inner")
    jax.monitoring.record_event_duration_secs(event, 0.25, fun_name="inner")
    jax.monitoring.record_event_duration_secs(event, 1.0, fun_name="outer")
    jax.monitoring.record_event_duration_secs(event, 5.0, fun_name="never announced")
    assert _spent(before)["compile"] == 1.0


def test_compile_inside_a_phase_counts_as_compile_not_as_the_phase(clock):
    f = _fresh_program()
    before = profiling.snapshot()
    with profiling.phase("export"):
        clock.now += 2.0
        f(jnp.arange(4.0)).block_until_ready()  # JAX's own clock times the compile
    spent = _spent(before)
    assert spent["compile"] > 0
    assert spent["export"] + spent["compile"] == pytest.approx(2.0, abs=1e-9)


def test_cache_counts_a_miss_or_hit_per_compiled_program():
    if not jax.config.jax_compilation_cache_dir:
        pytest.skip("the persistent compilation cache is off (CAI_JAX_COMPILATION_CACHE=0)")
    before = profiling.snapshot()
    _fresh_program()(jnp.arange(3.0)).block_until_ready()
    cache = profiling.since(before, 1.0)["cache"]
    assert cache["misses"] >= 1 and cache["hits"] >= 0


def test_since_names_every_column_and_run_is_the_rest(clock):
    before = profiling.snapshot()
    with profiling.phase("checkpoint"):
        clock.now += 1.25
    with profiling.phase("export"):
        clock.now += 0.5
    out = profiling.since(before, 10.0)
    assert list(out) == [*profiling.COLUMNS, "cache"]
    assert out["checkpoint_s"] == 1.25 and out["export_s"] == 0.5 and out["run_s"] == 8.25
    assert profiling.since(profiling.snapshot(), 0.0)["run_s"] == 0.0  # never below zero


def test_checkpoints_exports_and_loads_open_their_phases(tmp_path, random_params):
    state = {"w": jnp.ones((64, 64)), "step": jnp.zeros((), jnp.int32)}
    cfg = tiny_config("llama")
    before = profiling.snapshot()
    with Checkpointer(CheckpointConfig(str(tmp_path / "ckpt"), save_every_steps=1, keep_last=1)) as ckpt:
        assert ckpt.save(1, state, {"position": 0})
        ckpt.wait()
        restored, _ = ckpt.restore(1, target=state)
    np.testing.assert_array_equal(restored["w"], state["w"])
    after_ckpt = _spent(before)
    assert after_ckpt["checkpoint"] > 0 and after_ckpt["export"] == 0.0
    folder = save_hf_checkpoint(tmp_path / "hf", cfg, random_params(cfg))
    load_hf_params(folder)
    spent = _spent(before)
    assert spent["export"] > 0 and spent["load"] > 0
    assert spent["checkpoint"] == after_ckpt["checkpoint"]
