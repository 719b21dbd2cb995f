"""The stage graph and the run folder: which stages to run, which to skip, resume.

    revisions -> sft -> feedback -> pm -> ppo -> eval -> report     (experiments/stages/)

The pipeline runs a registry of `Stage`s and imports no stage itself. A stage's identity is the
hash of the frozen config object it receives (`Stage.Config.build(cfg)`: exactly the config fields
it reads, cast and checked, with derived fields) and of the hashes of the stages it reads from.
Where and how it runs (mesh, checkpoint cadence, logging) are not in any stage's config, so a run
can resume on a different mesh. A stage is skipped when `<stage>/DONE` holds its current hash. A
stage folder started under another hash (a changed config under --overwrite) is cleared before the
stage runs again; one started under the same hash is resumed by the stage's own engine (revision
and feedback shards, orbax checkpoints).

A workdir remembers its config in `config.json`. Launching a different config on it is refused
unless `overwrite=True` (rerun the stages whose hash changed, keep the others) or `fork=<new
workdir>` (start the new run elsewhere, linking the finished stages it shares with the old one).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from cai_jax import atomic, profiling
from experiments.config_util import to_json
from experiments.context import RunSettings, StageContext
from experiments.failures import StageFailed
from experiments.preflight import check_mesh
from experiments.typed import hash_of
from experiments.workdir_lock import WorkdirError, workdir_lock

__all__ = ["Stage", "StageError", "WorkdirError", "resolve_stages", "run_pipeline", "stage_configs", "stage_hashes"]

log = logging.getLogger(__name__)


class StageError(ValueError):
    """A stage name or stage selection that cannot run; the message names it."""


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    deps: tuple[str, ...]  # stages whose artifacts this one needs
    Config: type  # frozen dataclass with `build(cfg)`: what the stage reads
    run: Callable[[StageContext, Any], dict]  # run(ctx, config) -> JSON summary
    optional: tuple[str, ...] = ()  # stages it reads when they ran (selected or finished), else skips


def _order(registry: Sequence[Stage]) -> tuple[str, ...]:
    return tuple(s.name for s in registry)


def _by_name(registry: Sequence[Stage]) -> dict[str, Stage]:
    return {s.name: s for s in registry}


def stage_configs(cfg: ml_collections.ConfigDict, registry: Sequence[Stage]) -> dict[str, Any]:
    """Every stage's config object, built (cast and checked) from `cfg`: a bad field fails here."""
    return {s.name: s.Config.build(cfg) for s in registry}


