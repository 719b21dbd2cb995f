"""Optional Weights & Biases logging of every training metric, used only when `wandb` is installed.

`log.wandb` (configs/base.py): "offline" (the default: run files under `<workdir>/wandb`, uploaded
later with `wandb sync <workdir>/wandb/offline-run-*`), "online", or "" (off). wandb is not a
dependency: without the package nothing is logged and the launcher says so once, as with
TensorBoard (experiments/tensorboard.py). `metrics.jsonl` stays the source of truth.

While `wandb_run(cfg, workdir)` is open, every row any `MetricsLogger` writes (SFT, PMP, PM, PPO;
cai_jax/train/loop.py `METRICS_SINKS`) is also logged, its keys prefixed by the metrics file's
folder relative to the workdir ("sft/loss", "pm/pmp/accuracy", "ppo/objective/kl"), each folder
plotted against its own step ("<folder>/step"), since every stage counts its steps from 1. One
W&B run per launch (named after the workdir, the resolved config attached, project
$WANDB_PROJECT or "cai-jax"); a resumed stage logs the steps it repeats again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

from experiments.config_util import ConfigError

__all__ = ["MODES", "wandb_run"]

log = logging.getLogger(__name__)
MODES = ("offline", "online")


class _Sink:
    """Forwards MetricsLogger rows to one W&B run."""

    def __init__(self, run, workdir: Path):
        self.run = run
        self.workdir = workdir.resolve()
        self.defined: set[str] = set()

    def __call__(self, path: str, row: dict) -> None:
        folder = Path(path).resolve().parent
        try:
            prefix = folder.relative_to(self.workdir).as_posix()
        except ValueError:  # a metrics file outside the run folder
            prefix = folder.name
        if prefix not in self.defined:
            self.run.define_metric(f"{prefix}/step")
            self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
            self.defined.add(prefix)
        data = {
            f"{prefix}/{k}": v
            for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        data[f"{prefix}/step"] = int(row["step"])
        self.run.log(data)


@contextlib.contextmanager
def wandb_run(cfg, workdir) -> Iterator[object | None]:
    """Logs the training metrics of what runs inside to W&B (see the module docstring); yields the
    run, or None when `log.wandb` is off, wandb is not installed, or this is not process 0."""
    mode = str(cfg.log.wandb or "")
    if mode and mode not in MODES:
        raise ConfigError(f"log.wandb={mode!r}: must be one of {', '.join(MODES)} or '' (off)")
    if not mode:
        yield None
        return
    try:
        import wandb
    except ImportError:
        wandb = None
    if wandb is None:  # yielded outside the except block: errors of the run would chain to it
        log.info("log.wandb=%s: the wandb package is not installed; skipped", mode)
        yield None
        return
    import jax

    from cai_jax.train.loop import METRICS_SINKS

    if jax.process_index() != 0:  # only process 0 writes metrics (MetricsLogger)
        yield None
        return
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "cai-jax"),
        name=workdir.resolve().name,
        dir=str(workdir),
        mode=mode,
        config=cfg.to_dict(),
    )
    sink = _Sink(run, workdir)
    METRICS_SINKS.append(sink)
    try:
        yield run
    finally:
        METRICS_SINKS.remove(sink)
        run.finish()
