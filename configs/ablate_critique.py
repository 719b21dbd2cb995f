r"""Critiqued vs direct revisions (paper Fig. 7).

    python -m experiments.sweep --config configs/ablate_critique.py --root runs/ablate_critique
    python -m experiments.sweep --config configs/ablate_critique.py:base --root runs/ablate_critique-base

Starts from configs/demo.py (or base.py / tiny.py, named after the colon). The runs share every
stage their configs have in common; `sweep_report.md` in the root holds the cross-run figure.
These runs train no preference model of their own: give them one to score with, e.g. the demo's,
`--config.eval.scorer_pm=runs/demo/pm/export`.
"""

from configs import _common

SWEEP_STAGES = "revisions,eval,report"
SWEEP_FIGURE = "critique"


def get_config(arg=None):
    return _common.start(arg)


def sweep(arg=None):
    del arg
    return [{"name": mode, "revisions.mode": mode} for mode in ("critique", "direct")]
