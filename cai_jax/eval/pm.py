"""Preference-model evaluation on the host: accuracy, log-loss, Brier score, calibration, reward stats.

Inputs are the PM's scores of both sides of N pairs (`train.steps.eval_pm_batch` gathered over an
eval set) and the target p = P(A preferred) of each pair (Bai et al. 2022, sec. 4.1: soft targets
for AI feedback, p in {0, 1} for human labels). The PM's predicted probability that A is preferred
is q = sigmoid(r_a - r_b). Everything is numpy float64; nothing here runs on the accelerator.

Calibration (Bai et al. 2022, fig. 5 style reliability diagrams): pairs are binned by q into
equal-width bins and, per bin, the mean q is compared with the mean target p;

    ECE = sum_bins (count_b / N) * |mean_q_b - mean_p_b|.

A pair (A, B) with prediction q and target p is the same pair as (B, A) with 1 - q and 1 - p, so
which side a dataset calls "A" is arbitrary. By default (`fold=True`) each pair is oriented so that
q >= 0.5 (q -> 1 - q, p -> 1 - p where q < 0.5) and the bins are equal-width over [0.5, 1]: the ECE
then does not depend on the A/B order of the data, and every bin is used. With `fold=False` the
bins are equal-width over [0, 1] and pairs are taken as given (mirror-image bins then carry the
same information twice). A pair with q == 0.5 exactly keeps its orientation.

Shape letters: N pairs, K bins.
"""

from __future__ import annotations

import numpy as np

__all__ = ["pm_metrics", "reward_stats", "reliability_table"]


