"""What a launch does with bad input and faults, before any stage runs: one `error:` line and exit
code 2 naming the flag, field, file or holder; nothing written that a later launch would trip on.

The rows of the README's table of bad inputs and faults come from these tests and the ones they
name (tests/test_launch_tiny.py for kills and a full disk mid-stage).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import launch
from experiments.failures import StageFailed, failure_line
from experiments.workdir_lock import LOCK_NAME, holder_of, workdir_lock

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/tiny.py"]


def _launch(capsys, workdir, *extra) -> tuple[int, list[str]]:
    """launch.main in this process; (exit code, the stderr lines that are not log records)."""
    capsys.readouterr()
    code = launch.main([*TINY, "--workdir", str(workdir), *extra])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def _one_error(lines: list[str]) -> str:
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, lines
    assert not any("Traceback" in line for line in lines), lines
    return errors[0]


def _nothing_ran(workdir: Path) -> None:
    """No stage ran and no config.json was written: at most the (released) lock file is there."""
    assert not (workdir / "config.json").exists()
    if workdir.is_dir():
        assert sorted(p.name for p in workdir.iterdir()) in ([], [LOCK_NAME])


# ---------------------------------------------------------------- preflight: before any stage runs


@pytest.mark.parametrize(
    "override, says",
    [
        ("--config.mesh.data=3", r"config section mesh: mesh sizes .*data.: 3.* do not match the 1 available"),
        (
            "--config.eval.mc_files=('{tmp}/missing.jsonl',)",
            r"config field eval.mc_files\[0\]: .*missing.jsonl: no such file",
        ),
        ("--config.eval.mc_files=('{tmp}/bad_mc.jsonl',)", r"eval.mc_files\[0\]: .*bad_mc.jsonl.*line 2"),
        ("--config.constitution={tmp}/bad.yaml", r"config field constitution.*bad.yaml"),
        (
            "--config.prompts.red_team={tmp}/missing_prompts.jsonl",
            r"config field prompts.red_team.*missing_prompts.jsonl",
        ),
        (
            "--config.prompts.helpful={tmp}/bad_prompts.jsonl",
            r"config field prompts.helpful.*bad_prompts.jsonl.*row 2",
        ),
        ("--config.model.name={tmp}/no_model", r"config field model.name.*no_model.*not found"),
        ("--config.model.name={tmp}/empty_folder", r"config field model.name.*empty_folder.*no config.json"),
        (
            "--config.feedback_model.name=python:no_such_module:judge",
            r"config field feedback_model.name.*no_such_module",
        ),
        (
            "--config.pm.helpful_source={tmp}/bad_pairs.jsonl",
            r"config field pm.helpful_source.*bad_pairs.jsonl.*row 1.*rejected",
        ),
        ("--config.pm.pmp.source={tmp}/missing_pmp.jsonl", r"config field pm.pmp.source.*missing_pmp.jsonl"),
    ],
)
def test_bad_setting_fails_before_any_stage_runs(capsys, tmp_path, override, says):
    import re

    (tmp_path / "bad_mc.jsonl").write_text(
        '{"prompt": "Q?", "corrects": [" (A)"], "incorrects": [" (B)"]}\n{not json\n'
    )
    (tmp_path / "bad.yaml").write_text('name: x\nsl_principles:\n  - id: "unterminated\n')
    (tmp_path / "bad_prompts.jsonl").write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    (tmp_path / "bad_pairs.jsonl").write_text('{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yo"}\n')
    (tmp_path / "empty_folder").mkdir()
    workdir = tmp_path / "run"
    t0 = time.perf_counter()
    code, lines = _launch(capsys, workdir, override.format(tmp=tmp_path))
    line = _one_error(lines)
    assert code == 2
    assert re.search(says, line), line
    assert line.endswith("before any stage ran"), line
    _nothing_ran(workdir)
    assert time.perf_counter() - t0 < 60


def test_refused_launch_writes_no_config(capsys, tmp_path):
    """--stages ppo on an empty workdir is refused, and leaves no config.json behind that would
    refuse the next launch of another config."""
    workdir = tmp_path / "run"
    code, lines = _launch(capsys, workdir, "--stages", "ppo")
    assert code == 2 and "which is not finished for this config" in _one_error(lines)
    _nothing_ran(workdir)
    code, lines = _launch(capsys, workdir, "--stages", "sft", "--config.sft.num_steps=3")
    assert code == 2 and "different config" not in _one_error(lines)


@pytest.mark.parametrize("kind", ["file", "proc"])
def test_unusable_workdir_names_the_flag(capsys, tmp_path, kind):
    if kind == "file":
        workdir = tmp_path / "a_file"
        workdir.write_text("x")
        says = f"--workdir {workdir} exists and is not a folder"
    else:
        workdir = Path("/proc/cai_jax_test/run")
        says = f"--workdir {workdir}: cannot create it"
    code, lines = _launch(capsys, workdir, "--stages", "revisions")
    assert code == 2 and says in _one_error(lines)


# ---------------------------------------------------------------- the workdir lock


_HOLDER = """
import sys, time
from experiments.workdir_lock import workdir_lock
with workdir_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def _hold(workdir: Path) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_launch_on_a_locked_workdir_is_refused_naming_the_holder(capsys, tmp_path):
    import socket

    workdir = tmp_path / "run"
    holder = _hold(workdir)
    try:
        code, lines = _launch(capsys, workdir, "--stages", "revisions")
        line = _one_error(lines)
        assert code == 2
        assert (
            f"--workdir {workdir} is in use by another launch: pid {holder.pid} on host {socket.gethostname()}" in line
        )
        assert not (workdir / "config.json").exists() and not (workdir / "revisions").exists()
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_killed_launch_is_taken_over(capsys, caplog, tmp_path):
    workdir = tmp_path / "run"
    holder = _hold(workdir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert holder_of(workdir / LOCK_NAME)["pid"] == holder.pid  # the dead holder is still named
    with caplog.at_level("WARNING", logger="experiments.workdir_lock"):
        code, lines = _launch(capsys, workdir, "--stages", "sft")  # refused later: revisions not done
    assert code == 2 and "add revisions to --stages" in _one_error(lines)
    assert f"taking over the stale lock of pid {holder.pid}" in caplog.text
    assert holder_of(workdir / LOCK_NAME) is None  # released (emptied) at the end of the launch


def test_lock_is_released_and_reusable(tmp_path):
    with workdir_lock(tmp_path) as path:
        assert holder_of(path)["pid"] == os.getpid()
    assert holder_of(path) is None
    with workdir_lock(tmp_path):
        pass


# ---------------------------------------------------------------- the one line of a failure


def test_failure_line_names_stage_path_and_field():
    from ml_collections import ConfigDict

    cfg = ConfigDict({"prompts": {"red_team": "/data/prompts"}, "eval": {"mc_files": ("/data/mc.jsonl",)}})
    try:
        try:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/prompts/part-2.jsonl")
        except OSError as e:
            raise StageFailed("revisions") from e
    except StageFailed as e:
        line = failure_line(e, cfg)
    assert line == (
        "error: [Errno 2] No such file or directory: '/data/prompts/part-2.jsonl' "
        "(from --config.prompts.red_team), in stage revisions"
    )


def test_full_disk_inside_a_checkpoint_writer_is_said_as_such():
    """orbax reports a full disk from its writer threads wrapped in other errors (a 261-line
    traceback ending in an unrelated ImportError, before): the line says it, and what is kept."""
    try:
        try:
            try:
                raise OSError(errno.ENOSPC, "No space left on device", "/w/sft/checkpoints/4.orbax-checkpoint-tmp-1/x")
            except OSError as inner:
                raise ValueError("Failed to write array: INTERNAL: write failed") from inner
        except ValueError as e:
            raise StageFailed("sft") from e
    except StageFailed as e:
        line = failure_line(e, None, [("--workdir", "/w")])
    assert line.startswith("error: no space left on device (writing /w/sft/checkpoints/4.orbax-checkpoint-tmp-1/x)")
    assert "in stage sft" in line and "run the same command again to resume" in line
    assert "\n" not in line


def test_a_stage_error_keeps_its_own_message():
    try:
        try:
            raise ValueError("feedback/comparisons/rows-00001.jsonl line 3: field 'p_a' must be in [0, 1], got 1.5")
        except ValueError as e:
            raise StageFailed("pm") from e
    except StageFailed as e:
        line = failure_line(e)
    assert line == (
        "error: feedback/comparisons/rows-00001.jsonl line 3: field 'p_a' must be in [0, 1], got 1.5, in stage pm"
    )


def test_config_json_of_a_refused_fork_is_not_written(capsys, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"other": 1}))
    code, lines = _launch(capsys, source, "--fork", str(source))
    assert code == 2 and "the fork must be a different folder" in _one_error(lines)


