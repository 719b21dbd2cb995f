"""Optional W&B logging (experiments/wandb_log.py) against a fake `wandb` module: every row a
MetricsLogger writes reaches the run under its folder's prefix and step; off, absent or misnamed
modes do nothing or fail with the field's name."""

from __future__ import annotations

import sys
import types

import ml_collections
import numpy as np
import pytest

from cai_jax.train.loop import METRICS_SINKS, MetricsLogger
from experiments.config_util import ConfigError
from experiments.wandb_log import wandb_run


class FakeRun:
    def __init__(self, **kwargs):
        self.init = kwargs
        self.logged, self.defined, self.finished = [], [], False

    def define_metric(self, name, step_metric=None):
        self.defined.append((name, step_metric))

    def log(self, data):
        self.logged.append(data)

    def finish(self):
        self.finished = True


def _cfg(mode):
    return ml_collections.ConfigDict({"seed": 0, "log": {"wandb": mode}})


@pytest.fixture
def fake_wandb(monkeypatch):
    runs = []
    module = types.ModuleType("wandb")
    module.init = lambda **kw: runs.append(FakeRun(**kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", module)
    return runs


def test_rows_reach_wandb(fake_wandb, tmp_path):
    workdir = tmp_path / "run"
    with wandb_run(_cfg("offline"), workdir) as run:
        for folder in ("sft", "pm/pmp"):
            logger = MetricsLogger(workdir / folder / "metrics.jsonl", check=False)
            logger.push(1, {"loss": np.float32(2.0), "acc": 0.5}, {"batch_id": "epoch 0"})
            logger.push(2, {"loss": np.float32(1.0), "acc": float("nan")})
            logger.flush()
            logger.close()
    assert run is fake_wandb[0] and run.finished and not METRICS_SINKS
    assert run.init["mode"] == "offline" and run.init["dir"] == str(workdir) and run.init["name"] == "run"
    assert run.init["config"] == {"seed": 0, "log": {"wandb": "offline"}}
    assert run.logged == [
        {"sft/loss": 2.0, "sft/acc": 0.5, "sft/step": 1},
        {"sft/loss": 1.0, "sft/step": 2},  # NaN left out, as in the TensorBoard export
        {"pm/pmp/loss": 2.0, "pm/pmp/acc": 0.5, "pm/pmp/step": 1},
        {"pm/pmp/loss": 1.0, "pm/pmp/step": 2},
    ]
    assert ("sft/*", "sft/step") in run.defined and ("pm/pmp/*", "pm/pmp/step") in run.defined


def test_off_absent_and_bad_modes(fake_wandb, monkeypatch, tmp_path):
    with wandb_run(_cfg(""), tmp_path) as run:
        assert run is None and not METRICS_SINKS
    with pytest.raises(ConfigError, match="log.wandb='onlin'"):
        with wandb_run(_cfg("onlin"), tmp_path):
            pass
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with wandb_run(_cfg("online"), tmp_path) as run:
        assert run is None and not METRICS_SINKS
    assert not fake_wandb
