r"""Number of revisions (paper Fig. 5): SL-CAI-n trained on revisions of rounds 1..n, n = 0..4.

    python -m experiments.sweep --config configs/ablate_revisions.py --root runs/ablate_revisions
    python -m experiments.sweep --config configs/ablate_revisions.py:base --root runs/ablate_revisions-base

Starts from configs/demo.py (or base.py / tiny.py, named after the colon). The runs share every
stage their configs have in common; `sweep_report.md` in the root holds the cross-run figure.
These runs train no preference model of their own: give them one to score with, e.g. the demo's,
`--config.eval.scorer_pm=runs/demo/pm/export`.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_cai_common", os.path.join(os.path.dirname(__file__), "_common.py"))
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)

SWEEP_STAGES = "revisions,sft,eval,report"
SWEEP_FIGURE = "revisions"


def get_config(arg=None):
    return _common.start(arg)


def sweep(arg=None):
    del arg
    return [{"name": f"sl-cai-{n}", "revisions.num_revisions": 4, "sft.revision_round": n} for n in range(5)]
