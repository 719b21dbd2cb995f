r"""Preference-model pretraining on vs off (paper sec. 4, PMP before the PM fine-tune).

    python -m experiments.sweep --config configs/ablate_pmp.py --root runs/ablate_pmp
    python -m experiments.sweep --config configs/ablate_pmp.py:base --root runs/ablate_pmp-base

Starts from configs/demo.py (or base.py / tiny.py, named after the colon). The runs share every
stage their configs have in common; `sweep_report.md` in the root holds the cross-run figure.
"""

from configs import _common

SWEEP_STAGES = "revisions,sft,feedback,pm,eval,report"
SWEEP_FIGURE = "pmp"


def get_config(arg=None):
    return _common.start(arg)


def sweep(arg=None):
    del arg
    return [{"name": f"pmp-{'on' if on else 'off'}", "pm.pmp.enabled": on} for on in (True, False)]
