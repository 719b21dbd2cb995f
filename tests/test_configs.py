"""Config files, overrides, sweeps and the stage graph's bookkeeping (no model runs here)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_collections
import pytest

from experiments import launch, sweep
from experiments.config_util import ConfigError, apply_overrides, load_config, load_config_module, parse_override
from experiments.pipeline import StageError, WorkdirError, resolve_stages, stage_hashes
from experiments.pipeline import run_pipeline as _run_pipeline
from experiments.stages import REGISTRY

ORDER = tuple(s.name for s in REGISTRY)


def _faked(fn):
    """A stage run by `fn(ctx)` that then writes the model folders its config says it exports (empty,
    with their completion marker), as a finished stage leaves them."""
    from cai_jax.checkpoints.hf import mark_export_complete

    def run(ctx, c):
        out = fn(ctx)
        for folder in c.exports() if hasattr(c, "exports") else []:
            (ctx.dir / folder).mkdir(parents=True, exist_ok=True)
            mark_export_complete(ctx.dir / folder)
        return out

    return run


def run_pipeline(cfg, workdir, *, stage_fns, **kw):
    """The pipeline with each stage's `run` replaced by `stage_fns[name](ctx)` (the configs still built)."""
    registry = [dataclasses.replace(s, run=_faked(stage_fns[s.name])) for s in REGISTRY]
    return _run_pipeline(cfg, workdir, registry=registry, **kw)


