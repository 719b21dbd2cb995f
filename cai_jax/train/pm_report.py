"""What the PM trainer writes after training: reward statistics, held-out metrics, the artifact.

    report = evaluate_pm(params, module, batcher, eval_pairs, batch_size=..., mesh=mesh, ...)
    write_report({**report, "steps": n}, f"{workdir}/eval.json")
    export_pm(params, cfg, f"{workdir}/export", tokenizer, report, rendering="chat", seq_len=512)

The report holds {"train": {"pairs", "truncated_sides"}, "reward_mean", "reward_std",
"reward_count", "eval": `eval.pm.pm_metrics` of the held-out pairs (or None),
"reliability_table"}: the reward mean / std are those of the PM's scores over both sides of the
training comparisons (a seeded sample of `max_pairs` of them), which RL normalises rewards by.
Scoring runs on the training mesh (`score_pairs`); the artifact is `checkpoints.pm.save_pm`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cai_jax import atomic
from cai_jax.models import ModelConfig, ScalarModel
from cai_jax.sharding import DEFAULT_RULES, Rules, global_batch, process_shard, with_rules
from cai_jax.train.loop import gather_to_host
from cai_jax.train.pm_data import pad_pairs
from cai_jax.train.steps import eval_pm_batch

__all__ = ["score_pairs", "json_safe", "evaluate_pm", "write_report", "export_pm"]

log = logging.getLogger(__name__)


def score_pairs(
    params: Any,
    module: ScalarModel,
    arrays: Mapping[str, np.ndarray],
    *,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    rules: Rules = DEFAULT_RULES,
) -> dict[str, np.ndarray]:
    """Scores both sides of every pair of `pad_pairs` arrays on `mesh`: {"r_a", "r_b"} float64 [N].

    Batches of `batch_size` pairs (the last one padded with repeats of its first pair, dropped).
    """
    fn = _eval_fn(module, mesh)
    n = arrays["p"].shape[0]
    lo_p, hi_p = process_shard(batch_size)
    r_a, r_b = [], []
    for lo in range(0, n, batch_size):
        idx = np.arange(lo, min(lo + batch_size, n))
        idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[0])])
        local = {k: arrays[k][idx][lo_p:hi_p] for k in ("tokens_a", "mask_a", "tokens_b", "mask_b")}
        with with_rules(mesh, rules):
            out = jax.device_get(fn(params, global_batch(local, mesh)))
        keep = min(batch_size, n - lo)
        r_a.append(np.asarray(out["r_a"], np.float64)[:keep])
        r_b.append(np.asarray(out["r_b"], np.float64)[:keep])
    return {"r_a": np.concatenate(r_a), "r_b": np.concatenate(r_b)}


@functools.lru_cache(maxsize=4)
def _eval_fn(module: ScalarModel, mesh: jax.sharding.Mesh) -> Callable:
    return jax.jit(functools.partial(eval_pm_batch, model=module), out_shardings=NamedSharding(mesh, P()))


def json_safe(x: Any) -> Any:
    """`x` with numpy values as Python ones and non-finite floats as None (JSON has no NaN)."""
    if isinstance(x, Mapping):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return (
            [json_safe(v) for v in np.asarray(x).tolist()] if isinstance(x, np.ndarray) else [json_safe(v) for v in x]
        )
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def evaluate_pm(
    params, module, batcher, eval_pairs, *, batch_size, seq_len, pad_id, mesh, rules, seed, max_pairs, n_bins
) -> dict:
    """The report of a trained PM (see the module docstring), without "steps"."""
    from cai_jax.eval.pm import pm_metrics, reliability_table, reward_stats

    report: dict[str, Any] = {"train": {"pairs": len(batcher), "truncated_sides": int(batcher.num_truncated)}}
    report.update(reward_mean=None, reward_std=None, reward_count=0, eval=None, reliability_table=None)
    n = len(batcher) if max_pairs is None else min(int(max_pairs), len(batcher))
    if n:
        idx = np.arange(len(batcher))
        if n < len(batcher):
            idx = np.sort(np.random.default_rng([seed, 1]).choice(len(batcher), n, replace=False))
        arrays = {k: v[idx] for k, v in batcher.arrays.items()}
        scores = score_pairs(params, module, arrays, batch_size=batch_size, mesh=mesh, rules=rules)
        stats = reward_stats(np.concatenate([scores["r_a"], scores["r_b"]]))
        report.update(reward_mean=stats["mean"], reward_std=stats["std"], reward_count=2 * n)
    if eval_pairs:
        arrays, cut = pad_pairs(eval_pairs, seq_len, pad_id)
        scores = score_pairs(params, module, arrays, batch_size=batch_size, mesh=mesh, rules=rules)
        metrics = pm_metrics(scores["r_a"], scores["r_b"], arrays["p"], n_bins=n_bins)
        report["eval"] = {**metrics, "truncated_sides": int(cut)}
        report["reliability_table"] = reliability_table(metrics)
        log.info(
            "PM eval: accuracy %.4f, log-loss %.4f, ECE %.4f", metrics["accuracy"], metrics["log_loss"], metrics["ece"]
        )
    return report


def export_pm(params, cfg: ModelConfig, folder, tokenizer, report: dict, *, rendering: str, seq_len: int) -> None:
    """Gathers (possibly sharded, multi-host) params and writes the PM artifact on process 0."""
    from cai_jax.checkpoints.pm import save_pm

    host = gather_to_host(params)
    if jax.process_index() == 0:
        stats = {"mean": report["reward_mean"], "std": report["reward_std"], "count": report["reward_count"]}
        summary = None
        if report["eval"] is not None:
            summary = {k: report["eval"][k] for k in ("n", "accuracy", "log_loss", "brier", "ece")}
        save_pm(
            folder,
            host,
            cfg,
            tokenizer=tokenizer,
            reward_stats=stats,
            metadata=json_safe({"steps": report["steps"], "eval": summary}),
            rendering=rendering,
            seq_len=seq_len,
        )


def write_report(report: dict, path: str) -> None:
    """`report` as JSON (non-finite numbers as null) at `path`, written whole or not at all, on process 0."""
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic.write_json(path, json_safe(report), indent=2)
