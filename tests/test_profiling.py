"""Where a stage's seconds go (cai_jax/profiling.py): phases counted exclusively, compile time from
JAX's events, the files that open the phases, timings.json and the report's columns."""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import profiling
from cai_jax.checkpoints.hf import load_hf_params, save_hf_checkpoint
from cai_jax.checkpoints.train_state import CheckpointConfig, Checkpointer
from cai_jax.models import tiny_config
from experiments.config_util import load_config
from experiments.markdown import write_report
from experiments.pipeline import run_pipeline
from experiments.run_folder import load_run
from experiments.stages import REGISTRY

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
    assert list(out) == [*profiling.COLUMNS, "cache", "peak_rss_gb"]
    assert out["checkpoint_s"] == 1.25 and out["export_s"] == 0.5 and out["run_s"] == 8.25
    assert profiling.since(profiling.snapshot(), 0.0)["run_s"] == 0.0  # never below zero


def test_checkpoints_exports_and_loads_open_their_phases(tmp_path, random_params):
    state = {"w": jnp.ones((64, 64)), "step": jnp.zeros((), jnp.int32)}
    cfg = tiny_config("llama")
    before = profiling.snapshot()
    with Checkpointer(
        CheckpointConfig(str(tmp_path / "ckpt"), save_every_steps=1, keep_last=1, async_save=False)
    ) as ckpt:
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


def _stage_fns(tmp_path):
    """Fake stages: sft compiles, exports and checkpoints; every other stage does nothing."""

    def sft(ctx, c):
        _fresh_program()(jnp.arange(5.0)).block_until_ready()
        with profiling.phase("export"):
            time.sleep(0.05)
        with Checkpointer(
            CheckpointConfig(str(ctx.dir / "checkpoints"), save_every_steps=1, keep_last=1, async_save=False)
        ) as ckpt:
            ckpt.save(1, {"w": jnp.ones((8,))}, {}, force=True)
        return {}

    def nothing(ctx, c):
        return {}

    return {s.name: sft if s.name == "sft" else nothing for s in REGISTRY}


def test_pipeline_writes_the_profile_of_each_stage_and_the_report_shows_it(tmp_path):
    from cai_jax.checkpoints.hf import mark_export_complete

    fns = _stage_fns(tmp_path)

    def faked(stage):
        def run(ctx, c):
            out = fns[stage.name](ctx, c)
            for folder in c.exports() if hasattr(c, "exports") else []:
                (ctx.dir / folder).mkdir(parents=True, exist_ok=True)
                mark_export_complete(ctx.dir / folder)
            return out

        return dataclasses.replace(stage, run=run)

    work = tmp_path / "run"
    cfg = load_config("configs/tiny.py")
    run_pipeline(cfg, work, registry=[faked(s) for s in REGISTRY], stages="revisions,sft")
    timings = json.loads((work / "timings.json").read_text())
    assert list(timings) == ["revisions", "sft"]
    for name, t in timings.items():
        assert set(t) == {"seconds", "resumed", *profiling.COLUMNS, "cache", "peak_rss_gb"}, name
        assert set(t["cache"]) == {"hits", "misses"}
        # run_s is the rest of the wall time (each value rounded to 0.01 s)
        assert sum(t[c] for c in profiling.COLUMNS) == pytest.approx(t["seconds"], abs=0.03), name
    sft, rev = timings["sft"], timings["revisions"]
    assert sft["compile_s"] > 0 and sft["export_s"] >= 0.05 and sft["checkpoint_s"] > 0
    assert rev["compile_s"] == rev["export_s"] == rev["checkpoint_s"] == 0.0  # per stage, not cumulative

    run = load_run(work)
    assert run.profile == {
        n: {k: v for k, v in t.items() if k not in ("seconds", "resumed")} for n, t in timings.items()
    }
    md = write_report(
        tmp_path / "report.md",
        config={},
        stage_timings={n: t for n, t, _ in run.timings},
        stage_profile=run.profile,
        figures={},
        tables={},
    ).read_text()
    header = next(line for line in md.splitlines() if line.startswith("| stage |"))
    assert header == (
        "| stage | wall time (s) | share | compile (s) | checkpoint (s) | export (s) | load (s) | run (s) "
        "| cache hits / misses | peak RSS (GB) |"
    )
    row = next(line for line in md.splitlines() if line.startswith("| sft |")).split(" | ")
    assert row[3] == f"{sft['compile_s']:.1f}" and row[5] == f"{sft['export_s']:.1f}"
    assert row[-2] == f"{sft['cache']['hits']} / {sft['cache']['misses']}"
    assert row[-1] == f"{sft['peak_rss_gb']:.1f} |"


