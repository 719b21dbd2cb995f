r"""KL coefficient of PPO (reward - beta * KL to the SL-CAI reference): 0.01, 0.05, 0.2.

    python -m experiments.sweep --config configs/ablate_kl.py --root runs/ablate_kl
    python -m experiments.sweep --config configs/ablate_kl.py:base --root runs/ablate_kl-base

Starts from configs/demo.py (or base.py / tiny.py, named after the colon). The runs share every
stage their configs have in common; `sweep_report.md` in the root holds the cross-run figure.
"""

from configs import _common

SWEEP_STAGES = "revisions,sft,feedback,pm,ppo,eval,report"
SWEEP_FIGURE = "kl"


def get_config(arg=None):
    return _common.start(arg)


def sweep(arg=None):
    del arg
    return [{"name": f"kl-{beta}", "ppo.kl_coef": beta} for beta in (0.01, 0.05, 0.2)]
