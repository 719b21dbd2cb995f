"""Stage 7, report: figures, `report.md` and `report.html` of the run (`experiments/report.py`),
drawn from the run folder's files alone. Its config is the whole resolved config (minus where
and how the run ran), which the report shows: any change of it draws the report again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from experiments.context import StageContext
from experiments.typed import inline, plain

UNHASHED = ("mesh", "checkpoint", "log")  # where and how a run runs, never what it computes


@dataclasses.dataclass(frozen=True)
class Config:
    config: Mapping[str, Any] = inline()  # every hashed section of the run's config, at its own paths

    @classmethod
    def build(cls, cfg) -> Config:
        return cls({k: plain(cfg[k]) for k in cfg.keys() if k not in UNHASHED})


def run(ctx: StageContext, cfg: Config) -> dict:
    from experiments.report import write_run_report

    return write_run_report(ctx.workdir)
