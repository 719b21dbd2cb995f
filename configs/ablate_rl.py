r"""RL-CAI objectives side by side from one SL-CAI model and one set of AI labels: PPO and RLOO
against the preference model, soft-label DPO and IPO directly on the feedback comparisons.

    python -m experiments.sweep --config configs/ablate_rl.py --root runs/ablate_rl
    python -m experiments.sweep --config configs/ablate_rl.py:tiny --root runs/ablate_rl-tiny

Starts from configs/demo.py (or base.py / tiny.py, named after the colon). revisions, sft, feedback
and pm are shared by the four runs (their hashes do not read `rl`); each run's ppo stage trains
with its objective, and the evals compare its snapshots with the SL-CAI model. `sweep_report.md`
tables the runs' scores, KL and no-EOS fraction (every objective logs PPO's metric names).
"""

from configs import _common

SWEEP_STAGES = "revisions,sft,feedback,pm,ppo,eval,report"
SWEEP_FIGURE = "rl"


def get_config(arg=None):
    return _common.start(arg)


def sweep(arg=None):
    del arg
    return [{"name": a, "rl.algorithm": a} for a in ("ppo", "rloo", "dpo", "ipo")]
