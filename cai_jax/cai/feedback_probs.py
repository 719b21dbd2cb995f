"""Label arithmetic: P(response A preferred) from the judge's option log-probs (paper sec. 4.1).

p_A = exp(l_A) / (exp(l_A) + exp(l_B)) per question; the A/B order swap, the mean over ensemble
members (principles, chain-of-thought samples), the clamp and the hard rounding follow, in that
order (`label_probabilities`). Pure numpy, float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["SWAP_AVERAGES", "label_probabilities", "member_probabilities"]

SWAP_AVERAGES = ("logit", "prob")


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def member_probabilities(logp_a, logp_b, *, swap_logps=None, swap_average: str = "logit") -> np.ndarray:
    """Per-question P(response A preferred), any shape, before averaging (see `label_probabilities`)."""
    la, lb = np.asarray(logp_a, np.float64), np.asarray(logp_b, np.float64)
    swap = tuple(np.asarray(x, np.float64) for x in swap_logps) if swap_logps is not None else ()
    if not all(np.all(np.isfinite(a)) for a in (la, lb, *swap)):
        raise ValueError("label_probabilities: non-finite log-probs")
    if swap_average not in SWAP_AVERAGES:
        raise ValueError(f"label_probabilities: swap_average={swap_average!r}; expected logit or prob")
    log_p = la - np.logaddexp(la, lb)
    if swap:
        sa, sb = swap
        if swap_average == "logit":
            log_p = _log_sigmoid(0.5 * ((la - lb) + (sb - sa)))
        else:  # response A is option (B) in the swapped question
            log_p = np.logaddexp(log_p, sb - np.logaddexp(sa, sb)) - np.log(2.0)
    return np.exp(log_p)


def label_probabilities(
    logp_a,
    logp_b,
    *,
    swap_logps: tuple[Any, Any] | None = None,
    swap_average: str = "logit",
    clamp: tuple[float, float] | None = None,
    hard: bool = False,
) -> np.ndarray:
    """P(response A preferred) from option log-probs (paper sec. 4.1: normalised " (A)" vs " (B)").

    p = exp(l_A - logaddexp(l_A, l_B)). With `swap_logps = (s_A, s_B)`, the log-probs of " (A)" and
    " (B)" when response B was shown as (A), p is averaged with 1 - exp(s_A - logaddexp(s_A, s_B)):
    in log-odds ("logit": sigmoid(((l_A - l_B) + (s_B - s_A)) / 2), which cancels a constant bonus
    for the first position exactly) or in probability ("prob"). A trailing member axis (shape
    [N, M]: principles or CoT samples) is averaged in probability, then `clamp`, then `hard`.

    Args:
      logp_a, logp_b: [N] or [N, M] log-probs of " (A)" and " (B)".
      swap_logps: the same for the swapped order, or None.
      swap_average: "logit" or "prob".
      clamp: (lo, hi) to clip the averaged p into, or None.
      hard: round to 0 / 1 (exactly 0.5 stays 0.5).

    Returns:
      float64 [N] (or a scalar array for scalar inputs).
    """
    la, lb = np.asarray(logp_a, np.float64), np.asarray(logp_b, np.float64)
    arrays = [la, lb] + ([np.asarray(x, np.float64) for x in swap_logps] if swap_logps is not None else [])
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"label_probabilities: shapes differ: {[a.shape for a in arrays]}")
    if la.ndim > 2:
        raise ValueError(f"label_probabilities: expected [N] or [N, M] log-probs, got shape {la.shape}")
    p = member_probabilities(la, lb, swap_logps=swap_logps, swap_average=swap_average)
    if p.ndim == 2:
        p = p.mean(axis=-1)
    if clamp is not None:
        lo, hi = clamp
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"label_probabilities: clamp={clamp!r}; expected 0 <= lo < hi <= 1")
        p = np.clip(p, lo, hi)
    if hard:
        p = np.where(p > 0.5, 1.0, np.where(p < 0.5, 0.0, 0.5))
    return p