# ---------------------------------------------------------------- a full disk mid-stage


def _cli(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": "0", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "experiments.launch", *TINY, "--workdir", str(workdir), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_full_disk_mid_stage_gives_one_line_and_a_resumable_workdir(tmp_path):
    """A 50 MB tmpfs holds the tiny run's revisions and one SFT checkpoint (36 MB), not the second:
    the launch fails with one line saying so, keeps checkpoint 2 whole and writes nothing of
    checkpoint 4; with space freed (the tmpfs grown) the same command resumes SFT at step 2 and
    ends with the metrics of a run that never ran out."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=50m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); the fault-injected line is checked above")
    try:
        stages = ("--stages", "revisions,sft")
        full = _cli(disk / "run", *stages)
        assert full.returncode == 2, full.stderr[-3000:]
        lines = [line for line in full.stderr.splitlines() if line.strip()]
        assert "Traceback" not in full.stderr and "Traceback" not in full.stdout
        (line,) = [x for x in lines if x.startswith("error:")]
        assert line.startswith("error: no space left on device (the checkpoint of step 4 needs"), line
        assert "in stage sft" in line
        assert lines[-1] == line  # nothing printed after it
        ckpts = disk / "run" / "sft" / "checkpoints"
        assert sorted(p.name for p in ckpts.iterdir()) == ["2"]
        assert (disk / "run" / "revisions" / "DONE").is_file() and not (disk / "run" / "sft" / "DONE").exists()
        subprocess.run(["mount", "-o", "remount,size=300m", str(disk)], check=True)
        resumed = _cli(disk / "run", *stages)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "stage sft (resuming" in resumed.stdout
        reference = _cli(tmp_path / "reference", *stages)
        assert reference.returncode == 0, reference.stderr[-3000:]

        def rows(workdir):
            out = []
            for text in (workdir / "sft" / "metrics.jsonl").read_text().splitlines():
                row = json.loads(text)
                out.append({k: v for k, v in row.items() if not k.startswith("time") and "per_s" not in k})
            return out

        assert rows(disk / "run") == rows(tmp_path / "reference")
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
