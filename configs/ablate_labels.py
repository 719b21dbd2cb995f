r"""Feedback label type (paper sec. 4.3): soft, hard, chain-of-thought clamped 40-60, 20-80, unclamped.

    python -m experiments.sweep --config configs/ablate_labels.py --root runs/ablate_labels
    python -m experiments.sweep --config configs/ablate_labels.py:base --root runs/ablate_labels-base

Starts from configs/demo.py (or base.py / tiny.py, named after the colon). The runs share every
stage their configs have in common; `sweep_report.md` in the root holds the cross-run figure.
"""

from configs import _common

SWEEP_STAGES = "revisions,sft,feedback,pm,ppo,eval,report"
SWEEP_FIGURE = "labels"


def get_config(arg=None):
    return _common.start(arg)


def sweep(arg=None):
    del arg
    return [
        {"name": "soft", "feedback.label": "soft"},
        {"name": "hard", "feedback.label": "hard"},
        {"name": "cot-40-60", "feedback.label": "cot", "feedback.cot_clamp": "40-60"},
        {"name": "cot-20-80", "feedback.label": "cot", "feedback.cot_clamp": "20-80"},
        {"name": "cot-unclamped", "feedback.label": "cot", "feedback.cot_clamp": "none"},
    ]
