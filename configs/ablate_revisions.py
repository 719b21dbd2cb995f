r"""Number of revisions (paper Fig. 5): SL-CAI-n trained on revisions of rounds 1..n, n = 0..4.

    python -m experiments.sweep --config configs/ablate_revisions.py --root runs/ablate_revisions
    python -m experiments.sweep --config configs/ablate_revisions.py:base --root runs/ablate_revisions-base

Starts from configs/demo.py (or base.py / tiny.py, named after the colon). The runs share every
stage their configs have in common; `sweep_report.md` in the root holds the cross-run figure.
These runs train no preference model of their own: give them one to score with, e.g. the demo's,
`--config.eval.scorer_pm=runs/demo/pm/export`.
"""

from configs import _common

SWEEP_STAGES = "revisions,sft,eval,report"
SWEEP_FIGURE = "revisions"


def get_config(arg=None):
    c = _common.start(arg)
    if arg == "tiny":  # four rounds of critique and revision need more than tiny's 512-token context
        c.model.random_config.max_position_embeddings = 1024
    return c


def sweep(arg=None):
    del arg
    return [{"name": f"sl-cai-{n}", "revisions.num_revisions": 4, "sft.revision_round": n} for n in range(5)]