CONFIGS = sorted(
    p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py") if not p.name.startswith("_")
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_builds_and_every_sweep_expands(path):
    cfg = load_config(str(path))
    assert isinstance(cfg, ml_collections.ConfigDict)
    for section in ("model", "prompts", "revisions", "sft", "feedback", "pm", "ppo", "eval", "mesh", "checkpoint"):
        assert section in cfg, f"{path.name} lacks {section}"
    hashes = stage_hashes(cfg, REGISTRY)
    assert set(hashes) == set(ORDER)
    if hasattr(load_config_module(str(path)), "sweep"):
        runs = sweep.expand(str(path))
        assert len(runs) >= 2
        assert len({name for name, _, _ in runs}) == len(runs)
        assert len({json.dumps(c.to_dict(), sort_keys=True, default=str) for _, c, _ in runs}) == len(runs)


def _shipped_runs():
    """(name, config) of every shipped config and every run of every shipped sweep, each macro argument."""
    for path in CONFIGS:
        module = load_config_module(str(path))
        args = ("demo", "base", "tiny") if hasattr(module, "sweep") else (None,)
        for arg in args:
            spec = f"{path}:{arg}" if arg else str(path)
            yield spec, load_config(spec)
            if hasattr(module, "sweep"):
                for name, cfg, _ in sweep.expand(spec):
                    yield f"{spec} {name}", cfg


def test_every_schedule_ends_where_its_stage_updates_end():
    """The cosine floor is reached at the stage's last optimizer update, in every shipped run.

    Updates are counted here from what each loop does: SFT / PMP / PM / DPO take `num_steps`
    micro-steps of `grad_accum_steps` each; a PPO iteration makes `ppo_epochs` passes of rollout /
    minibatch updates, an RLOO iteration `epochs` passes of rollout_batch_size * k / minibatch rows.
    """
    from experiments.pipeline import stage_configs

    def stage_optim(cfg, stage):
        c = stage_configs(cfg, REGISTRY)
        return {
            "sft": c["sft"].sft.optimizer,
            "pmp": c["pm"].pm.pmp.optimizer,
            "pm": c["pm"].pm.optimizer,
            "ppo": c["ppo"].objective.optimizer,  # the chosen RL objective's (rl.algorithm)
        }[stage]()

    def rl_updates(cfg) -> int:
        algorithm = cfg.rl.algorithm
        if algorithm == "ppo":
            return cfg.ppo.num_iterations * cfg.ppo.ppo_epochs * (cfg.ppo.rollout_batch_size // cfg.ppo.minibatch_size)
        if algorithm == "rloo":
            r = cfg.rloo
            return r.num_iterations * r.epochs * (r.rollout_batch_size * r.k // r.minibatch_size)
        return cfg.dpo.num_steps // cfg.dpo.optim.grad_accum_steps

    checked = 0
    for name, cfg in _shipped_runs():
        counts = {
            "sft": cfg.sft.num_steps // cfg.sft.optim.grad_accum_steps,
            "pmp": cfg.pm.pmp.num_steps // cfg.pm.pmp.optim.grad_accum_steps,
            "pm": cfg.pm.num_steps // cfg.pm.optim.grad_accum_steps,
            "ppo": rl_updates(cfg),
        }
        for stage, updates in counts.items():
            ocfg = stage_optim(cfg, stage)
            assert ocfg.total_steps == max(updates, ocfg.warmup_steps + 1), (name, stage, ocfg.total_steps, updates)
            checked += 1
    assert checked > 40
    # An explicit total_steps stays as written; 0 without a count of updates is an error.
    from cai_jax.train.state import OptimConfig

    cfg = load_config("configs/tiny.py", ["sft.optim.total_steps=77"])
    assert stage_optim(cfg, "sft").total_steps == 77
    with pytest.raises(ValueError, match="total_steps=0"):
        OptimConfig.from_config(cfg.pm.optim)


def test_label_sweep_shares_upstream_stages():
    runs = sweep.expand("configs/ablate_labels.py")
    hashes = [stage_hashes(cfg, REGISTRY) for _, cfg, _ in runs]
    assert len({h["revisions"] for h in hashes}) == 1
    assert len({h["sft"] for h in hashes}) == 1
    assert len({h["feedback"] for h in hashes}) == len(runs)
    assert len({h["ppo"] for h in hashes}) == len(runs)


def test_unhashed_sections_do_not_change_stage_hashes():
    cfg = load_config("configs/demo.py")
    moved = apply_overrides(cfg, [("mesh.data", 2), ("checkpoint.save_every_steps", 3), ("log.progress", False)])
    assert stage_hashes(cfg, REGISTRY) == stage_hashes(moved, REGISTRY)
    changed = stage_hashes(apply_overrides(cfg, [("pm.num_steps", 99)]), REGISTRY)
    same = [s for s in ORDER if changed[s] == stage_hashes(cfg, REGISTRY)[s]]
    assert same == ["revisions", "sft", "feedback"]


def test_overrides_cast_types_and_name_missing_fields():
    cfg = load_config(
        "configs/tiny.py", ["sft.num_steps=7", "pm.optim.lr=1", "feedback.label=hard", "log.progress=false"]
    )
    assert cfg.sft.num_steps == 7 and cfg.pm.optim.lr == 1.0 and isinstance(cfg.pm.optim.lr, float)
    assert cfg.feedback.label == "hard" and cfg.log.progress is False
    with pytest.raises(ConfigError, match="'sft.num_stepz'"):
        load_config("configs/tiny.py", ["sft.num_stepz=3"])
    with pytest.raises(ConfigError, match="'nothere'"):
        load_config("configs/tiny.py", ["nothere.x=3"])
    with pytest.raises(ConfigError, match="sft.num_steps"):
        load_config("configs/tiny.py", ["sft.num_steps=abc"])
    with pytest.raises(ConfigError, match="expected --config"):
        parse_override("=3")
    with pytest.raises(ConfigError, match="no such file"):
        load_config("configs/nope.py")


def test_unknown_stage_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match="unknown stage name.*'sfft'.*revisions, sft"):
        resolve_stages("revisions,sfft", REGISTRY)
    assert resolve_stages("ppo,sft", REGISTRY) == ["sft", "ppo"]
    assert launch.main(["--config", "configs/tiny.py", "--workdir", str(tmp_path), "--stages", "bogus"]) == 2


def test_cli_rejects_bad_override_and_missing_dependency(tmp_path, capsys):
    assert launch.main(["--config", "configs/tiny.py", "--workdir", str(tmp_path / "a"), "--config.sft.nope=1"]) == 2
    assert "sft.nope" in capsys.readouterr().err
    assert launch.main(["--config", "configs/tiny.py", "--workdir", str(tmp_path / "b"), "--stages", "pm"]) == 2
    assert "stage 'pm' reads stage 'feedback'" in capsys.readouterr().err


def _fake_stages(calls):
    def make(name):
        def fn(ctx):
            calls.append(name)
            (ctx.dir / "artifact.txt").write_text(name)
            return {"deps": list(ctx.deps)}

        return fn

    return {name: make(name) for name in ORDER}


def test_workdir_skip_refuse_overwrite_and_fork(tmp_path):
    cfg = load_config("configs/tiny.py")
    calls: list[str] = []
    fns = _fake_stages(calls)
    work = tmp_path / "run"
    run_pipeline(cfg, work, stage_fns=fns)
    assert calls == list(ORDER)
    assert json.loads((work / "config.json").read_text())["sft"]["num_steps"] == cfg.sft.num_steps
    calls.clear()
    run_pipeline(cfg, work, stage_fns=fns)
    assert calls == []  # every stage finished with this config

    other = apply_overrides(cfg, [("pm.num_steps", 9)])
    with pytest.raises(WorkdirError, match="different config.*pm.num_steps.*--overwrite.*--fork"):
        run_pipeline(other, work, stage_fns=fns)
    run_pipeline(other, work, stage_fns=fns, fork=tmp_path / "fork")
    assert calls == ["pm", "ppo", "eval", "report"]
    assert (tmp_path / "fork" / "sft").is_symlink()
    calls.clear()
    run_pipeline(other, work, stage_fns=fns, overwrite=True)
    assert calls == ["pm", "ppo", "eval", "report"]
    assert json.loads((work / "config.json").read_text())["pm"]["num_steps"] == 9


def test_a_finished_stage_with_a_damaged_export_runs_again(tmp_path, caplog):
    """DONE with this hash is not enough: a stage whose export lost its completion marker (cut or
    damaged after the fact) is cleared and run again; the stages after it keep theirs."""
    cfg = load_config("configs/tiny.py")
    calls: list[str] = []
    fns = _fake_stages(calls)
    run_pipeline(cfg, tmp_path, stage_fns=fns)
    (tmp_path / "sft" / "export" / "export.json").unlink()
    calls.clear()
    with caplog.at_level("WARNING", logger="experiments.pipeline"):
        run_pipeline(cfg, tmp_path, stage_fns=fns)
    assert calls == ["sft"]
    assert "stage sft: finished earlier, but an export" in caplog.text
    assert (tmp_path / "sft" / "export" / "export.json").is_file()
    calls.clear()
    run_pipeline(cfg, tmp_path, stage_fns=fns)
    assert calls == []


def test_interrupted_stage_resumes_in_place_and_stale_one_is_cleared(tmp_path):
    cfg = load_config("configs/tiny.py")
    calls: list[str] = []
    fns = _fake_stages(calls)

    def crash(ctx):
        (ctx.dir / "partial.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, tmp_path, stage_fns={**fns, "feedback": crash})
    assert (tmp_path / "feedback" / "partial.txt").is_file() and not (tmp_path / "feedback" / "DONE").exists()

    seen = {}

    def resume(ctx):
        seen["partial"] = (ctx.dir / "partial.txt").is_file()
        return fns["feedback"](ctx)

    run_pipeline(cfg, tmp_path, stage_fns={**fns, "feedback": resume})
    assert seen["partial"] is True  # same config: the stage's own engine resumes from what is there
    assert calls == list(ORDER)  # revisions and sft before the crash, the rest after
    assert json.loads((tmp_path / "feedback" / "DONE").read_text())["resumed"] is True

    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, tmp_path / "b", stage_fns={**fns, "sft": crash})
    changed = apply_overrides(cfg, [("sft.num_steps", 5)])
    run_pipeline(changed, tmp_path / "b", stage_fns=fns, overwrite=True)
    assert not (tmp_path / "b" / "sft" / "partial.txt").exists()  # another config's leftovers are cleared


def test_optional_dependencies_of_eval(tmp_path):
    cfg = load_config("configs/tiny.py")
    calls: list[str] = []
    run_pipeline(cfg, tmp_path, stages="revisions,eval,report", stage_fns=_fake_stages(calls))
    assert calls == ["revisions", "eval", "report"]
    done = json.loads((tmp_path / "eval" / "DONE").read_text())
    assert done["summary"]["deps"] == ["revisions"]


def test_sweep_runs_share_finished_stages(tmp_path, monkeypatch):
    calls: list[tuple[str, str]] = []
    import experiments.pipeline as pipeline

    def fake_run(cfg, workdir, registry, **kw):
        def fake(ctx):
            calls.append((ctx.workdir.name, ctx.name))
            return {}

        return pipeline.run_pipeline(
            cfg, workdir, registry=[dataclasses.replace(s, run=_faked(fake)) for s in registry], **kw
        )

    monkeypatch.setattr(sweep, "run_pipeline", fake_run)
    monkeypatch.setattr("experiments.report.sweep_report", lambda root, runs, kind: root / "sweep_report.md")
    rc = sweep.main(
        ["--config", "configs/ablate_labels.py:tiny", "--root", str(tmp_path), "--stages", "revisions,sft,feedback"]
    )
    assert rc == 0
    assert [c for c in calls if c[1] in ("revisions", "sft")] == [("soft", "revisions"), ("soft", "sft")]
    assert sum(1 for c in calls if c[1] == "feedback") == 5
    assert (tmp_path / "hard" / "sft").is_symlink()


def test_sweep_prints_one_command_per_run(capsys):
    assert sweep.main(["--config", "configs/ablate_pmp.py", "--root", "runs/x", "--print-commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert "--config.pm.pmp.enabled=True" in lines[0] and "--config.pm.pmp.enabled=False" in lines[1]
    assert "--reuse-from runs/x/pmp-on" in lines[1]


def test_tensorboard_export_when_a_writer_is_installed(tmp_path):
    from experiments import tensorboard

    if tensorboard._writer_class() is None:
        pytest.skip("neither tensorboardX nor torch.utils.tensorboard is installed")
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 2.0, "batch_id": "x"}, {"step": 2, "loss": float("nan")}, {"step": 2, "loss": 1.5}]
    metrics.write_text("\n".join(json.dumps(r) for r in rows))
    assert tensorboard.export_metrics(metrics, tmp_path / "tb") == 2  # step 2's repeat wins; strings skipped
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