def stage_hashes(
    cfg: ml_collections.ConfigDict,
    registry: Sequence[Stage],
    present: Callable[[str, str], bool] | None = None,
    configs: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Each stage's hash: its config object and the hashes of the stages it reads.

    `present(stage, hash)` says whether an optional dependency will be there (selected, or finished
    in the workdir); None counts every optional dependency as present (a full run).
    """
    configs = configs or stage_configs(cfg, registry)
    out: dict[str, str] = {}
    for stage in registry:
        deps = list(stage.deps) + [d for d in stage.optional if present is None or present(d, out[d])]
        out[stage.name] = hash_of(stage.name, configs[stage.name], {d: out[d] for d in sorted(deps)})
    return out


def used_deps(stage: Stage, hashes: dict[str, str], present: Callable[[str, str], bool]) -> list[str]:
    """The stages `stage` reads in this launch: its required ones and the optional ones present."""
    return list(stage.deps) + [d for d in stage.optional if present(d, hashes[d])]


def resolve_stages(requested: str | Sequence[str] | None, registry: Sequence[Stage]) -> list[str]:
    """'revisions,sft' / a list / None (all) -> stage names in graph order; unknown names are errors."""
    order = _order(registry)
    if requested is None or requested == "" or requested == "all":
        return list(order)
    names = [s.strip() for s in requested.split(",")] if isinstance(requested, str) else list(requested)
    unknown = [s for s in names if s not in order]
    if unknown or not names:
        raise StageError(f"unknown stage name(s) {unknown or names}; stages are: {', '.join(order)}")
    return [s for s in order if s in names]


def read_marker(folder: Path, name: str) -> dict | None:
    path = folder / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, obj: Any) -> None:
    atomic.write_json(path, obj, indent=1, sort_keys=True, default=str)


def is_done(workdir: Path, stage: str, h: str, exports: Sequence[str] = ()) -> bool:
    """Whether `stage` finished in `workdir` with hash `h` and its `exports` (model folders, relative
    to the stage's folder) are complete: an export without its completion marker
    (`cai_jax.checkpoints.hf.EXPORT_MARKER`, written last) was cut or damaged, and the stage reruns."""
    done = read_marker(workdir / stage, "DONE")
    if done is None or done.get("hash") != h:
        return False
    if exports:
        from cai_jax.checkpoints.hf import is_complete_export

        return all(is_complete_export(workdir / stage / e) for e in exports)
    return True


def stage_exports(configs: dict[str, Any]) -> dict[str, list[str]]:
    """{stage: the model folders it exports}, from each stage config's `exports()` (none if absent)."""
    return {name: list(c.exports()) if hasattr(c, "exports") else [] for name, c in configs.items()}


def _changed_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<missing>"), new.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_fields(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def check_workdir(cfg, workdir: Path, *, overwrite: bool = False, fork: str | os.PathLike | None = None) -> Path:
    """Checks `workdir` against `cfg` (see module doc) and returns the workdir to run in; writes nothing."""
    new = json.loads(to_json(cfg))
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir} exists and is not a folder")
    old_file = workdir / "config.json"
    if old_file.is_file():
        old = json.loads(old_file.read_text())
        if old != new and fork is None and not overwrite:
            changed = _changed_fields(old, new)
            raise WorkdirError(
                f"{workdir} holds a run of a different config (changed: {', '.join(changed[:12])}"
                f"{' ...' if len(changed) > 12 else ''}). Pass --overwrite to rerun the stages these "
                "fields change there (finished stages they do not touch are kept), or --fork NEW_WORKDIR "
                "to start the new run in another folder that reuses the finished stages it shares."
            )
    if fork is None:
        return workdir
    target = Path(fork)
    if target.resolve() == workdir.resolve():
        raise WorkdirError(f"--fork {target}: the fork must be a different folder than {workdir}")
    if target.exists() and not target.is_dir():
        raise WorkdirError(f"--fork {target} exists and is not a folder")
    if (target / "config.json").is_file() and json.loads((target / "config.json").read_text()) != new:
        raise WorkdirError(f"--fork {target} already holds a run of another config")
    return target


def _make_folder(folder: Path, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"{flag} {folder}: cannot create it ({e.strerror or e})") from None


def link_finished(source: Path, target: Path, cfg, registry: Sequence[Stage]) -> list[str]:
    """Links each stage `target` would compute under `cfg` that `source` finished with the same hash.

    Returns the linked stage names. Stages `target` already has are left alone.
    """
    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    exports = stage_exports(stage_configs(cfg, registry))
    hashes = stage_hashes(cfg, registry, lambda stage, h: is_done(source, stage, h, exports[stage]))
    linked = []
    for name in _order(registry):
        if (
            (target / name).exists()
            or (target / name).is_symlink()
            or not is_done(source, name, hashes[name], exports[name])
        ):
            continue
        os.symlink((source / name).resolve(), target / name, target_is_directory=True)
        log.info("%s/%s is reused from %s", target, name, source)
        linked.append(name)
    return linked


def run_pipeline(
    cfg: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    registry: Sequence[Stage],
    stages: str | Sequence[str] | None = None,
    overwrite: bool = False,
    fork: str | os.PathLike | None = None,
    reuse_from: Sequence[str | os.PathLike] = (),
) -> dict[str, dict]:
    """Runs the requested stages of `registry` in order; returns {stage: DONE record}.

    `reuse_from`: other workdirs whose finished stages with the same hash are linked, not rerun.

    Before the first stage runs (a bad setting fails in seconds, not after earlier stages have run):
    every stage's config is built, the mesh is checked against the devices present, the workdir
    is locked for the launch (`experiments.workdir_lock`: a second launch on it is refused), a
    requested stage whose dependency is neither finished (with the current hash) nor requested is
    an error naming both, and each stage that will run checks its inputs (its config's
    `preflight()`, experiments/preflight.py). Only then is `config.json` written, so a refused
    launch leaves the workdir as it was. A stage that raises is reported as `StageFailed(stage)`
    from its error. Only process 0 writes markers and takes the lock (multi-host runs share the
    workdir).
    """
    import jax

    by_name = _by_name(registry)
    selected = resolve_stages(stages, registry)
    configs = stage_configs(cfg, registry)
    settings = RunSettings.from_config(cfg)
    check_mesh(settings.mesh, jax.device_count())
    source, workdir = Path(workdir), check_workdir(cfg, Path(workdir), overwrite=overwrite, fork=fork)
    primary = jax.process_index() == 0
    _make_folder(workdir, "--workdir" if fork is None else "--fork")
    with workdir_lock(workdir, enabled=primary):
        if fork is not None:
            link_finished(source, workdir, cfg, registry)
        for other in reuse_from:
            link_finished(Path(other), workdir, cfg, registry)

        exports = stage_exports(configs)

        def done(stage: str, h: str) -> bool:
            return is_done(workdir, stage, h, exports[stage])

        def present(stage: str, h: str) -> bool:
            return stage in selected or done(stage, h)

        hashes = stage_hashes(cfg, registry, present, configs)
        for name in selected:
            for dep in by_name[name].deps:
                if dep not in selected and not done(dep, hashes[dep]):
                    raise StageError(
                        f"stage {name!r} reads stage {dep!r}, which is not finished for this config in {workdir}; "
                        f"add {dep} to --stages"
                    )
        for name in selected:  # the inputs of every stage that will run, before any runs
            check = getattr(configs[name], "preflight", None)
            if check is not None and not done(name, hashes[name]):
                check()
        if primary:
            _write_json(workdir / "config.json", json.loads(to_json(cfg)))
        return _run_stages(workdir, selected, by_name, configs, hashes, present, done, settings, primary)


def _run_stages(workdir, selected, by_name, configs, hashes, present, done, settings, primary) -> dict[str, dict]:
    import jax

    cache: dict = {}
    records: dict[str, dict] = {}
    timings_file = workdir / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    for name in selected:
        folder, h = workdir / name, hashes[name]
        record = read_marker(folder, "DONE")
        if done(name, h):
            log.info("stage %s: finished earlier with this config (hash %s), skipped", name, h)
            records[name] = record
            continue
        started = read_marker(folder, "STARTED")
        damaged = record is not None and record.get("hash") == h  # DONE, but an export is incomplete
        if damaged:
            log.warning("stage %s: finished earlier, but an export in %s is incomplete: running it again", name, folder)
        if damaged or folder.is_symlink() or (folder.exists() and (started is None or started.get("hash") != h)):
            # Artifacts of another config (or damaged ones): never mix them with this run's.
            log.info("stage %s: clearing %s (%s)", name, folder, "damaged" if damaged else "made with another config")
            if primary:
                if folder.is_symlink():
                    folder.unlink()
                else:
                    shutil.rmtree(folder)
        resumed = not damaged and started is not None and started.get("hash") == h
        folder.mkdir(parents=True, exist_ok=True)
        if primary and not resumed:
            _write_json(folder / "STARTED", {"hash": h, "time": time.time()})
        print(f"[launch] stage {name} ({'resuming' if resumed else 'starting'}; hash {h})", flush=True)
        t0, before = time.perf_counter(), profiling.snapshot()
        stage = by_name[name]
        ctx = StageContext(workdir, name, settings, cache, used_deps(stage, hashes, present))
        try:
            summary = stage.run(ctx, configs[name]) or {}
        except Exception as e:  # the launcher says which stage failed (experiments/failures.py)
            raise StageFailed(name) from e
        finally:
            # Models loaded by one stage are not kept for the next: on a 24 GB laptop, PPO's four
            # models and optimizer state need the memory more than a reload (seconds) needs time.
            cache.clear()
            gc.collect()
        seconds = time.perf_counter() - t0
        record = {"hash": h, "seconds": round(seconds, 2), "resumed": resumed, "summary": summary}
        profile = profiling.since(before, seconds)
        timings[name] = {"seconds": round(seconds, 2), "resumed": resumed, **profile}
        if primary:
            _write_json(folder / "DONE", record)
            _write_json(timings_file, timings)
            if settings.log.tensorboard and (folder / "metrics.jsonl").is_file():
                from experiments.tensorboard import export_metrics

                export_metrics(folder / "metrics.jsonl", workdir / "tensorboard" / name)
            if not settings.checkpoint.keep_after_done:
                # Only needed to resume this stage (and its parts, e.g. pm/pmp); its exported
                # artifacts are what later stages read.
                for sub in sorted(folder.rglob("checkpoints"), reverse=True):
                    if sub.is_dir():
                        shutil.rmtree(sub)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"stage {name} done")
        parts = ", ".join(f"{key[:-2]} {profile[key]:.1f}" for key in profiling.COLUMNS)
        peak = "" if profile["peak_rss_gb"] is None else f"; peak RSS {profile['peak_rss_gb']:.1f} GB"
        print(f"[launch] stage {name} finished in {seconds:.1f} s ({parts} s{peak})", flush=True)
        records[name] = record
    return records