def test_report_columns_by_hand(tmp_path):
    profile = {
        "compile_s": 3.0,
        "checkpoint_s": 1.0,
        "export_s": 2.0,
        "load_s": 0.5,
        "run_s": 3.5,
        "cache": {"hits": 4, "misses": 1},
    }
    md = write_report(
        tmp_path / "r.md",
        config={},
        stage_timings={"revisions": 30.0, "sft": 10.0},
        stage_profile={"sft": profile},  # revisions timed before the launcher profiled stages
        figures={},
        tables={},
    ).read_text()
    assert "| revisions | 30.0 | 75.0% | - | - | - | - | - | - |" in md
    assert "| sft | 10.0 | 25.0% | 3.0 | 1.0 | 2.0 | 0.5 | 3.5 | 4 / 1 |" in md
    assert "| **total** | 40.0 | | 3.0 | 1.0 | 2.0 | 0.5 | 3.5 | 4 / 1 |" in md
    peaks = write_report(
        tmp_path / "m.md",
        config={},
        stage_timings={"revisions": 30.0, "sft": 10.0, "pm": 5.0},
        stage_profile={"sft": {**profile, "peak_rss_gb": 12.34}, "pm": {**profile, "peak_rss_gb": 3.0}},
        figures={},
        tables={},
    ).read_text()  # revisions profiled before peaks were recorded: "-"; the total row is the highest
    assert "| revisions | 30.0 | 66.7% | - | - | - | - | - | - | - |" in peaks
    assert "| sft | 10.0 | 22.2% | 3.0 | 1.0 | 2.0 | 0.5 | 3.5 | 4 / 1 | 12.3 |" in peaks
    assert "| **total** | 45.0 | | 6.0 | 2.0 | 4.0 | 1.0 | 7.0 | 8 / 2 | 12.3 |" in peaks
    plain = write_report(
        tmp_path / "p.md", config={}, stage_timings={"sft": 10.0}, figures={}, tables={}
    ).read_text()  # an old timings.json: the table as it was
    assert (
        "| stage | wall time (s) | share |\n|---|---:|---:|\n| sft | 10.0 | 100.0% |\n| **total** | 10.0 | |" in plain
    )


def test_explorer_shows_the_profile_columns(tmp_path):
    from experiments.explorer import write_explorer

    work = tmp_path / "run"
    work.mkdir()
    prof = {"compile_s": 1.0, "checkpoint_s": 0.0, "export_s": 0.0, "load_s": 0.0, "run_s": 1.0}
    timings = {
        "revisions": {"seconds": 3.0, "resumed": False},
        "sft": {"seconds": 2.0, "resumed": True, **prof, "cache": {"hits": 2, "misses": 7}},
    }
    (work / "timings.json").write_text(json.dumps(timings))
    html = write_explorer(work).read_text(encoding="utf-8")
    assert "<th>compile (s)</th><th>checkpoint (s)</th><th>export (s)</th><th>load (s)</th><th>run (s)</th>" in html
    assert "<tr><td>sft</td><td>2.0</td><td>40.0%</td><td>yes</td><td>1.0</td>" in html
    assert "<td>2 / 7</td></tr>" in html


@pytest.mark.skipif(profiling.peak_memory_gb() is None, reason="the peak resident size is read from Linux's /proc")
def test_peak_memory_is_per_interval():
    import mmap

    import numpy as np

    before = profiling.snapshot()
    base = profiling.peak_memory_gb()
    block = mmap.mmap(-1, 400 << 20)  # its own mapping: resident once touched, gone once closed
    view = np.frombuffer(block, dtype=np.uint8)
    view[:] = 1
    del view
    block.close()
    first = profiling.since(before, 1.0)["peak_rss_gb"]
    assert first >= base + 0.38, (base, first)
    second = profiling.since(profiling.snapshot(), 1.0)["peak_rss_gb"]
    assert second < first - 0.35, (first, second)  # the next interval starts from the current size
