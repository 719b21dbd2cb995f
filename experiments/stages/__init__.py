"""The stages of a Constitutional AI run, one module each, in pipeline order.

    revisions -> sft -> feedback -> pm -> ppo -> eval -> report

A stage module holds its frozen `Config` (built by `Config.build(cfg)` from the config sections it
declares; `experiments.typed`) and `run(ctx, cfg) -> summary`; `REGISTRY` lists them with the
stages each reads. `experiments.pipeline` runs a registry and imports no stage itself.
"""

from __future__ import annotations

from experiments.pipeline import Stage
from experiments.stages import eval as eval_
from experiments.stages import feedback, pm, ppo, report, revisions, sft

__all__ = ["REGISTRY"]

REGISTRY: tuple[Stage, ...] = (
    Stage("revisions", (), revisions.Config, revisions.run),
    Stage("sft", ("revisions",), sft.Config, sft.run),
    Stage("feedback", ("sft",), feedback.Config, feedback.run),
    Stage("pm", ("feedback",), pm.Config, pm.run),
    Stage("ppo", ("sft", "pm"), ppo.Config, ppo.run),
    # eval and report use whatever ran: a sweep over revision settings can run
    # revisions,eval,report with eval.scorer_pm pointing at another run's preference model.
    Stage("eval", ("revisions",), eval_.Config, eval_.run, optional=("sft", "feedback", "pm", "ppo")),
    Stage("report", ("eval",), report.Config, report.run, optional=("revisions", "sft", "feedback", "pm", "ppo")),
)