def _as_1d(name: str, x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 1:
        raise ValueError(f"pm_metrics: {name} must be 1-D [N], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"pm_metrics: {name} has non-finite values")
    return x


def pm_metrics(r_a, r_b, p, n_bins: int = 10, *, fold: bool = True) -> dict:
    """Pairwise accuracy, soft-target log-loss, Brier score and reliability bins / ECE.

    Args:
      r_a: [N] scores of the A sides.
      r_b: [N] scores of the B sides.
      p: [N] targets in [0, 1], the probability that A is preferred.
      n_bins: K, the number of equal-width reliability bins.
      fold: orient every pair so that q >= 0.5 and bin over [0.5, 1] (see module docstring);
        False bins the raw q over [0, 1].

    Returns:
      {"n": N,
       "accuracy": fraction of pairs with p != 0.5 where the PM prefers the side p prefers
         (sign(r_a - r_b) == sign(p - 0.5)); a tied score r_a == r_b counts as half right (the
         expected accuracy of a coin flip); NaN if every p == 0.5,
       "n_p_half": the number of pairs with p == 0.5, excluded from the accuracy,
       "log_loss": mean of -[p log q + (1 - p) log(1 - q)] (the PM loss without centering; its
         minimum over q is the entropy of p, not 0, for soft targets),
       "brier": mean of (q - p)^2,
       "ece": expected calibration error (module docstring),
       "fold": the `fold` argument,
       "bins": {"edges" [K+1], "count" [K] int, "mean_pred" [K], "mean_target" [K]} (the means
         are NaN in empty bins)}.

    Raises:
      ValueError: on shapes that differ or are not 1-D, non-finite values, p outside [0, 1],
        N == 0 or n_bins < 1.
    """
    r_a, r_b, p = _as_1d("r_a", r_a), _as_1d("r_b", r_b), _as_1d("p", p)
    if not r_a.shape == r_b.shape == p.shape:
        raise ValueError(f"pm_metrics: r_a {r_a.shape}, r_b {r_b.shape} and p {p.shape} must have one shape")
    n = p.shape[0]
    if n == 0:
        raise ValueError("pm_metrics: no pairs")
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"pm_metrics: targets p must lie in [0, 1], got min {p.min()} max {p.max()}")
    if n_bins < 1:
        raise ValueError(f"pm_metrics: n_bins={n_bins} must be >= 1")

    margin_N = r_a - r_b
    q_N = 0.5 * (1.0 + np.tanh(0.5 * margin_N))  # sigmoid, without exp overflow at large |margin|

    decided_N = p != 0.5
    agree_N = np.where(margin_N == 0, 0.5, (np.sign(margin_N) == np.sign(p - 0.5)).astype(np.float64))
    accuracy = float(np.mean(agree_N[decided_N])) if decided_N.any() else float("nan")

    # log q = -softplus(-m), log(1 - q) = -softplus(m): stable for large |m|.
    log_loss = float(np.mean(p * np.logaddexp(0.0, -margin_N) + (1.0 - p) * np.logaddexp(0.0, margin_N)))
    brier = float(np.mean(np.square(q_N - p)))

    if fold:
        flip_N = q_N < 0.5
        q_N = np.where(flip_N, 1.0 - q_N, q_N)
        p = np.where(flip_N, 1.0 - p, p)
    lo = 0.5 if fold else 0.0
    edges_K1 = np.linspace(lo, 1.0, n_bins + 1)
    # Bins are [e_k, e_k+1) and the last one is closed: q == 1 falls in bin K-1.
    idx_N = np.clip(np.floor((q_N - lo) / (1.0 - lo) * n_bins).astype(np.int64), 0, n_bins - 1)
    count_K = np.bincount(idx_N, minlength=n_bins)
    sum_q_K = np.bincount(idx_N, weights=q_N, minlength=n_bins)
    sum_p_K = np.bincount(idx_N, weights=p, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred_K = np.where(count_K > 0, sum_q_K / count_K, np.nan)
        mean_target_K = np.where(count_K > 0, sum_p_K / count_K, np.nan)
    # count_b / N * |mean_q_b - mean_p_b| = |sum_q_b - sum_p_b| / N, with no NaN from empty bins.
    ece = float(np.sum(np.abs(sum_q_K - sum_p_K)) / n)

    return {
        "n": int(n),
        "accuracy": accuracy,
        "n_p_half": int(np.sum(~decided_N)),
        "log_loss": log_loss,
        "brier": brier,
        "ece": ece,
        "fold": bool(fold),
        "bins": {"edges": edges_K1, "count": count_K, "mean_pred": mean_pred_K, "mean_target": mean_target_K},
    }


def reward_stats(rewards) -> dict[str, float]:
    """Mean and (population) standard deviation of PM scores, saved with the PM for RL.

    RL normalises the PM reward as (r - mean) / std, with the statistics taken over the PM's
    scores of the training responses (both sides of every pair), so the policy sees rewards of
    unit scale whatever offset the PM happened to learn (the PM loss only sees differences).

    Args:
      rewards: scores, any shape (flattened), e.g. concatenate([r_a, r_b]).

    Returns:
      {"mean", "std"} as Python floats; std uses ddof=0, like `pm_step`'s "reward_std".

    Raises:
      ValueError: on an empty or non-finite input.
    """
    r = np.asarray(rewards, np.float64).reshape(-1)
    if r.size == 0:
        raise ValueError("reward_stats: no rewards")
    if not np.all(np.isfinite(r)):
        raise ValueError("reward_stats: rewards have non-finite values")
    return {"mean": float(np.mean(r)), "std": float(np.std(r))}


def reliability_table(metrics: dict) -> str:
    """A markdown reliability table of `pm_metrics` output, one row per bin, then a summary line."""
    bins = metrics["bins"]
    edges = bins["edges"]
    lines = [
        "| bin | count | mean predicted | mean target | gap |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, count in enumerate(bins["count"]):
        last = k == len(bins["count"]) - 1
        span = f"[{edges[k]:.2f}, {edges[k + 1]:.2f}{']' if last else ')'}"
        if count == 0:
            lines.append(f"| {span} | 0 | - | - | - |")
            continue
        pred, target = bins["mean_pred"][k], bins["mean_target"][k]
        lines.append(f"| {span} | {int(count)} | {pred:.3f} | {target:.3f} | {pred - target:+.3f} |")
    lines.append("")
    lines.append(
        f"N = {metrics['n']}, ECE = {metrics['ece']:.4f}, accuracy = {metrics['accuracy']:.3f} "
        f"({metrics['n_p_half']} pairs with p = 0.5 excluded), log-loss = {metrics['log_loss']:.4f}, "
        f"Brier = {metrics['brier']:.4f}" + ("" if metrics["fold"] else " (unfolded)")
    )
    return "\n".join(lines)
