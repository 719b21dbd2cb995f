r"""Number of constitutional principles available to the revisions (paper Fig. 6): 1, 2, 4, 8, 16.

    python -m experiments.sweep --config configs/ablate_principles.py --root runs/ablate_principles
    python -m experiments.sweep --config configs/ablate_principles.py:base --root runs/ablate_principles-base

Starts from configs/demo.py (or base.py / tiny.py, named after the colon). The runs share every
stage their configs have in common; `sweep_report.md` in the root holds the cross-run figure.
These runs train no preference model of their own: give them one to score with, e.g. the demo's,
`--config.eval.scorer_pm=runs/demo/pm/export`.
"""

from configs import _common

SWEEP_STAGES = "revisions,eval,report"
SWEEP_FIGURE = "principles"


def get_config(arg=None):
    return _common.start(arg)


def sweep(arg=None):
    del arg
    return [{"name": f"principles-{k}", "revisions.num_principles": k} for k in (1, 2, 4, 8, 16)]
