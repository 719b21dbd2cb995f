"""The one fit loop (cai_jax.train.fit) and its logs (cai_jax.train.logs) on a toy source and update.

The toy: the state is a running sum x, step i's batch is i + 1, its row is {"loss": x before the
step}; a side log gets one row per step. A "kill" is an exception nothing catches, raised from a
metrics sink: what is on disk then is what a kill -9 at that moment leaves (rows are flushed to
the OS as they are written, saves are synchronous).
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest

from cai_jax.checkpoints.train_state import CheckpointConfig, Checkpointer
from cai_jax.train import logs
from cai_jax.train.fit import Step, fit
from cai_jax.train.logs import JsonlLog, MetricsLogger
from tests.defaults import checkpoint_config


class Killed(BaseException):
    """Stands in for kill -9: no `except Exception` catches it; only `finally` blocks run."""


class Counter:
    def __init__(self, nan_at: int | None = None):
        self.position, self.nan_at = 0, nan_at

    def next(self, state, step):
        self.position += 1
        value = jnp.nan if step + 1 == self.nan_at else float(step + 1)
        return Step(value, {"batch_id": f"b{step}"}, {"side": [{"step": step + 1, "of": step}]})

    def state(self):
        return {"position": self.position}

    def restore(self, data_state):
        self.position = data_state["position"]


def _update(state, batch):
    return {"x": state["x"] + batch}, {"loss": state["x"]}


def _run(workdir, num_steps, *, every=3, kill_at=None, monkeypatch=None, source=None, **kw):
    if kill_at is not None:

        def sink(path, row):
            if row["step"] == kill_at:
                raise Killed

        monkeypatch.setattr(logs, "METRICS_SINKS", [sink])
    side = JsonlLog(workdir / "side.jsonl")
    logger = MetricsLogger(workdir / "metrics.jsonl", attachments={"side": side})
    ckpt = Checkpointer(
        CheckpointConfig(str(workdir / "ckpt"), save_every_steps=every, keep_last=None, async_save=False)
    )
    try:
        return fit(
            source or Counter(), _update, {"x": jnp.zeros(())}, ckpt=ckpt, logger=logger, num_steps=num_steps, **kw
        )
    finally:
        logger.close()
        ckpt.close()
        if monkeypatch is not None:
            monkeypatch.setattr(logs, "METRICS_SINKS", [])


def _files(workdir) -> tuple[str, str]:
    return (workdir / "metrics.jsonl").read_text(), (workdir / "side.jsonl").read_text()


def test_a_killed_run_resumes_to_the_uninterrupted_files(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    state = _run(a, 7)
    assert float(state["x"]) == sum(range(1, 8))
    with pytest.raises(Killed):
        _run(b, 7, kill_at=5, monkeypatch=monkeypatch)  # rows 1-5 (side rows 1-4) written, checkpoint 3
    with open(b / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # and a row cut mid-write
    assert [json.loads(line)["step"] for line in _files(b)[0].splitlines()[:-1]] == [1, 2, 3, 4, 5]
    state = _run(b, 7)
    assert float(state["x"]) == sum(range(1, 8))
    assert _files(b) == _files(a)
    assert [json.loads(line)["step"] for line in _files(b)[0].splitlines()] == list(range(1, 8))


def test_a_fresh_start_empties_the_logs_and_a_finished_run_keeps_them(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # a run whose checkpoints are gone
    _run(tmp_path, 2, every=2)
    first = _files(tmp_path)
    assert [json.loads(line)["loss"] for line in first[0].splitlines()] == [0.0, 1.0]
    _run(tmp_path, 2, every=2)  # restored at the end: nothing trained, nothing dropped
    assert _files(tmp_path) == first


def test_log_cut_is_a_prefix_and_names_a_bad_line(tmp_path):
    log = JsonlLog(tmp_path / "x.jsonl", key="iteration")
    rows = [{"iteration": 1, "a": "é"}, {"iteration": 1, "a": "b"}, {"iteration": 2}, {"iteration": 3}]
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert log.resume(1) == 2
    assert [json.loads(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()] == rows[:2]
    (tmp_path / "x.jsonl").write_text('{"iteration": 1}\nnot json\n{"iteration": 2}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: not a JSON row with an integer 'iteration'"):
        log.resume(5)


def test_non_finite_stops_with_step_batch_and_last_good_checkpoint(tmp_path):
    with pytest.raises(
        FloatingPointError, match=r"non-finite loss at step 5 \(batch b4\).*Last good checkpoint: step 3"
    ):
        _run(tmp_path, 7, source=Counter(nan_at=4))  # batch 4 is NaN: x (the loss) is NaN from step 5 on
    assert [json.loads(line)["step"] for line in _files(tmp_path)[0].splitlines()] == [1, 2, 3, 4]
    assert Checkpointer(checkpoint_config(tmp_path / "ckpt")).all_steps() == [3]


def test_exports_come_before_their_forced_checkpoint(tmp_path):
    events = []

    def export(state, folder):
        # The committed checkpoints, read from the folder: a second Checkpointer here would clean up
        # the temporary folder of a save still in flight (orbax's cleanup_tmp_directories).
        ckpt = tmp_path / "ckpt"
        saved = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []
        events.append((folder, float(state["x"]), saved))

    _run(tmp_path, 5, every=4, export_at={2: "two", 5: "five"}, export=export)
    assert events == [("two", 3.0, []), ("five", 15.0, [2, 4])]
    assert Checkpointer(checkpoint_config(tmp_path / "ckpt")).all_steps() == [2, 4, 5]
    with pytest.raises(ValueError, match="export_at"):
        _run(tmp_path / "bad", 5, export_at={6: "six"}, export=export)


def test_an_unfinished_export_is_redone_from_its_checkpoint_on_resume(tmp_path):
    import shutil

    exports = []

    def export(state, folder):
        exports.append((folder.name, float(state["x"])))
        (folder / "done").parent.mkdir(exist_ok=True)
        (folder / "done").write_text("")

    def done(folder):
        return (folder / "done").exists()

    at = {2: tmp_path / "two", 5: tmp_path / "five"}
    _run(tmp_path, 5, every=4, export_at=at, export=export, export_done=done)
    assert exports == [("two", 3.0), ("five", 15.0)]
    _run(tmp_path, 5, every=4, export_at=at, export=export, export_done=done)  # all done: nothing redone
    assert len(exports) == 2
    (at[2] / "done").unlink()
    _run(tmp_path, 5, every=4, export_at=at, export=export, export_done=done)
    assert exports[2:] == [("two", 3.0)]  # step 2's state, from step 2's checkpoint
    (at[2] / "done").unlink()
    shutil.rmtree(tmp_path / "ckpt" / "2")
    with pytest.raises(RuntimeError, match=r"incomplete export: .*two \(the export at step 2\) is not finished"):
        _run(tmp_path, 5, every=4, export_at=at, export=export, export_done=done)
